"""`cram-sweep bench`: the engine's throughput against the paper's one-sample loop, on the same tokens.

sample_steps_per_s counts optimization steps alone; samples_per_hour is wall time with everything a
sample costs (the paper's loop: its model loads; the engine: its no-vector baseline forward).
Measurements alternate in rounds (paper, engine, paper, engine, ...) and each row sums its rounds, so a
shared machine's drift between minutes reaches the paper's loop and the engine alike.

Rows: the paper's loop (batch size 1, full logits, one AdamW per sample) with and without its two model
loads per sample, then the engine at each precision and batch size, compiled where `compile` says (a warm-up compiles
every shape before the rounds: `compile_s` is what that took). One step costs about 4 * P * B * (L + n_mem) FLOPs
(forward, plus backward to the inputs only); `mfu` divides the achieved FLOP/s by the device's dense peak.
"""

from __future__ import annotations

import csv
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

from ..config import compose_config
from ..data import sample_token_ids
from ..engine.batching import auto_batch_size
from ..engine.cram import SampleSpec, cram
from ..engine.model import clear_cache, load_model, resolve_attention, resolve_device
from ..engine.runtime import graphs_compiled, resolve_compile
from ..results.columns import Cell
from ..sweep.grid import sample_seed
from .measure import BenchRow, PeakMemory, peak_flops, sync
from .paper import paper_sample


def resolve_batch_sizes(batch_sizes, lm, length: int, n_mem: int, precisions) -> list[int]:
    """Each batch size as given, `auto` as a sweep would choose it on this device (batching.auto_batch_size), for the
    precision that leaves the least room (bf16 keeps a bf16 copy of the weights) among `precisions`."""
    resolved = []
    for batch in batch_sizes:
        if batch == "auto":
            batch = auto_batch_size(lm, length, n_mem, "bf16" if "bf16" in precisions else "fp32")
            print(f"  batch size auto: {batch}", file=sys.stderr, flush=True)
        resolved.append(batch)
    return list(dict.fromkeys(resolved))


def bench(
    model_name="smollm2",
    dataset="pydoc",
    length=64,
    n_mem=1,
    steps=10,
    batch_sizes=(1, 8),
    precisions=("fp32", "bf16"),
    paper_samples=2,
    rounds=3,
    device="auto",
    out: Optional[str] = None,
    compile_setting="auto",
) -> list[dict]:
    cfg = compose_config(
        [f"grid.models=[{model_name}]", f"grid.datasets=[{dataset}]", f"optim.max_steps={steps}", f"optim.patience={steps}"]
    )
    dev = resolve_device(device)
    started = time.perf_counter()
    lm = load_model(model_name, cfg.models[model_name], device)
    load_seconds = time.perf_counter() - started
    batch_sizes = resolve_batch_sizes(batch_sizes, lm, length, n_mem, precisions)
    count = max(max(batch_sizes), paper_samples)
    ids = sample_token_ids(cfg.datasets[dataset], dataset, lm.tokenizer, count, length, cfg.seed)
    cell = Cell(model_name, dataset, n_mem, length)
    specs = [SampleSpec(i, ids[i], sample_seed(cfg.seed, cell, i)) for i in range(count)]
    flops_per_sample_step = 4 * lm.n_params * (length + n_mem)
    attention = resolve_attention("auto", dev, length + n_mem)
    compile_mode = resolve_compile(compile_setting, dev)
    rows: dict[tuple[str, str, int], BenchRow] = {}
    compile_seconds: dict[tuple[str, int], float] = {}

    def model_for(precision: str):
        """The model as a sweep at `precision` holds it (bf16-weights: in bf16; loaded again when that changes)."""
        return load_model(model_name, cfg.models[model_name], device, precision).model

    def measured(row: BenchRow, when: str) -> None:
        key = (row.method, row.precision, row.batch_size)
        rows[key] = rows[key].plus(row) if key in rows else row
        print(
            f"  {when}: {row.method}, {row.precision}, batch {row.batch_size}: "
            f"{row.sample_steps_per_s:.3f} sample-steps/s, {row.samples_per_hour:.1f} samples/hour",
            file=sys.stderr,
            flush=True,
        )

    def paper_loop(precision: str, reloads: bool) -> BenchRow:
        nonlocal lm
        chosen = specs[:1] if reloads else specs[:paper_samples]
        seconds = step_seconds = 0.0
        with PeakMemory(dev) as mem:
            for spec in chosen:
                model_for(precision)  # before the clock: a reload (bf16-weights) is not the paper's
                t0 = time.perf_counter()
                for _ in range(2 if reloads else 0):  # the reference reloads the model (and tokenizer) twice per sample
                    clear_cache()
                    lm = load_model(model_name, cfg.models[model_name], device, precision)
                t1 = time.perf_counter()
                paper_sample(model_for(precision), spec.token_ids, n_mem, steps, spec.init_seed, precision, cfg.optim)
                sync(dev)
                t2 = time.perf_counter()
                seconds, step_seconds = seconds + t2 - t0, step_seconds + t2 - t1
        method = "paper loop + 2 loads/sample" if reloads else "paper loop"
        return BenchRow(
            method,
            precision,
            1,
            seconds,
            step_seconds,
            len(chosen),
            len(chosen) * steps,
            mem.gb,
            flops_per_sample_step * len(chosen) * steps,
        )

    def engine(precision: str, batch: int, optim=cfg.optim) -> BenchRow:
        model = model_for(precision)  # before the clock: a reload (bf16-weights) is not a step
        with PeakMemory(dev) as mem:
            t0 = time.perf_counter()
            done = list(
                cram(
                    model,
                    specs[:batch],
                    n_mem,
                    optim,
                    precision,
                    batch,
                    check_every=1 if dev.type == "cpu" else 16,
                    attention=attention,
                    compile_mode=compile_mode,
                )
            )
            sync(dev)
        sample_steps = sum(r.steps for r in done)
        step_seconds = sum(r.seconds for r in done)  # each sample's share of the batch steps' time (compiling steps not)
        return BenchRow(
            "engine",
            precision,
            batch,
            time.perf_counter() - t0,
            step_seconds,
            batch,
            sample_steps,
            mem.gb,
            flops_per_sample_step * sample_steps,
            compile_seconds.get((precision, batch), 0.0),
        )

    def warm_up(precision: str, batch: int) -> None:
        """Two steps at this shape, as the rounds run it; where they compiled, their wall time is its compile time."""
        graphs, started = graphs_compiled(), time.perf_counter()
        engine(precision, batch, replace(cfg.optim, max_steps=2, patience=2))
        if graphs_compiled() > graphs:
            compile_seconds[precision, batch] = time.perf_counter() - started

    for precision in precisions:
        measured(paper_loop(precision, reloads=True), "with reloads")
    for precision in precisions:  # warm-up of the model as the rounds use it; compiles every shape the rounds meet
        paper_sample(model_for(precision), specs[0].token_ids, n_mem, 2, 0, precision, cfg.optim)
        for batch in batch_sizes:
            warm_up(precision, batch)
    for round_index in range(rounds):
        for precision in precisions:
            measured(paper_loop(precision, reloads=False), f"round {round_index + 1}/{rounds}")
            for batch in batch_sizes:
                measured(engine(precision, batch), f"round {round_index + 1}/{rounds}")
    clear_cache()
    peaks = peak_flops(torch.cuda.get_device_name(dev)) if dev.type == "cuda" else None
    order = [
        (method, precision, batch)
        for precision in precisions
        for method, batch in [("paper loop", 1), ("paper loop + 2 loads/sample", 1)] + [("engine", b) for b in batch_sizes]
    ]
    baseline = rows[("paper loop", "fp32" if "fp32" in precisions else precisions[0], 1)]
    table = [rows[key].as_dict(baseline, peaks) for key in order]
    header = (
        f"model {model_name} ({lm.n_params / 1e6:.1f}M params), length {length}, n_mem {n_mem}, {steps} steps/sample, {rounds} rounds, "
        f"device {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else f'cpu ({torch.get_num_threads()} threads)'}, "
        f"model load {load_seconds:.1f} s; attention: paper loop {lm.model.config._attn_implementation}, engine {attention}; "
        f"engine compiled: {compile_mode or 'no'}"
    )
    print(header)
    print_table(table)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows(table)
        print(f"written: {out}")
    return table


def print_table(table: list[dict]) -> None:
    columns = list(table[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in table)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in table:
        print("  ".join(str(row[c]).ljust(widths[c]) for c in columns))


def bench_command(args) -> int:
    bench(
        args.model,
        args.dataset,
        args.length,
        args.n_mem,
        args.steps,
        args.batch_sizes,
        args.precisions,
        args.paper_samples,
        args.rounds,
        args.device,
        args.out,
        args.compile,
    )
    return 0
