"""What enters the engine (`SampleSpec`), what leaves it (`SampleResult`, `Heartbeat`), and how a finished row of a
batch becomes its result: its rule's columns, its stored vectors and, with `analysis.bits`, those vectors re-scored at
fewer bits (bits.py): one no-grad forward that changes none of its other columns (none where a progressive sample has
no horizon: it keeps nothing, and its bits columns are those of no analysis).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from ..methods.base import NONFINITE, horizon_of
from ..results.columns import SampleColumns, StageRecord
from .bits import BitsColumns, Scored, analyse
from .scores import reduce_scores


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


def finished_result(batch, i: int) -> SampleResult:
    """Row i of `batch` (engine/batch.py), finished, as its SampleResult."""
    spec, rule, steps = batch.specs[i], batch.rule, int(batch.step_rows.steps[i])
    memory = rule.memory(batch.rule_rows, i, batch.param).float()
    failed = int(batch.step_rows.status[i]) == NONFINITE
    columns = rule.result(batch.rule_rows, batch.text, batch.plans[i], i, len(spec.token_ids))
    scored = rule.scored_length(columns, len(spec.token_ids))
    analysis = batch.analysis
    analysed = analysis is not None and analysis.bits and not failed and scored > rule.offset
    bits = _bits(batch, i, memory, columns, scored) if analysed else BitsColumns.off(memory.numel())
    return SampleResult(
        cell=spec.cell,
        sample=spec.sample,
        restart=spec.restart,
        token_ids=spec.token_ids,
        method=batch.method.name,
        predict_first=rule.offset == 0,
        param=batch.param.label,
        trained_numbers=batch.param.trained_numbers,
        batch_invariant=batch.layout.batch_invariant,
        forward_rows=batch.layout.rows,
        seconds=batch.seconds[i],
        steps=steps,
        memory=memory.cpu().flatten().tolist(),
        error=f"loss became non-finite at step {steps}" if failed else None,
        **columns,
        **vars(bits),
    )


@torch.no_grad()
def _bits(batch, i: int, memory: torch.Tensor, columns: dict, length: int) -> BitsColumns:
    """Row i's stored vectors re-scored at each rounding of `analysis`: the roundings are the rows of no-grad forwards
    over the text's first `length` tokens (the rule's `scored_length`), at the layout's row count (so it never needs
    more memory than a step), each scored for its greedy horizon and accuracy over the targets among them."""
    rule = batch.rule
    o = rule.offset
    fed, targets = batch.text.text_embeds[i, :length], batch.text.ids[i, o:length]

    def score(vectors: torch.Tensor) -> Scored:
        rows = vectors.shape[0]
        ce_tok, correct, _ = batch.token_scores(vectors, fed.expand(rows, -1, -1), targets.expand(rows, -1))
        _, acc, prefix = reduce_scores(ce_tok, correct)
        return Scored([horizon_of(p, o, rule.start) for p in prefix.tolist()], acc.tolist())

    return analyse(memory, batch.analysis.uniform_bits, score, lambda horizon, acc: rule.keeps(columns, horizon, acc))
