"""SIGTERM (Slurm, `ray job stop`, kill) and SIGINT (Ctrl-C) end a sweep promptly at every point, start-up included.

The handler raises KeyboardInterrupt, which the CLI turns into "finished samples are stored; resume".
An exception raised by a signal handler is swallowed where it lands in a finalizer (seen: inside
logging's lock release during `ray.init`), so the handler also leaves a flag that `check()` raises
again at safe points (between the driver's events). While Ray starts (`immediate()`), nothing is computed
yet and ray.init can run on for tens of seconds, so there the handler ends the process at once, and with it the
processes Ray has started so far: a GCS server started by a driver that died mid-start-up was seen left running.
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
        _kill_children()
        os._exit(128 + signum)
    raise KeyboardInterrupt(requested)


def _kill_children() -> None:
    """Every process this driver started (at start-up: Ray's local ones, or the preflight that joins a cluster)."""
    import psutil

    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            child.kill()


@contextlib.contextmanager
def immediate():
    """A signal within this block ends the process and every process it started, at once."""
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
