"""What is optimized, measured: one real sweep per parametrization arm on SmolLM2-135M-Instruct and pydoc, then one
table (horizon, accuracy, steps, seconds and trained numbers per sample) and the horizon against the trained numbers.

    .venv/bin/python benchmarks/parametrizations.py --out outputs/parametrizations [--samples 8 --cap 64]

Each arm is `cram-sweep run` as a user runs it (sweep directories under --out, resumable); a finished arm is
read back, not rerun. Arms: progressive (geometric growth, bisect back-off) with direct, lowdim k=32 and k=256
(projection trained) and lowdim k=32 with the projection frozen; full cramming at --cap with direct and lowdim
k=32 (the reference quickstart's comparison).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
from arms import run_arm
from matplotlib.figure import Figure

from cram_sweep.report.build import load_results
from cram_sweep.report.markdown import md_table

PROGRESSIVE = ["method=progressive", "method.growth=geometric", "method.backoff=bisect"]
LOWDIM = ["param=lowdim"]
# Full cramming at the reference quickstart's lr, on half the progressive arms' budget (two CPU cores): after the
# common step overrides, so these win.
FULL = ["method=full", "optim.lr=0.1", "optim.max_steps=400", "optim.patience=200"]
ARMS = {
    "progressive / direct": PROGRESSIVE,
    "progressive / lowdim k=32": PROGRESSIVE + LOWDIM + ["param.k=32"],
    "progressive / lowdim k=256": PROGRESSIVE + LOWDIM + ["param.k=256"],
    "progressive / lowdim k=32 frozen": PROGRESSIVE + LOWDIM + ["param.k=32", "param.train_projection=false"],
    "full / direct": FULL,
    "full / lowdim k=32": FULL + LOWDIM + ["param.k=32"],
}


def sweep_name(arm: str) -> str:
    return arm.replace(" / ", "-").replace(" ", "-").replace("=", "")


def arm_sweep(arm: str, args) -> Path:
    steps = [
        f"optim.max_steps={args.max_steps}",
        f"method.steps_per_stage={args.steps_per_stage}",
        f"optim.patience={args.max_steps // 2}",
    ]
    run = [f"grid.lengths=[{args.cap}]", f"grid.samples={args.samples}", f"batch_size={args.samples}", "report=false"]
    return run_arm(sweep_name(arm), Path(args.out), [*run, *steps, *ARMS[arm], *args.extra])


def summary(arm: str, rows: pd.DataFrame, samples: int) -> dict:
    """One arm's row of the table, over its samples 0..samples-1 (an arm run with more samples compares on those)."""
    rows = rows[rows["sample"] < samples]
    method = arm.split(" / ")[0]
    return {
        "arm": arm,
        "samples": len(rows),
        "horizon mean": rows["horizon"].mean(),
        "horizon min": rows["horizon"].min(),
        "horizon max": rows["horizon"].max(),
        "acc mean": rows["acc"].mean() if method == "full" else float("nan"),
        "exact (full)": rows["greedy_exact"].mean() if method == "full" else float("nan"),
        "steps / sample": rows["steps"].mean(),
        "s / sample": rows["seconds"].mean(),
        "ms / step": 1000 * rows["seconds"].sum() / rows["steps"].sum(),
        "trained numbers": int(rows["trained_numbers"].iloc[0]),
        "precision": rows["precision"].iloc[0],
    }


def plot(table: pd.DataFrame, path: Path) -> None:
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for method, marker in (("progressive", "o"), ("full", "s")):
        part = table[table["arm"].str.startswith(method)]
        ax.errorbar(
            part["trained numbers"],
            part["horizon mean"],
            yerr=[part["horizon mean"] - part["horizon min"], part["horizon max"] - part["horizon mean"]],
            fmt=marker,
            capsize=4,
            label=method,
        )
        for row in part.to_dict("records"):
            where = (row["trained numbers"], row["horizon mean"])
            ax.annotate(row["arm"].split(" / ")[1], where, fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xscale("log")
    ax.set(xlabel="trained numbers per sample", ylabel="horizon (tokens), mean and min-max", title="Horizon against what is trained")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/parametrizations")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--cap", type=int, default=64)
    parser.add_argument("--max-steps", type=int, default=800)
    parser.add_argument("--steps-per-stage", type=int, default=100)
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated arm names")
    parser.add_argument("--plot", default="", help="PNG of the horizon against the trained numbers")
    parser.add_argument("extra", nargs="*", help="more overrides for every arm, e.g. precision=fp32")
    args = parser.parse_args()
    rows = [summary(arm, load_results(arm_sweep(arm, args)), args.samples) for arm in args.arms.split(",")]
    table = pd.DataFrame(rows)
    cells = [[f"{v:.1f}" if isinstance(v, float) else str(v) for v in row] for row in table.itertuples(index=False)]
    print(md_table(list(table.columns), cells))
    if args.plot:
        plot(table, Path(args.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
