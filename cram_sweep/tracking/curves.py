"""The report as MLflow metric histories: the papers' curves, drawn by MLflow's chart view and overlaid across sweeps."""

from __future__ import annotations

from ..methods import method
from ..report.capacity import curve_columns, growth_columns


def metric_key(*parts) -> str:
    """MLflow metric names allow letters, digits, '_', '-', '.', ' ', '/'."""
    return "/".join("".join(ch if ch.isalnum() or ch in "_-." else "_" for ch in str(p)) for p in parts)


def report_curves(report) -> list[tuple[str, float, int]]:
    """The report as metric histories, so MLflow draws the papers' curves and overlays sweeps:
    `acc_mean/<model>/<dataset>/<method>/n_mem_<k>` over the lengths (step = length), and each capacity column,
    e.g. `max_tokens/<model>/<dataset>/<method>` and `horizon_mean/...`, over the number of vectors (step = n_mem).
    With restarts: `best_of_r/...`, `worst_of_r/...` and `cosine_mean/.../n_mem_<k>` over the lengths, and best-of-r's
    growth `best_of/.../n_mem_<k>/L_<length>` over r (step = r). With grid.layers, every key of a truncated model ends in
    `/layers_<d>`, and each method's headline capacity is `<headline>/<model>/<dataset>/<method>/n_mem_<k>/by_layers`
    over the layers kept (step = layers; all layers: the group's keys without the suffix, not on this curve)."""
    points = []
    for row in report.cells.to_dict("records"):
        curve = (row["model"], row["dataset"], row["method"], f"n_mem_{row['n_mem']}", *_depth(row))
        points.append((metric_key("acc_mean", *curve), row["acc_mean"], row["length"]))
    for row in report.capacity.to_dict("records"):
        group = (row["model"], row["dataset"], row["method"])
        for key in curve_columns(row["method"]):
            points.append((metric_key(key, *group, *_depth(row)), row[key], row["n_mem"]))
        if row["layers"]:
            headline = method(row["method"]).headline
            points.append((metric_key(headline, *group, f"n_mem_{row['n_mem']}", "by_layers"), row[headline], row["layers"]))
    for row in report.restarts.to_dict("records"):
        curve = (row["model"], row["dataset"], row["method"], f"n_mem_{row['n_mem']}", *_depth(row))
        points += [(metric_key(key, *curve), row[key], row["length"]) for key in ("best_of_r", "worst_of_r", "cosine_mean")]
        points += [(metric_key("best_of", *curve, f"L_{row['length']}"), row[key], r) for r, key in growth_columns(row).items()]
    return points


def _depth(row) -> tuple[str, ...]:
    """The key part of a truncated model's rows (grid.layers); none for all layers, as before the axis."""
    return (f"layers_{row['layers']}",) if row["layers"] else ()
