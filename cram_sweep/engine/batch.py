"""The rows being optimized: admission, one step, and taking the finished rows out.

Samples share each forward/backward. The loss is the SUM of the rows' mean cross-entropies and AdamW (adamw.py) is
elementwise with per-row state, so every sample follows the trajectory it would follow alone. The shapes of each
forward are the layout's (layout.py): with `batch_invariant` they depend on the row alone, so its numbers are
bit-identical whatever its batch-mates. Targets past a row's current target (a progressive stage's) are masked out
of loss, accuracy and greedy prefix.

What is trained is the parametrization's (param.py); what a forward means and when a row ends is its method's rule
(methods/): the rule judges and decides, the batch applies its decisions (methods/base.py: `Judged`, `StagesEnded`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch

from ..config import AnalysisConfig, MethodConfig, OptimConfig
from ..methods import method as method_named
from ..methods.base import DONE, NONFINITE, StepRows
from .adamw import AdamRows, RowAdamW
from .alignment import Alignment
from .layout import MAX_PADDING, Group, Layout
from .param import Direct, as_leaves, trained_tensors
from .rows import RowState, per_position
from .samples import SampleResult, SampleSpec, finished_result
from .scores import Scores, reduce_scores, text_fed, token_scores, weighted_ce, with_inert_rows, without_vectors


@dataclass
class TextRows(RowState):
    """Each row's text, and how the model predicts it without vectors."""

    ids: torch.Tensor = per_position()  # (B, W) token ids, right-padded with 0
    text_embeds: torch.Tensor = per_position()  # (B, W, H)
    ce0_tok: torch.Tensor = per_position(1)  # (B, W-1) CE of tokens 1.. without vectors (nats)
    correct0_tok: torch.Tensor = per_position(1)  # (B, W-1) their argmax is right without vectors
    states0: torch.Tensor = per_position()  # (B, W, K, H) the hidden states the hybrid loss aligns to (alignment.py; K=0: none)


class Batch:
    """The samples being optimized and their state, all as (B, ...) row states; `specs`, `plans` (the rule's per-row
    host state, e.g. progressive's stage plans), `targets` and `seconds` mirror the rows on the host."""

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
        self.rule, self.optim, self.alignment = method_named(method.name).rule(method, optim), optim, Alignment.of(optim)
        self.layout = Layout(batch_invariant, max_rows, self.rule.offset, max_padding)  # max_rows: the batch size
        self.param = parametrization(n_mem, self.embed.weight, optim, self.device)
        self.adamw = RowAdamW(optim, self.device)
        self.specs: list[SampleSpec] = []
        self.plans: list = []
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
        baseline = functools.partial(self.token_scores, alignment=self.alignment)
        text = TextRows(ids, text_embeds, *without_vectors(baseline, [len(s.token_ids) for s in specs], ids, text_embeds))
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

    def token_scores(
        self,
        vectors: Optional[torch.Tensor],
        fed: torch.Tensor,
        targets: torch.Tensor,
        compile_mode=None,
        alignment: Optional[Alignment] = None,
    ):
        """`token_scores` of these rows in forwards of at most `layout.rows` rows, each at the layout's row count (inert
        rows appended where batch-invariant), fed as the rule feeds them (without vectors: the text alone)."""
        size, parts = self.layout.rows, []
        feed = text_fed if vectors is None else self.rule.feed
        for start in range(0, fed.shape[0], size):
            live = min(size, fed.shape[0] - start)
            rows = self.layout.forward_rows(live)
            part = [None if t is None else with_inert_rows(t[start : start + size], rows) for t in (vectors, fed, targets)]
            ce_tok, correct, states = token_scores(self.model, *part, self.precision, self.cast_cache, compile_mode, feed, alignment)
            parts.append((ce_tok[:live], correct[:live], None if states is None else [layer[:live] for layer in states]))
        ce_tok, correct, states = zip(*parts)
        if alignment is not None:  # per layer; one part (a step's group): its views, not copied
            states = [layer[0] if len(layer) == 1 else torch.cat(layer) for layer in zip(*states)]
        return torch.cat(ce_tok), torch.cat(correct), None if alignment is None else states

    def step(self) -> None:
        """One forward of every row's current target (a forward per group of the layout), the rule's verdict, and one
        update of the rows it keeps running."""
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
            judged = self.rule.judge(self.rule_rows, self.step_rows, scores, self.params, self.adamw.state)
            t = self.step_rows
            t.status, t.steps, t.stage_steps = judged.status, t.steps + judged.counted.long(), t.stage_steps + judged.counted.long()
        self.adamw.step(self.params, judged.updated)

    def _group_loss(self, vectors: torch.Tensor, group: Group, scores: Scores) -> torch.Tensor:
        """The summed loss of one group's rows, whose scores it writes into `scores` (batch order)."""
        o, count = self.rule.offset, group.width - self.rule.offset
        index = torch.tensor(group.rows, device=self.device)
        fed, targets = self._of_group(self.text.text_embeds, group), self._of_group(self.text.ids, group)[:, o:]
        ce_tok, correct, states = self.token_scores(vectors[index], fed, targets, self.compile_mode, self.alignment)
        mask = torch.arange(count, device=self.device)[None] < self.step_rows.targets[index, None]
        ce, acc, prefix = reduce_scores(ce_tok, correct, mask)
        loss_rows = ce if self.optim.leading_count == 0 or self.optim.leading_weight == 1 else weighted_ce(ce_tok, mask, self.optim)
        if self.alignment is not None:  # the fed text's positions after the prefix, to the current target's last
            position = torch.arange(group.width, device=self.device)[None]
            aligned = (position >= self.method.prefix_tokens) & (position < o + self.step_rows.targets[index, None])
            loss_rows = loss_rows + self.alignment.per_row(states, self._of_group(self.text.states0, group), aligned)
        finite = torch.isfinite(loss_rows)
        scores.put(index, ce, acc, prefix, finite, ce_tok, correct)
        return torch.where(finite, loss_rows, torch.zeros_like(loss_rows)).sum()

    @staticmethod
    def _of_group(per_row: torch.Tensor, group: Group) -> torch.Tensor:
        """The group's rows of a per-row tensor, to the group's width: a view where the group is every row in order (the
        hybrid loss's states0 are gigabytes a row at 8B and 1568 tokens, not to be copied every step), else a copy."""
        if group.rows == list(range(per_row.shape[0])):
            return per_row[:, : group.width]
        return per_row[torch.tensor(group.rows, device=per_row.device), : group.width]

    def _end_stages(self) -> None:
        """The rule's decisions where stages ended: statuses, targets, new stages and restored rows."""
        ended = self.rule.end_stages(self.rule_rows, self.step_rows, self.plans, self.targets)
        if ended is None:
            return
        t, device = self.step_rows, self.device
        self.targets = ended.targets
        t.status, t.targets = torch.tensor(ended.status, device=device), torch.tensor(ended.targets, device=device)
        t.stage_steps = torch.where(torch.tensor(ended.new_stage, device=device), 0, t.stage_steps)
        if ended.restored_from is not None:
            self.restore(torch.tensor(ended.restored, device=device), *ended.restored_from)
        if any(ended.fresh_optimizer):
            self.adamw.restore(torch.tensor(ended.fresh_optimizer, device=device), RowAdamW.fresh(self.params))

    def restore(self, rows: torch.Tensor, params: RowState, adam: AdamRows) -> None:
        """Rows `rows` (a boolean mask) take these trainable tensors, moments and schedule positions."""
        self.params = as_leaves(self.params.where(rows, params))
        self.adamw.restore(rows, adam)

    def take_finished(self) -> list[SampleResult]:
        self._end_stages()
        status = self.step_rows.status.cpu()
        done = (status == DONE) | (status == NONFINITE)
        if not done.any():
            return []
        results = [finished_result(self, i) for i in done.nonzero().flatten().tolist()]
        keep = (~done).nonzero().flatten().tolist()
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.text, self.step_rows, self.rule_rows = self.text.keep(index), self.step_rows.keep(index), self.rule_rows.keep(index)
        self.params = as_leaves(self.params.keep(index))
        self.adamw.keep(index)
        for name in ("specs", "plans", "targets", "seconds"):
            setattr(self, name, [getattr(self, name)[i] for i in keep])
        return results

    def add_seconds(self, seconds: float) -> None:
        """Share one step's time among the rows that ran it."""
        share = seconds / len(self)
        self.seconds = [s + share for s in self.seconds]
