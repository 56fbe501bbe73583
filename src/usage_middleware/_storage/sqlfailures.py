"""Read statements of the SQL backends for failures, exports and declared-type mismatches.

Failures and exports read raw rows a page at a time by keyset: ``(time, id)`` compared as a
row value against the last row seen, ``ORDER BY time, id`` with ``LIMIT``, so every page is one
index range scan (the partial ``*_failed_*`` indexes for failures, the ``(key, time)`` and
``(time)`` indexes for exports) and no page costs more than the one before. Type mismatches sum
the sparse quarter-hour rollup ``quarter_mismatch_usage`` over the range's quarter-aligned span
and read raw rows only for the edges off the quarter-hour grid (historical offsets), so the
answer survives raw-row retention. Statement text depends only on the filter shape and is built
once per process (see :mod:`._sqlread`).
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from functools import lru_cache
from typing import TYPE_CHECKING, Any
from uuid import UUID

from sqlalchemy import (
    BigInteger,
    Select,
    String,
    Table,
    Text,
    Uuid,
    and_,
    bindparam,
    case,
    cast,
    func,
    literal_column,
    or_,
    select,
    tuple_,
    type_coerce,
    union_all,
)

from .._schema import (
    FAILED_REQUEST,
    FAILED_UPLOAD,
    UTCDateTime,
    api_requests,
    file_uploads,
    quarter_mismatch_usage,
)
from ._sqlread import _rows
from .base import EXPORT_COLUMNS, Failure, FailureKey, Scope
from .plan import _ceil_quarter, _floor_quarter
from .statements import Shape, Statement, filter_clauses, scope_params

if TYPE_CHECKING:
    from .sql import SQLBackend

__all__ = ["export_rows", "failure_rows", "mismatch_rows"]

UTC = timezone.utc
_TICK = timedelta(microseconds=1)  # the stored times' resolution on both engines
_NO_ID = UUID(int=0)
_TABLES: dict[str, tuple[Table, str]] = {
    "upload": (file_uploads, "uploaded_at"),
    "request": (api_requests, "requested_at"),
    "uploads": (file_uploads, "uploaded_at"),
    "requests": (api_requests, "requested_at"),
}


def _keyed(scope: Scope, dialect: str, uploads: bool) -> tuple[Shape, bool, dict[str, Any]]:
    """The filter shape and parameters, plus whether the scope is one key: that is compared
    with ``=`` (parameter ``key``), so PostgreSQL walks the (key, time) index in time order
    and stops at ``LIMIT``, where ``= ANY`` of a one-element array would sort the key's
    rows."""
    shape, params = scope_params(scope, dialect, uploads=uploads)
    if scope.keys is None or len(scope.keys) != 1:
        return shape, False, params
    params["key"] = params.pop("keys")[0]
    return Shape(False, shape.providers, shape.types, shape.families), True, params


def _key_filter(table: Table, single: bool) -> list[Any]:
    return [table.c.api_key_id == bindparam("key", type_=Uuid())] if single else []


def _utc(value: datetime) -> datetime:
    """psycopg returns timestamptz in the session's zone; answers are UTC everywhere."""
    return value if value.tzinfo is UTC else value.astimezone(UTC)


# --- failures ---------------------------------------------------------------------------------

_FAILURE_COLUMNS = {
    "upload": ("provider", "file_type", "declared_type", "file_size", "error_message"),
    "request": ("method", "path", "status_code", "error_message"),
}


@lru_cache(maxsize=64)
def _failure_statement(kind: str, dialect: str, shape: Shape, single: bool) -> Statement:
    """Failed rows of one kind in ``[start, end)`` strictly before ``(t, cid)`` in (time, id)
    order, newest first, at most ``lim`` of them."""
    table, at_name = _TABLES[kind]
    at = table.c[at_name]
    failed = FAILED_UPLOAD if kind == "upload" else FAILED_REQUEST
    stmt = (
        select(table.c.id, at, table.c.api_key_id, *(table.c[c] for c in _FAILURE_COLUMNS[kind]))
        .where(
            failed,
            at >= bindparam("start", type_=UTCDateTime()),
            at < bindparam("end", type_=UTCDateTime()),
            tuple_(at, table.c.id)
            < tuple_(bindparam("t", type_=UTCDateTime()), bindparam("cid", type_=Uuid())),
            *_key_filter(table, single),
            *filter_clauses(table, shape, dialect),
        )
        .order_by(at.desc(), table.c.id.desc())
        .limit(bindparam("lim"))
    )
    return Statement(stmt, dialect)


def _before(kind: str, before: FailureKey | None, end: datetime) -> tuple[datetime, UUID]:
    """The (time, id) row value that rows of ``kind`` must be below to come after ``before``
    in the (time, kind, id) descending order."""
    if before is None:
        return end, _NO_ID  # with ``time < end`` already required: no further bound
    t, k, cid = before
    if k == kind:
        return t, cid
    if kind < k:  # this kind sorts after the cursor's at one instant: time <= t
        return t + _TICK, _NO_ID
    return t, _NO_ID  # time < t


def failure_rows(
    backend: SQLBackend,
    scope: Scope,
    start: datetime,
    end: datetime,
    kinds: tuple[str, ...],
    before: FailureKey | None,
    limit: int,
) -> list[Failure]:
    """The next page of failures: ``limit`` newest of each kind, merged, ``limit`` kept."""
    if scope.keys is not None and not scope.keys:
        return []
    out: list[Failure] = []
    for kind in kinds:
        shape, single, params = _keyed(scope, backend.name, uploads=kind == "upload")
        t, cid = _before(kind, before, end)
        params.update(start=start, end=end, t=t, cid=cid, lim=limit)
        statement = _failure_statement(kind, backend.name, shape, single)
        for row in _rows(backend, statement, params):
            if kind == "upload":
                rid, at, key, provider, file_type, declared, size, message = row
                out.append(
                    Failure(
                        "upload", _utc(at), rid, key, provider=provider, file_type=file_type,
                        declared_type=declared, file_size=size, error_message=message,
                    )
                )  # fmt: skip
            else:
                rid, at, key, method, route, status, message = row
                out.append(
                    Failure(
                        "request", _utc(at), rid, key, method=method, route=route,
                        status_code=status, error_message=message,
                    )
                )  # fmt: skip
    out.sort(key=lambda f: f.key, reverse=True)
    return out[:limit]


# --- export -----------------------------------------------------------------------------------


def _as_text(column: Any, dialect: str) -> Any:
    """``column`` as an export carries it: ids as canonical UUID text and times as ISO 8601
    UTC text with microseconds, formatted by the database; other columns unchanged."""
    if isinstance(column.type, Uuid):
        if dialect == "postgresql":
            return cast(column, Text).label(column.name)
        hex_ = type_coerce(column, String())  # SQLite stores 32 hex digits
        parts = [func.substr(hex_, a, n) for a, n in ((1, 8), (9, 4), (13, 4), (17, 4), (21, 12))]
        dashed: Any = parts[0]
        for part in parts[1:]:
            dashed = dashed.concat("-").concat(part)
        return case((hex_.is_(None), None), else_=func.lower(dashed)).label(column.name)
    if isinstance(column.type, UTCDateTime):
        if dialect == "postgresql":
            return (
                func.to_char(
                    func.timezone(literal_column("'UTC'"), column),
                    literal_column("'YYYY-MM-DD\"T\"HH24:MI:SS.US\"+00:00\"'"),
                )
            ).label(column.name)
        # SQLite stores 'YYYY-MM-DD HH:MM:SS.ffffff' (UTC)
        stored = type_coerce(column, String())
        return func.replace(stored, " ", "T").concat("+00:00").label(column.name)
    return column


@lru_cache(maxsize=32)
def _export_statement(dataset: str, dialect: str, shape: Shape, single: bool) -> Statement:
    """Raw rows of ``dataset`` in ``[start, end)`` after ``(t, cid)``, oldest first, ids and
    times as text made by the database (cheaper than Python objects formatted one by one)."""
    table, at_name = _TABLES[dataset]
    at = table.c[at_name]
    columns = [_as_text(table.c[c], dialect) for c in EXPORT_COLUMNS[dataset]]
    stmt = (
        select(*columns)
        .where(
            at >= bindparam("start", type_=UTCDateTime()),
            at < bindparam("end", type_=UTCDateTime()),
            tuple_(at, table.c.id)
            > tuple_(bindparam("t", type_=UTCDateTime()), bindparam("cid", type_=Uuid())),
            *_key_filter(table, single),
            *filter_clauses(table, shape, dialect),
        )
        .order_by(at, table.c.id)
        .limit(bindparam("lim"))
    )
    return Statement(stmt, dialect)


def export_rows(
    backend: SQLBackend,
    dataset: str,
    scope: Scope,
    start: datetime,
    end: datetime,
    after: tuple[datetime, UUID] | None,
    limit: int,
) -> list[tuple[Any, ...]]:
    """One keyset page of raw rows (a short statement: no connection is held between pages)."""
    if scope.keys is not None and not scope.keys:
        return []
    shape, single, params = _keyed(scope, backend.name, uploads=dataset == "uploads")
    t, cid = after if after is not None else (start - _TICK, _NO_ID)
    params.update(start=start, end=end, t=t, cid=cid, lim=limit)
    return _rows(backend, _export_statement(dataset, backend.name, shape, single), params)


# --- declared-type mismatches -----------------------------------------------------------------


@lru_cache(maxsize=32)
def _mismatch_statement(dialect: str, shape: Shape) -> Statement:
    """(file_type, declared_type, uploads): the rollup's quarters in ``[q0, q1)`` plus raw rows
    in ``[r0, r1)`` and ``[r2, r3)`` (the edges off the quarter-hour grid)."""
    m = quarter_mismatch_usage
    rolled: Select[Any] = (
        select(m.c.file_type, m.c.declared_type, cast(func.sum(m.c.total_uploads), BigInteger))
        .where(
            m.c.usage_quarter >= bindparam("q0", type_=UTCDateTime()),
            m.c.usage_quarter < bindparam("q1", type_=UTCDateTime()),
            *filter_clauses(m, shape, dialect),
        )
        .group_by(m.c.file_type, m.c.declared_type)
    )
    u = file_uploads
    at = u.c.uploaded_at
    raw: Select[Any] = (
        select(u.c.file_type, u.c.declared_type, cast(func.count(), BigInteger))
        .where(
            or_(
                and_(
                    at >= bindparam("r0", type_=UTCDateTime()),
                    at < bindparam("r1", type_=UTCDateTime()),
                ),
                and_(
                    at >= bindparam("r2", type_=UTCDateTime()),
                    at < bindparam("r3", type_=UTCDateTime()),
                ),
            ),
            u.c.declared_type.isnot(None),
            u.c.declared_type != u.c.file_type,
            *filter_clauses(u, shape, dialect),
        )
        .group_by(u.c.file_type, u.c.declared_type)
    )
    return Statement(union_all(rolled, raw), dialect)  # type: ignore[arg-type]


def mismatch_rows(
    backend: SQLBackend, scope: Scope, start: datetime, end: datetime
) -> list[tuple[str, str, int]]:
    """Declared-type mismatches over ``[start, end)`` (rows may repeat a pair; they add)."""
    if scope.keys is not None and not scope.keys:
        return []
    shape, params = scope_params(scope, backend.name)
    q0, q1 = _ceil_quarter(start), _floor_quarter(end)
    if q0 >= q1:  # no whole quarter hour inside: raw rows only
        q0 = q1 = start
        edges = (start, end, end, end)
    else:
        edges = (start, q0, q1, end)
    params.update(q0=q0, q1=q1, **dict(zip(("r0", "r1", "r2", "r3"), edges, strict=True)))
    return [
        (t, d, int(n))
        for t, d, n in _rows(backend, _mismatch_statement(backend.name, shape), params)
    ]
