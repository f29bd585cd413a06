"""A sweep's progress on stderr: a live tqdm bar on a terminal; elsewhere (Slurm output files,
`ray job logs`, CI) one plain line at most every `line_seconds`, since a bar's `\\r` frames would pile
up kilobytes per minute on one line there."""

from __future__ import annotations

import sys
import time
from collections import Counter
from typing import Optional

from tqdm import tqdm

from .events import Grew, Retired


class Progress:
    def __init__(self, total: int, max_steps: int, line_seconds: float, stream=None):
        self.stream = stream or sys.stderr
        self.total, self.max_steps, self.line_seconds = total, max_steps, line_seconds
        self.done = self.failed = 0
        self.running: Optional[str] = None
        self.started = self.last_line = time.monotonic()
        self.bar = tqdm(total=total, unit="sample", file=self.stream, dynamic_ncols=True, smoothing=0.1) if self.stream.isatty() else None

    def sample_done(self, cell_id: str, failed: int, horizon: Optional[int] = None) -> None:
        """`horizon`: a progressive sample's, shown with its cell."""
        self.done, self.failed = self.done + 1, failed
        if self.bar is not None:
            reached = f" horizon={horizon}" if horizon is not None else ""
            self.bar.set_postfix_str(f"{cell_id}{reached} failed={failed}", refresh=False)
            self.bar.update(1)
        else:
            self._line()

    def heartbeat(self, label: str, live: int, steps: int, failed: int, stage_length: int = 0, compile_seconds: float = 0.0) -> None:
        """`stage_length`: the longest stage a running progressive sample has reached; `compile_seconds`: the item's steps
        that compiled a graph (compile on)."""
        self.failed = failed
        stage = f", stages up to length {stage_length}" if stage_length else ""
        compiling = f", compiled in {compile_seconds:.0f} s" if compile_seconds else ""
        self.running = f"{label} {live} running, step {steps}/{self.max_steps}{stage}{compiling}"
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.running} failed={failed}")
        else:
            self._line()

    def _line(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_line < self.line_seconds:
            return
        self.last_line = now
        elapsed = now - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = tqdm.format_interval((self.total - self.done) / rate) if rate > 0 else "?"
        running = f", {self.running}" if self.running and self.done < self.total else ""
        print(
            f"progress: {self.done}/{self.total} samples, {rate * 60:.2f} samples/min, elapsed {tqdm.format_interval(elapsed)}, "
            f"ETA {eta}, failed {self.failed}{running}",
            file=self.stream,
            flush=True,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        else:
            self._line(force=True)


class WorkerLines:
    """The driver's lines about its workers, on stderr: the pool it starts with, the workers added later (for nodes
    that joined, or slots whose worker was given up), and each such node's first sample, with the seconds since
    its worker was added."""

    def __init__(self, grows: bool):
        self.grows = grows  # the pool follows the cluster (cluster=ray, no fixed worker.count)
        self.started = False
        self.joined: dict[str, float] = {}  # node -> when workers were added for it, until its first sample

    def grew(self, event: Grew) -> None:
        kinds = ", ".join(f"{count} {kind.upper()}" for kind, count in sorted(Counter(w.kind for w in event.workers).items()))
        nodes = sorted({worker.target for worker in event.workers if worker.target})
        where = f" on node{'s' * (len(nodes) != 1)} {', '.join(node[:8] for node in nodes)}" if nodes else ""
        if self.started:
            self.joined.update({node: time.monotonic() for node in nodes})
            print(f"workers: {kinds} added{where}; {event.total} in all", file=sys.stderr, flush=True)
        else:
            more = "; more as nodes join while work is queued" if self.grows else ""
            print(f"workers: {kinds}{where}{more}", file=sys.stderr, flush=True)
        self.started = True

    def row(self, node: str) -> None:
        joined = self.joined.pop(node, None)
        if joined is not None:
            print(
                f"workers: node {node[:8]} returned its first sample {time.monotonic() - joined:.1f} s after its worker was added",
                file=sys.stderr,
                flush=True,
            )

    @staticmethod
    def retired(event: Retired) -> None:
        print(
            f"workers: GPU workers are up: {event.workers} CPU workers stopped; their {event.samples} unfinished samples run on GPUs "
            "(no attempt charged)",
            file=sys.stderr,
            flush=True,
        )
