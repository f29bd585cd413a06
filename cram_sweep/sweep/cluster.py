"""Ray: start a local instance or join a cluster, and plan the workers on it: one per GPU (or CPU node), as nodes join.

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
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, replace
from typing import Optional

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ..config import SweepConfig, WorkerConfig
from ..errors import UserError, one_line
from . import interrupt
from .events import Worker
from .worker import CramWorker, WorkerSettings

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


@dataclass(frozen=True)
class Node:
    """An alive Ray node as the GCS lists it: its hex id and total resources."""

    id: str
    cpus: float
    gpus: float


def alive_nodes() -> list[Node]:
    return [Node(n["NodeID"], n["Resources"].get("CPU", 0.0), n["Resources"].get("GPU", 0.0)) for n in ray.nodes() if n["Alive"]]


@dataclass(frozen=True)
class Slot:
    """The resources of one worker and the node it is started for (soft affinity: where that node is gone or
    full, Ray places it elsewhere); node None (a fixed `worker.count`): anywhere, CPU workers spread."""

    kind: str  # "gpu" | "cpu"
    cpus: float
    gpus: float = 0.0
    node: Optional[str] = None

    @property
    def bundle(self) -> dict[str, float]:
        """The shape the autoscaler is asked for (request_resources)."""
        return {"CPU": self.cpus, **({"GPU": self.gpus} if self.gpus else {})}

    def options(self) -> dict:
        if self.node:
            strategy = NodeAffinitySchedulingStrategy(self.node, soft=True)
        else:
            strategy = "SPREAD" if self.kind == "cpu" else "DEFAULT"
        return {"num_cpus": self.cpus, "num_gpus": self.gpus, "scheduling_strategy": strategy}


def node_slots(node: Node, kind: str, worker: WorkerConfig) -> list[Slot]:
    """The workers one node holds: one per `worker.gpus` of its GPUs (each with worker.cpus or 1 CPU), or one CPU
    worker holding all of its CPUs (worker.cpus: that many), so torch uses every core of the node."""
    if kind == "gpu":
        return [Slot("gpu", worker.cpus or 1, worker.gpus, node.id)] * int(node.gpus / worker.gpus + 1e-9)
    cpus = worker.cpus or int(node.cpus)
    return [Slot("cpu", cpus, 0.0, node.id)] if 1 <= cpus <= node.cpus else []


def plan(nodes: list[Node], kind: str, worker: WorkerConfig, claims: list[Optional[str]]) -> list[Slot]:
    """The slots to start new workers on: each node's slots beyond the workers of this kind that run there or were
    started for it (`claims`, one per worker; None or a node that left: the worker will take a slot anywhere, so
    one free slot fewer), up to `worker.max_workers` workers in all. A slot therefore gets one worker, however
    often it is planned: a worker counts from its creation, placed or not."""
    alive = {node.id for node in nodes}
    on_node = Counter(claim for claim in claims if claim in alive)
    anywhere = len(claims) - sum(on_node.values())
    free = [slot for node in nodes for slot in node_slots(node, kind, worker)[on_node[node.id] :]][anywhere:]
    room = worker.max_workers - len(claims) if worker.max_workers else len(free)
    return free[: max(room, 0)]


class Scaler:
    """The sweep's workers as its cluster changes: `grow` starts a worker for every slot that is free (a GPU, or a
    CPU node, that joined, or one whose worker was given up), `request` asks Ray's autoscaler for the slots the
    remaining work could use (`ray.autoscaler.sdk.request_resources`; 0 releases the request), and
    `wait_for_capacity` holds the start until there is a slot at all.

    The kind of worker: device=cpu: CPU workers; device=cuda: GPU workers only, never CPU ones; device=auto: GPU
    workers once any node has a GPU (for good: GPU nodes that leave are waited for, not replaced by CPU workers),
    CPU workers before that (WorkerPool stops them when the first GPU worker answers). A fixed `worker.count`
    starts that many workers once and never grows."""

    def __init__(self, cfg: SweepConfig, nodes=alive_nodes):
        self.cfg = cfg
        self.nodes = nodes  # () -> the alive nodes
        self.seen: list[Node] = []  # the alive nodes when last looked at (by grow or wait_for_capacity)
        self.settings = WorkerSettings.of(cfg)
        self.on_gpus = cfg.device == "cuda"
        self.counted = False  # a fixed worker.count was started
        self.autoscaled = cfg.cluster.kind == "ray"  # a local instance has no autoscaler
        self.requested: tuple[int, tuple] = (0, ())  # the bundles asked for: (count, shape)

    def kind(self, nodes: list[Node]) -> str:
        if self.cfg.device == "cpu":
            return "cpu"
        self.on_gpus = self.on_gpus or any(node.gpus >= self.cfg.worker.gpus for node in nodes)
        return "gpu" if self.on_gpus else "cpu"

    def slots(self, nodes: list[Node], claims: list[Optional[str]]) -> list[Slot]:
        kind, worker = self.kind(nodes), self.cfg.worker
        if not worker.count:
            return plan(nodes, kind, worker, claims)
        if self.counted or not nodes:
            return []
        self.counted = True
        if kind == "gpu":
            return [Slot("gpu", worker.cpus or 1, worker.gpus)] * worker.count
        return [Slot("cpu", worker.cpus or min((int(n.cpus) for n in nodes if n.cpus >= 1), default=1))] * worker.count

    def grow(self, workers: list[Worker]) -> list[Worker]:
        """New workers for the free slots of the alive nodes, given the pool's `workers` (of every kind)."""
        nodes = self.seen = self.nodes()
        kind = self.kind(nodes)
        slots = self.slots(nodes, [w.claim for w in workers if w.kind == kind])
        return [Worker(self.spawn(slot), slot.kind, slot.node) for slot in slots]

    def spawn(self, slot: Slot):
        settings = self.settings if slot.kind == "gpu" else replace(self.settings, device="cpu")
        return CramWorker.options(**slot.options()).remote(settings)

    def shape(self) -> dict[str, float]:
        """The bundle one more worker of the current kind takes: a CPU worker the CPUs of the largest node seen."""
        worker = self.cfg.worker
        if self.kind(self.seen) == "gpu":
            return {"CPU": worker.cpus or 1, "GPU": worker.gpus}
        return {"CPU": worker.cpus or max((int(n.cpus) for n in self.seen if n.cpus >= 1), default=1)}

    def request(self, items: int) -> None:
        """Ask the autoscaler for one worker's bundle per work item left (queued or running), up to worker.count or
        worker.max_workers: a target for the whole cluster, the workers already running included (Ray's
        semantics). 0 releases the request. Ray is called only when the request changes; a failure is one warning
        and no more requests."""
        worker = self.cfg.worker
        count = min(items, worker.count or worker.max_workers or items)
        shape = self.shape() if count else {}
        if not self.autoscaled or self.requested == (count, tuple(shape.items())):
            return
        from ray.autoscaler.sdk import request_resources

        try:
            request_resources(bundles=[shape] * count)
        except Exception as err:  # a hint to the autoscaler: the sweep runs on what it has without it
            log.warning("could not ask Ray's autoscaler for resources (%s): going on with the cluster as it is", one_line(err, 200))
            self.autoscaled = False
            return
        self.requested = (count, tuple(shape.items()))

    def wait_for_capacity(self, items: int) -> None:
        """Return once the cluster has a slot for a worker of the sweep's device. Until then the autoscaler is asked
        for the workers `items` work items could use and a progress line says what is awaited, every
        `progress_line_seconds`; after `cluster.wait_for_gpus_seconds`, one UserError. device=cuda waits for GPUs
        and never starts CPU workers instead."""
        seconds = self.cfg.cluster.wait_for_gpus_seconds
        deadline, last_line = time.monotonic() + seconds, -math.inf
        while True:
            nodes = self.seen = self.nodes()
            if self.slots_exist(nodes):
                return
            self.request(items)
            left = deadline - time.monotonic()
            if left <= 0:
                raise UserError(self.no_capacity(nodes))
            if time.monotonic() - last_line >= self.cfg.progress_line_seconds:
                last_line = time.monotonic()
                print(
                    f"waiting for {self.awaited()}: the Ray cluster has {self.has(nodes)}{self.asked()}; giving up in {left:.0f} s (cluster.wait_for_gpus_seconds)",
                    file=sys.stderr,
                    flush=True,
                )
            interrupt.check()
            time.sleep(min(1.0, max(left, 0.0)))

    def slots_exist(self, nodes: list[Node]) -> bool:
        kind = self.kind(nodes)
        return any(node_slots(node, kind, self.cfg.worker) for node in nodes)

    def awaited(self) -> str:
        return "GPUs (device=cuda)" if self.on_gpus else "a node with a whole CPU or a GPU"

    def asked(self) -> str:
        count, shape = self.requested
        return f"; asked Ray's autoscaler for {count} x {dict(shape)}" if count else ""

    @staticmethod
    def has(nodes: list[Node]) -> str:
        cpus, gpus = sum(node.cpus for node in nodes), sum(node.gpus for node in nodes)
        return f"{len(nodes)} node{'s' * (len(nodes) != 1)}, {cpus:g} CPU{'s' * (cpus != 1)}, {gpus:g} GPU{'s' * (gpus != 1)}"

    def no_capacity(self, nodes: list[Node]) -> str:
        seconds = self.cfg.cluster.wait_for_gpus_seconds
        waited = f"within cluster.wait_for_gpus_seconds={seconds:g} s"
        if self.on_gpus:
            return (
                f"device=cuda and no GPU joined the Ray cluster {waited} ({self.has(nodes)}): "
                "add GPU nodes (ray start --num-gpus=N), raise cluster.wait_for_gpus_seconds, or run with device=auto"
            )
        return (
            f"the Ray cluster has no node with a whole CPU or a GPU for workers and none joined {waited}: "
            "add nodes (ray start --num-cpus=N) or raise cluster.wait_for_gpus_seconds"
        )
