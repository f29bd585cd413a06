"""Progressive cramming's stage plan for one sample: which prefix length to target next, from the stages so far.

Pure bookkeeping, no tensors: the progressive rule (progressive.py) runs a stage until its target converges or fails and
then asks `StagePlan.next` where to go. Semantics (Tarasov et al., `FusionBrainLab/progressive_cramming`):

- linear growth: min_length, then +step after each converged stage, up to the cap; a failed stage ends
  the sample;
- geometric growth: double after each converged stage until one fails (or the cap converges); then narrow
  the bracket (longest converged, shortest failed) down to `step`: `bisect` probes the middle, each probe
  warm-started from the longest converged stage's snapshot; `linear` restores that snapshot once and grows
  by +1 from it until a probe fails;
- a spent step budget ends the sample after the stage that spent it.

The horizon is the longest converged stage length (0 if none converged).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..config import MethodConfig
from ..results.columns import StageRecord


@dataclass
class NextStage:
    length: int
    restore: bool  # warm-start from the longest converged stage's snapshot, not from the current state


class StagePlan:
    def __init__(self, method: MethodConfig, cap: int):
        self.method = method
        self.cap = cap
        self.length = min(method.min_length, cap)
        self.phase = "ramp" if method.growth == "geometric" else "grow"
        self.horizon = 0  # longest converged length
        self.failed_at: Optional[int] = None  # shortest failed length
        self.records: list[StageRecord] = []

    @property
    def first_failed(self) -> Optional[StageRecord]:
        return next((r for r in self.records if not r.converged), None)

    def next(self, record: StageRecord, budget_left: bool) -> Optional[NextStage]:
        """Record the stage that just ended; the next stage, or None when the sample is finished."""
        self.records.append(record)
        if record.converged:
            self.horizon = max(self.horizon, record.length)
        else:
            self.failed_at = record.length if self.failed_at is None else min(self.failed_at, record.length)
        following = self._following(record)
        if following is None or not budget_left:
            return None
        self.length, self.phase = following.length, self._phase_of(record)
        return following

    def _phase_of(self, record: StageRecord) -> str:
        if self.method.growth == "linear":
            return "grow"
        if self.failed_at is None:
            return "ramp"
        return self.method.backoff

    def _following(self, record: StageRecord) -> Optional[NextStage]:
        m, lo, hi = self.method, self.horizon, self.failed_at
        if m.growth == "linear":
            if not record.converged or record.length >= self.cap:
                return None
            return NextStage(min(record.length + m.step, self.cap), restore=False)
        if hi is None:  # still doubling
            if record.length >= self.cap:
                return None
            nxt = min(record.length * 2, self.cap)
            return NextStage(nxt if nxt > record.length else min(record.length + m.step, self.cap), restore=False)
        if lo == 0:  # even the first stage failed
            return None
        if m.backoff == "linear":
            if not record.converged and record.phase == "linear":
                return None  # the first failure of the +1 walk pins the horizon
            if lo + 1 >= hi:
                return None
            return NextStage(lo + 1, restore=record.phase == "ramp")  # the snapshot once, when the walk starts
        if hi - lo <= m.step or (lo + hi) // 2 <= lo:
            return None
        return NextStage((lo + hi) // 2, restore=True)
