"""How full the batches run (issue 14): one cell at a time, as workers ran before, against all cells of one model
and n_mem in one right-padded batch, as they run now. Same samples, same engine, no Ray; each optimization
forward's batch size and padded positions are counted by a forward hook.

    .venv/bin/python benchmarks/batch_fill.py                                  # make run's grid on SmolLM2 (~15 min on 2 CPU cores)
    .venv/bin/python benchmarks/batch_fill.py grid.models=[tiny_llama] grid.n_mem=[1]   # seconds
    .venv/bin/python benchmarks/batch_fill.py --max-padding 0.5 --max-padding 1.0       # one "now" row per padding bound

Any Hydra override changes the grid (default: make run's lengths 8/16/32, 4 samples, 150 steps, batch 4).
"""

from __future__ import annotations

import argparse
import time

from cram_sweep.config import compose_config
from cram_sweep.cram import MAX_PADDING, SampleResult, cram
from cram_sweep.model import load_model
from cram_sweep.orchestrate import prepare_tokens, work_items

MAKE_RUN = ["grid.lengths=[8,16,32]", "grid.samples=4", "optim.max_steps=150", "optim.patience=100", "batch_size=4", "precision=fp32"]


def measure(lm, batches, cfg, max_padding: float = MAX_PADDING) -> dict:
    """Run each list of samples through the engine; count the forwards with vectors (the optimization steps)."""
    sizes, padded = [], []

    def count(module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        if embeds is not None and embeds.requires_grad:
            sizes.append(embeds.shape[0])
            padded.append(embeds.shape[0] * embeds.shape[1])

    hook = lm.model.register_forward_pre_hook(count, with_kwargs=True)
    started, steps = time.perf_counter(), {}
    try:
        for specs in batches:
            for r in cram(
                lm.model,
                specs,
                cfg.grid.n_mem[0],
                cfg.optim,
                cfg.precision,
                batch_size=cfg.batch_size,
                method=cfg.method,
                max_padding=max_padding,
            ):
                if isinstance(r, SampleResult):
                    steps[r.cell, r.sample] = r.steps
    finally:
        hook.remove()
    real = sum(
        steps[key] * (len(spec.token_ids) + cfg.grid.n_mem[0]) for specs in batches for spec in specs for key in [(spec.cell, spec.sample)]
    )
    return {
        "steps": len(sizes),
        "full_share": sum(size == cfg.batch_size for size in sizes) / len(sizes),
        "alone_share": sum(size == 1 for size in sizes) / len(sizes),
        "padding": sum(padded) / real - 1,
        "wall_s": time.perf_counter() - started,
        "sample_steps": steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-padding", type=float, action="append", help=f"one 'now' row per bound (repeatable; default {MAX_PADDING})")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = compose_config(MAKE_RUN + args.overrides)
    lm = load_model(cfg.grid.models[0], cfg.models[cfg.grid.models[0]], "cpu")
    (item,) = work_items(cfg, prepare_tokens(cfg), set())
    per_cell = [[s for s in item.specs if s.cell == cell] for cell in dict.fromkeys(s.cell for s in item.specs)]
    before = measure(lm, per_cell, cfg)
    now = {
        f"across cells, right-padded, max_padding {bound} (now)": measure(lm, [item.specs], cfg, bound)
        for bound in args.max_padding or [MAX_PADDING]
    }
    rows = {"one cell at a time (before)": before, **now}
    print("| worker batches | optimization forwards | at full batch | one sample alone | padded positions | wall (s) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, row in rows.items():
        print(
            f"| {name} | {row['steps']} | {row['full_share']:.0%} | {row['alone_share']:.0%} | {row['padding']:+.0%} | {row['wall_s']:.0f} |"
        )
    # Exact arithmetic makes a sample's trajectory independent of its batch (tests/test_progressive.py proves it on
    # tiny models); a padded batch changes the GEMM shapes, so rounding can move a stop by a step on a real model.
    for name, row in now.items():
        moved = {
            key: (steps, row["sample_steps"][key]) for key, steps in before["sample_steps"].items() if steps != row["sample_steps"][key]
        }
        print(f"{name}: samples whose steps differ from before: {len(moved)} of {len(before['sample_steps'])} {moved}")


if __name__ == "__main__":
    main()
