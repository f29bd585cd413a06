"""The sweep's structured config: one dataclass per section (a sample's optimization: optimization.py), each checking
(a check names the key to change, relative to its section; compose.py prefixes model and dataset keys).

These are also Hydra's structured schemas (compose.register). Past composition every module reads these
plain dataclasses, never a DictConfig.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING

from ..errors import require as _require
from .optimization import AnalysisConfig, MethodConfig, MethodSettings, OptimConfig, ParamConfig

ATTENTION_IMPLEMENTATIONS = ("auto", "eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


MODEL_SOURCES = ("hf", "gguf_package", "random")
RANDOM_ARCHITECTURES = ("llama", "gpt_neox")
DATASET_SOURCES = ("pydoc", "pg19", "files", "random")


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
    restarts: int = 1  # optimizations of each sample from as many initializations (restart 0: the sample's own seed)
    layers: list[Any] = field(
        default_factory=lambda: ["all"]
    )  # decoder layers the model keeps (its first k, then its norm and head), or all

    def __post_init__(self):
        _require(
            bool(self.models and self.datasets and self.lengths and self.n_mem),
            "the grid is empty: grid.models, grid.datasets, grid.lengths and grid.n_mem each need a value",
        )
        _require(self.samples >= 1, f"grid.samples={self.samples}: need at least 1 sample per cell")
        _require(self.restarts >= 1, f"grid.restarts={self.restarts}: need at least 1 optimization per sample (1: no restarts)")
        for length in self.lengths:
            _require(length >= 2, f"grid.lengths contains {length}: a length must be >= 2 (one given token, one to predict)")
        for n_mem in self.n_mem:
            _require(n_mem >= 1, f"grid.n_mem contains {n_mem}: the number of vectors must be >= 1")
        for layers in self.layers:
            _require(
                layers == "all" or (isinstance(layers, int) and not isinstance(layers, bool) and layers >= 1),
                f"grid.layers contains {layers}: give decoder-layer counts >= 1, or all (e.g. grid.layers=[1,2,4,8,all])",
            )
        _require(len(set(self.layers)) == len(self.layers), f"grid.layers={list(self.layers)}: each count once")


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
            self.gpus > 0 and min(self.max_retries, self.cpus, self.count, self.max_workers, self.samples_per_item, self.check_every) >= 0,
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
    precision: str = "auto"  # auto | fp32 | bf16 | bf16-weights
    attention: str = "auto"  # auto | eager | sdpa | any attn_implementation transformers knows
    batch_size: Any = 16  # int, or "auto"
    batch_invariant: bool = True  # every forward at shapes of its rows' own (layout.py); false: packed, faster, rows feel their batch
    compile: Any = "auto"  # auto (on CUDA) | true | false | reduce-overhead (CUDA graphs): torch.compile the optimization forwards
    device: str = "auto"  # auto | cpu | cuda
    report: bool = True
    flush_seconds: float = 5.0  # finished samples reach the store and MLflow at least this often
    progress_line_seconds: float = 30.0  # where stderr is no terminal (logs): one plain progress line at most this often
    grid: GridConfig = field(default_factory=GridConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    param: ParamConfig = field(default_factory=ParamConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    models: dict[str, ModelConfig] = field(default_factory=dict)
    datasets: dict[str, DatasetConfig] = field(default_factory=dict)
    methods: dict[str, MethodSettings] = field(default_factory=dict)  # by method.name, composed from grid.methods

    def __post_init__(self):
        _require(
            self.precision in ("auto", "fp32", "bf16", "bf16-weights"),
            f"precision={self.precision}: choose auto, fp32, bf16 or bf16-weights (the model held in bf16, no fp32 copy)",
        )
        _require(
            self.attention in ATTENTION_IMPLEMENTATIONS, f"attention={self.attention}: choose one of {', '.join(ATTENTION_IMPLEMENTATIONS)}"
        )
        _require(self.device in ("auto", "cpu", "cuda"), f"device={self.device}: choose auto, cpu or cuda")
        _require(
            self.compile in ("auto", True, False, "reduce-overhead"),
            f"compile={self.compile}: choose auto (on CUDA), true, false or reduce-overhead (compiled with CUDA graphs)",
        )
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
