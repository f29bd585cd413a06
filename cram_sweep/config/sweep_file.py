"""The sweep file, `SWEEP_DIR/sweep.yaml`: the resolved config a resume reads back, and what a resume may change.

A stored sweep is the contract of its results: `result_config` is the part whose change would change them
(RESULT_KEYS), which `run` compares before it adds to a directory and `resume` refuses to override.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from ..errors import UserError, one_line
from .compose import register, to_sweep_config
from .schema import SweepConfig


def to_yaml(cfg) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def load_sweep_config(path: Path) -> SweepConfig:
    register()
    schema = OmegaConf.structured(SweepConfig)
    try:
        node = OmegaConf.merge(schema, OmegaConf.load(path))
    except Exception as err:  # YAML syntax, unknown keys, wrong types: a file from elsewhere or edited by hand
        raise UserError(
            f"{path} is not a valid cram-sweep config ({one_line(err, 200)}): fix the file or run the sweep again with `cram-sweep run`"
        ) from None
    return to_sweep_config(node)


# Keys whose change would change results: a sweep directory refuses a config that differs in them.
RESULT_KEYS = (
    "seed",
    "precision",
    "batch_invariant",
    "compile",
    "grid",
    "optim",
    "method",
    "methods",
    "param",
    "analysis",
    "models",
    "datasets",
)


def result_config(cfg: SweepConfig) -> str:
    return OmegaConf.to_yaml({key: getattr(cfg, key) for key in RESULT_KEYS}, resolve=True)


def with_runtime_overrides(cfg: SweepConfig, overrides: list[str]) -> SweepConfig:
    """A stored sweep config with `key=value` overrides of the keys that do not change results
    (cluster, tracking, worker, batch_size, attention, device, report, flush_seconds, progress_line_seconds)."""
    for override in overrides:
        key = override.split("=", 1)[0]
        if "=" not in override or key.startswith(("+", "~")):
            raise UserError(f"resume override {override!r}: write key=value, e.g. cluster.address=HOST:6379")
        if "." not in key and key in ("cluster", "tracking"):
            raise UserError(f"resume override {override!r}: set the keys themselves, e.g. {key}.kind=... ({key} groups apply to `run`)")
        if key.split(".")[0] in RESULT_KEYS + ("name", "out_dir"):
            raise UserError(
                f"resume cannot change {key}: it changes the results; start a new sweep with `cram-sweep run name=NEW {override}`"
            )
    try:
        node = OmegaConf.merge(OmegaConf.structured(cfg), OmegaConf.from_dotlist(overrides))
    except Exception as err:  # unknown key or wrong type
        raise UserError(f"resume overrides {' '.join(overrides)}: {one_line(err, 200)}") from None
    return to_sweep_config(node)
