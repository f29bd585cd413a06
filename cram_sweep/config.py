"""Structured configs, Hydra composition, validation and grid expansion.

A sweep is one `SweepConfig`. `compose_config(overrides)` builds it from `conf/` with Hydra's compose
API; every model named in `grid.models` is composed from `conf/model/<name>.yaml` into
`models.<name>` (likewise datasets), so the resolved `sweep.yaml` carries everything a resume needs.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, DictConfig, OmegaConf

CONF_DIR = Path(os.environ.get("CRAM_SWEEP_CONF", Path(__file__).resolve().parent.parent / "conf"))


ATTENTION_IMPLEMENTATIONS = ("auto", "eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


class UserError(Exception):
    """Bad input: the message is one line that says what to change."""


@dataclass
class ModelConfig:
    source: str = "hf"  # hf (hub id or local dir) | gguf_package (a pip package shipping a .gguf) | random
    path: str = ""  # hub id / local dir (hf), package name (gguf_package)
    gguf_file: Optional[str] = None
    family: Optional[str] = None  # "llama" runs under bf16 with precision=auto; default: the config's model_type
    architecture: Optional[str] = None  # random: llama | gpt_neox
    arch: Dict[str, Any] = field(default_factory=dict)  # random: model config kwargs
    init_seed: int = 0  # random: weight init seed
    tokenizer_vocab: int = 512  # random: size of the built-in byte-level BPE trained on pydoc prose
    trust_remote_code: bool = False


@dataclass
class DatasetConfig:
    source: str = "pydoc"  # pydoc | pg19 | files | random
    path: str = ""  # pg19: hub id or local dir; files: glob; random: word-list file ("" = tokenizer vocab)
    split: str = "train"  # pg19 split
    text_field: str = "text"
    chunk_words: int = 1000  # pydoc / files: words per chunk (files: 0 = one chunk per file)
    second_half: bool = True  # compress the second half (by sentences) of each chunk, as the reference
    num_words: int = 3000  # random: words per sample


@dataclass
class GridConfig:
    models: List[str] = field(default_factory=lambda: ["smollm2"])
    datasets: List[str] = field(default_factory=lambda: ["pydoc"])
    lengths: List[int] = field(default_factory=lambda: [16, 32, 64])
    n_mem: List[int] = field(default_factory=lambda: [1])
    samples: int = 8


@dataclass
class OptimConfig:
    lr: float = 1e-2
    beta1: float = 0.9
    beta2: float = 0.9
    weight_decay: float = 0.01
    max_steps: int = 5000
    patience: int = 2000


@dataclass
class WorkerConfig:
    gpus: float = 1.0  # GPUs per worker on GPU clusters (0.5 packs two small-model workers per GPU)
    cpus: int = 0  # CPUs per worker; 0 = all CPUs of the node (CPU clusters) or 1 (GPU workers)
    count: int = 0  # number of workers; 0 = one per GPU, or one per node without GPUs
    max_retries: int = 2  # a sample lost with its worker (killed, node gone) is retried this often
    samples_per_item: int = 0  # samples per work item; 0 = 4 x batch size
    check_every: int = 0  # steps between convergence checks (host syncs); 0 = 1 on CPU, 16 on GPU
    progress_seconds: float = 10.0  # a worker reports the steps of its running samples at most this often


@dataclass
class ClusterConfig:
    kind: str = "local"  # local: ray.init() in-process | ray: join an existing cluster
    address: Optional[str] = None  # ray: cluster address; None = RAY_ADDRESS or "auto"
    num_cpus: Optional[int] = None  # local: CPUs Ray may use (None = all)


@dataclass
class TrackingConfig:
    kind: str = "local"  # local: SQLite under out_dir | server: an MLflow tracking server
    uri: Optional[str] = None  # server: tracking URI; None = MLFLOW_TRACKING_URI
    experiment: str = "cram-sweep"


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
    grid: GridConfig = field(default_factory=GridConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    models: Dict[str, ModelConfig] = field(default_factory=dict)
    datasets: Dict[str, DatasetConfig] = field(default_factory=dict)


@dataclass(frozen=True)
class Cell:
    model: str
    dataset: str
    n_mem: int
    length: int

    @property
    def id(self) -> str:
        return f"{self.model}/{self.dataset}/n_mem={self.n_mem}/L={self.length}"


def _register() -> None:
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="sweep_schema", node=SweepConfig)
    store.store(group="model", name="model_schema", node=ModelConfig)
    store.store(group="dataset", name="dataset_schema", node=DatasetConfig)
    store.store(group="cluster", name="cluster_schema", node=ClusterConfig)
    store.store(group="tracking", name="tracking_schema", node=TrackingConfig)


def available(group: str) -> List[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _compose(overrides: List[str]) -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    _register()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        raise UserError(_one_line(err)) from None


def _one_line(err: Exception) -> str:
    """Hydra's multi-line composition errors as one line that names the key or option to change."""
    import re

    text = " ".join(str(err).split())
    cause = " ".join(str(err.__cause__ or "").split())
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


def compose_config(overrides: List[str]) -> DictConfig:
    """Compose `conf/config.yaml` with Hydra overrides, then pull in the named models and datasets."""
    own = [o for o in overrides if not o.lstrip("+~").startswith(("models.", "datasets."))]
    first = _compose(own)
    extra = []
    for group, key in (("model", "models"), ("dataset", "datasets")):
        names = list(first.grid[key])
        known = available(group)
        for name in names:
            if name not in known:
                raise UserError(
                    f"unknown {group} '{name}' in grid.{key}: choose from {known} or add conf/{group}/{name}.yaml"
                )
        extra += [f"+{group}@{key}.{name}={name}" for name in names]
    return _compose(extra + overrides)


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def load_sweep_config(path: Path) -> DictConfig:
    _register()
    schema = OmegaConf.structured(SweepConfig)
    try:
        return OmegaConf.merge(schema, OmegaConf.load(path))
    except Exception as err:  # YAML syntax, unknown keys, wrong types: a file from elsewhere or edited by hand
        raise UserError(f"{path} is not a valid cram-sweep config ({' '.join(str(err).split())[:200]}): fix the file or run the sweep again with `cram-sweep run`") from None


# Keys whose change would change results: a sweep directory refuses a config that differs in them.
RESULT_KEYS = ("seed", "precision", "grid", "optim", "models", "datasets")


def result_config(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml({k: cfg[k] for k in RESULT_KEYS}, resolve=True)


def with_runtime_overrides(cfg: DictConfig, overrides: List[str]) -> DictConfig:
    """A stored sweep config with `key=value` overrides of the keys that do not change results
    (cluster, tracking, worker, batch_size, attention, device, report, flush_seconds)."""
    for override in overrides:
        key = override.split("=", 1)[0]
        if "=" not in override or key.startswith(("+", "~")):
            raise UserError(f"resume override {override!r}: write key=value, e.g. cluster.address=HOST:6379")
        if "." not in key and key in ("cluster", "tracking"):
            raise UserError(f"resume override {override!r}: set the keys themselves, e.g. {key}.kind=... ({key} groups apply to `run`)")
        if key.split(".")[0] in RESULT_KEYS + ("name", "out_dir"):
            raise UserError(f"resume cannot change {key}: it changes the results; start a new sweep with `cram-sweep run name=NEW {override}`")
    try:
        return OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
    except Exception as err:  # unknown key or wrong type
        raise UserError(f"resume overrides {' '.join(overrides)}: {' '.join(str(err).split())[:200]}") from None


MODEL_SOURCES = ("hf", "gguf_package", "random")
RANDOM_ARCHITECTURES = ("llama", "gpt_neox")
DATASET_SOURCES = ("pydoc", "pg19", "files", "random")


def _unknown_keys(node, schema, prefix: str) -> List[str]:
    """Keys appended with `+key=value` that the schema does not know (Hydra accepts them)."""
    unknown = []
    known = set(schema.keys())
    for key in node.keys():
        if key not in known:
            unknown.append(f"{prefix}{key}")
        elif not OmegaConf.is_missing(schema, key) and OmegaConf.is_dict(schema[key]) and len(schema[key]) and OmegaConf.is_dict(node[key]):
            unknown += _unknown_keys(node[key], schema[key], f"{prefix}{key}.")
    return unknown


def validate(cfg: DictConfig) -> None:
    """Checks that need no model or data; each failure names the key to change."""
    grid = cfg.grid
    if not grid.models or not grid.datasets or not grid.lengths or not grid.n_mem:
        raise UserError("the grid is empty: grid.models, grid.datasets, grid.lengths and grid.n_mem each need a value")
    if grid.samples < 1:
        raise UserError(f"grid.samples={grid.samples}: need at least 1 sample per cell")
    for length in grid.lengths:
        if length < 2:
            raise UserError(f"grid.lengths contains {length}: a length must be >= 2 (one given token, one to predict)")
    for n_mem in grid.n_mem:
        if n_mem < 1:
            raise UserError(f"grid.n_mem contains {n_mem}: the number of vectors must be >= 1")
    if cfg.precision not in ("auto", "fp32", "bf16"):
        raise UserError(f"precision={cfg.precision}: choose auto, fp32 or bf16")
    if cfg.attention not in ATTENTION_IMPLEMENTATIONS:
        raise UserError(f"attention={cfg.attention}: choose one of {', '.join(ATTENTION_IMPLEMENTATIONS)}")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise UserError(f"device={cfg.device}: choose auto, cpu or cuda")
    if cfg.batch_size != "auto" and (not isinstance(cfg.batch_size, int) or cfg.batch_size < 1):
        raise UserError(f"batch_size={cfg.batch_size}: give a positive integer or auto")
    optim = cfg.optim
    for key in ("max_steps", "patience"):
        if optim[key] < 1:
            raise UserError(f"optim.{key}={optim[key]}: must be >= 1")
    if optim.lr <= 0:
        raise UserError(f"optim.lr={optim.lr}: must be > 0")
    if cfg.cluster.kind not in ("local", "ray"):
        raise UserError(f"cluster.kind={cfg.cluster.kind}: choose cluster=local or cluster=ray")
    if cfg.tracking.kind not in ("local", "server", "none"):
        raise UserError(f"tracking.kind={cfg.tracking.kind}: choose tracking=local or tracking=server")
    if cfg.worker.gpus <= 0 or cfg.worker.max_retries < 0 or cfg.worker.cpus < 0 or cfg.worker.count < 0:
        raise UserError("worker.gpus must be > 0 and worker.cpus, worker.count, worker.max_retries >= 0")
    if any(ch in cfg.name for ch in "/\\") or cfg.name in ("", ".", ".."):
        raise UserError(f"name={cfg.name!r}: a sweep name must be a plain directory name")
    if cfg.flush_seconds < 0:
        raise UserError(f"flush_seconds={cfg.flush_seconds}: must be >= 0")
    unknown = _unknown_keys(cfg, OmegaConf.structured(SweepConfig), "")
    for key, schema in (("models", ModelConfig), ("datasets", DatasetConfig)):
        for name in cfg[key]:
            unknown += _unknown_keys(cfg[key][name], OmegaConf.structured(schema), f"{key}.{name}.")
    if unknown:
        raise UserError(f"unknown config key {unknown[0]}: check its spelling (`cram-sweep run --cfg job` prints every key)")
    for name in grid.models:
        model = cfg.models[name]
        if model.source not in MODEL_SOURCES:
            raise UserError(f"models.{name}.source={model.source}: choose {', '.join(MODEL_SOURCES)}")
        if model.source == "random" and model.architecture not in RANDOM_ARCHITECTURES:
            raise UserError(f"models.{name}.architecture={model.architecture}: a random model needs one of {', '.join(RANDOM_ARCHITECTURES)}")
        if model.source != "random" and not model.path:
            raise UserError(f"models.{name}.path is empty: give a HuggingFace id, a local directory or (gguf_package) a package name")
    for name in grid.datasets:
        if cfg.datasets[name].source not in DATASET_SOURCES:
            raise UserError(f"datasets.{name}.source={cfg.datasets[name].source}: choose {', '.join(DATASET_SOURCES)}")


def cells(cfg: DictConfig) -> List[Cell]:
    g = cfg.grid
    return [
        Cell(model, dataset, n_mem, length)
        for model in g.models
        for dataset in g.datasets
        for n_mem in g.n_mem
        for length in sorted(g.lengths)
    ]


def sample_seed(seed: int, cell: Cell, sample: int) -> int:
    """The seed of one sample's init: a function of (sweep seed, cell, sample index) alone."""
    digest = hashlib.sha256(f"{seed}|{cell.id}|{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
