"""Read statements of the SQL backends: each rollup tier joined to its plan pieces.

Statement text depends only on the source and on which filters are present (:class:`_Shape`),
so each is built and compiled once per process; keys, providers, file types and the planned
pieces travel as parameters (arrays with ``= ANY`` / ``LIKE ANY`` on PostgreSQL, expanding
``IN`` and JSON on SQLite). On PostgreSQL the cached text goes straight to psycopg on a pooled
connection in autocommit: one round trip per statement.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache, partial
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Date,
    DateTime,
    Integer,
    Select,
    String,
    Table,
    Uuid,
    and_,
    any_,
    bindparam,
    case,
    cast,
    exists,
    func,
    literal_column,
    or_,
    select,
    true,
    type_coerce,
    union_all,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.exc import DBAPIError, OperationalError

from .._errors import ReadTimeoutError
from .._pool import submit
from .._schema import (
    ROLLUP_KEYS,
    api_requests,
    daily_request_usage,
    daily_usage,
    file_uploads,
    hourly_request_usage,
    hourly_usage,
    latency_bucket,
    monthly_request_usage,
    quarter_request_usage,
    quarter_usage,
)
from .base import Histogram, Scope, UploadRow
from .plan import Piece, plan, request_plan

if TYPE_CHECKING:
    from .sql import SQLBackend

__all__ = ["request_histogram", "upload_rows"]

# --- statements: text fixed per shape, values as parameters -----------------------------------


@dataclass(frozen=True)
class _Shape:
    """What a statement's text depends on besides its source: which filters are present."""

    keys: bool
    providers: bool
    types: bool
    families: bool


def _escape_like(value: str) -> str:
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _scope(scope: Scope, dialect: str, *, uploads: bool = True) -> tuple[_Shape, dict[str, Any]]:
    """The shape of a query's filters and their values as parameters (see :func:`_where`)."""
    params: dict[str, Any] = {}
    if scope.keys is not None:
        params["keys"] = sorted(scope.keys)
    if uploads:
        if scope.providers:
            params["providers"] = list(scope.providers)
        exact = [t for t in scope.file_types if not t.endswith("/*")]
        families = [_escape_like(t[:-1]) + "%" for t in scope.file_types if t.endswith("/*")]
        if exact:
            params["types"] = exact
        if families:
            params["families"] = families if dialect == "postgresql" else json.dumps(families)
    shape = _Shape(*(n in params for n in ("keys", "providers", "types", "families")))
    return shape, params


def _where(table: Table, shape: _Shape, dialect: str) -> list[ColumnElement[bool]]:
    """The filters of ``shape`` on ``table``, reading their values from parameters: arrays with
    ``= ANY`` / ``LIKE ANY`` on PostgreSQL, expanding ``IN`` and a JSON list on SQLite."""
    pg = dialect == "postgresql"

    def among(col: Any, name: str, kind: Any) -> Any:
        if pg:
            return col == any_(bindparam(name, type_=ARRAY(kind)))
        return col.in_(bindparam(name, expanding=True))

    out: list[ColumnElement[bool]] = []
    if shape.keys:
        key: Any = table.c.api_key_id
        if not pg and table.name in ROLLUP_KEYS:
            # the SQLite rollup indexes are on ifnull(api_key_id, ''): say it the same way
            key = type_coerce(func.ifnull(key, literal_column("''")), Uuid())
        out.append(among(key, "keys", Uuid()))
    if shape.providers:
        out.append(among(table.c.provider, "providers", String()))
    kinds: list[ColumnElement[bool]] = []
    if shape.types:
        kinds.append(among(table.c.file_type, "types", String()))
    if shape.families:
        ft = table.c.file_type
        if pg:  # backslash is PostgreSQL's default LIKE escape
            kinds.append(ft.like(any_(bindparam("families", type_=ARRAY(String())))))
        else:
            each = func.json_each(bindparam("families")).table_valued("value")
            match: Select[Any] = select(literal_column("1")).select_from(each)
            kinds.append(exists(match.where(ft.like(each.c.value, escape="\\"))))
    if kinds:
        out.append(or_(*kinds))
    return out


class _Statement:
    """A statement built once per (source, dialect, shape); on PostgreSQL also its compiled
    text, which :func:`_rows` hands straight to psycopg (which prepares it per connection)."""

    def __init__(self, stmt: Select[Any], dialect: str) -> None:
        self.stmt = stmt
        self.sql: str | None = None
        self.constants: dict[str, Any] = {}
        if dialect == "postgresql":
            from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg

            compiled = stmt.compile(dialect=PGDialect_psycopg())  # type: ignore[no-untyped-call]
            self.sql = str(compiled)
            # values the statement carries itself (OFFSET 0, the 'success' literal)
            self.constants = {k: v for k, v in compiled.params.items() if v is not None}


def _piece_params(
    pieces: Sequence[Piece], name: str, as_date: bool, dialect: str
) -> dict[str, Any]:
    """The values :func:`_joined`'s statement reads its pieces from."""
    if dialect != "postgresql":
        # SQLite stores dates as ISO text and UTCDateTime as naive 'YYYY-MM-DD HH:MM:SS.ffffff'
        fmt = "%Y-%m-%d" if as_date else "%Y-%m-%d %H:%M:%S.%f"
        rows = [[x.lo.strftime(fmt), x.hi.strftime(fmt), x.period, x.sign] for x in pieces]
        return {name: json.dumps(rows)}
    net: dict[tuple[datetime, datetime], int] = {}  # interval -> its signs added up
    for x in pieces:
        net[x.lo, x.hi] = net.get((x.lo, x.hi), 0) + x.sign
    intervals = sorted(net)
    index = {interval: i for i, interval in enumerate(intervals, 1)}  # WITH ORDINALITY's
    return {
        f"{name}_lo": _pg_array(lo.date() if as_date else lo for lo, _ in intervals),
        f"{name}_hi": _pg_array(hi.date() if as_date else hi for _, hi in intervals),
        f"{name}_net": _pg_array(net[interval] for interval in intervals),
        f"{name}_i": _pg_array(index[(x.lo, x.hi)] for x in pieces),
        f"{name}_p": _pg_array(x.period for x in pieces),
        f"{name}_sign": _pg_array(x.sign for x in pieces),
    }


def _pg_array(values: Iterable[object]) -> str:
    """A PostgreSQL array literal of integers, dates or timestamps (none needs quoting), which
    the statement casts: one text parameter instead of psycopg dumping every element."""
    return "{" + ",".join(map(str, values)) + "}"


def _joined(
    name: str,
    as_date: bool,
    dialect: str,
    table: Table,
    at: Any,
    names: Sequence[str],
    where: list[Any],
    summed: Sequence[str] = (),
    cancelling: Sequence[str] = (),
    utc_hour: bool = False,
) -> Any:
    """Source rows of ``table`` inside each piece (:func:`_piece_params`), with the piece's
    period and sign.

    PostgreSQL gets a LATERAL join so that every piece is an index range scan (a plain range
    join is estimated badly and planned as a scan of the key's whole history). Each distinct
    interval is scanned once and then handed to every (period, sign) that uses it — a New York
    week boundary's five hours are added to one week and subtracted from the next — and the
    ``summed`` columns among ``names`` are summed per interval over the others, so a week of
    daily rows leaves the scan as one row per (provider, type) instead of seven. An interval
    whose uses cancel out (added to one period, subtracted from the next) adds nothing to
    range-wide breakdowns, so it is summed without the ``cancelling`` columns (they come back
    NULL): no grouping by text for the hours of a New York week boundary. On SQLite the
    pieces are one JSON parameter read by ``json_each``, and its nested loops already drive a
    plain join from that small table.

    ``utc_hour`` (hourly rollups read for every key) compares UTC wall-clock hours, the
    expression of the hourly rollups' time index on PostgreSQL (see the schema file), so the
    read is an index range whatever the table's physical order.
    """
    if dialect != "postgresql":
        each = func.json_each(bindparam(name)).table_valued("value")
        r = select(
            *(
                func.json_extract(each.c.value, f"$[{i}]").label(n)
                for i, n in enumerate(("lo", "hi", "p", "sign"))
            )
        ).cte(name)
        return (
            select(r.c.p, r.c.sign, *(table.c[n] for n in names))
            .select_from(r)
            .join(table, and_(at >= r.c.lo, at < r.c.hi))
            .where(*where)
            .subquery(f"{table.name}_joined")
        )
    kind: Any = Date() if as_date else DateTime(timezone=True)
    bounds = [bindparam(f"{name}_{c}", type_=ARRAY(kind)) for c in ("lo", "hi")]
    if cancelling:
        bounds.append(bindparam(f"{name}_net", type_=ARRAY(Integer())))
    d = (
        func.unnest(*bounds)
        .table_valued(*("lo", "hi", "net")[: len(bounds)], with_ordinality="i")
        .render_derived(name=name)
    )
    t = (
        func.unnest(*(bindparam(f"{name}_{c}", type_=ARRAY(Integer())) for c in ("i", "p", "sign")))
        .table_valued("i", "p", "sign")
        .render_derived(name=f"{name}_targets")
    )
    grouped = {
        n: case((d.c.net != 0, table.c[n])).label(n) if n in cancelling else table.c[n]
        for n in names
        if n not in summed
    }
    keys = list(grouped.values())
    cols = [
        cast(func.sum(table.c[n]), BigInteger).label(n) if n in summed else grouped[n]
        for n in names
    ]
    lo: Any = d.c.lo
    hi: Any = d.c.hi
    if utc_hour:
        at, lo, hi = (func.timezone(literal_column("'UTC'"), x) for x in (at, lo, hi))
    rows = select(*cols).where(at >= lo, at < hi, *where)
    if summed:
        rows = rows.group_by(*keys)
    # OFFSET 0 keeps the planner from flattening the LATERAL back into a range join, and the
    # scan from being repeated per target
    inner = rows.offset(0).lateral(f"{table.name}_rows")
    scanned = (
        select(d.c.i, *(inner.c[n] for n in names))
        .select_from(d)
        .join(inner, true())
        .offset(0)
        .subquery(f"{table.name}_scanned")
    )
    return (
        select(t.c.p, t.c.sign, *(scanned.c[n] for n in names))
        .select_from(scanned)
        .join(t, t.c.i == scanned.c.i)
        .subquery(f"{table.name}_joined")
    )


# --- uploads ----------------------------------------------------------------------------------

Counts = list[int]  # uploads, bytes, successful, failed

_UPLOAD_COUNTERS = ("total_uploads", "total_file_size", "successful_requests", "failed_requests")
_UPLOAD_SOURCES = {
    "day": (daily_usage, daily_usage.c.usage_date),
    "hour": (hourly_usage, hourly_usage.c.usage_hour),
    "quarter": (quarter_usage, quarter_usage.c.usage_quarter),
}
_DATES = ("month", "day")  # grains whose rollups are keyed by a date, not a timestamp
# Grains whose all-keys reads compare UTC wall-clock times, the expression of their time index
_UTC_INDEXED = ("hour", "quarter")


@lru_cache(maxsize=128)
def _upload_statement(grain: str, dialect: str, shape: _Shape) -> _Statement:
    """Uploads of one source (daily, hourly or quarter-hour rollup, raw rows) summed by
    (period, provider, file_type) over the pieces in parameter ``{grain}_pieces``."""
    name = f"{grain}_pieces"
    if grain == "raw":
        fu = file_uploads
        names: tuple[str, ...] = ("provider", "file_type", "file_size", "upload_status")
        where = _where(fu, shape, dialect)
        j = _joined(name, False, dialect, fu, fu.c.uploaded_at, names, where)
        ok = case((j.c.upload_status == "success", 1), else_=0)
        cols: list[Any] = [j.c.sign, j.c.sign * j.c.file_size, j.c.sign * ok]
        cols.append(j.c.sign * (1 - ok))
    else:
        table, at = _UPLOAD_SOURCES[grain]
        names = ("provider", "file_type", *_UPLOAD_COUNTERS)
        where = _where(table, shape, dialect)
        # hours and quarters are what a cut day's pieces move between periods (see plan())
        cancelling = ("provider", "file_type") if grain != "day" else ()
        j = _joined(
            name,
            grain == "day",
            dialect,
            table,
            at,
            names,
            where,
            _UPLOAD_COUNTERS,
            cancelling,
            utc_hour=grain in _UTC_INDEXED and not shape.keys,
        )
        # daily pieces are never subtracted (see plan())
        cols = [j.c[n] if grain == "day" else j.c.sign * j.c[n] for n in _UPLOAD_COUNTERS]
    stmt = select(
        j.c.p,
        j.c.provider,
        j.c.file_type,
        *(cast(func.sum(cast(c, BigInteger)), BigInteger) for c in cols),
    )
    if dialect == "postgresql":
        # Only the three marginals are needed: a year by week is ~70 rows instead of
        # ~2,000 (period x provider x type); columns a row is not grouped by are NULL.
        stmt = stmt.group_by(func.grouping_sets(j.c.p, j.c.provider, j.c.file_type))
    else:
        stmt = stmt.group_by(j.c.p, j.c.provider, j.c.file_type)
    return _Statement(stmt, dialect)


def upload_statements(
    scope: Scope, bounds: Sequence[datetime], dialect: str
) -> list[tuple[_Statement, dict[str, Any]]]:
    """Statements and their parameters answering uploads for periods ``[bounds[i],
    bounds[i+1])``, one per source (daily, hourly and quarter-hour rollups, raw rows). Their
    rows add up; on PostgreSQL they run concurrently."""
    shape, params = _scope(scope, dialect)
    by_grain: dict[str, list[Piece]] = {}
    for x in plan(bounds):
        by_grain.setdefault(x.grain, []).append(x)
    parts = [(grain, pieces) for grain, pieces in by_grain.items() if grain != "day"]
    days = by_grain.get("day", [])
    if dialect == "postgresql" and sum((x.hi - x.lo).days for x in days) >= _SPLIT_DAYS:
        parts.extend(("day", half) for half in _halves(days))  # the longest read: on two cores
    elif days:
        parts.append(("day", days))
    return [
        (
            _upload_statement(grain, dialect, shape),
            {**params, **_piece_params(pieces, f"{grain}_pieces", grain == "day", dialect)},
        )
        for grain, pieces in parts
    ]


# Daily reads at least this long run as two concurrent statements.
_SPLIT_DAYS = 120


def _halves(pieces: list[Piece]) -> tuple[list[Piece], list[Piece]]:
    """``pieces`` in two runs of about the same number of days."""
    total = sum((x.hi - x.lo).days for x in pieces)
    seen = 0
    for i, x in enumerate(pieces):
        seen += (x.hi - x.lo).days
        if 2 * seen >= total:
            return pieces[: i + 1], pieces[i + 1 :]
    return pieces, []



# A read on SQLite checks its deadline every this many virtual machine instructions.
_SQLITE_CHECK_EVERY = 1_000


def _rows(backend: SQLBackend, statement: _Statement, params: dict[str, Any]) -> list[Any]:
    """Run one read statement, cancelled after ``backend.read_timeout`` (ReadTimeoutError).

    PostgreSQL: its cached text straight through psycopg on a pooled connection in autocommit,
    pipelined between setting ``statement_timeout`` and resetting it (the pool's writers keep
    the server's setting) — one round trip, no BEGIN/ROLLBACK, no SQLAlchemy execution
    machinery; driver errors surface as SQLAlchemy's, as everywhere else. SQLite: a progress
    handler interrupts the statement at the deadline.
    """
    timeout = backend.read_timeout
    if statement.sql is None:
        with backend.engine.connect() as conn:
            if timeout is None:
                return [tuple(r) for r in conn.execute(statement.stmt, params)]
            dbapi: Any = conn.connection.dbapi_connection
            deadline = time.monotonic() + timeout
            dbapi.set_progress_handler(lambda: time.monotonic() > deadline, _SQLITE_CHECK_EVERY)
            try:
                return [tuple(r) for r in conn.execute(statement.stmt, params)]
            except OperationalError as exc:
                if isinstance(exc.orig, sqlite3.OperationalError) and "interrupt" in str(exc.orig):
                    raise _timed_out(timeout) from exc
                raise
            finally:
                dbapi.set_progress_handler(None, 0)
    import psycopg

    raw = backend.engine.raw_connection()  # pre-pinged by the pool
    driver: Any = raw.driver_connection
    try:
        driver.autocommit = True
        with driver.cursor() as cur:
            if timeout is None:
                cur.execute(statement.sql, {**statement.constants, **params})
            else:
                with driver.pipeline():
                    cur.execute(f"SET statement_timeout = {max(1, round(timeout * 1000))}")
                    cur.execute(statement.sql, {**statement.constants, **params})
                    driver.cursor().execute("RESET statement_timeout")
            rows: list[Any] = cur.fetchall()
            return rows
    except psycopg.Error as exc:
        if timeout is not None and isinstance(exc, psycopg.errors.QueryCanceled):
            raise _timed_out(timeout) from exc
        broken = bool(driver.broken or driver.closed)
        if broken:
            raw.invalidate()
        raise DBAPIError.instance(
            statement.sql, params, exc, psycopg.Error, connection_invalidated=broken
        ) from exc
    finally:
        if not driver.closed:
            driver.autocommit = False  # the pool's next user (a writer) expects transactions
        raw.close()


def _timed_out(timeout: float) -> ReadTimeoutError:
    return ReadTimeoutError(
        f"a usage query ran longer than read_timeout={timeout:g} s and was cancelled"
    )


def upload_rows(backend: SQLBackend, scope: Scope, bounds: Sequence[datetime]) -> list[UploadRow]:
    """(period index, provider, file_type, uploads, bytes, successful, failed) rows."""
    if scope.keys is not None and not scope.keys:
        return []
    statements = upload_statements(scope, bounds, backend.name)
    if backend.name == "postgresql" and len(statements) > 1:
        # each on its own pooled connection, at the same time
        futures = [submit(partial(_rows, backend, *s)) for s in statements[1:]]
        rows = _rows(backend, *statements[0])
        for future in futures:
            rows.extend(future.result())
        return rows
    # one SQLite connection may be shared (in-memory databases): stay sequential
    return [row for s in statements for row in _rows(backend, *s)]


# --- API requests -----------------------------------------------------------------------------


_REQUEST_SOURCES = {
    "quarter": (quarter_request_usage, quarter_request_usage.c.usage_quarter),
    "month": (monthly_request_usage, monthly_request_usage.c.usage_month),
    "day": (daily_request_usage, daily_request_usage.c.usage_date),
    "hour": (hourly_request_usage, hourly_request_usage.c.usage_hour),
}
_REQUEST_COUNTERS = ("total_requests", "error_requests", "total_response_us")


@lru_cache(maxsize=128)
def _histogram_statement(grains: tuple[str, ...], dialect: str, shape: _Shape) -> _Statement:
    """The merged latency histogram ``(bucket, requests, errors, response µs)`` over the
    request rollups of ``grains``, each read over its pieces in ``{grain}_pieces``."""
    selects: list[Select[Any]] = []
    for grain in grains:
        table, at = _REQUEST_SOURCES[grain]
        names = ("latency_bucket", *_REQUEST_COUNTERS)
        where = _where(table, shape, dialect)
        j = _joined(
            f"{grain}_pieces",
            grain in _DATES,
            dialect,
            table,
            at,
            names,
            where,
            _REQUEST_COUNTERS,
            utc_hour=grain in _UTC_INDEXED and not shape.keys,
        )
        selects.append(
            select(
                j.c.latency_bucket.label("lb"),
                *(
                    cast(j.c.sign * j.c[c], BigInteger).label(n)
                    for c, n in zip(_REQUEST_COUNTERS, ("n", "e", "us"), strict=True)
                ),
            )
        )
    union = (selects[0] if len(selects) == 1 else union_all(*selects)).subquery("parts")
    stmt = select(
        union.c.lb, *(cast(func.sum(union.c[c]), BigInteger) for c in ("n", "e", "us"))
    ).group_by(union.c.lb)
    return _Statement(stmt, dialect)


@lru_cache(maxsize=32)
def _raw_request_statement(dialect: str, shape: _Shape) -> _Statement:
    """Raw ``api_requests`` rows ``(sign, response ms, status)`` over ``raw_pieces``."""
    ar = api_requests
    where = _where(ar, shape, dialect)
    names = ("response_time_ms", "status_code")
    j = _joined("raw_pieces", False, dialect, ar, ar.c.requested_at, names, where)
    return _Statement(select(j.c.sign, j.c.response_time_ms, j.c.status_code), dialect)


def request_histogram(
    backend: SQLBackend, scope: Scope, start: datetime, end: datetime
) -> Histogram:
    """The merged latency histogram of requests in ``[start, end)``: whole months, days and
    hours from the request rollups, sub-hour edges bucketed here from raw rows."""
    out = Histogram()
    if scope.keys is not None and not scope.keys:
        return out
    dialect = backend.name
    shape, params = _scope(scope, dialect, uploads=False)
    by_grain: dict[str, list[Piece]] = {}
    for x in request_plan(start, end):
        by_grain.setdefault(x.grain, []).append(x)
    grains = tuple(g for g in _REQUEST_SOURCES if g in by_grain)
    if grains:
        histogram_params = dict(params)
        for g in grains:
            histogram_params.update(
                _piece_params(by_grain[g], f"{g}_pieces", g in _DATES, dialect)
            )
        statement = _histogram_statement(grains, dialect, shape)
        for lb, n, e, us in _rows(backend, statement, histogram_params):
            out.add(lb, n, e, us)
    if "raw" in by_grain:
        raw_params = {**params, **_piece_params(by_grain["raw"], "raw_pieces", False, dialect)}
        statement = _raw_request_statement(dialect, shape)
        for sign, ms, status in _rows(backend, statement, raw_params):
            out.add(latency_bucket(ms), sign, sign * (status >= 400), sign * round(ms * 1000))
    return out
