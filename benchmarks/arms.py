"""The one way a benchmark runs an arm: `cram-sweep run` as a user runs it, under `out/name`; a started arm is resumed
with the settings it was started with, a finished one read back (resume runs nothing then)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def run_arm(name: str, out: Path, overrides: list[str]) -> Path:
    """The arm's sweep directory, once its sweep has finished."""
    sweep = Path(out) / name
    command = [sys.executable, "-m", "cram_sweep.cli"]
    if (sweep / "sweep.yaml").is_file():
        command += ["resume", str(sweep)]
    else:
        command += ["run", f"name={name}", f"out_dir={out}", *overrides]
    print(f"== {name}: {' '.join(command[3:])}", file=sys.stderr, flush=True)
    subprocess.run(command, check=True)
    return sweep
