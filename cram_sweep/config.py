"""Structured configs, Hydra composition, validation and grid expansion.

A sweep is one `SweepConfig`. `compose_config(overrides)` builds it from `conf/` with Hydra's compose
API; every model named in `grid.models` is composed from `conf/model/<name>.yaml` into
`models.<name>` (likewise datasets), so the resolved `sweep.yaml` carries everything a resume needs.
The composed DictConfig becomes the dataclasses once (`to_sweep_config`); each section checks its own
fields in `__post_init__` and `validate` does the checks across sections. Past that point every
module reads plain dataclasses.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from .errors import UserError, one_line

CONF_DIR = Path(os.environ.get("CRAM_SWEEP_CONF", Path(__file__).resolve().parent.parent / "conf"))


ATTENTION_IMPLEMENTATIONS = ("auto", "eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


MODEL_SOURCES = ("hf", "gguf_package", "random")
RANDOM_ARCHITECTURES = ("llama", "gpt_neox")
DATASET_SOURCES = ("pydoc", "pg19", "files", "random")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


@dataclass
class ModelConfig:
    """One file of conf/model/. Its checks name keys relative to `models.<name>.` (added by `to_sweep_config`)."""

    source: str = "hf"  # hf (hub id or local dir) | gguf_package (a pip package shipping a .gguf) | random
    path: str = ""  # hub id / local dir (hf), package name (gguf_package)
    gguf_file: Optional[str] = None
    family: Optional[str] = None  # "llama" runs under bf16 with precision=auto; default: the config's model_type
    architecture: Optional[str] = None  # random: llama | gpt_neox
    arch: dict[str, Any] = field(default_factory=dict)  # random: model config kwargs
    init_seed: int = 0  # random: weight init seed
    tokenizer_vocab: int = 512  # random: size of the built-in byte-level BPE trained on pydoc prose
    trust_remote_code: bool = False

    def __post_init__(self):
        _require(self.source in MODEL_SOURCES, f"source={self.source}: choose {', '.join(MODEL_SOURCES)}")
        if self.source == "random":
            _require(
                self.architecture in RANDOM_ARCHITECTURES,
                f"architecture={self.architecture}: a random model needs one of {', '.join(RANDOM_ARCHITECTURES)}",
            )
        else:
            _require(bool(self.path), "path is empty: give a HuggingFace id, a local directory or (gguf_package) a package name")


@dataclass
class DatasetConfig:
    """One file of conf/dataset/. Its checks name keys relative to `datasets.<name>.`."""

    source: str = "pydoc"  # pydoc | pg19 | files | random
    path: str = ""  # pg19: hub id or local dir; files: glob; random: word-list file ("" = tokenizer vocab)
    split: str = "train"  # pg19 split
    text_field: str = "text"
    chunk_words: int = 1000  # pydoc / files: words per chunk (files: 0 = one chunk per file)
    second_half: bool = True  # compress the second half (by sentences) of each chunk, as the reference
    num_words: int = 3000  # random: words per sample

    def __post_init__(self):
        _require(self.source in DATASET_SOURCES, f"source={self.source}: choose {', '.join(DATASET_SOURCES)}")


@dataclass
class GridConfig:
    models: list[str] = field(default_factory=lambda: ["smollm2"])
    datasets: list[str] = field(default_factory=lambda: ["pydoc"])
    lengths: list[int] = field(default_factory=lambda: [16, 32, 64])
    n_mem: list[int] = field(default_factory=lambda: [1])
    samples: int = 8
    methods: list[str] = field(default_factory=list)  # files of conf/method/ as a grid axis; [] = the one `method`

    def __post_init__(self):
        _require(
            bool(self.models and self.datasets and self.lengths and self.n_mem),
            "the grid is empty: grid.models, grid.datasets, grid.lengths and grid.n_mem each need a value",
        )
        _require(self.samples >= 1, f"grid.samples={self.samples}: need at least 1 sample per cell")
        for length in self.lengths:
            _require(length >= 2, f"grid.lengths contains {length}: a length must be >= 2 (one given token, one to predict)")
        for n_mem in self.n_mem:
            _require(n_mem >= 1, f"grid.n_mem contains {n_mem}: the number of vectors must be >= 1")


SCHEDULES = ("constant", "cosine")
INITS = ("embed_std", "uniform", "mvnormal", "from_sweep", "pca")


@dataclass
class OptimConfig:
    lr: float = 1e-2
    beta1: float = 0.9
    beta2: float = 0.9
    weight_decay: float = 0.01
    max_steps: int = 5000  # per sample, all stages together
    patience: int = 2000  # full: stop after this many steps without a better accuracy
    schedule: str = "constant"  # constant | cosine (the reference's cosine_with_min_lr over each sample's max_steps)
    warmup_steps: int = 0  # cosine: linear warm-up from lr 0
    min_lr: float = 0.0  # cosine: the floor
    init: str = "embed_std"  # embed_std | uniform | mvnormal | from_sweep | pca (see param.py)
    init_scale: float = 0.02
    init_from: str = ""  # from_sweep / pca: the sweep directory whose stored vectors are used
    leading_weight: float = 1.0  # the first `leading_count` targets weigh this much in the loss (accuracy stays unweighted)
    leading_count: int = 0

    def __post_init__(self):
        for key in ("max_steps", "patience"):
            _require(getattr(self, key) >= 1, f"optim.{key}={getattr(self, key)}: must be >= 1")
        _require(self.lr > 0, f"optim.lr={self.lr}: must be > 0")
        _require(self.schedule in SCHEDULES, f"optim.schedule={self.schedule}: choose {' or '.join(SCHEDULES)}")
        _require(self.init in INITS, f"optim.init={self.init}: choose {' or '.join(INITS)}")
        _require(0 <= self.warmup_steps < self.max_steps, f"optim.warmup_steps={self.warmup_steps}: must be >= 0 and below optim.max_steps")
        _require(0 <= self.min_lr < self.lr, f"optim.min_lr={self.min_lr}: must be >= 0 and below optim.lr")
        _require(self.init_scale > 0, f"optim.init_scale={self.init_scale}: must be > 0")
        _require(self.leading_count >= 0, f"optim.leading_count={self.leading_count}: must be >= 0 (0: every target weighs 1)")
        _require(self.leading_weight > 0, f"optim.leading_weight={self.leading_weight}: must be > 0")
        _require(
            self.init not in ("from_sweep", "pca") or bool(self.init_from),
            f"optim.init={self.init} needs optim.init_from=SWEEP_DIR: the sweep whose stored vectors it starts from",
        )


METHODS = ("full", "progressive")
GROWTHS = ("linear", "geometric")
BACKOFFS = ("bisect", "linear")


@dataclass
class MethodConfig:
    """How a cell's length is used. full (Kuratov et al.): the vectors are optimized for the whole text of the
    cell's length. progressive (Tarasov et al.): the cell's length is a cap; stages grow the target prefix
    from `min_length` and the horizon is the longest stage that converged."""

    name: str = "full"  # full | progressive
    predict_first: bool = False  # the last vector predicts the first text token (all of a stage's tokens are targets)
    growth: str = "linear"  # progressive: linear (+step per converged stage) | geometric (double, then back off)
    backoff: str = "bisect"  # geometric: bisect | linear (+1 from the longest converged stage)
    min_length: int = 1  # progressive: the first stage's length
    step: int = 8  # progressive: linear growth per stage; geometric: the back-off's resolution
    steps_per_stage: int = 500  # progressive: a stage without convergence after this many steps fails
    threshold: float = 1.0  # progressive: a stage converges at this teacher-forced accuracy
    prefix_tokens: int = 0  # the text's first P tokens are fed plainly after the vectors and never predicted

    def __post_init__(self):
        _require(self.name in METHODS, f"method.name={self.name}: choose method=full or method=progressive")
        _require(self.growth in GROWTHS, f"method.growth={self.growth}: choose {' or '.join(GROWTHS)}")
        _require(self.backoff in BACKOFFS, f"method.backoff={self.backoff}: choose {' or '.join(BACKOFFS)}")
        for key in ("min_length", "step", "steps_per_stage"):
            _require(getattr(self, key) >= 1, f"method.{key}={getattr(self, key)}: must be >= 1")
        _require(0 < self.threshold <= 1, f"method.threshold={self.threshold}: must be in (0, 1]")
        _require(self.prefix_tokens >= 0, f"method.prefix_tokens={self.prefix_tokens}: must be >= 0")
        _require(
            self.name == "full" or self.predict_first or self.min_length >= 2,
            f"method.min_length={self.min_length} with predict_first=false: a stage needs a token to predict, set method.min_length >= 2",
        )
        _require(
            self.name == "progressive" or not self.predict_first,
            "method.predict_first=true needs method=progressive (full cramming gives the first token, as Kuratov et al.)",
        )

    @property
    def progressive(self) -> bool:
        return self.name == "progressive"

    @property
    def given(self) -> int:
        """Text tokens fed, not predicted, before the first target: the prefix, else the first token (full, and
        progressive without predict_first), else none."""
        return self.prefix_tokens or (0 if self.predict_first else 1)

    @property
    def counted_from(self) -> int:
        """The first text token that stage lengths and horizons count: after the prefix, else the first."""
        return self.prefix_tokens


PARAMS = ("direct", "lowdim")


@dataclass
class ParamConfig:
    """What is optimized (param.py). direct: the n_mem vectors. lowdim: per sample, coefficients z (n_mem, k), a
    projection W (k, hidden) and a bias b (hidden); the vectors are z @ W + b."""

    name: str = "direct"  # direct | lowdim
    k: int = 32  # lowdim: the coefficients' width
    train_projection: bool = True  # lowdim: train W and b with z; false: a seeded nn.Linear(k, hidden) held fixed

    def __post_init__(self):
        _require(self.name in PARAMS, f"param.name={self.name}: choose param=direct or param=lowdim")
        _require(self.k >= 1, f"param.k={self.k}: the low-dimensional width must be >= 1")

    @property
    def label(self) -> str:
        """The `param` column: the name and the settings that change what is trained."""
        return "direct" if self.name == "direct" else f"lowdim(k={self.k},train_projection={str(self.train_projection).lower()})"


@dataclass
class MethodSettings:
    """One method of a sweep with the optimizer it runs with: `grid.methods` gives each its own."""

    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass
class WorkerConfig:
    gpus: float = 1.0  # GPUs per worker on GPU clusters (0.5 packs two small-model workers per GPU)
    cpus: int = 0  # CPUs per worker; 0 = all CPUs of the node (CPU clusters) or 1 (GPU workers)
    count: int = 0  # a fixed number of workers; 0 = one per GPU, or one per node without GPUs, as nodes join
    max_workers: int = 0  # the most workers the pool grows to as GPUs or nodes join; 0 = no limit but the cluster
    max_retries: int = 2  # a sample lost while it ran (worker killed, node gone, stalled) is retried this often
    samples_per_item: int = 0  # samples per work item; 0 = 4 x batch size
    check_every: int = 0  # steps between convergence checks (host syncs); 0 = 1 on CPU, 16 on GPU
    progress_seconds: float = 10.0  # a worker reports the steps of its running samples at most this often
    # An item that streams nothing (no heartbeat, no result) this long is stalled: its worker is killed and its
    # samples retried. A worker reports once per `check_every` steps at the most often, so this must outlast
    # 16 steps of the slowest GPU step (an 8B model at 1568 tokens, batch 16: ~1 min a step on a slow GPU) and a
    # first item's model load.
    stall_seconds: float = 1800.0

    def __post_init__(self):
        _require(
            self.gpus > 0
            and min(self.max_retries, self.cpus, self.count, self.max_workers, self.samples_per_item, self.check_every) >= 0,
            "worker.gpus must be > 0 and worker.cpus, worker.count, worker.max_workers, worker.max_retries, worker.samples_per_item, "
            "worker.check_every >= 0",
        )
        _require(
            self.stall_seconds > self.progress_seconds,
            f"worker.stall_seconds={self.stall_seconds:g}: must exceed worker.progress_seconds={self.progress_seconds:g}, "
            "how often a running item reports",
        )


@dataclass
class ClusterConfig:
    kind: str = "local"  # local: a Ray instance of its own, in-process | ray: join an existing cluster
    address: Optional[str] = None  # ray: cluster address; None = RAY_ADDRESS or "auto"
    num_cpus: Optional[int] = None  # local: CPUs Ray may use (None = all)
    # How long a sweep waits at its start for what its workers need, GPUs with device=cuda (else any node with a
    # CPU), while the autoscaler brings nodes; then one error. A local instance gains no nodes: conf/cluster/local.yaml says 0.
    wait_for_gpus_seconds: float = 900.0

    def __post_init__(self):
        _require(self.kind in ("local", "ray"), f"cluster.kind={self.kind}: choose cluster=local or cluster=ray")
        _require(self.wait_for_gpus_seconds >= 0, f"cluster.wait_for_gpus_seconds={self.wait_for_gpus_seconds:g}: must be >= 0")


@dataclass
class TrackingConfig:
    kind: str = "local"  # local: SQLite under out_dir | server: an MLflow tracking server
    uri: Optional[str] = None  # server: tracking URI; None = MLFLOW_TRACKING_URI
    experiment: str = "cram-sweep"

    def __post_init__(self):
        _require(self.kind in ("local", "server"), f"tracking.kind={self.kind}: choose tracking=local or tracking=server")


@dataclass
class SweepConfig:
    name: str = MISSING
    out_dir: str = "outputs"
    seed: int = 0
    precision: str = "auto"  # auto | fp32 | bf16
    attention: str = "auto"  # auto | eager | sdpa | any attn_implementation transformers knows
    batch_size: Any = 16  # int, or "auto"
    device: str = "auto"  # auto | cpu | cuda
    report: bool = True
    flush_seconds: float = 5.0  # finished samples reach the store and MLflow at least this often
    progress_line_seconds: float = 30.0  # where stderr is no terminal (logs): one plain progress line at most this often
    grid: GridConfig = field(default_factory=GridConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    param: ParamConfig = field(default_factory=ParamConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    models: dict[str, ModelConfig] = field(default_factory=dict)
    datasets: dict[str, DatasetConfig] = field(default_factory=dict)
    methods: dict[str, MethodSettings] = field(default_factory=dict)  # by method.name, composed from grid.methods

    def __post_init__(self):
        _require(self.precision in ("auto", "fp32", "bf16"), f"precision={self.precision}: choose auto, fp32 or bf16")
        _require(
            self.attention in ATTENTION_IMPLEMENTATIONS, f"attention={self.attention}: choose one of {', '.join(ATTENTION_IMPLEMENTATIONS)}"
        )
        _require(self.device in ("auto", "cpu", "cuda"), f"device={self.device}: choose auto, cpu or cuda")
        _require(
            self.batch_size == "auto"
            or (isinstance(self.batch_size, int) and not isinstance(self.batch_size, bool) and self.batch_size >= 1),
            f"batch_size={self.batch_size}: give a positive integer or auto",
        )
        _require(
            isinstance(self.name, str) and self.name not in ("", ".", "..") and not any(ch in self.name for ch in "/\\"),
            f"name={self.name!r}: a sweep name must be a plain directory name",
        )
        _require(self.flush_seconds >= 0, f"flush_seconds={self.flush_seconds}: must be >= 0")
        _require(self.progress_line_seconds >= 0, f"progress_line_seconds={self.progress_line_seconds}: must be >= 0")


@dataclass(frozen=True)
class Cell:
    model: str
    dataset: str
    n_mem: int
    length: int
    method: str = "full"

    @property
    def id(self) -> str:
        return f"{self.model}/{self.dataset}/{self.method}/n_mem={self.n_mem}/L={self.length}"

    @property
    def text_id(self) -> str:
        """What the sample's text and vectors' shape depend on: the cell without its method."""
        return f"{self.model}/{self.dataset}/n_mem={self.n_mem}/L={self.length}"


def _register() -> None:
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

    _register()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        raise UserError(_one_line(err)) from None


def _one_line(err: Exception) -> str:
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
        raise UserError(f"{' '.join(methods_overrides)}: {cause} (write methods.<full|progressive>.<method|optim>.KEY=VALUE)") from None


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
        if method.progressive and method.min_length + method.counted_from > shortest:
            raise UserError(
                f"{key}method.min_length={method.min_length} exceeds the shortest cap in grid.lengths ({shortest}): lower it or raise the lengths"
            )
        if method.prefix_tokens >= shortest:
            raise UserError(
                f"{key}method.prefix_tokens={method.prefix_tokens} leaves nothing to predict at the shortest length in grid.lengths "
                f"({shortest}): lower it below {shortest} or raise the lengths"
            )
        if optim.init == "pca" and cfg.param.name != "lowdim":
            raise UserError(f"{key}optim.init=pca draws the low-dimensional coefficients' subspace: it needs param=lowdim")
        if optim.init in ("from_sweep", "mvnormal") and cfg.param.name != "direct":
            raise UserError(f"{key}optim.init={optim.init} draws the vectors themselves: it needs param=direct (lowdim draws z at width k)")


def to_yaml(cfg) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def load_sweep_config(path: Path) -> SweepConfig:
    _register()
    schema = OmegaConf.structured(SweepConfig)
    try:
        node = OmegaConf.merge(schema, OmegaConf.load(path))
    except Exception as err:  # YAML syntax, unknown keys, wrong types: a file from elsewhere or edited by hand
        raise UserError(
            f"{path} is not a valid cram-sweep config ({one_line(err, 200)}): fix the file or run the sweep again with `cram-sweep run`"
        ) from None
    return to_sweep_config(node)


# Keys whose change would change results: a sweep directory refuses a config that differs in them.
RESULT_KEYS = ("seed", "precision", "grid", "optim", "method", "methods", "param", "models", "datasets")


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


def method_settings(cfg: SweepConfig) -> dict[str, MethodSettings]:
    """The sweep's methods by name: those of `grid.methods`, or the one `method` with the sweep's `optim`."""
    return cfg.methods if cfg.grid.methods else {cfg.method.name: MethodSettings(cfg.method, cfg.optim)}


def cells(cfg: SweepConfig) -> list[Cell]:
    g = cfg.grid
    return [
        Cell(model, dataset, n_mem, length, method)
        for model in g.models
        for dataset in g.datasets
        for method in method_settings(cfg)
        for n_mem in g.n_mem
        for length in sorted(g.lengths)
    ]


def sample_seed(seed: int, cell: Cell, sample: int) -> int:
    """The seed of one sample's init: a function of (sweep seed, cell without its method, sample index) alone, so a
    sample starts from the same random stream under every method, and adding the method axis changed no result."""
    digest = hashlib.sha256(f"{seed}|{cell.text_id}|{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
