"""The cramming loop: optimize `n_mem` input vectors per text so a frozen LM reproduces the text.

Samples share each forward/backward. The loss is the SUM of the samples' mean cross-entropies and AdamW
(adamw.py) is elementwise with per-row state, so every sample follows the trajectory it would follow alone.
Texts of different lengths share a batch right-padded: a causal model's earlier positions never see later
ones, and padded targets are masked out of loss, accuracy and greedy prefix. A finished sample leaves at
once and the next waiting one takes its slot, if the batch's padding stays within `max_padding`.

What is trained is the parametrization's (param.py: `direct`, the vectors themselves); what a forward means,
and when a sample ends, is its method's rule (rules.py: full or progressive). `_Batch` holds only the rows:
admission, one step, and taking the finished rows out. A finished sample's stored vectors are then re-scored at
fewer bits (bits.py, `analysis.bits`): one no-grad forward that changes none of its other columns (none where a
progressive sample has no horizon: it keeps nothing, and its bits columns are those of no analysis).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Optional, Union

import torch

from .adamw import AdamRows, RowAdamW
from .bits import BitsColumns, Scored, analyse
from .columns import SampleColumns, StageRecord
from .config import AnalysisConfig, MethodConfig, OptimConfig
from .loss import cross_entropy_and_argmax
from .model import attention_implementation, autocast
from .param import Direct, as_leaves, trained_tensors
from .rows import RowState, per_position
from .rules import DONE, NONFINITE, horizon_of, rule_for
from .stages import StagePlan

# A waiting sample joins only if padded positions stay within this share of the real ones. A constant, not a
# config key: it trades padded compute against batch fill and leaves results unchanged (benchmarks/batch_fill.py
# measures it; `cram(max_padding=...)` sets it for them).
MAX_PADDING = 0.5


@dataclass
class SampleSpec:
    sample: int
    token_ids: list[int]
    init_seed: int
    cell: str = ""  # handed back with the result: samples of several cells share a batch
    init_vectors: Optional[list[float]] = None  # optim.init=from_sweep: the stored vectors it continues (n_mem x hidden)
    restart: int = 0  # which of the sample's restarts (its init_seed is that restart's)

    @property
    def key(self) -> tuple[str, int, int]:
        """Its identity in a sweep: (cell, sample, restart)."""
        return self.cell, self.sample, self.restart


@dataclass
class SampleResult(SampleColumns):
    """One finished sample as the engine yields it: its columns of the results store, and what travels with them."""

    cell: str = ""  # its SampleSpec's
    stage_records: list[StageRecord] = field(default_factory=list)  # progressive: every stage, for stages/
    error: Optional[str] = None  # set when the sample failed (its loss became non-finite)

    @property
    def key(self) -> tuple[str, int, int]:
        """The identity of the SampleSpec it finishes: (cell, sample, restart)."""
        return self.cell, self.sample, self.restart


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
    """Per-row mean CE, accuracy and greedy prefix over the targets in `mask` (None: all).

    Greedy decoding from the vectors reproduces the text up to the first wrong teacher-forced prediction
    (until then it sees exactly the teacher-forced inputs), so the greedy prefix is the number of leading
    correct predictions: the greedy check costs nothing beyond the forward."""
    if mask is None:
        return ce_tok.mean(dim=1), correct.float().mean(dim=1), leading_matches(correct)
    count = mask.sum(dim=1)
    ce = torch.where(mask, ce_tok, torch.zeros_like(ce_tok)).sum(dim=1) / count
    return ce, (correct & mask).sum(dim=1) / count, leading_matches(correct & mask)


def padded_and_real(lengths: list[int]) -> tuple[int, int]:
    """Positions of a right-padded batch of texts of these lengths, and how many of them are real."""
    return max(lengths) * len(lengths), sum(lengths)


@dataclass
class TextRows(RowState):
    """Each row's text, and how the model predicts it without vectors."""

    ids: torch.Tensor = per_position()  # (B, W) token ids, right-padded with 0
    text_embeds: torch.Tensor = per_position()  # (B, W, H)
    ce0_tok: torch.Tensor = per_position(1)  # (B, W-1) CE of tokens 1.. without vectors (nats)
    correct0_tok: torch.Tensor = per_position(1)  # (B, W-1) their argmax is right without vectors


@dataclass
class StepRows(RowState):
    """Where each row is: its target, status (rules.RUNNING ...) and step counts."""

    targets: torch.Tensor  # (B,) predictions in the current target (mirrored on the host in _Batch.targets)
    status: torch.Tensor  # (B,)
    steps: torch.Tensor  # (B,) full: forwards; progressive: updates, all stages
    stage_steps: torch.Tensor  # (B,) updates in the current stage


@dataclass
class Scores:
    """One forward's verdict per row, handed to the rule."""

    ce: torch.Tensor  # (B,) mean CE over the row's targets (nats)
    acc: torch.Tensor  # (B,) teacher-forced accuracy
    prefix: torch.Tensor  # (B,) leading correct predictions
    finite: torch.Tensor  # (B,) the loss is finite
    ce_tok: torch.Tensor  # (B, P) per-target CE
    correct: torch.Tensor  # (B, P)
    vectors: torch.Tensor  # (B, n_mem, H) the vectors of this forward (before its update)


class _Batch:
    """The samples being optimized and their state, all as (B, ...) row states; `specs`, `plans` (progressive's
    stage plans), `targets` and `seconds` mirror the rows on the host."""

    def __init__(
        self,
        model,
        n_mem: int,
        optim: OptimConfig,
        method: MethodConfig,
        precision: str,
        cast_cache: bool,
        parametrization=Direct,
        analysis: Optional[AnalysisConfig] = None,
        max_rows: int = 1,
    ):
        self.model, self.method, self.precision, self.cast_cache = model, method, precision, cast_cache
        self.analysis, self.max_rows = analysis, max_rows  # max_rows: the batch size, the most rows any forward here takes
        self.embed = model.get_input_embeddings()
        self.device = self.embed.weight.device
        self.rule, self.optim = rule_for(method, optim), optim
        self.param = parametrization(n_mem, self.embed.weight, optim, self.device)
        self.adamw = RowAdamW(optim, self.device)
        self.specs: list[SampleSpec] = []
        self.plans: list[Optional[StagePlan]] = []
        self.targets: list[int] = []
        self.seconds: list[float] = []
        self.text: Optional[TextRows] = None
        self.step_rows: Optional[StepRows] = None
        self.rule_rows: Optional[RowState] = None
        self.params: Optional[RowState] = None

    def __len__(self) -> int:
        return len(self.specs)

    def positions(self, extra: Iterable[SampleSpec] = ()) -> tuple[int, int]:
        """(padded, real) text positions of a step, with `extra` samples added."""
        o = self.rule.offset
        return padded_and_real([o + n for n in self.targets] + [self.rule.first_target(len(s.token_ids)) + o for s in extra])

    def add(self, specs: list[SampleSpec]) -> None:
        longest = max(len(s.token_ids) for s in specs)
        ids = torch.tensor([s.token_ids + [0] * (longest - len(s.token_ids)) for s in specs], device=self.device)
        text_embeds = self.embed(ids)
        text = TextRows(ids, text_embeds, *self._text_alone(specs, ids, text_embeds))
        params = self.param.init(specs)
        targets = [self.rule.first_target(len(s.token_ids)) for s in specs]
        zeros = torch.zeros(len(specs), dtype=torch.long, device=self.device)
        steps = StepRows(torch.tensor(targets, device=self.device), zeros.clone(), zeros.clone(), zeros.clone())
        rule_rows = self.rule.new_rows(len(specs), self.param.vectors(params), params, longest)
        self.adamw.add(params)
        if self.text is None:
            self.text, self.step_rows, self.rule_rows, self.params = text, steps, rule_rows, params
        else:
            width = max(longest, self.text.ids.shape[1])
            self.text, self.step_rows = self.text.cat(text, width), self.step_rows.cat(steps, width)
            self.rule_rows, self.params = self.rule_rows.cat(rule_rows, width), as_leaves(self.params.cat(params, width))
        self.specs += specs
        self.plans += [self.rule.plan(len(s.token_ids)) for s in specs]
        self.targets += targets
        self.seconds += [0.0] * len(specs)

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
        """One forward of every row's current target and one update of the rows its rule keeps running."""
        o, count = self.rule.offset, max(self.targets)
        fed = self.text.text_embeds[:, : o + count]
        targets = self.text.ids[:, o : o + count]
        mask = None if min(self.targets) == count else torch.arange(count, device=self.device)[None] < self.step_rows.targets[:, None]
        vectors = self.param.vectors(self.params)
        ce_tok, correct = token_scores(self.model, vectors, fed, targets, self.precision, self.cast_cache)
        ce, acc, prefix = reduce_scores(ce_tok, correct, mask)
        loss_rows = ce if self.optim.leading_count == 0 or self.optim.leading_weight == 1 else self._weighted(ce_tok, mask)
        finite = torch.isfinite(ce)
        loss = torch.where(finite, loss_rows, torch.zeros_like(loss_rows)).sum()
        for tensor in trained_tensors(self.params):
            tensor.grad = None
        loss.backward()
        with torch.no_grad():
            active = self.rule.judge(self, Scores(ce, acc, prefix, finite, ce_tok, correct, vectors))
        self.adamw.step(self.params, active)

    def _weighted(self, ce_tok: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Per-row mean CE with the first `optim.leading_count` targets weighing `optim.leading_weight` (the
        reference's leading_token_loss_*: normalized by the count of targets, not by the weights)."""
        position = torch.arange(ce_tok.shape[1], device=self.device)[None]
        weights = torch.where(position < self.optim.leading_count, self.optim.leading_weight, 1.0)
        if mask is None:
            return (ce_tok * weights).sum(dim=1) / ce_tok.shape[1]
        return torch.where(mask, ce_tok * weights, torch.zeros_like(ce_tok)).sum(dim=1) / mask.sum(dim=1)

    def restore(self, rows: torch.Tensor, params: RowState, adam: AdamRows) -> None:
        """Rows `rows` (a boolean mask) take these trainable tensors, moments and schedule positions."""
        self.params = as_leaves(self.params.where(rows, params))
        self.adamw.restore(rows, adam)

    def take_finished(self) -> list[SampleResult]:
        self.rule.end_stages(self)
        status = self.step_rows.status.cpu()
        done = (status == DONE) | (status == NONFINITE)
        if not done.any():
            return []
        results = [self._result(i) for i in done.nonzero().flatten().tolist()]
        keep = (~done).nonzero().flatten().tolist()
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.text, self.step_rows, self.rule_rows = self.text.keep(index), self.step_rows.keep(index), self.rule_rows.keep(index)
        self.params = as_leaves(self.params.keep(index))
        self.adamw.keep(index)
        for name in ("specs", "plans", "targets", "seconds"):
            setattr(self, name, [getattr(self, name)[i] for i in keep])
        return results

    def _result(self, i: int) -> SampleResult:
        spec, steps = self.specs[i], int(self.step_rows.steps[i])
        memory = self.rule.memory(self, i).float()
        failed = int(self.step_rows.status[i]) == NONFINITE
        columns = self.rule.result(self, i)
        scored = self.rule.scored_length(columns, len(spec.token_ids))
        analysed = self.analysis is not None and self.analysis.bits and not failed and scored > self.rule.offset
        bits = self._bits(i, memory, columns, scored) if analysed else BitsColumns.off(memory.numel())
        return SampleResult(
            cell=spec.cell,
            sample=spec.sample,
            restart=spec.restart,
            token_ids=spec.token_ids,
            method=self.method.name,
            predict_first=self.rule.offset == 0,
            param=self.param.label,
            trained_numbers=self.param.trained_numbers,
            seconds=self.seconds[i],
            steps=steps,
            memory=memory.cpu().flatten().tolist(),
            error=f"loss became non-finite at step {steps}" if failed else None,
            **columns,
            **vars(bits),
        )

    @torch.no_grad()
    def _bits(self, i: int, memory: torch.Tensor, columns: dict, length: int) -> BitsColumns:
        """Row i's stored vectors re-scored at each rounding of `analysis`: the roundings are the rows of one no-grad
        forward over the text's first `length` tokens (the rule's `scored_length`; split in forwards of at most
        `max_rows` rows where the batch is smaller, so it never needs more memory than a step), each scored for its
        greedy horizon and accuracy over the targets among them."""
        o = self.rule.offset
        fed, targets = self.text.text_embeds[i, :length], self.text.ids[i, o:length]

        def score(vectors: torch.Tensor) -> Scored:
            scored = Scored([], [])
            for part in vectors.split(self.max_rows):
                rows = part.shape[0]
                ce_tok, correct = token_scores(
                    self.model, part, fed.expand(rows, -1, -1), targets.expand(rows, -1), self.precision, self.cast_cache
                )
                _, acc, prefix = reduce_scores(ce_tok, correct)
                scored.horizon += [horizon_of(p, o, self.rule.start) for p in prefix.tolist()]
                scored.acc += acc.tolist()
            return scored

        return analyse(memory, self.analysis.uniform_bits, score, lambda horizon, acc: self.rule.keeps(columns, horizon, acc))

    def add_seconds(self, seconds: float) -> None:
        """Share one step's time among the rows that ran it."""
        share = seconds / len(self)
        self.seconds = [s + share for s in self.seconds]


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
    parametrization=Direct,
    analysis: Optional[AnalysisConfig] = None,
) -> Iterator[Union[SampleResult, Heartbeat]]:
    """Optimize every sample (texts of any lengths, in the order given; shortest first keeps padding low);
    yield one `SampleResult` per sample as it finishes. `method`: full cramming when None; `parametrization`:
    what is trained (param.py); `analysis`: what is measured on each finished sample (None: nothing, as
    `analysis.bits=false`: the bits columns are empty).

    Speed options that leave results unchanged (up to float rounding): `batch_size`, `check_every` (steps
    between host syncs; rows whose stage or sample ended are frozen on the device meanwhile), `cast_cache`
    (bf16 weight copies), `attention` (the attention implementation; None: as the model was loaded) and
    `max_padding`. With `heartbeat_seconds`, also yields a `Heartbeat` at most that often, so a caller can
    show progress within long samples.
    """
    waiting = deque(samples)
    batch = _Batch(model, n_mem, optim, method or MethodConfig(), precision, cast_cache, parametrization, analysis, batch_size)
    last_heartbeat = time.perf_counter()
    with attention_implementation(model, attention):
        while waiting or len(batch):
            admitted = _admit(batch, waiting, batch_size, max_padding)
            if admitted:
                batch.add(admitted)
            started = time.perf_counter()
            for _ in range(check_every):
                batch.step()
            batch.add_seconds(time.perf_counter() - started)
            yield from batch.take_finished()
            if heartbeat_seconds is not None and len(batch) and time.perf_counter() - last_heartbeat >= heartbeat_seconds:
                last_heartbeat = time.perf_counter()
                yield Heartbeat(live=len(batch), steps=int(batch.step_rows.steps.max()), stage_length=batch.rule.stage_length(batch))


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
