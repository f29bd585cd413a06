"""The Ray actor that crams: one per GPU (or CPU node), each model loaded once, one result per finished sample.

The sweep-wide settings (`WorkerSettings`) reach a worker once, when it is created (and again when Ray
restarts it); a `WorkItem` carries samples of one model, method and n_mem, from any of its cells (each sample names
its cell), so a worker's batch stays full from one cell to the next.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Optional, Union

import ray
import torch

from ..config import AnalysisConfig, MethodSettings, ModelConfig, ParamConfig, SweepConfig
from ..engine.batching import auto_batch_size, cram_fitting
from ..engine.cram import Heartbeat, SampleResult, SampleSpec
from ..engine.layout import batch_rows
from ..engine.model import load_model, resolve_attention, resolve_precision, truncated
from ..engine.param import Basis, parametrization
from ..engine.runtime import resolve_compile
from ..results.columns import depth_part
from . import faults
from .grid import method_settings, rows_per_length


@dataclass
class WorkerSettings:
    """What every work item of a sweep shares."""

    models: dict[str, ModelConfig]
    methods: dict[str, MethodSettings]
    param: ParamConfig
    precision: str
    attention: str
    batch_size: Union[int, str]
    rows_per_length: int  # the most rows of one length a work item holds (grid.rows_per_length)
    batch_invariant: bool
    compile: Union[bool, str]
    device: str
    check_every: int
    progress_seconds: float
    analysis: AnalysisConfig

    @classmethod
    def of(cls, cfg: SweepConfig) -> WorkerSettings:
        return cls(
            cfg.models,
            method_settings(cfg),
            cfg.param,
            cfg.precision,
            cfg.attention,
            cfg.batch_size,
            rows_per_length(cfg),
            cfg.batch_invariant,
            cfg.compile,
            cfg.device,
            cfg.worker.check_every,
            cfg.worker.progress_seconds,
            cfg.analysis,
        )


@dataclass
class WorkItem:
    model: str
    method: str  # a key of WorkerSettings.methods
    n_mem: int
    specs: list[SampleSpec]  # shortest first: the engine pads a batch to its longest text
    batch_size: Optional[int] = None  # None: the sweep's; set lower when Ray's memory monitor killed a worker
    basis: Optional[Basis] = None  # optim.init=pca: the stored sweep's principal directions for this model
    unstarted_losses: int = 0  # its calls lost in a row before it started (pool.WorkerPool.MAX_UNSTARTED_LOSSES)
    layers: int = 0  # the decoder layers the model keeps (engine/model.truncated), 0: all

    @property
    def label(self) -> str:
        cells = sorted({spec.cell for spec in self.specs})
        return (
            cells[0] if len(cells) == 1 else f"{self.model}/{self.method}/n_mem={self.n_mem}{depth_part(self.layers)} ({len(cells)} cells)"
        )


@dataclass
class Started:
    """The first thing a work item streams, once its model is loaded: the batch size it runs with.

    The engine admits an item's samples in the order given, at most `batch_size` at a time (and fewer after an
    out-of-memory halving), so of the samples the item has not returned yet, only the first `batch_size` can
    have run; the others are still queued (pool.Lost.started)."""

    batch_size: int


@dataclass
class Placement:
    """Where a worker runs, as its ping answers: its process and its Ray node (hex id)."""

    pid: int
    node: str


@dataclass
class Finished:
    """A finished sample with what only the worker knows: the precision it ran and the model's sizes."""

    result: SampleResult
    precision: str
    hidden: int
    vocab_size: int


def stream(actor, item: WorkItem):
    """Run `item` on a CramWorker actor as a streaming call (an ObjectRefGenerator): what `CramWorker.run` yields."""
    return actor.run.options(num_returns="streaming").remote(item)


@ray.remote(max_restarts=-1, max_task_retries=0)
class CramWorker:
    """Out of memory in a batch: the samples not yet returned start again with half the batch size
    (batching.cram_fitting). A killed worker is restarted by Ray (max_restarts) and the driver resubmits
    what it had not returned (see pool.WorkerPool). `run` streams `Started`, then heartbeats and one
    `Finished` per sample."""

    def __init__(self, settings: WorkerSettings):
        self.settings = settings
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        torch.set_num_threads(max(1, int(cpus)))

    def ping(self) -> Placement:
        return Placement(os.getpid(), ray.get_runtime_context().get_node_id())

    def run(self, item: WorkItem) -> Iterator[Union[Started, Finished, Heartbeat]]:
        s = self.settings
        settings = s.methods[item.method]
        lm = load_model(item.model, s.models[item.model], s.device, s.precision)
        lm = replace(lm, model=truncated(lm.model, item.layers))  # loaded once, its truncations share its weights
        precision = resolve_precision(s.precision, lm.family, lm.device)
        longest = max(len(spec.token_ids) for spec in item.specs)
        attention = resolve_attention(s.attention, lm.device, longest + item.n_mem)
        batch_size = item.batch_size or s.batch_size
        if batch_size == "auto":
            batch_size = auto_batch_size(lm, longest, item.n_mem, precision)
        batch_size = batch_rows(batch_size, s.rows_per_length, s.batch_invariant)
        check_every = s.check_every or (16 if lm.device.type == "cuda" else 1)
        yield Started(batch_size)
        with faults.injected(lm.model, item.specs):
            for out in cram_fitting(
                lm,
                item.specs,
                item.n_mem,
                settings.optim,
                precision,
                batch_size,
                label=item.label,
                check_every=check_every,
                attention=attention,
                heartbeat_seconds=s.progress_seconds,
                method=settings.method,
                parametrization=parametrization(s.param, item.basis),
                analysis=s.analysis,
                batch_invariant=s.batch_invariant,
                compile_mode=resolve_compile(s.compile, lm.device),
            ):
                yield Finished(out, precision, lm.hidden, lm.vocab_size) if isinstance(out, SampleResult) else out
