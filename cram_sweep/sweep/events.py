"""What the worker pool (pool.py) hands the driver: one event per thing that happened, and the workers they name."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from ..engine.cram import Heartbeat, SampleSpec
from .worker import Finished, WorkItem


@dataclass(eq=False)
class Worker:
    """One CramWorker actor as the pool knows it."""

    actor: object
    kind: str  # "gpu" | "cpu"
    target: Optional[str] = None  # the node it was started for (soft affinity)
    node: str = ""  # the node its latest ping answered from

    @property
    def claim(self) -> Optional[str]:
        """The node whose slot it holds or is headed for (None: anywhere)."""
        return self.node or self.target


class Stalled(Exception):
    """A running item streamed nothing (no heartbeat, no result) for worker.stall_seconds."""


@dataclass
class Row:
    item: WorkItem
    finished: Finished
    node: str  # the node of the worker that ran it


@dataclass
class Beat:
    item: WorkItem
    heartbeat: Heartbeat


@dataclass
class Lost:
    item: WorkItem  # only the samples the call had not returned, in order
    error: BaseException  # the call's RayError, or Stalled
    started: int  # how many of item.specs, from the first, count as run (an attempt each); the others never started
    node: str = ""  # where its worker ran ("" if it never answered)

    @property
    def ran(self) -> list[SampleSpec]:
        return self.item.specs[: self.started]


@dataclass
class Grew:
    workers: list[Worker]  # the workers started, each for a slot of its `target` node
    total: int  # workers in the pool now


@dataclass
class Retired:
    workers: int  # CPU workers stopped
    samples: int  # unfinished samples of their items, queued again, uncharged


@dataclass
class Stranded:
    items: list[WorkItem]


Event = Union[Row, Beat, Lost, Grew, Retired, Stranded]
