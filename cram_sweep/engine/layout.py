"""The shapes of a step's forwards: how a batch's rows are laid out, and which waiting samples may join.

Kernels choose their reduction order by the shapes of a product (a CUDA GEMM by its row count and width; a CPU
reduction by its width), so a row's numbers depend on the shapes of the forward it runs in. With
`batch_invariant=true` (the default) those shapes depend on the row alone:
- its width is its text's length (full cramming: its target; progressive: its cap, every stage at the cap with the
  targets past the stage masked), so rows are grouped by width and each group runs its own forward;
- that forward has exactly `rows` rows (the batch size), the group's live rows followed by inert ones (zero vectors
  and text, no loss);
- every reduction over a row's positions runs at its width (batch.py reduces each group at its own width).
Then the same kernels, at the same shapes, compute a row whatever its batch-mates, and where the kernels do not
depend on the row count (this project's CPUs: measured in docs/determinism.md) whatever the batch size.

`batch_invariant=false` gives that up for speed: every live row in one forward at its actual row count, right-padded
to the longest current target (a progressive stage's, not its cap), and a waiting sample joins while padded
positions stay within `max_padding` of the real ones. Rows record which layout ran them (`batch_invariant`,
`forward_rows`).
"""

from __future__ import annotations

from dataclasses import dataclass

# Widths one fixed-shape batch runs at once: a work item's samples come shortest first, so while the last samples of
# one length finish, the next length's fill the free slots (two forwards a step, each at the full row count) rather
# than leaving the slots empty; a third width would add a third mostly-inert forward.
MAX_WIDTHS = 2

# batch_invariant=false: a waiting sample joins only if padded positions stay within this share of the real ones.
MAX_PADDING = 0.5


def batch_rows(batch_size: int, rows_per_length: int, batch_invariant: bool) -> int:
    """The rows a worker's batch runs: batch-invariant, never more than the grid puts at one length in a work item
    (`rows_per_length`): beyond, every forward would carry inert rows. A function of the settings, so a resume keeps it."""
    return min(batch_size, rows_per_length) if batch_invariant else batch_size


@dataclass(frozen=True)
class Group:
    """One forward of a step: the batch rows it runs (in batch order) and the text positions it feeds."""

    rows: list[int]
    width: int


@dataclass(frozen=True)
class Layout:
    """`rows`: the batch size, the most rows any forward takes (and, batch-invariant, exactly the rows every forward
    takes); `offset`: text tokens fed before the first target (the rule's offset)."""

    batch_invariant: bool
    rows: int
    offset: int
    max_padding: float = MAX_PADDING

    def forward_rows(self, live: int) -> int:
        """The rows a forward of `live` rows runs with: padded to `rows` where batch-invariant."""
        return self.rows if self.batch_invariant else live

    def groups(self, lengths: list[int], targets: list[int]) -> list[Group]:
        """The forwards of a step over rows whose texts have `lengths` and whose current targets are `targets`."""
        if not self.batch_invariant:
            return [Group(list(range(len(lengths))), self.offset + max(targets))]
        by_width: dict[int, list[int]] = {}
        for i, length in enumerate(lengths):
            by_width.setdefault(length, []).append(i)
        return [Group(rows, width) for width, rows in sorted(by_width.items())]

    def admits(self, lengths: list[int], targets: list[int], length: int, target: int) -> bool:
        """Whether a waiting sample (text `length`, first target `target`) may join rows of these `lengths` and `targets`
        (at most `rows` rows in all; an empty batch takes any sample)."""
        if len(lengths) >= self.rows:
            return False
        if not lengths:
            return True
        if self.batch_invariant:
            return len(set(lengths) | {length}) <= MAX_WIDTHS
        widths = [self.offset + n for n in [*targets, target]]
        return max(widths) * len(widths) <= (1 + self.max_padding) * sum(widths)
