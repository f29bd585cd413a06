"""A cell's identity (`Cell`: its keys and its name) and the stores' rows, each column defined once (store.py derives the Parquet schemas from these dataclasses).

A `results/` row is a sample's own columns (`SampleColumns`: what the engine computes) next to its cell's
(`CellColumns`: what the driver and the worker know). The engine's `SampleResult` (engine/samples.py) is `SampleColumns` plus
what travels with it but is not stored in the row; a `stages/` row is a `StageRecord` with its cell and sample.
No dependencies beyond the standard library: the engine and the workers import this, and nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class Cell:
    model: str
    dataset: str
    n_mem: int
    length: int
    method: str = "full"
    layers: int = 0  # the decoder layers the model keeps (grid.layers), 0: all

    @property
    def id(self) -> str:
        """Its name: model/dataset/method/n_mem=K[/layers=D]/L=length."""
        return f"{self.model}/{self.dataset}/{self.method}/n_mem={self.n_mem}{depth_part(self.layers)}/L={self.length}"

    @property
    def tags(self) -> dict[str, str]:
        """Its keys as MLflow tags (strings)."""
        return {name: str(getattr(self, name)) for name in CELL_KEYS}

    @property
    def text_id(self) -> str:
        """What the sample's text and vectors' shape depend on: the cell without its method and layers (one init for all)."""
        return f"{self.model}/{self.dataset}/n_mem={self.n_mem}/L={self.length}"


def depth_part(layers: int) -> str:
    """The part of a name that says the model was cut to its first `layers` layers; none for all (0), as before the axis."""
    return f"/layers={layers}" if layers else ""


CELL_KEYS = tuple(f.name for f in fields(Cell))  # a cell's identity, and the columns of its rows that name it


def _values(row, row_type) -> dict:
    return {f.name: getattr(row, f.name) for f in fields(row_type)}


@dataclass
class CellColumns:
    """The columns a row takes from its cell, the sweep and the worker that ran it."""

    cell: str
    model: str
    dataset: str
    precision: str
    length: int
    n_mem: int
    seed: int
    hidden: int
    vocab_size: int
    layers: int  # the decoder layers the model kept (grid.layers), 0: all


@dataclass
class SampleColumns:
    """The columns of one finished sample, as the engine computes them.

    Progressive: the accuracy, CE and vectors are those of the horizon stage, CE and info gain over the
    horizon prefix's tokens 1..horizon-1 (the reference's information gain). A row's identity is (cell, sample, restart).
    The bits analysis (bits.py) adds the last six; `roundings` names the entries of `horizon_at_bits` and `acc_at_bits`."""

    sample: int
    restart: int  # which of the sample's grid.restarts optimizations (0: the sample's own seed)
    token_ids: list[int]
    acc_no_mem: float
    acc: float  # full: best teacher-forced accuracy over the steps; progressive: at the horizon stage
    ce_no_mem_bits: float
    ce_bits: float  # full: lowest summed CE over the steps
    info_gain_bits: float
    gain_tokens: float
    seconds: float  # this sample's share of its batches' step time
    steps: int  # full: forward passes; progressive: updates, all stages
    converged: bool  # full: accuracy 1.0; progressive: the cap's stage converged
    greedy_prefix: int  # leading tokens a greedy decode from the stored vectors gets right
    greedy_exact: bool
    memory: list[float]  # the stored vectors, n_mem x hidden flattened (float32 on disk)
    method: str  # full | progressive
    predict_first: bool
    horizon: int  # the longest prefix the stored vectors reproduce (progressive: the longest converged stage)
    stages: int
    fail_acc: float  # accuracy at the first failed stage (full: the accuracy, if not converged; NaN if none failed)
    param: str  # what was trained: direct, or lowdim(k=..,train_projection=..)
    trained_numbers: int  # how many numbers were trained for the sample
    batch_invariant: bool  # every forward at shapes of the sample's own (layout.py); false: packed with its batch-mates
    forward_rows: int  # the rows of its forwards (the batch size it ran with; packed: the most)
    roundings: list[str]  # bf16, fp8_e4m3, int<k>...: the roundings the stored vectors were re-scored at ([]: no analysis)
    # per rounding, over the scored text (full: the whole text; progressive: the horizon prefix):
    horizon_at_bits: list[int]  # leading correct greedy predictions, in `horizon`'s units
    acc_at_bits: list[float]  # teacher-forced accuracy
    bits_needed: int  # fewest bits per number that keep the horizon (progressive) or accuracy (full); 32: bf16 does not, or no analysis
    stored_bits: int  # n_mem * hidden * bits_needed
    bits_seconds: float  # what the analysis took (not in `seconds`)


@dataclass
class ResultRow(SampleColumns, CellColumns):
    """One finished sample, as `results/` stores it: its cell's columns, then its own."""

    @classmethod
    def of(cls, cell: CellColumns, sample: SampleColumns) -> ResultRow:
        return cls(**_values(cell, CellColumns), **_values(sample, SampleColumns))


@dataclass
class StageRecord:
    """One finished stage of a progressive sample."""

    stage: int
    length: int
    phase: str  # grow (linear growth) | ramp (geometric doubling) | bisect | linear (geometric back-offs)
    converged: bool
    steps: int  # updates in this stage
    total_steps: int  # the sample's updates so far, this stage included
    acc: float  # teacher-forced accuracy at the stage's last forward (the converging one, or after its last update)
    ce_bits: float  # summed CE of the stage's targets at that forward


@dataclass
class StageKey:
    cell: str
    sample: int
    restart: int


@dataclass
class StageRow(StageRecord, StageKey):
    """One stage, as `stages/` stores it: the growth trajectory."""

    @classmethod
    def of(cls, cell: str, sample: int, restart: int, record: StageRecord) -> StageRow:
        return cls(cell=cell, sample=sample, restart=restart, **_values(record, StageRecord))


@dataclass
class FailureRow:
    """One failed attempt at a sample's restart, as `failures/` stores it."""

    cell: str
    sample: int
    restart: int
    attempt: int
    error: str
    time: float
