"""Seconds per sample of a local Ray worker at Ray's default niceness (15) and at 0, with and without one
busy process on the node: why `cluster=local` starts its workers at niceness 0 (issue 13).

    .venv/bin/python benchmarks/worker_niceness.py            # tiny_llama, L=32, 4 samples, 300 steps, batch 4

Each row starts a fresh local Ray instance with the given worker niceness, runs the same samples on one
CramWorker holding all CPUs, and, for the busy rows, keeps one pure-Python loop spinning beside it.
"""

from __future__ import annotations

import argparse
import multiprocessing
import time

import ray

from cram_sweep.config import compose_config
from cram_sweep.sweep.items import prepare_tokens, work_items
from cram_sweep.sweep.ray_session import QUIET
from cram_sweep.sweep.worker import CramWorker, Finished, WorkerSettings, stream


def spin() -> None:
    while True:
        pass


def seconds_per_sample(cfg, niceness: int, busy: bool) -> float:
    ray.init(address="local", num_cpus=cfg.cluster.num_cpus, include_dashboard=False, _system_config={"worker_niceness": niceness}, **QUIET)
    loop = multiprocessing.Process(target=spin, daemon=True) if busy else None
    try:
        worker = CramWorker.options(num_cpus=cfg.cluster.num_cpus).remote(WorkerSettings.of(cfg))
        ray.get(worker.ping.remote())
        items = work_items(cfg, prepare_tokens(cfg), set())
        if loop:
            loop.start()
        started, done = time.perf_counter(), 0
        for item in items:
            for ref in stream(worker, item):
                done += isinstance(ray.get(ref), Finished)
        return (time.perf_counter() - started) / done
    finally:
        if loop:
            loop.terminate()
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    cfg = compose_config(
        [
            "grid.models=[tiny_llama]",
            f"grid.lengths=[{args.length}]",
            f"grid.samples={args.samples}",
            "grid.n_mem=[1]",
            f"optim.max_steps={args.steps}",
            f"optim.patience={args.steps}",
            "optim.lr=0.001",
            "precision=fp32",
            "batch_size=4",
            f"cluster.num_cpus={multiprocessing.cpu_count()}",
        ]
    )  # lr 0.001: no sample converges early, so every row runs the same steps
    print(f"tiny_llama, L={args.length}, {args.samples} samples x {args.steps} steps, batch 4, {multiprocessing.cpu_count()} CPUs")
    print("condition                                   s/sample")
    for label, niceness, busy in (
        ("idle node, niceness 15 (Ray's default)", 15, False),
        ("idle node, niceness 0", 0, False),
        ("one busy loop, niceness 15 (Ray's default)", 15, True),
        ("one busy loop, niceness 0 (cram-sweep)", 0, True),
    ):
        print(f"{label:<44}{seconds_per_sample(cfg, niceness, busy):8.2f}", flush=True)


if __name__ == "__main__":
    main()
