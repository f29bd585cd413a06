"""The report's text: report/capacity.md and the summary lines `report` prints, from the capacity, cell and restart tables.

A value that is NaN (a column the method does not define, a cell without finished samples) reads as "–";
the text states each method's definitions (methods/: `Method.definition`).
"""

from __future__ import annotations

import pandas as pd

from ..engine.roundings import FULL_WIDTH
from ..methods import method
from .capacity import CELL_GROUP, depth_name, depths, growth_columns, key_label, label


def summary_lines(capacity: pd.DataFrame) -> list[str]:
    """One line per capacity row that says what its headline number means."""
    lines = []
    for r in capacity.itertuples():
        name = label(r.model, r.dataset, n_mem=r.n_mem, layers=r.layers)
        lines.append(method(r.method).summary_line(name, r))
        if not pd.isna(r.bits_needed_mean):
            kept = "horizon" if method(r.method).restart_metric == "horizon" else "accuracy"
            lines.append(
                f"{name} ({r.method}): the vectors keep their {kept} at {r.bits_needed_mean:.1f} bits per number on average "
                f"({r.bits_needed_min:.0f}-{r.bits_needed_max:.0f}): utilization {_percent(r.utilization_at_bits)} of the capacity at "
                f"those bits, {_percent(r.utilization)} at 16"
            )
    return lines


def fmt_value(value, spec: str) -> str:
    return "–" if pd.isna(value) else format(value, spec)


def _pm(mean, std) -> str:
    return fmt_value(mean, ".1f") if pd.isna(std) else f"{mean:.1f} ± {std:.1f}"


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(map(str, line)) + " |" for line in lines)


def _progress_note(cell_rows: pd.DataFrame, samples: int) -> str:
    done, failed, pending = (int(cell_rows[key].sum()) for key in ("done", "failed", "pending"))
    if failed + pending == 0:
        return f"All {done} samples done."
    total = len(cell_rows) * samples
    return f"**Partial sweep:** {done} of {total} samples done, {failed} failed, {pending} pending: means are over finished samples."


def _percent(share) -> str:
    return fmt_value(share * 100, ".1f") + ("" if pd.isna(share) else "%")


def _capacity_markdown(capacity: pd.DataFrame) -> str:
    header = [
        "model",
        "dataset",
        "n_mem",
        "method",
        "max tokens (all exact)",
        "horizon [min–max]",
        "gain tokens",
        "info gain (bits)",
        "theoretical tokens",
        "utilization",
        "param (trained numbers)",
        "utilization of trained",
    ]
    rows = [
        [
            r.model,
            r.dataset,
            _n_mem(r),
            r.method,
            f"{fmt_value(r.max_tokens, '.0f')} ({fmt_value(r.max_tokens_exact, '.0f')})",
            f"{_pm(r.horizon_mean, r.horizon_std)} [{fmt_value(r.horizon_min, '.0f')}–{fmt_value(r.horizon_max, '.0f')}]",
            _pm(r.gain_tokens_mean, r.gain_tokens_std),
            _pm(r.info_gain_bits_mean, r.info_gain_bits_std),
            fmt_value(r.theoretical_tokens, ".1f"),
            _percent(r.utilization),
            f"{r.param} ({r.trained_numbers})",
            _percent(r.utilization_trained),
        ]
        for r in capacity.itertuples()
    ]
    return md_table(header, rows)


def _bits_markdown(capacity: pd.DataFrame) -> str:
    header = [
        "model",
        "dataset",
        "n_mem",
        "method",
        "param",
        "bits needed [min–max]",
        "info gain per stored bit",
        "theoretical tokens at 16 bits",
        "at the measured bits",
        "utilization at 16 bits",
        "at the measured bits",
    ]
    rows = [
        [
            r.model,
            r.dataset,
            _n_mem(r),
            r.method,
            r.param,
            f"{_pm(r.bits_needed_mean, r.bits_needed_std)} [{fmt_value(r.bits_needed_min, '.0f')}–{fmt_value(r.bits_needed_max, '.0f')}]",
            fmt_value(r.info_gain_per_stored_bit, ".4f"),
            fmt_value(r.theoretical_tokens, ".1f"),
            fmt_value(r.theoretical_tokens_at_bits, ".1f"),
            _percent(r.utilization),
            _percent(r.utilization_at_bits),
        ]
        for r in capacity.itertuples()
        if not pd.isna(r.bits_needed_mean)
    ]
    return f"""## Bits used per number of the vectors

{md_table(header, rows)}

Each sample's stored vectors re-scored, without further optimization, rounded to bf16 and to uniform k-bit per vector
(symmetric, one scale per vector: its largest |x|), from k high to low: bits needed is the width of the last rounding
that keeps the sample's horizon (progressive) or accuracy (full) before the first that loses it ({FULL_WIDTH}: even bf16
loses it); fp8 e4m3 is recorded but not in that scan. Over the rows the gain is averaged over. Info gain per stored bit:
info gain / (n_mem · hidden · bits needed). The measured-bits columns recompute the theoretical capacity with
the mean bits needed instead of 16.
"""


def _n_mem(r) -> str:
    """A capacity row's n_mem, with the layers its model kept where grid.layers cut it."""
    return f"{r.n_mem} ({r.layers} layers)" if r.layers else str(r.n_mem)


def _layers_markdown(capacity: pd.DataFrame) -> str:
    order = depths(capacity)
    header = ["model", "dataset", "method", "n_mem", "capacity", *(f"{depth_name(d)} layers" for d in order)]
    rows = []
    for (model, dataset, name, n_mem), group in capacity.groupby(["model", "dataset", "method", "n_mem"], sort=True):
        headline = method(name).headline
        by_depth = dict(zip(group["layers"], group[headline]))
        rows.append([model, dataset, name, n_mem, headline, *(fmt_value(by_depth.get(d, float("nan")), ".1f") for d in order)])
    return f"""## Capacity against layers

{md_table(header, rows)}

The model cut to its first d decoder layers, then its final norm and head (`grid.layers`; all: the whole model); each
method's headline capacity (full and one-step: max tokens; progressive: the mean horizon).
"""


def _restarts_markdown(restarts: pd.DataFrame) -> str:
    growth = growth_columns(restarts.columns)
    header = ["cell", "samples × restarts", "metric", "best of R", "worst of R", "std across restarts", "mean pairwise cosine"]
    header += [f"best of {r}" for r in growth]
    rows = [
        [
            f"{label(r['model'], r['dataset'], r['method'], r['n_mem'], r['layers'])} / L={r['length']}",
            f"{r['samples']} × {r['restarts']}",
            r["metric"],
            *(fmt_value(r[key], ".3f" if r["metric"] == "acc" else ".1f") for key in ("best_of_r", "worst_of_r", "restart_std")),
            fmt_value(r["cosine_mean"], ".3f"),
            *(fmt_value(r[c], ".3f" if r["metric"] == "acc" else ".1f") for c in growth.values()),
        ]
        for r in restarts.to_dict("records")
    ]
    return f"""## Restarts

{md_table(header, rows)}

Each sample optimized R times from R initializations. Per sample over its restarts, then the mean over samples: best
of R (the capacity estimate with less optimization luck), worst of R, the std across restarts, and the mean cosine
similarity of every pair of its solutions (the n_mem × hidden vectors flattened; progressive: the restarts with a
horizon, the others' vectors are their init). Best of r: the best of its first r restarts (best of 1: the single
run a sweep without restarts makes).
"""


def _cells_markdown(cell_rows: pd.DataFrame) -> str:
    header = ["length", "done", "mean acc", "mean gain (tokens)", "greedy-exact share", "horizon mean (max)", "failed / pending"]
    parts = []
    for key, group in cell_rows.groupby(CELL_GROUP, sort=False):
        rows = [
            [
                r.length,
                r.done,
                fmt_value(r.acc_mean, ".3f"),
                fmt_value(r.gain_tokens_mean, ".1f"),
                fmt_value(r.greedy_exact_share, ".2f"),
                f"{fmt_value(r.horizon_mean, '.1f')} ({fmt_value(r.horizon_max, '.0f')})",
                f"{r.failed} / {r.pending}",
            ]
            for r in group.itertuples()
        ]
        parts.append(f"### {key_label(CELL_GROUP, key)}\n\n" + md_table(header, rows))
    return "\n\n".join(parts)


def report_markdown(name: str, capacity: pd.DataFrame, cell_rows: pd.DataFrame, samples: int, restarts: pd.DataFrame) -> str:
    """report/capacity.md of the sweep `name` of `samples` (sample, restart) runs per cell; `restarts`: capacity.restart_table
    (its section only where the sweep has restarts), the bits section only where the analysis ran."""
    sections = "".join(
        f"\n{text}"
        for text, shown in (
            (_layers_markdown(capacity), capacity["layers"].nunique() > 1),
            (_bits_markdown(capacity), capacity["bits_needed_mean"].notna().any()),
            (_restarts_markdown(restarts), len(restarts)),
        )
        if shown
    )
    return f"""# Capacity report: {name}

{_progress_note(cell_rows, samples)}

## Capacity per model, dataset and n_mem

{_capacity_markdown(capacity)}

Horizon: per sample, the longest prefix its stored vectors reproduce exactly (greedy), the most over the
lengths; mean ± std over the samples [min–max].
{"".join(method(name).definition for name in sorted(set(capacity["method"])))}Theoretical tokens: n_mem · hidden · 16 / log2(vocab size): the vectors' numbers at 16 bits each, whatever was trained.
Utilization of trained: the same over the trained numbers per sample (param=lowdim: n_mem · k, plus (k + 1) · hidden
where the projection is trained) · 16 / log2(vocab size).
{sections}
## Cells

{_cells_markdown(cell_rows)}
"""
