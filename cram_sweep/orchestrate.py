"""The driver: expand the grid into work items, run them on Ray workers, store and track the rows.

Workers (one per GPU, or one per CPU node) keep their model loaded and stream back one row per
finished sample. Only this driver writes the Parquet store and talks to MLflow.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import ray
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from . import store
from .config import Cell, UserError, cells, sample_seed
from .cram import SampleSpec, cram
from .data import sample_token_ids
from .model import cpu_threads, load_model, load_tokenizer, model_context, resolve_precision
from .tracking import Tracker

log = logging.getLogger("cram_sweep")
STORE_FLUSH_ROWS = 512


@dataclass
class WorkItem:
    cell: Cell
    model_cfg: dict
    specs: List[SampleSpec]
    optim: dict
    precision: str
    batch_size: object
    device: str
    check_every: int


def auto_batch_size(lm, length: int, n_mem: int) -> int:
    """CPU: 4 samples per core keeps the matmuls large. GPU: what fits in 80% of free memory."""
    if lm.device.type != "cuda":
        return 4 * torch.get_num_threads()
    free, _ = torch.cuda.mem_get_info(lm.device)
    tokens = length + n_mem
    layers = getattr(lm.model.config, "num_hidden_layers", 32)
    per_sample = tokens * (lm.hidden * layers * 40 + lm.vocab_size * 12)
    return int(max(1, min(512, 0.8 * free // per_sample)))


@ray.remote(max_restarts=-1, max_task_retries=0)
class CramWorker:
    """One per GPU (or CPU node): loads each model once and streams back one row per finished sample."""

    def __init__(self):
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        torch.set_num_threads(max(1, int(cpus)))

    def run(self, item: WorkItem):
        from .config import ModelConfig

        lm = load_model(item.cell.model, OmegaConf.merge(OmegaConf.structured(ModelConfig), item.model_cfg), item.device)
        precision = resolve_precision(item.precision, lm.family, lm.device)
        batch_size = item.batch_size
        if batch_size == "auto":
            batch_size = auto_batch_size(lm, item.cell.length, item.cell.n_mem)
        check_every = item.check_every or (16 if lm.device.type == "cuda" else 1)
        pending = {spec.sample: spec for spec in item.specs}
        while pending:
            try:
                for row in cram(lm.model, list(pending.values()), item.cell.n_mem, OmegaConf.create(item.optim), precision, batch_size, check_every):
                    del pending[row["sample"]]
                    yield {**row, "precision": precision, "hidden": lm.hidden, "vocab_size": lm.vocab_size}
            except torch.OutOfMemoryError:
                if batch_size == 1:
                    raise
                batch_size //= 2
                log.warning("out of memory on %s: retrying with batch_size=%d", item.cell.id, batch_size)
                if lm.device.type == "cuda":
                    torch.cuda.empty_cache()


@dataclass
class CellStats:
    done: int = 0
    failed: int = 0
    sums: Dict[str, float] = field(default_factory=lambda: defaultdict(float))

    def add(self, row: dict) -> None:
        self.done += 1
        for key in ("acc", "gain_tokens", "info_gain_bits", "seconds", "greedy_exact"):
            self.sums[key] += float(row[key])
        self.sums["greedy_prefix_max"] = max(self.sums["greedy_prefix_max"], row["greedy_prefix"])

    def metrics(self) -> Dict[str, float]:
        mean = lambda k: self.sums[k] / self.done if self.done else float("nan")  # noqa: E731
        return {
            "done": self.done, "failed": self.failed, "acc_mean": mean("acc"), "gain_tokens_mean": mean("gain_tokens"),
            "info_gain_bits_mean": mean("info_gain_bits"), "greedy_exact_share": mean("greedy_exact"),
            "seconds_mean": mean("seconds"), "greedy_prefix_max": self.sums["greedy_prefix_max"],
        }


def prepare_tokens(cfg: DictConfig) -> Dict[Tuple[str, str], Dict[int, List[int]]]:
    """Token ids of every sample, at the grid's longest length; all input errors surface here, before any work."""
    longest = max(cfg.grid.lengths)
    tokens = {}
    for model in cfg.grid.models:
        context = model_context(model, cfg.models[model])
        if longest + max(cfg.grid.n_mem) > context:
            raise UserError(f"grid.lengths max {longest} + grid.n_mem max {max(cfg.grid.n_mem)} exceeds the context of model {model} ({context} positions): lower them")
        tokenizer = load_tokenizer(model, cfg.models[model])
        for dataset in cfg.grid.datasets:
            tokens[model, dataset] = sample_token_ids(cfg.datasets[dataset], dataset, tokenizer, cfg.grid.samples, longest, cfg.seed)
    return tokens


def work_items(cfg: DictConfig, tokens, done: set) -> List[WorkItem]:
    per_item = cfg.worker.samples_per_item or (4 * cfg.batch_size if cfg.batch_size != "auto" else 64)
    items = []
    for cell in cells(cfg):
        specs = [
            SampleSpec(i, tokens[cell.model, cell.dataset][i][: cell.length], sample_seed(cfg.seed, cell, i))
            for i in range(cfg.grid.samples)
            if (cell.id, i) not in done
        ]
        for start in range(0, len(specs), per_item):
            items.append(WorkItem(
                cell, OmegaConf.to_container(cfg.models[cell.model]), specs[start : start + per_item],
                OmegaConf.to_container(cfg.optim), cfg.precision, cfg.batch_size, cfg.device, cfg.worker.check_every,
            ))
    return items


def connect_ray(cfg: DictConfig) -> None:
    if ray.is_initialized():
        return
    quiet = {"logging_level": logging.WARNING, "log_to_driver": True}
    if cfg.cluster.kind == "local":
        ray.init(num_cpus=cfg.cluster.num_cpus, include_dashboard=False, **quiet)
    else:
        address = cfg.cluster.address or os.environ.get("RAY_ADDRESS") or "auto"
        try:
            ray.init(address=address, **quiet)
        except (ConnectionError, RuntimeError) as err:
            raise UserError(f"cannot join the Ray cluster at {address} ({' '.join(str(err).split())[:150]}): start it or fix cluster.address / RAY_ADDRESS") from None


def start_workers(cfg: DictConfig) -> list:
    """One worker per GPU (worker.gpus each), else one per alive node holding all its CPUs."""
    gpus = ray.cluster_resources().get("GPU", 0)
    if gpus and cfg.device != "cpu":
        count = cfg.worker.count or int(gpus / cfg.worker.gpus)
        options = {"num_gpus": cfg.worker.gpus, "num_cpus": cfg.worker.cpus or 1}
    else:
        node_cpus = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]
        count = cfg.worker.count or len(node_cpus)
        options = {"num_cpus": cfg.worker.cpus or int(min(node_cpus)), "scheduling_strategy": "SPREAD"}
    return [CramWorker.options(**options).remote() for _ in range(max(1, count))]


class Sweep:
    """One execution of a sweep's pending samples; the Parquet store is the source of truth."""

    def __init__(self, cfg: DictConfig, sweep: store.SweepDir, tracker: Tracker):
        self.cfg = cfg
        self.sweep = sweep
        self.tracker = tracker
        self.stats: Dict[str, CellStats] = defaultdict(CellStats)
        self.rows: List[dict] = []
        self.failures: List[dict] = []
        self.attempts: Dict[Tuple[str, int], int] = defaultdict(int)
        self.last_store_flush = time.monotonic()
        self.failed: Dict[Tuple[str, int], str] = {}
        self.prior_failed: set = set()

    def load_existing(self) -> set:
        """Stats of what the store already holds, queued for MLflow (this re-syncs it after outages)."""
        existing = store.read_results(self.sweep, ["acc", "gain_tokens", "info_gain_bits", "seconds", "greedy_exact", "greedy_prefix"])
        for row in existing.to_pylist():
            self.stats[row["cell"]].add(row)
        done = {(r["cell"], r["sample"]) for r in existing.select(["cell", "sample"]).to_pylist()}
        self.prior_failed = {(r["cell"], r["sample"]) for r in store.read_failures(self.sweep).to_pylist()} - done
        for cell_id, _ in self.prior_failed:
            self.stats[cell_id].failed += 1
        for cell in cells(self.cfg):
            if cell.id in self.stats:
                self._track(cell)
        return done

    def _track(self, cell: Cell) -> None:
        tags = {"model": cell.model, "dataset": cell.dataset, "n_mem": str(cell.n_mem), "length": str(cell.length)}
        self.tracker.record(cell.id, self.stats[cell.id].metrics(), tags)

    def accept(self, item: WorkItem, row: dict) -> None:
        cell = item.cell
        error = row.pop("error")
        if error:
            self.fail(cell, row["sample"], error, final=True)
            return
        full = {"cell": cell.id, "model": cell.model, "dataset": cell.dataset, "length": cell.length, "n_mem": cell.n_mem, "seed": self.cfg.seed, **row}
        self.rows.append(full)
        if (cell.id, row["sample"]) in self.prior_failed:
            self.prior_failed.discard((cell.id, row["sample"]))
            self.stats[cell.id].failed -= 1
        self.stats[cell.id].add(full)
        self._track(cell)

    def fail(self, cell: Cell, sample: int, error: str, final: bool) -> None:
        key = (cell.id, sample)
        self.attempts[key] += 1
        self.failures.append({"cell": cell.id, "sample": sample, "attempt": self.attempts[key], "error": error[:2000], "time": time.time()})
        if final:
            self.failed[key] = error
            self.stats[cell.id].failed += 1
            self._track(cell)

    def flush(self, force: bool = False) -> None:
        due = force or len(self.rows) >= STORE_FLUSH_ROWS or time.monotonic() - self.last_store_flush > self.cfg.flush_seconds
        if due:
            store.write_results(self.sweep, self.rows)
            store.write_failures(self.sweep, self.failures)
            self.rows, self.failures = [], []
            self.last_store_flush = time.monotonic()
        self.tracker.flush(force)

    def execute(self, items: List[WorkItem], workers: list, progress: tqdm) -> None:
        queue = deque(items)
        idle = list(workers)
        running = {}
        while queue or running:
            while idle and queue:
                item = queue.popleft()
                worker = idle.pop()
                running[worker.run.options(num_returns="streaming").remote(item)] = (worker, item)
            ready, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
            for gen in ready:
                worker, item = running[gen]
                try:
                    row = ray.get(next(gen))
                except StopIteration:
                    del running[gen]
                    idle.append(worker)
                    continue
                except ray.exceptions.RayError as err:
                    del running[gen]
                    idle.append(worker)
                    queue.extend(self._retry(item, err))
                    continue
                item.specs = [s for s in item.specs if s.sample != row["sample"]]
                self.accept(item, row)
                progress.update(1)
                progress.set_postfix_str(f"{item.cell.id} failed={len(self.failed)}", refresh=False)
            self.flush()

    def _retry(self, item: WorkItem, err: Exception) -> List[WorkItem]:
        cause = getattr(err, "cause", None)
        if isinstance(cause, UserError):
            raise UserError(str(cause))
        message = " ".join(str(cause or err).split())[-500:]
        retry = []
        for spec in item.specs:
            final = self.attempts[item.cell.id, spec.sample] + 1 > self.cfg.worker.max_retries
            self.fail(item.cell, spec.sample, f"{type(cause or err).__name__}: {message}", final)
            if not final:
                retry.append(spec)
        log.warning("work item of %s failed (%s): retrying %d samples", item.cell.id, type(err).__name__, len(retry))
        return [WorkItem(**{**item.__dict__, "specs": retry})] if retry else []


def _raise_on_sigterm(*_):
    raise KeyboardInterrupt("SIGTERM")


def run_sweep(cfg: DictConfig, sweep: store.SweepDir, tokens) -> int:
    """Run every missing sample of the sweep; returns the exit code (0: all done, 1: some failed)."""
    tracker = Tracker(cfg, sweep)
    run_id = tracker.start()
    print(f"sweep directory: {sweep.path}\nMLflow parent run: {run_id} ({tracker.uri})", flush=True)
    state = Sweep(cfg, sweep, tracker)
    done = state.load_existing()
    items = work_items(cfg, tokens, done)
    pending = sum(len(item.specs) for item in items)
    total = len(cells(cfg)) * cfg.grid.samples
    print(f"{total} samples in {len(cells(cfg))} cells: {total - pending} done, {pending} to run", flush=True)
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    ok = False
    try:
        if items:
            connect_ray(cfg)
            workers = start_workers(cfg)
            with tqdm(total=pending, unit="sample", file=sys.stderr, dynamic_ncols=True, smoothing=0.1) as progress:
                state.execute(items, workers, progress)
        ok = not state.failed
    finally:
        state.flush(force=True)
        store.compact(sweep)
        tracker.finish(ok)
    return 0 if ok else 1
