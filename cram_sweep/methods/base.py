"""What a method is to the rest of cram-sweep, and the facts its modules share.

A method is two objects. Its `Method` (one per module, registered in `methods/__init__.py`) is everything the
config, the report, `status`, MLflow and `decode` ask of it, each a question with an answer of its own, never its
name. Its rule (`Method.rule`) runs inside the engine: it judges each forward on the device, decides on the host
what follows when a stage ends, and turns a finished row into its columns. A rule sees named state handed to it
(`StepRows`, its own row state, the `Scores` of a forward), never the batch: it returns decisions, and the batch
(engine/batch.py) applies them.

The capacity helpers here take pandas frames but import no pandas: the engine imports the methods, and must not
pay for pandas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..engine.rows import RowState

LN2 = math.log(2.0)
FIT = 0.99  # a length "fits" when the mean teacher-forced accuracy of its samples reaches this (Kuratov et al.)
ACC_TOLERANCE = 1e-6  # below one token's share of any text's accuracy: the same count of correct targets, float rounding aside
RUNNING, DONE, STAGE_CONVERGED, STAGE_FAILED, NONFINITE = range(5)
RUN = ["sample", "restart"]  # one optimization of a cell: its rows differ in nothing else


@dataclass
class StepRows(RowState):
    """Where each row is: its target, status (RUNNING ...) and step counts."""

    targets: torch.Tensor  # (B,) predictions in the current target (mirrored on the host in Batch.targets)
    status: torch.Tensor  # (B,)
    steps: torch.Tensor  # (B,) forwards (full) or updates (progressive), all stages
    stage_steps: torch.Tensor  # (B,) updates in the current stage


@dataclass
class Judged:
    """A rule's decision on one forward, applied by the batch: the rows' new status, the rows whose step counts
    advance, and the rows that take the update."""

    status: torch.Tensor  # (B,)
    counted: torch.Tensor  # (B,) bool
    updated: torch.Tensor  # (B,) bool


@dataclass
class StagesEnded:
    """A rule's decision where stages ended, applied by the batch: each row's status and target; the rows that start
    a new stage (their stage step count restarts), those restored to `restored_from` (the rule's snapshot: trainable
    tensors and optimizer rows), and those whose optimizer starts afresh (zero moments, the schedule from its start)."""

    status: list[int]
    targets: list[int]
    new_stage: list[bool]
    restored: list[bool]
    fresh_optimizer: list[bool]
    restored_from: Optional[tuple] = None  # (params RowState, AdamRows) where any row is restored


class Method:
    """The questions the rest of cram-sweep asks a method. A module of this package subclasses it once and
    registers the instance as `METHOD`."""

    name: str
    restart_metric: str  # the column restarts compete on and the bits analysis keeps: "acc" or "horizon"
    curve_columns: tuple[str, ...] = ()  # capacity columns logged to MLflow as curves beyond the shared ones
    headline: str  # the capacity column that is its answer (against layers: the depth table, plot and curve)
    has_mean_accuracy: bool = True  # whether a cell's mean accuracy says something its horizon does not
    feeds_text: bool = True  # whether its forwards feed the text (the hybrid loss aligns the text's positions)
    definition: str = ""  # the report's text (Markdown lines) on what its capacity columns mean

    def check(self, method) -> Optional[str]:
        """What is wrong with `method` (a MethodConfig) for this method, naming keys from `method.`; None if nothing."""
        return None

    def check_grid(self, method, grid, key: str = "") -> Optional[str]:
        """What is wrong with `method` for the sweep's `grid` (a GridConfig), naming the method's keys from
        `{key}method.`; None if nothing."""
        return None

    def rule(self, method, optim):
        raise NotImplementedError

    def scored_rows(self, group):
        """The rows of one (model, dataset, n_mem) group whose gain, information gain and bits are averaged."""
        raise NotImplementedError

    def reached(self, scored, horizon) -> float:
        """The tokens the group's vectors hold, for its utilization: from its scored rows and runs' horizons."""
        raise NotImplementedError

    def max_tokens(self, group) -> float:
        """The group's longest length that fits (FIT), NaN where the method does not define it."""
        return math.nan

    def max_tokens_exact(self, group) -> float:
        """The group's longest length every sample reproduces exactly (greedy), NaN where the method does not define it."""
        return math.nan

    def solved(self, rows):
        """The rows whose stored vectors are a solution (the restarts' cosine compares those)."""
        return rows

    def summary_line(self, name: str, capacity_row) -> str:
        """The report's line that says what the group's headline number means."""
        raise NotImplementedError

    def plots(self, results, cell_rows, sweep, out) -> list:
        """The method's own report plots, written under `out` (accuracy against length: every method with a mean
        accuracy, in one plot)."""
        return []

    def progress(self, result) -> Optional[float]:
        """What a finished sample adds to the progress bar's running mean (None: nothing)."""
        return None

    def decode(self, lm, row: dict, given: int, attention: str = "auto") -> tuple[list[int], int]:
        """The tokens its stored vectors generate after the `given` ones, and how many match the text before the first
        error (the stored `greedy_prefix`): greedy autoregressive decoding."""
        from ..report.decode import decode_row

        return decode_row(lm, row, given, attention)

    def decode_line(self, row: dict, reproduced: int, counted_from: int) -> Optional[str]:
        """`decode`'s closing line beyond the matched prefix, for a row that reproduces `reproduced` text tokens."""
        return None


def max_tokens(group) -> int:
    """The longest length whose mean accuracy is >= FIT (0 if none); `group` has `length` and `acc` columns."""
    mean_acc = group.groupby("length")["acc"].mean()
    fits = mean_acc.index[mean_acc >= FIT]
    return int(fits.max()) if len(fits) else 0


def max_tokens_exact(group) -> int:
    """The longest length at which every row of `group` (with `length` and `greedy_exact`) is exact (0 if none)."""
    exact = group.groupby("length")["greedy_exact"].all()
    return int(exact.index[exact].max()) if exact.any() else 0


def longest_rows(group):
    """Each run's (sample, restart's) row of its longest horizon over the group's lengths."""
    return group.loc[group.groupby(RUN)["horizon"].idxmax()]


def whole_text_columns(text, i: int, length: int, offset: int, start: int, acc: float, prefix: int, ce: float) -> dict:
    """The columns of row i whose target is its whole text (tokens offset..length-1), from the forward it keeps: its
    accuracy, greedy prefix and mean CE (nats); `text` holds the no-vector baseline (ce0_tok[j - 1] is token j's).

    The baseline covers the predicted tokens from token 1: token 0, predicted where `offset` is 0 (the first token
    predicted, one-step), has no prediction without an input, so `info_gain_bits` then counts its CE with the vectors
    against nothing (a lower bound by that one token) and `gain_tokens` its accuracy against none."""
    n_pred, first = length - offset, max(offset, 1)
    ce_no_mem_bits = text.ce0_tok[i, first - 1 : length - 1].sum().item() / LN2
    acc_no_mem = text.correct0_tok[i, first - 1 : length - 1].float().mean().item()
    ce_bits = ce * n_pred / LN2
    return dict(
        acc_no_mem=acc_no_mem,
        acc=acc,
        ce_no_mem_bits=ce_no_mem_bits,
        ce_bits=ce_bits,
        info_gain_bits=ce_no_mem_bits - ce_bits,
        gain_tokens=acc * n_pred - acc_no_mem * (length - first),
        converged=acc >= 1.0,
        greedy_prefix=prefix,
        greedy_exact=prefix == n_pred,
        horizon=horizon_of(prefix, offset, start),
        stages=1,
        fail_acc=math.nan if acc >= 1.0 else acc,
    )


def horizon_of(prefix: int, offset: int, start: int) -> int:
    """The horizon a greedy prefix of `prefix` predictions reaches, counted in text tokens from `start`: the given tokens
    before the first target (offset - start of them) count once the first prediction is right; 0 if it is not."""
    return prefix + offset - start if prefix else 0
