"""The settings of one sample's optimization: its optimizer (`OptimConfig`), its method's (`MethodConfig`, the
methods/ module named by `method.name` checks its own), what is trained (`ParamConfig`) and what is measured after
(`AnalysisConfig`). Each checks its own fields in `__post_init__`, naming the key to change."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import require as _require

SCHEDULES = ("constant", "cosine")
INITS = ("embed_std", "uniform", "mvnormal", "from_sweep", "pca")
DISTANCES = ("l2", "l1", "cosine")  # the hybrid loss's (engine/alignment.py)
ENDS = ("first", "last")


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
    # The hybrid loss (engine/alignment.py): CE + hybrid_alpha x the distance of the crammed forward's hidden states
    # from the text's own, over `alignment_layers` hidden-state layers (0: all) counted from `alignment_from`.
    hybrid_alpha: float = 0.0  # 0: cross-entropy alone
    alignment_layers: int = 0
    alignment_from: str = "first"  # first (the input embeddings on) | last (the final norm's output back)
    alignment_loss: str = "l2"  # l2 | l1 | cosine

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
        _require(self.hybrid_alpha >= 0, f"optim.hybrid_alpha={self.hybrid_alpha}: must be >= 0 (0: cross-entropy alone)")
        _require(self.alignment_layers >= 0, f"optim.alignment_layers={self.alignment_layers}: must be >= 0 (0: every layer)")
        _require(self.alignment_from in ENDS, f"optim.alignment_from={self.alignment_from}: choose {' or '.join(ENDS)}")
        _require(self.alignment_loss in DISTANCES, f"optim.alignment_loss={self.alignment_loss}: choose {', '.join(DISTANCES)}")
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
    reset_lr_on_failure: bool = False  # progressive: a stage that fails is retried once, with a fresh optimizer and schedule

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
