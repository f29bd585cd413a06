"""What `cram-sweep bench` measures with: a row of its table (`BenchRow`: throughput, memory, MFU), the peak memory
of a block (`PeakMemory`), and the accelerators' dense peaks MFU divides by."""

from __future__ import annotations

import re
import resource
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import torch

from ..engine.roundings import BF16
from ..engine.runtime import BF16_FORWARD

# Dense peak FLOP/s of common accelerators per precision (fp32 runs its matmuls as TF32), for MFU.
# Matched by substring of the device name, in this order (A100 before A10).
PEAK_FLOPS = {
    "H100": {"bf16": 989e12, "fp32": 495e12},
    "H200": {"bf16": 989e12, "fp32": 495e12},
    "A100": {"bf16": 312e12, "fp32": 156e12},
    "L40S": {"bf16": 362e12, "fp32": 181e12},
    "A10": {"bf16": 125e12, "fp32": 62.5e12},
}


@dataclass
class BenchRow:
    method: str
    precision: str
    batch_size: int
    seconds: float  # wall time, per-sample set-up included
    step_seconds: float  # time in optimization steps alone
    samples: int
    sample_steps: float
    peak_mem_gb: float
    flops: float
    compile_seconds: float = 0.0  # the engine's warm-up at this shape, where it compiled

    @property
    def sample_steps_per_s(self) -> float:
        return self.sample_steps / self.step_seconds

    @property
    def samples_per_hour(self) -> float:
        return 3600 * self.samples / self.seconds

    def plus(self, other: BenchRow) -> BenchRow:
        """This row and another round of the same measurement, as one."""
        return replace(
            self,
            seconds=self.seconds + other.seconds,
            step_seconds=self.step_seconds + other.step_seconds,
            samples=self.samples + other.samples,
            sample_steps=self.sample_steps + other.sample_steps,
            peak_mem_gb=max(self.peak_mem_gb, other.peak_mem_gb),
            flops=self.flops + other.flops,
        )

    def as_dict(self, baseline: BenchRow, device_peaks: Optional[dict[str, float]]) -> dict:
        sample_steps = self.sample_steps_per_s
        base_steps = baseline.sample_steps_per_s
        achieved = self.flops / self.step_seconds
        return {
            "method": self.method,
            "precision": self.precision,
            "batch": self.batch_size,
            "sample_steps_per_s": round(sample_steps, 3),
            "samples_per_hour": round(self.samples_per_hour, 1),
            "x_steps_vs_paper": round(sample_steps / base_steps, 2),
            "peak_mem_gb": round(self.peak_mem_gb, 2),
            "gflop_s": round(achieved / 1e9, 1),
            "mfu": round(achieved / device_peaks[BF16 if self.precision in BF16_FORWARD else self.precision], 3) if device_peaks else "",
            "compile_s": round(self.compile_seconds, 1),
        }


class PeakMemory:
    """Peak GPU memory, or the process's peak resident memory on CPU (Linux resets it on entry)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif Path("/proc/self/clear_refs").exists():
            Path("/proc/self/clear_refs").write_text("5")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif Path("/proc/self/status").exists():
            self.peak = int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024
        else:  # the peak since the process started (bytes on macOS)
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    @property
    def gb(self) -> float:
        return self.peak / 1e9


def peak_flops(device_name: str) -> Optional[dict[str, float]]:
    return next((peaks for name, peaks in PEAK_FLOPS.items() if name in device_name), None)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
