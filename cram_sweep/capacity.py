"""The capacity definitions: pure functions of the results and the cell states, nothing read or written here.

Per (model, dataset, n_mem, method):
- full (the design's "The method"): `max_tokens` is the largest length whose mean accuracy is >= FIT;
  gain and information gain are averaged over the samples that did not fit (acc <= FIT) across all
  lengths; utilization is that mean gain over the theoretical capacity n_mem * hidden * 16 / log2(vocab_size).
- progressive: gain and information gain at each sample's horizon, averaged over the samples;
  utilization is the mean horizon over the theoretical capacity.
- both: a sample's horizon is the longest prefix its stored vectors reproduce exactly, the most over the
  group's lengths (full: the greedy prefix of the length's best vectors), so the two methods compare.
A column a method does not define is NaN in its rows (progressive's `max_tokens`).
`theoretical_tokens` and `utilization` count the vectors' numbers (n_mem * hidden at 16 bits each), whatever
was trained; `trained_numbers` (per sample, from `param`) and `utilization_trained` count the numbers that
were optimized (param=lowdim: n_mem * k, plus the projection where it is trained).

The capacity table has one row per group, in sorted (GROUP, method) order, with CAPACITY_COLUMNS; the cell
table has one row per cell of the grid, in grid order, with CELL_COLUMNS (cellstate.cell_state's counts and means).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

FIT = 0.99
GROUP = ["model", "dataset", "n_mem"]
CELL_GROUP = ["model", "dataset", "method", "n_mem"]  # the cells of one curve: they differ in length alone
CAPACITY_COLUMNS = [
    "model",
    "dataset",
    "n_mem",
    "method",
    "max_tokens",
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
]
CELL_COLUMNS = [
    "model",
    "dataset",
    "method",
    "n_mem",
    "length",
    "cell",
    "done",
    "failed",
    "pending",
    "acc_mean",
    "gain_tokens_mean",
    "info_gain_bits_mean",
    "greedy_exact_share",
    "horizon_mean",
    "horizon_max",
    "seconds_mean",
]
# The capacity columns tracking logs as curves over n_mem (the paper's capacity-vs-vectors figure), for every method;
# METHOD_CURVE_COLUMNS adds those a single method defines.
CURVE_COLUMNS = ("horizon_mean", "horizon_std", "horizon_min", "horizon_max", "gain_tokens_mean", "info_gain_bits_mean", "utilization")
METHOD_CURVE_COLUMNS = {"full": ("max_tokens",)}


def curve_columns(method: str) -> tuple[str, ...]:
    """The capacity columns logged as curves for a row of `method`: CURVE_COLUMNS, then the method's own."""
    return CURVE_COLUMNS + METHOD_CURVE_COLUMNS.get(method, ())


def label(model, dataset, *rest) -> str:
    """A group's name in the report's text and plots: `model / dataset`, then a method and `n_mem=K` where given (ints are n_mem)."""
    return " / ".join([model, dataset] + [f"n_mem={part}" if isinstance(part, (int, np.integer)) else str(part) for part in rest])


def max_tokens(group: pd.DataFrame) -> int:
    """The longest length whose mean accuracy is >= FIT (0 if none); `group` has `length` and `acc` columns."""
    mean_acc = group.groupby("length")["acc"].mean()
    fits = mean_acc.index[mean_acc >= FIT]
    return int(fits.max()) if len(fits) else 0


def capacity_row(method: str, group: pd.DataFrame) -> dict:
    """The capacity columns (CAPACITY_COLUMNS after the group keys) of one group's result rows."""
    n_mem, hidden, vocab = (int(group[key].iloc[0]) for key in ("n_mem", "hidden", "vocab_size"))
    theoretical = n_mem * hidden * 16 / math.log2(vocab)
    longest = group.loc[group.groupby("sample")["horizon"].idxmax()]  # each sample's row of its longest horizon
    horizon = longest["horizon"]
    scored = longest if method == "progressive" else group[group["acc"] <= FIT]
    gain_mean = scored["gain_tokens"].mean()
    reached = gain_mean if method == "full" else horizon.mean()
    trained = int(group["trained_numbers"].iloc[0])
    return {
        "max_tokens": max_tokens(group) if method == "full" else math.nan,
        "horizon_mean": horizon.mean(),
        "horizon_std": horizon.std(),
        "horizon_min": horizon.min(),
        "horizon_max": horizon.max(),
        "gain_tokens_mean": gain_mean,
        "gain_tokens_std": scored["gain_tokens"].std(),
        "info_gain_bits_mean": scored["info_gain_bits"].mean(),
        "info_gain_bits_std": scored["info_gain_bits"].std(),
        "theoretical_tokens": theoretical,
        "utilization": reached / theoretical,
        "param": group["param"].iloc[0],
        "trained_numbers": trained,
        "utilization_trained": reached / (trained * 16 / math.log2(vocab)),
    }


def capacity_table(results: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, dataset, n_mem, method) with the columns of report/capacity.csv."""
    keys = [*GROUP, "method"]
    rows = [{**dict(zip(keys, key)), **capacity_row(key[-1], group)} for key, group in results.groupby(keys, sort=True)]
    return pd.DataFrame(rows, columns=CAPACITY_COLUMNS)


def cell_frame(states) -> pd.DataFrame:
    """One row per (cell, state) of cellstate.cell_states, in its order; cells without finished samples have NaN means."""
    rows = [
        {
            "model": cell.model,
            "dataset": cell.dataset,
            "method": cell.method,
            "n_mem": cell.n_mem,
            "length": cell.length,
            "cell": cell.id,
            **state,
        }
        for cell, state in states
    ]
    return pd.DataFrame(rows, columns=CELL_COLUMNS)
