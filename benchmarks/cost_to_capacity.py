"""What a capacity answer costs (issue 14): full cramming over a length grid that brackets the limit, against
progressive cramming with geometric growth up to the grid's longest length, on the same samples of one model.

    .venv/bin/python benchmarks/cost_to_capacity.py --lengths 8 16 32 64 --samples 4
    .venv/bin/python benchmarks/cost_to_capacity.py --lengths 8 16 24 32 40 48 56 64   # spacing = the horizon's resolution (method.step)

Sample-steps count forward+backward passes (full: its steps; progressive: its updates plus the judging forward
of each stage). Wall times are this process's, engine only (the model loads once, before either clock starts).
Prints the answers side by side (max_tokens; the horizons) and the ratio of sample-steps and of wall time.
`--both` overrides go to both runs (e.g. `--both precision=bf16`; fp32 unless told), `--full` / `--progressive` to
one of them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import pandas as pd

from cram_sweep.config import compose_config
from cram_sweep.engine.cram import Heartbeat, SampleResult, cram
from cram_sweep.engine.model import load_model
from cram_sweep.methods.base import max_tokens
from cram_sweep.sweep.items import prepare_tokens, work_items


def run(overrides: list[str], batch_size: int) -> tuple[list[SampleResult], float]:
    cfg = compose_config(["precision=fp32", *overrides])
    lm = load_model(cfg.grid.models[0], cfg.models[cfg.grid.models[0]], "cpu")
    (item,) = work_items(cfg, prepare_tokens(cfg), set())
    started, results = time.perf_counter(), []
    for r in cram(
        lm.model, item.specs, item.n_mem, cfg.optim, cfg.precision, batch_size=batch_size, method=cfg.method, heartbeat_seconds=60
    ):
        if isinstance(r, SampleResult):
            results.append(r)
        print(f"  {cfg.method.name}: {len(results)}/{len(item.specs)} done, {_progress(r)}", file=sys.stderr, flush=True)
    return results, time.perf_counter() - started


def _progress(r: SampleResult | Heartbeat) -> str:
    if isinstance(r, Heartbeat):
        return f"{r.live} running, step {r.steps}" + (f", stages up to length {r.stage_length}" if r.stage_length else "")
    return f"L={len(r.token_ids)} sample {r.sample}: steps {r.steps}, acc {r.acc:.3f}, horizon {r.horizon}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--full", nargs="*", default=[], help="overrides for the full-cramming grid only")
    parser.add_argument("--progressive", nargs="*", default=[], help="overrides for the progressive run only")
    parser.add_argument("--both", nargs="*", default=[], help="overrides for both runs")
    args = parser.parse_args()
    grid = [f"grid.samples={args.samples}", *args.both]
    lengths = ",".join(map(str, sorted(args.lengths)))
    full, full_s = run([f"grid.lengths=[{lengths}]", *grid, *args.full], args.batch_size)
    progressive, progressive_s = run(
        ["method=progressive", "method.growth=geometric", f"grid.lengths=[{max(args.lengths)}]", *grid, *args.progressive], args.batch_size
    )
    full_steps = sum(r.steps for r in full)
    progressive_steps = sum(r.steps + r.stages for r in progressive)
    horizons = sorted(r.horizon for r in progressive)
    full_accs = pd.DataFrame({"length": [len(r.token_ids) for r in full], "acc": [r.acc for r in full]})
    print("| method | answer | sample-steps | wall (s) |")
    print("| --- | --- | --- | --- |")
    print(f"| full, lengths {lengths} | max_tokens {max_tokens(full_accs)} | {full_steps} | {full_s:.0f} |")
    print(
        f"| progressive geometric, cap {max(args.lengths)} | horizons {horizons} (mean {statistics.mean(horizons):.1f}) | {progressive_steps} | {progressive_s:.0f} |"
    )
    print(f"| ratio full / progressive | | {full_steps / progressive_steps:.2f}x | {full_s / progressive_s:.2f}x |")
    for length in sorted(args.lengths):
        accs = [r.acc for r in full if len(r.token_ids) == length]
        print(f"full L={length}: mean acc {statistics.mean(accs):.3f}, steps {[r.steps for r in full if len(r.token_ids) == length]}")


if __name__ == "__main__":
    main()
