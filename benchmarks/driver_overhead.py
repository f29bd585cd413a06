"""Driver overhead per sample: what the sweep driver spends on each finished sample, without workers.

Synthetic rows (the shape of real ones: token ids, an n_mem x hidden memory) go through
`orchestrate.Sweep.accept` and `Sweep.flush` exactly as `Sweep.execute` sends them: the Parquet store
and MLflow (SQLite under a temporary out_dir by default, or `--tracking-uri http://...`). Each flush
stands for one `flush_seconds` interval in which `--rows-per-flush` samples finished, either
`grouped` (workers finish the samples of a few cells at a time: what work items give) or
`interleaved` (every row of an interval from a different cell: the worst case for MLflow).

    .venv/bin/python benchmarks/driver_overhead.py                      # 2000 cells x 20 samples
    .venv/bin/python benchmarks/driver_overhead.py --cells 200 --samples 10 --rows-per-flush 1 64

Also timed, once per sweep: store.compact, Tracker.finish (closing every cell's run), and the
re-sync `resume` / `report` do (Sweep.load_existing + a forced flush on a fresh Tracker).
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
import time
from pathlib import Path

from cram_sweep.config import compose_config, to_yaml
from cram_sweep.engine.bits import BitsColumns
from cram_sweep.engine.cram import SampleResult
from cram_sweep.results import store
from cram_sweep.sweep.grid import cells
from cram_sweep.sweep.orchestrate import Sweep
from cram_sweep.sweep.worker import Finished
from cram_sweep.tracking.tracker import Tracker


def config(out_dir: Path, name: str, n_cells: int, samples: int, tracking_uri: str):
    n_mem = [1, 2, 4, 8]
    lengths = list(range(16, 16 + max(1, n_cells // len(n_mem))))
    overrides = [
        f"name={name}",
        f"out_dir={out_dir}",
        "grid.models=[tiny_llama]",
        "grid.datasets=[pydoc]",
        f"grid.n_mem=[{','.join(map(str, n_mem))}]",
        f"grid.lengths=[{','.join(map(str, lengths))}]",
        f"grid.samples={samples}",
        "flush_seconds=0",
    ]
    if tracking_uri:
        overrides += ["tracking=server", f"tracking.uri={tracking_uri}"]
    return compose_config(overrides)


def synthetic_row(cell, sample: int, hidden: int, rng: random.Random) -> Finished:
    acc = rng.random()
    result = SampleResult(
        cell=cell.id,
        sample=sample,
        restart=0,
        token_ids=[rng.randrange(50000) for _ in range(cell.length)],
        acc_no_mem=acc / 4,
        acc=acc,
        ce_no_mem_bits=400 * rng.random(),
        ce_bits=100 * rng.random(),
        info_gain_bits=300 * rng.random(),
        gain_tokens=acc * cell.length,
        seconds=10 * rng.random(),
        steps=rng.randrange(5000),
        converged=acc > 0.99,
        greedy_prefix=rng.randrange(cell.length),
        greedy_exact=acc > 0.99,
        memory=[rng.gauss(0, 1) for _ in range(cell.n_mem * hidden)],
        method="full",
        predict_first=False,
        horizon=0,
        stages=1,
        fail_acc=acc,
        param="direct",
        trained_numbers=cell.n_mem * hidden,
        **vars(BitsColumns.off(cell.n_mem * hidden)),
    )
    return Finished(result, "fp32", hidden, 49152)


def run_scenario(root: Path, order: str, rows_per_flush: int, args) -> dict:
    cfg = config(root, f"{order}-{rows_per_flush}", args.cells, args.samples, args.tracking_uri)
    sweep = store.SweepDir(Path(cfg.out_dir) / cfg.name)
    sweep.path.mkdir(parents=True)
    sweep.config.write_text(to_yaml(cfg))
    tracker = Tracker(cfg, sweep)
    tracker.start()
    state = Sweep(cfg, sweep, tracker)
    grid = cells(cfg)
    if order == "grouped":
        work = [(cell, s) for cell in grid for s in range(cfg.grid.samples)]
    else:
        work = [(cell, s) for s in range(cfg.grid.samples) for cell in grid]
    work = work[: args.max_rows]
    rng = random.Random(0)
    rows = [(cell, synthetic_row(cell, s, args.hidden, rng)) for cell, s in work]

    t_accept = t_store = t_mlflow = t_create = 0.0
    tracker_flush, tracker_child = tracker.flush, tracker._child

    def timed_tracker_flush(force=False):
        nonlocal t_mlflow
        start = time.perf_counter()
        try:
            return tracker_flush(force)
        finally:
            t_mlflow += time.perf_counter() - start

    def timed_child(cell_id, tags):
        nonlocal t_create
        start = time.perf_counter()
        try:
            return tracker_child(cell_id, tags)
        finally:
            if time.perf_counter() - start > 1e-4:  # created the run (a dict lookup otherwise)
                t_create += time.perf_counter() - start

    tracker.flush, tracker._child = timed_tracker_flush, timed_child
    for i, (cell, finished) in enumerate(rows, 1):
        start = time.perf_counter()
        state.accept(cell, finished)
        t_accept += time.perf_counter() - start
        if i % rows_per_flush == 0 or i == len(rows):
            before = t_mlflow
            start = time.perf_counter()
            state.flush(force=True)
            t_store += time.perf_counter() - start - (t_mlflow - before)
    start = time.perf_counter()
    store.compact(sweep)
    t_compact = time.perf_counter() - start
    start = time.perf_counter()
    tracker.finish(True)
    t_finish = time.perf_counter() - start
    start = time.perf_counter()
    fresh = Tracker(cfg, sweep)
    fresh.start()
    Sweep(cfg, sweep, fresh).load_existing()
    fresh.flush(force=True)
    t_resync = time.perf_counter() - start
    n = len(rows)
    touched = len({cell.id for cell, _ in rows})
    per_sample = (t_accept + t_store + t_mlflow - t_create) / n
    per_cell = (t_create + t_finish) / touched
    full_rows, full_cells = len(grid) * cfg.grid.samples, len(grid)
    return {
        "order": order,
        "rows_per_flush": rows_per_flush,
        "rows": n,
        "cells": touched,
        "accept_us": 1e6 * t_accept / n,
        "store_ms": 1e3 * t_store / n,
        "log_ms": 1e3 * (t_mlflow - t_create) / n,
        "sample_ms": 1e3 * per_sample,
        "create_ms": 1e3 * t_create / touched,
        "finish_ms": 1e3 * t_finish / touched,
        "resync_ms": 1e3 * t_resync / touched,
        "compact_s_per_10k": 1e4 * t_compact / n,
        "full_s": full_rows * per_sample + full_cells * per_cell + full_rows * t_compact / n,
        "full_resync_s": full_cells * t_resync / touched,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=2000)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=2048, help="memory width per vector (576: SmolLM2-135M, 2048: Llama-3.2-1B)")
    parser.add_argument("--rows-per-flush", type=int, nargs="+", default=[1, 16, 256], help="samples finishing per flush_seconds interval")
    parser.add_argument("--orders", nargs="+", default=["grouped", "interleaved"], choices=["grouped", "interleaved"])
    parser.add_argument("--max-rows", type=int, default=4000, help="rows fed per scenario (per-sample costs are what is reported)")
    parser.add_argument("--tracking-uri", default="", help="an MLflow server (default: SQLite under a temporary out_dir)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="cram-driver-bench-"))
    print(f"{args.cells} cells x {args.samples} samples, memory {args.hidden} floats per vector, MLflow: {args.tracking_uri or 'SQLite'}")
    header = (
        f"{'order':<12}{'rows/flush':>11}{'rows':>6}{'cells':>6} |{'accept':>8}{'store':>7}{'mlflow':>8}{'total':>7} |"
        f"{'create':>8}{'finish':>8}{'resync':>8} |{'driver total':>13}{'resync':>8}"
    )
    units = f"{'':<35}|{'µs':>8}{'ms':>7}{'ms':>8}{'ms':>7} |{'ms':>8}{'ms':>8}{'ms':>8} |{'s':>13}{'s':>8}"
    print(header)
    print(units)
    print("-" * len(header))
    try:
        for order in args.orders:
            for rows_per_flush in args.rows_per_flush:
                r = run_scenario(root, order, rows_per_flush, args)
                print(
                    f"{r['order']:<12}{r['rows_per_flush']:>11}{r['rows']:>6}{r['cells']:>6} |{r['accept_us']:>8.0f}{r['store_ms']:>7.2f}"
                    f"{r['log_ms']:>8.2f}{r['sample_ms']:>7.2f} |{r['create_ms']:>8.1f}{r['finish_ms']:>8.1f}{r['resync_ms']:>8.1f} |"
                    f"{r['full_s']:>13.0f}{r['full_resync_s']:>8.0f}",
                    flush=True,
                )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(
        "per sample: accept (stats, queueing), store (Parquet part files), mlflow (one log_batch per cell changed in the interval); "
        "per cell, once: create (its MLflow run), finish (closing it), resync (what resume/report send); "
        f"driver total: all of it (and compact) for the whole {args.cells} x {args.samples} sweep; resync: `report` on it"
    )


if __name__ == "__main__":
    main()
