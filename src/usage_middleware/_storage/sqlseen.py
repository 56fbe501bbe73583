"""``last_seen`` for ``GET /consumers`` on the SQL backends: each key's newest upload (inside
the filters) or request in a range.

Uploads are probed per key, newest first on ``file_uploads``' ``(api_key_id, uploaded_at)``
index: one short backward index scan per key (PostgreSQL: a subquery per element of the keys
array; SQLite: a correlated subquery per ``json_each`` row). PostgreSQL probes requests the
same way on ``api_requests``' ``(api_key_id, requested_at)``.

SQLite's ``api_requests`` has no index led by the key — a live request is one raw row there,
and keeping a per-key index in order cost the writer more than half of what it spends on each
row — only ``(requested_at, api_key_id)``. Its requests are found in short time windows
instead: the unsealed tail (the raw rows from the seal instant on, minutes long) in one pass
for every key; then, for each key not in it, the quarter hour that ``quarter_request_usage``
(which holds every request before the seal instant) names as the key's newest in the range,
scanned backwards until the key's first entry. Only the quarter cut by the range's end can hold
none of the key's requests before that end; then the quarter before it is read too.

**Retention.** Raw rows before ``retention_start`` may be gone while the rollups keep their
counts. The rule, so that ``last_seen`` never silently means something else: it is the exact
instant whenever the key's newest activity in the range is at or after ``retention_start``
(every raw row from there on is kept, so the probe finds it). Otherwise the newest activity lies
in pruned time, and ``last_seen`` is the start of the UTC quarter hour that holds it, read from
the quarter-hour rollups (``quarter_usage`` inside the filters, ``quarter_request_usage``): the
true instant truncated to its quarter hour — never later than it, at most 15 minutes earlier,
always inside the range. Keys never read as having no activity because their raw rows are gone.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from typing import TYPE_CHECKING, Any
from uuid import UUID

from sqlalchemy import (
    Select,
    Table,
    Uuid,
    bindparam,
    cast,
    func,
    literal_column,
    null,
    select,
    union_all,
)
from sqlalchemy.dialects.postgresql import ARRAY

from .._schema import (
    UTCDateTime,
    api_requests,
    file_uploads,
    quarter_request_usage,
    quarter_usage,
)
from .._sqlitewrite import utc_text
from ._sqlread import _instants, run_reads
from .base import Scope
from .plan import _ceil_quarter, _floor_quarter
from .statements import Shape, Statement, filter_clauses, scope_params

if TYPE_CHECKING:
    from .sql import SQLBackend

__all__ = ["last_seen"]

UTC = timezone.utc
_QUARTER = timedelta(minutes=15)
Key = UUID | None

_PROBE_SOURCES: dict[str, tuple[tuple[Table, str], tuple[Table, str]]] = {
    "raw": ((file_uploads, "uploaded_at"), (api_requests, "requested_at")),
    "quarter": ((quarter_usage, "usage_quarter"), (quarter_request_usage, "usage_quarter")),
}


@lru_cache(maxsize=32)
def _probe_statement(
    source: str, dialect: str, shape: Shape, null_key: bool, uploads: bool, requests: bool
) -> Statement:
    """Per key of parameter ``probe`` (and the rows without a key when ``null_key``): the
    newest upload time inside the filters (with ``uploads``) and the newest request time (with
    ``requests``) in ``[lo, hi)`` of ``source`` (raw rows, or the quarter-hour rollups' quarter
    starts); a table not probed gives NULL."""
    pg = dialect == "postgresql"
    if pg:
        keys: Any = (
            func.unnest(bindparam("probe", type_=ARRAY(Uuid()))).table_valued("key")
            .render_derived(name="probe_keys")
        )  # fmt: skip
        key = keys.c.key
    else:
        keys = func.json_each(bindparam("probe")).table_valued("value")
        key = keys.c.value

    def newest(table: Table, at_name: str, matching: Any, probed: bool, filtered: bool) -> Any:
        at = table.c[at_name]
        if not probed:
            return cast(null(), UTCDateTime())
        where = filter_clauses(table, shape, dialect) if filtered else []
        if not pg and source == "quarter" and matching is not None:
            # the SQLite rollup indexes are on ifnull(api_key_id, '')
            cond = func.ifnull(table.c.api_key_id, literal_column("''")) == matching
        elif matching is not None:
            cond = table.c.api_key_id == matching
        else:
            cond = table.c.api_key_id.is_(None)
        return (
            select(at)
            .where(
                cond,
                at >= bindparam("lo", type_=UTCDateTime()),
                at < bindparam("hi", type_=UTCDateTime()),
                *where,
            )
            .order_by(at.desc())
            .limit(1)
            .scalar_subquery()
        )

    (upload_table, upload_at), (request_table, request_at) = _PROBE_SOURCES[source]

    def row(k: Any, matching: Any) -> Select[Any]:
        return select(
            k.label("k"),
            newest(upload_table, upload_at, matching, uploads, True).label("u"),
            newest(request_table, request_at, matching, requests, False).label("r"),
        )

    selects = [row(key, key).select_from(keys)]
    if null_key:
        selects.append(row(cast(null(), Uuid()), None))
    stmt: Any = selects[0] if len(selects) == 1 else union_all(*selects)
    return Statement(stmt, dialect)


def _probe(
    backend: SQLBackend,
    source: str,
    scope: Scope,
    keys: Sequence[Key],
    lo: datetime,
    hi: datetime,
    *,
    uploads: bool = True,
    requests: bool = True,
) -> dict[Key, datetime]:
    """The newest activity per key in ``[lo, hi)`` as ``source`` knows it, of the uploads
    and/or the requests (keys without any are left out)."""
    dialect = backend.name
    shape, params = scope_params(Scope(None, scope.providers, scope.file_types), dialect)
    named = [k for k in keys if k is not None]
    if dialect == "postgresql":
        params["probe"] = named
    else:
        params["probe"] = json.dumps([k.hex for k in named])
    params.update(lo=lo, hi=hi)
    statement = _probe_statement(source, dialect, shape, None in keys, uploads, requests)
    out: dict[Key, datetime] = {}
    for k, u, r in run_reads(backend, [(statement, params)])[0]:
        times = [_utc(t) for t in (u, r) if t is not None]
        if times:
            # SQLite gives the key as the hex text it was probed with
            out[k if k is None or isinstance(k, UUID) else UUID(k)] = max(times)
    return out


def _utc(value: datetime) -> datetime:
    """psycopg returns timestamptz in the session's zone; answers are UTC everywhere."""
    return value if value.tzinfo is UTC else value.astimezone(UTC)


# --- SQLite's requests: time windows instead of a per-key index -------------------------------


@lru_cache(maxsize=1)
def _tail_statement() -> Statement:
    """Every key's newest request in ``[lo, hi)``: one pass over the index for all keys."""
    ar = api_requests
    at = ar.c.requested_at
    stmt = (
        select(ar.c.api_key_id, func.max(at))
        .where(
            at >= bindparam("lo", type_=UTCDateTime()), at < bindparam("hi", type_=UTCDateTime())
        )
        .group_by(ar.c.api_key_id)
    )
    return Statement(stmt, "sqlite")


@lru_cache(maxsize=1)
def _keyed_window_statement() -> Statement:
    """Per ``[key, lo, hi]`` of parameter ``windows``: the key's newest request in ``[lo, hi)``,
    a backward scan of the index from ``hi`` that stops at the key's first entry."""
    each = func.json_each(bindparam("windows")).table_valued("value")
    key, lo, hi = (func.json_extract(each.c.value, f"$[{i}]") for i in range(3))
    ar = api_requests
    at = ar.c.requested_at
    newest = (
        select(at)
        .where(at >= lo, at < hi, ar.c.api_key_id.is_not_distinct_from(key))
        .order_by(at.desc())
        .limit(1)
        .scalar_subquery()
    )
    return Statement(select(key.label("k"), newest).select_from(each), "sqlite")


def _tail(backend: SQLBackend, lo: datetime, hi: datetime) -> dict[Key, datetime]:
    rows = run_reads(backend, [(_tail_statement(), {"lo": lo, "hi": hi})])[0]
    return {k: _utc(t) for k, t in rows}


def _keyed_windows(
    backend: SQLBackend, windows: Sequence[tuple[Key, datetime, datetime]]
) -> dict[Key, datetime]:
    """Each key's newest request in its own window (keys without one there are left out)."""
    # the bounds as SQLite stores a UTCDateTime, so that text compares as time
    param = json.dumps(
        [[None if k is None else k.hex, utc_text(lo), utc_text(hi)] for k, lo, hi in windows]
    )
    rows = run_reads(backend, [(_keyed_window_statement(), {"windows": param})])[0]
    return {None if k is None else UUID(k): _utc(t) for (k, t) in rows if t is not None}


def _sqlite_requests_seen(
    backend: SQLBackend, keys: Sequence[Key], lo: datetime, hi: datetime
) -> dict[Key, datetime]:
    """Each key's newest raw request in ``[lo, hi)``, read in time windows (module docstring)."""
    seals = _instants(backend)  # None: every request is in the rollups as written
    top = hi if seals is None else min(hi, seals.fine)
    found: dict[Key, datetime] = {}
    if top < hi:  # the unsealed tail
        tail = _tail(backend, max(lo, top), hi)
        found = {k: tail[k] for k in keys if k in tail}
    rest = [k for k in keys if k not in found]
    for _ in range(2):  # the key's newest quarter; once more if the range's end cut it empty
        if not rest or lo >= top:
            break
        quarters = _probe(backend, "quarter", Scope(), rest, _floor_quarter(lo), top,
                          uploads=False)  # fmt: skip
        seen = _keyed_windows(
            backend, [(k, max(lo, q), min(top, q + _QUARTER)) for k, q in quarters.items()]
        )
        found.update(seen)
        rest = [k for k, q in quarters.items() if k not in seen and q + _QUARTER > top]
        top = _floor_quarter(top)
    return found


def _newest(*answers: dict[Key, datetime]) -> dict[Key, datetime]:
    out: dict[Key, datetime] = {}
    for answer in answers:
        for k, t in answer.items():
            if k not in out or t > out[k]:
                out[k] = t
    return out


def _raw(
    backend: SQLBackend, scope: Scope, keys: Sequence[Key], lo: datetime, hi: datetime
) -> dict[Key, datetime]:
    """Each key's newest raw upload (inside the filters) or request in ``[lo, hi)``."""
    if backend.name == "postgresql":
        return _probe(backend, "raw", scope, keys, lo, hi)
    uploads = _probe(backend, "raw", scope, keys, lo, hi, requests=False)
    return _newest(uploads, _sqlite_requests_seen(backend, keys, lo, hi))


def last_seen(
    backend: SQLBackend,
    scope: Scope,
    start: datetime,
    end: datetime,
    keys: Iterable[Key],
) -> dict[Key, datetime]:
    """Each key's newest activity in ``[start, end)`` by the rule of this module's docstring."""
    keys = list(keys)
    if not keys:
        return {}
    exact = _raw(backend, scope, keys, start, end)
    complete_from = backend.retention_start(["file_uploads", "api_requests"])
    stale = [
        k
        for k in keys
        if k not in exact or (complete_from is not None and exact[k] < complete_from)
    ]
    if not stale:
        return exact
    q0, q1 = _ceil_quarter(start), _floor_quarter(end)
    if complete_from is not None:
        q1 = min(q1, complete_from)
    if q0 < q1:
        exact.update(_probe(backend, "quarter", scope, stale, q0, q1))
    return exact
