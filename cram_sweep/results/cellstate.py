"""The state of each cell of a sweep: the one definition of done / failed / pending and the means.

The driver (live MLflow metrics), `status`, `report` and the MLflow re-sync all call `cell_state`
(through `cell_states` where they start from the stores). A cell runs grid.samples x grid.restarts optimizations,
each a (sample, restart); one is done once a row of it is stored, failed when an attempt of it failed and no row
of it is stored, and pending otherwise. The counts count these runs; the means are over the done ones.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import pyarrow as pa

from ..config import SweepConfig
from ..methods import method
from ..sweep.grid import cells
from .columns import Cell
from .store import IDENTITY

MEANS = {
    "acc_mean": "acc",
    "horizon_mean": "horizon",
    "gain_tokens_mean": "gain_tokens",
    "info_gain_bits_mean": "info_gain_bits",
    "greedy_exact_share": "greedy_exact",
    "seconds_mean": "seconds",
}
STATE_COLUMNS = [*MEANS.values(), "greedy_prefix"]  # the result columns the state reads


def runs_per_cell(cfg: SweepConfig) -> int:
    """The (sample, restart) optimizations of a cell: its rows once it is done."""
    return cfg.grid.samples * cfg.grid.restarts


def cell_state(cell: Cell, runs: int, done: Sequence[Mapping], failed: Iterable[tuple[int, int]]) -> dict[str, float]:
    """`cell` of `runs` (sample, restart) runs, given its stored rows (`sample`, `restart` and STATE_COLUMNS) and the
    (sample, restart) runs with a failed attempt: counts, means over the done rows (NaN when none) and the longest
    greedy prefix. A progressive cell has no mean accuracy (NaN): a progressive row's accuracy is that of its horizon
    stage, >= the threshold by construction (NaN at horizon 0), so its mean says nothing the horizon does not."""
    done_samples = {(row["sample"], row["restart"]) for row in done}
    failed_samples = set(failed) - done_samples

    def mean(key: str) -> float:
        return sum(float(row[key]) for row in done) / len(done) if done else math.nan

    return {
        "done": len(done_samples),
        "failed": len(failed_samples),
        "pending": max(runs - len(done_samples) - len(failed_samples), 0),
        **{name: mean(key) for name, key in MEANS.items()},
        **({} if method(cell.method).has_mean_accuracy else {"acc_mean": math.nan}),
        "greedy_prefix_max": max((row["greedy_prefix"] for row in done), default=math.nan),
        "horizon_min": min((row["horizon"] for row in done), default=math.nan),
        "horizon_max": max((row["horizon"] for row in done), default=math.nan),
    }


def by_cell(results: pa.Table, failures: pa.Table) -> tuple[dict[str, list], dict[str, set]]:
    """The stored rows (`sample`, `restart` and STATE_COLUMNS) of each cell, and each cell's (sample, restart) runs with
    a failed attempt."""
    done: dict[str, list] = {}
    for row in results.select([*IDENTITY, *STATE_COLUMNS]).to_pylist():
        done.setdefault(row["cell"], []).append(row)
    failed: dict[str, set] = {}
    for row in failures.select(list(IDENTITY)).to_pylist():
        failed.setdefault(row["cell"], set()).add((row["sample"], row["restart"]))
    return done, failed


def cell_states(cfg: SweepConfig, results: pa.Table, failures: pa.Table) -> list[tuple[Cell, dict[str, float]]]:
    """Every cell of the grid, in grid order, with its state, from the results and failures stores."""
    done, failed = by_cell(results, failures)
    return [(cell, cell_state(cell, runs_per_cell(cfg), done.get(cell.id, []), failed.get(cell.id, ()))) for cell in cells(cfg)]


def open_failures(results: pa.Table, failures: pa.Table) -> list[dict]:
    """The latest failed attempt of each (sample, restart) that failed and has no stored row, sorted by (cell, sample, restart)."""
    done = set(zip(*(results[key].to_pylist() for key in IDENTITY)))
    latest = {}
    for row in sorted(failures.to_pylist(), key=lambda r: r["attempt"]):
        key = tuple(row[k] for k in IDENTITY)
        if key not in done:
            latest[key] = row
    return [latest[key] for key in sorted(latest)]
