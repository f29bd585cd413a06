"""The cramming loop: optimize `n_mem` input vectors per text so a frozen LM reproduces the text.

Samples share each forward/backward. The loss is the SUM of the samples' mean cross-entropies and AdamW
(adamw.py) is elementwise with per-row state, so every sample follows the trajectory it would follow alone. The
shapes of each forward are the layout's (layout.py): with `batch_invariant` (the default) they depend on the row
alone, so its numbers are bit-identical whatever its batch-mates. Targets past a row's current target (a progressive
stage's) are masked out of loss, accuracy and greedy prefix. A finished sample leaves at once and the next waiting
one takes its slot, as the layout admits it.

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

from ..config import AnalysisConfig, MethodConfig, OptimConfig
from ..methods.rules import DONE, NONFINITE, horizon_of, rule_for
from ..methods.stages import StagePlan
from ..results.columns import SampleColumns, StageRecord
from .adamw import AdamRows, RowAdamW
from .bits import BitsColumns, Scored, analyse
from .layout import MAX_PADDING, Group, Layout
from .loss import cross_entropy_and_argmax, linear_head
from .model import attention_implementation, autocast, compiled, graphs_compiled
from .param import Direct, as_leaves, trained_tensors
from .rows import RowState, per_position


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
    """Progress within long samples: `live` samples in the batch, the most `steps` any has run, (progressive) the
    longest stage any is at, and the seconds spent in steps that compiled."""

    live: int
    steps: int
    stage_length: int = 0
    compile_seconds: float = 0.0  # the steps that compiled a graph took so far (compile on)


def leading_matches(correct: torch.Tensor) -> torch.Tensor:
    """Per row of a (B, N) boolean tensor, the number of leading True entries: how many tokens a greedy
    decode gets right before its first error."""
    return correct.long().cumprod(dim=1).sum(dim=1)


def token_scores(
    model,
    memory: Optional[torch.Tensor],
    text_embeds: torch.Tensor,
    targets: torch.Tensor,
    precision: str,
    cast_cache=True,
    compile_mode: Optional[str] = None,
):
    """Per-token CE and correctness (B, P) of the P = targets.shape[1] predictions made by the P positions
    before the last input position (the last text position predicts nothing).

    memory: (B, n_mem, H) or None; text_embeds: (B, T, H) the fed text; targets: (B, P). `compile_mode`: the model's
    network runs compiled (model.compiled), else eagerly."""
    inputs = text_embeds if memory is None else torch.cat([memory, text_embeds], dim=1)
    count = targets.shape[1]
    predicting = torch.arange(inputs.shape[1] - count - 1, inputs.shape[1] - 1, device=inputs.device)
    with autocast(model, precision, cast_cache):
        head = linear_head(model)
        network = model if head is None else model.base_model
        network = network if compile_mode is None else compiled(network, compile_mode)
        if head is None:  # logits of exactly the predicting positions: no (B, T, V) slice in the backward
            states, weight = network(inputs_embeds=inputs, logits_to_keep=predicting, use_cache=False).logits, None
        else:
            states, weight = network(inputs_embeds=inputs, use_cache=False).last_hidden_state[:, predicting], head.weight
        ce, argmax = cross_entropy_and_argmax(states, weight, targets)
    return ce, argmax == targets


def reduce_scores(ce_tok: torch.Tensor, correct: torch.Tensor, mask: Optional[torch.Tensor] = None):
    """Per-row mean CE, accuracy and greedy prefix over the targets in `mask` (None: all), at the width of `ce_tok`
    (a reduction's rounding depends on its width: the engine reduces every row at a width of its own).

    Greedy decoding from the vectors reproduces the text up to the first wrong teacher-forced prediction
    (until then it sees exactly the teacher-forced inputs), so the greedy prefix is the number of leading
    correct predictions: the greedy check costs nothing beyond the forward."""
    mask = torch.ones_like(correct) if mask is None else mask
    count = mask.sum(dim=1)
    ce = torch.where(mask, ce_tok, torch.zeros_like(ce_tok)).sum(dim=1) / count
    return ce, (correct & mask).sum(dim=1) / count, leading_matches(correct & mask)


def with_inert_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """`tensor` with zero rows appended up to `rows` rows: inert rows (zero vectors and text) that no loss reads."""
    if tensor.shape[0] == rows:
        return tensor
    return torch.cat([tensor, tensor.new_zeros(rows - tensor.shape[0], *tensor.shape[1:])])


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
    """One step's verdict per row, handed to the rule; each group of the layout puts its rows'."""

    ce: torch.Tensor  # (B,) mean CE over the row's targets (nats)
    acc: torch.Tensor  # (B,) teacher-forced accuracy
    prefix: torch.Tensor  # (B,) leading correct predictions
    finite: torch.Tensor  # (B,) the loss is finite
    ce_tok: torch.Tensor  # (B, P) per-target CE, zero past a row's group width
    correct: torch.Tensor  # (B, P)
    vectors: torch.Tensor  # (B, n_mem, H) the vectors of this forward (before its update)

    @classmethod
    def empty(cls, rows: int, targets: int, vectors: torch.Tensor) -> Scores:
        device = vectors.device
        return cls(
            ce=torch.zeros(rows, device=device),
            acc=torch.zeros(rows, device=device),
            prefix=torch.zeros(rows, dtype=torch.long, device=device),
            finite=torch.zeros(rows, dtype=torch.bool, device=device),
            ce_tok=torch.zeros(rows, targets, device=device),
            correct=torch.zeros(rows, targets, dtype=torch.bool, device=device),
            vectors=vectors,
        )

    @torch.no_grad()
    def put(self, index: torch.Tensor, ce, acc, prefix, finite, ce_tok, correct) -> None:
        """The scores of the rows at `index` (copies: no arithmetic, so a row's numbers are its group's)."""
        for mine, theirs in ((self.ce, ce), (self.acc, acc), (self.prefix, prefix), (self.finite, finite)):
            mine[index] = theirs.detach()
        self.ce_tok[index, : ce_tok.shape[1]] = ce_tok.detach()
        self.correct[index, : correct.shape[1]] = correct


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
        batch_invariant: bool = True,
        max_padding: float = MAX_PADDING,
        compile_mode: Optional[str] = None,
    ):
        self.model, self.method, self.precision, self.cast_cache, self.analysis = model, method, precision, cast_cache, analysis
        self.compile_mode = compile_mode  # the optimization forwards only: the others meet a shape once or a few times
        self.embed = model.get_input_embeddings()
        self.device = self.embed.weight.device
        self.rule, self.optim = rule_for(method, optim), optim
        self.layout = Layout(batch_invariant, max_rows, self.rule.offset, max_padding)  # max_rows: the batch size
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
        """Per-token CE and correctness of each text's tokens 1..L-1 without vectors, right-padded; each length in
        forwards of its own, so a sample's numbers do not depend on its batch-mates' lengths."""
        width = ids.shape[1] - 1
        ce0_tok = torch.zeros(len(specs), width, device=self.device)
        correct0_tok = torch.zeros(len(specs), width, dtype=torch.bool, device=self.device)
        for length in sorted({len(s.token_ids) for s in specs}):
            rows = torch.tensor([i for i, s in enumerate(specs) if len(s.token_ids) == length], device=self.device)
            ce_tok, correct = self._token_scores(None, text_embeds[rows, :length], ids[rows, 1:length])
            ce0_tok[rows, : length - 1], correct0_tok[rows, : length - 1] = ce_tok, correct
        return ce0_tok, correct0_tok

    def _token_scores(self, vectors: Optional[torch.Tensor], fed: torch.Tensor, targets: torch.Tensor, compile_mode=None):
        """`token_scores` of these rows in forwards of at most `layout.rows` rows, each at the layout's row count (inert
        rows appended where batch-invariant)."""
        size, ce_parts, correct_parts = self.layout.rows, [], []
        for start in range(0, fed.shape[0], size):
            live = min(size, fed.shape[0] - start)
            rows = self.layout.forward_rows(live)
            part = [None if t is None else with_inert_rows(t[start : start + size], rows) for t in (vectors, fed, targets)]
            ce_tok, correct = token_scores(self.model, *part, self.precision, self.cast_cache, compile_mode)
            ce_parts.append(ce_tok[:live])
            correct_parts.append(correct[:live])
        return torch.cat(ce_parts), torch.cat(correct_parts)

    def step(self) -> None:
        """One forward of every row's current target (a forward per group of the layout) and one update of the rows
        its rule keeps running."""
        vectors = self.param.vectors(self.params)
        groups = self.layout.groups([len(s.token_ids) for s in self.specs], self.targets)
        scores = Scores.empty(len(self), max(g.width for g in groups) - self.rule.offset, vectors.detach())
        loss = torch.zeros((), device=self.device)
        for group in groups:
            loss = loss + self._group_loss(vectors, group, scores)
        for tensor in trained_tensors(self.params):
            tensor.grad = None
        loss.backward()
        with torch.no_grad():
            active = self.rule.judge(self, scores)
        self.adamw.step(self.params, active)

    def _group_loss(self, vectors: torch.Tensor, group: Group, scores: Scores) -> torch.Tensor:
        """The summed loss of one group's rows, whose scores it writes into `scores` (batch order)."""
        o, count = self.rule.offset, group.width - self.rule.offset
        index = torch.tensor(group.rows, device=self.device)
        fed, targets = self.text.text_embeds[index, : group.width], self.text.ids[index, o : group.width]
        ce_tok, correct = self._token_scores(vectors[index], fed, targets, self.compile_mode)
        mask = torch.arange(count, device=self.device)[None] < self.step_rows.targets[index, None]
        ce, acc, prefix = reduce_scores(ce_tok, correct, mask)
        loss_rows = ce if self.optim.leading_count == 0 or self.optim.leading_weight == 1 else self._weighted(ce_tok, mask)
        finite = torch.isfinite(ce)
        scores.put(index, ce, acc, prefix, finite, ce_tok, correct)
        return torch.where(finite, loss_rows, torch.zeros_like(loss_rows)).sum()

    def _weighted(self, ce_tok: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-row mean CE with the first `optim.leading_count` targets weighing `optim.leading_weight` (the
        reference's leading_token_loss_*: normalized by the count of targets, not by the weights)."""
        position = torch.arange(ce_tok.shape[1], device=self.device)[None]
        weights = torch.where(position < self.optim.leading_count, self.optim.leading_weight, 1.0)
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
            batch_invariant=self.layout.batch_invariant,
            forward_rows=self.layout.rows,
            seconds=self.seconds[i],
            steps=steps,
            memory=memory.cpu().flatten().tolist(),
            error=f"loss became non-finite at step {steps}" if failed else None,
            **columns,
            **vars(bits),
        )

    @torch.no_grad()
    def _bits(self, i: int, memory: torch.Tensor, columns: dict, length: int) -> BitsColumns:
        """Row i's stored vectors re-scored at each rounding of `analysis`: the roundings are the rows of no-grad
        forwards over the text's first `length` tokens (the rule's `scored_length`), at the layout's row count (so it
        never needs more memory than a step), each scored for its greedy horizon and accuracy over the targets among
        them."""
        o = self.rule.offset
        fed, targets = self.text.text_embeds[i, :length], self.text.ids[i, o:length]

        def score(vectors: torch.Tensor) -> Scored:
            rows = vectors.shape[0]
            _, acc, prefix = reduce_scores(*self._token_scores(vectors, fed.expand(rows, -1, -1), targets.expand(rows, -1)))
            return Scored([horizon_of(p, o, self.rule.start) for p in prefix.tolist()], acc.tolist())

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
    parametrization=Direct,
    analysis: Optional[AnalysisConfig] = None,
    batch_invariant: bool = True,
    max_padding: float = MAX_PADDING,
    compile_mode: Optional[str] = None,
) -> Iterator[Union[SampleResult, Heartbeat]]:
    """Optimize every sample (texts of any lengths, in the order given; shortest first keeps the batches full);
    yield one `SampleResult` per sample as it finishes. `method`: full cramming when None; `parametrization`:
    what is trained (param.py); `analysis`: what is measured on each finished sample (None: nothing, as
    `analysis.bits=false`: the bits columns are empty).

    `batch_invariant` (layout.py): every forward at shapes that depend on its rows alone, so a sample's result is
    bit-identical whatever its batch-mates (false: packed batches, `max_padding` bounding their padding).
    Options that change no result: `check_every` (steps between host syncs; rows whose stage or sample ended are
    frozen on the device meanwhile), `cast_cache` (bf16 weight copies). Options that change only rounding:
    `batch_size` (the row count of every forward: docs/determinism.md), `attention` (the attention implementation;
    None: as the model was loaded) and `compile_mode` (torch.compile's mode for the optimization forwards, model.py;
    None: eager). With `heartbeat_seconds`, also yields a `Heartbeat` at most that often, so a caller can show
    progress within long samples.
    """
    waiting = deque(samples)
    batch = _Batch(
        model,
        n_mem,
        optim,
        method or MethodConfig(),
        precision,
        cast_cache,
        parametrization,
        analysis,
        batch_size,
        batch_invariant,
        max_padding,
        compile_mode,
    )
    last_heartbeat, compile_seconds = time.perf_counter(), 0.0
    with attention_implementation(model, attention):
        while waiting or len(batch):
            admitted = _admit(batch, waiting)
            if admitted:
                batch.add(admitted)
            started, graphs = time.perf_counter(), compile_mode and graphs_compiled()
            for _ in range(check_every):
                batch.step()
            seconds = time.perf_counter() - started
            if compile_mode and graphs_compiled() > graphs:
                compile_seconds += seconds  # a step that compiled: not the samples' time
            else:
                batch.add_seconds(seconds)
            yield from batch.take_finished()
            if heartbeat_seconds is not None and len(batch) and time.perf_counter() - last_heartbeat >= heartbeat_seconds:
                last_heartbeat = time.perf_counter()
                steps = int(batch.step_rows.steps.max())
                yield Heartbeat(len(batch), steps, batch.rule.stage_length(batch), compile_seconds)


def _admit(batch: _Batch, waiting: deque) -> list[SampleSpec]:
    """The waiting samples that take the free slots: in order, while the layout admits them (an empty batch always
    takes the first)."""
    lengths, targets = [len(s.token_ids) for s in batch.specs], list(batch.targets)
    admitted: list[SampleSpec] = []
    while waiting:
        length = len(waiting[0].token_ids)
        target = batch.rule.first_target(length)
        if not batch.layout.admits(lengths, targets, length, target):
            break
        admitted.append(waiting.popleft())
        lengths.append(length)
        targets.append(target)
    return admitted
