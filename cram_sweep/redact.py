"""The one place that hides the secrets of URIs: every line cram-sweep prints and every value it stores
(sweep.yaml, tracking.json, MLflow params and artifacts) goes through `redact` first.

A URI keeps its scheme, user, host, path and the names of its query parameters; its password
(`user:PASSWORD@host`) and the values of secret-named query parameters (`?password=`, `token`, `secret`,
`...key`) become MASK. The real value lives in memory only. A URI that `redact` masked reads back as
`is_redacted`: `resume` then takes the real one from the environment (tracking.tracking_uri).
"""

from __future__ import annotations

import logging
import re

MASK = "***"

# scheme://netloc, where the netloc runs to the path, query, fragment or the end of the URI in the text.
_URI = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<netloc>[^/?#\s'\"<>]*)")
_SECRET_PARAM = re.compile(r"(?P<name>[?&;][\w.-]*(?:password|passwd|pwd|token|secret|key)=)[^&;#\s'\"<>]*", re.IGNORECASE)


def _mask_password(match: re.Match) -> str:
    """`user:PASSWORD@host` -> `user:***@host`: the password is what lies between the first ':' and the last '@'."""
    userinfo, at, host = match["netloc"].rpartition("@")
    if not at or ":" not in userinfo:
        return match[0]
    return f"{match['scheme']}{userinfo.split(':', 1)[0]}:{MASK}@{host}"


def redact(text: str) -> str:
    """`text` with the secret of every URI in it masked; idempotent, and text without such a URI is returned unchanged."""
    return _SECRET_PARAM.sub(rf"\g<name>{MASK}", _URI.sub(_mask_password, text))


def is_redacted(uri: str) -> bool:
    """`uri` is what `redact` leaves of a URI with a secret: it holds MASK where a secret was."""
    return MASK in uri and redact(uri.replace(MASK, "x")) == uri


def redact_record(record: logging.LogRecord) -> bool:
    """A logging filter (cli.main puts it on the handlers): the record's message, formatted, then redacted."""
    record.msg, record.args = redact(record.getMessage()), ()
    return True
