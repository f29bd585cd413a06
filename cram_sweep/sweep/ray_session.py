"""Ray: start a local instance or join a cluster.

`cluster=local` always starts an instance of its own (`ray.init(address="local")`): never a cluster
named by RAY_ADDRESS or recorded by an earlier `ray start` in Ray's temp dir, dead or alive. Only
`cluster=ray` joins one, and an address nothing answers at is one clear error within seconds.

Ray's private APIs are used here and nowhere else in the package, each behind one small function with
a public-API fallback; `tests/test_cluster.py::test_private_ray_apis_are_where_ray_keeps_them` fails
when Ray moves one.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Optional

import ray

from ..config import SweepConfig
from ..errors import UserError, one_line
from . import interrupt

log = logging.getLogger("cram_sweep")

QUIET = {"logging_level": logging.WARNING, "log_to_driver": True}
# Ray starts workers at niceness 15 (RAY_worker_niceness): any other busy process on the node then
# starves the worker that does all the compute (docs/performance.md: 0.69 -> 47.8 s per sample).
LOCAL_SYSTEM_CONFIG = {"worker_niceness": 0}


# Each private Ray function this package calls, looked up by `_private`; each caller has a public fallback.
PRIVATE_RAY_APIS = {
    "address_file": ("ray._common.utils", "get_ray_address_file"),
    "resolve_address": ("ray._private.services", "canonicalize_bootstrap_address_or_die"),
    "enable_token_auth": ("ray._private.authentication.authentication_token_setup", "_enable_token_auth"),
    "set_sigterm_handler": ("ray._private.utils", "set_sigterm_handler"),
}


def _private(name: str):
    """The private Ray function PRIVATE_RAY_APIS names, or None where this Ray has moved it."""
    module, attribute = PRIVATE_RAY_APIS[name]
    try:
        return getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError):
        return None


def recorded_cluster_file() -> str:
    """Where `ray start` records the latest cluster of this node (Ray's temp dir, RAY_TMPDIR honoured)."""
    address_file = _private("address_file")
    if address_file is None:
        return os.path.join(os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp", "ray", "ray_current_cluster")
    return address_file(None)


def resolve_address(address: str) -> str:
    """HOST:PORT of the cluster `address` names. "auto": the one the latest `ray start` on this node recorded,
    where there is a record (Ray itself would prefer any GCS process it finds, another user's local instance
    included), else Ray's own search."""
    if address == "auto" and os.path.isfile(recorded_cluster_file()):
        with open(recorded_cluster_file()) as record:
            recorded = record.read().strip()
        if recorded:
            return recorded
    resolve = _private("resolve_address")
    return address if resolve is None else resolve(address)  # without it, ray.init resolves the address itself


def enable_token_auth() -> None:
    """Token mode in this process: ray.init sends the token to an explicit address only in token mode."""
    enable = _private("enable_token_auth")
    if enable is None:
        os.environ["RAY_AUTH_MODE"] = "token"  # read when Ray's config is first loaded
    else:
        enable()  # also refreshes the config Ray has already cached


def unreachable(address: str, seconds: float = 5.0) -> str:
    """Why nothing answers at host:port within `seconds` ("" when something does): ray.init retries an
    address where nothing listens for many minutes, this fails in seconds."""
    host, _, port = address.split("://")[-1].rpartition(":")
    if not host or not port.isdigit():
        return f"{address} is not HOST:PORT"
    deadline = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=3).close()
            return ""
        except OSError as err:
            if time.monotonic() > deadline:
                return err.strerror or type(err).__name__
            time.sleep(0.5)


def start_local(num_cpus: Optional[int]) -> None:
    """A Ray instance of this process's own, workers at normal priority. Token authentication is
    chosen explicitly (on, the default of a new local instance), so Ray prints no notice about it."""
    if "RAY_AUTH_MODE" not in os.environ:
        enable_token_auth()
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _system_config=LOCAL_SYSTEM_CONFIG, **QUIET)


def join_cluster(address: Optional[str]) -> None:
    """Join the cluster at `address`, else $RAY_ADDRESS (set by `ray job submit`), else the latest
    `ray start` on this node; one UserError naming what was tried when it cannot be reached."""
    address = address or os.environ.get("RAY_ADDRESS") or "auto"
    fix = "start it or fix cluster.address / RAY_ADDRESS"
    if address.startswith(("http://", "https://")):
        raise UserError(
            f"cluster address {address} is a dashboard / Jobs API URL: give the cluster's GCS address HOST:6379 "
            "in cluster.address or RAY_ADDRESS, or submit the sweep with `ray job submit` (jobs/ray_submit.sh)"
        )
    target, recorded = address, ""
    if not address.startswith("ray://"):
        if address == "auto":
            recorded = f", recorded in {recorded_cluster_file()} by an earlier `ray start`"
        try:
            target = resolve_address(address)
        except (ConnectionError, ValueError) as err:
            raise UserError(f"cannot find the Ray cluster {address!r} ({one_line(err, 150)}): {fix}") from None
    reason = unreachable(target) if target != "auto" else ""
    if reason:
        stale = f"{recorded}; the file is stale if that cluster was stopped without `ray stop`" if recorded else ""
        raise UserError(f"cannot join the Ray cluster at {address}: nothing answers at {target}{stale} ({reason}): {fix}")
    token = (
        os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.isfile(os.path.expanduser("~/.ray/auth_token"))
    )
    if token and "RAY_AUTH_MODE" not in os.environ:
        # `ray start` turns token authentication on where a token exists; a cluster without it ignores the token.
        enable_token_auth()
    failure = preflight(address)
    if not failure:
        try:
            ray.init(address=address, **QUIET)
        except (ConnectionError, RuntimeError) as err:
            failure = one_line(err.__cause__ or err)
    if failure:
        if "authtoken" in failure.lower() or "authentication" in failure.lower():
            raise UserError(
                f"cannot join the Ray cluster at {address}: it uses token authentication and refused this driver "
                "(give the driver the cluster's token: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)"
            )
        raise UserError(f"cannot join the Ray cluster at {address} ({failure[:200]}): {fix}")


PREFLIGHT = "import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False); ray.shutdown()"


def preflight(address: str, seconds: float = 30.0) -> str:
    """Why joining `address` fails ("" when it works), tried in a child process that is killed after `seconds`:
    a GCS that answers on its port but refuses or never completes the handshake keeps ray.init retrying for
    many minutes, in C++ code where no signal or timeout of this process reaches it."""
    try:
        proc = subprocess.run([sys.executable, "-c", PREFLIGHT, address], capture_output=True, text=True, timeout=seconds)
    except subprocess.TimeoutExpired:
        return f"it did not complete Ray's handshake within {seconds:.0f} s"
    if proc.returncode == 0:
        return ""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return one_line((errors or lines or [f"exit {proc.returncode}"])[-1])


@contextlib.contextmanager
def sigterm_handler_kept():
    """ray.init replaces the SIGTERM handler with its own (sys.exit, which a finalizer can swallow: the sweep
    then ran on); while it starts, its installer is a no-op, and the handler in place is restored afterwards."""
    handler = signal.getsignal(signal.SIGTERM)
    installer = _private("set_sigterm_handler")
    module = importlib.import_module(PRIVATE_RAY_APIS["set_sigterm_handler"][0]) if installer else None
    if module is not None:
        module.set_sigterm_handler = lambda _handler: None
    try:
        yield
    finally:
        if module is not None:
            module.set_sigterm_handler = installer
        signal.signal(signal.SIGTERM, handler)


def connect_ray(cfg: SweepConfig) -> None:
    if ray.is_initialized():
        return
    with sigterm_handler_kept(), interrupt.immediate():
        if cfg.cluster.kind == "local":
            start_local(cfg.cluster.num_cpus)
        else:
            join_cluster(cfg.cluster.address)
    interrupt.check()
