"""Progressive cramming (Tarasov et al., ICML 2026): the text is a cap and the target grows stage by stage.

The stage plan is stages.StagePlan. A stage converges when the forward before an update reaches `threshold` (the
vectors are not updated then, so the stored vectors reproduce what was recorded) and fails after `steps_per_stage`
updates without converging. The next stage continues from the current tensors, moments and schedule position, or
from the snapshot taken at the longest converged stage (geometric back-off). A group's capacity is its runs' mean
horizon: the longest prefix the vectors reproduce exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..engine.adamw import AdamRows, RowAdamW
from ..engine.rows import RowState, per_position
from ..engine.scores import text_fed
from ..results.columns import StageRecord
from .base import (
    DONE,
    LN2,
    NONFINITE,
    RUNNING,
    STAGE_CONVERGED,
    STAGE_FAILED,
    Judged,
    Method,
    StagesEnded,
    StepRows,
    longest_rows,
)
from .stages import StagePlan


@dataclass
class ProgressiveRows(RowState):
    last_acc: torch.Tensor  # (B,) accuracy at the forward that ended the current stage
    last_ce: torch.Tensor  # (B,) its mean CE (nats)
    horizon_ce_tok: torch.Tensor = per_position()  # (B, W) per-token CE at the longest converged stage
    horizon_correct: torch.Tensor = per_position()  # (B, W) per-token correctness there
    snapshot_params: RowState  # the trainable tensors at the longest converged stage (the init before one)
    snapshot_adam: AdamRows  # the moments and schedule position there
    retrying: torch.Tensor  # (B,) bool: the current stage is a retry after its failure reset the optimizer


class ProgressiveRule:
    feed = staticmethod(text_fed)  # [vectors, text]

    def __init__(self, method, optim):
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
            retrying=torch.zeros(count, dtype=torch.bool, device=device),
        )

    def judge(self, rows: ProgressiveRows, t: StepRows, scores, params: RowState, adam: AdamRows) -> Judged:
        """Judge each running row's stage on this forward (before its update); freeze the rows whose stage ended,
        and snapshot those that converged."""
        running = t.status == RUNNING
        converged = running & scores.finite & (scores.acc >= self.method.threshold)
        spent = (t.stage_steps >= self.method.steps_per_stage) | (t.steps >= self.optim.max_steps)
        failed = running & scores.finite & ~converged & spent
        ended = converged | failed
        rows.last_acc = torch.where(ended, scores.acc, rows.last_acc)
        rows.last_ce = torch.where(ended, scores.ce, rows.last_ce)
        rows.snapshot_params = rows.snapshot_params.where(converged, params.map(torch.Tensor.detach))
        rows.snapshot_adam = rows.snapshot_adam.where(converged, adam)
        width = scores.ce_tok.shape[1]
        rows.horizon_ce_tok[:, :width] = torch.where(converged[:, None], scores.ce_tok.detach(), rows.horizon_ce_tok[:, :width])
        rows.horizon_correct[:, :width] = torch.where(converged[:, None], scores.correct, rows.horizon_correct[:, :width])
        status = torch.where(converged, STAGE_CONVERGED, torch.where(failed, STAGE_FAILED, t.status))
        active = running & scores.finite & ~ended
        return Judged(status=torch.where(running & ~scores.finite, NONFINITE, status), counted=active, updated=active)

    def end_stages(self, rows: ProgressiveRows, t: StepRows, plans: list[StagePlan], targets: list[int]) -> Optional[StagesEnded]:
        """Each row whose stage ended gets its next stage (restored from its snapshot on a back-off), or is done. With
        `reset_lr_on_failure`, a failed stage is first retried once from the current tensors with a fresh optimizer and
        schedule (the step budget goes on); its record is the retry's."""
        status = t.status.tolist()
        ended = [i for i, s in enumerate(status) if s in (STAGE_CONVERGED, STAGE_FAILED)]
        if not ended:
            return None
        stage_steps, steps = t.stage_steps.tolist(), t.steps.tolist()
        last_acc, last_ce = rows.last_acc.tolist(), rows.last_ce.tolist()
        targets, new_stage, restored = list(targets), [False] * len(status), [False] * len(status)
        fresh, retrying = [False] * len(status), rows.retrying.tolist()
        for i in ended:
            plan, failed = plans[i], status[i] == STAGE_FAILED
            if failed and self.method.reset_lr_on_failure and not retrying[i] and steps[i] < self.optim.max_steps:
                status[i], new_stage[i], fresh[i], retrying[i] = RUNNING, True, True, True
                continue
            record = StageRecord(
                stage=len(plan.records),
                length=plan.length,
                phase=plan.phase,
                converged=status[i] == STAGE_CONVERGED,
                steps=stage_steps[i],
                total_steps=steps[i],
                acc=last_acc[i],
                ce_bits=last_ce[i] * targets[i] / LN2,
            )
            following = plan.next(record, budget_left=steps[i] < self.optim.max_steps)
            if following is None:
                status[i] = DONE
                continue
            status[i], new_stage[i], restored[i], retrying[i] = RUNNING, True, following.restore, False
            targets[i] = following.length - (self.offset - self.start)
        rows.retrying = torch.tensor(retrying, device=rows.retrying.device)
        snapshot = (rows.snapshot_params, rows.snapshot_adam) if any(restored) else None
        return StagesEnded(status, targets, new_stage, restored, fresh, snapshot)

    def memory(self, rows: ProgressiveRows, i: int, param) -> torch.Tensor:
        """The vectors at the horizon (the init's where no stage converged)."""
        return param.vectors(rows.snapshot_params.keep(torch.tensor([i], device=rows.last_acc.device)))[0].detach()

    def result(self, rows: ProgressiveRows, text, plan: StagePlan, i: int, length: int) -> dict:
        """The horizon stage's numbers. The horizon stage covers text tokens start..start+horizon-1; CE, info gain and
        gain in tokens are over those of them predicted with and without vectors (from token max(offset, 1))."""
        o, start, horizon = self.offset, self.start, plan.horizon
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
        horizon_record = next((r for r in reversed(plan.records) if r.converged and r.length == horizon), None)
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

    def stage_length(self, targets: list[int]) -> int:
        return max(n + self.offset - self.start for n in targets)

    @staticmethod
    def keeps(result: dict, horizon: int, acc: float) -> bool:
        """Whether rounded vectors reproducing `horizon` tokens keep what the sample reached: its full horizon."""
        return horizon >= result["horizon"]

    def scored_length(self, result: dict, length: int) -> int:
        """The text tokens the bits analysis feeds: the horizon prefix. Whether a rounding keeps the horizon depends on
        those alone (a causal model's earlier positions never see later ones), and scoring the whole cap would cost up
        to a short-horizon sample's whole optimization (docs/beyond.md)."""
        return self.start + result["horizon"]


def _leading(correct: list[bool]) -> int:
    """Leading True entries of a list: the tokens a greedy decode gets right before its first error."""
    return next((i for i, ok in enumerate(correct) if not ok), len(correct))


class Progressive(Method):
    name = "progressive"
    restart_metric = "horizon"
    headline = "horizon_mean"
    has_mean_accuracy = False  # a row's accuracy is its horizon stage's, >= the threshold by construction
    definition = (
        "Progressive: the horizon is the longest converged stage; gain tokens and info gain are those of each sample's\n"
        "horizon prefix (tokens 1..horizon-1); utilization: mean horizon / theoretical tokens.\n"
    )

    def check(self, method) -> Optional[str]:
        if not method.predict_first and method.min_length < 2:
            return f"method.min_length={method.min_length} with predict_first=false: a stage needs a token to predict, set method.min_length >= 2"
        return None

    def check_grid(self, method, grid, key: str = "") -> Optional[str]:
        shortest = min(grid.lengths)
        if method.min_length + method.counted_from > shortest:
            return f"{key}method.min_length={method.min_length} exceeds the shortest cap in grid.lengths ({shortest}): lower it or raise the lengths"
        return None

    def rule(self, method, optim) -> ProgressiveRule:
        return ProgressiveRule(method, optim)

    def scored_rows(self, group):
        """Each run's horizon row."""
        return longest_rows(group)

    def reached(self, scored, horizon) -> float:
        return horizon.mean()

    def solved(self, rows):
        """The rows with a horizon: without one the stored vectors are the init, untouched."""
        return rows[rows["horizon"] > 0]

    def summary_line(self, name: str, r) -> str:
        return (
            f"{name}: progressive horizon {r.horizon_mean:.1f} tokens on average ({r.horizon_min:.0f}-{r.horizon_max:.0f}): "
            "the longest prefix the vectors reproduce exactly, greedy decoding included"
        )

    def plots(self, results, cell_rows, sweep, out) -> list:
        from ..report import plots
        from ..results.store import read_stages

        rows = results[results["method"] == self.name]
        stages = read_stages(sweep).to_pandas()
        return [plots.plot_horizon_vs_ce(rows, out / "horizon_vs_ce.png"), plots.plot_growth(stages, out / "growth.png")]

    def progress(self, result) -> Optional[float]:
        return result.horizon

    def decode_line(self, row: dict, reproduced: int, counted_from: int) -> Optional[str]:
        ok = row["horizon"] > 0 and reproduced - counted_from >= row["horizon"]  # horizons count after the prefix
        return f"horizon {row['horizon']} of {len(row['token_ids'])} tokens: the horizon prefix decodes exactly: {'yes' if ok else 'no'}"


METHOD = Progressive()
