"""The capacity report from a hand-built results store with known values."""

import math
import warnings
from collections import Counter
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from cram_sweep import cli
from cram_sweep.config import load_sweep_config
from cram_sweep.errors import UserError
from cram_sweep.report import build as report
from cram_sweep.report.build import build_report, cell_table, load_capacity
from cram_sweep.report.capacity import BITS_COLUMNS, CAPACITY_COLUMNS
from cram_sweep.results.columns import Cell
from cram_sweep.results.store import SweepDir, write_failures, write_results
from cram_sweep.tracking import tracker as tracking

from .helpers import failure_row, result_row

DIMS = {"m1": (8, 256), "m2": (4, 16)}  # model: (hidden, vocab_size); log2 vocab = 8 and 4


def make_sweep(tmp_path, models, lengths, n_mem, samples, rows=(), failures=()):
    sweep = SweepDir(tmp_path / "sweep")
    sweep.path.mkdir()
    grid = {"models": models, "datasets": ["pydoc"], "lengths": lengths, "n_mem": n_mem, "samples": samples}
    models = {name: {"source": "random", "architecture": "llama"} for name in models}
    OmegaConf.save(OmegaConf.create({"name": "demo", "grid": grid, "models": models, "datasets": {"pydoc": {}}}), sweep.config)
    assert load_sweep_config(sweep.config).grid.samples == samples
    write_results(sweep, list(rows))
    write_failures(sweep, list(failures))
    return sweep


def row(model, n_mem, length, sample, acc, gain=0.0, info=0.0):
    hidden, vocab = DIMS[model]
    return result_row(
        model,
        n_mem,
        length,
        sample,
        acc,
        hidden=hidden,
        vocab_size=vocab,
        seed=sample,
        ce_no_mem_bits=100.0 + info,
        info_gain_bits=info,
        gain_tokens=gain,
    )


def failure(model, n_mem, length, sample):
    return failure_row(Cell(model, "pydoc", n_mem, length).id, sample)


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000, path


def test_capacity_csv_matches_hand_computed_table(tmp_path):
    rows = [
        # m1, n_mem=1: L16 mean acc 0.995 fits; acc 0.99 counts as saturated (acc <= 0.99); L32 does not fit.
        row("m1", 1, 16, 0, 1.0),
        row("m1", 1, 16, 1, 0.99, gain=10, info=20),
        row("m1", 1, 32, 0, 0.5, gain=12, info=30),
        row("m1", 1, 32, 1, 0.7, gain=14, info=40),
        # m1, n_mem=2: every sample fits: no saturated sample, NaN gain.
        *(row("m1", 2, length, s, 1.0) for length in (16, 32) for s in (0, 1)),
        # m2, n_mem=1: nothing fits: max_tokens 0.
        row("m2", 1, 16, 0, 0.5, gain=4, info=1),
        row("m2", 1, 16, 1, 0.5, gain=6, info=2),
        row("m2", 1, 32, 0, 0.5, gain=8, info=3),
        row("m2", 1, 32, 1, 0.5, gain=10, info=4),
        # m2, n_mem=2: one saturated sample: std NaN (ddof=1).
        row("m2", 2, 16, 0, 1.0),
        row("m2", 2, 16, 1, 1.0),
        row("m2", 2, 32, 0, 1.0),
        row("m2", 2, 32, 1, 0.9, gain=20, info=50),
    ]
    sweep = make_sweep(tmp_path, ["m1", "m2"], [16, 32], [1, 2], 2, rows)
    report = build_report(sweep.path)

    nan = float("nan")
    per_group = [
        # horizon: per sample the longest over its lengths (result_row: the length where acc is 1.0, else 0)
        # param=direct trains the vectors' numbers: utilization_trained = utilization
        ["m1", "pydoc", 1, 0, "full", 16, 0, 8.0, math.sqrt(128), 0, 16, 12.0, 2.0, 30.0, 10.0, 16.0, 12 / 16, "direct", 8, 12 / 16],
        ["m1", "pydoc", 2, 0, "full", 32, 32, 32.0, 0.0, 32, 32, nan, nan, nan, nan, 32.0, nan, "direct", 16, nan],
        [
            "m2",
            "pydoc",
            1,
            0,
            "full",
            0,
            0,
            0.0,
            0.0,
            0,
            0,
            7.0,
            math.sqrt(20 / 3),
            2.5,
            math.sqrt(5 / 3),
            16.0,
            7 / 16,
            "direct",
            4,
            7 / 16,
        ],
        ["m2", "pydoc", 2, 0, "full", 16, 16, 24.0, math.sqrt(128), 16, 32, 20.0, nan, 50.0, nan, 32.0, 20 / 32, "direct", 8, 20 / 32],
    ]
    no_bits = [nan] * len(BITS_COLUMNS)  # no bits analysis in these rows: every bits column NaN
    expected = pd.DataFrame([values + no_bits for values in per_group], columns=CAPACITY_COLUMNS)
    csv = pd.read_csv(sweep.report / "capacity.csv")
    assert list(csv.columns) == CAPACITY_COLUMNS
    pd.testing.assert_frame_equal(csv, expected)
    pd.testing.assert_frame_equal(report.capacity, expected)
    pd.testing.assert_frame_equal(load_capacity(sweep.path), expected)

    names = {path.name for path in report.files}
    assert names == {"capacity.csv", "capacity.md", "accuracy_vs_length.png", "ce_with_vs_without.png", "info_gain_vs_n_mem.png"}
    for path in report.files:
        assert path.parent == sweep.report and path.is_file()
        if path.suffix == ".png":
            assert_png(path)
    md = (sweep.report / "capacity.md").read_text()
    assert "All 16 samples done." in md and "pending:" not in md
    assert "| m1 | pydoc | 1 | full | 16 (0) | 8.0 ± 11.3 [0–16] | 12.0 ± 2.0 | 30.0 ± 10.0 | 16.0 | 75.0% |" in md
    assert "| m1 | pydoc | 2 | full | 32 (32) | 32.0 ± 0.0 [32–32] | – | – | 32.0 | – |" in md


def test_partial_sweep_shows_failed_and_pending_cells(tmp_path):
    rows = [
        row("m1", 1, 16, 0, 1.0),
        row("m1", 1, 16, 1, 1.0),
        row("m1", 1, 16, 2, 0.99, gain=9, info=30),
        row("m1", 1, 32, 0, 0.6, gain=15, info=50),
    ]
    failures = [failure("m1", 1, 32, 1), failure("m1", 1, 16, 0)]  # L16 sample 0 failed once, then finished
    sweep = make_sweep(tmp_path, ["m1"], [16, 32, 64], [1], 3, rows, failures)

    cells = cell_table(sweep)
    assert cells["length"].tolist() == [16, 32, 64]
    assert cells["done"].tolist() == [3, 1, 0]
    assert cells["failed"].tolist() == [0, 1, 0]
    assert cells["pending"].tolist() == [0, 1, 3]
    assert cells.loc[0, "acc_mean"] == pytest.approx(2.99 / 3)
    assert cells.loc[0, "greedy_exact_share"] == pytest.approx(2 / 3)
    assert cells.loc[1, "gain_tokens_mean"] == 15.0
    assert np.isnan(cells.loc[2, "acc_mean"]) and np.isnan(cells.loc[2, "seconds_mean"])

    report = build_report(sweep)
    assert report.capacity[["max_tokens", "gain_tokens_mean", "gain_tokens_std"]].iloc[0].tolist() == [
        16,
        12.0,
        pytest.approx(math.sqrt(18)),
    ]
    md = (sweep.report / "capacity.md").read_text()
    assert "4 of 9 samples done, 1 failed, 4 pending: means are over finished samples" in md
    assert "| 32 | 1 | 0.600 | 15.0 | 0.00 | 0.0 (0) | 1 / 1 |" in md
    assert "| 64 | 0 | – | – | – | – (–) | 0 / 3 |" in md
    for name in ("accuracy_vs_length.png", "ce_with_vs_without.png", "info_gain_vs_n_mem.png"):
        assert_png(sweep.report / name)


def test_a_sweep_whose_every_horizon_is_zero_plots_without_warnings(tmp_path):
    """A progressive row at horizon 0 has no CE (its horizon prefix is empty): the CE plot's range must not collapse."""
    rows = [replace(row("m1", 1, 16, s, 0.0), method="progressive", ce_no_mem_bits=0.0, ce_bits=0.0) for s in range(2)]
    sweep = make_sweep(tmp_path, ["m1"], [16], [1], 2, rows)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_report(sweep)
    assert_png(sweep.report / "ce_with_vs_without.png")


def test_no_finished_samples_is_a_user_error(tmp_path):
    sweep = make_sweep(tmp_path, ["m1"], [16], [1], 2, failures=[failure("m1", 1, 16, 0)])
    with pytest.raises(UserError, match="no finished samples yet"):
        build_report(sweep.path)
    assert load_capacity(sweep.path).empty
    assert cell_table(sweep)[["done", "failed", "pending"]].iloc[0].tolist() == [0, 1, 1]


def test_load_capacity_computes_without_writing(tmp_path):
    sweep = make_sweep(tmp_path, ["m1"], [16], [1], 1, [row("m1", 1, 16, 0, 0.5, gain=3, info=7)])
    capacity = load_capacity(sweep.path)
    assert capacity[["max_tokens", "gain_tokens_mean", "utilization"]].iloc[0].tolist() == [0, 3.0, 3 / 16]
    assert not sweep.report.exists()


def test_a_report_run_reads_sweep_yaml_and_each_store_once(tmp_path, monkeypatch, capsys):
    rows = [row("m1", 1, 16, 0, 1.0), row("m1", 1, 32, 0, 0.5, gain=3, info=7)]
    sweep = make_sweep(tmp_path, ["m1"], [16, 32], [1], 2, rows, [failure("m1", 1, 32, 1)])
    reads = Counter()

    def counted(module, name):
        read = getattr(module, name)

        def counting(*args, **kwargs):
            reads[name] += 1
            return read(*args, **kwargs)

        monkeypatch.setattr(module, name, counting)

    for module, name in ((cli, "load_sweep_config"), (report, "load_sweep_config"), (report, "read_results"), (report, "read_failures")):
        counted(module, name)
    synced, logged = [], []

    class Sink:  # the tracker as publish_report uses it, without MLflow
        def __init__(self, cfg, sweep):
            pass

        def start(self):
            pass

        def record_cells(self, states):
            synced.extend(states)

        def flush(self, force=False):
            return True

        def report(self, written):
            logged.append(written)

    monkeypatch.setattr(tracking, "Tracker", Sink)
    assert cli.main(["report", str(sweep.path)]) == 0
    assert reads == {"load_sweep_config": 1, "read_results": 1, "read_failures": 1}
    assert [(cell.id, state["done"], state["failed"]) for cell, state in synced] == list(
        zip(logged[0].cells["cell"], logged[0].cells["done"], logged[0].cells["failed"])
    ), "MLflow is re-synced from the states the report shows"
    assert "# Capacity report: demo" in capsys.readouterr().out
