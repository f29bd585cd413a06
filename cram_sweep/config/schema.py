"""The sweep's structured config: one dataclass per section, each checking its own fields in `__post_init__`
(a check names the key to change, relative to its section; compose.py prefixes model and dataset keys).

These are also Hydra's structured schemas (compose.register). Past composition every module reads these
plain dataclasses, never a DictConfig.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING

from ..errors import UserError

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
    restarts: int = 1  # optimizations of each sample from as many initializations (restart 0: the sample's own seed)

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


GROWTHS = ("linear", "geometric")
BACKOFFS = ("bisect", "linear")


@dataclass
class MethodConfig:
    """How a cell's length is used. full (Kuratov et al.): the vectors are optimized for the whole text of the
    cell's length. progressive (Tarasov et al.): the cell's length is a cap; stages grow the target prefix
    from `min_length` and the horizon is the longest stage that converged."""

    name: str = "full"  # a method of cram_sweep/methods/ (full | progressive)
    predict_first: bool = False  # the last vector predicts the first text token (all of a stage's tokens are targets)
    growth: str = "linear"  # progressive: linear (+step per converged stage) | geometric (double, then back off)
    backoff: str = "bisect"  # geometric: bisect | linear (+1 from the longest converged stage)
    min_length: int = 1  # progressive: the first stage's length
    step: int = 8  # progressive: linear growth per stage; geometric: the back-off's resolution
    steps_per_stage: int = 500  # progressive: a stage without convergence after this many steps fails
    threshold: float = 1.0  # progressive: a stage converges at this teacher-forced accuracy
    prefix_tokens: int = 0  # the text's first P tokens are fed plainly after the vectors and never predicted

    def __post_init__(self):
        _require(self.growth in GROWTHS, f"method.growth={self.growth}: choose {' or '.join(GROWTHS)}")
        _require(self.backoff in BACKOFFS, f"method.backoff={self.backoff}: choose {' or '.join(BACKOFFS)}")
        for key in ("min_length", "step", "steps_per_stage"):
            _require(getattr(self, key) >= 1, f"method.{key}={getattr(self, key)}: must be >= 1")
        _require(0 < self.threshold <= 1, f"method.threshold={self.threshold}: must be in (0, 1]")
        _require(self.prefix_tokens >= 0, f"method.prefix_tokens={self.prefix_tokens}: must be >= 0")
        from ..methods import method  # the methods import this module

        wrong = method(self.name).check(self)
        _require(wrong is None, wrong)

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


BITS_RANGE = (2, 16)


@dataclass
class AnalysisConfig:
    """What is measured on each finished sample beyond its optimization (bits.py). bits: re-score the stored vectors
    rounded to bf16, fp8 e4m3 and uniform k-bit per vector for each k of `uniform_bits`, one forward per sample."""

    bits: bool = True
    uniform_bits: list[int] = field(default_factory=lambda: [12, 10, 8, 6, 5, 4, 3, 2])

    def __post_init__(self):
        low, high = BITS_RANGE
        for bits in self.uniform_bits:
            _require(
                low <= bits <= high,
                f"analysis.uniform_bits contains {bits}: each width must be in {low}..{high} bits (2: a sign and one level; 16: bf16's width)",
            )


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
