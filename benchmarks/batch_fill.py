"""How full the batches run (issue 14): one cell at a time, as workers ran before, against all cells of one model
and n_mem in one right-padded batch, as they run now. Same samples, same engine, no Ray; each optimization
forward's batch size and padded positions are counted by a forward hook.

    .venv/bin/python benchmarks/batch_fill.py                                  # make run's grid on SmolLM2 (~15 min on 2 CPU cores)
    .venv/bin/python benchmarks/batch_fill.py grid.models=[tiny_llama] grid.n_mem=[1]   # seconds
    .venv/bin/python benchmarks/batch_fill.py --max-padding 0.5 --max-padding 1.0       # one "now" row per padding bound
    .venv/bin/python benchmarks/batch_fill.py --replay outputs/<sweep-dir>              # a stored full sweep, no model

Any Hydra override changes the grid (default: make run's lengths 8/16/32, 4 samples, 150 steps, batch 4).

A full-cramming sample's steps do not depend on its batch, so the engine's admission rule (`cram._admit`) can be
replayed on measured (length, steps) pairs without the model. After measuring, the "now" rows are replayed and must
give the measured forwards (a check of the replay), and a "clairvoyant" row shows the fewest forwards any schedule
reaches: each sample's steps known in advance, longest first, no padding bound. `--replay` does the same for every
(model, n_mem) of a stored sweep's full-cramming rows, so larger grids can be compared in seconds.
"""

from __future__ import annotations

import argparse
import math
import time
from collections import deque

from cram_sweep.config import compose_config, load_sweep_config
from cram_sweep.cram import MAX_PADDING, SampleResult, _admit, cram, padded_and_real
from cram_sweep.errors import UserError
from cram_sweep.model import load_model
from cram_sweep.orchestrate import prepare_tokens, samples_per_item, work_items
from cram_sweep.report import load_results
from cram_sweep.store import SweepDir

MAKE_RUN = ["grid.lengths=[8,16,32]", "grid.samples=4", "optim.max_steps=150", "optim.patience=100", "batch_size=4", "precision=fp32"]
CLAIRVOYANT = "clairvoyant: steps known, longest first, no padding bound"
HEADER = "| worker batches | optimization forwards | at full batch | one sample alone | padded positions | wall (s) |"


def fill(sizes: list[int], padded: int, real: int, batch_size: int) -> dict:
    """Share of forwards at a full batch and with one sample alone; padded positions over the real ones."""
    return {
        "steps": len(sizes),
        "full_share": sum(size == batch_size for size in sizes) / len(sizes),
        "alone_share": sum(size == 1 for size in sizes) / len(sizes),
        "padding": padded / real - 1,
    }


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
    lengths = {(spec.cell, spec.sample): len(spec.token_ids) for specs in batches for spec in specs}
    real = sum(steps[key] * (lengths[key] + cfg.grid.n_mem[0]) for key in steps)
    return {
        **fill(sizes, sum(padded), real, cfg.batch_size),
        "wall_s": time.perf_counter() - started,
        "samples": [(length, steps[key]) for key, length in lengths.items()],  # in the order the samples were given
    }


class _Slots:
    """The engine's batch as the admission rule sees it: the (length, steps left) of each running sample."""

    def __init__(self):
        self.running: list[tuple[int, int]] = []

    def __len__(self) -> int:
        return len(self.running)

    def positions(self, extra=()) -> tuple[int, int]:
        return padded_and_real([length for length, _ in [*self.running, *extra]])


def replay(batches: list[list[tuple[int, int]]], batch_size: int, n_mem: int, max_padding: float = MAX_PADDING) -> dict:
    """The forwards the engine runs on these (length, steps) samples, each list one after another, by its own
    admission rule; a sample holds its slot for exactly its steps."""
    sizes, padded = [], 0
    for samples in batches:
        waiting, slots = deque(samples), _Slots()
        while waiting or slots:
            slots.running += _admit(slots, waiting, batch_size, max_padding)
            sizes.append(len(slots))
            padded += len(slots) * (max(length for length, _ in slots.running) + n_mem)
            slots.running = [(length, left - 1) for length, left in slots.running if left > 1]
    real = sum(steps * (length + n_mem) for samples in batches for length, steps in samples)
    return {**fill(sizes, padded, real, batch_size), "wall_s": math.nan}


def clairvoyant(items: list[list[tuple[int, int]]], batch_size: int, n_mem: int) -> dict:
    """The fewest forwards: each sample's steps known in advance, longest first (LPT), no padding bound."""
    return {CLAIRVOYANT: replay([sorted(samples, key=lambda s: -s[1]) for samples in items], batch_size, n_mem, math.inf)}


def print_table(rows: dict) -> None:
    print(HEADER)
    print("| --- | --- | --- | --- | --- | --- |")
    for name, row in rows.items():
        wall = "" if math.isnan(row["wall_s"]) else round(row["wall_s"])
        print(f"| {name} | {row['steps']} | {row['full_share']:.0%} | {row['alone_share']:.0%} | {row['padding']:+.0%} | {wall} |")


def replay_sweep(sweep_dir: str, bounds: list[float]) -> None:
    """Replay a stored sweep's full-cramming samples in its work items (orchestrate.work_items' order and size)."""
    sweep = SweepDir(sweep_dir)
    cfg = load_sweep_config(sweep.config)
    if cfg.batch_size == "auto":
        raise SystemExit(f"{sweep_dir} ran with batch_size=auto: the replay needs the batch size a worker chose")
    results = load_results(sweep)
    results = results[results["method"] == "full"].sort_values(["length", "cell", "sample"], kind="stable")
    per_item = samples_per_item(cfg)
    for (model, n_mem), group in results.groupby(["model", "n_mem"]):
        rows = list(zip(group["length"], group["steps"], group["cell"]))
        item_rows = [rows[start : start + per_item] for start in range(0, len(rows), per_item)]
        per_cell = [[(n, s) for n, s, c in item if c == cell] for item in item_rows for cell in dict.fromkeys(c for *_, c in item)]
        items = [[(n, s) for n, s, _ in item] for item in item_rows]
        print(f"\n{model}, n_mem={n_mem}: {len(rows)} samples in {len(items)} work items, {group['steps'].sum()} sample-steps")
        print_table(
            {
                "one cell at a time (before, replayed)": replay(per_cell, cfg.batch_size, n_mem),
                **{f"across cells, max_padding {b} (now, replayed)": replay(items, cfg.batch_size, n_mem, b) for b in bounds},
                **clairvoyant(items, cfg.batch_size, n_mem),
            }
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-padding", type=float, action="append", help=f"one 'now' row per bound (repeatable; default {MAX_PADDING})")
    parser.add_argument("--replay", metavar="SWEEP_DIR", help="replay a stored sweep's full-cramming samples instead of running a grid")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    bounds = args.max_padding or [MAX_PADDING]
    if args.replay:
        try:
            replay_sweep(args.replay, bounds)
        except UserError as err:
            raise SystemExit(f"error: {err}") from None
        return
    cfg = compose_config(MAKE_RUN + args.overrides)
    lm = load_model(cfg.grid.models[0], cfg.models[cfg.grid.models[0]], "cpu")
    (item,) = work_items(cfg, prepare_tokens(cfg), set())
    per_cell = [[s for s in item.specs if s.cell == cell] for cell in dict.fromkeys(s.cell for s in item.specs)]
    before = measure(lm, per_cell, cfg)
    now = {f"across cells, right-padded, max_padding {bound} (now)": measure(lm, [item.specs], cfg, bound) for bound in bounds}
    rows = {"one cell at a time (before)": before, **now}
    if not cfg.method.progressive:  # a progressive sample's positions change by stage: the replay does not model that
        for bound, row in zip(bounds, now.values()):
            replayed = replay([row["samples"]], cfg.batch_size, cfg.grid.n_mem[0], bound)
            assert replayed["steps"] == row["steps"], f"the replay gives {replayed['steps']} forwards, the engine ran {row['steps']}"
        rows.update(clairvoyant([row["samples"]], cfg.batch_size, cfg.grid.n_mem[0]))
    print_table(rows)
    # A padded batch changes the GEMM shapes, so rounding can move a real model's stop by a step (exact on the tiny
    # models of tests/test_progressive.py); the clairvoyant row uses the last "now" row's steps.
    moved = sum(a != b for row in now.values() for a, b in zip(before["samples"], row["samples"]))
    print(f"samples whose steps moved by rounding between batchings: {moved}")


if __name__ == "__main__":
    main()
