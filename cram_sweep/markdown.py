"""The report's text: report/capacity.md and the summary lines `report` prints, from the capacity and cell tables.

A value that is NaN (a column the method does not define, a cell without finished samples) reads as "–";
the text states each definition of the capacity module with the same FIT.
"""

from __future__ import annotations

import pandas as pd

from .capacity import CELL_GROUP, FIT, label


def summary_lines(capacity: pd.DataFrame) -> list[str]:
    """One line per capacity row that says what its headline number means."""
    lines = []
    for r in capacity.itertuples():
        name = label(r.model, r.dataset, r.n_mem)
        if r.method == "full":
            fits = f"up to {r.max_tokens:.0f} tokens" if r.max_tokens else "no length of the grid (add shorter lengths or more steps)"
            lines.append(f"{name}: full cramming fits {fits}: the longest length whose mean teacher-forced accuracy is >= {FIT}")
        else:
            lines.append(
                f"{name}: progressive horizon {r.horizon_mean:.1f} tokens on average ({r.horizon_min:.0f}-{r.horizon_max:.0f}): "
                "the longest prefix the vectors reproduce exactly, greedy decoding included"
            )
    return lines


def _fmt(value, spec: str) -> str:
    return "–" if pd.isna(value) else format(value, spec)


def _pm(mean, std) -> str:
    return _fmt(mean, ".1f") if pd.isna(std) else f"{mean:.1f} ± {std:.1f}"


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
    return _fmt(share * 100, ".1f") + ("" if pd.isna(share) else "%")


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
        "param (trained numbers)",
        "utilization of trained",
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
            _percent(r.utilization),
            f"{r.param} ({r.trained_numbers})",
            _percent(r.utilization_trained),
        ]
        for r in capacity.itertuples()
    ]
    return md_table(header, rows)


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
        parts.append(f"### {label(*key)}\n\n" + md_table(header, rows))
    return "\n\n".join(parts)


def report_markdown(name: str, capacity: pd.DataFrame, cell_rows: pd.DataFrame, samples: int) -> str:
    """report/capacity.md of the sweep `name` of `samples` samples per cell."""
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
Theoretical tokens: n_mem · hidden · 16 / log2(vocab size): the vectors' numbers at 16 bits each, whatever was trained.
Utilization of trained: the same over the trained numbers per sample (param=lowdim: n_mem · k, plus (k + 1) · hidden
where the projection is trained) · 16 / log2(vocab size).

## Cells

{_cells_markdown(cell_rows)}
"""
