"""The capacity report of a sweep: capacity table, per-cell table, Markdown summary and plots.

Everything is computed from the results and stages stores and `sweep.yaml`; nothing here talks to MLflow.
Definitions, per (model, dataset, n_mem, method):
- full (the design's "The method"): `max_tokens` is the largest length whose mean accuracy is >= 0.99;
  gain and information gain are averaged over the samples that did not fit (acc <= 0.99) across all
  lengths; utilization is that mean gain over the theoretical capacity n_mem * hidden * 16 / log2(vocab_size).
- progressive: gain and information gain at each sample's horizon, averaged over the samples;
  utilization is the mean horizon over the theoretical capacity.
- both: a sample's horizon is the longest prefix its stored vectors reproduce exactly, the most over the
  group's lengths (full: the greedy prefix of the length's best vectors), so the two methods compare.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .cellstate import cell_states
from .config import load_sweep_config
from .errors import UserError
from .store import SweepDir, read_failures, read_results, read_stages

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


@dataclass
class Report:
    capacity: pd.DataFrame
    cells: pd.DataFrame
    files: list[Path]


def _sweep(sweep) -> SweepDir:
    return sweep if isinstance(sweep, SweepDir) else SweepDir(sweep)


def load_results(sweep_dir) -> pd.DataFrame:
    return read_results(_sweep(sweep_dir)).to_pandas()


def load_capacity(sweep_dir) -> pd.DataFrame:
    """report/capacity.csv where `report` wrote it, else computed from the results (nothing written)."""
    path = _sweep(sweep_dir).report / "capacity.csv"
    return pd.read_csv(path) if path.is_file() else capacity_table(load_results(sweep_dir))


def max_tokens(group: pd.DataFrame) -> int:
    """The longest length whose mean accuracy is >= FIT (0 if none); `group` has `length` and `acc` columns."""
    mean_acc = group.groupby("length")["acc"].mean()
    fits = mean_acc.index[mean_acc >= FIT]
    return int(fits.max()) if len(fits) else 0


def _capacity_row(method: str, group: pd.DataFrame) -> dict:
    n_mem, hidden, vocab = (int(group[key].iloc[0]) for key in ("n_mem", "hidden", "vocab_size"))
    theoretical = n_mem * hidden * 16 / math.log2(vocab)
    longest = group.loc[group.groupby("sample")["horizon"].idxmax()]  # each sample's row of its longest horizon
    horizon = longest["horizon"]
    scored = longest if method == "progressive" else group[group["acc"] <= FIT]
    gain_mean = scored["gain_tokens"].mean()
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
        "utilization": (gain_mean if method == "full" else horizon.mean()) / theoretical,
    }


def capacity_table(results: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, dataset, n_mem, method) with the columns of report/capacity.csv."""
    keys = [*GROUP, "method"]
    rows = [{**dict(zip(keys, key)), **_capacity_row(key[-1], group)} for key, group in results.groupby(keys, sort=True)]
    return pd.DataFrame(rows, columns=CAPACITY_COLUMNS)


def summary_lines(capacity: pd.DataFrame) -> list[str]:
    """One line per capacity row that says what its headline number means."""
    lines = []
    for r in capacity.itertuples():
        label = _label(r.model, r.dataset, r.n_mem)
        if r.method == "full":
            fits = f"up to {r.max_tokens:.0f} tokens" if r.max_tokens else "no length of the grid (add shorter lengths or more steps)"
            lines.append(f"{label}: full cramming fits {fits}: the longest length whose mean teacher-forced accuracy is >= {FIT}")
        else:
            lines.append(
                f"{label}: progressive horizon {r.horizon_mean:.1f} tokens on average ({r.horizon_min:.0f}-{r.horizon_max:.0f}): "
                "the longest prefix the vectors reproduce exactly, greedy decoding included"
            )
    return lines


def cell_table(sweep) -> pd.DataFrame:
    """One row per cell of the grid in sweep.yaml (cellstate.cell_state); cells without finished samples have NaN means."""
    sweep = _sweep(sweep).require()
    cfg = load_sweep_config(sweep.config)
    states = cell_states(cfg, read_results(sweep), read_failures(sweep))
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


def _label(model, dataset, *rest) -> str:
    """`model / dataset`, then a method and `n_mem=K` where given (ints are n_mem)."""
    return " / ".join([model, dataset] + [f"n_mem={part}" if isinstance(part, (int, np.integer)) else str(part) for part in rest])


def _fmt(value, spec: str) -> str:
    return "–" if pd.isna(value) else format(value, spec)


def _pm(mean, std) -> str:
    return _fmt(mean, ".1f") if pd.isna(std) else f"{mean:.1f} ± {std:.1f}"


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(map(str, line)) + " |" for line in lines)


def _progress_note(cell_rows: pd.DataFrame, samples: int) -> str:
    done, failed, pending = (int(cell_rows[key].sum()) for key in ("done", "failed", "pending"))
    if failed + pending == 0:
        return f"All {done} samples done."
    total = len(cell_rows) * samples
    return f"**Partial sweep:** {done} of {total} samples done, {failed} failed, {pending} pending: means are over finished samples."


def _capacity_markdown(capacity: pd.DataFrame) -> str:
    header = [
        "model",
        "dataset",
        "n_mem",
        "method",
        "max tokens",
        "horizon [min–max]",
        "gain tokens",
        "info gain (bits)",
        "theoretical tokens",
        "utilization",
    ]
    rows = [
        [
            r.model,
            r.dataset,
            r.n_mem,
            r.method,
            _fmt(r.max_tokens, ".0f"),
            f"{_pm(r.horizon_mean, r.horizon_std)} [{_fmt(r.horizon_min, '.0f')}–{_fmt(r.horizon_max, '.0f')}]",
            _pm(r.gain_tokens_mean, r.gain_tokens_std),
            _pm(r.info_gain_bits_mean, r.info_gain_bits_std),
            _fmt(r.theoretical_tokens, ".1f"),
            _fmt(r.utilization * 100, ".1f") + ("" if pd.isna(r.utilization) else "%"),
        ]
        for r in capacity.itertuples()
    ]
    return _md_table(header, rows)


def _cells_markdown(cell_rows: pd.DataFrame) -> str:
    header = ["length", "done", "mean acc", "mean gain (tokens)", "greedy-exact share", "horizon mean (max)", "failed / pending"]
    parts = []
    for key, group in cell_rows.groupby(CELL_GROUP, sort=False):
        rows = [
            [
                r.length,
                r.done,
                _fmt(r.acc_mean, ".3f"),
                _fmt(r.gain_tokens_mean, ".1f"),
                _fmt(r.greedy_exact_share, ".2f"),
                f"{_fmt(r.horizon_mean, '.1f')} ({_fmt(r.horizon_max, '.0f')})",
                f"{r.failed} / {r.pending}",
            ]
            for r in group.itertuples()
        ]
        parts.append(f"### {_label(*key)}\n\n" + _md_table(header, rows))
    return "\n\n".join(parts)


def _markdown(name: str, capacity: pd.DataFrame, cell_rows: pd.DataFrame, samples: int) -> str:
    return f"""# Capacity report: {name}

{_progress_note(cell_rows, samples)}

## Capacity per model, dataset and n_mem

{_capacity_markdown(capacity)}

Horizon: per sample, the longest prefix its stored vectors reproduce exactly (greedy), the most over the
lengths; mean ± std over the samples [min–max]. Progressive: the longest converged stage.
Full: max tokens is the longest length whose mean accuracy is >= {FIT}; gain tokens and info gain are
mean ± std over the samples that did not fit (acc <= {FIT}) across all lengths (– where every sample fit);
utilization: mean gain / theoretical tokens.
Progressive: gain tokens and info gain are those of each sample's horizon prefix (tokens 1..horizon-1);
utilization: mean horizon / theoretical tokens.
Theoretical tokens: n_mem · hidden · 16 / log2(vocab size).

## Cells

{_cells_markdown(cell_rows)}
"""


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


def _plot_accuracy(cell_rows: pd.DataFrame, path: Path) -> Path:
    fig, ax = _axes(7, 4.5)
    finished = cell_rows[cell_rows["method"] == "full"].dropna(subset=["acc_mean"])
    groups = finished.groupby(CELL_GROUP)
    colours = _colours(groups.groups)
    for key, group in groups:
        ax.plot(group["length"], group["acc_mean"], marker="o", color=colours[key], label=_label(*key))
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


def _plot_ce(results: pd.DataFrame, path: Path) -> Path:
    fig, ax = _axes(6.5, 5)
    colours = _colours(zip(results["model"], results["n_mem"]))
    datasets, methods = sorted(results["dataset"].unique()), sorted(results["method"].unique())
    markers = dict(zip([(d, m) for d in datasets for m in methods], "osD^vP*X"))
    for (model, dataset, method, n_mem), group in results.groupby(CELL_GROUP):
        label = f"{model} / n_mem={n_mem}" + (f" / {dataset}" if len(datasets) > 1 else "") + (f" / {method}" if len(methods) > 1 else "")
        ax.scatter(
            group["ce_no_mem_bits"],
            group["ce_bits"],
            s=22,
            alpha=0.75,
            label=label,
            color=colours[(model, n_mem)],
            marker=markers.get((dataset, method), "o"),
        )
    top = float(np.nanmax(results[["ce_no_mem_bits", "ce_bits"]].to_numpy())) * 1.05
    ax.plot([0, top], [0, top], color="grey", linestyle="--", linewidth=1, label="y = x (no gain)")
    ax.set_xlim(-0.02 * top, top)
    ax.set_ylim(-0.02 * top, top)
    ax.set(
        xlabel="CE of the text without vectors (bits, summed)",
        ylabel="CE with the vectors (bits, summed)",
        title="Cross-entropy with vs without the vectors, per sample",
    )
    return _save(fig, ax, path)


def _plot_info_gain(capacity: pd.DataFrame, path: Path) -> Path:
    fig, ax = _axes(7, 4.5)
    groups = capacity.groupby(["model", "dataset"])
    colours = _colours(groups.groups)
    for key, group in groups:
        ax.errorbar(
            group["n_mem"],
            group["info_gain_bits_mean"],
            yerr=group["info_gain_bits_std"].fillna(0),
            marker="o",
            capsize=4,
            color=colours[key],
            label=_label(*key),
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


def _plot_horizon_vs_ce(results: pd.DataFrame, path: Path) -> Path:
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


def _plot_growth(stages: pd.DataFrame, path: Path) -> Path:
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


def build_report(sweep_dir) -> Report:
    """Write report/capacity.csv, report/capacity.md and the PNG plots of a sweep directory."""
    sweep = _sweep(sweep_dir).require()
    results = load_results(sweep)
    if results.empty:
        raise UserError(f"{sweep.path} has no finished samples yet: run `cram-sweep resume {sweep.path}` first")
    cfg = load_sweep_config(sweep.config)
    capacity = capacity_table(results)
    cell_rows = cell_table(sweep)
    out = sweep.report
    out.mkdir(parents=True, exist_ok=True)
    capacity.to_csv(out / "capacity.csv", index=False)
    (out / "capacity.md").write_text(_markdown(cfg.name, capacity, cell_rows, cfg.grid.samples))
    files = [out / "capacity.csv", out / "capacity.md"]
    methods = set(results["method"])
    if "full" in methods:
        files.append(_plot_accuracy(cell_rows, out / "accuracy_vs_length.png"))
    if "progressive" in methods:
        stages = read_stages(sweep).to_pandas()
        progressive = results[results["method"] == "progressive"]
        files += [_plot_horizon_vs_ce(progressive, out / "horizon_vs_ce.png"), _plot_growth(stages, out / "growth.png")]
    files += [_plot_ce(results, out / "ce_with_vs_without.png"), _plot_info_gain(capacity, out / "info_gain_vs_n_mem.png")]
    return Report(capacity=capacity, cells=cell_rows, files=files)
