"""The driver: expand the grid into work items, hand them to the worker pool, store and track what comes back.

Only this driver writes the Parquet store and talks to MLflow; workers (worker.py, placed by
cluster.py, fed by pool.py) compute and stream back one result per finished sample.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import defaultdict
from dataclasses import replace
from typing import Optional

import ray

from ..config import SweepConfig
from ..engine.layout import batch_rows
from ..engine.model import slow_bf16_warning
from ..errors import UserError, one_line
from ..methods import method
from ..results import store
from ..results.cellstate import STATE_COLUMNS, by_cell, cell_state, runs_per_cell
from ..results.columns import Cell, CellColumns, FailureRow, ResultRow, StageRow
from ..results.init_from import Starts
from ..tracking.tracker import Tracker
from . import interrupt
from .cluster import Scaler
from .events import Beat, Grew, Lost, Retired, Row, Stalled, Stranded
from .grid import cells, method_settings, rows_per_length
from .items import work_items
from .pool import WorkerPool
from .progress import Progress, WorkerLines
from .ray_session import connect_ray
from .worker import Finished, WorkItem

log = logging.getLogger("cram_sweep")
# Rows held before a flush is due whatever flush_seconds says: bounds the driver's memory (a row carries its vectors)
# and the rows a crash can lose. A constant, not a config key: flush_seconds is the user's knob, this only a cap.
STORE_FLUSH_ROWS = 512


class Sweep:
    """One execution of a sweep's pending samples; the Parquet store is the source of truth."""

    def __init__(self, cfg: SweepConfig, sweep: store.SweepDir, tracker: Tracker):
        self.cfg = cfg
        self.sweep = sweep
        self.tracker = tracker
        self.done_rows: dict[str, list] = defaultdict(list)  # per cell: its stored rows' STATE_COLUMNS
        self.failed_samples: dict[str, set] = defaultdict(set)  # per cell: (sample, restart) runs with a failed attempt
        self.cells = {cell.id: cell for cell in cells(cfg)}
        self.rows: list[ResultRow] = []
        self.stage_rows: list[StageRow] = []
        self.failures: list[FailureRow] = []
        self.attempts: dict[tuple[str, int, int], int] = defaultdict(int)  # by (cell, sample, restart)
        self.failed: dict[tuple[str, int, int], str] = {}  # failed for good in this execution
        self.last_store_flush = time.monotonic()

    def load_existing(self) -> set:
        """What the store already holds: its (cell, sample, restart) keys; every cell with stored samples or failures is
        queued for MLflow, which re-syncs it after outages."""
        results, failures = store.read_results(self.sweep, STATE_COLUMNS), store.read_failures(self.sweep)
        done, failed = by_cell(results, failures)
        self.done_rows.update(done)
        self.failed_samples.update(failed)
        self.tracker.record_cells((cell, self._state(cell)) for cell in cells(self.cfg))
        return set(zip(*(results[key].to_pylist() for key in store.IDENTITY)))

    def _track(self, cell: Cell) -> None:
        self.tracker.record(cell, self._state(cell))

    def _state(self, cell: Cell) -> dict:
        return cell_state(cell, runs_per_cell(self.cfg), self.done_rows.get(cell.id, []), self.failed_samples.get(cell.id, ()))

    def accept(self, finished: Finished) -> None:
        result = finished.result
        cell = self.cells[result.cell]
        if result.error:
            self.fail(cell, result.sample, result.restart, result.error, final=True)
            return
        columns = CellColumns(
            cell=cell.id,
            model=cell.model,
            dataset=cell.dataset,
            precision=finished.precision,
            length=cell.length,
            n_mem=cell.n_mem,
            seed=self.cfg.seed,
            hidden=finished.hidden,
            vocab_size=finished.vocab_size,
            layers=cell.layers,
        )
        row = ResultRow.of(columns, result)
        self.rows.append(row)
        self.stage_rows += [StageRow.of(cell.id, result.sample, result.restart, record) for record in result.stage_records]
        self.done_rows[cell.id].append({"sample": row.sample, "restart": row.restart, **{key: getattr(row, key) for key in STATE_COLUMNS}})
        self._track(cell)

    def fail(self, cell: Cell, sample: int, restart: int, error: str, final: bool) -> None:
        key = (cell.id, sample, restart)
        self.attempts[key] += 1
        self.failures.append(
            FailureRow(cell=cell.id, sample=sample, restart=restart, attempt=self.attempts[key], error=error[:2000], time=time.time())
        )
        if final:
            self.failed[key] = error
            self.failed_samples[cell.id].add((sample, restart))
            self._track(cell)

    def flush(self, force: bool = False) -> None:
        """Rows to the store (each list cleared once it is safely written), then metrics to MLflow."""
        due = force or len(self.rows) >= STORE_FLUSH_ROWS or time.monotonic() - self.last_store_flush > self.cfg.flush_seconds
        if due:
            if self.rows:
                store.write_stages(self.sweep, self.stage_rows)  # before their results: see store.read_stages
                self.stage_rows = []
                store.write_results(self.sweep, self.rows)
                self.rows = []
            if self.failures:
                store.write_failures(self.sweep, self.failures)
                self.failures = []
            self.last_store_flush = time.monotonic()
        self.tracker.flush(force)

    def execute(self, pool: WorkerPool, progress: Progress) -> None:
        """Take the pool's events until no work is left: store rows, show progress and the workers, retry what was lost."""
        workers = WorkerLines(self.cfg.cluster.kind == "ray" and not self.cfg.worker.count)
        while pool.has_work():
            interrupt.check()
            for event in pool.get_next(timeout=1.0):
                if isinstance(event, Row):
                    result = event.finished.result
                    self.accept(event.finished)
                    workers.row(event.node)
                    progress.sample_done(result.cell, len(self.failed), method(result.method).progress(result))
                elif isinstance(event, Beat):
                    beat = event.heartbeat
                    progress.heartbeat(event.item.label, beat.live, beat.steps, len(self.failed), beat.stage_length, beat.compile_seconds)
                elif isinstance(event, Lost):
                    for item in self.retry(event):
                        pool.submit(item)
                elif isinstance(event, Grew):
                    workers.grew(event)
                elif isinstance(event, Retired):
                    workers.retired(event)
                elif isinstance(event, Stranded):
                    for item in event.items:
                        self.give_up(item, "no Ray worker is left to run it (every worker died and could not be restarted)")
            self.flush()

    def retry(self, lost: Lost) -> list[WorkItem]:
        """Record one failed attempt for each sample of a lost call that counts as run (`lost.ran`: those that may
        have been in the engine's batch); the samples that never started are charged nothing. Requeue, in the
        item's order, every sample with tries left."""
        item, err = lost.item, lost.error
        cause = getattr(err, "cause", None)
        if isinstance(cause, UserError):
            raise UserError(str(cause))
        if not isinstance(cause, BaseException):
            cause = None
        message = f"{type(cause or err).__name__}: {one_line(cause or err)[-500:]}"
        failed = set()
        for spec in lost.ran:
            final = self.attempts[spec.key] + 1 > self.cfg.worker.max_retries
            self.fail(self.cells[spec.cell], spec.sample, spec.restart, message, final)
            if final:
                failed.add(spec.key)
        retry = [spec for spec in item.specs if spec.key not in failed]
        batch_size = item.batch_size
        current = item.batch_size or self.cfg.batch_size
        if isinstance(current, int):  # the rows the worker ran (layout.batch_rows)
            current = batch_rows(current, rows_per_length(self.cfg), self.cfg.batch_invariant)
        if isinstance(err, ray.exceptions.OutOfMemoryError) and isinstance(current, int) and current > 1:
            batch_size = current // 2  # Ray's memory monitor killed the worker: a smaller batch (forward_rows records it)
        what = f"stalled ({err})" if isinstance(err, Stalled) else f"failed ({type(err).__name__})"
        log.warning(
            "work item of %s %s on node %s: retrying %d samples (%d had started: an attempt each; %d had not), %d recorded failed",
            item.label,
            what,
            lost.node[:8] or "?",
            len(retry),
            lost.started,
            len(item.specs) - lost.started,
            len(failed),
        )
        return [replace(item, specs=retry, batch_size=batch_size)] if retry else []

    def give_up(self, item: WorkItem, reason: str) -> None:
        for spec in item.specs:
            self.fail(self.cells[spec.cell], spec.sample, spec.restart, reason, final=True)


def execute_on_cluster(cfg: SweepConfig, state: Sweep, items: list[WorkItem], pending: int) -> None:
    """Run the items on workers that follow the cluster; the autoscaler request is released however this ends."""
    scaler = Scaler(cfg)
    try:
        scaler.wait_for_capacity(len(items))
        pool = WorkerPool(scaler, cfg.worker.stall_seconds)
        for item in items:
            pool.submit(item)
        max_steps = max(settings.optim.max_steps for settings in method_settings(cfg).values())
        progress = Progress(pending, max_steps, cfg.progress_line_seconds)
        try:
            state.execute(pool, progress)
        finally:
            progress.close()
    finally:
        scaler.request(0)


def run_sweep(cfg: SweepConfig, sweep: store.SweepDir, tokens, starts: Optional[Starts] = None) -> int:
    """Run every missing sample of the sweep; returns the exit code (0: all done, 1: some failed)."""
    tracker = Tracker(cfg, sweep)
    run_id = tracker.start()
    print(f"sweep directory: {sweep.path}\nMLflow parent run: {run_id} ({tracker.shown_uri})", flush=True)
    state = Sweep(cfg, sweep, tracker)
    done = state.load_existing()
    items = work_items(cfg, tokens, done, starts)
    pending = sum(len(item.specs) for item in items)
    total = len(state.cells) * runs_per_cell(cfg)
    restarts = f" ({cfg.grid.samples} samples x {cfg.grid.restarts} restarts per cell)" if cfg.grid.restarts > 1 else ""
    print(f"{total} samples in {len(state.cells)} cells{restarts}: {total - pending} done, {pending} to run", flush=True)
    warning = slow_bf16_warning(cfg.precision, cfg.device) if cfg.cluster.kind == "local" else None
    if warning and items:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    ok = False
    try:
        if items:
            connect_ray(cfg)
            execute_on_cluster(cfg, state, items, pending)
        ok = not state.failed
    finally:
        try:  # a store error here (disk still full) replaces one in flight: same message, same exit code
            state.flush(force=True)
            store.compact(sweep)
        finally:
            tracker.finish(ok)
    return 0 if ok else 1
