"""One forward's scores: per-token CE and correctness of a batch's rows, and their per-row reductions.

A row's numbers depend on the shapes of the forward it ran in (the layout's, layout.py) and on nothing else of its
batch-mates: reductions run at the row's own group width, through one masked path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .alignment import Alignment
from .loss import cross_entropy_and_argmax, linear_head
from .runtime import autocast, compiled


def leading_matches(correct: torch.Tensor) -> torch.Tensor:
    """Per row of a (B, N) boolean tensor, the number of leading True entries: how many tokens a greedy
    decode gets right before its first error."""
    return correct.long().cumprod(dim=1).sum(dim=1)


def text_fed(memory: Optional[torch.Tensor], text_embeds: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The inputs of autoregressive cramming, [vectors, text], and the trailing positions that predict nothing: the
    last text position's (a method's rule may feed otherwise: its `feed`)."""
    return (text_embeds if memory is None else torch.cat([memory, text_embeds], dim=1)), 1


def token_scores(
    model,
    memory: Optional[torch.Tensor],
    text_embeds: torch.Tensor,
    targets: torch.Tensor,
    precision: str,
    cast_cache=True,
    compile_mode: Optional[str] = None,
    feed=text_fed,
    alignment: Optional[Alignment] = None,
):
    """Per-token CE and correctness (B, P) of the P = targets.shape[1] predictions made by the P positions before the
    trailing positions that predict nothing, of the inputs `feed` builds (text_fed: [vectors, text]); and with an
    `alignment`, the hidden states it aligns at the fed text's positions (Alignment.text_states, a (B, T, H) per
    layer), else None.

    memory: (B, n_mem, H) or None; text_embeds: (B, T, H) the fed text; targets: (B, P). `compile_mode`: the model's
    network runs compiled (runtime.compiled), else eagerly."""
    inputs, trailing = feed(memory, text_embeds)
    end, count = inputs.shape[1] - trailing, targets.shape[1]
    predicting = torch.arange(end - count, end, device=inputs.device)
    with autocast(model, precision, cast_cache):
        head = linear_head(model)
        network = model if head is None else model.base_model
        network = network if compile_mode is None else compiled(network, compile_mode)
        kwargs = dict(inputs_embeds=inputs, use_cache=False, output_hidden_states=alignment is not None)
        if head is None:  # logits of exactly the predicting positions: no (B, T, V) slice in the backward
            out = network(**kwargs, logits_to_keep=predicting)
            states, weight = out.logits, None
        else:
            out = network(**kwargs)
            states, weight = out.last_hidden_state[:, predicting], head.weight
        ce, argmax = cross_entropy_and_argmax(states, weight, targets)
    aligned = None if alignment is None else alignment.text_states(out.hidden_states, inputs.shape[1] - text_embeds.shape[1])
    return ce, argmax == targets, aligned


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


def weighted_ce(ce_tok: torch.Tensor, mask: torch.Tensor, optim) -> torch.Tensor:
    """Per-row mean CE with the first `optim.leading_count` targets weighing `optim.leading_weight` (the reference's
    leading_token_loss_*: normalized by the count of targets, not by the weights)."""
    position = torch.arange(ce_tok.shape[1], device=ce_tok.device)[None]
    weights = torch.where(position < optim.leading_count, optim.leading_weight, 1.0)
    return torch.where(mask, ce_tok * weights, torch.zeros_like(ce_tok)).sum(dim=1) / mask.sum(dim=1)


@torch.no_grad()
def without_vectors(score, lengths: list[int], ids: torch.Tensor, text_embeds: torch.Tensor):
    """Per-token CE and correctness of each text's tokens 1..L-1 without vectors, right-padded (`score`: the batch's
    token_scores), and the (B, T, K, H) hidden states the hybrid loss aligns to (K = 0 without it); each length in
    forwards of its own, so a sample's numbers do not depend on its batch-mates' lengths."""
    width = ids.shape[1] - 1
    ce0_tok = torch.zeros(len(lengths), width, device=ids.device)
    correct0_tok = torch.zeros(len(lengths), width, dtype=torch.bool, device=ids.device)
    states0 = text_embeds.new_zeros(len(lengths), width + 1, 0, text_embeds.shape[-1])
    for length in sorted(set(lengths)):
        rows = torch.tensor([i for i, n in enumerate(lengths) if n == length], device=ids.device)
        ce_tok, correct, states = score(None, text_embeds[rows, :length], ids[rows, 1:length])
        ce0_tok[rows, : length - 1], correct0_tok[rows, : length - 1] = ce_tok, correct
        if states is not None:
            if states0.shape[2] != len(states):
                states0 = text_embeds.new_zeros(len(lengths), width + 1, len(states), text_embeds.shape[-1], dtype=torch.float32)
            states0[rows, :length] = torch.stack(states, dim=2).float()
    return ce0_tok, correct0_tok, states0
