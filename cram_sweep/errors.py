"""The errors a user sees as one `error:` line, and the one way to flatten any message to one line."""

from __future__ import annotations

from typing import Optional


class UserError(Exception):
    """Bad input: the message is one line that says what to change (exit 2)."""


class StoreError(Exception):
    """Writing the store failed (disk full, permissions); what was written before is intact (exit 3)."""


def one_line(message: object, limit: Optional[int] = None) -> str:
    """`message` (an exception, or any text) with its whitespace runs collapsed; at most `limit` characters."""
    text = " ".join(str(message).split())
    return text if limit is None else text[:limit]


def require(ok: bool, message: str) -> None:
    """A config check: `message` (the key to change, and how) as a UserError where `ok` is false."""
    if not ok:
        raise UserError(message)
