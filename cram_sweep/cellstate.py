"""The state of each cell of a sweep: the one definition of done / failed / pending and the means.

The driver (live MLflow metrics), `status`, `report` and the MLflow re-sync all call `cell_state`
(through `cell_states` where they start from the stores). A sample is done once a row of it is stored,
failed when an attempt of it failed and no row of it is stored, and pending otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import pyarrow as pa

from .config import SweepConfig
from .grid import Cell, cells

# The result columns the state reads.
STATE_COLUMNS = ["acc", "gain_tokens", "info_gain_bits", "seconds", "greedy_exact", "greedy_prefix", "horizon"]
MEANS = {
    "acc_mean": "acc",
    "horizon_mean": "horizon",
    "gain_tokens_mean": "gain_tokens",
    "info_gain_bits_mean": "info_gain_bits",
    "greedy_exact_share": "greedy_exact",
    "seconds_mean": "seconds",
}


def cell_state(samples: int, done: Sequence[Mapping], failed: Iterable[int]) -> dict[str, float]:
    """A cell of `samples` samples, given its stored rows (`sample` and STATE_COLUMNS) and the samples
    with a failed attempt: counts, means over the done samples (NaN when none) and the longest greedy prefix."""
    done_samples = {row["sample"] for row in done}
    failed_samples = set(failed) - done_samples

    def mean(key: str) -> float:
        return sum(float(row[key]) for row in done) / len(done) if done else math.nan

    return {
        "done": len(done_samples),
        "failed": len(failed_samples),
        "pending": max(samples - len(done_samples) - len(failed_samples), 0),
        **{name: mean(key) for name, key in MEANS.items()},
        "greedy_prefix_max": max((row["greedy_prefix"] for row in done), default=math.nan),
        "horizon_min": min((row["horizon"] for row in done), default=math.nan),
        "horizon_max": max((row["horizon"] for row in done), default=math.nan),
    }


def by_cell(results: pa.Table, failures: pa.Table) -> tuple[dict[str, list], dict[str, set]]:
    """The stored rows (`sample` and STATE_COLUMNS) of each cell, and each cell's samples with a failed attempt."""
    done: dict[str, list] = {}
    for row in results.select(["cell", "sample", *STATE_COLUMNS]).to_pylist():
        done.setdefault(row["cell"], []).append(row)
    failed: dict[str, set] = {}
    for row in failures.select(["cell", "sample"]).to_pylist():
        failed.setdefault(row["cell"], set()).add(row["sample"])
    return done, failed


def cell_states(cfg: SweepConfig, results: pa.Table, failures: pa.Table) -> list[tuple[Cell, dict[str, float]]]:
    """Every cell of the grid, in grid order, with its state, from the results and failures stores."""
    done, failed = by_cell(results, failures)
    return [(cell, cell_state(cfg.grid.samples, done.get(cell.id, []), failed.get(cell.id, ()))) for cell in cells(cfg)]


def open_failures(results: pa.Table, failures: pa.Table) -> list[dict]:
    """The latest failed attempt of each sample that failed and has no stored row, sorted by (cell, sample)."""
    done = set(zip(results["cell"].to_pylist(), results["sample"].to_pylist()))
    latest = {}
    for row in sorted(failures.to_pylist(), key=lambda r: r["attempt"]):
        if (row["cell"], row["sample"]) not in done:
            latest[row["cell"], row["sample"]] = row
    return [latest[key] for key in sorted(latest)]
