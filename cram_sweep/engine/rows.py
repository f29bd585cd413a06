"""Named per-row state: dataclasses whose fields are (B, ...) tensors, one row per sample of a batch.

The engine adds samples to a batch, drops the finished ones and copies rows between snapshots; every state
does that the same way, written once here:
- `cat(a, b)`: b's rows after a's; fields made with `per_position()` run over text positions along dim 1 and
  are right-padded with zeros to the longer of the two first (the positions a causal model's earlier
  positions never see, and that the engine masks out);
- `keep(index)`: the rows at `index`, in that order (`map(fn)`: any function of every tensor);
- `where(rows, other)`: other's row where the (B,) boolean `rows` is true, this state's elsewhere.

A field may itself be a `RowState`, which is handled the same way, recursively.
"""

from __future__ import annotations

import dataclasses
from typing import TypeVar

import torch

S = TypeVar("S", bound="RowState")


def per_position(short_by: int = 0):
    """A field whose dim 1 runs over text positions: `short_by` fewer than the texts' positions (e.g. 1 for the
    predictions of tokens 1..L-1)."""
    return dataclasses.field(metadata={"per_position": short_by})


def _pad(tensor: torch.Tensor, size: int) -> torch.Tensor:
    """Right-pad dim 1 with zeros to `size`."""
    if tensor.shape[1] >= size:
        return tensor
    pad = torch.zeros(tensor.shape[0], size - tensor.shape[1], *tensor.shape[2:], dtype=tensor.dtype, device=tensor.device)
    return torch.cat([tensor, pad], dim=1)


class RowState:
    """Base of the row-state dataclasses (see the module docstring)."""

    def cat(self: S, other: S, positions: int) -> S:
        """This state's rows, then `other`'s; per-position fields padded to `positions` text positions first."""
        values = {}
        for f in dataclasses.fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if isinstance(mine, RowState):
                values[f.name] = mine.cat(theirs, positions)
                continue
            if "per_position" in f.metadata:
                width = positions - f.metadata["per_position"]
                mine, theirs = _pad(mine, width), _pad(theirs, width)
            values[f.name] = torch.cat([mine, theirs])
        return type(self)(**values)

    def map(self: S, fn) -> S:
        """A state of the same type with `fn` applied to every tensor."""
        return type(self)(**{f.name: _apply(getattr(self, f.name), fn) for f in dataclasses.fields(self)})

    def keep(self: S, index: torch.Tensor) -> S:
        return self.map(lambda t: t.index_select(0, index))

    def where(self: S, rows: torch.Tensor, other: S) -> S:
        values = {}
        for f in dataclasses.fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if isinstance(mine, RowState):
                values[f.name] = mine.where(rows, theirs)
            else:
                values[f.name] = torch.where(rows.view(-1, *([1] * (mine.dim() - 1))), theirs, mine)
        return type(self)(**values)

    def tensors(self) -> list[torch.Tensor]:
        """The fields' tensors in field order (nested states flattened)."""
        out = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out += value.tensors() if isinstance(value, RowState) else [value]
        return out


def _apply(value, fn):
    return value.map(fn) if isinstance(value, RowState) else fn(value)
