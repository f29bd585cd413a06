"""The roundings of the bits analysis (`analysis.bits`, bits.py) and the scan that gives `bits_needed`: pure, no torch,
so the report reads them too.

A rounding is named by how it stores each number of the vectors: `bf16` (16 bits), `fp8_e4m3` (8 bits, a float
format), `int<k>` (uniform k-bit, symmetric, one scale per vector). `rounding_names` orders them bf16, fp8, then the
uniform widths from high to low, the order of the `roundings` column.

`bits_needed` scans [bf16, then the uniform widths from high to low] and stops at the first rounding that loses what
the sample reached: it is the width of the last rounding before that one, FULL_WIDTH where bf16 already loses it.
So it is monotone by construction: a narrower rounding that happens to keep the sample after a wider one failed is
not counted. fp8 is reported but not scanned: its error is relative to each number, a uniform grid's is relative
to the vector's largest entry, so the two do not form one ladder.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

BF16 = "bf16"
FP8 = "fp8_e4m3"
UNIFORM = "int"
FULL_WIDTH = 32  # the float32 the vectors are stored in: bits_needed where even bf16 loses the sample, or no analysis ran
WIDTHS = {BF16: 16, FP8: 8}


def rounding_names(uniform_bits: Iterable[int]) -> list[str]:
    """The roundings of one analysis, in the order of the `roundings` column: bf16, fp8, then int<k> from high k to low."""
    return [BF16, FP8] + [f"{UNIFORM}{bits}" for bits in sorted(set(uniform_bits), reverse=True)]


def width(name: str) -> int:
    """Bits per number of a rounding."""
    return WIDTHS[name] if name in WIDTHS else int(name.removeprefix(UNIFORM))


def bits_needed(names: Sequence[str], kept: Sequence[bool]) -> int:
    """The width of the last scanned rounding (bf16, then the uniform ones in the order given: high to low) that keeps
    the sample before the first that does not; FULL_WIDTH if bf16 does not. `kept[i]`: rounding `names[i]` keeps it."""
    needed = FULL_WIDTH
    for name, ok in zip(names, kept):
        if name == FP8:
            continue
        if not ok:
            break
        needed = width(name)
    return needed
