"""The Ray actor that crams: one per GPU (or CPU node), each model loaded once, one result per finished sample.

The sweep-wide settings (`WorkerSettings`) reach a worker once, when it is created (and again when Ray
restarts it); a `WorkItem` carries only a cell and its samples.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Optional, Union

import ray
import torch

from . import faults
from .config import Cell, ModelConfig, OptimConfig, SweepConfig
from .cram import Heartbeat, SampleResult, SampleSpec, cram
from .model import load_model, resolve_attention, resolve_precision

log = logging.getLogger("cram_sweep")


@dataclass
class WorkerSettings:
    """What every work item of a sweep shares."""

    models: dict[str, ModelConfig]
    optim: OptimConfig
    precision: str
    attention: str
    batch_size: Union[int, str]
    device: str
    check_every: int
    progress_seconds: float

    @classmethod
    def of(cls, cfg: SweepConfig) -> WorkerSettings:
        return cls(
            cfg.models,
            cfg.optim,
            cfg.precision,
            cfg.attention,
            cfg.batch_size,
            cfg.device,
            cfg.worker.check_every,
            cfg.worker.progress_seconds,
        )


@dataclass
class WorkItem:
    cell: Cell
    specs: list[SampleSpec]
    batch_size: Optional[int] = None  # None: the sweep's; set lower when Ray's memory monitor killed a worker


@dataclass
class Finished:
    """A finished sample with what only the worker knows: the precision it ran and the model's sizes."""

    result: SampleResult
    precision: str
    hidden: int
    vocab_size: int


def auto_batch_size(lm, length: int, n_mem: int) -> int:
    """CPU: 4 samples per core keeps the matmuls large. GPU: what fits in 80% of free memory."""
    if lm.device.type != "cuda":
        return 4 * torch.get_num_threads()
    free, _ = torch.cuda.mem_get_info(lm.device)
    tokens = length + n_mem
    layers = getattr(lm.model.config, "num_hidden_layers", 32)
    per_sample = tokens * (lm.hidden * layers * 40 + lm.vocab_size * 12)
    return int(max(1, min(512, 0.8 * free // per_sample)))


def is_oom(err: BaseException) -> bool:
    """torch.OutOfMemoryError (CUDA), or the RuntimeError the CPU allocator raises."""
    return isinstance(err, torch.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and ("can't allocate memory" in str(err) or "out of memory" in str(err))
    )


@ray.remote(max_restarts=-1, max_task_retries=0)
class CramWorker:
    """Out of memory in a batch: the samples not yet returned start again (same seeds, so the same
    results) with half the batch size, down to 1. A killed worker is restarted by Ray (max_restarts)
    and the driver resubmits what it had not returned (see pool.WorkerPool)."""

    def __init__(self, settings: WorkerSettings):
        self.settings = settings
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        torch.set_num_threads(max(1, int(cpus)))

    def ping(self) -> int:
        return os.getpid()

    def run(self, item: WorkItem) -> Iterator[Union[Finished, Heartbeat]]:
        s, cell = self.settings, item.cell
        lm = load_model(cell.model, s.models[cell.model], s.device)
        precision = resolve_precision(s.precision, lm.family, lm.device)
        attention = resolve_attention(s.attention, lm.device, cell.length + cell.n_mem)
        batch_size = item.batch_size or s.batch_size
        if batch_size == "auto":
            batch_size = auto_batch_size(lm, cell.length, cell.n_mem)
        check_every = s.check_every or (16 if lm.device.type == "cuda" else 1)
        pending = {spec.sample: spec for spec in item.specs}
        with faults.injected(lm.model, cell.id, item.specs):
            while pending:
                try:
                    for out in cram(
                        lm.model,
                        list(pending.values()),
                        cell.n_mem,
                        s.optim,
                        precision,
                        batch_size,
                        check_every,
                        attention=attention,
                        heartbeat_seconds=s.progress_seconds,
                    ):
                        if isinstance(out, SampleResult):
                            del pending[out.sample]
                            out = Finished(out, precision, lm.hidden, lm.vocab_size)
                        yield out
                    continue
                except (torch.OutOfMemoryError, RuntimeError) as err:
                    if not is_oom(err) or batch_size == 1:
                        raise
                # outside the except block, so the failed batch's tensors are no longer referenced
                batch_size //= 2
                log.warning("out of memory on %s: retrying %d samples with batch_size=%d", cell.id, len(pending), batch_size)
                gc.collect()
                if lm.device.type == "cuda":
                    torch.cuda.empty_cache()
