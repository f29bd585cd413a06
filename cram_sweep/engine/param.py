"""What is optimized: a parametrization owns each sample's trainable tensors (a `RowState` of its own type) and
computes from them the (B, n_mem, hidden) vectors fed to the model.

The engine (batch.py), the methods' rules (methods/) and the optimizer (adamw.py) see only this interface:
- `init(specs)`: the rows of new samples, each a function of its sample alone (its seed, or the stored vectors it
  continues), as leaf tensors; those that require grad are trained, the others held fixed;
- `vectors(params)`: the vectors, differentiable in every trained tensor;
- `label` and `trained_numbers`: the `param` and `trained_numbers` columns.
Snapshots and restores are row copies of the state (rows.RowState.where); AdamW steps every trained tensor.

Inits (`optim.init`), after the progressive-cramming reference (train/embedding_init.py):
- `embed_std`: randn * std of the input embeddings (Kuratov et al.); `uniform`: U[0, init_scale) (the
  reference's `random0.02`);
- `mvnormal`: a normal with the input embeddings' mean and covariance, the covariance scaled by 1e-5 and the
  last three rows left out, as the reference fits it;
- `from_sweep`: the stored vectors of the same text in another sweep (init_from.py finds them);
- `pca` (lowdim): W and b are the top-k principal components and the mean of a stored sweep's vectors, z starts
  as randn * 0.1 (the reference's PCA coefficients).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch

from ..config import OptimConfig, ParamConfig
from ..sweep.grid import derived_seed
from .rows import RowState

PCA_COEFFICIENT_SCALE = 0.1  # the reference's PretrainedPCAParametrization init
MVNORMAL_COVARIANCE_SCALE = 1e-5  # the reference's _fit_mvnormal_from_model


def initial_vectors(n_mem: int, hidden: int, seed: int, optim: OptimConfig, embed_std: float) -> torch.Tensor:
    """A sample's starting vectors (or z, at width `hidden` = k), a function of its seed alone: randn * std(input
    embeddings), or U[0, init_scale)."""
    gen = torch.Generator().manual_seed(seed)
    if optim.init == "uniform":
        return torch.rand(n_mem, hidden, generator=gen) * optim.init_scale
    return torch.randn(n_mem, hidden, generator=gen) * embed_std


def as_leaves(params: RowState) -> RowState:
    """The same numbers as fresh leaf tensors, trained ones requiring grad (after rows were added, dropped or restored)."""
    return params.map(lambda t: t.detach().requires_grad_(t.requires_grad))


def trained_tensors(params: RowState) -> list[torch.Tensor]:
    return [t for t in params.tensors() if t.requires_grad]


@dataclass
class DirectRows(RowState):
    vectors: torch.Tensor  # (B, n_mem, hidden): the vectors themselves are trained


class Direct:
    """`param=direct`, the papers' setting: the n_mem vectors are the trained numbers."""

    label = "direct"

    def __init__(self, n_mem: int, embed_weight: torch.Tensor, optim: OptimConfig, device):
        self.n_mem, self.hidden, self.optim, self.device = n_mem, embed_weight.shape[1], optim, device
        self.embed_weight = embed_weight
        self.embed_std = embed_weight.float().std().item()
        self._mvnormal: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    @property
    def trained_numbers(self) -> int:
        return self.n_mem * self.hidden

    def init(self, specs) -> DirectRows:
        vectors = torch.stack([self._start(spec) for spec in specs])
        return DirectRows(vectors.to(self.device).requires_grad_())

    def _start(self, spec) -> torch.Tensor:
        if spec.init_vectors is not None:
            return torch.tensor(spec.init_vectors, dtype=torch.float32).view(self.n_mem, self.hidden)
        if self.optim.init == "mvnormal":
            mean, scale = self.mvnormal()
            noise = torch.randn(self.n_mem, self.hidden, generator=torch.Generator().manual_seed(spec.init_seed))
            return mean + noise @ scale.T
        return initial_vectors(self.n_mem, self.hidden, spec.init_seed, self.optim, self.embed_std)

    def mvnormal(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The embeddings' mean and the Cholesky factor of their (scaled, regularized) covariance, on the CPU."""
        if self._mvnormal is None:
            weight = self.embed_weight.detach().float().cpu()
            rows = weight[:-3] if weight.shape[0] > 3 else weight
            mean = rows.mean(dim=0)
            centered = (rows - mean).double()
            covariance = (centered.T @ centered) / rows.shape[0] + 1e-6 * torch.eye(self.hidden, dtype=torch.float64)
            self._mvnormal = mean, torch.linalg.cholesky(MVNORMAL_COVARIANCE_SCALE * covariance).float()
        return self._mvnormal

    def vectors(self, params: DirectRows) -> torch.Tensor:
        return params.vectors


@dataclass
class LowDimRows(RowState):
    z: torch.Tensor  # (B, n_mem, k) the coefficients
    projection: torch.Tensor  # (B, k, hidden) W
    bias: torch.Tensor  # (B, hidden) b


@dataclass
class Basis:
    """A stored sweep's principal directions: `pca`'s W (k, hidden) and b (hidden)."""

    components: torch.Tensor
    mean: torch.Tensor


class LowDim:
    """`param=lowdim`: per sample, the vectors are z @ W + b (the reference's LowDimProjectedParametrization, with a
    projection of each sample's own rather than one shared by a batch)."""

    def __init__(self, cfg: ParamConfig, basis: Optional[Basis], n_mem: int, embed_weight: torch.Tensor, optim: OptimConfig, device):
        self.cfg, self.basis, self.n_mem, self.hidden, self.optim, self.device = cfg, basis, n_mem, embed_weight.shape[1], optim, device
        self.embed_std = embed_weight.float().std().item()
        self.label = cfg.label

    @property
    def trained_numbers(self) -> int:
        k = self.cfg.k
        return self.n_mem * k + ((k + 1) * self.hidden if self.cfg.train_projection else 0)

    def init(self, specs) -> LowDimRows:
        starts = [self._start(spec.init_seed) for spec in specs]
        z, projection, bias = (torch.stack(parts).to(self.device) for parts in zip(*starts))
        trained = self.cfg.train_projection
        return LowDimRows(z.requires_grad_(), projection.requires_grad_(trained), bias.requires_grad_(trained))

    def _start(self, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        k = self.cfg.k
        if self.optim.init == "pca":
            z = torch.randn(self.n_mem, k, generator=torch.Generator().manual_seed(seed)) * PCA_COEFFICIENT_SCALE
            return z, self.basis.components.clone(), self.basis.mean.clone()
        z = initial_vectors(self.n_mem, k, seed, self.optim, self.embed_std)
        with torch.random.fork_rng(devices=[]):  # nn.Linear draws its default init from the global generator
            torch.manual_seed(derived_seed(seed, "projection"))
            linear = torch.nn.Linear(k, self.hidden)
        return z, linear.weight.detach().T.contiguous(), linear.bias.detach().clone()

    def vectors(self, params: LowDimRows) -> torch.Tensor:
        return torch.bmm(params.z, params.projection) + params.bias[:, None, :]


def parametrization(cfg: ParamConfig, basis: Optional[Basis] = None):
    """The factory `cram(parametrization=...)` takes: (n_mem, embed_weight, optim, device) -> a parametrization."""
    return Direct if cfg.name == "direct" else partial(LowDim, cfg, basis)
