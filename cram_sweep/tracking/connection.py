"""The connection to MLflow while it fails: one-line reasons, the start-up error, the real tracking URI, and the
back-off of flushes.

While MLflow is failing, flushes back off (`Backoff`: flush_seconds, doubling up to MAX_BACKOFF_SECONDS) and each
attempt fails fast (no HTTP retries, a short timeout), so a dead server costs the driver milliseconds (connection
refused) to FAST_FAIL_TIMEOUT seconds (a hung server) per attempt.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

from ..config import SweepConfig
from ..errors import UserError, one_line
from ..redact import is_redacted, redact
from ..results.store import SweepDir

# Healthy server: MLflow's own retries ride out a brief 5xx or a dropped connection, within ~3 s
# (MLflow's defaults retry for minutes); the user's env wins.
HTTP_RETRIES = "2"
HTTP_BACKOFF_FACTOR = "1"
HTTP_TIMEOUT = "20"
# Failing server: one try with a short timeout, then wait before the next.
FAST_FAIL_TIMEOUT = "5"
MIN_BACKOFF_SECONDS = 5.0
MAX_BACKOFF_SECONDS = 60.0


@contextmanager
def fast_fail(active: bool = True):
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


def why(err: Exception) -> str:
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


def start_error(uri: str, err: Exception) -> str:
    """One line for a server that cannot be reached, or that answers with an HTTP error."""
    text = one_line(err)
    code = re.search(r"error code (\d{3})", text)
    if code is None:
        return f"cannot reach MLflow at {uri} ({why(err)}): start the server or fix tracking.uri / MLFLOW_TRACKING_URI"
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
