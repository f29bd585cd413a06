"""Hydra composition of `conf/` into a checked `SweepConfig`.

`compose_config(overrides)` builds a sweep from `conf/config.yaml` with Hydra's compose API; every model named
in `grid.models` is composed from `conf/model/<name>.yaml` into `models.<name>` (likewise datasets), and every
method of `grid.methods` into `methods.<method.name>`, so the resolved `sweep.yaml` carries everything a resume
needs. The DictConfig becomes the dataclasses once (`to_sweep_config`): each section checks itself, then
`validate` checks across sections; Hydra's multi-line errors become one line that names the key to change.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from ..errors import UserError, one_line
from ..methods import registered
from ..sweep.grid import method_settings
from .schema import (
    ClusterConfig,
    DatasetConfig,
    MethodSettings,
    ModelConfig,
    ParamConfig,
    SweepConfig,
    TrackingConfig,
)

CONF_DIR = Path(os.environ.get("CRAM_SWEEP_CONF", Path(__file__).resolve().parents[2] / "conf"))


def register() -> None:
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="sweep_schema", node=SweepConfig)
    store.store(group="model", name="model_schema", node=ModelConfig)
    store.store(group="dataset", name="dataset_schema", node=DatasetConfig)
    store.store(group="cluster", name="cluster_schema", node=ClusterConfig)
    store.store(group="tracking", name="tracking_schema", node=TrackingConfig)
    store.store(group="param", name="param_schema", node=ParamConfig)


def available(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _compose(overrides: list[str]) -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    register()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        raise UserError(hydra_error_line(err)) from None


def hydra_error_line(err: Exception) -> str:
    """Hydra's multi-line composition errors as one line that names the key or option to change."""
    import re

    text = one_line(err)
    cause = one_line(err.__cause__ or "")
    cause = re.sub(r" (full_key|reference_type|object_type)=.*$", "", re.sub(r" full_key: (\S+)", r" (\1)", cause))
    unknown_key = re.match(r"Could not override '([^']+)'", text)
    if unknown_key and "not in" in cause:
        return f"unknown config key {unknown_key.group(1)}: check its spelling (`cram-sweep run --cfg job` prints every key)"
    missing = re.search(r"Could not find '([^'/]+)/([^']+)'", text)
    if missing:
        group, option = missing.groups()
        options = re.search(r"Available options in '[^']+':(.*?)(Config search path|$)", str(err), re.S)
        names = [o for o in options.group(1).split() if not o.endswith("_schema")] if options else []
        return f"unknown option {group}={option}: choose from {', '.join(names)} or add conf/{group}/{option}.yaml"
    bad_value = re.match(r"Error merging override (\S+?)=(.*)$", text)
    if bad_value and cause:
        return f"{bad_value.group(1)}={bad_value.group(2)}: {cause}"
    text = text.split(" Config search path:")[0]
    if cause and cause not in text:
        text += f" ({cause})"
    return text


def _names(first: DictConfig, group: str, key: str) -> list[str]:
    names, known = list(first.grid[key]), available(group)
    for name in names:
        if name not in known:
            raise UserError(f"unknown {group} '{name}' in grid.{key}: choose from {known} or add conf/{group}/{name}.yaml")
    return names


def compose(overrides: list[str]) -> DictConfig:
    """Compose `conf/config.yaml` with Hydra overrides, then pull in the named models and datasets, and the methods
    of `grid.methods`: each composed as `method=<name>` would be (its file's optim, then the command line's
    `optim.*`), filed under `methods.<method.name>`, then the `methods.*` overrides on top."""
    methods_overrides = [o for o in overrides if o.lstrip("+~").startswith("methods.")]
    overrides = [o for o in overrides if o not in methods_overrides]
    own = [o for o in overrides if not o.lstrip("+~").startswith(("models.", "datasets."))]
    first = _compose(own)
    extra = []
    for group, key in (("model", "models"), ("dataset", "datasets")):
        extra += [f"+{group}@{key}.{name}={name}" for name in _names(first, group, key)]
    node = _compose(extra + overrides)
    without_method = [o for o in own if not o.startswith("method=")]
    methods = {}
    for name in _names(first, "method", "methods"):
        one = _compose(without_method + [f"method={name}"])
        if one.method.name in methods:
            raise UserError(
                f"grid.methods names two {one.method.name} methods ({name} and another): one sweep compares protocols, "
                "run each variant as a sweep of its own"
            )
        methods[one.method.name] = OmegaConf.merge(OmegaConf.structured(MethodSettings), {"method": one.method, "optim": one.optim})
    if methods_overrides and not methods:
        raise UserError(f"{methods_overrides[0]}: methods.* overrides need grid.methods, e.g. 'grid.methods=[full,progressive]'")
    with open_dict(node.methods):  # Hydra composes in struct mode, where a dict takes no new keys
        for name, settings in methods.items():
            node.methods[name] = settings
    try:
        return OmegaConf.merge(node, OmegaConf.from_dotlist([o.lstrip("+") for o in methods_overrides]))
    except OmegaConfBaseException as err:
        cause = one_line(err, 200).split(" full_key:")[0]
        raise UserError(
            f"{' '.join(methods_overrides)}: {cause} (write methods.<{'|'.join(registered())}>.<method|optim>.KEY=VALUE)"
        ) from None


def compose_config(overrides: list[str]) -> SweepConfig:
    """The checked `SweepConfig` of `conf/` with these Hydra overrides."""
    return to_sweep_config(compose(overrides))


def _unknown_keys(node, schema, prefix: str) -> list[str]:
    """Keys appended with `+key=value` that the schema does not know (Hydra accepts them)."""
    unknown = []
    known = set(schema.keys())
    for key in node:
        if key not in known:
            unknown.append(f"{prefix}{key}")
        elif not OmegaConf.is_missing(schema, key) and OmegaConf.is_dict(schema[key]) and len(schema[key]) and OmegaConf.is_dict(node[key]):
            unknown += _unknown_keys(node[key], schema[key], f"{prefix}{key}.")
    return unknown


def to_sweep_config(node: DictConfig) -> SweepConfig:
    """The one conversion of a composed or loaded config to the dataclasses: every section checks itself,
    then `validate` checks across sections. Raises UserError naming the key to change."""
    unknown = _unknown_keys(node, OmegaConf.structured(SweepConfig), "")
    for key, schema in (("models", ModelConfig), ("datasets", DatasetConfig)):
        for name in node[key]:
            unknown += _unknown_keys(node[key][name], OmegaConf.structured(schema), f"{key}.{name}.")
    if unknown:
        raise UserError(f"unknown config key {unknown[0]}: check its spelling (`cram-sweep run --cfg job` prints every key)")
    for key in ("models", "datasets"):  # their checks do not know their name: converted alone, to prefix it
        for name in node[key]:
            try:
                OmegaConf.to_object(node[key][name])
            except UserError as err:
                raise UserError(f"{key}.{name}.{err}") from None
    cfg = OmegaConf.to_object(node)
    validate(cfg)
    return cfg


def validate(cfg: SweepConfig) -> None:
    """Checks across sections (each section checks its own keys)."""
    for key, names in (("models", cfg.grid.models), ("datasets", cfg.grid.datasets)):
        missing = [name for name in names if name not in getattr(cfg, key)]
        if missing:
            raise UserError(f"grid.{key} names {missing[0]}, which has no entry under {key}: add {key}.{missing[0]} or fix grid.{key}")
    shortest = min(cfg.grid.lengths)
    for settings in method_settings(cfg).values():
        method, optim = settings.method, settings.optim
        key = f"methods.{method.name}." if cfg.grid.methods else ""
        wrong = registered()[method.name].check_grid(method, cfg.grid, key)
        if wrong:
            raise UserError(wrong)
        if method.prefix_tokens >= shortest:
            raise UserError(
                f"{key}method.prefix_tokens={method.prefix_tokens} leaves nothing to predict at the shortest length in grid.lengths "
                f"({shortest}): lower it below {shortest} or raise the lengths"
            )
        if optim.hybrid_alpha and not registered()[method.name].feeds_text:
            raise UserError(
                f"{key}optim.hybrid_alpha={optim.hybrid_alpha}: method={method.name} feeds no text, so no hidden states align to "
                "the text's own: set it to 0"
            )
        if optim.init == "pca" and cfg.param.name != "lowdim":
            raise UserError(f"{key}optim.init=pca draws the low-dimensional coefficients' subspace: it needs param=lowdim")
        if optim.init == "from_sweep" and cfg.grid.restarts > 1:
            raise UserError(
                f"{key}optim.init=from_sweep with grid.restarts={cfg.grid.restarts}: every restart would start from the same stored "
                "vectors and repeat one run; use another optim.init or grid.restarts=1"
            )
        if optim.init in ("from_sweep", "mvnormal") and cfg.param.name != "direct":
            raise UserError(f"{key}optim.init={optim.init} draws the vectors themselves: it needs param=direct (lowdim draws z at width k)")
