"""Beyond both papers, measured (docs/beyond.md): how many bits a crammed SmolLM2 vector uses, and how much restarts add.

    .venv/bin/python benchmarks/beyond.py --out outputs/beyond [--arms bits-direct,restarts-direct,bits-lowdim]
        [--cap 64 --max-steps 600 --steps-per-stage 100]

Each arm is `cram-sweep run` as a user runs it (progressive, geometric growth, pydoc; a started arm is resumed with the
settings it was started with, a finished one read back): `bits-direct` and `bits-lowdim` (param=lowdim param.k=32) on 8 samples with the bits
analysis (on by default), `restarts-direct` with grid.restarts=4 on 4 samples. Prints, per arm, one line per sample
(horizon, bits needed, the greedy horizon at each rounding, the analysis's share of the sample's seconds), the
capacity row's bits columns, and for the restarts arm the horizon of every restart and the report's restart table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
from arms import run_arm

from cram_sweep.methods import method
from cram_sweep.report.build import load_results
from cram_sweep.report.capacity import BITS_COLUMNS, capacity_table, cosine_matrix, restart_table
from cram_sweep.report.markdown import md_table

COMMON = ["grid.models=[smollm2]", "grid.datasets=[pydoc]", "method=progressive", "method.growth=geometric", "report=true"]
ARMS = {
    "bits-direct": ["grid.samples=8", "batch_size=8"],
    "restarts-direct": ["grid.samples=4", "grid.restarts=4", "batch_size=16"],
    "bits-lowdim": ["grid.samples=8", "batch_size=8", "param=lowdim", "param.k=32"],
}


def arm_sweep(arm: str, args) -> Path:
    steps = [f"grid.lengths=[{args.cap}]", f"optim.max_steps={args.max_steps}", f"method.steps_per_stage={args.steps_per_stage}"]
    return run_arm(arm, Path(args.out), [*COMMON, *steps, *ARMS[arm]])


def fmt(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def table(frame: pd.DataFrame) -> str:
    return md_table(list(frame.columns), [[fmt(v) for v in row] for row in frame.itertuples(index=False)])


def per_sample(rows: pd.DataFrame) -> pd.DataFrame:
    """One line per (sample, restart): horizon, bits needed, the greedy horizon at each rounding, the analysis's cost."""
    lines = []
    for row in rows.sort_values(["sample", "restart"]).to_dict("records"):
        at = dict(zip(row["roundings"], row["horizon_at_bits"]))
        lines.append(
            {
                "sample": row["sample"],
                "restart": row["restart"],
                "horizon": row["horizon"],
                "bits needed": row["bits_needed"] if len(row["roundings"]) else "–",  # horizon 0: not analysed
                **{f"h@{name}": horizon for name, horizon in at.items()},
                "steps": row["steps"],
                "s": row["seconds"],
                "bits s": row["bits_seconds"],
                "bits share %": 100 * row["bits_seconds"] / row["seconds"],
            }
        )
    return pd.DataFrame(lines)


def across_samples_cosine(rows: pd.DataFrame) -> float:
    """The mean cosine of the solutions of different samples: what the same sample's restarts compare against."""
    rows = method("progressive").solved(rows)
    samples = rows["sample"].to_numpy()
    different = samples[:, None] != samples[None, :]
    return float(cosine_matrix(list(rows["memory"]))[different].mean())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/beyond")
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated arm names")
    parser.add_argument("--cap", type=int, default=64)
    parser.add_argument("--max-steps", type=int, default=600)
    parser.add_argument("--steps-per-stage", type=int, default=100)
    args = parser.parse_args()
    for arm in args.arms.split(","):
        results = load_results(arm_sweep(arm, args))
        print(f"\n## {arm} ({results['precision'].iloc[0]}, {results['param'].iloc[0]})\n")
        print(table(per_sample(results)))
        share = 100 * results["bits_seconds"].sum() / results["seconds"].sum()
        print(f"\nbits analysis: {share:.2f} % of the samples' seconds in all, at most {per_sample(results)['bits share %'].max():.2f} %\n")
        capacity = capacity_table(results)
        print(table(capacity[["horizon_mean", "info_gain_bits_mean", "theoretical_tokens", "utilization", *BITS_COLUMNS]]))
        restarts = int(results["restart"].max()) + 1
        if restarts > 1:
            print("\n" + table(restart_table(results, restarts).drop(columns=["model", "dataset", "method", "n_mem"])))
            horizons = results.pivot(index="sample", columns="restart", values="horizon")
            print("\nhorizon per restart:\n\n" + table(horizons.reset_index()))
            print(f"\nmean cosine of different samples' solutions: {across_samples_cosine(results):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
