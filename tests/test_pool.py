"""The worker pool on a real local Ray instance, with scripted stand-ins for CramWorker (no model): what a lost
call counts as run, growth, GPU workers replacing CPU workers, the autoscaler request, workers given up, and the
driver's accounting of lost samples (orchestrate.Sweep.retry). Stalls: tests/test_scale_out.py, on a real sweep."""

from __future__ import annotations

import dataclasses
import os
import time
from collections import deque

import pytest
import ray

from cram_sweep.engine.cram import SampleResult, SampleSpec
from cram_sweep.results.store import SweepDir
from cram_sweep.sweep.events import Beat, Grew, Lost, Retired, Row, Stranded, Worker
from cram_sweep.sweep.faults import restarted
from cram_sweep.sweep.orchestrate import Sweep
from cram_sweep.sweep.pool import WorkerPool
from cram_sweep.sweep.worker import Finished, Placement, Started, WorkItem
from cram_sweep.tracking.tracker import Tracker

from .helpers import tiny_config

CELL = "tiny_llama/pydoc/full/n_mem=2/L=4"


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


def result(spec: SampleSpec) -> SampleResult:
    """A SampleResult of `spec` with every other field zero (the pool reads only cell and sample)."""
    required = [
        f for f in dataclasses.fields(SampleResult) if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    return SampleResult(**{**{f.name: 0 for f in required}, "cell": spec.cell, "sample": spec.sample, "token_ids": spec.token_ids})


@ray.remote(max_restarts=-1, max_task_retries=0, num_cpus=0)
class Scripted:
    """Runs the script its item's `model` names, as CramWorker would stream it; a restarted actor always runs "ok".

    ok: Started, one row per sample | die:K: Started, K rows, then the process exits | die_loading: exits before
    Started | raise_loading: raises before Started | slow: a row every 0.5 s | cpu_holds: on a CPU worker, one row,
    then it holds the rest for 10 minutes"""

    def __init__(self, kind: str):
        self.kind = kind

    def ping(self) -> Placement:
        return Placement(os.getpid(), ray.get_runtime_context().get_node_id())

    def run(self, item: WorkItem):
        script, _, arg = item.model.partition(":")
        if restarted() and script != "die_loading":
            script = "ok"
        if script == "die_loading":
            os._exit(1)
        if script == "raise_loading":
            raise ValueError("cannot load")
        yield Started(item.batch_size)
        for number, spec in enumerate(item.specs):
            if script == "die" and number == int(arg):
                time.sleep(1)  # the rows streamed so far reach the driver first
                os._exit(1)
            if script == "slow":
                time.sleep(0.5)
            if script == "cpu_holds" and self.kind == "cpu" and number == 1:
                time.sleep(600)
            yield Finished(result(spec), "fp32", 2, 10)


class Scaler:
    """A cluster.Scaler stand-in: each `grow` starts the workers of the next planned kinds; requests are recorded."""

    def __init__(self, *plans: list[str], options: dict = None):
        self.plans = deque(plans)
        self.options = options or {}
        self.requests: list[int] = []

    def grow(self, workers: list[Worker]) -> list[Worker]:
        kinds = self.plans.popleft() if self.plans else []
        return [Worker(Scripted.options(**self.options).remote(kind), kind) for kind in kinds]

    def request(self, items: int) -> None:
        if not self.requests or self.requests[-1] != items:
            self.requests.append(items)


def item(script: str, samples: int = 5, batch_size: int = 2) -> WorkItem:
    return WorkItem(script, "full", 2, [SampleSpec(i, [1, 2, 3, 4], i, CELL) for i in range(samples)], batch_size)


def events_until(pool: WorkerPool, done, timeout: float = 180) -> list:
    """Every event of the pool until `done(events)` is true."""
    events, deadline = [], time.monotonic() + timeout
    while not done(events):
        assert time.monotonic() < deadline, f"not done after {timeout} s: {events}"
        events += pool.get_next(timeout=0.5)
    return events


def of(events, kind) -> list:
    return [event for event in events if isinstance(event, kind)]


def samples(events) -> list[int]:
    return [row.finished.result.sample for row in of(events, Row)]


@pytest.mark.slow  # kills Ray worker processes: seconds a restart
def test_a_lost_call_counts_only_its_batch_as_run_and_the_restarted_worker_takes_the_retry():
    pool = WorkerPool(Scaler(["cpu"]), stall_seconds=60)
    pool.submit(item("die:1"))
    events = events_until(pool, lambda e: of(e, Lost))
    assert samples(events) == [0]
    (lost,) = of(events, Lost)
    assert [s.sample for s in lost.item.specs] == [1, 2, 3, 4] and lost.started == 2
    assert [s.sample for s in lost.ran] == [1, 2], "samples 3 and 4 were queued behind a batch of 2: they never started"
    assert isinstance(lost.error, ray.exceptions.RayActorError) and lost.node
    pool.submit(lost.item)
    events = events_until(pool, lambda e: not pool.has_work())
    assert sorted(samples(events)) == [1, 2, 3, 4], "the restarted worker ran the retry"


@pytest.mark.slow  # kills Ray worker processes: seconds a restart
def test_losses_before_started_charge_nothing_until_every_third_in_a_row():
    pool = WorkerPool(Scaler(["cpu"]), stall_seconds=60)
    pool.submit(item("die_loading"))
    started = []
    for _ in range(3):
        (lost,) = of(events_until(pool, lambda e: of(e, Lost)), Lost)
        started.append(lost.started)
        pool.submit(lost.item)
    assert started == [0, 0, 5], "a model that kills every worker loading it must still end in failed samples"


def test_a_task_that_raised_before_started_counts_all_its_samples_and_its_worker_stays():
    pool = WorkerPool(Scaler(["cpu"]), stall_seconds=60)
    pool.submit(item("raise_loading", samples=3))
    (lost,) = of(events_until(pool, lambda e: of(e, Lost)), Lost)
    assert isinstance(lost.error, ray.exceptions.RayTaskError) and lost.started == 3
    assert pool._idle and len(pool.workers()) == 1, "a task error leaves the worker idle, not restarting"


def test_the_pool_grows_while_items_are_queued_and_the_request_follows_the_items_left():
    scaler = Scaler(["cpu"], [], ["cpu"])
    pool = WorkerPool(scaler, stall_seconds=60)
    for _ in range(4):
        pool.submit(item("slow", samples=2))
    events = events_until(pool, lambda e: not pool.has_work())
    grew = of(events, Grew)
    assert [len(g.workers) for g in grew] == [1, 1] and grew[-1].total == 2
    assert len(samples(events)) == 8
    assert scaler.requests == [4, 3, 2, 1], "one per item queued or running (the driver releases the request at the end)"
    assert not of(events, Beat)


def test_gpu_workers_replace_cpu_workers_and_their_samples_run_again_uncharged():
    scaler = Scaler(["cpu"])
    pool = WorkerPool(scaler, stall_seconds=60)
    pool.submit(item("cpu_holds", samples=6))
    pool.submit(item("ok", samples=2))
    events = events_until(pool, lambda e: of(e, Row))  # the CPU worker is into its item, the other one queued
    scaler.plans.append(["gpu"])
    events += events_until(pool, lambda e: not pool.has_work())
    (retired,) = of(events, Retired)
    assert (retired.workers, retired.samples) == (1, 5)
    assert not of(events, Lost), "a CPU worker stopped for a GPU one loses nothing"
    assert sorted(samples(events)) == sorted(list(range(6)) + list(range(2))), "every sample once"
    assert [w.kind for w in pool.workers()] == ["gpu"]


def test_no_worker_left_strands_the_queue_and_a_worker_that_never_starts_is_given_up(caplog):
    pool = WorkerPool(Scaler(["cpu"], options={"num_cpus": 64}), stall_seconds=60)  # more CPUs than the instance has
    pool.RESTART_SECONDS = 1
    pool.submit(item("ok"))
    events = events_until(pool, lambda e: of(e, Stranded), timeout=20)
    assert of(events, Stranded)[0].items[0].model == "ok"
    assert "did not start or come back within 1 s" in caplog.text


# ------------------------------------------------------------------ the driver's accounting of lost samples


def test_three_preemptions_never_fail_a_sample_that_did_not_run_and_one_that_ran_keeps_its_attempts(tmp_path):
    cfg = tiny_config("worker.max_retries=2")
    sweep = Sweep(cfg, SweepDir(tmp_path / "s"), Tracker(cfg, SweepDir(tmp_path / "s")))
    lost = item("any", samples=3, batch_size=1)
    retried = []
    for _ in range(3):  # each time sample 0 was in the batch of 1; samples 1 and 2 were queued behind it
        (lost,) = sweep.retry(Lost(lost, ray.exceptions.ActorDiedError(), started=1))
        retried.append([s.sample for s in lost.specs])
    assert retried == [[0, 1, 2], [0, 1, 2], [1, 2]], "sample 0 ran three times: failed; 1 and 2 never ran: retried"
    assert [key[:2] for key in sweep.failed] == [(CELL, 0)] and dict(sweep.attempts) == dict.fromkeys(sweep.failed, 3)
    assert [(f.sample, f.attempt) for f in sweep.failures] == [(0, 1), (0, 2), (0, 3)]
    assert all("ActorDiedError" in f.error for f in sweep.failures)
