"""The cramming loop: optimize `n_mem` input vectors per text so a frozen LM reproduces the text.

Many samples of one cell share each forward/backward. The loss is the SUM of the samples' mean
cross-entropies and AdamW is elementwise with per-parameter state, so every sample follows the
trajectory it would follow alone. A finished sample leaves at once and a waiting one takes its slot.
"""

from __future__ import annotations

import contextlib
import math
import time
import weakref
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Optional, Union

import torch

from .config import OptimConfig
from .loss import cross_entropy_and_argmax

LN2 = math.log(2.0)


@dataclass
class SampleSpec:
    sample: int
    token_ids: list[int]
    init_seed: int


@dataclass
class SampleResult:
    """One finished sample, as the engine yields it (the sample's columns of the results store)."""

    sample: int
    token_ids: list[int]
    acc_no_mem: float
    acc: float  # best teacher-forced accuracy over the steps
    ce_no_mem_bits: float
    ce_bits: float  # lowest summed CE over the steps
    info_gain_bits: float
    gain_tokens: float
    seconds: float  # this sample's share of its batches' step time
    steps: int
    converged: bool
    greedy_prefix: int
    greedy_exact: bool
    memory: list[float]  # the vectors of the best-accuracy forward, n_mem x hidden flattened
    error: Optional[str] = None  # set when the sample failed (its loss became non-finite)


@dataclass
class Heartbeat:
    """Progress within long samples: `live` samples in the batch, the most `steps` any has run."""

    live: int
    steps: int


_BF16_LINEAR_WEIGHTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def autocast(model, precision: str, cast_cache: bool = True):
    """bf16: the forward under bf16 autocast, as the reference runs Llama-family models.

    Autocast re-casts frozen (requires_grad=False) fp32 weights on every call; with `cast_cache` each
    Linear's weight is cast once and kept, which gives the same numbers without the per-step casts.
    """
    if precision != "bf16":
        yield
        return
    device_type = model.get_input_embeddings().weight.device.type
    if not cast_cache:
        with torch.autocast(device_type, dtype=torch.bfloat16):
            yield
        return
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if model not in _BF16_LINEAR_WEIGHTS:
        _BF16_LINEAR_WEIGHTS[model] = [torch.nn.Parameter(m.weight.detach().to(torch.bfloat16), requires_grad=False) for m in linears]
    originals = [m.weight for m in linears]
    for module, weight in zip(linears, _BF16_LINEAR_WEIGHTS[model]):
        module.weight = weight
    try:
        with torch.autocast(device_type, dtype=torch.bfloat16):
            yield
    finally:
        for module, weight in zip(linears, originals):
            module.weight = weight


@contextlib.contextmanager
def attention_implementation(model, implementation: Optional[str]):
    """Run the model with this attention implementation (None: as loaded), then restore it."""
    loaded = model.config._attn_implementation
    if implementation is None or implementation == loaded:
        yield
        return
    model.set_attn_implementation(implementation)
    try:
        yield
    finally:
        model.set_attn_implementation(loaded)


def leading_matches(correct: torch.Tensor) -> torch.Tensor:
    """Per row of a (B, N) boolean tensor, the number of leading True entries: how many tokens a greedy
    decode gets right before its first error."""
    return correct.long().cumprod(dim=1).sum(dim=1)


def score(model, memory: Optional[torch.Tensor], text_embeds: torch.Tensor, targets: torch.Tensor, precision: str, cast_cache: bool = True):
    """Per-sample mean CE, accuracy and greedy prefix of the `length - 1` next-token predictions of the text.

    Greedy decoding from the vectors reproduces the text up to the first wrong teacher-forced
    prediction (until then it sees exactly the teacher-forced inputs), so the greedy prefix is the
    number of leading correct predictions: the greedy check costs nothing beyond this forward.

    memory: (B, n_mem, H) or None; text_embeds: (B, L, H); targets: (B, L-1) = token ids 1..L-1.
    """
    length = text_embeds.shape[1]
    inputs = text_embeds if memory is None else torch.cat([memory, text_embeds], dim=1)
    # logits of exactly the positions that predict text tokens 1..L-1: no (B, L, V) slice in the backward
    predicting = torch.arange(inputs.shape[1] - length, inputs.shape[1] - 1, device=inputs.device)
    with autocast(model, precision, cast_cache):
        logits = model(inputs_embeds=inputs, logits_to_keep=predicting, use_cache=False).logits
    ce, argmax = cross_entropy_and_argmax(logits.flatten(0, 1), targets.flatten())
    ce = ce.view_as(targets).mean(dim=1)
    correct = argmax.view_as(targets) == targets
    return ce, correct.float().mean(dim=1), leading_matches(correct)


class _Batch:
    """The samples currently being optimized, with their best-so-far state, all as (B, ...) tensors."""

    def __init__(self, model, n_mem: int, optim: OptimConfig, precision: str, cast_cache: bool):
        self.model = model
        self.n_mem = n_mem
        self.optim = optim
        self.precision = precision
        self.cast_cache = cast_cache
        self.embed = model.get_input_embeddings()
        self.device = self.embed.weight.device
        self.init_std = self.embed.weight.float().std().item()
        self.specs: list[SampleSpec] = []
        self.params: list[torch.nn.Parameter] = []
        self.optimizer = torch.optim.AdamW(
            [torch.nn.Parameter(torch.zeros(1, device=self.device))],
            lr=optim.lr,
            betas=(optim.beta1, optim.beta2),
            weight_decay=optim.weight_decay,
        )
        self.optimizer.param_groups[0]["params"] = self.params
        self.tensors: dict = {}
        self.started: list[float] = []
        self.seconds: list[float] = []

    def __len__(self) -> int:
        return len(self.specs)

    def add(self, specs: list[SampleSpec]) -> None:
        ids = torch.tensor([s.token_ids for s in specs], device=self.device)
        text_embeds = self.embed(ids)
        targets = ids[:, 1:]
        with torch.no_grad():
            ce0, acc0, _ = score(self.model, None, text_embeds, targets, self.precision, self.cast_cache)
        hidden = self.embed.weight.shape[1]
        for spec in specs:
            gen = torch.Generator().manual_seed(spec.init_seed)
            init = torch.randn(self.n_mem, hidden, generator=gen) * self.init_std
            self.params.append(torch.nn.Parameter(init.to(self.device)))
        count = len(specs)
        new = {
            "text_embeds": text_embeds,
            "targets": targets,
            "ce_no_mem": ce0,
            "acc_no_mem": acc0,
            "steps": torch.zeros(count, dtype=torch.long, device=self.device),
            "best_acc": torch.full((count,), -1.0, device=self.device),
            "best_step": torch.zeros(count, dtype=torch.long, device=self.device),
            "best_prefix": torch.zeros(count, dtype=torch.long, device=self.device),
            "best_ce": torch.full((count,), math.inf, device=self.device),
            "best_mem": torch.stack([p.detach().clone() for p in self.params[-count:]]),
            "done": torch.zeros(count, dtype=torch.bool, device=self.device),
            "nonfinite": torch.zeros(count, dtype=torch.bool, device=self.device),
        }
        self.tensors = {k: torch.cat([self.tensors[k], v]) if self.tensors else v for k, v in new.items()}
        self.specs += specs
        self.seconds += [0.0] * count

    def step(self) -> None:
        t, optim = self.tensors, self.optim
        memory = torch.stack(self.params)
        ce, acc, prefix = score(self.model, memory, t["text_embeds"], t["targets"], self.precision, self.cast_cache)
        finite = torch.isfinite(ce)
        loss = torch.where(finite, ce, torch.zeros_like(ce)).sum()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            live = ~t["done"]
            t["steps"] += live.long()
            improved = live & (acc > t["best_acc"])
            t["best_acc"] = torch.where(improved, acc, t["best_acc"])
            t["best_step"] = torch.where(improved, t["steps"], t["best_step"])
            t["best_prefix"] = torch.where(improved, prefix, t["best_prefix"])
            t["best_mem"] = torch.where(improved[:, None, None], memory.detach(), t["best_mem"])
            t["best_ce"] = torch.where(live & (ce < t["best_ce"]), ce, t["best_ce"])
            stale = t["steps"] - t["best_step"] >= optim.patience
            t["nonfinite"] |= live & ~finite
            t["done"] |= live & ((acc >= 1.0) | stale | (t["steps"] >= optim.max_steps) | ~finite)
        self.optimizer.step()

    def take_finished(self) -> list[SampleResult]:
        t = self.tensors
        done = t["done"].cpu()
        if not done.any():
            return []
        index = done.nonzero().flatten().tolist()
        rows = self._rows(index)
        keep = (~done).nonzero().flatten().tolist()
        for i in sorted(index, reverse=True):
            self.optimizer.state.pop(self.params[i], None)
            del self.params[i]
        keep_t = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.tensors = {k: v.index_select(0, keep_t) for k, v in t.items()} if keep else {}
        self.specs = [self.specs[i] for i in keep]
        self.seconds = [self.seconds[i] for i in keep]
        return rows

    def _rows(self, index: list[int]) -> list[SampleResult]:
        t = self.tensors
        idx = torch.tensor(index, dtype=torch.long, device=self.device)
        length = t["targets"].shape[1] + 1
        cols = {
            k: t[k][idx].cpu().tolist() for k in ("ce_no_mem", "acc_no_mem", "best_ce", "best_acc", "best_prefix", "steps", "nonfinite")
        }
        memory = t["best_mem"][idx].float().cpu().flatten(1).tolist()
        rows = []
        for j, i in enumerate(index):
            n_pred = length - 1
            ce_no_mem_bits = cols["ce_no_mem"][j] * n_pred / LN2
            ce_bits = cols["best_ce"][j] * n_pred / LN2
            acc, acc_no_mem = cols["best_acc"][j], cols["acc_no_mem"][j]
            rows.append(
                SampleResult(
                    sample=self.specs[i].sample,
                    token_ids=self.specs[i].token_ids,
                    acc_no_mem=acc_no_mem,
                    acc=acc,
                    ce_no_mem_bits=ce_no_mem_bits,
                    ce_bits=ce_bits,
                    info_gain_bits=ce_no_mem_bits - ce_bits,
                    gain_tokens=(acc - acc_no_mem) * n_pred,
                    seconds=self.seconds[i],
                    steps=cols["steps"][j],
                    converged=acc >= 1.0,
                    greedy_prefix=cols["best_prefix"][j],
                    greedy_exact=cols["best_prefix"][j] == n_pred,
                    memory=memory[j],
                    error=f"loss became non-finite at step {cols['steps'][j]}" if cols["nonfinite"][j] else None,
                )
            )
        return rows


def cram(
    model,
    samples: Iterable[SampleSpec],
    n_mem: int,
    optim: OptimConfig,
    precision: str = "fp32",
    batch_size: int = 16,
    check_every: int = 1,
    cast_cache: bool = True,
    attention: Optional[str] = None,
    heartbeat_seconds: Optional[float] = None,
) -> Iterator[Union[SampleResult, Heartbeat]]:
    """Optimize every sample of one cell (all of one length); yield one `SampleResult` per sample as it finishes.

    Speed options that leave results unchanged (up to float rounding): `batch_size`, `check_every` (steps
    between host syncs; finished samples are frozen on the device meanwhile), `cast_cache` (bf16 weight
    copies) and `attention` (the attention implementation; None: as the model was loaded).
    With `heartbeat_seconds`, also yields a `Heartbeat` at most that often, so a caller can show progress
    within long samples.
    """
    with attention_implementation(model, attention):
        yield from _cram(model, samples, n_mem, optim, precision, batch_size, check_every, cast_cache, heartbeat_seconds)


def _cram(model, samples, n_mem, optim, precision, batch_size, check_every, cast_cache, heartbeat_seconds):
    waiting = deque(samples)
    batch = _Batch(model, n_mem, optim, precision, cast_cache)
    last_heartbeat = time.perf_counter()
    while waiting or len(batch):
        free = batch_size - len(batch)
        if free > 0 and waiting:
            batch.add([waiting.popleft() for _ in range(min(free, len(waiting)))])
        started = time.perf_counter()
        for _ in range(check_every):
            batch.step()
        share = (time.perf_counter() - started) / len(batch)
        batch.seconds = [s + share for s in batch.seconds]
        yield from batch.take_finished()
        if heartbeat_seconds is not None and len(batch) and time.perf_counter() - last_heartbeat >= heartbeat_seconds:
            last_heartbeat = time.perf_counter()
            yield Heartbeat(live=len(batch), steps=int(batch.tensors["steps"].max()))
