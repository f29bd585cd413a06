"""The cramming loop: optimize `n_mem` input vectors per text so a frozen LM reproduces the text.

Samples share each forward/backward. The loss is the SUM of the samples' mean cross-entropies and AdamW
(adamw.py) is elementwise with per-row state, so every sample follows the trajectory it would follow alone.
Texts of different lengths share a batch right-padded: a causal model's earlier positions never see later
ones, and padded targets are masked out of loss, accuracy and greedy prefix. A finished sample leaves at
once and the next waiting one takes its slot, if the batch's padding stays within `max_padding`.

Two methods (config.MethodConfig):
- full: one target, the whole text. A sample ends at accuracy 1.0, after `patience` steps without a better
  accuracy, or at `max_steps`; it keeps the vectors of its best-accuracy forward.
- progressive: the text is a cap and the target grows stage by stage (stages.StagePlan). A stage converges
  when the forward before an update reaches `threshold` (the vectors are not updated then, so the stored
  vectors reproduce what was recorded) and fails after `steps_per_stage` updates without converging. The
  next stage continues from the current vectors, moments and schedule position, or from the snapshot taken
  at the longest converged stage (geometric back-off).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Optional, Union

import torch

from .adamw import RowAdamW, initial_vectors
from .config import MethodConfig, OptimConfig
from .loss import cross_entropy_and_argmax
from .model import attention_implementation, autocast
from .stages import StagePlan, StageRecord

LN2 = math.log(2.0)
MAX_PADDING = 0.5  # a waiting sample joins only if padded positions stay within this share of the real ones
RUNNING, DONE, STAGE_CONVERGED, STAGE_FAILED, NONFINITE = range(5)


@dataclass
class SampleSpec:
    sample: int
    token_ids: list[int]
    init_seed: int
    cell: str = ""  # handed back with the result: samples of several cells share a batch


@dataclass
class SampleResult:
    """One finished sample, as the engine yields it (the sample's columns of the results store).

    Progressive: the accuracy, CE and vectors are those of the horizon stage, CE and info gain over the
    horizon prefix's tokens 1..horizon-1 (the reference's information gain)."""

    cell: str
    sample: int
    token_ids: list[int]
    method: str
    predict_first: bool
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
    horizon: int  # the longest prefix (in text tokens) the stored vectors reproduce: progressive's longest converged stage
    stages: int
    fail_acc: float  # accuracy at the first failed stage (full: the accuracy, if not converged; NaN if none failed)
    memory: list[float]  # the stored vectors, n_mem x hidden flattened
    stage_records: list[StageRecord] = field(default_factory=list)
    error: Optional[str] = None  # set when the sample failed (its loss became non-finite)


@dataclass
class Heartbeat:
    """Progress within long samples: `live` samples in the batch, the most `steps` any has run and
    (progressive) the longest stage any is at."""

    live: int
    steps: int
    stage_length: int = 0


def leading_matches(correct: torch.Tensor) -> torch.Tensor:
    """Per row of a (B, N) boolean tensor, the number of leading True entries: how many tokens a greedy
    decode gets right before its first error."""
    return correct.long().cumprod(dim=1).sum(dim=1)


def token_scores(model, memory: Optional[torch.Tensor], text_embeds: torch.Tensor, targets: torch.Tensor, precision: str, cast_cache=True):
    """Per-token CE and correctness (B, P) of the P = targets.shape[1] predictions made by the P positions
    before the last input position (the last text position predicts nothing).

    memory: (B, n_mem, H) or None; text_embeds: (B, T, H) the fed text; targets: (B, P)."""
    inputs = text_embeds if memory is None else torch.cat([memory, text_embeds], dim=1)
    count = targets.shape[1]
    # logits of exactly the predicting positions: no (B, T, V) slice in the backward
    predicting = torch.arange(inputs.shape[1] - count - 1, inputs.shape[1] - 1, device=inputs.device)
    with autocast(model, precision, cast_cache):
        logits = model(inputs_embeds=inputs, logits_to_keep=predicting, use_cache=False).logits
    ce, argmax = cross_entropy_and_argmax(logits.flatten(0, 1), targets.flatten())
    return ce.view_as(targets), argmax.view_as(targets) == targets


def reduce_scores(ce_tok: torch.Tensor, correct: torch.Tensor, mask: Optional[torch.Tensor] = None):
    """Per-row mean CE, accuracy and greedy prefix over the targets in `mask` (None: all)."""
    if mask is None:
        return ce_tok.mean(dim=1), correct.float().mean(dim=1), leading_matches(correct)
    count = mask.sum(dim=1)
    ce = torch.where(mask, ce_tok, torch.zeros_like(ce_tok)).sum(dim=1) / count
    return ce, (correct & mask).sum(dim=1) / count, leading_matches(correct & mask)


def score(model, memory: Optional[torch.Tensor], text_embeds: torch.Tensor, targets: torch.Tensor, precision: str, cast_cache=True):
    """Per-sample mean CE, accuracy and greedy prefix of the `length - 1` next-token predictions of the text.

    Greedy decoding from the vectors reproduces the text up to the first wrong teacher-forced
    prediction (until then it sees exactly the teacher-forced inputs), so the greedy prefix is the
    number of leading correct predictions: the greedy check costs nothing beyond this forward.

    memory: (B, n_mem, H) or None; text_embeds: (B, L, H); targets: (B, L-1) = token ids 1..L-1.
    """
    return reduce_scores(*token_scores(model, memory, text_embeds, targets, precision, cast_cache))


def _pad_to(tensor: torch.Tensor, size: int) -> torch.Tensor:
    """Right-pad dim 1 with zeros to `size`."""
    if tensor.shape[1] >= size:
        return tensor
    pad = torch.zeros(tensor.shape[0], size - tensor.shape[1], *tensor.shape[2:], dtype=tensor.dtype, device=tensor.device)
    return torch.cat([tensor, pad], dim=1)


def padded_and_real(lengths: list[int]) -> tuple[int, int]:
    """Positions of a right-padded batch of texts of these lengths, and how many of them are real."""
    return max(lengths) * len(lengths), sum(lengths)


# per-row tensors whose dim 1 runs over text positions: right-padded when a longer text joins
_PER_POSITION = ("ids", "text_embeds", "ce0_tok", "correct0_tok", "horizon_ce_tok", "horizon_correct")


class _Batch:
    """The samples being optimized and their state, all as (B, ...) tensors; `plans` and `targets` mirror
    on the host what decides shapes and stages."""

    def __init__(self, model, n_mem: int, optim: OptimConfig, method: MethodConfig, precision: str, cast_cache: bool):
        self.model, self.n_mem, self.optim, self.method = model, n_mem, optim, method
        self.precision, self.cast_cache = precision, cast_cache
        self.embed = model.get_input_embeddings()
        self.device = self.embed.weight.device
        self.embed_std = self.embed.weight.float().std().item()
        self.offset = 0 if method.predict_first else 1  # the first target token
        self.adamw = RowAdamW(optim, self.device)
        self.specs: list[SampleSpec] = []
        self.plans: list[Optional[StagePlan]] = []
        self.targets: list[int] = []  # per row: predictions in its current target
        self.memory: Optional[torch.Tensor] = None
        self.t: dict[str, torch.Tensor] = {}
        self.seconds: list[float] = []

    def __len__(self) -> int:
        return len(self.specs)

    def positions(self, extra: Iterable[SampleSpec] = ()) -> tuple[int, int]:
        """(padded, real) text positions of a step, with `extra` samples added."""
        return padded_and_real([self.offset + n for n in self.targets] + [self._first_target(s) + self.offset for s in extra])

    def _first_target(self, spec: SampleSpec) -> int:
        if self.method.progressive:
            return min(self.method.min_length, len(spec.token_ids)) - self.offset
        return len(spec.token_ids) - 1

    def add(self, specs: list[SampleSpec]) -> None:
        longest = max(len(s.token_ids) for s in specs)
        ids = torch.tensor([s.token_ids + [0] * (longest - len(s.token_ids)) for s in specs], device=self.device)
        text_embeds = self.embed(ids)
        ce0_tok, correct0_tok = self._text_alone(specs, ids, text_embeds)
        hidden = self.embed.weight.shape[1]
        memory = torch.stack([initial_vectors(self.n_mem, hidden, s.init_seed, self.optim, self.embed_std) for s in specs]).to(self.device)
        count = len(specs)
        plans = [StagePlan(self.method, len(s.token_ids)) if self.method.progressive else None for s in specs]
        targets = [self._first_target(s) for s in specs]
        zeros = torch.zeros(count, dtype=torch.long, device=self.device)
        new = {
            "ids": ids,
            "text_embeds": text_embeds,
            "ce0_tok": ce0_tok,
            "correct0_tok": correct0_tok,
            "targets": torch.tensor(targets, device=self.device),
            "status": zeros.clone(),
            "steps": zeros.clone(),
            "stage_steps": zeros.clone(),
            "best_acc": torch.full((count,), -1.0, device=self.device),
            "best_step": zeros.clone(),
            "best_prefix": zeros.clone(),
            "best_ce": torch.full((count,), math.inf, device=self.device),
            "best_mem": memory.clone(),
            "last_acc": torch.zeros(count, device=self.device),
            "last_ce": torch.zeros(count, device=self.device),
            "horizon_ce_tok": torch.zeros(count, longest, device=self.device),
            "horizon_correct": torch.zeros(count, longest, dtype=torch.bool, device=self.device),
            "snap_exp_avg": torch.zeros_like(memory),
            "snap_exp_avg_sq": torch.zeros_like(memory),
            "snap_count": zeros.clone(),
        }
        if self.t:
            width = max(longest, self.t["ids"].shape[1])
            for key in _PER_POSITION:
                size = width - (1 if key in ("ce0_tok", "correct0_tok") else 0)
                self.t[key], new[key] = _pad_to(self.t[key], size), _pad_to(new[key], size)
            self.t = {k: torch.cat([self.t[k], v]) for k, v in new.items()}
            self.memory = torch.cat([self.memory.detach(), memory]).requires_grad_()
        else:
            self.t, self.memory = new, memory.requires_grad_()
        self.adamw.add(memory)
        self.specs += specs
        self.plans += plans
        self.targets += targets
        self.seconds += [0.0] * count

    @torch.no_grad()
    def _text_alone(self, specs: list[SampleSpec], ids: torch.Tensor, text_embeds: torch.Tensor):
        """Per-token CE and correctness of each text's tokens 1..L-1 without vectors, right-padded; one forward
        per length, so a sample's numbers do not depend on its batch-mates' lengths."""
        width = ids.shape[1] - 1
        ce0_tok = torch.zeros(len(specs), width, device=self.device)
        correct0_tok = torch.zeros(len(specs), width, dtype=torch.bool, device=self.device)
        for length in sorted({len(s.token_ids) for s in specs}):
            rows = torch.tensor([i for i, s in enumerate(specs) if len(s.token_ids) == length], device=self.device)
            ce_tok, correct = token_scores(
                self.model, None, text_embeds[rows, :length], ids[rows, 1:length], self.precision, self.cast_cache
            )
            ce0_tok[rows, : length - 1], correct0_tok[rows, : length - 1] = ce_tok, correct
        return ce0_tok, correct0_tok

    def step(self) -> None:
        t, count = self.t, max(self.targets)
        fed = t["text_embeds"][:, : self.offset + count]
        targets = t["ids"][:, self.offset : self.offset + count]
        mask = None if min(self.targets) == count else torch.arange(count, device=self.device)[None] < t["targets"][:, None]
        ce_tok, correct = token_scores(self.model, self.memory, fed, targets, self.precision, self.cast_cache)
        ce, acc, prefix = reduce_scores(ce_tok, correct, mask)
        finite = torch.isfinite(ce)
        loss = torch.where(finite, ce, torch.zeros_like(ce)).sum()
        self.memory.grad = None
        loss.backward()
        with torch.no_grad():
            if self.method.progressive:
                active = self._progressive_checks(ce, acc, finite, ce_tok, correct)
            else:
                active = self._full_checks(ce, acc, prefix, finite)
        self.adamw.step(self.memory.data, self.memory.grad, active)

    def _full_checks(self, ce, acc, prefix, finite) -> torch.Tensor:
        t, optim = self.t, self.optim
        live = t["status"] == RUNNING
        t["steps"] += live.long()
        improved = live & (acc > t["best_acc"])
        t["best_acc"] = torch.where(improved, acc, t["best_acc"])
        t["best_step"] = torch.where(improved, t["steps"], t["best_step"])
        t["best_prefix"] = torch.where(improved, prefix, t["best_prefix"])
        t["best_mem"] = torch.where(improved[:, None, None], self.memory.detach(), t["best_mem"])
        t["best_ce"] = torch.where(live & (ce < t["best_ce"]), ce, t["best_ce"])
        stale = t["steps"] - t["best_step"] >= optim.patience
        ends = live & ((acc >= 1.0) | stale | (t["steps"] >= optim.max_steps) | ~finite)
        t["status"] = torch.where(ends, torch.where(finite, DONE, NONFINITE), t["status"])
        return live & ~ends

    def _progressive_checks(self, ce, acc, finite, ce_tok, correct) -> torch.Tensor:
        """Judge each running row's stage on this forward (before its update); freeze the rows whose stage ended."""
        t, method = self.t, self.method
        running = t["status"] == RUNNING
        converged = running & finite & (acc >= method.threshold)
        failed = running & finite & ~converged & ((t["stage_steps"] >= method.steps_per_stage) | (t["steps"] >= self.optim.max_steps))
        ended = converged | failed
        t["last_acc"] = torch.where(ended, acc, t["last_acc"])
        t["last_ce"] = torch.where(ended, ce, t["last_ce"])
        rows = converged[:, None, None]
        t["best_mem"] = torch.where(rows, self.memory.detach(), t["best_mem"])  # the snapshot at the longest converged stage
        t["snap_exp_avg"] = torch.where(rows, self.adamw.exp_avg, t["snap_exp_avg"])
        t["snap_exp_avg_sq"] = torch.where(rows, self.adamw.exp_avg_sq, t["snap_exp_avg_sq"])
        t["snap_count"] = torch.where(converged, self.adamw.count, t["snap_count"])
        width = ce_tok.shape[1]
        t["horizon_ce_tok"][:, :width] = torch.where(converged[:, None], ce_tok.detach(), t["horizon_ce_tok"][:, :width])
        t["horizon_correct"][:, :width] = torch.where(converged[:, None], correct, t["horizon_correct"][:, :width])
        status = torch.where(converged, STAGE_CONVERGED, torch.where(failed, STAGE_FAILED, t["status"]))
        t["status"] = torch.where(running & ~finite, NONFINITE, status)
        active = running & finite & ~ended
        t["steps"] += active.long()
        t["stage_steps"] += active.long()
        return active

    def next_stages(self) -> None:
        """Host side of progressive cramming: each row whose stage ended gets its next stage, or is done."""
        status = self.t["status"].tolist()
        ended = [i for i, s in enumerate(status) if s in (STAGE_CONVERGED, STAGE_FAILED)]
        if not ended:
            return
        t = self.t
        cols = {k: t[k].tolist() for k in ("stage_steps", "steps", "last_acc", "last_ce")}
        restart, restore = [False] * len(self), [False] * len(self)
        for i in ended:
            plan = self.plans[i]
            record = StageRecord(
                stage=len(plan.records),
                length=plan.length,
                phase=plan.phase,
                converged=status[i] == STAGE_CONVERGED,
                steps=cols["stage_steps"][i],
                total_steps=cols["steps"][i],
                acc=cols["last_acc"][i],
                ce_bits=cols["last_ce"][i] * self.targets[i] / LN2,
            )
            following = plan.next(record, budget_left=cols["steps"][i] < self.optim.max_steps)
            if following is None:
                status[i] = DONE
                continue
            status[i], restart[i], restore[i] = RUNNING, True, following.restore
            self.targets[i] = following.length - self.offset
        restart_t = torch.tensor(restart, device=self.device)
        restore_t = torch.tensor(restore, device=self.device)
        t["status"] = torch.tensor(status, device=self.device)
        t["targets"] = torch.tensor(self.targets, device=self.device)
        t["stage_steps"] = torch.where(restart_t, 0, t["stage_steps"])
        if any(restore):
            with torch.no_grad():
                self.memory.data.copy_(torch.where(restore_t[:, None, None], t["best_mem"], self.memory.data))
            snapshot = {"exp_avg": t["snap_exp_avg"], "exp_avg_sq": t["snap_exp_avg_sq"], "count": t["snap_count"]}
            self.adamw.restore(snapshot, restore_t)

    def take_finished(self) -> list[SampleResult]:
        if self.method.progressive:
            self.next_stages()
        t = self.t
        status = t["status"].cpu()
        done = (status == DONE) | (status == NONFINITE)
        if not done.any():
            return []
        index = done.nonzero().flatten().tolist()
        rows = [self._progressive_result(i) if self.method.progressive else self._full_result(i) for i in index]
        keep = (~done).nonzero().flatten().tolist()
        keep_t = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.t = {k: v.index_select(0, keep_t) for k, v in t.items()}
        self.memory = self.memory.detach().index_select(0, keep_t).requires_grad_()
        self.adamw.keep(keep_t)
        for name in ("specs", "plans", "targets", "seconds"):
            setattr(self, name, [getattr(self, name)[i] for i in keep])
        return rows

    def _common(self, i: int) -> dict:
        t, spec = self.t, self.specs[i]
        error = f"loss became non-finite at step {int(t['steps'][i])}" if int(t["status"][i]) == NONFINITE else None
        return {
            "cell": spec.cell,
            "sample": spec.sample,
            "token_ids": spec.token_ids,
            "method": self.method.name,
            "predict_first": self.method.predict_first,
            "seconds": self.seconds[i],
            "steps": int(t["steps"][i]),
            "memory": t["best_mem"][i].float().cpu().flatten().tolist(),
            "error": error,
        }

    def _full_result(self, i: int) -> SampleResult:
        t = self.t
        n_pred = len(self.specs[i].token_ids) - 1
        ce_no_mem_bits = t["ce0_tok"][i, :n_pred].mean().item() * n_pred / LN2
        acc_no_mem = t["correct0_tok"][i, :n_pred].float().mean().item()
        ce_bits = t["best_ce"][i].item() * n_pred / LN2
        acc, prefix = t["best_acc"][i].item(), int(t["best_prefix"][i])
        return SampleResult(
            **self._common(i),
            acc_no_mem=acc_no_mem,
            acc=acc,
            ce_no_mem_bits=ce_no_mem_bits,
            ce_bits=ce_bits,
            info_gain_bits=ce_no_mem_bits - ce_bits,
            gain_tokens=(acc - acc_no_mem) * n_pred,
            converged=acc >= 1.0,
            greedy_prefix=prefix,
            greedy_exact=prefix == n_pred,
            horizon=prefix + 1 if prefix else 0,
            stages=1,
            fail_acc=math.nan if acc >= 1.0 else acc,
        )

    def _progressive_result(self, i: int) -> SampleResult:
        """The horizon stage's numbers; CE, info gain and gain in tokens over tokens 1..horizon-1."""
        t, plan, o = self.t, self.plans[i], self.offset
        horizon = plan.horizon
        scored = max(horizon - 1, 0)  # tokens 1..horizon-1
        ce_tok = t["horizon_ce_tok"][i].tolist()
        correct = t["horizon_correct"][i].tolist()
        ce0 = t["ce0_tok"][i, :scored].tolist()
        correct0 = t["correct0_tok"][i, :scored].tolist()
        stage_targets = max(horizon - o, 0)
        ce_no_mem_bits = sum(ce0) / LN2
        ce_bits = sum(ce_tok[1 - o : horizon - o]) / LN2 if scored else 0.0
        prefix = int(leading_matches(torch.tensor([correct[:stage_targets]], dtype=torch.bool)).item()) if stage_targets else 0
        horizon_record = next((r for r in reversed(plan.records) if r.converged and r.length == horizon), None)
        failed = plan.first_failed
        return SampleResult(
            **self._common(i),
            acc_no_mem=sum(correct0) / scored if scored else math.nan,
            acc=horizon_record.acc if horizon_record else math.nan,
            ce_no_mem_bits=ce_no_mem_bits,
            ce_bits=ce_bits,
            info_gain_bits=ce_no_mem_bits - ce_bits,
            gain_tokens=float(sum(correct[1 - o : horizon - o]) - sum(correct0)) if scored else 0.0,
            converged=horizon == len(self.specs[i].token_ids),
            greedy_prefix=prefix,
            greedy_exact=stage_targets > 0 and prefix == stage_targets,
            horizon=horizon,
            stages=len(plan.records),
            fail_acc=failed.acc if failed else math.nan,
            stage_records=plan.records,
        )


def cram(
    model,
    samples: Iterable[SampleSpec],
    n_mem: int,
    optim: OptimConfig,
    precision: str = "fp32",
    batch_size: int = 16,
    check_every: int = 1,
    cast_cache: bool = True,
    attention: Optional[str] = None,
    heartbeat_seconds: Optional[float] = None,
    method: Optional[MethodConfig] = None,
    max_padding: float = MAX_PADDING,
) -> Iterator[Union[SampleResult, Heartbeat]]:
    """Optimize every sample (texts of any lengths, in the order given; shortest first keeps padding low);
    yield one `SampleResult` per sample as it finishes. `method`: full cramming when None.

    Speed options that leave results unchanged (up to float rounding): `batch_size`, `check_every` (steps
    between host syncs; rows whose stage or sample ended are frozen on the device meanwhile), `cast_cache`
    (bf16 weight copies), `attention` (the attention implementation; None: as the model was loaded) and
    `max_padding`. With `heartbeat_seconds`, also yields a `Heartbeat` at most that often, so a caller can
    show progress within long samples.
    """
    with attention_implementation(model, attention):
        yield from _cram(
            model,
            samples,
            n_mem,
            optim,
            method or MethodConfig(),
            precision,
            batch_size,
            check_every,
            cast_cache,
            heartbeat_seconds,
            max_padding,
        )


def _admit(batch: _Batch, waiting: deque, batch_size: int, max_padding: float) -> list[SampleSpec]:
    """The waiting samples that take the free slots: in order, while padding stays within `max_padding`
    (an empty batch always takes the first)."""
    admitted: list[SampleSpec] = []
    while waiting and len(batch) + len(admitted) < batch_size:
        padded, real = batch.positions(admitted + [waiting[0]])
        if (len(batch) or admitted) and padded > (1 + max_padding) * real:
            break
        admitted.append(waiting.popleft())
    return admitted


def _cram(model, samples, n_mem, optim, method, precision, batch_size, check_every, cast_cache, heartbeat_seconds, max_padding):
    waiting = deque(samples)
    batch = _Batch(model, n_mem, optim, method, precision, cast_cache)
    last_heartbeat = time.perf_counter()
    while waiting or len(batch):
        admitted = _admit(batch, waiting, batch_size, max_padding)
        if admitted:
            batch.add(admitted)
        started = time.perf_counter()
        for _ in range(check_every):
            batch.step()
        share = (time.perf_counter() - started) / len(batch)
        batch.seconds = [s + share for s in batch.seconds]
        yield from batch.take_finished()
        if heartbeat_seconds is not None and len(batch) and time.perf_counter() - last_heartbeat >= heartbeat_seconds:
            last_heartbeat = time.perf_counter()
            stage_length = max(n + batch.offset for n in batch.targets) if method.progressive else 0
            yield Heartbeat(live=len(batch), steps=int(batch.t["steps"].max()), stage_length=stage_length)
