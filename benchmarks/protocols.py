"""Issue 34's measurements on SmolLM2-135M-Instruct and pydoc (docs/methods.md): one-step generation against full
cramming, full-cramming capacity against depth, and progressive cramming's horizon under the hybrid loss and the LR
reset. A table and a plot for each.

    .venv/bin/python benchmarks/protocols.py --out outputs/protocols [--plots docs/protocols] [--parts onestep,depth,scale,hybrid]

Each arm is `cram-sweep run` as a user runs it (sweep directories under --out, resumable); a finished arm is read
back, not rerun. The arms run the packed layout (batch_invariant=false): these are capacities, not bit-identical
rows, and a progressive stage then runs at its own length rather than the cap's (several times faster on a CPU).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
import torch
from arms import run_arm
from matplotlib.figure import Figure

from cram_sweep.config.compose import compose_config
from cram_sweep.engine.alignment import Alignment
from cram_sweep.engine.model import load_model
from cram_sweep.report.build import load_capacity, load_results
from cram_sweep.report.capacity import depth_name, depths
from cram_sweep.report.markdown import md_table
from cram_sweep.sweep.items import prepare_tokens

COMMON = ["batch_invariant=false", "report=true"]
# One-step and full cramming with the same two vectors, texts and budget: lr 0.1 (full cramming reaches 32 tokens at
# 300 steps there, docs/demo.md), 1000 steps, 400 without a better accuracy.
TWO_VECTORS = ["grid.n_mem=[2]", "grid.lengths=[8,16,32,64]", "grid.samples=8", "batch_size=8"]
TWO_VECTORS += ["optim.lr=0.1", "optim.max_steps=1000", "optim.patience=400"]
DEPTH = ["grid.layers=[1,2,4,8,16,all]", "grid.lengths=[8,16,32]", "grid.samples=4", "batch_size=4"]
DEPTH += ["optim.lr=0.1", "optim.max_steps=300", "optim.patience=150"]
# method=progressive's defaults (the reference's optimizer, first token given) on a CPU's budget.
CAP_64 = ["method=progressive", "grid.lengths=[64]", "grid.samples=8", "batch_size=8"]
CAP_64 += ["optim.max_steps=1200", "optim.warmup_steps=50", "method.steps_per_stage=200"]
# The progressive paper's hybrid variant (the reference's README: cosine over the first 8 hidden states); the arms
# without it run the reference's code defaults (l2 over all of them).
PAPER_HYBRID = ["optim.alignment_loss=cosine", "optim.alignment_layers=8", "optim.alignment_from=first"]
PARTS = {
    "onestep": {"onestep": ["method=onestep", *TWO_VECTORS], "full": ["method=full", *TWO_VECTORS]},
    "depth": {"depth": DEPTH},
    "scale": {},  # no sweep: the hybrid loss's terms before any step
    "hybrid": {
        "hybrid-alpha0": CAP_64,
        "hybrid-alpha0.1": [*CAP_64, "optim.hybrid_alpha=0.1"],
        "hybrid-alpha1": [*CAP_64, "optim.hybrid_alpha=1.0"],
        "hybrid-cosine8-alpha0.1": [*CAP_64, *PAPER_HYBRID, "optim.hybrid_alpha=0.1"],
        "hybrid-cosine8-alpha1": [*CAP_64, *PAPER_HYBRID, "optim.hybrid_alpha=1.0"],
        "hybrid-reset": [*CAP_64, "method.reset_lr_on_failure=true"],
    },
}


def per_length(rows: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Mean accuracy, the share of samples decoded exactly, mean steps and seconds per sample, per `by` and length."""
    return (
        rows.groupby([*by, "length"])
        .agg(
            samples=("acc", "size"),
            acc=("acc", "mean"),
            exact=("greedy_exact", "mean"),
            steps=("steps", "mean"),
            seconds=("seconds", "mean"),
        )
        .reset_index()
    )


def formatted(table: pd.DataFrame) -> str:
    cells = [[f"{v:.3f}" if isinstance(v, float) else str(v) for v in row] for row in table.itertuples(index=False)]
    return md_table(list(table.columns), cells)


def accuracy_plot(table: pd.DataFrame, series: str, path: Path, title: str, label=str) -> None:
    """Mean accuracy against length, a line per value of `series`, and the 0.99 that `max_tokens` asks for."""
    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.subplots()
    for value, part in table.groupby(series, sort=False):
        ax.plot(part["length"], part["acc"], marker="o", label=label(value))
    ax.axhline(0.99, color="grey", linestyle=":", label="0.99")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(table["length"].unique()), [str(n) for n in sorted(table["length"].unique())])
    ax.set(xlabel="text length (tokens)", ylabel="mean accuracy", ylim=(0, 1.02), title=title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def onestep_part(sweeps: dict[str, Path], plots: Path) -> None:
    rows = pd.concat([load_results(sweeps["onestep"]), load_results(sweeps["full"])])
    print("### One-step against full cramming: per length\n\n" + formatted(per_length(rows, ["method"])) + "\n")
    capacity = pd.concat([load_capacity(sweeps[name]) for name in ("onestep", "full")])
    print("### Capacity\n\n" + formatted(capacity[["method", "n_mem", "max_tokens", "max_tokens_exact"]]) + "\n")
    accuracy_plot(per_length(rows, ["method"]), "method", plots / "onestep-vs-full.png", "One-step vs full cramming, two vectors")


def depth_part(sweeps: dict[str, Path], plots: Path) -> None:
    rows = load_results(sweeps["depth"])
    table = per_length(rows, ["layers"])
    table = pd.concat([table[table["layers"] == k] for k in depths(table)])  # ascending, all last
    print("### Full cramming against depth: per length\n\n" + formatted(table) + "\n")
    capacity = load_capacity(sweeps["depth"])
    print("### Capacity against depth\n\n" + formatted(capacity[["layers", "max_tokens", "max_tokens_exact"]]) + "\n")
    accuracy_plot(table, "layers", plots / "depth.png", "Full cramming, first k decoder layers", label=lambda k: f"{depth_name(k)} layers")


def hybrid_part(sweeps: dict[str, Path], plots: Path) -> None:
    summaries, horizons = [], {}
    for name, sweep in sweeps.items():
        rows = load_results(sweep)
        horizons[name] = rows["horizon"].tolist()
        summaries.append(
            {
                "arm": name,
                "samples": len(rows),
                "horizon mean": rows["horizon"].mean(),
                "min": int(rows["horizon"].min()),
                "max": int(rows["horizon"].max()),
                "stages": rows["stages"].mean(),
                "steps": rows["steps"].mean(),
                "s / sample": rows["seconds"].mean(),
            }
        )
    print("### Progressive horizon, cap 64: the hybrid loss and the LR reset\n\n" + formatted(pd.DataFrame(summaries)) + "\n")
    fig = Figure(figsize=(7.5, 4.2))
    ax = fig.subplots()
    ax.boxplot(list(horizons.values()), tick_labels=[name.removeprefix("hybrid-").replace("-", "\n") for name in horizons])
    for i, values in enumerate(horizons.values(), start=1):
        ax.scatter([i] * len(values), values, s=12, alpha=0.6)
    ax.set(ylabel="horizon (tokens)", title="Progressive cramming, cap 64, 8 samples")
    ax.grid(True, axis="y", alpha=0.3)
    fig.savefig(plots / "hybrid-and-reset.png", dpi=120, bbox_inches="tight")


def scale_part(sweeps: dict[str, Path], plots: Path) -> None:
    """The hybrid loss's two terms before any step, on the cap-64 arms' texts: the CE (nats, mean per target) against
    each hidden state's alignment distance, computed by the engine's Alignment. The vector is N(0, 0.02²) (the
    reference's random0.02): what the distance measures at init is the vector's presence, not its value."""
    cfg = compose_config([*COMMON, *CAP_64])
    texts = torch.tensor(list(prepare_tokens(cfg)["smollm2", "pydoc"].values()))
    lm = load_model("smollm2", cfg.models["smollm2"], "cpu", "fp32")
    embeds = lm.model.get_input_embeddings()(texts)
    vector = torch.randn(len(texts), 1, embeds.shape[-1], generator=torch.Generator().manual_seed(0)) * 0.02
    with torch.no_grad():
        alone = lm.model(inputs_embeds=embeds, output_hidden_states=True).hidden_states
        crammed = lm.model(inputs_embeds=torch.cat([vector, embeds], 1), output_hidden_states=True)
    ce = torch.nn.functional.cross_entropy(crammed.logits[:, 1:-1].flatten(0, 1), texts[:, 1:].flatten()).item()
    every = torch.ones(texts.shape, dtype=torch.bool)

    def distance(kind: str, layer: int) -> float:
        per_row = Alignment(1.0, 0, "first", kind).per_row([crammed.hidden_states[layer][:, 1:]], alone[layer][:, :, None], every)
        return per_row.mean().item()

    table = pd.DataFrame(
        {
            "hidden state": range(len(alone)),
            "norm": [layer.norm(dim=-1).mean().item() for layer in alone],
            "l2": [distance("l2", k) for k in range(len(alone))],
            "cosine": [distance("cosine", k) for k in range(len(alone))],
        }
    )
    print(f"### The hybrid loss's terms at init, {len(texts)} texts of 64 tokens\n\n" + formatted(table) + "\n")
    print(
        f"CE {ce:.3f} nats; l2 summed over all {len(alone)}: {table['l2'].sum():.1f}; cosine over the first 8: {table['cosine'][:8].sum():.4f}\n"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/protocols")
    parser.add_argument("--plots", default="outputs/protocols", help="the folder the PNGs go to")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated: " + ", ".join(PARTS))
    args = parser.parse_args()
    out, plots = Path(args.out), Path(args.plots)
    plots.mkdir(parents=True, exist_ok=True)
    show = {"onestep": onestep_part, "depth": depth_part, "scale": scale_part, "hybrid": hybrid_part}
    for part in args.parts.split(","):
        sweeps = {name: run_arm(name, out, [*COMMON, *overrides]) for name, overrides in PARTS[part].items()}
        show[part](sweeps, plots)
    return 0


if __name__ == "__main__":
    sys.exit(main())
