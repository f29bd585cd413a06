"""The processes the tests start, and how they end them: the CLI (in a session of its own, or run to its end), polling for
a condition, killing a process tree or stopping a session, loopback ports, and the one `mlflow server` launcher.

A process started here leads a session (and process group) of its own, so a test can signal or kill everything it
started without touching the test runner; Ray's workers start sessions of their own, which kill_tree reaches too.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

from .helpers import ROOT

CLI = [sys.executable, "-m", "cram_sweep.cli"]


def cli_env(**extra) -> dict:
    """The environment of a CLI process started by a test: unbuffered output, every Ray log line, no injected fault."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_DEDUP_LOGS": "0", **extra}
    if "CRAM_SWEEP_FAULT" not in extra:
        env.pop("CRAM_SWEEP_FAULT", None)
    return env


_MLFLOW_TEMPLATE = Path(tempfile.mkdtemp(prefix="cram-mlflow-template-")) / "mlflow.db"


def seed_mlflow_db(args) -> list:
    """Give the `out_dir=` of these CLI arguments an MLflow database whose tables MLflow itself already created
    (once per test session): a new database costs each sweep ~4 s of migrations. Returns `args`."""
    out_dirs = [Path(a.split("=", 1)[1]) for a in args if a.startswith("out_dir=")]
    if out_dirs and not (out_dirs[0] / "mlflow.db").exists():
        if not _MLFLOW_TEMPLATE.exists():
            from mlflow.tracking import MlflowClient

            MlflowClient(tracking_uri=f"sqlite:///{_MLFLOW_TEMPLATE}").search_experiments()
        out_dirs[0].mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_MLFLOW_TEMPLATE, out_dirs[0] / "mlflow.db")
    return list(args)


def start_session(command: list, stdout=subprocess.PIPE, **popen) -> subprocess.Popen:
    """`command` as the leader of a new session (its pid is the session's and the process group's id), output and
    errors into `stdout`; `popen`: Popen's other arguments (cwd, env, text, ...)."""
    return subprocess.Popen(command, stdout=stdout, stderr=subprocess.STDOUT, start_new_session=True, **popen)


def start_cli(args, stdout=subprocess.PIPE, env=None, **popen) -> subprocess.Popen:
    """The console entry point in a session of its own, as a user runs it: a test can signal or kill the session
    (session_pids, stop_session, kill_tree) without touching its own. Output and errors go to `stdout`."""
    return start_session(CLI + seed_mlflow_db(args), stdout, cwd=ROOT, env=env or cli_env(), **popen)


def run_cli(*args, check=True, timeout=300, env=None, **kwargs):
    """The real console entry point in a fresh process, as a user runs it, to its end; with `check`, an exit code
    other than 0 fails with its output."""
    seed_mlflow_db(args)
    proc = subprocess.run(CLI + list(args), capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env or cli_env(), **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}")
    return proc


def wait_for(check, what: str, timeout: float = 180, proc=None, log: Path = None):
    """Poll `check()` every 0.1 s until it returns a true value, and return that value; an exception counts as not yet.
    Fail with the end of `log` if `proc` exited first or `timeout` s ran out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = check()
        except Exception:  # a store or port not there yet
            value = None
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.1)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    state = f"exited {proc.returncode}" if proc is not None and proc.poll() is not None else f"not there after {timeout:.0f} s"
    raise AssertionError(f"waiting for {what}: {state}\n{tail}")


def session_pids(sid: int) -> list[int]:
    """The processes of session `sid` (a process started with start_session has its pid as sid)."""
    found = []
    for pid in psutil.pids():
        try:
            found += [pid] if os.getsid(pid) == sid else []
        except OSError:
            pass
    return found


def descendants(proc: subprocess.Popen) -> list[psutil.Process]:
    """Every process `proc` started, directly or not, in whatever session; [] once `proc` is gone."""
    try:
        return psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def kill_tree(proc: subprocess.Popen, timeout: float = 10) -> None:
    """As a crash or a lost machine ends them: SIGKILL `proc`, its process group and every process it started (Ray's
    workers run in sessions of their own) at once. Returns once `proc` is reaped and the others are gone, or `timeout`
    s passed for them."""
    family = descendants(proc)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for process in family:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout)
    psutil.wait_procs(family, timeout=timeout)


def kill_mid_sweep(args, sweep, parts: int = 2) -> None:
    """`cram-sweep` with `args` in a session of its own, SIGKILLed (kill_tree) once `sweep` holds `parts` results files:
    a driver killed mid-sweep, as kill -9 or a lost node leaves it."""
    proc = start_cli(args, stdout=subprocess.DEVNULL)
    try:
        wait_for(lambda: len(list(sweep.results.glob("part-*.parquet"))) >= parts, f"{parts} results files", timeout=240, proc=proc)
    finally:
        kill_tree(proc)


def stop_session(*procs: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the session leaders still running, give them `grace` s in all to exit, then SIGKILL whatever of their
    sessions is left. Returns with every leader reaped and nothing of their sessions running."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for proc in procs:
        for pid in session_pids(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            proc.wait(10)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens at now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_open(port: int) -> bool:
    """Whether something accepts connections at 127.0.0.1:`port` (within 0.5 s)."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


class MlflowServer:
    """`mlflow server` (one worker, artifacts served) at `uri`, on a loopback port chosen once: a restart (`start`
    again, after `kill`) answers at the same address, with the same stores. Each start logs to workdir/mlflow-N.log."""

    def __init__(self, backend_store_uri: str, artifacts_destination: str, workdir: Path, env: dict = None):
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.backend_store_uri, self.artifacts_destination = backend_store_uri, artifacts_destination
        self.workdir, self.env = workdir, env or {}
        self.proc = None
        self.starts = 0

    def start(self) -> None:
        """Launch the server in a session of its own, without waiting for it to answer (it boots in ~20 s): see wait."""
        self.starts += 1
        self.log = self.workdir / f"mlflow-{self.starts}.log"
        command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.backend_store_uri]
        command += ["--artifacts-destination", self.artifacts_destination, "--serve-artifacts"]
        command += ["--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        with self.log.open("w") as sink:
            self.proc = start_session(command, sink, cwd=self.workdir, env={**os.environ, **self.env})

    def wait(self, timeout: float = 240) -> None:
        """Return once /health answers 200; fail with the server's log if it exited first or `timeout` s ran out."""
        health = lambda: urllib.request.urlopen(f"{self.uri}/health", timeout=2).status == 200
        wait_for(health, "mlflow server", timeout=timeout, proc=self.proc, log=self.log)

    def kill(self) -> None:
        """As a crash would: SIGKILL the server and its workers at once (kill_tree)."""
        kill_tree(self.proc)

    def stop(self) -> None:
        """End the server and every process of its session (stop_session, 5 s of grace), if it was started."""
        if self.proc is not None:
            stop_session(self.proc, grace=5)
