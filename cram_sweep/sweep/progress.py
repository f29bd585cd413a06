"""A sweep's progress on stderr: a live tqdm bar on a terminal; elsewhere (Slurm output files,
`ray job logs`, CI) one plain line at most every `line_seconds`, since a bar's `\\r` frames would pile
up kilobytes per minute on one line there."""

from __future__ import annotations

import sys
import time
from typing import Optional

from tqdm import tqdm


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
