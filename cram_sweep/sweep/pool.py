"""A pool of CramWorker actors that follows the cluster: `submit` work items, `get_next` events.

Each worker runs one item at a time as a streaming call: `Started` (its batch size, once the model is loaded),
then heartbeats and one result per finished sample. `get_next` turns what comes back into events:

- `Row`: a finished sample, with the node its worker runs on;
- `Beat`: progress of the running samples;
- `Lost`: the call failed or stalled: the samples it had not returned, how many of them count as run, and why;
- `Grew`: workers started for free slots of the cluster (at the start, and as GPUs or CPU nodes join);
- `Retired`: CPU workers stopped because GPU workers are up (device=auto); their samples are queued again;
- `Stranded`: no worker is left to run the queued items.

What holds:
- A worker gets work only once it answers a ping (created, or restarted by Ray after it died or was killed),
  so a retry is never burnt on a worker that is still starting. One that does not answer within
  RESTART_SECONDS is given up: killed for good, so it stops asking Ray for resources.
- While items are queued, the pool asks its scaler (cluster.Scaler) every GROW_SECONDS for workers on the free
  slots of the cluster, and the autoscaler request follows the items left (queued or running); the driver
  releases it at the end.
- The engine admits an item's samples in order, at most the batch size `Started` reported at a time, so of the
  samples a call had not returned, only the first `batch_size` can have run: `Lost.started`. A call lost
  before `Started` (its worker died loading the model) ran none, and nothing is charged; but every
  MAX_UNSTARTED_LOSSES-th such loss in a row of one item counts all its samples as run, so a model that
  kills every worker that loads it still ends in failed samples. A task that raised before `Started` counts
  all its samples too.
- A running call that streams nothing for `stall_seconds` is stalled: its worker is killed (Ray restarts it)
  and the call is `Lost` with a `Stalled` error.
- GPU workers replace CPU workers: when the first GPU worker answers, every CPU worker is killed and the
  unfinished samples of its item go back to the front of the queue, uncharged.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Protocol

import ray

from ..engine.cram import Heartbeat
from .events import Beat, Event, Grew, Lost, Retired, Row, Stalled, Stranded, Worker
from .worker import Started, WorkItem, stream

log = logging.getLogger("cram_sweep")


@dataclass
class Call:
    """One item running on one worker."""

    worker: Worker
    item: WorkItem  # the samples it has not returned yet, in the order the engine admits them
    last: float  # when it last streamed anything (or was started): the stall clock
    batch_size: int = 0  # from Started; 0 while the model loads

    def take(self, out) -> list[Event]:
        """What the call streamed (Started, a Heartbeat or a Finished sample) as events; a finished sample leaves `item`."""
        self.last = time.monotonic()
        if isinstance(out, Started):
            self.batch_size = out.batch_size
            return []
        if isinstance(out, Heartbeat):
            return [Beat(self.item, out)]
        finished = out.result.key
        row = Row(self.item, out, self.worker.node)
        self.item = replace(self.item, specs=[s for s in self.item.specs if s.key != finished])
        return [row]


@dataclass
class Waking:
    """A worker the pool waits on to answer a ping: just created, or being restarted by Ray."""

    worker: Worker
    since: float  # its first ping: RESTART_SECONDS count from here
    ping_at: float = 0.0  # after a failed ping: when to ping it again


class Scaler(Protocol):
    """What the pool needs of the cluster (cluster.Scaler)."""

    def grow(self, workers: list[Worker]) -> list[Worker]:
        """New workers for the free slots, given the pool's workers."""

    def request(self, items: int) -> None:
        """Ask the autoscaler for what `items` work items could use at once (0: release)."""


class WorkerPool:
    """`submit` work items, `get_next` events (as ray.util.ActorPool, with the workers following the cluster).
    Its state is its own: every worker is in exactly one of idle, running (a call), waking (a ping in flight) or
    waiting to be pinged again."""

    RESTART_SECONDS = 300  # how long a worker may take to start or come back before the pool goes on without it
    PING_INTERVAL = 0.5
    GROW_SECONDS = 1.0  # how often the cluster is looked at for free slots while items are queued
    MAX_UNSTARTED_LOSSES = 3

    def __init__(self, scaler: Scaler, stall_seconds: float):
        self.scaler = scaler
        self.stall_seconds = stall_seconds
        self._queue: deque[WorkItem] = deque()
        self._idle: list[Worker] = []
        self._running: dict[object, Call] = {}  # streaming call -> what it runs
        self._waking: dict[object, Waking] = {}  # ping ref -> the worker it asks
        self._ping_later: list[Waking] = []
        self._last_grow = -math.inf

    def submit(self, item: WorkItem) -> None:
        self._queue.append(item)

    def has_work(self) -> bool:
        """Items are queued or running."""
        return bool(self._queue or self._running)

    def workers(self) -> list[Worker]:
        """Every worker the pool holds: idle, running, or not answering yet."""
        waking = [w.worker for w in self._waking.values()] + [w.worker for w in self._ping_later]
        return self._idle + [call.worker for call in self._running.values()] + waking

    def get_next(self, timeout: float = 1.0) -> list[Event]:
        """Start workers on free slots, queued items on idle workers, then wait up to `timeout` for what comes back."""
        events = self._grow()
        self._ping_due()
        while self._idle and self._queue:
            worker, item = self._idle.pop(), self._queue.popleft()
            self._running[stream(worker.actor, item)] = Call(worker, item, time.monotonic())
        self.scaler.request(len(self._queue) + len(self._running))
        if self._queue and not self.workers():
            stranded = list(self._queue)
            self._queue.clear()
            return events + [Stranded(stranded)]
        if not (self._running or self._waking):  # only workers waiting to be pinged again
            time.sleep(min(timeout, 0.2))
            return events
        ready, _ = ray.wait(list(self._running) + list(self._waking), num_returns=1, timeout=timeout)
        for ref in ready:
            events += self._woken(ref) if ref in self._waking else self._streamed(ref)
        return events + self._overdue()

    def _grow(self) -> list[Event]:
        """Workers for the cluster's free slots, while items are queued: every GROW_SECONDS, or at once when the
        pool has no worker left."""
        due = time.monotonic() - self._last_grow >= self.GROW_SECONDS or not self.workers()
        if not (self._queue and due):
            return []
        self._last_grow = time.monotonic()
        new = self.scaler.grow(self.workers())
        for worker in new:
            self._ping(Waking(worker, time.monotonic()))
        return [Grew(new, len(self.workers()))] if new else []

    def _ping(self, waking: Waking) -> None:
        self._waking[waking.worker.actor.ping.remote()] = waking

    def _ping_due(self) -> None:
        now = time.monotonic()
        for waking in [w for w in self._ping_later if w.ping_at <= now]:
            self._ping_later.remove(waking)
            self._ping(waking)

    def _woken(self, ref) -> list[Event]:
        waking = self._waking.pop(ref)
        worker = waking.worker
        try:
            worker.node = ray.get(ref).node
        except ray.exceptions.RayError as err:
            if time.monotonic() - waking.since < self.RESTART_SECONDS:
                self._ping_later.append(replace(waking, ping_at=time.monotonic() + self.PING_INTERVAL))
            else:
                self._give_up(worker, type(err).__name__)
            return []
        self._idle.append(worker)
        return self._retire_cpu_workers() if worker.kind == "gpu" else []

    def _give_up(self, worker: Worker, why: str) -> None:
        log.warning("a Ray worker did not start or come back within %d s (%s): going on without it", self.RESTART_SECONDS, why)
        ray.kill(worker.actor, no_restart=True)

    def _retire_cpu_workers(self) -> list[Event]:
        """GPU workers are up: stop every CPU worker; the unfinished samples of their items go back to the front
        of the queue, charged nothing (rows they streamed and the driver has not read are computed again)."""
        retired = [worker for worker in self.workers() if worker.kind == "cpu"]
        if not retired:
            return []
        samples = 0
        for ref, call in list(self._running.items()):
            if call.worker.kind == "cpu":
                del self._running[ref]
                self._queue.appendleft(call.item)
                samples += len(call.item.specs)
        self._idle = [worker for worker in self._idle if worker.kind != "cpu"]
        self._waking = {ref: waking for ref, waking in self._waking.items() if waking.worker.kind != "cpu"}
        self._ping_later = [waking for waking in self._ping_later if waking.worker.kind != "cpu"]
        for worker in retired:
            ray.kill(worker.actor, no_restart=True)
        return [Retired(len(retired), samples)]

    def _streamed(self, ref) -> list[Event]:
        call = self._running[ref]
        try:
            out = ray.get(next(ref))
        except StopIteration:
            del self._running[ref]
            self._idle.append(call.worker)
            return []
        except ray.exceptions.RayError as err:
            del self._running[ref]
            return [self._lost(call, err)]
        return call.take(out)

    def _lost(self, call: Call, err: BaseException) -> Lost:
        """The unreturned samples of a failed or stalled call (`charged`). A task that raised leaves its worker fine, idle
        again; a dead or killed worker is pinged until Ray has restarted it."""
        if isinstance(err, ray.exceptions.RayTaskError):
            self._idle.append(call.worker)
        else:
            self._ping(Waking(call.worker, time.monotonic()))
        return charged(call, err, self.MAX_UNSTARTED_LOSSES)

    def _overdue(self) -> list[Event]:
        """Stalled calls (their workers killed, restarted by Ray) and workers that never answered (given up)."""
        now, events = time.monotonic(), []
        for ref, call in list(self._running.items()):
            if now - call.last > self.stall_seconds:
                del self._running[ref]
                ray.kill(call.worker.actor, no_restart=False)
                stalled = Stalled(
                    f"no heartbeat or result for {now - call.last:.0f} s (worker.stall_seconds={self.stall_seconds:g}); its worker was killed"
                )
                events.append(self._lost(call, stalled))
        for ref, waking in list(self._waking.items()):
            if now - waking.since > self.RESTART_SECONDS:
                del self._waking[ref]
                self._give_up(waking.worker, "no answer")
        return events


def charged(call: Call, err: BaseException, max_unstarted_losses: int) -> Lost:
    """The unreturned samples of a lost call, with how many count as run (see the module's docstring)."""
    item, started = call.item, min(call.batch_size, len(call.item.specs))
    if isinstance(err, ray.exceptions.RayTaskError):
        return Lost(item, err, started if call.batch_size else len(item.specs), call.worker.node)
    if call.batch_size:
        return Lost(replace(item, unstarted_losses=0), err, started, call.worker.node)
    losses = item.unstarted_losses + 1
    if losses == max_unstarted_losses:
        return Lost(replace(item, unstarted_losses=0), err, len(item.specs), call.worker.node)
    return Lost(replace(item, unstarted_losses=losses), err, 0, call.worker.node)
