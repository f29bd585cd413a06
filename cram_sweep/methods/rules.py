"""One rule per method: its row state, how a forward is judged (on the device), what happens on the host when a
stage ends, and how a finished row becomes a `SampleResult`.

- full (Kuratov et al.): one target, the whole text. A sample ends at accuracy 1.0, after `patience` steps
  without a better accuracy, or at `max_steps`; it keeps the vectors of its best-accuracy forward.
- progressive (Tarasov et al.): the text is a cap and the target grows stage by stage (stages.StagePlan). A
  stage converges when the forward before an update reaches `threshold` (the vectors are not updated then, so
  the stored vectors reproduce what was recorded) and fails after `steps_per_stage` updates without
  converging. The next stage continues from the current tensors, moments and schedule position, or from the
  snapshot taken at the longest converged stage (geometric back-off).

A rule never touches the trainable tensors' layout: it sees them through the parametrization (param.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

from ..config import MethodConfig, OptimConfig
from ..engine.adamw import AdamRows, RowAdamW
from ..engine.rows import RowState, per_position
from ..results.columns import StageRecord
from .stages import StagePlan

if TYPE_CHECKING:
    from ..engine.cram import Scores, _Batch

LN2 = math.log(2.0)
ACC_TOLERANCE = 1e-6  # below one token's share of any text's accuracy: the same count of correct targets, float rounding aside
RUNNING, DONE, STAGE_CONVERGED, STAGE_FAILED, NONFINITE = range(5)


@dataclass
class FullRows(RowState):
    best_acc: torch.Tensor  # (B,) the best teacher-forced accuracy so far (-1 before the first forward)
    best_step: torch.Tensor  # (B,) the step that reached it
    best_prefix: torch.Tensor  # (B,) its forward's leading correct predictions (the greedy prefix)
    best_ce: torch.Tensor  # (B,) the lowest mean CE so far (nats)
    best_vectors: torch.Tensor  # (B, n_mem, hidden) the vectors of the best-accuracy forward


class FullRule:
    def __init__(self, method: MethodConfig, optim: OptimConfig):
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

    def judge(self, batch: _Batch, scores: Scores) -> torch.Tensor:
        """Keep the best forward of each running row; end the rows that converged, went stale or ran out of steps.
        Returns the rows to update."""
        rows, t, optim = batch.rule_rows, batch.step_rows, self.optim
        live = t.status == RUNNING
        t.steps += live.long()
        improved = live & (scores.acc > rows.best_acc)
        rows.best_acc = torch.where(improved, scores.acc, rows.best_acc)
        rows.best_step = torch.where(improved, t.steps, rows.best_step)
        rows.best_prefix = torch.where(improved, scores.prefix, rows.best_prefix)
        rows.best_vectors = torch.where(improved[:, None, None], scores.vectors.detach(), rows.best_vectors)
        rows.best_ce = torch.where(live & (scores.ce < rows.best_ce), scores.ce, rows.best_ce)
        stale = t.steps - rows.best_step >= optim.patience
        ends = live & ((scores.acc >= 1.0) | stale | (t.steps >= optim.max_steps) | ~scores.finite)
        t.status = torch.where(ends, torch.where(scores.finite, DONE, NONFINITE), t.status)
        return live & ~ends

    def end_stages(self, batch: _Batch) -> None:
        """One stage: nothing to decide on the host."""

    def memory(self, batch: _Batch, i: int) -> torch.Tensor:
        return batch.rule_rows.best_vectors[i]

    def result(self, batch: _Batch, i: int) -> dict:
        rows, text, o = batch.rule_rows, batch.text, self.offset
        length = len(batch.specs[i].token_ids)
        n_pred = length - o  # tokens o..length-1; ce0_tok[j - 1] is token j's
        ce_no_mem_bits = text.ce0_tok[i, o - 1 : length - 1].mean().item() * n_pred / LN2
        acc_no_mem = text.correct0_tok[i, o - 1 : length - 1].float().mean().item()
        ce_bits = rows.best_ce[i].item() * n_pred / LN2
        acc, prefix = rows.best_acc[i].item(), int(rows.best_prefix[i])
        return dict(
            acc_no_mem=acc_no_mem,
            acc=acc,
            ce_no_mem_bits=ce_no_mem_bits,
            ce_bits=ce_bits,
            info_gain_bits=ce_no_mem_bits - ce_bits,
            gain_tokens=(acc - acc_no_mem) * n_pred,
            converged=acc >= 1.0,
            greedy_prefix=prefix,
            greedy_exact=prefix == n_pred,
            horizon=horizon_of(prefix, o, self.start),
            stages=1,
            fail_acc=math.nan if acc >= 1.0 else acc,
        )

    def stage_length(self, batch: _Batch) -> int:
        return 0

    @staticmethod
    def keeps(result: dict, horizon: int, acc: float) -> bool:
        """Whether rounded vectors scoring `acc` keep what the sample reached: its accuracy."""
        return acc >= result["acc"] - ACC_TOLERANCE

    @staticmethod
    def scored_length(result: dict, length: int) -> int:
        """The text tokens the bits analysis feeds: the whole text, whose accuracy the sample reached."""
        return length


@dataclass
class ProgressiveRows(RowState):
    last_acc: torch.Tensor  # (B,) accuracy at the forward that ended the current stage
    last_ce: torch.Tensor  # (B,) its mean CE (nats)
    horizon_ce_tok: torch.Tensor = per_position()  # (B, W) per-token CE at the longest converged stage
    horizon_correct: torch.Tensor = per_position()  # (B, W) per-token correctness there
    snapshot_params: RowState  # the trainable tensors at the longest converged stage (the init before one)
    snapshot_adam: AdamRows  # the moments and schedule position there


class ProgressiveRule:
    def __init__(self, method: MethodConfig, optim: OptimConfig):
        self.method, self.optim = method, optim
        # Stage lengths count text tokens from `start` (after the prefix); the first `offset` tokens are fed, not
        # predicted, so a stage of length l has l - (offset - start) targets.
        self.offset, self.start = method.given, method.counted_from

    def first_target(self, length: int) -> int:
        return min(self.method.min_length, length - self.start) - (self.offset - self.start)

    def plan(self, length: int) -> StagePlan:
        return StagePlan(self.method, length - self.start)

    def new_rows(self, count: int, vectors: torch.Tensor, params: RowState, width: int) -> ProgressiveRows:
        device = vectors.device
        return ProgressiveRows(
            last_acc=torch.zeros(count, device=device),
            last_ce=torch.zeros(count, device=device),
            horizon_ce_tok=torch.zeros(count, width, device=device),
            horizon_correct=torch.zeros(count, width, dtype=torch.bool, device=device),
            snapshot_params=params.map(lambda t: t.detach().clone()),
            snapshot_adam=RowAdamW.fresh(params),
        )

    def judge(self, batch: _Batch, scores: Scores) -> torch.Tensor:
        """Judge each running row's stage on this forward (before its update); freeze the rows whose stage ended,
        and snapshot those that converged. Returns the rows to update."""
        rows, t, method = batch.rule_rows, batch.step_rows, self.method
        running = t.status == RUNNING
        converged = running & scores.finite & (scores.acc >= method.threshold)
        failed = running & scores.finite & ~converged & ((t.stage_steps >= method.steps_per_stage) | (t.steps >= self.optim.max_steps))
        ended = converged | failed
        rows.last_acc = torch.where(ended, scores.acc, rows.last_acc)
        rows.last_ce = torch.where(ended, scores.ce, rows.last_ce)
        rows.snapshot_params = rows.snapshot_params.where(converged, batch.params.map(torch.Tensor.detach))
        rows.snapshot_adam = rows.snapshot_adam.where(converged, batch.adamw.state)
        width = scores.ce_tok.shape[1]
        rows.horizon_ce_tok[:, :width] = torch.where(converged[:, None], scores.ce_tok.detach(), rows.horizon_ce_tok[:, :width])
        rows.horizon_correct[:, :width] = torch.where(converged[:, None], scores.correct, rows.horizon_correct[:, :width])
        status = torch.where(converged, STAGE_CONVERGED, torch.where(failed, STAGE_FAILED, t.status))
        t.status = torch.where(running & ~scores.finite, NONFINITE, status)
        active = running & scores.finite & ~ended
        t.steps += active.long()
        t.stage_steps += active.long()
        return active

    def end_stages(self, batch: _Batch) -> None:
        """Each row whose stage ended gets its next stage (restored from its snapshot on a back-off), or is done."""
        t = batch.step_rows
        status = t.status.tolist()
        ended = [i for i, s in enumerate(status) if s in (STAGE_CONVERGED, STAGE_FAILED)]
        if not ended:
            return
        stage_steps, steps = t.stage_steps.tolist(), t.steps.tolist()
        last_acc, last_ce = batch.rule_rows.last_acc.tolist(), batch.rule_rows.last_ce.tolist()
        restart, restore = [False] * len(batch), [False] * len(batch)
        for i in ended:
            plan = batch.plans[i]
            record = StageRecord(
                stage=len(plan.records),
                length=plan.length,
                phase=plan.phase,
                converged=status[i] == STAGE_CONVERGED,
                steps=stage_steps[i],
                total_steps=steps[i],
                acc=last_acc[i],
                ce_bits=last_ce[i] * batch.targets[i] / LN2,
            )
            following = plan.next(record, budget_left=steps[i] < self.optim.max_steps)
            if following is None:
                status[i] = DONE
                continue
            status[i], restart[i], restore[i] = RUNNING, True, following.restore
            batch.targets[i] = following.length - (self.offset - self.start)
        device = t.status.device
        t.status = torch.tensor(status, device=device)
        t.targets = torch.tensor(batch.targets, device=device)
        t.stage_steps = torch.where(torch.tensor(restart, device=device), 0, t.stage_steps)
        if any(restore):
            batch.restore(torch.tensor(restore, device=device), batch.rule_rows.snapshot_params, batch.rule_rows.snapshot_adam)

    def memory(self, batch: _Batch, i: int) -> torch.Tensor:
        """The vectors at the horizon (the init's where no stage converged)."""
        return batch.param.vectors(batch.rule_rows.snapshot_params.keep(torch.tensor([i], device=batch.device)))[0].detach()

    def result(self, batch: _Batch, i: int) -> dict:
        """The horizon stage's numbers. The horizon stage covers text tokens start..start+horizon-1; CE, info gain and
        gain in tokens are over those of them predicted with and without vectors (from token max(offset, 1))."""
        rows, text, plan, o, start = batch.rule_rows, batch.text, batch.plans[i], self.offset, self.start
        horizon = plan.horizon
        first, end = max(o, 1), start + horizon  # scored tokens first..end-1
        scored = max(end - first, 0)
        ce_tok = rows.horizon_ce_tok[i].tolist()  # index j - o is token j's
        correct = rows.horizon_correct[i].tolist()
        ce0 = text.ce0_tok[i, first - 1 : end - 1].tolist() if scored else []  # index j - 1 is token j's
        correct0 = text.correct0_tok[i, first - 1 : end - 1].tolist() if scored else []
        stage_targets = max(horizon - (o - start), 0)
        ce_no_mem_bits = sum(ce0) / LN2
        ce_bits = sum(ce_tok[first - o : end - o]) / LN2 if scored else 0.0
        prefix = _leading(correct[:stage_targets])
        horizon_record: Optional[StageRecord] = next((r for r in reversed(plan.records) if r.converged and r.length == horizon), None)
        failed = plan.first_failed
        return dict(
            acc_no_mem=sum(correct0) / scored if scored else math.nan,
            acc=horizon_record.acc if horizon_record else math.nan,
            ce_no_mem_bits=ce_no_mem_bits,
            ce_bits=ce_bits,
            info_gain_bits=ce_no_mem_bits - ce_bits,
            gain_tokens=float(sum(correct[first - o : end - o]) - sum(correct0)) if scored else 0.0,
            converged=horizon == plan.cap,
            greedy_prefix=prefix,
            greedy_exact=stage_targets > 0 and prefix == stage_targets,
            horizon=horizon,
            stages=len(plan.records),
            fail_acc=failed.acc if failed else math.nan,
            stage_records=plan.records,
        )

    def stage_length(self, batch: _Batch) -> int:
        return max(n + self.offset - self.start for n in batch.targets)

    @staticmethod
    def keeps(result: dict, horizon: int, acc: float) -> bool:
        """Whether rounded vectors reproducing `horizon` tokens keep what the sample reached: its full horizon."""
        return horizon >= result["horizon"]

    def scored_length(self, result: dict, length: int) -> int:
        """The text tokens the bits analysis feeds: the horizon prefix. Whether a rounding keeps the horizon depends on
        those alone (a causal model's earlier positions never see later ones), and scoring the whole cap would cost up
        to a short-horizon sample's whole optimization (docs/beyond.md)."""
        return self.start + result["horizon"]


def horizon_of(prefix: int, offset: int, start: int) -> int:
    """The horizon a greedy prefix of `prefix` predictions reaches, counted in text tokens from `start`: the given tokens
    before the first target (offset - start of them) count once the first prediction is right; 0 if it is not."""
    return prefix + offset - start if prefix else 0


def _leading(correct: list[bool]) -> int:
    """Leading True entries of a list: the tokens a greedy decode gets right before its first error."""
    return next((i for i, ok in enumerate(correct) if not ok), len(correct))


def rule_for(method: MethodConfig, optim: OptimConfig):
    return ProgressiveRule(method, optim) if method.progressive else FullRule(method, optim)
