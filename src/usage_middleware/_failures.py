"""``GET /failures``: failed uploads and failed requests of a range, newest first, by keyset.

A failure is an upload with ``upload_status = 'failed'`` or a request answered with status
>= 400 or an exception (``error_message`` set). Both kinds are one list ordered by (time, kind,
id) descending; a page is the ``limit`` newest strictly after the previous page's last item, so
rows written between pages never shift a page (no duplicates, no gaps) and every page costs one
index range scan per kind.

The cursor is opaque to callers: URL-safe base64 of a small JSON object naming the last item's
time, kind and id. It selects a position only — the range, zone, key scope and filters are
re-applied on every page — so a crafted cursor can move within the caller's own rows but never
reach another key's. Anything that does not decode to exactly that object is a 400.

Provider and file type filters select uploads; requests have neither, so with such a filter
the page holds uploads only (``"kinds": ["upload"]`` says so).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Collection, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any
from uuid import UUID

from ._queries import _range_json, _scope
from ._storage.base import Failure, FailureKey
from ._store import UsageStore
from ._timerange import QueryError, QuerySpec

__all__ = ["DEFAULT_LIMIT", "MAX_LIMIT", "decode_cursor", "encode_cursor", "failures"]

UTC = timezone.utc
DEFAULT_LIMIT = 50
MAX_LIMIT = 200
_KINDS = ("upload", "request")
_MAX_CURSOR_LENGTH = 200  # a real cursor is about 120 characters
_CURSOR_RE = re.compile(r"[A-Za-z0-9_-]+")
_TIME_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}\+00:00")


def _bad_cursor(why: str) -> QueryError:
    return QueryError("invalid_cursor", f"cursor is not one this API returned ({why})", "cursor")


def encode_cursor(key: FailureKey) -> str:
    """The opaque cursor for the position after ``key``."""
    at, kind, rid = key
    body = {"t": at.astimezone(UTC).isoformat(timespec="microseconds"), "k": kind, "i": rid.hex}
    raw = json.dumps(body, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def decode_cursor(value: str) -> FailureKey:
    """The position a cursor names; :class:`QueryError` (400) for anything else."""
    if len(value) > _MAX_CURSOR_LENGTH or not _CURSOR_RE.fullmatch(value):
        raise _bad_cursor("not URL-safe base64 of the expected length")
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
        body = json.loads(raw)
    except (binascii.Error, ValueError):  # UnicodeDecodeError and JSONDecodeError included
        raise _bad_cursor("does not decode") from None
    if not isinstance(body, dict) or set(body) != {"t", "k", "i"}:
        raise _bad_cursor("unexpected content")
    t, k, i = body["t"], body["k"], body["i"]
    if not (isinstance(t, str) and isinstance(k, str) and isinstance(i, str)):
        raise _bad_cursor("unexpected content")
    if k not in _KINDS or not _TIME_RE.fullmatch(t) or not re.fullmatch(r"[0-9a-f]{32}", i):
        raise _bad_cursor("unexpected content")
    try:
        at = datetime.fromisoformat(t)
    except ValueError:
        raise _bad_cursor("not a time") from None
    if not 2 <= at.year <= 9998:  # keeps a step of one microsecond either way representable
        raise _bad_cursor("time out of range")
    return at, k, UUID(hex=i)


def parse_limit(values: Sequence[str], default: int, maximum: int) -> int:
    """``limit`` as an integer in 1..``maximum`` (absent or empty: ``default``)."""
    if len(values) > 1:
        raise QueryError("repeated_parameter", "limit may be given only once", "limit")
    if not values or values[0] == "":
        return default
    value = values[0]
    if not re.fullmatch(r"[0-9]{1,6}", value) or not 1 <= int(value) <= maximum:
        raise QueryError(
            "invalid_limit", f"limit must be an integer from 1 to {maximum}, got {value[:20]!r}",
            "limit",
        )  # fmt: skip
    return int(value)


def parse_failure_options(params: Mapping[str, Sequence[str]]) -> tuple[int, FailureKey | None]:
    """``limit`` and the decoded ``cursor`` of a ``/failures`` query."""
    limit = parse_limit(params.get("limit") or [], DEFAULT_LIMIT, MAX_LIMIT)
    cursors = [v for v in params.get("cursor") or [] if v != ""]
    if len(cursors) > 1:
        raise QueryError("repeated_parameter", "cursor may be given only once", "cursor")
    return limit, decode_cursor(cursors[0]) if cursors else None


def retention_note(store: UsageStore, start: datetime, table: str | None) -> dict[str, Any]:
    """``retention_start`` (from when raw rows are complete, or None) and ``complete`` (whether
    the range starts at or after it, i.e. no raw row of the range was pruned)."""
    since = store.retention_start(table)
    return {
        "retention_start": None if since is None else since.isoformat(),
        "complete": since is None or since <= start,
    }


def _item(f: Failure) -> dict[str, Any]:
    return {
        "kind": f.kind,
        "at": f.at.isoformat(),
        "api_key_id": None if f.api_key_id is None else str(f.api_key_id),
        "provider": f.provider,
        "file_type": f.file_type,
        "declared_type": f.declared_type,
        "file_size": f.file_size,
        "method": f.method,
        "route": f.route,
        "status_code": f.status_code,
        "error_message": f.error_message,
    }


def failures(
    store: UsageStore,
    spec: QuerySpec,
    key_ids: Collection[UUID] | None,
    limit: int = DEFAULT_LIMIT,
    cursor: FailureKey | None = None,
) -> dict[str, Any]:
    """The ``GET /failures`` answer: one page of ``items``, ``next`` (cursor or None), the
    ``kinds`` the page covers, and whether raw rows of the whole range are still kept."""
    kinds = ("upload",) if spec.providers or spec.file_types else _KINDS
    rows: list[Failure] = []
    if key_ids is None or key_ids:
        store.ensure_schema()
        rows = store.backend.failure_rows(
            _scope(spec, key_ids), spec.start_utc, spec.end_utc, kinds, cursor, limit + 1
        )
    more = len(rows) > limit
    rows = rows[:limit]
    table = "file_uploads" if kinds == ("upload",) else None
    return {
        "range": _range_json(spec),
        "items": [_item(f) for f in rows],
        "next": encode_cursor(rows[-1].key) if more else None,
        "kinds": list(kinds),
        **retention_note(store, spec.start_utc, table),
    }
