"""Which defaults for `method=progressive` on the embedded SmolLM2-135M-Instruct and pydoc (issue 14): a 2x2 of
{the reference's optimizer and init, Kuratov et al.'s} x {predict_first on, off}, linear growth +8, 500 steps per
stage, 4000 per sample, on the same samples. Prints a table; each finished sample is appended to --out as a
JSON line, so an interrupted run keeps what it measured (and --arms runs the rest).

    .venv/bin/python benchmarks/progressive_defaults.py --samples 4 --cap 64 --out outputs/progressive-defaults.jsonl
    # on 2 cores, two processes of one thread (about 20 % faster than one of two threads), then the table:
    .venv/bin/python benchmarks/progressive_defaults.py --threads 1 --arms reference+predict_first reference+first_given &
    .venv/bin/python benchmarks/progressive_defaults.py --threads 1 --arms kuratov+predict_first kuratov+first_given
    .venv/bin/python benchmarks/progressive_defaults.py --table     # the table of what --out holds, nothing run
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from cram_sweep.config import compose_config
from cram_sweep.engine.cram import Heartbeat, cram
from cram_sweep.engine.model import load_model
from cram_sweep.sweep.items import prepare_tokens, work_items

REFERENCE = ["optim.lr=0.1", "optim.init=uniform", "optim.schedule=cosine", "optim.warmup_steps=100", "optim.min_lr=0.001"]
KURATOV = ["optim.lr=0.01", "optim.init=embed_std", "optim.schedule=constant", "optim.warmup_steps=0", "optim.min_lr=0.0"]
FIRST_PREDICTED = ["method.predict_first=true", "method.min_length=1"]
FIRST_GIVEN = ["method.predict_first=false", "method.min_length=2"]
ARMS = {
    "reference+predict_first": REFERENCE + FIRST_PREDICTED,
    "reference+first_given": REFERENCE + FIRST_GIVEN,
    "kuratov+predict_first": KURATOV + FIRST_PREDICTED,
    "kuratov+first_given": KURATOV + FIRST_GIVEN,
}


def run_arm(name: str, overrides: list[str], samples: int, cap: int, out: Path) -> list[dict]:
    cfg = compose_config(["method=progressive_reference", "precision=fp32", f"grid.lengths=[{cap}]", f"grid.samples={samples}", *overrides])
    lm = load_model("smollm2", cfg.models["smollm2"], "cpu")
    (item,) = work_items(cfg, prepare_tokens(cfg), set())
    rows, started = [], time.perf_counter()
    for result in cram(lm.model, item.specs, 1, cfg.optim, "fp32", batch_size=samples, method=cfg.method, heartbeat_seconds=60):
        if isinstance(result, Heartbeat):
            print(f"  {name}: {result.live} running, step {result.steps}, stages up to {result.stage_length}", flush=True)
            continue
        row = {
            "arm": name,
            "sample": result.sample,
            "horizon": result.horizon,
            "steps": result.steps,
            "stages": result.stages,
            "fail_acc": result.fail_acc,
            "wall_s": time.perf_counter() - started,
            "trajectory": [(s.length, s.converged, s.steps) for s in result.stage_records],
        }
        print(f"  {name}: sample {row['sample']} horizon {row['horizon']} steps {row['steps']} {row['trajectory']}", flush=True)
        with out.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    print("| arm | samples | horizon mean | horizons | steps mean | stages mean | wall (s) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for arm in ARMS:
        mine = [r for r in rows if r["arm"] == arm]
        if mine:
            horizons = [r["horizon"] for r in mine]
            print(
                f"| {arm} | {len(mine)} | {statistics.mean(horizons):.1f} | {sorted(horizons)} | "
                f"{statistics.mean(r['steps'] for r in mine):.0f} | {statistics.mean(r['stages'] for r in mine):.1f} | "
                f"{max(r['wall_s'] for r in mine):.0f} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--cap", type=int, default=64)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--out", type=Path, default=Path("outputs/progressive-defaults.jsonl"))
    parser.add_argument("--table", action="store_true", help="only print the table of the samples --out holds")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads (0: torch's default); two processes of one thread each use 2 cores best"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for arm in [] if args.table else args.arms:
        run_arm(arm, ARMS[arm], args.samples, args.cap, args.out)
    print_table([json.loads(line) for line in args.out.read_text().splitlines()])


if __name__ == "__main__":
    main()
