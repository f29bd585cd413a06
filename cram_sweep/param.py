"""What is optimized: a parametrization owns each sample's trainable tensors (a `RowState` of its own type) and
computes from them the (B, n_mem, hidden) vectors fed to the model.

The engine (cram.py), its rules (rules.py) and the optimizer (adamw.py) see only this interface:
- `init(specs)`: the rows of new samples, each a function of its sample's seed alone, as leaf tensors that
  require grad;
- `vectors(params)`: the vectors, differentiable in every trainable tensor;
- `trained_numbers`: how many numbers one sample trains.
Snapshots and restores are row copies of the state (rows.RowState.where); AdamW steps every tensor of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import OptimConfig
from .rows import RowState


def initial_vectors(n_mem: int, hidden: int, seed: int, optim: OptimConfig, embed_std: float) -> torch.Tensor:
    """A sample's starting vectors, a function of its seed alone: randn * std(input embeddings), or U[0, init_scale)."""
    gen = torch.Generator().manual_seed(seed)
    if optim.init == "uniform":
        return torch.rand(n_mem, hidden, generator=gen) * optim.init_scale
    return torch.randn(n_mem, hidden, generator=gen) * embed_std


@dataclass
class DirectRows(RowState):
    vectors: torch.Tensor  # (B, n_mem, hidden): the vectors themselves are trained


class Direct:
    """`param=direct`, the papers' setting: the n_mem vectors are the trainable numbers."""

    name = "direct"

    def __init__(self, n_mem: int, hidden: int, optim: OptimConfig, embed_std: float, device):
        self.n_mem, self.hidden, self.optim, self.embed_std, self.device = n_mem, hidden, optim, embed_std, device

    @property
    def trained_numbers(self) -> int:
        return self.n_mem * self.hidden

    def init(self, seeds: list[int]) -> DirectRows:
        vectors = torch.stack([initial_vectors(self.n_mem, self.hidden, seed, self.optim, self.embed_std) for seed in seeds])
        return DirectRows(vectors.to(self.device).requires_grad_())

    def vectors(self, params: DirectRows) -> torch.Tensor:
        return params.vectors


def as_leaves(params: RowState) -> RowState:
    """The same numbers as fresh leaf tensors that require grad (after rows were added, dropped or restored)."""
    return params.map(lambda t: t.detach().requires_grad_())
