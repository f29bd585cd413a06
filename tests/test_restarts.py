"""Restarts (grid.restarts): seeds, work items, identity in the store and through kill -9 and resume, the report's
best-of-R, and bad input."""

import hashlib
import json
import math
import statistics
from collections import Counter

import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import pytest

from cram_sweep import cli
from cram_sweep.config import load_sweep_config
from cram_sweep.engine.cram import SampleSpec, cram
from cram_sweep.report.build import build_report
from cram_sweep.results.cellstate import STATE_COLUMNS, cell_state
from cram_sweep.results.columns import Cell
from cram_sweep.results.store import SweepDir, read_results, read_stages
from cram_sweep.sweep.grid import cells, derived_seed, sample_seed
from cram_sweep.sweep.items import work_items
from cram_sweep.tracking.curves import report_curves

from .helpers import TINY, TINY_PROGRESSIVE, assert_bit_identical, result_row, tiny_config
from .processes import kill_mid_sweep, run_cli
from .test_report import make_sweep


def test_restart_0_keeps_the_sample_seed_and_each_restart_has_its_own():
    cell = Cell("tiny_llama", "pydoc", 2, 8)
    digest = hashlib.sha256(f"0|{cell.text_id}|3".encode()).digest()
    first = int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)  # the seed of a sweep without restarts
    assert sample_seed(0, cell, 3) == sample_seed(0, cell, 3, 0) == first
    seeds = [sample_seed(0, cell, 3, r) for r in range(4)]
    assert seeds[1:] == [derived_seed(first, f"restart={r}") for r in (1, 2, 3)] and len(set(seeds)) == 4


def test_restarts_are_specs_of_the_work_items_like_samples():
    cfg = tiny_config("grid.restarts=3", "grid.samples=2", "grid.lengths=[4]")
    (cell,) = cells(cfg)
    tokens = {("tiny_llama", "pydoc"): {0: [1, 2, 3, 4], 1: [5, 6, 7, 8]}}
    done = {(cell.id, 0, 1), (cell.id, 1, 0)}
    specs = [spec for item in work_items(cfg, tokens, done) for spec in item.specs]
    assert [spec.key for spec in specs] == [(cell.id, 0, 0), (cell.id, 0, 2), (cell.id, 1, 1), (cell.id, 1, 2)]
    assert all(spec.init_seed == sample_seed(cfg.seed, cell, spec.sample, spec.restart) for spec in specs)


def test_a_cell_is_done_with_samples_times_restarts_rows():
    rows = [{"sample": s, "restart": r, **dict.fromkeys(STATE_COLUMNS, 1)} for s, r in ((0, 0), (0, 1), (1, 0))]
    state = cell_state(Cell("tiny_llama", "pydoc", 2, 8), 2 * 2, rows, failed=[(1, 1), (0, 1)])
    assert (state["done"], state["failed"], state["pending"]) == (3, 1, 0)


@pytest.mark.parametrize("value", ["0", "-1"])
def test_fewer_than_one_restart_is_one_line_and_exit_2(tmp_path, capsys, value):
    assert cli.main(["run", "name=bad", f"out_dir={tmp_path}", *TINY, f"grid.restarts={value}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: grid.restarts={value}: ") and err.count("\n") == 1


@pytest.mark.slow
def test_kill_mid_progressive_sweep_then_resume_leaves_every_sample_restart_and_stage_once(tmp_path, tiny_llama, one_thread, capsys):
    """kill -9 of the driver mid-sweep (progressive, 2 restarts), then resume: each (cell, sample, restart) stored
    exactly once with its stages once (a killed sample reran from its start), `status` counts samples x restarts, the
    same MLflow parent goes on, and a restart's row is a single run from that restart's seed, bit for bit."""
    args = ["run", "name=restarts", f"out_dir={tmp_path}", *TINY, *TINY_PROGRESSIVE, "grid.samples=2", "grid.restarts=2", "batch_size=1"]
    sweep = SweepDir(tmp_path / "restarts")
    kill_mid_sweep(args, sweep)
    before = read_results(sweep).num_rows
    assert 0 < before < 8, "the kill must land mid-sweep"
    parent = json.loads(sweep.tracking.read_text())["parent"]

    resumed = run_cli("resume", str(sweep.path), "report=true")
    assert f"{before} done, {8 - before} to run" in resumed.stdout
    assert f"MLflow parent run: {parent} " in resumed.stdout, "the same parent run goes on"
    raw = ds.dataset(sweep.results).to_table(columns=["cell", "sample", "restart"]).to_pylist()
    keys = [(r["cell"], r["sample"], r["restart"]) for r in raw]
    cfg = load_sweep_config(sweep.config)
    assert sorted(keys) == sorted((cell.id, s, r) for cell in cells(cfg) for s in range(2) for r in range(2)), "each exactly once"
    rows = read_results(sweep).to_pylist()
    stages = read_stages(sweep).to_pylist()
    counted = Counter((s["cell"], s["sample"], s["restart"]) for s in stages)
    assert {(r["cell"], r["sample"], r["restart"]): r["stages"] for r in rows} == counted and min(counted.values()) >= 1
    assert run_cli("status", str(sweep.path)).stdout.count("done    4  failed   0  pending    0") == 2
    assert (sweep.report / "restarts.csv").is_file()

    row = next(r for r in rows if r["restart"] == 1 and r["length"] == 8)
    cell = next(c for c in cells(cfg) if c.id == row["cell"])
    spec = SampleSpec(row["sample"], row["token_ids"], sample_seed(cfg.seed, cell, row["sample"], 1), cell.id, restart=1)
    options = dict(analysis=cfg.analysis, method=cfg.method, attention="eager", batch_size=1)  # as the worker ran it
    (alone,) = cram(tiny_llama.model, [spec], 2, cfg.optim, "fp32", **options)
    assert_bit_identical(row, alone)

    assert cli.main(["decode", str(sweep.path), "--cell", row["cell"], "--sample", str(row["sample"]), "--restart", "1"]) == 0
    assert f"sample {row['sample']} restart 1" in capsys.readouterr().out


def progressive_sweep(tmp_path, rows, restarts):
    sweep = make_sweep(tmp_path, ["m1"], [16], [1], 3, rows)
    text = sweep.config.read_text().replace("samples: 3", f"samples: 3\n  restarts: {restarts}")
    sweep.config.write_text(text + "method:\n  name: progressive\n  min_length: 2\n")
    assert load_sweep_config(sweep.config).grid.restarts == restarts
    return sweep


def test_best_of_r_is_recomputed_independently(tmp_path):
    """3 samples x 4 restarts of a progressive cell, seeded horizons and solutions: the report's restart columns are the
    per-sample best / worst / std / mean pairwise cosine, averaged over samples, and best of the first 1, 2, 4."""
    rng = np.random.default_rng(0)
    cell = Cell("m1", "pydoc", 1, 16, "progressive").id
    horizon = rng.integers(0, 17, size=(3, 4))
    memory = rng.normal(size=(3, 4, 8))
    rows = [
        result_row("m1", 1, 16, s, cell=cell, method="progressive", restart=r, horizon=int(horizon[s, r]), memory=memory[s, r].tolist())
        for s in range(3)
        for r in range(4)
    ]
    report = build_report(progressive_sweep(tmp_path, rows, 4).path)
    (row,) = report.restarts.to_dict("records")

    def mean(values):
        return sum(values) / len(values)

    def cosine(a, b):
        return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    h = horizon.tolist()
    stored = [[np.float32(x) for x in memory[s, r]] for s in range(3) for r in range(4)]  # the store keeps float32
    solved = [[r for r in range(4) if h[s][r] > 0] for s in range(3)]  # a progressive restart without a horizon kept its init
    pairs = [[cosine(stored[4 * s + i], stored[4 * s + j]) for i in rs for j in rs if i < j] for s, rs in enumerate(solved)]
    assert sum(1 for p in pairs if p) >= 2, "the seeded horizons leave pairs of solutions to compare"
    assert (row["metric"], row["samples"], row["restarts"]) == ("horizon", 3, 4)
    assert row["best_of_r"] == pytest.approx(mean([max(x) for x in h])) == row["best_of_4"]
    assert row["best_of_1"] == pytest.approx(mean([x[0] for x in h]))
    assert row["best_of_2"] == pytest.approx(mean([max(x[:2]) for x in h]))
    assert row["worst_of_r"] == pytest.approx(mean([min(x) for x in h]))
    assert row["restart_std"] == pytest.approx(mean([statistics.stdev(x) for x in h]))
    assert row["cosine_mean"] == pytest.approx(mean([mean(p) for p in pairs if p]), rel=1e-5)
    assert pd.read_csv(tmp_path / "sweep" / "report" / "restarts.csv")["best_of_2"].iloc[0] == pytest.approx(row["best_of_2"])
    assert report.capacity["horizon_mean"].iloc[0] == pytest.approx(horizon.mean()), "every run counts once in the capacity table"
    md = (tmp_path / "sweep" / "report" / "capacity.md").read_text()
    assert "## Restarts" in md and "| 3 × 4 | horizon |" in md and "All 12 samples done." in md
    curves = {(key, step): value for key, value, step in report_curves(report)}
    assert curves["best_of/m1/pydoc/progressive/n_mem_1/L_16", 2] == pytest.approx(row["best_of_2"])
    assert curves["best_of_r/m1/pydoc/progressive/n_mem_1", 16] == pytest.approx(row["best_of_r"])
