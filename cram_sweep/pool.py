"""A pool of CramWorker actors, shaped like `ray.util.ActorPool`: `submit` work items, `get_next` events.

Each worker runs one item at a time as a streaming call. `get_next` turns what comes back into events:
`Row` (a finished sample), `Beat` (progress of running samples), `Lost` (the item's call failed: the
samples it had not returned, and why) and `Stranded` (no worker is left to run queued items). A worker
that dies (killed, OOM-killed, node lost) is restarted by Ray and gets new work only once it answers
a ping again, so a retry is never burnt on a restarting actor.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Union

import ray

from .cram import Heartbeat
from .worker import Finished, WorkItem

log = logging.getLogger("cram_sweep")


@dataclass
class Row:
    item: WorkItem
    finished: Finished


@dataclass
class Beat:
    item: WorkItem
    heartbeat: Heartbeat


@dataclass
class Lost:
    item: WorkItem  # only the samples the call had not returned
    error: ray.exceptions.RayError


@dataclass
class Stranded:
    items: list[WorkItem]


Event = Union[Row, Beat, Lost, Stranded]


class WorkerPool:
    RESTART_SECONDS = 300  # how long a dead worker may take to come back before the pool goes on without it
    PING_INTERVAL = 0.5

    def __init__(self, workers: list):
        self.queue: deque = deque()
        self.idle = list(workers)
        self.running: dict[object, tuple[object, WorkItem]] = {}  # streaming call -> (worker, item)
        self.waking: dict[object, tuple[object, float]] = {}  # ping ref -> (worker, first ping time)
        self.ping_later: list[tuple[float, object, float]] = []  # (when, worker, first ping time)

    def submit(self, item: WorkItem) -> None:
        self.queue.append(item)

    def has_work(self) -> bool:
        return bool(self.queue or self.running)

    def get_next(self, timeout: float = 1.0) -> list[Event]:
        """Start queued items on idle workers, then wait up to `timeout` for what comes back."""
        self._ping_due()
        while self.idle and self.queue:
            item, worker = self.queue.popleft(), self.idle.pop()
            self.running[worker.run.options(num_returns="streaming").remote(item)] = (worker, item)
        if self.queue and not (self.idle or self.running or self.waking or self.ping_later):
            stranded = list(self.queue)
            self.queue.clear()
            return [Stranded(stranded)]
        if not (self.running or self.waking):  # only workers waiting to be pinged again
            time.sleep(min(timeout, 0.2))
            return []
        ready, _ = ray.wait(list(self.running) + list(self.waking), num_returns=1, timeout=timeout)
        events = []
        for ref in ready:
            if ref in self.waking:
                self._woken(ref)
            else:
                events += self._streamed(ref)
        return events

    def _ping_due(self) -> None:
        now = time.monotonic()
        for entry in [e for e in self.ping_later if e[0] <= now]:
            self.ping_later.remove(entry)
            self.waking[entry[1].ping.remote()] = (entry[1], entry[2])

    def _woken(self, ref) -> None:
        worker, since = self.waking.pop(ref)
        try:
            ray.get(ref)
            self.idle.append(worker)
        except ray.exceptions.RayError as err:
            if time.monotonic() - since < self.RESTART_SECONDS:
                self.ping_later.append((time.monotonic() + self.PING_INTERVAL, worker, since))
            else:
                log.warning(
                    "a Ray worker did not come back within %d s (%s): going on without it", self.RESTART_SECONDS, type(err).__name__
                )

    def _streamed(self, ref) -> list[Event]:
        worker, item = self.running[ref]
        try:
            out = ray.get(next(ref))
        except StopIteration:
            del self.running[ref]
            self.idle.append(worker)
            return []
        except ray.exceptions.RayError as err:
            del self.running[ref]
            if isinstance(err, ray.exceptions.RayTaskError):
                self.idle.append(worker)  # the task raised; the worker itself is fine
            else:
                self.waking[worker.ping.remote()] = (worker, time.monotonic())
            return [Lost(item, err)]
        if isinstance(out, Heartbeat):
            return [Beat(item, out)]
        finished = (out.result.cell, out.result.sample)
        remaining = replace(item, specs=[s for s in item.specs if (s.cell, s.sample) != finished])
        self.running[ref] = (worker, remaining)
        return [Row(item, out)]
