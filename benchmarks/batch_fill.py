"""How full the batches run (issues 14 and 31): one cell at a time, against all cells of one model and n_mem in one
work item, in the fixed-shape layout (the default: a forward per text length, each at the batch size's rows) and the
packed one (`batch_invariant=false`: every live row in one forward padded to the longest). Same samples, same engine,
no Ray; each optimization forward's rows (live and inert) and positions are counted by a forward hook.

    .venv/bin/python benchmarks/batch_fill.py                                  # make run's grid on SmolLM2 (~15 min on 2 CPU cores)
    .venv/bin/python benchmarks/batch_fill.py grid.models=[tiny_llama] grid.n_mem=[1]   # seconds
    .venv/bin/python benchmarks/batch_fill.py --replay outputs/<sweep-dir>              # a stored full sweep, no model

Any Hydra override changes the grid (default: make run's lengths 8/16/32, 4 samples, 150 steps, batch 4).

A full-cramming sample's steps do not depend on its batch, so the engine's admission rule (`layout.Layout.admits`) can
be replayed on measured (length, steps) pairs without the model. After measuring, the replay must give the measured
forwards (a check of the replay), and a "clairvoyant" row shows the fewest batch steps any packed schedule reaches:
each sample's steps known in advance, longest first. `--replay` does the same for every (model, n_mem) of a stored
sweep's full-cramming rows, so larger grids can be compared in seconds.
"""

from __future__ import annotations

import argparse
import math
import time
from collections import deque

from cram_sweep.config import compose_config, load_sweep_config
from cram_sweep.engine.cram import SampleResult, cram
from cram_sweep.engine.layout import Layout
from cram_sweep.engine.model import load_model
from cram_sweep.errors import UserError
from cram_sweep.report.build import load_results
from cram_sweep.results.store import SweepDir
from cram_sweep.sweep.items import prepare_tokens, samples_per_item, work_items

MAKE_RUN = ["grid.lengths=[8,16,32]", "grid.samples=4", "optim.max_steps=150", "optim.patience=100", "batch_size=4", "precision=fp32"]
CLAIRVOYANT = "clairvoyant: packed, steps known, longest first"
HEADER = "| worker batches | batch steps | forwards | live rows of all rows | computed positions over real | wall (s) |"
LAYOUTS = {"fixed shapes (default)": True, "packed": False}


def fill(steps: int, forwards: list[tuple[int, int, int]], real: int) -> dict:
    """`forwards`: (live rows, rows, width) of each optimization forward; `real`: the sample-steps' positions."""
    return {
        "steps": steps,
        "forwards": len(forwards),
        "live_share": sum(live for live, _, _ in forwards) / sum(rows for _, rows, _ in forwards),
        "computed": sum(rows * width for _, rows, width in forwards) / real,
    }


def measure(lm, batches, cfg, batch_invariant: bool) -> dict:
    """Run each list of samples through the engine; count the forwards with vectors (the optimization steps) and their
    live rows (inert rows are zeros)."""
    n_mem = cfg.grid.n_mem[0]
    forwards, steps = [], {}

    def count(module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        if embeds is not None and embeds.requires_grad:
            live = int(embeds[:, :n_mem].flatten(1).any(dim=1).sum())
            forwards.append((live, embeds.shape[0], embeds.shape[1]))

    hook = lm.model.base_model.register_forward_pre_hook(count, with_kwargs=True)  # the fused head calls the backbone
    started = time.perf_counter()
    try:
        for specs in batches:
            for r in cram(
                lm.model, specs, n_mem, cfg.optim, cfg.precision, cfg.batch_size, method=cfg.method, batch_invariant=batch_invariant
            ):
                if isinstance(r, SampleResult):
                    steps[r.cell, r.sample] = r.steps
    finally:
        hook.remove()
    lengths = {(spec.cell, spec.sample): len(spec.token_ids) for specs in batches for spec in specs}
    real = sum(steps[key] * (lengths[key] + n_mem) for key in steps)
    samples = [(length, steps[key]) for key, length in lengths.items()]  # in the order the samples were given
    return {**fill(0, forwards, real), "wall_s": time.perf_counter() - started, "samples": samples}


def replay(batches: list[list[tuple[int, int]]], batch_size: int, n_mem: int, batch_invariant: bool) -> dict:
    """The forwards the engine runs on these (length, steps) full-cramming samples, each list one after another, by its
    own layout; a sample holds its slot for exactly its steps."""
    layout = Layout(batch_invariant, batch_size, offset=1)
    steps, forwards = 0, []
    for samples in batches:
        waiting, running = deque(samples), []
        while waiting or running:
            while waiting and layout.admits([n for n, _ in running], [n - 1 for n, _ in running], waiting[0][0], waiting[0][0] - 1):
                running.append(waiting.popleft())
            steps += 1
            for group in layout.groups([n for n, _ in running], [n - 1 for n, _ in running]):
                forwards.append((len(group.rows), layout.forward_rows(len(group.rows)), group.width + n_mem))
            running = [(length, left - 1) for length, left in running if left > 1]
    real = sum(steps_ * (length + n_mem) for samples in batches for length, steps_ in samples)
    return {**fill(steps, forwards, real), "wall_s": math.nan}


def clairvoyant(items: list[list[tuple[int, int]]], batch_size: int, n_mem: int) -> dict:
    """The fewest batch steps: each sample's steps known in advance, longest first (LPT), packed without a bound."""
    steps, forwards = 0, []
    for samples in items:
        waiting, running = deque(sorted(samples, key=lambda s: -s[1])), []
        while waiting or running:
            while waiting and len(running) < batch_size:
                running.append(waiting.popleft())
            steps += 1
            forwards.append((len(running), len(running), max(n for n, _ in running) + n_mem))
            running = [(length, left - 1) for length, left in running if left > 1]
    real = sum(s * (length + n_mem) for samples in items for length, s in samples)
    return {CLAIRVOYANT: {**fill(steps, forwards, real), "wall_s": math.nan}}


def print_table(rows: dict) -> None:
    print(HEADER)
    print("| --- | --- | --- | --- | --- | --- |")
    for name, row in rows.items():
        wall = "" if math.isnan(row["wall_s"]) else round(row["wall_s"])
        print(f"| {name} | {row['steps'] or ''} | {row['forwards']} | {row['live_share']:.0%} | {row['computed']:.2f} | {wall} |")


def replay_sweep(sweep_dir: str) -> None:
    """Replay a stored sweep's full-cramming samples in its work items (items.work_items' order and size)."""
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
                "one cell at a time (replayed)": replay(per_cell, cfg.batch_size, n_mem, True),
                **{f"across cells, {name} (replayed)": replay(items, cfg.batch_size, n_mem, inv) for name, inv in LAYOUTS.items()},
                **clairvoyant(items, cfg.batch_size, n_mem),
            }
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replay", metavar="SWEEP_DIR", help="replay a stored sweep's full-cramming samples instead of running a grid")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.replay:
        try:
            replay_sweep(args.replay)
        except UserError as err:
            raise SystemExit(f"error: {err}") from None
        return
    cfg = compose_config(MAKE_RUN + args.overrides)
    lm = load_model(cfg.grid.models[0], cfg.models[cfg.grid.models[0]], "cpu")
    n_mem = cfg.grid.n_mem[0]
    (item,) = work_items(cfg, prepare_tokens(cfg), set())
    per_cell = [[s for s in item.specs if s.cell == cell] for cell in dict.fromkeys(s.cell for s in item.specs)]
    rows = {"one cell at a time, fixed shapes": measure(lm, per_cell, cfg, True)}
    across = {name: measure(lm, [item.specs], cfg, invariant) for name, invariant in LAYOUTS.items()}
    if cfg.method.name != "progressive":  # a progressive sample's positions change by stage: the replay does not model that
        for name, row in across.items():
            replayed = replay([row["samples"]], cfg.batch_size, n_mem, LAYOUTS[name])
            assert replayed["forwards"] == row["forwards"], (
                f"{name}: the replay gives {replayed['forwards']} forwards, the engine ran {row['forwards']}"
            )
            row["steps"] = replayed["steps"]
    rows.update({f"across cells, {name}": row for name, row in across.items()})
    if cfg.method.name != "progressive":
        rows.update(clairvoyant([across["packed"]["samples"]], cfg.batch_size, n_mem))
    print_table(rows)


if __name__ == "__main__":
    main()
