"""The capacity report of a sweep: report/capacity.csv, report/capacity.md and the PNG plots, from its stores.

This module alone reads the sweep directory; what it computes is defined in `capacity` (the capacity and cell
tables, pure), `markdown` (the text) and `plots`. One report run reads sweep.yaml and each store once: `SweepRecords`
holds what was read, and `cli.publish_report` re-syncs MLflow from the same records. Nothing here talks to MLflow.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pandas as pd
import pyarrow as pa

from ..config import SweepConfig, load_sweep_config
from ..errors import UserError
from ..methods import method
from ..results.cellstate import cell_states, runs_per_cell
from ..results.columns import Cell
from ..results.store import SweepDir, read_failures, read_results
from .capacity import analysed_rows, capacity_table, cell_frame, restart_table
from .markdown import report_markdown


@dataclass
class Report:
    """What build_report wrote: the capacity table (capacity.csv), the cell table, the restart table (restarts.csv,
    empty without restarts), and the files in the order written."""

    capacity: pd.DataFrame
    cells: pd.DataFrame
    restarts: pd.DataFrame
    files: list[Path]


@dataclass(frozen=True)
class SweepRecords:
    """A sweep as one report run reads it, each file once: its config, its results store and every cell's state
    (cellstate.cell_states of the results and failures stores, in grid order)."""

    cfg: SweepConfig
    results: pa.Table
    states: list[tuple[Cell, dict[str, float]]]

    @classmethod
    def read(cls, sweep_dir, cfg: Optional[SweepConfig] = None) -> SweepRecords:
        """`cfg`: the sweep's config as the caller holds it (real URIs, runtime overrides); None reads sweep.yaml."""
        sweep = _sweep(sweep_dir).require()
        cfg = cfg or load_sweep_config(sweep.config)
        results = read_results(sweep)
        return cls(cfg=cfg, results=results, states=cell_states(cfg, results, read_failures(sweep)))


def _sweep(sweep) -> SweepDir:
    return sweep if isinstance(sweep, SweepDir) else SweepDir(sweep)


def load_results(sweep_dir) -> pd.DataFrame:
    return read_results(_sweep(sweep_dir)).to_pandas()


def load_capacity(sweep_dir) -> pd.DataFrame:
    """report/capacity.csv where `report` wrote it, else computed from the results (nothing written)."""
    path = _sweep(sweep_dir).report / "capacity.csv"
    return pd.read_csv(path) if path.is_file() else capacity_table(load_results(sweep_dir))


def cell_table(sweep_dir) -> pd.DataFrame:
    """One row per cell of the grid in sweep.yaml (capacity.cell_frame); cells without finished samples have NaN means."""
    return cell_frame(SweepRecords.read(sweep_dir).states)


def build_report(sweep_dir, records: Optional[SweepRecords] = None) -> Report:
    """Write report/capacity.csv, report/capacity.md and the PNG plots of a sweep directory; `records` as
    SweepRecords.read gives them (None reads them here)."""
    sweep = _sweep(sweep_dir).require()
    records = records or SweepRecords.read(sweep)
    results = records.results.to_pandas()
    if results.empty:
        raise UserError(f"{sweep.path} has no finished samples yet: run `cram-sweep resume {sweep.path}` first")
    capacity = capacity_table(results)
    cell_rows = cell_frame(records.states)
    restarts = restart_table(results, records.cfg.grid.restarts)
    out = sweep.report
    out.mkdir(parents=True, exist_ok=True)
    capacity.to_csv(out / "capacity.csv", index=False)
    files = [out / "capacity.csv"]
    if len(restarts):
        restarts.to_csv(out / "restarts.csv", index=False)
        files.append(out / "restarts.csv")
    (out / "capacity.md").write_text(report_markdown(records.cfg.name, capacity, cell_rows, runs_per_cell(records.cfg), restarts))
    files.append(out / "capacity.md")
    from . import plots  # matplotlib: paid by a report only, not by `status` or the driver's end-of-sweep table

    accuracy = cell_rows[[method(name).has_mean_accuracy for name in cell_rows["method"]]]
    if len(accuracy.dropna(subset=["acc_mean"])):
        files.append(plots.plot_accuracy(accuracy, out / "accuracy_vs_length.png"))
    for name in sorted(set(results["method"])):
        files += method(name).plots(results, cell_rows, sweep, out)
    if capacity["layers"].nunique() > 1:
        files.append(plots.plot_capacity_vs_layers(capacity, out / "capacity_vs_layers.png"))
    files += [plots.plot_ce(results, out / "ce_with_vs_without.png"), plots.plot_info_gain(capacity, out / "info_gain_vs_n_mem.png")]
    analysed = analysed_rows(results)
    if len(analysed):
        files += [
            plots.plot_horizon_vs_bits(analysed, out / "horizon_vs_bits.png"),
            plots.plot_bits_needed(analysed, out / "bits_needed.png"),
        ]
    return Report(capacity=capacity, cells=cell_rows, restarts=restarts, files=files)
