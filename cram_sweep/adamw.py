"""The vectors' optimizer: AdamW over a (B, n_mem, hidden) tensor with each row's own step count and learning rate.

One row is one sample. A row updates only where `active` is true, so samples at different schedule
positions, or frozen while the host decides their next stage, share one set of kernels. The arithmetic is
`torch.optim.AdamW`'s (single-tensor path, same operations in the same order, the per-step scalars computed
in double as Python computes them), so a constant schedule gives torch's AdamW bit for bit.
`snapshot`/`restore` copy a row's vectors, moments and schedule position: a geometric back-off returns a
sample to its longest converged stage.
"""

from __future__ import annotations

import math

import torch

from .config import OptimConfig

EPS = 1e-8


def learning_rates(optim: OptimConfig) -> list[float]:
    """The learning rate of each update 0..max_steps-1: constant, or Hugging Face's `cosine_with_min_lr`
    (linear warm-up from 0, then a half cosine from lr down to min_lr at max_steps), as the reference runs it."""
    if optim.schedule == "constant":
        return [optim.lr] * optim.max_steps
    rates = []
    for step in range(optim.max_steps):
        if step < optim.warmup_steps:
            factor = step / max(1, optim.warmup_steps)
        else:
            progress = (step - optim.warmup_steps) / max(1, optim.max_steps - optim.warmup_steps)
            cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
            factor = cosine * (1 - optim.min_lr / optim.lr) + optim.min_lr / optim.lr
        rates.append(optim.lr * max(0.0, factor))
    return rates


def initial_vectors(n_mem: int, hidden: int, seed: int, optim: OptimConfig, embed_std: float) -> torch.Tensor:
    """A sample's starting vectors, a function of its seed alone: randn * std(input embeddings), or U[0, init_scale)."""
    gen = torch.Generator().manual_seed(seed)
    if optim.init == "uniform":
        return torch.rand(n_mem, hidden, generator=gen) * optim.init_scale
    return torch.randn(n_mem, hidden, generator=gen) * embed_std


class RowAdamW:
    """Moments and step counts of each row; rows are added, dropped and snapshotted with the samples."""

    STATE = ("exp_avg", "exp_avg_sq", "count")

    def __init__(self, optim: OptimConfig, device):
        self.optim = optim
        rates = learning_rates(optim)
        # per update index k: the step size lr_k / (1 - beta1^(k+1)), sqrt(1 - beta2^(k+1)) and the decay 1 - lr_k * wd
        self.step_size = torch.tensor([lr / (1 - optim.beta1 ** (k + 1)) for k, lr in enumerate(rates)], dtype=torch.float64)
        self.bias2_sqrt = torch.tensor([(1 - optim.beta2 ** (k + 1)) ** 0.5 for k in range(len(rates))], dtype=torch.float64)
        self.decay = torch.tensor([1 - lr * optim.weight_decay for lr in rates], dtype=torch.float64)
        self.step_size, self.bias2_sqrt, self.decay = (t.float().to(device) for t in (self.step_size, self.bias2_sqrt, self.decay))
        self.exp_avg = self.exp_avg_sq = self.count = None

    def add(self, memory: torch.Tensor) -> None:
        zeros = torch.zeros_like(memory)
        count = torch.zeros(memory.shape[0], dtype=torch.long, device=memory.device)
        if self.exp_avg is None:
            self.exp_avg, self.exp_avg_sq, self.count = zeros, zeros.clone(), count
        else:
            self.exp_avg = torch.cat([self.exp_avg, zeros])
            self.exp_avg_sq = torch.cat([self.exp_avg_sq, zeros.clone()])
            self.count = torch.cat([self.count, count])

    def keep(self, index: torch.Tensor) -> None:
        for name in self.STATE:
            setattr(self, name, getattr(self, name).index_select(0, index))

    def snapshot(self) -> dict:
        return {name: getattr(self, name).clone() for name in self.STATE}

    def restore(self, snapshot: dict, rows: torch.Tensor) -> None:
        """Rows `rows` (a boolean mask) take the snapshot's moments and step counts."""
        for name in self.STATE:
            current = getattr(self, name)
            mask = rows.view(-1, *([1] * (current.dim() - 1)))
            setattr(self, name, torch.where(mask, snapshot[name], current))

    @torch.no_grad()
    def step(self, memory: torch.Tensor, grad: torch.Tensor, active: torch.Tensor) -> None:
        """One AdamW update of the active rows of `memory` (in place); the others keep vectors, moments and count."""
        optim = self.optim
        k = self.count.clamp(max=len(self.decay) - 1)
        decayed = memory * self.decay[k].view(-1, 1, 1)
        exp_avg = self.exp_avg.lerp(grad, 1 - optim.beta1)
        exp_avg_sq = self.exp_avg_sq.mul(optim.beta2).addcmul_(grad, grad, value=1 - optim.beta2)
        denom = (exp_avg_sq.sqrt() / self.bias2_sqrt[k].view(-1, 1, 1)).add_(EPS)
        updated = decayed + (-self.step_size[k]).view(-1, 1, 1) * exp_avg / denom
        rows = active.view(-1, 1, 1)
        memory.copy_(torch.where(rows, updated, memory))
        self.exp_avg = torch.where(rows, exp_avg, self.exp_avg)
        self.exp_avg_sq = torch.where(rows, exp_avg_sq, self.exp_avg_sq)
        self.count = self.count + active.long()
