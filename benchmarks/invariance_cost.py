"""What the promise costs (issue 31): sample-steps per second with `batch_invariant=true` (fixed shapes: every forward
at the batch size's rows, each row at its text's length) against `false` (packed: the live rows only, padded to the
longest current target), in one run, on the same samples.

    .venv/bin/python benchmarks/invariance_cost.py                       # SmolLM2, L=64, batch 8 and 16, fp32 and bf16
    .venv/bin/python benchmarks/invariance_cost.py --model tiny_llama --steps 5   # seconds

Scenarios, each a fixed number of steps per sample (no sample converges sooner):
- full batch: `batch` samples of one cell, as a work item runs before its tail: the layouts' shapes are the same;
- tail: one live sample left in the batch, as the last sample of a work item runs: fixed shapes compute `batch` rows;
- two lengths: a full batch, half at L and half at L/2, as a work item where two cells meet: fixed shapes run a forward
  per length, each at the batch's rows;
- progressive: a full batch at cap L in a stage of L/4 and of 3L/4 tokens: fixed shapes run every stage at the cap.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from cram_sweep.config import compose_config
from cram_sweep.data import sample_token_ids
from cram_sweep.engine.cram import SampleSpec, cram
from cram_sweep.engine.model import load_model, resolve_attention
from cram_sweep.report.markdown import md_table
from cram_sweep.results.columns import Cell
from cram_sweep.sweep.grid import sample_seed

HEADER = ["precision", "batch", "scenario", "fixed shapes (sample-steps/s)", "packed (sample-steps/s)", "fixed / packed"]


def specs(lm, cfg, dataset: str, length: int, count: int, cell: str) -> list[SampleSpec]:
    ids = sample_token_ids(cfg.datasets[dataset], dataset, lm.tokenizer, count, length, cfg.seed)
    seeded = Cell(lm.name, dataset, 1, length)
    return [SampleSpec(i, ids[i], sample_seed(cfg.seed, seeded, i), cell) for i in range(count)]


def sample_steps_per_second(lm, samples, cfg, method, precision: str, batch: int, batch_invariant: bool) -> float:
    longest = max(len(s.token_ids) for s in samples)
    attention = resolve_attention("auto", lm.device, longest + 1)
    started = time.perf_counter()
    rows = list(
        cram(lm.model, samples, 1, cfg.optim, precision, batch, attention=attention, method=method, batch_invariant=batch_invariant)
    )
    return sum(r.steps for r in rows) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--dataset", default="pydoc")
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6, help="steps per sample in each measurement")
    parser.add_argument("--batch-sizes", default="8,16")
    parser.add_argument("--precisions", default="fp32,bf16")
    args = parser.parse_args()
    steps, length = args.steps, args.length
    cfg = compose_config([f"grid.models=[{args.model}]", f"grid.datasets=[{args.dataset}]"])
    cfg.optim = dataclasses.replace(cfg.optim, lr=1e-4, max_steps=steps + 1, patience=steps)  # a tiny lr: nobody converges early
    full = cfg.method

    def stage(tokens: int):  # a progressive sample whose first stage, `tokens` long, fails after `steps` updates
        return dataclasses.replace(full, name="progressive", min_length=tokens, steps_per_stage=steps)

    lm = load_model(args.model, cfg.models[args.model], "cpu")
    print(f"{args.model}, L={length}, {steps} steps a sample, cpu ({torch.get_num_threads()} threads)")
    table = []
    for precision in args.precisions.split(","):
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            at_length = specs(lm, cfg, args.dataset, length, batch, "a")
            half = specs(lm, cfg, args.dataset, length // 2, batch // 2, "b")
            scenarios = {
                "full batch": (at_length, full),
                "tail (1 live)": (at_length[:1], full),
                f"two lengths ({length // 2}, {length})": (half + at_length[: batch - batch // 2], full),
                f"progressive, stage {length // 4} of cap {length}": (at_length, stage(length // 4)),
                f"progressive, stage {3 * length // 4} of cap {length}": (at_length, stage(3 * length // 4)),
            }
            for name, (samples, method) in scenarios.items():
                rates = {
                    invariant: sample_steps_per_second(lm, samples, cfg, method, precision, batch, invariant) for invariant in (True, False)
                }
                table.append([precision, batch, name, f"{rates[True]:.2f}", f"{rates[False]:.2f}", f"{rates[True] / rates[False]:.2f}"])
                print(md_table(HEADER, table[-1:]).splitlines()[-1], flush=True)
    print()
    print(md_table(HEADER, table))


if __name__ == "__main__":
    main()
