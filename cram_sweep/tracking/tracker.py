"""MLflow: one parent run per sweep, one child run per cell. Only the driver talks to MLflow.

The Parquet store is the source of truth: when MLflow fails mid-sweep the failure is logged, the
sweep goes on, and the next flush (or `resume` / `report`) re-syncs every cell from the store.
While MLflow is failing, flushes back off (`Backoff`: flush_seconds, doubling up to MAX_BACKOFF_SECONDS) and
each attempt fails fast (no HTTP retries, a short timeout), so a dead server costs the driver
milliseconds (connection refused) to FAST_FAIL_TIMEOUT seconds (a hung server) per attempt.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf

from ..config import SweepConfig
from ..errors import UserError, one_line
from ..redact import is_redacted, redact
from ..report.capacity import curve_columns, growth_columns
from ..results.store import SweepDir, write_atomically
from ..sweep.grid import Cell

log = logging.getLogger("cram_sweep")

# Healthy server: MLflow's own retries ride out a brief 5xx or a dropped connection, within ~3 s
# (MLflow's defaults retry for minutes); the user's env wins.
HTTP_RETRIES = "2"
HTTP_BACKOFF_FACTOR = "1"
HTTP_TIMEOUT = "20"
# Failing server: one try with a short timeout, then wait before the next.
FAST_FAIL_TIMEOUT = "5"
MIN_BACKOFF_SECONDS = 5.0
MAX_BACKOFF_SECONDS = 60.0
# MLflow 3's UI opens an experiment without this tag on its GenAI overview (traces), not on the runs.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


@contextmanager
def _fast_fail(active: bool = True):
    """MLflow reads these per request: no retries and a short timeout while the server is failing."""
    if not active:
        yield
        return
    fast = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": FAST_FAIL_TIMEOUT}
    saved = {key: os.environ.get(key) for key in fast}
    os.environ.update(fast)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _why(err: Exception) -> str:
    """A short reason for an MLflow failure, for one-line messages."""
    text = one_line(err)
    for needle, reason in (
        ("Failed to resolve", "unknown host"),
        ("NameResolutionError", "unknown host"),
        ("Connection refused", "connection refused"),
        ("NewConnectionError", "connection refused"),
        ("timed out", "timed out"),
        ("RemoteDisconnected", "connection closed"),
        ("Connection aborted", "connection closed"),
    ):
        if needle in text:
            return reason
    return f"{type(err).__name__}: {text[:160]}"


def _start_error(uri: str, err: Exception) -> str:
    """One line for a server that cannot be reached, or that answers with an HTTP error."""
    text = one_line(err)
    code = re.search(r"error code (\d{3})", text)
    if code is None:
        return f"cannot reach MLflow at {uri} ({_why(err)}): start the server or fix tracking.uri / MLFLOW_TRACKING_URI"
    status = int(code.group(1))
    body = re.search(r"Response body: '(.*)'", text)
    detail = f"HTTP {status}" + (f": {body.group(1)[:120]}" if body else "")
    if status == 401:
        return f"MLflow at {uri} refused the request ({detail}): give credentials (MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN)"
    if status == 403:
        return f"MLflow at {uri} refused the request ({detail}): allow this client on the server (mlflow server --allowed-hosts, credentials) or fix tracking.uri"
    verb = "refused the request" if status < 500 else "failed"
    return f"MLflow at {uri} {verb} ({detail}): check tracking.uri / MLFLOW_TRACKING_URI and the server's log"


def tracking_uri(cfg: SweepConfig, sweep: SweepDir) -> str:
    """The real tracking URI. Local tracking lives beside the sweep, in its out_dir, whatever the working directory.

    A server URI that sweep.yaml stores redacted (its password masked) is the URI of MLFLOW_TRACKING_URI when
    that redacts to the same text; a `tracking.uri=` override of `resume` replaces it outright."""
    if cfg.tracking.kind == "server":
        uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            raise UserError("tracking=server needs a server: set tracking.uri=http://HOST:5000 or MLFLOW_TRACKING_URI")
        return _unredacted(uri, sweep) if is_redacted(uri) else uri
    root = sweep.path.resolve().parent
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root}/mlflow.db"


def _unredacted(stored: str, sweep: SweepDir) -> str:
    """The real URI behind `stored`, a redacted tracking.uri from sweep.yaml: MLFLOW_TRACKING_URI, if it is that URI."""
    real = os.environ.get("MLFLOW_TRACKING_URI", "")
    if redact(real) == stored:
        return real
    raise UserError(
        f"{sweep.config} stores tracking.uri={stored} without its secret: set MLFLOW_TRACKING_URI to the full URI, "
        f"or give it with `cram-sweep resume {sweep.path} tracking.uri=URI`"
    )


def _flat_params(cfg: SweepConfig) -> dict[str, str]:
    """The config as MLflow params: one per leaf key, values redacted and cut to MLflow's 500 characters."""
    flat = {}

    def walk(prefix, node):
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}{key}.", value)
        else:
            flat[prefix[:-1]] = redact(str(node))[:500]

    walk("", OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True))
    return flat


@dataclass
class Backoff:
    """When a flush may try MLflow: `interval` after the last attempt, and while MLflow is failing not before `retry_at`.

    Healthy: failed_since is None and delay = retry_at = 0. Each failed attempt doubles the delay, from
    max(interval, MIN_BACKOFF_SECONDS) up to MAX_BACKOFF_SECONDS, and sets retry_at to its end + delay; the first
    failed attempt of an outage sets failed_since to its start. A successful attempt makes it healthy again.
    Times are time.monotonic() seconds."""

    interval: float  # flush_seconds: no attempt sooner after the last one (a forced flush excepted)
    last_attempt: float = 0.0  # the start of the last attempt
    failed_since: Optional[float] = None  # the start of the outage's first failed attempt; None while healthy
    delay: float = 0.0  # seconds from a failed attempt's end to the next attempt
    retry_at: float = 0.0  # no attempt before this while failing (a forced flush excepted)

    @property
    def failing(self) -> bool:
        return self.failed_since is not None

    def due(self, now: float) -> bool:
        return now - self.last_attempt >= self.interval and now >= self.retry_at

    def attempt(self, now: float) -> None:
        self.last_attempt = now

    def fail(self, now: float) -> bool:
        """The attempt failed, ending at `now`; True if it is the first failed attempt of an outage."""
        self.delay = min(MAX_BACKOFF_SECONDS, max(self.interval, MIN_BACKOFF_SECONDS, 2 * self.delay))
        self.retry_at = now + self.delay
        first = not self.failing
        if first:
            self.failed_since = self.last_attempt
        return first

    def succeed(self) -> Optional[float]:
        """The attempt succeeded: the seconds from the outage's first failed attempt to this one, or None if healthy."""
        outage = None if self.failed_since is None else self.last_attempt - self.failed_since
        self.failed_since, self.delay, self.retry_at = None, 0.0, 0.0
        return outage


@dataclass
class RunIds:
    """SWEEP_DIR/tracking.json: the MLflow ids of a sweep's runs, so `resume` and `report` reuse them.

    `uri` is where they live, redacted (the file never holds a secret); `cells` maps a cell id to its child run."""

    uri: str
    experiment: str
    parent: str
    cells: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> Optional[RunIds]:
        """The ids `path` holds; None where there is no file."""
        if not path.is_file():
            return None
        ids = json.loads(path.read_text())
        return cls(uri=ids.get("uri", ""), experiment=ids["experiment"], parent=ids["parent"], cells=ids.get("cells", {}))

    def save(self, path: Path) -> None:
        write_atomically(path, lambda tmp: tmp.write_text(json.dumps(asdict(self), indent=1)))


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
            raise UserError(_start_error(self.shown_uri, err)) from None
        try:
            return self._parent(experiment)
        except MlflowException as err:
            raise UserError(
                f"MLflow at {self.shown_uri} failed while creating the sweep's runs ({_why(err)}): check the server's log"
            ) from None

    def _parent(self, experiment) -> str:
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException

        ids = RunIds.load(self.sweep.tracking)
        if ids is not None and redact(ids.uri) == self.shown_uri:  # redact: tracking.json of older versions holds the real URI
            try:
                self.client.update_run(ids.parent, status="RUNNING")
                self.ids = replace(ids, uri=self.shown_uri)
                return self.ids.parent
            except MlflowException as err:
                if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                log.warning("the sweep's MLflow runs are gone from %s: creating new ones", self.shown_uri)
        if experiment is None:
            location = None
            if self.cfg.tracking.kind == "local":
                location = (self.sweep.path.resolve().parent / "mlartifacts").as_uri()
            experiment_id = self.client.create_experiment(
                self.cfg.tracking.experiment, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
            )
        else:
            experiment_id = experiment.experiment_id
            if EXPERIMENT_KIND_TAG not in experiment.tags:  # made by an earlier cram-sweep
                self.client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        parent = self.client.create_run(
            experiment_id, run_name=self.cfg.name, tags={"cram_sweep.sweep_dir": str(self.sweep.path.resolve())}
        )
        self.ids = RunIds(uri=self.shown_uri, experiment=experiment_id, parent=parent.info.run_id)
        self.ids.save(self.sweep.tracking)
        params = [Param(k, v) for k, v in _flat_params(self.cfg).items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.ids.parent, params=params[i : i + 100])
        try:  # an artifact store that fails must not stop the sweep: the config is in SWEEP_DIR too
            self.client.log_artifact(self.ids.parent, str(self.sweep.config))
        except Exception as err:
            log.warning("could not log sweep.yaml to MLflow's artifact store (%s)", _why(err))
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
        self.pending[cell.id] = (metrics, cell_tags(cell))

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
            with _fast_fail(self.backoff.failing):
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
                    _why(err),
                    self.backoff.delay,
                    MAX_BACKOFF_SECONDS,
                )
            return False
        outage = self.backoff.succeed()
        if outage is not None:
            log.warning("MLflow reachable again after %.0f s; metrics re-synced", outage)
        return True

    def log_curves(self, points: list[tuple[str, float, int]]) -> None:
        """(key, value, step) points on the parent run: MLflow's chart view draws each key as a line over its steps."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now, int(step)) for key, value, step in points if value == value]
        for i in range(0, len(metrics), 1000):  # MLflow's log_batch takes at most 1000 metrics
            self.client.log_batch(self.parent_id, metrics=metrics[i : i + 1000])

    def log_artifacts(self, paths: list, artifact_path: str) -> None:
        for path in paths:
            self.client.log_artifact(self.parent_id, str(path), artifact_path=artifact_path)

    def finish(self, ok: bool, status: Optional[str] = None) -> None:
        """Close the parent and child runs (FINISHED / FAILED, or `status`); never raises, never hangs long."""
        if self.client is None or self.ids is None:
            return
        status = status or ("FINISHED" if ok else "FAILED")
        try:
            with _fast_fail(self.backoff.failing):
                self.client.set_terminated(self.parent_id, status=status)
                for run_id in self.ids.cells.values():
                    self.client.set_terminated(run_id, status=status)
        except Exception as err:
            log.warning("could not close the MLflow runs (%s): `cram-sweep report SWEEP_DIR` closes them later", _why(err))


def cell_tags(cell: Cell) -> dict[str, str]:
    return {"model": cell.model, "dataset": cell.dataset, "n_mem": str(cell.n_mem), "length": str(cell.length), "method": cell.method}


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


def log_report(tracker: Tracker, report) -> None:
    """The report's files as parent-run artifacts, its curves as parent-run metric histories (report_curves), and
    the runs' status as the store has it (FINISHED: all done; FAILED: some failed; KILLED: some pending)."""
    tracker.log_artifacts(report.files, "report")
    tracker.log_curves(report_curves(report))
    failed, pending = int(report.cells["failed"].sum()), int(report.cells["pending"].sum())
    tracker.finish(not failed and not pending, status=None if failed or not pending else "KILLED")
