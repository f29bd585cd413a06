"""The workers on the cluster: one per GPU (or CPU node), planned on the alive nodes as they join (`Scaler`, the
pool's view of the cluster); Ray itself is started or joined by ray_session.py."""

from __future__ import annotations

import logging
import math
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
