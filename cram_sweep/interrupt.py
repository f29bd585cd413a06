"""SIGTERM (Slurm, `ray job stop`, kill) and SIGINT (Ctrl-C) end a sweep promptly at every point, start-up included.

The handler raises KeyboardInterrupt, which the CLI turns into "finished samples are stored; resume".
An exception raised by a signal handler is swallowed where it lands in a finalizer (seen: inside
logging's lock release during `ray.init`), so the handler also leaves a flag that `check()` raises
again at safe points: after Ray's start-up and between the driver's events.
"""

from __future__ import annotations

import signal
from typing import Optional

requested: Optional[str] = None


def _handler(signum, _frame) -> None:
    global requested
    requested = signal.Signals(signum).name
    raise KeyboardInterrupt(requested)


def install() -> None:
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _handler)


def check() -> None:
    if requested:
        raise KeyboardInterrupt(requested)
