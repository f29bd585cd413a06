"""Starts taken from another sweep (`optim.init_from=DIR`), read once on the driver before any work.

- `optim.init=from_sweep`: each sample starts from the stored vectors of the same text in DIR, matched by model,
  dataset, n_mem and sample, and by length: the same length, else the longest stored length below it (a shorter
  cap's solution starts a longer cap); a row of the same method, then restart 0, is preferred. The reference's `load_from_disk`,
  matched by sample identity rather than by file order. A sample without a match is one clear error.
- `optim.init=pca` (param=lowdim): the top-k principal components and the mean of every vector DIR stores for
  the model (each sample's n_mem vectors are n_mem points in the hidden space) are W and b; the reference's
  `pretrained_pca`, fitted per vector rather than on the flattened n_mem x hidden solution.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import SweepConfig
from ..engine.param import Basis
from ..errors import UserError
from ..sweep.grid import cells, method_settings
from .columns import CELL_KEYS, Cell
from .store import IDENTITY

STORED_COLUMNS = [*CELL_KEYS, *IDENTITY[1:], "memory"]  # a row's cell, its (sample, restart) and its vectors


@dataclass
class Starts:
    vectors: dict[tuple[str, int], list[float]] = field(default_factory=dict)  # (cell id, sample) -> stored vectors
    bases: dict[tuple[str, str], Basis] = field(default_factory=dict)  # (method, model) -> pca basis


def _stored(directory: str, key: str) -> list[dict]:
    from .store import SweepDir, read_results

    sweep = SweepDir(Path(directory))
    if not sweep.config.is_file():
        raise UserError(f"{key}.init_from={directory}: not a sweep directory (no sweep.yaml): give a directory `cram-sweep run` printed")
    rows = read_results(sweep, STORED_COLUMNS).to_pylist()
    if not rows:
        raise UserError(f"{key}.init_from={directory}: the sweep has no finished samples to start from")
    return rows


def _match(rows: list[dict], cell: Cell, sample: int):
    same = [
        r
        for r in rows
        if (r["model"], r["dataset"], r["n_mem"], r["sample"]) == (cell.model, cell.dataset, cell.n_mem, sample)
        and r["length"] <= cell.length
    ]
    if not same:
        return None
    return max(same, key=lambda r: (r["length"], r["method"] == cell.method, r["restart"] == 0))


def _basis(rows: list[dict], model: str, k: int, key: str, directory: str) -> Basis:
    vectors = [torch.tensor(r["memory"], dtype=torch.float32).view(r["n_mem"], -1) for r in rows if r["model"] == model]
    if not vectors:
        raise UserError(f"{key}.init_from={directory} stores no sample of model {model}: pca needs that model's vectors")
    points = torch.cat(vectors)
    if points.shape[0] < k + 1:
        raise UserError(
            f"{key}.init=pca with param.k={k} needs at least {k + 1} stored vectors of {model}, {directory} has {points.shape[0]}: "
            "lower param.k or start from a larger sweep"
        )
    mean = points.mean(dim=0)
    _, _, components = torch.linalg.svd(points - mean, full_matrices=False)
    return Basis(components[:k].contiguous(), mean)


def load_starts(cfg: SweepConfig) -> Starts:
    """The stored starts every method of the sweep asks for; raises UserError naming what to change."""
    starts = Starts()
    for name, settings in method_settings(cfg).items():
        optim = settings.optim
        if optim.init not in ("from_sweep", "pca"):
            continue
        key = f"methods.{name}.optim" if cfg.grid.methods else "optim"
        rows = _stored(optim.init_from, key)
        if optim.init == "pca":
            for model in cfg.grid.models:
                starts.bases[name, model] = _basis(rows, model, cfg.param.k, key, optim.init_from)
            continue
        for cell in (c for c in cells(cfg) if c.method == name):
            for sample in range(cfg.grid.samples):
                row = _match(rows, cell, sample)
                if row is None:
                    raise UserError(
                        f"{key}.init_from={optim.init_from} has no stored sample {sample} of {cell.model}/{cell.dataset} "
                        f"with n_mem={cell.n_mem} at length <= {cell.length}: run that sweep's missing samples or lower grid.samples"
                    )
                starts.vectors[cell.id, sample] = row["memory"]
    return starts
