"""The grid: a sweep's cells and each sample's seed.

A cell (results/columns.py: `Cell`) is (model, dataset, n_mem, length, method); `cells` lists them in grid order (lengths ascending within
each group). A sample's init seed is a function of (sweep seed, the cell without its method, sample index,
restart index) alone: the same whatever its batch, worker or resume, and the same under every method; restart 0
has the seed a sweep without restarts gives the sample.
"""

from __future__ import annotations

import hashlib

from ..config.schema import MethodSettings, SweepConfig
from ..results.columns import Cell


def method_settings(cfg: SweepConfig) -> dict[str, MethodSettings]:
    """The sweep's methods by name: those of `grid.methods`, or the one `method` with the sweep's `optim`."""
    return cfg.methods if cfg.grid.methods else {cfg.method.name: MethodSettings(cfg.method, cfg.optim)}


def layer_counts(grid) -> list[int]:
    """grid.layers as cells hold them: the decoder layers kept, 0 for all."""
    return [0 if layers == "all" else layers for layers in grid.layers]


def cells(cfg: SweepConfig) -> list[Cell]:
    g = cfg.grid
    return [
        Cell(model, dataset, n_mem, length, method, layers)
        for model in g.models
        for dataset in g.datasets
        for method in method_settings(cfg)
        for n_mem in g.n_mem
        for layers in layer_counts(g)
        for length in sorted(g.lengths)
    ]


def derived_seed(seed: int, what: str) -> int:
    """Another seed of the same sample, for another of its tensors or another of its restarts."""
    return int.from_bytes(hashlib.sha256(f"{seed}|{what}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def sample_seed(seed: int, cell: Cell, sample: int, restart: int = 0) -> int:
    """The seed of one sample's init: a function of (sweep seed, cell without its method, sample index) alone, so a
    sample starts from the same random stream under every method, and adding the method axis changed no result.
    Restart r > 0 (`grid.restarts`) starts from a seed derived from that one and r; restart 0 from that one."""
    digest = hashlib.sha256(f"{seed}|{cell.text_id}|{sample}".encode()).digest()
    first = int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
    return first if restart == 0 else derived_seed(first, f"restart={restart}")


def rows_per_length(cfg: SweepConfig) -> int:
    """The most rows of one text length a work item holds: a length's cells over the datasets, times samples and restarts."""
    return cfg.grid.samples * cfg.grid.restarts * len(cfg.grid.datasets)
