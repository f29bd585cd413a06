"""A toy method, written as a new method of cram_sweep/methods/ would be: one module (this one) and its YAML
(TOY_YAML, conf/method/toy.yaml). It crams every text for exactly `optim.max_steps` forwards and keeps the vectors of
the last one: no early stop, no best-of. Its capacity is the longest length its last vectors fit, as full cramming's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cram_sweep.engine.rows import RowState
from cram_sweep.engine.scores import text_fed
from cram_sweep.methods.base import DONE, NONFINITE, RUNNING, Judged, Method, StepRows, max_tokens, whole_text_columns

TOY_YAML = """# @package _global_
# A toy method for tests/test_methods.py: exactly optim.max_steps forwards, the last one's vectors kept.
method:
  name: toy
"""


@dataclass
class LastRows(RowState):
    acc: torch.Tensor  # (B,) the last forward's teacher-forced accuracy
    ce: torch.Tensor  # (B,) its mean CE (nats)
    prefix: torch.Tensor  # (B,) its greedy prefix
    vectors: torch.Tensor  # (B, n_mem, hidden) its vectors


class LastRule:
    feed = staticmethod(text_fed)  # [vectors, text]

    def __init__(self, method, optim):
        self.method, self.optim = method, optim
        self.offset, self.start = method.given, method.counted_from

    def first_target(self, length: int) -> int:
        return length - self.offset

    def plan(self, length: int) -> None:
        return None

    def new_rows(self, count: int, vectors: torch.Tensor, params: RowState, width: int) -> LastRows:
        zeros = torch.zeros(count, device=vectors.device)
        return LastRows(zeros.clone(), zeros.clone(), zeros.long(), vectors.detach().clone())

    def judge(self, rows: LastRows, t: StepRows, scores, params: RowState, adam) -> Judged:
        live = t.status == RUNNING
        rows.acc = torch.where(live, scores.acc, rows.acc)
        rows.ce = torch.where(live, scores.ce, rows.ce)
        rows.prefix = torch.where(live, scores.prefix, rows.prefix)
        rows.vectors = torch.where(live[:, None, None], scores.vectors, rows.vectors)
        ends = live & ((t.steps + 1 >= self.optim.max_steps) | ~scores.finite)
        status = torch.where(ends, torch.where(scores.finite, DONE, NONFINITE), t.status)
        return Judged(status=status, counted=live, updated=live & ~ends)

    def end_stages(self, rows: LastRows, t: StepRows, plans: list, targets: list[int]) -> None:
        return None

    def memory(self, rows: LastRows, i: int, param) -> torch.Tensor:
        return rows.vectors[i]

    def result(self, rows: LastRows, text, plan, i: int, length: int) -> dict:
        acc, prefix, ce = rows.acc[i].item(), int(rows.prefix[i]), rows.ce[i].item()
        return whole_text_columns(text, i, length, self.offset, self.start, acc, prefix, ce)

    def stage_length(self, targets: list[int]) -> int:
        return 0

    @staticmethod
    def keeps(result: dict, horizon: int, acc: float) -> bool:
        return acc >= result["acc"]

    @staticmethod
    def scored_length(result: dict, length: int) -> int:
        return length


class Toy(Method):
    name = "toy"
    restart_metric = "acc"
    curve_columns = ("max_tokens",)
    headline = "max_tokens"
    definition = "Toy: the vectors of the last of optim.max_steps forwards; max tokens as full cramming's.\n"

    def rule(self, method, optim) -> LastRule:
        return LastRule(method, optim)

    def scored_rows(self, group):
        return group

    def reached(self, scored, horizon) -> float:
        return scored["gain_tokens"].mean()

    def max_tokens(self, group) -> float:
        return max_tokens(group)

    def summary_line(self, name: str, r) -> str:
        return f"{name}: the toy's last vectors fit up to {r.max_tokens:.0f} tokens"


METHOD = Toy()
