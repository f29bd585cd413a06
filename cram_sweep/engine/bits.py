"""How many bits a finished sample's vectors use (`analysis.bits`): its stored vectors re-scored rounded to fewer bits,
with no further optimization.

Roundings (roundings.py names them): bf16, fp8 e4m3, and uniform k-bit per vector: symmetric, with one scale per
vector, its largest |x|: q = round(x / s * L) / L * s with L = 2^(k-1) - 1 levels each side of 0. That scale clips
nothing (the largest entry is kept exactly, up to its sign), is per vector because the vectors of one sample differ
in norm, and is symmetric because the entries are centered near 0 (docs/beyond.md).

All roundings of a sample are the rows of ONE teacher-forced forward (the engine's `score`) over the scored text
(the rule's `scored_length`: full, the whole text; progressive, the horizon prefix), which gives each its greedy
horizon and accuracy there; `bits_needed` is the scan of roundings.py over whether each keeps what the optimization
reached (the rule's `keeps`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from .roundings import BF16, FP8, FULL_WIDTH, UNIFORM, bits_needed, rounding_names


@dataclass
class BitsColumns:
    """The bits analysis's columns of a result row. Without an analysis (analysis.bits=false, a failed sample, a
    progressive sample of horizon 0): empty lists, bits_needed FULL_WIDTH. Always stored_bits = (numbers in the
    vectors) * bits_needed."""

    roundings: list[str]
    horizon_at_bits: list[int]  # per rounding: leading correct predictions over the scored text, in the row's horizon units
    acc_at_bits: list[float]  # per rounding: teacher-forced accuracy over the scored text's targets
    bits_needed: int
    stored_bits: int
    bits_seconds: float  # what the analysis took (not counted in the row's `seconds`)

    @classmethod
    def off(cls, numbers: int) -> BitsColumns:
        return cls([], [], [], FULL_WIDTH, numbers * FULL_WIDTH, 0.0)


@dataclass
class Scored:
    """One forward's verdict on each row of rounded vectors."""

    horizon: list[int]
    acc: list[float]


def uniform(vectors: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric uniform `bits`-bit rounding of each vector (the last dim), scaled by its largest |x|; a zero vector stays 0."""
    levels = 2 ** (bits - 1) - 1
    scale = vectors.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(vectors / scale * levels) / levels * scale


def round_vectors(vectors: torch.Tensor, name: str) -> torch.Tensor:
    """The vectors as rounding `name` stores them, back in their own dtype."""
    if name == BF16:
        return vectors.to(torch.bfloat16).to(vectors.dtype)
    if name == FP8:
        return vectors.to(torch.float8_e4m3fn).to(vectors.dtype)  # saturates at ±448
    return uniform(vectors, int(name.removeprefix(UNIFORM)))


def analyse(
    memory: torch.Tensor, uniform_bits: Iterable[int], score: Callable[[torch.Tensor], Scored], keeps: Callable[[int, float], bool]
) -> BitsColumns:
    """The columns of one sample's analysis. memory: (n_mem, hidden) its stored vectors; `score` runs one forward of
    (R, n_mem, hidden) rounded vectors; `keeps(horizon, acc)`: a rounding keeps what the optimization reached."""
    started = time.perf_counter()
    names = rounding_names(uniform_bits)
    scored = score(torch.stack([round_vectors(memory, name) for name in names]))
    needed = bits_needed(names, [keeps(h, a) for h, a in zip(scored.horizon, scored.acc)])
    return BitsColumns(names, scored.horizon, scored.acc, needed, memory.numel() * needed, time.perf_counter() - started)
