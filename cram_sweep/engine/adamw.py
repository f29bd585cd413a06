"""The optimizer: AdamW over each sample's trainable tensors, with each row's own step count and learning rate.

One row is one sample. A row updates only where `active` is true, so samples at different schedule
positions, or frozen while the host decides their next stage, share one set of kernels. The arithmetic is
`torch.optim.AdamW`'s (single-tensor path, same operations in the same order, the per-step scalars computed
in double as Python computes them), so a constant schedule gives torch's AdamW bit for bit.
The moments are kept for every tensor a parametrization trains (param.py); a progressive back-off restores
a row's moments and schedule position from a snapshot (`restore`), with its trainable tensors (the engine
copies those).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..config import OptimConfig
from .rows import RowState

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


@dataclass
class AdamRows(RowState):
    """Per row: the first and second moments of every trainable tensor (states of the parametrization's type)
    and the number of updates so far, which indexes the schedule."""

    exp_avg: RowState
    exp_avg_sq: RowState
    count: torch.Tensor  # (B,) long


class RowAdamW:
    """AdamW over every tensor of a parametrization's row state (param.py), each row with its own step count and
    learning rate. It owns the moments (`state`); rows are added and dropped with the samples, and a snapshot of
    a row is a row copy of `state` (rows.RowState.where)."""

    def __init__(self, optim: OptimConfig, device):
        self.optim = optim
        rates = learning_rates(optim)
        # per update index k: the step size lr_k / (1 - beta1^(k+1)), sqrt(1 - beta2^(k+1)) and the decay 1 - lr_k * wd
        self.step_size = torch.tensor([lr / (1 - optim.beta1 ** (k + 1)) for k, lr in enumerate(rates)], dtype=torch.float64)
        self.bias2_sqrt = torch.tensor([(1 - optim.beta2 ** (k + 1)) ** 0.5 for k in range(len(rates))], dtype=torch.float64)
        self.decay = torch.tensor([1 - lr * optim.weight_decay for lr in rates], dtype=torch.float64)
        self.step_size, self.bias2_sqrt, self.decay = (t.float().to(device) for t in (self.step_size, self.bias2_sqrt, self.decay))
        self.state: Optional[AdamRows] = None

    @staticmethod
    def fresh(params: RowState) -> AdamRows:
        """The state of rows that have not been updated yet: zero moments, count 0."""
        count = torch.zeros(params.tensors()[0].shape[0], dtype=torch.long, device=params.tensors()[0].device)
        return AdamRows(params.map(torch.zeros_like), params.map(torch.zeros_like), count)

    def add(self, params: RowState) -> None:
        """Rows for the samples whose trainable tensors are `params`, after the current ones."""
        rows = self.fresh(params)
        self.state = rows if self.state is None else self.state.cat(rows, positions=0)

    def keep(self, index: torch.Tensor) -> None:
        self.state = self.state.keep(index)

    def restore(self, rows: torch.Tensor, snapshot: AdamRows) -> None:
        """Rows `rows` (a boolean mask) take the snapshot's moments and step counts."""
        self.state = self.state.where(rows, snapshot)

    @torch.no_grad()
    def step(self, params: RowState, active: torch.Tensor) -> None:
        """One AdamW update, from each trained tensor's `.grad`, of the active rows of `params` (in place); the other
        rows keep their tensors, moments and count. Tensors that do not require grad are held fixed."""
        optim, state = self.optim, self.state
        k = self.count.clamp(max=len(self.decay) - 1)
        exp_avgs, exp_avg_sqs = state.exp_avg.tensors(), state.exp_avg_sq.tensors()
        for i, tensor in enumerate(params.tensors()):
            if not tensor.requires_grad:
                continue
            grad = tensor.grad
            shape = (-1, *([1] * (tensor.dim() - 1)))
            decayed = tensor * self.decay[k].view(shape)
            exp_avg = exp_avgs[i].lerp(grad, 1 - optim.beta1)
            exp_avg_sq = exp_avg_sqs[i].mul(optim.beta2).addcmul_(grad, grad, value=1 - optim.beta2)
            denom = (exp_avg_sq.sqrt() / self.bias2_sqrt[k].view(shape)).add_(EPS)
            updated = decayed + (-self.step_size[k]).view(shape) * exp_avg / denom
            rows = active.view(shape)
            tensor.copy_(torch.where(rows, updated, tensor))
            exp_avgs[i].copy_(torch.where(rows, exp_avg, exp_avgs[i]))
            exp_avg_sqs[i].copy_(torch.where(rows, exp_avg_sq, exp_avg_sqs[i]))
        state.count = state.count + active.long()

    @property
    def count(self) -> torch.Tensor:
        return self.state.count
