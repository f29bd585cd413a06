"""MLflow: one parent run per sweep, one child run per cell. Only the driver talks to MLflow, through `Tracker`:
`start`, `record` (and `record_cells`), `flush`, `report`, `finish`.

The Parquet store is the source of truth: when MLflow fails mid-sweep the failure is logged, the sweep goes on, and
the next flush (or `resume` / `report`) re-syncs every cell from the store (connection.py: the fast failure and the
back-off; runs.py: the runs and their ids; curves.py: the report as metric histories).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Optional

from ..config import SweepConfig
from ..errors import UserError
from ..redact import redact
from ..results.columns import Cell
from ..results.store import SweepDir
from .connection import (
    HTTP_BACKOFF_FACTOR,
    HTTP_RETRIES,
    HTTP_TIMEOUT,
    MAX_BACKOFF_SECONDS,
    Backoff,
    fast_fail,
    start_error,
    tracking_uri,
    why,
)
from .curves import report_curves
from .runs import RunIds, open_parent

log = logging.getLogger("cram_sweep")


class Tracker:
    """The sweep's MLflow runs; their ids (`RunIds`) live in SWEEP_DIR/tracking.json so `resume` reuses them.

    `uri` is the real tracking URI, for the client only; `shown_uri` (its secret masked) is what is printed or stored."""

    def __init__(self, cfg: SweepConfig, sweep: SweepDir):
        self.cfg = cfg
        self.sweep = sweep
        self.uri = tracking_uri(cfg, sweep)
        self.shown_uri = redact(self.uri)
        self.client = None
        self.ids: Optional[RunIds] = None
        self.pending: dict[str, tuple[dict[str, float], dict[str, str]]] = {}
        self.backoff = Backoff(interval=cfg.flush_seconds)

    def start(self) -> str:
        """Connect (one clear error if the server is down), then create or reuse the parent run."""
        import mlflow
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", HTTP_RETRIES)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", HTTP_BACKOFF_FACTOR)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", HTTP_TIMEOUT)
        if self.shown_uri != self.uri:  # MLflow prints "View run ... at: URI" links, secret included, when a run ends
            os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
        self.client = MlflowClient(tracking_uri=self.uri)
        mlflow.set_tracking_uri(self.uri)
        try:
            experiment = self.client.get_experiment_by_name(self.cfg.tracking.experiment)
        except Exception as err:
            raise UserError(start_error(self.shown_uri, err)) from None
        try:
            self.ids = open_parent(self.client, experiment, self.cfg, self.sweep, self.shown_uri)
        except MlflowException as err:
            raise UserError(
                f"MLflow at {self.shown_uri} failed while creating the sweep's runs ({why(err)}): check the server's log"
            ) from None
        return self.ids.parent

    @property
    def parent_id(self) -> str:
        return self.ids.parent

    def _child(self, cell_id: str, tags: dict[str, str]) -> str:
        if cell_id not in self.ids.cells:
            run = self.client.create_run(
                self.ids.experiment,
                run_name=cell_id,
                tags={"mlflow.parentRunId": self.parent_id, "cram_sweep.cell": cell_id, **tags},
            )
            self.ids.cells[cell_id] = run.info.run_id
            self.ids.save(self.sweep.tracking)
        return self.ids.cells[cell_id]

    def record(self, cell: Cell, metrics: dict[str, float]) -> None:
        self.pending[cell.id] = (metrics, cell.tags)

    def record_cells(self, states) -> None:
        """Queue every cell with stored samples or failures (cellstate.cell_states): re-syncs MLflow from the store."""
        for cell, state in states:
            if state["done"] or state["failed"]:
                self.record(cell, state)

    def flush(self, force: bool = False) -> bool:
        """Send the latest metrics of every changed cell; False (and kept for later) if MLflow failed.

        After a failure the next attempts wait (flush_seconds, doubling up to MAX_BACKOFF_SECONDS;
        `force` skips the wait) and fail fast, so a dead server never stalls the driver for long.
        """
        if not self.pending:
            return True
        now = time.monotonic()
        if not force and not self.backoff.due(now):
            return not self.backoff.failing
        from mlflow.entities import Metric

        self.backoff.attempt(now)
        stamp = int(time.time() * 1000)
        try:
            with fast_fail(self.backoff.failing):
                for cell_id, (metrics, tags) in list(self.pending.items()):
                    step = int(metrics.get("done", 0))
                    batch = [Metric(k, float(v), stamp, step) for k, v in metrics.items() if v == v]
                    self.client.log_batch(self._child(cell_id, tags), metrics=batch)
                    del self.pending[cell_id]
        except Exception as err:
            if self.backoff.fail(time.monotonic()):
                log.warning(
                    "MLflow logging failed (%s); the sweep goes on, retrying every %d-%d s, and MLflow is re-synced "
                    "when it answers (or by `cram-sweep report SWEEP_DIR`)",
                    why(err),
                    self.backoff.delay,
                    MAX_BACKOFF_SECONDS,
                )
            return False
        outage = self.backoff.succeed()
        if outage is not None:
            log.warning("MLflow reachable again after %.0f s; metrics re-synced", outage)
        return True

    def report(self, report) -> None:
        """The report's files as parent-run artifacts, its curves as parent-run metric histories (curves.py), and the
        runs' status as the store has it (FINISHED: all done; FAILED: some failed; KILLED: some pending)."""
        from mlflow.entities import Metric

        for path in report.files:
            self.client.log_artifact(self.parent_id, str(path), artifact_path="report")
        now = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now, int(step)) for key, value, step in report_curves(report) if value == value]
        for i in range(0, len(metrics), 1000):  # MLflow's log_batch takes at most 1000 metrics
            self.client.log_batch(self.parent_id, metrics=metrics[i : i + 1000])
        failed, pending = int(report.cells["failed"].sum()), int(report.cells["pending"].sum())
        self.finish(not failed and not pending, status=None if failed or not pending else "KILLED")

    def finish(self, ok: bool, status: Optional[str] = None) -> None:
        """Close the parent and child runs (FINISHED / FAILED, or `status`); never raises, never hangs long."""
        if self.client is None or self.ids is None:
            return
        status = status or ("FINISHED" if ok else "FAILED")
        try:
            with fast_fail(self.backoff.failing):
                self.client.set_terminated(self.parent_id, status=status)
                for run_id in self.ids.cells.values():
                    self.client.set_terminated(run_id, status=status)
        except Exception as err:
            log.warning("could not close the MLflow runs (%s): `cram-sweep report SWEEP_DIR` closes them later", why(err))
