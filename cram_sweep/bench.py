"""`cram-sweep bench`: the engine's throughput against the paper's one-sample loop, on the same tokens.

sample_steps_per_s counts optimization steps alone; samples_per_hour is wall time with everything a
sample costs (the paper's loop: its model loads; the engine: its no-vector baseline forward).

Rows: the paper's loop (batch size 1, full logits, one AdamW per sample) with and without its two model
loads per sample, then the engine at each precision and batch size. One step costs about
4 * P * B * (L + n_mem) FLOPs (forward, plus backward to the inputs only).
"""

from __future__ import annotations

import csv
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import torch
import torch.nn.functional as F

from .config import Cell, compose_config, sample_seed
from .cram import SampleSpec, autocast, cram
from .data import sample_token_ids
from .model import clear_cache, load_model, resolve_attention, resolve_device

# Dense bf16 / fp32 (TF32) peak FLOP/s of common accelerators, for MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


@dataclass
class BenchRow:
    method: str
    precision: str
    batch_size: int
    seconds: float  # wall time, per-sample set-up included
    step_seconds: float  # time in optimization steps alone
    samples: int
    steps: int
    peak_mem_gb: float
    flops: float

    @property
    def sample_steps_per_s(self) -> float:
        return self.samples * self.steps / self.step_seconds

    @property
    def samples_per_hour(self) -> float:
        return 3600 * self.samples / self.seconds

    def as_dict(self, baseline: "BenchRow", device_peak: Optional[float]) -> dict:
        sample_steps = self.sample_steps_per_s
        base_steps = baseline.sample_steps_per_s
        achieved = self.flops / self.step_seconds
        return {
            "method": self.method, "precision": self.precision, "batch": self.batch_size,
            "sample_steps_per_s": round(sample_steps, 3), "samples_per_hour": round(self.samples_per_hour, 1),
            "x_steps_vs_paper": round(sample_steps / base_steps, 2), "peak_mem_gb": round(self.peak_mem_gb, 2),
            "gflop_s": round(achieved / 1e9, 1), "mfu": round(achieved / device_peak, 3) if device_peak else "",
        }


class PeakMemory:
    """Peak GPU memory, or peak process RSS on CPU (sampled every 5 ms)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        import psutil

        process = psutil.Process()
        self.running = True

        def sample():
            while self.running:
                self.peak = max(self.peak, process.memory_info().rss)
                time.sleep(0.005)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.running = False
            self.thread.join()

    @property
    def gb(self) -> float:
        return self.peak / 1e9


def paper_sample(model, token_ids: List[int], n_mem: int, steps: int, init_seed: int, precision: str, optim) -> None:
    """One sample as the reference script runs it: its own vector and AdamW, full logits, batch size 1."""
    device = next(model.parameters()).device
    embed = model.get_input_embeddings()
    gen = torch.Generator().manual_seed(init_seed)
    memory = torch.nn.Parameter((torch.randn(n_mem, embed.weight.shape[1], generator=gen) * embed.weight.std().item()).to(device))
    opt = torch.optim.AdamW([memory], lr=optim.lr, betas=(optim.beta1, optim.beta2), weight_decay=optim.weight_decay)
    ids = torch.tensor(token_ids, device=device)[None]
    text = embed(ids)
    for _ in range(steps):
        with autocast(model, precision, cast_cache=False):
            logits = model(inputs_embeds=torch.cat([memory[None], text], 1)).logits[0, n_mem:-1]
        loss = F.cross_entropy(logits.float(), ids[0, 1:])
        (logits.argmax(-1) == ids[0, 1:]).float().mean().item()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(model_name="smollm2", dataset="pydoc", length=64, n_mem=1, steps=20, batch_sizes=(1, 4, 8, 16),
          precisions=("fp32", "bf16"), paper_samples=2, device="auto", out: Optional[str] = None) -> List[dict]:
    cfg = compose_config([f"grid.models=[{model_name}]", f"grid.datasets=[{dataset}]", f"optim.max_steps={steps}", f"optim.patience={steps}"])
    dev = resolve_device(device)
    started = time.perf_counter()
    lm = load_model(model_name, cfg.models[model_name], device)
    load_seconds = time.perf_counter() - started
    count = max(max(batch_sizes), paper_samples)
    ids = sample_token_ids(cfg.datasets[dataset], dataset, lm.tokenizer, count, length, cfg.seed)
    cell = Cell(model_name, dataset, n_mem, length)
    specs = [SampleSpec(i, ids[i], sample_seed(cfg.seed, cell, i)) for i in range(count)]
    flops_per_sample_step = 4 * lm.n_params * (length + n_mem)
    attention = resolve_attention("auto", dev, length + n_mem)
    rows: List[BenchRow] = []

    def measured(row: BenchRow) -> None:
        rows.append(row)
        print(f"  {row.method}, {row.precision}, batch {row.batch_size}: {row.sample_steps_per_s:.3f} sample-steps/s, "
              f"{row.samples_per_hour:.1f} samples/hour", file=sys.stderr, flush=True)

    for precision in precisions:
        paper_sample(lm.model, specs[0].token_ids, n_mem, 2, 0, precision, cfg.optim)  # warm-up
        with PeakMemory(dev) as mem:
            t0 = time.perf_counter()
            for spec in specs[:paper_samples]:
                paper_sample(lm.model, spec.token_ids, n_mem, steps, spec.init_seed, precision, cfg.optim)
            _sync(dev)
        seconds = time.perf_counter() - t0
        total_flops = flops_per_sample_step * paper_samples * steps
        measured(BenchRow("paper loop", precision, 1, seconds, seconds, paper_samples, steps, mem.gb, total_flops))
        t0 = time.perf_counter()
        for spec in specs[:paper_samples]:
            for _ in range(2):  # the reference reloads the model (and tokenizer) twice per sample
                clear_cache()
                lm = load_model(model_name, cfg.models[model_name], device)
            paper_sample(lm.model, spec.token_ids, n_mem, steps, spec.init_seed, precision, cfg.optim)
        _sync(dev)
        measured(BenchRow("paper loop + 2 loads/sample", precision, 1, time.perf_counter() - t0, seconds, paper_samples, steps, mem.gb, total_flops))
        for batch in batch_sizes:
            with PeakMemory(dev) as mem:
                t0 = time.perf_counter()
                done = list(cram(lm.model, specs[:batch], n_mem, cfg.optim, precision, batch,
                                 check_every=1 if dev.type == "cpu" else 16, attention=attention))
                _sync(dev)
            seconds = time.perf_counter() - t0
            steps_done = sum(r["steps"] for r in done) / len(done)
            step_seconds = sum(r["seconds"] for r in done)  # each sample's share of the batch steps' time
            measured(BenchRow("engine", precision, batch, seconds, step_seconds, batch, steps_done, mem.gb, flops_per_sample_step * steps_done * batch))
    clear_cache()
    peak = next((v for k, v in PEAK_FLOPS.items() if dev.type == "cuda" and k in torch.cuda.get_device_name(dev)), None)
    baseline = next(r for r in rows if r.method == "paper loop" and r.precision == "fp32") if "fp32" in precisions else rows[0]
    table = [r.as_dict(baseline, peak) for r in rows]
    header = (f"model {model_name} ({lm.n_params / 1e6:.1f}M params), length {length}, n_mem {n_mem}, {steps} steps/sample, "
              f"device {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else f'cpu ({torch.get_num_threads()} threads)'}, "
              f"model load {load_seconds:.1f} s; attention: paper loop {lm.model.config._attn_implementation}, engine {attention}")
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


def print_table(table: List[dict]) -> None:
    columns = list(table[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in table)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in table:
        print("  ".join(str(row[c]).ljust(widths[c]) for c in columns))


def bench_command(args) -> int:
    bench(args.model, args.dataset, args.length, args.n_mem, args.steps, args.batch_sizes, args.precisions,
          args.paper_samples, args.device, args.out)
    return 0
