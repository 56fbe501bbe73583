"""The SQL backends' uploads per period, and how every SQL read runs.

Each source (daily, hourly, quarter-hour rollups, raw rows off the quarter grid) gets one
statement built from :mod:`.statements` once per filter shape, fed the planned pieces as
parameters. On PostgreSQL the cached text goes straight to psycopg on a pooled connection in
autocommit (one round trip per statement), independent statements run at once, and every read
is bounded by the store's ``read_timeout`` (:func:`run_reads`). Reads of the request
rollups go through :func:`sealed_reads`, which cuts their plan at the seal instants (the request
histogram: :mod:`.sqlhistogram`; endpoints and series: :mod:`.sqlrequests`).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from functools import lru_cache, partial
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import (
    BigInteger,
    case,
    cast,
    func,
    select,
)
from sqlalchemy.exc import DBAPIError, OperationalError

from .._errors import ReadTimeoutError
from .._pgrequests import INSTANTS_SQL
from .._pool import settle, submit
from .._schema import (
    daily_usage,
    file_uploads,
    hourly_usage,
    quarter_usage,
)
from .._sqlitewrite import INSTANTS_SQL as SQLITE_INSTANTS_SQL
from .._sqlitewrite import stored_utc
from .base import Scope, UploadRow
from .plan import Piece, Seals, cut_at, plan
from .statements import Shape, Statement, filter_clauses, joined, piece_params, scope_params
from .watchdog import interrupted

if TYPE_CHECKING:
    from .sql import SQLBackend

__all__ = ["run_reads", "sealed_reads", "upload_rows"]

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
def _upload_statement(grain: str, dialect: str, shape: Shape) -> Statement:
    """Uploads of one source (daily, hourly or quarter-hour rollup, raw rows) summed by
    (period, provider, file_type) over the pieces in parameter ``{grain}_pieces``."""
    name = f"{grain}_pieces"
    if grain == "raw":
        fu = file_uploads
        names: tuple[str, ...] = ("provider", "file_type", "file_size", "upload_status")
        where = filter_clauses(fu, shape, dialect)
        j = joined(name, False, dialect, fu, fu.c.uploaded_at, names, where)
        ok = case((j.c.upload_status == "success", 1), else_=0)
        cols: list[Any] = [j.c.sign, j.c.sign * j.c.file_size, j.c.sign * ok]
        cols.append(j.c.sign * (1 - ok))
    else:
        table, at = _UPLOAD_SOURCES[grain]
        names = ("provider", "file_type", *_UPLOAD_COUNTERS)
        where = filter_clauses(table, shape, dialect)
        # hours and quarters are what a cut day's pieces move between periods (see plan())
        cancelling = ("provider", "file_type") if grain != "day" else ()
        j = joined(
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
    return Statement(stmt, dialect)


def upload_statements(
    scope: Scope, bounds: Sequence[datetime], dialect: str
) -> list[tuple[Statement, dict[str, Any]]]:
    """Statements and their parameters answering uploads for periods ``[bounds[i],
    bounds[i+1])``, one per source (daily, hourly and quarter-hour rollups, raw rows). Their
    rows add up; on PostgreSQL they run concurrently."""
    shape, params = scope_params(scope, dialect)
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
            {**params, **piece_params(pieces, f"{grain}_pieces", grain == "day", dialect)},
        )
        for grain, pieces in parts
    ]


# Daily reads at least this long run as two concurrent statements.
_SPLIT_DAYS = 120


def _halves(pieces: list[Piece]) -> tuple[list[Piece], list[Piece]]:
    """``pieces`` (of whole days) in two runs of about the same number of days; a piece that
    straddles the middle (a year read as one range) is cut there at a day boundary."""
    half = (sum((x.hi - x.lo).days for x in pieces) + 1) // 2
    first: list[Piece] = []
    second: list[Piece] = []
    seen = 0
    for x in pieces:
        days = (x.hi - x.lo).days
        if seen >= half:
            second.append(x)
        elif seen + days <= half:
            first.append(x)
        else:
            cut = x.lo + timedelta(days=half - seen)
            first.append(x._replace(hi=cut))
            second.append(x._replace(lo=cut))
        seen += days
    return first, second


def _rows(backend: SQLBackend, statement: Statement, params: dict[str, Any]) -> list[Any]:
    """Run one read statement, cancelled after ``backend.read_timeout`` (ReadTimeoutError).

    PostgreSQL: its cached text straight through psycopg on a pooled connection in autocommit,
    pipelined between setting ``statement_timeout`` and resetting it (the pool's writers keep
    the server's setting) — one round trip, no BEGIN/ROLLBACK, no SQLAlchemy execution
    machinery; driver errors surface as SQLAlchemy's, as everywhere else. SQLite: the
    watchdog interrupts the statement at the deadline (:func:`.watchdog.interrupted`).
    """
    timeout = backend.read_timeout
    if statement.sql is None:
        with backend.engine.connect() as conn:
            if timeout is None:
                return [tuple(r) for r in conn.execute(statement.stmt, params)]
            try:
                with interrupted(conn.connection.dbapi_connection, timeout):
                    return [tuple(r) for r in conn.execute(statement.stmt, params)]
            except OperationalError as exc:
                if isinstance(exc.orig, sqlite3.OperationalError) and "interrupt" in str(exc.orig):
                    raise _timed_out(timeout) from exc
                raise
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
    return [
        row
        for rows in run_reads(backend, upload_statements(scope, bounds, backend.name))
        for row in rows
    ]


def run_reads(
    backend: SQLBackend, statements: Sequence[tuple[Statement, dict[str, Any]]]
) -> list[list[Any]]:
    """Each statement's rows, in order. On PostgreSQL they run at the same time, each on its
    own pooled connection; one SQLite connection may be shared (in-memory databases), so
    there they run one after the other."""
    if backend.name == "postgresql" and len(statements) > 1:
        futures = [submit(partial(_rows, backend, *s)) for s in statements[1:]]
        try:
            first = _rows(backend, *statements[0])
        finally:
            settle(futures)
        return [first, *(future.result() for future in futures)]
    return [_rows(backend, *s) for s in statements]


# --- reads of the request rollups: cut at the seal instants -----------------------------------

_SEALING_PRESENT = "SELECT to_regclass('public.rollup_seals') IS NOT NULL"
_SQLITE_SEALING = "SELECT 1 FROM main.sqlite_master WHERE name = 'rollup_seals'"
_SEAL_TRIES = 5

_T = TypeVar("_T")


def sealed_reads(
    backend: SQLBackend,
    planned: Sequence[Piece],
    build: Callable[[list[Piece]], tuple[list[tuple[Statement, dict[str, Any]]], _T]],
) -> tuple[list[list[Any]], _T]:
    """Run the statements ``build(pieces)`` makes for the request plan ``planned`` as the
    request rollups are: its statements, and what the caller needs to read the results.

    The request rollups hold exactly the raw rows before ``rollup_seals``' instants (see
    ``usage_middleware._pgrequests`` and ``usage_middleware._sqliteseal``), so the plan is cut
    at them first (:func:`.plan.cut_at`). When a piece reaches past an instant, the instants
    are read again afterwards: a seal that committed in between may have put rows into the
    rollups that the raw or quarter-hour part read too, so the whole read is made again (seals
    are a quarter hour apart; five tries that each meet one cannot happen).
    """
    seals = _instants(backend)
    for _ in range(_SEAL_TRIES):
        pieces, touched = cut_at(planned, seals)
        statements, extra = build(pieces)
        results = run_reads(backend, statements)
        if not touched:
            return results, extra
        now = _instants(backend)
        if now == seals:
            return results, extra
        seals = now
    raise ReadTimeoutError("the request rollups were sealed during every try of this read")


def _instants(backend: SQLBackend) -> Seals | None:
    """The seal instants; None on a schema from before ``rollup_seals`` (every request rolled
    up as written), until ``create_schema()`` upgrades it. SQLite's coarse tiers, and those of
    a PostgreSQL schema from before the hour instant, are sealed with the fine ones; the
    monthly tiers of a schema from before the month instant with the coarse ones."""
    pg = backend.name == "postgresql"
    with backend.engine.connect() as conn:
        if not backend.sealing:
            present = conn.exec_driver_sql(_SEALING_PRESENT if pg else _SQLITE_SEALING).scalar()
            if not present:
                return None
            backend.sealing = True  # seen once, for good: the table is never dropped
        if pg:
            fine, coarse, months = conn.exec_driver_sql(INSTANTS_SQL).one()
        else:
            fine, months = conn.exec_driver_sql(SQLITE_INSTANTS_SQL).one()
            fine = coarse = stored_utc(fine)
            months = None if months is None else stored_utc(months)
    coarse = fine if coarse is None else coarse
    return Seals(fine, coarse, coarse if months is None else months)
