"""The capacity definitions: pure functions of the results and the cell states, nothing read or written here.

Per (model, dataset, n_mem, method), the method (methods/) says which rows its gain, information gain and bits are
averaged over (`scored_rows`), what its vectors reached (`reached`: full, the mean gain; progressive, the mean
horizon) and its `max_tokens` (full: the largest length whose mean accuracy is >= FIT); utilization is what was
reached over the theoretical capacity n_mem * hidden * 16 / log2(vocab_size).
- every method: a sample's horizon is the longest prefix its stored vectors reproduce exactly, the most over the
  group's lengths (full: the greedy prefix of the length's best vectors), so the two methods compare.
A column a method does not define is NaN in its rows (progressive's `max_tokens`; its cells' `acc_mean`, cellstate).
`theoretical_tokens` and `utilization` count the vectors' numbers (n_mem * hidden at 16 bits each), whatever
was trained; `trained_numbers` (per sample, from `param`) and `utilization_trained` count the numbers that
were optimized (param=lowdim: n_mem * k, plus the projection where it is trained).
Bits (`analysis.bits`, bits.py): over the same rows as the gain (`scored_rows`) that were analysed, the mean, std,
min and max of `bits_needed`, the mean information gain per stored bit (info_gain_bits / stored_bits), and the
theoretical capacity and utilization recomputed at the measured bits: n_mem * hidden * bits_needed_mean / log2(vocab).
NaN where no such row was analysed.
With restarts (`grid.restarts`), each (sample, restart) counts as a run of its own in the capacity table (a mean of
single runs, as without restarts); `restart_table` compares the restarts of each sample (best of R, their spread, how
alike their solutions are) per cell.

The capacity table has one row per group, in sorted (GROUP, method) order, with CAPACITY_COLUMNS; the cell
table has one row per cell of the grid, in grid order, with CELL_COLUMNS (cellstate.cell_state's counts and means).
"""

from __future__ import annotations

import math
from dataclasses import asdict

import numpy as np
import pandas as pd

from ..methods import method as method_named
from ..methods.base import longest_rows
from ..results.cellstate import MEANS
from ..results.columns import CELL_KEYS

GROUP = ["model", "dataset", "n_mem", "layers"]
CELL_GROUP = ["model", "dataset", "method", "n_mem", "layers"]  # the cells of one curve: they differ in length alone
BITS_COLUMNS = [
    "bits_needed_mean",
    "bits_needed_std",
    "bits_needed_min",
    "bits_needed_max",
    "info_gain_per_stored_bit",
    "theoretical_tokens_at_bits",
    "utilization_at_bits",
]
CAPACITY_COLUMNS = [
    "model",
    "dataset",
    "n_mem",
    "layers",
    "method",
    "max_tokens",
    "max_tokens_exact",
    "horizon_mean",
    "horizon_std",
    "horizon_min",
    "horizon_max",
    "gain_tokens_mean",
    "gain_tokens_std",
    "info_gain_bits_mean",
    "info_gain_bits_std",
    "theoretical_tokens",
    "utilization",
    "param",
    "trained_numbers",
    "utilization_trained",
    *BITS_COLUMNS,
]
CELL_COLUMNS = [*CELL_KEYS, "cell", "done", "failed", "pending", *MEANS, "horizon_max"]  # cellstate.cell_state's
# The capacity columns tracking logs as curves over n_mem (the paper's capacity-vs-vectors figure), for every method;
# a method adds its own (Method.curve_columns).
CURVE_COLUMNS = (
    "horizon_mean",
    "horizon_std",
    "horizon_min",
    "horizon_max",
    "gain_tokens_mean",
    "info_gain_bits_mean",
    "utilization",
    "bits_needed_mean",
    "info_gain_per_stored_bit",
    "utilization_at_bits",
)


def curve_columns(method: str) -> tuple[str, ...]:
    """The capacity columns logged as curves for a row of `method`: CURVE_COLUMNS, then the method's own."""
    return CURVE_COLUMNS + method_named(method).curve_columns


def label(model, dataset, method=None, n_mem=None, layers=0) -> str:
    """A group's name in the report's text and plots: `model / dataset`, then its method, `n_mem=K` and `layers=D` where
    given (no layers part for all layers)."""
    parts = [model, dataset] + ([method] if method else []) + ([f"n_mem={n_mem}"] if n_mem is not None else [])
    return " / ".join(parts + ([f"layers={layers}"] if layers else []))


def depths(capacity: pd.DataFrame) -> list[int]:
    """The capacity table's layer counts in the report's order: ascending, all (0) last."""
    return sorted(capacity["layers"].unique(), key=lambda d: (d == 0, d))


def depth_name(layers: int) -> str:
    """A grid.layers value as the report shows it: the count, or all (0)."""
    return str(layers) if layers else "all"


def key_label(columns, key) -> str:
    """`label` of a groupby key over `columns`."""
    return label(**dict(zip(columns, key)))


def analysed_rows(results: pd.DataFrame) -> pd.DataFrame:
    """The scored rows of every (GROUP, method) group that the bits analysis ran on, in group order."""
    parts = [method_named(method).scored_rows(group) for (*_, method), group in results.groupby([*GROUP, "method"], sort=True)]
    rows = pd.concat(parts) if parts else results
    return rows[rows["roundings"].map(len) > 0]


def bits_columns(analysed: pd.DataFrame, numbers: int, log2_vocab: float, reached: float) -> dict:
    """BITS_COLUMNS of a group's analysed scored rows; `reached`: what the group's vectors hold (Method.reached)."""
    needed = analysed["bits_needed"]
    theoretical = numbers * needed.mean() / log2_vocab if len(analysed) else math.nan
    return {
        "bits_needed_mean": needed.mean(),
        "bits_needed_std": needed.std(),
        "bits_needed_min": needed.min(),
        "bits_needed_max": needed.max(),
        "info_gain_per_stored_bit": (analysed["info_gain_bits"] / analysed["stored_bits"]).mean(),
        "theoretical_tokens_at_bits": theoretical,
        "utilization_at_bits": reached / theoretical,
    }


def capacity_row(method: str, group: pd.DataFrame) -> dict:
    """The capacity columns (CAPACITY_COLUMNS after the group keys) of one group's result rows."""
    n_mem, hidden, vocab = (int(group[key].iloc[0]) for key in ("n_mem", "hidden", "vocab_size"))
    theoretical = n_mem * hidden * 16 / math.log2(vocab)
    horizon = longest_rows(group)["horizon"]
    one = method_named(method)
    scored = one.scored_rows(group)
    reached = one.reached(scored, horizon)
    trained = int(group["trained_numbers"].iloc[0])
    analysed = scored[scored["roundings"].map(len) > 0]
    return {
        "max_tokens": one.max_tokens(group),
        "max_tokens_exact": one.max_tokens_exact(group),
        "horizon_mean": horizon.mean(),
        "horizon_std": horizon.std(),
        "horizon_min": horizon.min(),
        "horizon_max": horizon.max(),
        "gain_tokens_mean": scored["gain_tokens"].mean(),
        "gain_tokens_std": scored["gain_tokens"].std(),
        "info_gain_bits_mean": scored["info_gain_bits"].mean(),
        "info_gain_bits_std": scored["info_gain_bits"].std(),
        "theoretical_tokens": theoretical,
        "utilization": reached / theoretical,
        "param": group["param"].iloc[0],
        "trained_numbers": trained,
        "utilization_trained": reached / (trained * 16 / math.log2(vocab)),
        **bits_columns(analysed, n_mem * hidden, math.log2(vocab), reached),
    }


def capacity_table(results: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, dataset, n_mem, method) with the columns of report/capacity.csv."""
    keys = [*GROUP, "method"]
    rows = [{**dict(zip(keys, key)), **capacity_row(key[-1], group)} for key, group in results.groupby(keys, sort=True)]
    return pd.DataFrame(rows, columns=CAPACITY_COLUMNS)


def cell_frame(states) -> pd.DataFrame:
    """One row per (cell, state) of cellstate.cell_states, in its order; cells without finished samples have NaN means."""
    return pd.DataFrame([{**asdict(cell), "cell": cell.id, **state} for cell, state in states], columns=CELL_COLUMNS)


def growth_points(restarts: int) -> list[int]:
    """The R of best-of-R's growth: 1, 2, 4, ... below `restarts`, then `restarts`."""
    points = [1]
    while points[-1] * 2 < restarts:
        points.append(points[-1] * 2)
    return points + [restarts] if restarts > 1 else points


def growth_column(r: int) -> str:
    """The restart table's column of the best of the first r restarts."""
    return f"best_of_{r}"


def growth_columns(columns) -> dict[int, str]:
    """The restart table's best-of-r columns among `columns`, by r."""
    return {int(c.removeprefix("best_of_")): c for c in columns if c.startswith("best_of_") and c.removeprefix("best_of_").isdigit()}


def cosine_matrix(memories: list) -> np.ndarray:
    """The cosine similarity of every two solutions (each flattened n_mem x hidden), in float64."""
    flat = np.stack([np.asarray(m, dtype=np.float64) for m in memories])
    unit = flat / np.linalg.norm(flat, axis=1, keepdims=True)
    return unit @ unit.T


def mean_pairwise_cosine(memories: list) -> float:
    """The mean cosine similarity of every pair of solutions; NaN for fewer than two."""
    if len(memories) < 2:
        return math.nan
    return float(cosine_matrix(memories)[np.triu_indices(len(memories), k=1)].mean())


def restart_row(method: str, cell_rows: pd.DataFrame, restarts: int) -> dict:
    """RESTART_COLUMNS after the cell's keys, from a cell's rows: per sample over its restarts, then means over samples.
    best_of_<r>: the best of restarts 0..r-1 (`best_of_r`: of all R); worst_of_r and restart_std: the per-sample min
    and std over the R; cosine_mean: the per-sample mean pairwise cosine of its solutions (`solved`), over the samples
    with two or more."""
    one = method_named(method)
    metric = one.restart_metric
    samples = cell_rows.sort_values("restart").groupby("sample")
    best = {growth_column(r): samples.apply(lambda s, r=r: s.loc[s["restart"] < r, metric].max()).mean() for r in growth_points(restarts)}
    return {
        "metric": metric,
        "samples": samples.ngroups,
        "restarts": restarts,
        "best_of_r": samples[metric].max().mean(),
        "worst_of_r": samples[metric].min().mean(),
        "restart_std": samples[metric].std().mean(),
        "cosine_mean": one.solved(cell_rows).groupby("sample")["memory"].apply(lambda m: mean_pairwise_cosine(list(m))).mean(),
        **best,
    }


RESTART_KEYS = [*CELL_GROUP, "length"]


def restart_table(results: pd.DataFrame, restarts: int) -> pd.DataFrame:
    """One row per cell with finished rows, in sorted key order, when the sweep has `restarts` > 1 (empty otherwise):
    RESTART_KEYS, then restart_row's columns (best_of_1 ... best_of_<R> last)."""
    columns = [*RESTART_KEYS, "metric", "samples", "restarts", "best_of_r", "worst_of_r", "restart_std", "cosine_mean"]
    columns += [growth_column(r) for r in growth_points(restarts)]
    if restarts < 2:
        return pd.DataFrame(columns=columns)
    rows = [
        {**dict(zip(RESTART_KEYS, key)), **restart_row(key[2], group, restarts)} for key, group in results.groupby(RESTART_KEYS, sort=True)
    ]
    return pd.DataFrame(rows, columns=columns)
