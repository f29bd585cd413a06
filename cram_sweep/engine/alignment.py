"""The hybrid loss's alignment term (the progressive reference's train/loss.py): how far the crammed forward's hidden
states are from those of the text fed alone.

`optim.hybrid_alpha` > 0 adds, per row, alpha times the SUM over the chosen hidden-state layers of the MEAN over the
row's aligned text positions of a per-position distance:
- the layers are the model's hidden states as HuggingFace counts them (0: the input embeddings, then one per decoder
  layer, the last after the final norm); `optim.alignment_layers` of them from the first or the last
  (`optim.alignment_from`), 0: all;
- the aligned positions are the text positions after the prefix, up to the row's current last target token (a
  progressive stage's), its own position included; the vectors' own positions have no counterpart in the text alone;
- the distance (`optim.alignment_loss`) is l2, the Euclidean distance; l1, the sum of absolute differences; cosine,
  1 - the cosine similarity.
The text's own hidden states are computed once per sample, without grad, with the no-vector baseline (scores.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class Alignment:
    alpha: float
    layers: int  # how many hidden-state layers; 0: all
    start: str  # first | last: the layers counted from the input embeddings or from the final norm's output
    distance: str  # l2 | l1 | cosine

    @classmethod
    def of(cls, optim) -> Optional[Alignment]:
        """The hybrid loss `optim` asks for; None where hybrid_alpha is 0 (cross-entropy alone)."""
        if optim.hybrid_alpha == 0:
            return None
        return cls(optim.hybrid_alpha, optim.alignment_layers, optim.alignment_from, optim.alignment_loss)

    def chosen(self, total: int) -> range:
        """The indices of the aligned layers among a forward's `total` hidden states."""
        count = min(self.layers, total) if self.layers else total
        return range(total - count, total) if self.start == "last" else range(count)

    def text_states(self, hidden_states: tuple[torch.Tensor, ...], text_start: int) -> list[torch.Tensor]:
        """The chosen layers' states (B, T, H) of the text positions, from input position `text_start` on: views, so
        the crammed forward's states are not copied (an 8B model's, at 1568 tokens, are gigabytes a layer count)."""
        return [hidden_states[i][:, text_start:] for i in self.chosen(len(hidden_states))]

    def per_row(self, crammed: list[torch.Tensor], original: torch.Tensor, aligned: torch.Tensor) -> torch.Tensor:
        """(B,) the alignment term, alpha times: per layer the mean distance over the `aligned` (B, T) positions,
        summed over layers. `crammed`: text_states of the crammed forward; `original`: the text's own, (B, T, K, H)."""
        distance = torch.stack([self._distance(mine.float(), original[:, :, k]) for k, mine in enumerate(crammed)], dim=2)
        mask = aligned[:, :, None]
        per_layer = torch.where(mask, distance, torch.zeros_like(distance)).sum(dim=1) / mask.sum(dim=1)
        return self.alpha * per_layer.sum(dim=1)

    def _distance(self, mine: torch.Tensor, theirs: torch.Tensor) -> torch.Tensor:
        """(B, T) per-position distance of two (B, T, H) fp32 states."""
        if self.distance == "l2":
            return (mine - theirs).square().sum(dim=-1).sqrt()
        if self.distance == "l1":
            return (mine - theirs).abs().sum(dim=-1)
        return 1.0 - torch.nn.functional.cosine_similarity(mine, theirs, dim=-1)
