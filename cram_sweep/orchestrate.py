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
from .model import load_model, load_tokenizer, model_context, resolve_attention, resolve_precision
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
    attention: str
    batch_size: object
    device: str
    check_every: int
    progress_seconds: float


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
    """One per GPU (or CPU node): loads each model once and streams back one row per finished sample.

    Out of memory in a batch: the samples not yet returned start again (same seeds, so the same
    results) with half the batch size, down to 1. A killed worker is restarted by Ray (max_restarts)
    and the driver resubmits what it had not returned (Sweep._retry).
    """

    def __init__(self):
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        torch.set_num_threads(max(1, int(cpus)))

    def ping(self) -> int:
        return os.getpid()

    @staticmethod
    def is_oom(err: BaseException) -> bool:
        """torch.OutOfMemoryError (CUDA), or the RuntimeError the CPU allocator raises."""
        return isinstance(err, torch.OutOfMemoryError) or (
            isinstance(err, RuntimeError) and ("can't allocate memory" in str(err) or "out of memory" in str(err))
        )

    @staticmethod
    def inject_faults(lm, item: WorkItem) -> list:
        """Hooks for the reliability tests (CRAM_SWEEP_FAULT, see store.faults); none in normal use."""
        found = store.faults()
        handles = []
        if "nan_sample" in found:
            cell_part, sample = found["nan_sample"]
            target = [s.token_ids for s in item.specs if s.sample == int(sample)] if cell_part in item.cell.id else []
            if target:
                poisoned = torch.tensor(target[0], device=lm.device)

                def poison(module, inputs, output):  # that sample's text embedding (rows equal to its ids) -> NaN
                    ids = inputs[0]
                    if ids.dim() != 2 or ids.shape[1] != poisoned.numel():
                        return output
                    return output.masked_fill((ids == poisoned).all(dim=1)[:, None, None], float("nan"))

                handles.append(lm.model.get_input_embeddings().register_forward_hook(poison))
        if "oom_above_batch" in found:
            limit = int(found["oom_above_batch"][0])

            def oom(module, args, kwargs):
                x = kwargs.get("inputs_embeds", kwargs.get("input_ids"))
                if x is None and args:
                    x = args[0]
                if x is not None and x.shape[0] > limit:
                    raise torch.OutOfMemoryError(f"injected out of memory: a batch of {x.shape[0]} > {limit} samples")

            handles.append(lm.model.register_forward_pre_hook(oom, with_kwargs=True))
        return handles

    def run(self, item: WorkItem):
        from .config import ModelConfig

        lm = load_model(item.cell.model, OmegaConf.merge(OmegaConf.structured(ModelConfig), item.model_cfg), item.device)
        precision = resolve_precision(item.precision, lm.family, lm.device)
        attention = resolve_attention(item.attention, lm.device, item.cell.length + item.cell.n_mem)
        batch_size = item.batch_size
        if batch_size == "auto":
            batch_size = auto_batch_size(lm, item.cell.length, item.cell.n_mem)
        check_every = item.check_every or (16 if lm.device.type == "cuda" else 1)
        pending = {spec.sample: spec for spec in item.specs}
        hooks = self.inject_faults(lm, item)
        try:
            while pending:
                try:
                    for row in cram(lm.model, list(pending.values()), item.cell.n_mem, OmegaConf.create(item.optim), precision, batch_size, check_every,
                                    attention=attention, heartbeat_seconds=item.progress_seconds):
                        if "heartbeat" in row:
                            yield row
                            continue
                        del pending[row["sample"]]
                        yield {**row, "precision": precision, "hidden": lm.hidden, "vocab_size": lm.vocab_size}
                    continue
                except (torch.OutOfMemoryError, RuntimeError) as err:
                    if not self.is_oom(err) or batch_size == 1:
                        raise
                # outside the except block, so the failed batch's tensors are no longer referenced
                import gc

                batch_size //= 2
                log.warning("out of memory on %s: retrying %d samples with batch_size=%d", item.cell.id, len(pending), batch_size)
                gc.collect()
                if lm.device.type == "cuda":
                    torch.cuda.empty_cache()
        finally:
            for handle in hooks:
                handle.remove()


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
                OmegaConf.to_container(cfg.optim), cfg.precision, cfg.attention, cfg.batch_size, cfg.device, cfg.worker.check_every,
                cfg.worker.progress_seconds,
            ))
    return items


def connect_ray(cfg: DictConfig) -> None:
    """cluster=local: start Ray in this process. cluster=ray: join the cluster at cluster.address,
    else $RAY_ADDRESS (set by `ray job submit` for the driver), else the latest `ray start` on this node."""
    if ray.is_initialized():
        return
    quiet = {"logging_level": logging.WARNING, "log_to_driver": True}
    if cfg.cluster.kind == "local":
        ray.init(num_cpus=cfg.cluster.num_cpus, include_dashboard=False, **quiet)
        return

    def unreachable(address: str, seconds: float = 5.0) -> str:
        """Why nothing answers at host:port within `seconds` ("" when something does): ray.init
        retries an address where nothing listens for many minutes, this fails in seconds."""
        import socket

        host, _, port = address.split("://")[-1].rpartition(":")
        if not host or not port.isdigit():
            return f"{address} is not HOST:PORT"
        deadline = time.monotonic() + seconds
        while True:
            try:
                socket.create_connection((host.strip("[]"), int(port)), timeout=3).close()
                return ""
            except OSError as err:
                if time.monotonic() > deadline:
                    return err.strerror or type(err).__name__
                time.sleep(0.5)

    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS") or "auto"
    fix = "start it or fix cluster.address / RAY_ADDRESS"
    if address.startswith(("http://", "https://")):
        raise UserError(f"cluster address {address} is a dashboard / Jobs API URL: give the cluster's GCS address HOST:6379 "
                        "in cluster.address or RAY_ADDRESS, or submit the sweep with `ray job submit` (jobs/ray_submit.sh)")
    target = address
    if not address.startswith("ray://"):
        try:  # "auto": the cluster the latest `ray start` on this node recorded
            target = ray._private.services.canonicalize_bootstrap_address_or_die(address)
        except (ConnectionError, ValueError) as err:
            raise UserError(f"cannot find the Ray cluster {address!r} ({' '.join(str(err).split())[:150]}): {fix}") from None
        except Exception:  # a private helper: if it moved, ray.init resolves the address itself
            target = address
    reason = unreachable(target) if target != "auto" else ""
    if reason:
        raise UserError(f"cannot join the Ray cluster at {address}: nothing answers at {target} ({reason}): {fix}")
    token = os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.isfile(os.path.expanduser("~/.ray/auth_token"))
    if token and "RAY_AUTH_MODE" not in os.environ:
        # `ray start` turns token authentication on where a token exists, but ray.init sends the token to
        # an explicit address only in token mode; a cluster without authentication ignores it.
        try:
            from ray._private.authentication.authentication_token_setup import _enable_token_auth
        except ImportError:  # a Ray without token authentication
            pass
        else:
            _enable_token_auth()  # RAY_AUTH_MODE=token, and Ray's cached config refreshed
    try:
        ray.init(address=address, **quiet)
    except (ConnectionError, RuntimeError) as err:
        why = " ".join(str(err.__cause__ or err).split())
        if "authtoken" in why.lower() or "authentication" in why.lower():
            raise UserError(f"cannot join the Ray cluster at {address}: it uses token authentication and refused this driver "
                            "(give the driver the cluster's token: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)") from None
        raise UserError(f"cannot join the Ray cluster at {address} ({why[:200]}): {fix}") from None


def start_workers(cfg: DictConfig) -> list:
    """One worker per GPU (worker.gpus each). Without GPUs: one worker per alive node with CPUs, pinned
    to that node and holding all of its CPUs (or worker.count workers of worker.cpus each, spread)."""
    gpus = ray.cluster_resources().get("GPU", 0)
    if gpus and cfg.device != "cpu":
        count = cfg.worker.count or int(gpus / cfg.worker.gpus)
        options = {"num_gpus": cfg.worker.gpus, "num_cpus": cfg.worker.cpus or 1}
        return [CramWorker.options(**options).remote() for _ in range(max(1, count))]
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [(n["NodeID"], int(n["Resources"].get("CPU", 0))) for n in ray.nodes() if n["Alive"]]
    nodes = [(node, cpus) for node, cpus in nodes if cpus >= 1]
    if not nodes:
        raise UserError("the Ray cluster has no node with a whole CPU or a GPU for workers: add nodes (ray start --num-cpus=N)")
    if cfg.worker.count or cfg.worker.cpus:
        count = cfg.worker.count or len(nodes)
        cpus = cfg.worker.cpus or min(c for _, c in nodes)
        return [CramWorker.options(num_cpus=cpus, scheduling_strategy="SPREAD").remote() for _ in range(count)]
    return [
        CramWorker.options(num_cpus=cpus, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=True)).remote()
        for node, cpus in nodes
    ]


class Sweep:
    """One execution of a sweep's pending samples; the Parquet store is the source of truth."""

    WORKER_RESTART_SECONDS = 300  # how long a dead worker may take to come back before the sweep goes on without it

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
        """Rows to the store (each list cleared once it is safely written), then metrics to MLflow."""
        due = force or len(self.rows) >= STORE_FLUSH_ROWS or time.monotonic() - self.last_store_flush > self.cfg.flush_seconds
        if due:
            if self.rows:
                store.write_results(self.sweep, self.rows)
                self.rows = []
            if self.failures:
                store.write_failures(self.sweep, self.failures)
                self.failures = []
            self.last_store_flush = time.monotonic()
        self.tracker.flush(force)

    def execute(self, items: List[WorkItem], workers: list, progress: tqdm) -> None:
        """Hand work items to idle workers and take their rows as they stream in.

        A worker that dies (killed, OOM-killed, node lost) fails its in-flight item: the samples it
        had not returned go back to the queue (`_retry`), and the worker (restarted by Ray) gets new
        work only once it answers a ping again, so a retry is never burnt on a restarting actor.
        """
        queue = deque(items)
        idle = list(workers)
        running = {}  # streaming generator -> (worker, item)
        waking = {}  # ping ref -> (worker, first ping time)
        later: List[Tuple[float, object, float]] = []  # (when, worker, first ping time): ping again
        while queue or running:
            now = time.monotonic()
            for entry in [e for e in later if e[0] <= now]:
                later.remove(entry)
                waking[entry[1].ping.remote()] = (entry[1], entry[2])
            while idle and queue:
                item = queue.popleft()
                worker = idle.pop()
                running[worker.run.options(num_returns="streaming").remote(item)] = (worker, item)
            if queue and not (idle or running or waking or later):
                self._abandon(queue, "no Ray worker is left to run it (every worker died and could not be restarted)")
                break
            if not (running or waking):  # only workers waiting to be pinged again
                time.sleep(0.2)
                self.flush()
                continue
            ready, _ = ray.wait(list(running) + list(waking), num_returns=1, timeout=1.0)
            for ref in ready:
                if ref in waking:
                    worker, since = waking.pop(ref)
                    try:
                        ray.get(ref)
                        idle.append(worker)
                    except ray.exceptions.RayError as err:
                        if time.monotonic() - since < self.WORKER_RESTART_SECONDS:
                            later.append((time.monotonic() + 0.5, worker, since))
                        else:
                            log.warning("a Ray worker did not come back within %d s (%s): going on without it", self.WORKER_RESTART_SECONDS, type(err).__name__)
                    continue
                worker, item = running[ref]
                try:
                    row = ray.get(next(ref))
                except StopIteration:
                    del running[ref]
                    idle.append(worker)
                    continue
                except ray.exceptions.RayError as err:
                    del running[ref]
                    queue.extend(self._retry(item, err))
                    if isinstance(err, ray.exceptions.RayTaskError):
                        idle.append(worker)  # the task raised; the worker itself is fine
                    else:
                        waking[worker.ping.remote()] = (worker, time.monotonic())
                    continue
                if "heartbeat" in row:
                    beat = row["heartbeat"]
                    progress.set_postfix_str(f"{item.cell.id} {beat['live']} running, step {beat['steps']}/{item.optim['max_steps']} "
                                             f"failed={len(self.failed)}")
                    continue
                item.specs = [s for s in item.specs if s.sample != row["sample"]]
                self.accept(item, row)
                progress.set_postfix_str(f"{item.cell.id} failed={len(self.failed)}", refresh=False)
                progress.update(1)
            self.flush()

    def _retry(self, item: WorkItem, err: Exception) -> List[WorkItem]:
        """Record one failed attempt for each sample the item had not returned; requeue those with tries left."""
        cause = getattr(err, "cause", None)
        if isinstance(cause, UserError):
            raise UserError(str(cause))
        if not isinstance(cause, BaseException):
            cause = None
        message = " ".join(str(cause or err).split())[-500:]
        retry = []
        for spec in item.specs:
            final = self.attempts[item.cell.id, spec.sample] + 1 > self.cfg.worker.max_retries
            self.fail(item.cell, spec.sample, f"{type(cause or err).__name__}: {message}", final)
            if not final:
                retry.append(spec)
        batch_size = item.batch_size
        if isinstance(err, ray.exceptions.OutOfMemoryError) and isinstance(batch_size, int) and batch_size > 1:
            batch_size //= 2  # Ray's memory monitor killed the worker: retry with a smaller batch (same results)
        log.warning("work item of %s failed (%s): retrying %d samples, %d recorded failed", item.cell.id, type(err).__name__,
                    len(retry), len(item.specs) - len(retry))
        return [WorkItem(**{**item.__dict__, "specs": retry, "batch_size": batch_size})] if retry else []

    def _abandon(self, queue, reason: str) -> None:
        for item in queue:
            for spec in item.specs:
                self.fail(item.cell, spec.sample, reason, final=True)
        queue.clear()


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
    ok = False
    try:
        if items:
            connect_ray(cfg)
            signal.signal(signal.SIGTERM, _raise_on_sigterm)  # after ray.init, which installs its own handler
            workers = start_workers(cfg)
            with tqdm(total=pending, unit="sample", file=sys.stderr, dynamic_ncols=True, smoothing=0.1) as progress:
                state.execute(items, workers, progress)
        ok = not state.failed
    finally:
        try:  # a store error here (disk still full) replaces one in flight: same message, same exit code
            state.flush(force=True)
            store.compact(sweep)
        finally:
            tracker.finish(ok)
    return 0 if ok else 1
