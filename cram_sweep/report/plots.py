"""The report's plots, each a PNG written to the given path (120 dpi) and returned.

Figures are made without pyplot, so importing or reporting never changes the user's matplotlib backend; colours
are assigned per sorted key (tab10 up to 10 keys, then tab20), so the same sweep draws the same plots.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..engine.roundings import FP8, FULL_WIDTH, width
from ..methods.base import FIT
from .capacity import CELL_GROUP, GROUP, depth_name, depths, key_label


def _colours(keys) -> dict:
    """Distinct colours for up to 20 keys (tab10 while it suffices)."""
    keys = sorted(set(keys))
    cmap = matplotlib.colormaps["tab10" if len(keys) <= 10 else "tab20"]
    return {key: cmap(i % cmap.N) for i, key in enumerate(keys)}


def _save(fig, ax, path: Path) -> Path:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize="small", frameon=False)
    ax.grid(True, alpha=0.3)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def _axes(width: float, height: float):
    """A figure of its own, without pyplot: importing or reporting never changes the user's backend."""
    fig = Figure(figsize=(width, height))
    return fig, fig.subplots()


def plot_accuracy(cell_rows: pd.DataFrame, path: Path) -> Path:
    """Mean accuracy against the length of `cell_rows` (one method's cells), one line per (model, dataset, method, n_mem),
    and the FIT line."""
    fig, ax = _axes(7, 4.5)
    finished = cell_rows.dropna(subset=["acc_mean"])
    groups = finished.groupby(CELL_GROUP)
    colours = _colours(groups.groups)
    for key, group in groups:
        ax.plot(group["length"], group["acc_mean"], marker="o", color=colours[key], label=key_label(CELL_GROUP, key))
    ax.axhline(FIT, color="grey", linestyle="--", linewidth=1, label=f"fits (mean acc ≥ {FIT})")
    lengths = sorted(cell_rows["length"].unique())
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(length) for length in lengths])
    ax.minorticks_off()
    ax.set_ylim(min(0.0, finished["acc_mean"].min()) - 0.02, 1.03)
    ax.set(
        xlabel="text length (tokens)",
        ylabel="mean token accuracy (teacher forcing)",
        title="Accuracy of decoding the text from the vectors",
    )
    return _save(fig, ax, path)


def plot_ce(results: pd.DataFrame, path: Path) -> Path:
    """Each sample's cross-entropy with the vectors against without them; below y = x is a gain."""
    fig, ax = _axes(6.5, 5)
    colours = _colours(zip(results["model"], results["n_mem"]))
    datasets, methods = sorted(results["dataset"].unique()), sorted(results["method"].unique())
    markers = dict(zip([(d, m) for d in datasets for m in methods], "osD^vP*X"))
    for (model, dataset, method, n_mem, layers), group in results.groupby(CELL_GROUP):
        label = f"{model} / n_mem={n_mem}" + (f" / {dataset}" if len(datasets) > 1 else "") + (f" / {method}" if len(methods) > 1 else "")
        label += f" / layers={layers}" if layers else ""
        ax.scatter(
            group["ce_no_mem_bits"],
            group["ce_bits"],
            s=22,
            alpha=0.75,
            label=label,
            color=colours[(model, n_mem)],
            marker=markers.get((dataset, method), "o"),
        )
    # or 1: progressive rows at horizon 0 have no CE, and matplotlib warns on an empty range
    top = float(np.nanmax(results[["ce_no_mem_bits", "ce_bits"]].to_numpy())) * 1.05 or 1.0
    ax.plot([0, top], [0, top], color="grey", linestyle="--", linewidth=1, label="y = x (no gain)")
    ax.set_xlim(-0.02 * top, top)
    ax.set_ylim(-0.02 * top, top)
    ax.set(
        xlabel="CE of the text without vectors (bits, summed)",
        ylabel="CE with the vectors (bits, summed)",
        title="Cross-entropy with vs without the vectors, per sample",
    )
    return _save(fig, ax, path)


def plot_info_gain(capacity: pd.DataFrame, path: Path) -> Path:
    """The capacity rows' information gain (mean ± std) against n_mem, one line per (model, dataset)."""
    fig, ax = _axes(7, 4.5)
    groups = capacity.groupby(["model", "dataset", "layers"])
    colours = _colours(groups.groups)
    for key, group in groups:
        ax.errorbar(
            group["n_mem"],
            group["info_gain_bits_mean"],
            yerr=group["info_gain_bits_std"].fillna(0),
            marker="o",
            capsize=4,
            color=colours[key],
            label=key_label(["model", "dataset", "layers"], key),
        )
    if capacity["info_gain_bits_mean"].isna().all():
        ax.text(
            0.5,
            0.5,
            f"no saturated sample yet (every sample has acc > {FIT}):\nadd longer lengths",
            transform=ax.transAxes,
            ha="center",
            va="center",
            color="grey",
        )
    n_mems = sorted(capacity["n_mem"].unique())
    pad = 0.5 + 0.05 * (n_mems[-1] - n_mems[0])
    ax.set_xticks(n_mems, [str(n) for n in n_mems])
    ax.set_xlim(n_mems[0] - pad, n_mems[-1] + pad)
    ax.set_ylim(bottom=0)
    ax.set(
        xlabel="number of vectors (n_mem)",
        ylabel="information gain (bits)",
        title="Information gain vs number of vectors (mean ± std)",
    )
    return _save(fig, ax, path)


def plot_horizon_vs_ce(results: pd.DataFrame, path: Path) -> Path:
    """The paper's claim: the text's cross-entropy, not its length, sets the horizon."""
    fig, ax = _axes(6.5, 4.5)
    scored = results[results["horizon"] > 1]
    per_token = scored["ce_no_mem_bits"] / (scored["horizon"] - 1)
    colours = _colours(zip(results["model"], results["n_mem"]))
    for key, group in scored.groupby(["model", "n_mem"]):
        ax.scatter(per_token[group.index], group["horizon"], s=26, alpha=0.8, color=colours[key], label=f"{key[0]} / n_mem={key[1]}")
    ax.set(
        xlabel="CE of the horizon prefix without vectors (bits per token)",
        ylabel="horizon (tokens)",
        title="Horizon per sample vs the text's cross-entropy",
    )
    return _save(fig, ax, path)


def plot_growth(stages: pd.DataFrame, path: Path) -> Path:
    """Each progressive sample's stages: target length against its cumulative steps (hollow: failed stage)."""
    fig, ax = _axes(7, 4.5)
    colours = _colours(stages["cell"])
    labelled = set()
    for (cell, _), trajectory in stages.sort_values("stage").groupby(["cell", "sample"]):
        ax.plot(
            trajectory["total_steps"],
            trajectory["length"],
            color=colours[cell],
            alpha=0.6,
            linewidth=1,
            label=None if cell in labelled else cell,
        )
        labelled.add(cell)
        done = trajectory["converged"]
        ax.scatter(trajectory["total_steps"][done], trajectory["length"][done], s=12, color=colours[cell])
        ax.scatter(trajectory["total_steps"][~done], trajectory["length"][~done], s=18, facecolors="none", edgecolors=colours[cell])
    ax.set(xlabel="cumulative optimization steps", ylabel="stage length (tokens)", title="Progressive growth, one line per sample")
    return _save(fig, ax, path)


def plot_horizon_vs_bits(analysed: pd.DataFrame, path: Path) -> Path:
    """Each analysed sample's greedy horizon at each rounding against its bits per number, one line per sample over the
    scanned roundings (bf16 at 16, then the uniform widths), fp8 e4m3 as a hollow marker at 8; colour per group."""
    fig, ax = _axes(7, 4.5)
    keys = list(zip(*(analysed[k] for k in [*GROUP, "method"])))
    colours = _colours(keys)
    labelled = set()
    for key, row in zip(keys, analysed.to_dict("records")):
        points = list(zip(row["roundings"], row["horizon_at_bits"]))
        line = [(width(name), horizon) for name, horizon in points if name != FP8]
        ax.plot(
            *zip(*line),
            color=colours[key],
            alpha=0.6,
            linewidth=1,
            marker=".",
            label=None if key in labelled else key_label([*GROUP, "method"], key),
        )
        ax.scatter([width(FP8)], [h for name, h in points if name == FP8], s=24, facecolors="none", edgecolors=colours[key])
        labelled.add(key)
    ax.scatter([], [], s=24, facecolors="none", edgecolors="grey", label="fp8 e4m3")
    ax.invert_xaxis()
    ax.set(
        xlabel="bits per number of the vectors (bf16 at 16, then uniform k-bit per vector)",
        ylabel="greedy horizon at that rounding (tokens)",
        title="Horizon of the stored vectors rounded to fewer bits, one line per sample",
    )
    return _save(fig, ax, path)


def plot_bits_needed(analysed: pd.DataFrame, path: Path) -> Path:
    """How many samples need each number of bits, side by side per group (FULL_WIDTH: even bf16 loses the sample)."""
    fig, ax = _axes(7, 4.5)
    groups = analysed.groupby([*GROUP, "method"])
    colours = _colours(groups.groups)
    values = sorted(analysed["bits_needed"].unique())
    bar = 0.8 / groups.ngroups
    for i, (key, group) in enumerate(groups):
        counts = group["bits_needed"].value_counts()
        positions = np.arange(len(values)) + (i - (groups.ngroups - 1) / 2) * bar
        ax.bar(positions, [counts.get(v, 0) for v in values], width=bar, color=colours[key], label=key_label([*GROUP, "method"], key))
    ax.set_xticks(range(len(values)), [f"{v} (fp32)" if v == FULL_WIDTH else str(v) for v in values])
    ax.set(xlabel="bits needed per number", ylabel="samples", title="Bits the vectors need to keep the horizon / accuracy")
    return _save(fig, ax, path)


def plot_capacity_vs_layers(capacity: pd.DataFrame, path: Path) -> Path:
    """Each method's headline capacity against the decoder layers its model kept (grid.layers; all last), one line per
    (model, dataset, method, n_mem)."""
    from ..methods import method

    fig, ax = _axes(7, 4.5)
    order = depths(capacity)
    groups = capacity.groupby(["model", "dataset", "method", "n_mem"])
    colours = _colours(groups.groups)
    for key, group in groups:
        values = dict(zip(group["layers"], group[method(key[2]).headline]))
        ax.plot(range(len(order)), [values.get(d, np.nan) for d in order], marker="o", color=colours[key], label=key_label(CELL_GROUP, key))
    ax.set_xticks(range(len(order)), [depth_name(d) for d in order])
    ax.set(
        xlabel="decoder layers kept (then the final norm and head)",
        ylabel="capacity (tokens: max tokens, or the mean horizon)",
        title="Capacity against the model's depth",
    )
    return _save(fig, ax, path)
