"""MLflow: one parent run per sweep, one child run per cell. Only the driver talks to MLflow.

The Parquet store is the source of truth: when MLflow fails mid-sweep the failure is logged, the
sweep goes on, and the next flush (or `resume` / `report`) re-syncs every cell from the store.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Dict, List, Optional

from omegaconf import DictConfig, OmegaConf

from .config import UserError
from .store import SweepDir

log = logging.getLogger("cram_sweep")


def tracking_uri(cfg: DictConfig, sweep: SweepDir) -> str:
    """Local tracking lives beside the sweep, in its out_dir, whatever the working directory."""
    if cfg.tracking.kind == "server":
        uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            raise UserError("tracking=server needs a server: set tracking.uri=http://HOST:5000 or MLFLOW_TRACKING_URI")
        return uri
    root = sweep.path.resolve().parent
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root}/mlflow.db"


def _flat_params(cfg: DictConfig) -> Dict[str, str]:
    flat = {}

    def walk(prefix, node):
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}{key}.", value)
        else:
            flat[prefix[:-1]] = str(node)[:500]

    walk("", OmegaConf.to_container(cfg, resolve=True))
    return flat


class Tracker:
    """The sweep's MLflow runs; its ids live in SWEEP_DIR/tracking.json so `resume` reuses them."""

    def __init__(self, cfg: DictConfig, sweep: SweepDir):
        self.cfg = cfg
        self.sweep = sweep
        self.uri = tracking_uri(cfg, sweep)
        self.client = None
        self.ids: Dict = {}
        self.pending: Dict[str, Dict[str, float]] = {}
        self.last_flush = 0.0
        self.failed_since: Optional[float] = None

    def start(self) -> str:
        """Connect (one clear error if the server is down), then create or reuse the parent run."""
        import mlflow
        from mlflow.tracking import MlflowClient

        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        self.client = MlflowClient(tracking_uri=self.uri)
        mlflow.set_tracking_uri(self.uri)
        try:
            experiment = self.client.get_experiment_by_name(self.cfg.tracking.experiment)
        except Exception as err:
            raise UserError(f"cannot reach MLflow at {self.uri} ({type(err).__name__}): start the server or fix tracking.uri / MLFLOW_TRACKING_URI") from None
        if self.sweep.tracking.is_file():
            self.ids = json.loads(self.sweep.tracking.read_text())
            if self.ids.get("uri") == self.uri:
                self.client.update_run(self.ids["parent"], status="RUNNING")
                return self.ids["parent"]
        if experiment is None:
            location = None
            if self.cfg.tracking.kind == "local":
                location = (self.sweep.path.resolve().parent / "mlartifacts").as_uri()
            experiment_id = self.client.create_experiment(self.cfg.tracking.experiment, artifact_location=location)
        else:
            experiment_id = experiment.experiment_id
        parent = self.client.create_run(experiment_id, run_name=self.cfg.name, tags={"cram_sweep.sweep_dir": str(self.sweep.path.resolve())})
        self.ids = {"uri": self.uri, "experiment": experiment_id, "parent": parent.info.run_id, "cells": {}}
        self._save_ids()
        from mlflow.entities import Param

        params = [Param(k, v) for k, v in _flat_params(self.cfg).items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.ids["parent"], params=params[i : i + 100])
        self.client.log_artifact(self.ids["parent"], str(self.sweep.config))
        return self.ids["parent"]

    @property
    def parent_id(self) -> str:
        return self.ids["parent"]

    def _save_ids(self) -> None:
        tmp = self.sweep.tracking.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.ids, indent=1))
        os.replace(tmp, self.sweep.tracking)

    def _child(self, cell_id: str, tags: Dict[str, str]) -> str:
        if cell_id not in self.ids["cells"]:
            run = self.client.create_run(
                self.ids["experiment"], run_name=cell_id,
                tags={"mlflow.parentRunId": self.parent_id, "cram_sweep.cell": cell_id, **tags},
            )
            self.ids["cells"][cell_id] = run.info.run_id
            self._save_ids()
        return self.ids["cells"][cell_id]

    def record(self, cell_id: str, metrics: Dict[str, float], tags: Dict[str, str]) -> None:
        self.pending[cell_id] = (metrics, tags)

    def flush(self, force: bool = False) -> bool:
        """Send the latest metrics of every changed cell; False (and kept for later) if MLflow failed."""
        if not self.pending or (not force and time.monotonic() - self.last_flush < self.cfg.flush_seconds):
            return True
        from mlflow.entities import Metric

        self.last_flush = time.monotonic()
        now = int(time.time() * 1000)
        try:
            for cell_id, (metrics, tags) in list(self.pending.items()):
                step = int(metrics.get("done", 0))
                batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if v == v]
                self.client.log_batch(self._child(cell_id, tags), metrics=batch)
                del self.pending[cell_id]
        except Exception as err:
            if self.failed_since is None:
                log.warning("MLflow logging failed (%s); the sweep goes on and MLflow is re-synced later", " ".join(str(err).split())[:200])
                self.failed_since = time.monotonic()
            return False
        if self.failed_since is not None:
            log.warning("MLflow reachable again; metrics re-synced")
            self.failed_since = None
        return True

    def log_metrics(self, metrics: Dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.parent_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items() if v == v])

    def log_artifacts(self, paths: List, artifact_path: str) -> None:
        for path in paths:
            self.client.log_artifact(self.parent_id, str(path), artifact_path=artifact_path)

    def finish(self, ok: bool) -> None:
        try:
            self.client.set_terminated(self.parent_id, status="FINISHED" if ok else "FAILED")
            for run_id in self.ids["cells"].values():
                self.client.set_terminated(run_id, status="FINISHED" if ok else "FAILED")
        except Exception as err:
            log.warning("could not close the MLflow runs (%s)", " ".join(str(err).split())[:200])


def metric_key(*parts) -> str:
    """MLflow metric names allow letters, digits, '_', '-', '.', ' ', '/'."""
    return "/".join("".join(ch if ch.isalnum() or ch in "_-." else "_" for ch in str(p)) for p in parts)


def log_report(tracker: Tracker, report) -> None:
    """The report's files as parent-run artifacts, and each (model, dataset, n_mem) group's capacity as metrics."""
    tracker.log_artifacts(report.files, "report")
    metrics = {}
    for row in report.capacity.to_dict("records"):
        group = (row["model"], row["dataset"], f"n_mem_{row['n_mem']}")
        for key in ("max_tokens", "gain_tokens_mean", "info_gain_bits_mean", "utilization"):
            metrics[metric_key(key, *group)] = row[key]
    tracker.log_metrics(metrics)
