"""Progress on stderr: plain lines where there is no terminal, the live bar on a terminal; the bf16-on-CPU warning."""

import fcntl
import io
import os
import struct
import termios

from cram_sweep.sweep.progress import Progress


def test_without_a_terminal_progress_is_plain_lines_at_an_interval():
    log = io.StringIO()  # like a Slurm output file or `ray job logs`: not a terminal
    progress = Progress(total=3, max_steps=100, line_seconds=3600, stream=log)
    progress.heartbeat("m/d/n_mem=1/L=8", live=2, steps=40, failed=0)
    progress.sample_done("m/d/n_mem=1/L=8", failed=0)
    assert log.getvalue() == "", "nothing before the interval has passed"
    progress.line_seconds = 0
    progress.heartbeat("m/d/n_mem=1/L=8", live=2, steps=50, failed=1)
    progress.sample_done("m/d/n_mem=1/L=8", failed=1)
    progress.sample_done("m/d/n_mem=1/L=16", failed=1)
    progress.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and all(line.startswith("progress: ") for line in lines)
    assert lines[0].startswith("progress: 1/3 samples") and "failed 1, m/d/n_mem=1/L=8 2 running, step 50/100" in lines[0]
    assert "ETA " in lines[0] and "samples/min" in lines[0]
    assert lines[-1].startswith("progress: 3/3 samples") and "running" not in lines[-1]


def test_on_a_terminal_progress_is_the_live_bar():
    leader, follower = os.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))  # a terminal's size, as a real one has
    with os.fdopen(follower, "w") as terminal:
        progress = Progress(total=2, max_steps=100, line_seconds=0, stream=terminal)
        progress.sample_done("c", failed=0)
        progress.close()
    shown = os.read(leader, 65536).decode()
    os.close(leader)
    frames = shown.split("\r")
    assert len(frames) > 2 and "progress: " not in shown, "frames redrawn in place, no plain lines"
    assert any("1/2" in frame and "c failed=0" in frame for frame in frames), shown
