"""The report as MLflow metric histories: the papers' curves, drawn by MLflow's chart view and overlaid across sweeps."""

from __future__ import annotations

from ..report.capacity import curve_columns, growth_columns


def metric_key(*parts) -> str:
    """MLflow metric names allow letters, digits, '_', '-', '.', ' ', '/'."""
    return "/".join("".join(ch if ch.isalnum() or ch in "_-." else "_" for ch in str(p)) for p in parts)


def report_curves(report) -> list[tuple[str, float, int]]:
    """The report as metric histories, so MLflow draws the papers' curves and overlays sweeps:
    `acc_mean/<model>/<dataset>/<method>/n_mem_<k>` over the lengths (step = length), and each capacity column,
    e.g. `max_tokens/<model>/<dataset>/<method>` and `horizon_mean/...`, over the number of vectors (step = n_mem).
    With restarts: `best_of_r/...`, `worst_of_r/...` and `cosine_mean/.../n_mem_<k>` over the lengths, and best-of-r's
    growth `best_of/.../n_mem_<k>/L_<length>` over r (step = r)."""
    points = []
    for row in report.cells.to_dict("records"):
        points.append(
            (metric_key("acc_mean", row["model"], row["dataset"], row["method"], f"n_mem_{row['n_mem']}"), row["acc_mean"], row["length"])
        )
    for row in report.capacity.to_dict("records"):
        group = (row["model"], row["dataset"], row["method"])
        for key in curve_columns(row["method"]):
            points.append((metric_key(key, *group), row[key], row["n_mem"]))
    for row in report.restarts.to_dict("records"):
        curve = (row["model"], row["dataset"], row["method"], f"n_mem_{row['n_mem']}")
        points += [(metric_key(key, *curve), row[key], row["length"]) for key in ("best_of_r", "worst_of_r", "cosine_mean")]
        points += [(metric_key("best_of", *curve, f"L_{row['length']}"), row[key], r) for r, key in growth_columns(row).items()]
    return points
