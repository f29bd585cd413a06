"""Full cramming (Kuratov et al., ACL 2025): one target, the whole text, the first token given; with
`method.predict_first` the last vector predicts it too, as the progressive reference's full-cramming trainer does.

A sample ends at accuracy 1.0, after `patience` steps without a better accuracy, or at `max_steps`; it keeps the
vectors of its best-accuracy forward. A group's capacity is `max_tokens`: the longest grid length whose mean
teacher-forced accuracy reaches FIT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..engine.rows import RowState
from ..engine.scores import text_fed
from .base import ACC_TOLERANCE, DONE, FIT, NONFINITE, RUNNING, Judged, Method, StepRows, max_tokens, max_tokens_exact, whole_text_columns


@dataclass
class FullRows(RowState):
    best_acc: torch.Tensor  # (B,) the best teacher-forced accuracy so far (-1 before the first forward)
    best_step: torch.Tensor  # (B,) the step that reached it
    best_prefix: torch.Tensor  # (B,) its forward's leading correct predictions (the greedy prefix)
    best_ce: torch.Tensor  # (B,) the lowest mean CE so far (nats)
    best_vectors: torch.Tensor  # (B, n_mem, hidden) the vectors of the best-accuracy forward


class FullRule:
    feed = staticmethod(text_fed)  # [vectors, text]

    def __init__(self, method, optim):
        self.method, self.optim = method, optim
        self.offset, self.start = method.given, method.counted_from  # the first token (or the prefix) is given

    def first_target(self, length: int) -> int:
        return length - self.offset

    def plan(self, length: int) -> None:
        return None

    def new_rows(self, count: int, vectors: torch.Tensor, params: RowState, width: int) -> FullRows:
        zeros = torch.zeros(count, dtype=torch.long, device=vectors.device)
        return FullRows(
            best_acc=torch.full((count,), -1.0, device=vectors.device),
            best_step=zeros.clone(),
            best_prefix=zeros.clone(),
            best_ce=torch.full((count,), math.inf, device=vectors.device),
            best_vectors=vectors.detach().clone(),
        )

    def judge(self, rows: FullRows, t: StepRows, scores, params: RowState, adam) -> Judged:
        """Keep the best forward of each running row; end the rows that converged, went stale or ran out of steps."""
        live = t.status == RUNNING
        steps = t.steps + live.long()  # this forward counts
        improved = live & (scores.acc > rows.best_acc)
        rows.best_acc = torch.where(improved, scores.acc, rows.best_acc)
        rows.best_step = torch.where(improved, steps, rows.best_step)
        rows.best_prefix = torch.where(improved, scores.prefix, rows.best_prefix)
        rows.best_vectors = torch.where(improved[:, None, None], scores.vectors.detach(), rows.best_vectors)
        rows.best_ce = torch.where(live & (scores.ce < rows.best_ce), scores.ce, rows.best_ce)
        stale = steps - rows.best_step >= self.optim.patience
        ends = live & ((scores.acc >= 1.0) | stale | (steps >= self.optim.max_steps) | ~scores.finite)
        status = torch.where(ends, torch.where(scores.finite, DONE, NONFINITE), t.status)
        return Judged(status=status, counted=live, updated=live & ~ends)

    def end_stages(self, rows: FullRows, t: StepRows, plans: list, targets: list[int]) -> None:
        """One stage: nothing to decide on the host."""

    def memory(self, rows: FullRows, i: int, param) -> torch.Tensor:
        return rows.best_vectors[i]

    def result(self, rows: FullRows, text, plan, i: int, length: int) -> dict:
        acc, prefix, ce = rows.best_acc[i].item(), int(rows.best_prefix[i]), rows.best_ce[i].item()
        return whole_text_columns(text, i, length, self.offset, self.start, acc, prefix, ce)

    def stage_length(self, targets: list[int]) -> int:
        return 0

    @staticmethod
    def keeps(result: dict, horizon: int, acc: float) -> bool:
        """Whether rounded vectors scoring `acc` keep what the sample reached: its accuracy."""
        return acc >= result["acc"] - ACC_TOLERANCE

    @staticmethod
    def scored_length(result: dict, length: int) -> int:
        """The text tokens the bits analysis feeds: the whole text, whose accuracy the sample reached."""
        return length


class Full(Method):
    name = "full"
    restart_metric = "acc"
    curve_columns = ("max_tokens", "max_tokens_exact")
    headline = "max_tokens"
    definition = (
        f"Full: max tokens is the longest length whose mean accuracy is >= {FIT} (all exact: at which every sample's greedy\n"
        "decoding reproduces the whole text); gain tokens and info gain are\n"
        f"mean ± std over the samples that did not fit (acc <= {FIT}) across all lengths (– where every sample fit);\n"
        "utilization: mean gain / theoretical tokens.\n"
    )

    def check(self, method) -> Optional[str]:
        if method.reset_lr_on_failure:
            return "method.reset_lr_on_failure=true: a stage to retry is progressive cramming's (method=progressive)"
        return None

    def rule(self, method, optim) -> FullRule:
        return FullRule(method, optim)

    def scored_rows(self, group):
        """The samples that did not fit (acc <= FIT: the vectors are saturated), at every length."""
        return group[group["acc"] <= FIT]

    def reached(self, scored, horizon) -> float:
        return scored["gain_tokens"].mean()

    def max_tokens(self, group) -> float:
        return max_tokens(group)

    def max_tokens_exact(self, group) -> float:
        return max_tokens_exact(group)

    def summary_line(self, name: str, r) -> str:
        fits = f"up to {r.max_tokens:.0f} tokens" if r.max_tokens else "no length of the grid (add shorter lengths or more steps)"
        return f"{name}: full cramming fits {fits}: the longest length whose mean teacher-forced accuracy is >= {FIT}"


METHOD = Full()
