"""SIGTERM (Slurm, `ray job stop`, kill) and SIGINT (Ctrl-C) end a sweep promptly at every point, start-up included.

The handler raises KeyboardInterrupt, which the CLI turns into "finished samples are stored; resume".
An exception raised by a signal handler is swallowed where it lands in a finalizer (seen: inside
logging's lock release during `ray.init`), so the handler also leaves a flag that `check()` raises
again at safe points (between the driver's events). While Ray starts (`immediate()`), nothing is computed
yet and ray.init can run on for tens of seconds, so there the handler ends the process at once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from typing import Optional

requested: Optional[str] = None
_immediate = False


def _handler(signum, _frame) -> None:
    global requested
    requested = signal.Signals(signum).name
    if _immediate:
        print(f"interrupted ({requested}) while Ray was starting: nothing was computed", file=sys.stderr, flush=True)
        os._exit(128 + signum)
    raise KeyboardInterrupt(requested)


@contextlib.contextmanager
def immediate():
    """A signal within this block ends the process at once (Ray's local processes share its fate)."""
    global _immediate
    _immediate = True
    try:
        yield
    finally:
        _immediate = False


def install() -> None:
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _handler)


def check() -> None:
    if requested:
        raise KeyboardInterrupt(requested)
