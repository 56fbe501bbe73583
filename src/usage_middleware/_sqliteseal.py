"""Sealing on SQLite: the raw requests of a closed stretch of time folded into the rollups.

``rollup_seals`` holds the seal instant (``requests``): every request rollup but the monthly
ones (histograms by day, hour and quarter hour, endpoint rollups by day and quarter hour,
``endpoint_routes``) holds exactly the raw requests before it. Writers store a request at or
after it as a raw row only (:mod:`usage_middleware._sqlitewrite`), which costs what a plain
insert costs; a seal moves the instant to the end of the last whole UTC quarter hour that ended
``SEAL_LAG`` ago and rolls the raw rows in between up with the writer's own statements, so each
rollup row is written once per quarter hour for all of its traffic instead of once per batch.
The monthly tiers follow the month instant (``request_days``), a UTC midnight at or before the
seal instant: once the seal instant has passed a midnight, the next transaction sums the
completed days' daily rows into them, so a monthly row is written once a day, where each
quarter hour's upserts into the month's rows were a fifth of the seals' time.

Unlike PostgreSQL's, a SQLite seal fills the hourly and daily tiers too: SQLite updates a row in
place, so there is nothing to gain from rolling those once an hour. The write
transaction (``BEGIN IMMEDIATE``) makes a seal the only writer, in this process and in any other
sharing the file; each transaction folds at most ``SEAL_ROWS`` raw rows, so the writers it holds
off wait a few seconds at most, and a backlog (history loaded in bulk) is sealed in steps, each
exact on its own. Readers never wait: they take the rollups up to their instants and raw rows
from the seal instant on, and read again if a seal committed in between
(``_storage._sqlread.sealed_reads``).
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from functools import lru_cache
from typing import Any

from sqlalchemy import Connection, Engine

from ._schema import (
    OTHER_METHOD,
    STANDARD_METHODS,
    UNMATCHED_ROUTE,
    latency_bucket,
    latency_bucket_start,
)
from ._sqlitebulk import insert_rows
from ._sqliterollups import MONTH_ROLLS, MONTHLY, NOT_MONTHLY, roll_up_requests
from ._sqlitewrite import read_instants, stored_utc, utc_text
from ._storage.plan import _floor_day, seal_target

__all__ = [
    "SEAL_ROWS",
    "SQL_LIMIT_MS",
    "bucket_sql",
    "latency_bounds",
    "micros_sql",
    "month_instant",
    "raw_method_sql",
    "raw_requests",
    "raw_route_sql",
    "register_functions",
    "seals_table",
    "sqlite_seal",
]

#: Raw rows folded per seal transaction, at most (about: rows of one instant stay together).
#: SQLite folds about 100,000 a second here, so a step holds the other writers off ~2 s.
SEAL_ROWS = 200_000

#: The instant of a database that has no request yet: everything after it is raw.
FIRST_INSTANT = "0001-01-01 00:00:00.000000"


def seals_table(conn: Connection, present: set[str]) -> None:
    """Create ``rollup_seals`` if it is missing (``present``: the tables before this
    transaction). A file from before sealing had every stored request rolled up, so its
    instant starts just after its newest request."""
    if "rollup_seals" in present:
        return
    conn.exec_driver_sql(
        "CREATE TABLE main.rollup_seals (dataset TEXT NOT NULL PRIMARY KEY, "
        "sealed_before TEXT NOT NULL)"
    )
    newest = None
    if "api_requests" in present:
        newest = conn.exec_driver_sql("SELECT max(requested_at) FROM main.api_requests").scalar()
    instant = FIRST_INSTANT
    if newest is not None:
        instant = utc_text(stored_utc(newest) + timedelta(microseconds=1))
    conn.exec_driver_sql(
        "INSERT INTO main.rollup_seals (dataset, sealed_before) VALUES ('requests', ?)",
        (instant,),
    )


# The monthly tiers' rows of the month of ?1 lose the quarter-hour rows of [?1, ?2).
_UNROLL_MONTH = (
    "UPDATE main.monthly_request_usage AS m SET total_requests = m.total_requests - q.n, "
    "error_requests = m.error_requests - q.e, total_response_us = m.total_response_us - q.us, "
    "total_request_bytes = m.total_request_bytes - q.rq, "
    "total_response_bytes = m.total_response_bytes - q.rs "
    "FROM (SELECT api_key_id AS k, latency_bucket AS b, sum(total_requests) AS n, "
    "sum(error_requests) AS e, sum(total_response_us) AS us, sum(total_request_bytes) AS rq, "
    "sum(total_response_bytes) AS rs FROM main.quarter_request_usage "
    "WHERE usage_quarter >= ?1 AND usage_quarter < ?2 GROUP BY 1, 2) AS q "
    "WHERE m.usage_month = substr(?1, 1, 7) || '-01' AND ifnull(m.api_key_id, '') = "
    "ifnull(q.k, '') AND m.latency_bucket = q.b",
    "UPDATE main.monthly_endpoint_usage AS m SET total_requests = m.total_requests - q.n, "
    "total_response_us = m.total_response_us - q.us, "
    "total_request_bytes = m.total_request_bytes - q.rq, "
    "total_response_bytes = m.total_response_bytes - q.rs "
    "FROM (SELECT api_key_id AS k, method AS me, route AS r, status_code AS s, "
    "latency_bucket AS b, sum(total_requests) AS n, sum(total_response_us) AS us, "
    "sum(total_request_bytes) AS rq, sum(total_response_bytes) AS rs "
    "FROM main.quarter_endpoint_usage "
    "WHERE usage_quarter >= ?1 AND usage_quarter < ?2 GROUP BY 1, 2, 3, 4, 5) AS q "
    "WHERE m.usage_month = substr(?1, 1, 7) || '-01' AND ifnull(m.api_key_id, '') = "
    "ifnull(q.k, '') AND m.method = q.me AND m.route = q.r AND m.status_code = q.s "
    "AND m.latency_bucket = q.b",
)
# Then the rows of the month of ? left empty go.
_DROP_EMPTY = tuple(
    f"DELETE FROM main.{table} WHERE usage_month = substr(?, 1, 7) || '-01' AND total_requests = 0"
    for table in sorted(MONTHLY)
)


def month_instant(conn: Connection) -> None:
    """Add the month instant to a ``rollup_seals`` that lacks it (a new one, or a file from
    before it, whose monthly tiers followed the seal instant): the UTC midnight at or before the
    seal instant, its month's rows losing the quarter-hour rows from there to the seal instant
    (the quarter-hour tiers hold exactly the requests before it), so that they hold the whole
    days before the midnight."""
    present = conn.exec_driver_sql(
        "SELECT 1 FROM main.rollup_seals WHERE dataset = 'request_days'"
    ).scalar()
    if present:
        return
    instant = stored_utc(
        conn.exec_driver_sql(
            "SELECT sealed_before FROM main.rollup_seals WHERE dataset = 'requests'"
        ).scalar_one()
    )
    midnight = utc_text(_floor_day(instant))
    for statement in _UNROLL_MONTH:
        conn.exec_driver_sql(statement, (midnight, utc_text(instant)))
    for statement in _DROP_EMPTY:
        conn.exec_driver_sql(statement, (midnight,))
    conn.exec_driver_sql(
        "INSERT INTO main.rollup_seals (dataset, sealed_before) VALUES ('request_days', ?)",
        (midnight,),
    )


def _response_us(ms: float) -> int:
    """Microseconds of a response time in milliseconds, rounded half to even."""
    return round(ms * 1000)


#: Response times (ms) the staging statements turn into a bucket and microseconds in SQL: from
#: zero up to this (about 31 years). Anything else (negative, larger, not a number: values an
#: older or foreign writer may have left) goes to the writer's Python functions, which decide
#: what such a value becomes, as they always have.
SQL_LIMIT_MS = 10**12


@lru_cache(maxsize=1)
def latency_bounds() -> tuple[tuple[float, int], ...]:
    """``(low, b)`` for every bucket ``b >= 1`` a time below ``SQL_LIMIT_MS`` falls in: ``low``
    is the least float that :func:`latency_bucket` puts in ``b`` or above."""
    top = latency_bucket(float(SQL_LIMIT_MS))
    return tuple((latency_bucket_start(b), b) for b in range(1, top + 1))


def register_functions(dbapi: Any) -> None:
    """What the statements over raw rows need on ``dbapi``: the latency bounds table and the
    writer's Python functions for the values outside it. The SQLite backend registers them on
    every connection it opens, so its seals, upgrades and reads find them there.

    No Python runs per row for the values the writer stores: a Python function called from a
    statement takes the GIL for every row, and beside a busy event loop each take waits for the
    interpreter's switch interval (a 20,000-row seal took 0.2 s alone and 45 s beside a thread
    spinning in Python). The buckets and microseconds must agree bit for bit with what the
    writer stages in Python (SQLite's own ``round`` rounds halves away from zero, and its math
    functions may be missing).
    """
    dbapi.create_function("um_latency_bucket", 1, latency_bucket, deterministic=True)
    dbapi.create_function("um_response_us", 1, _response_us, deterministic=True)
    cur = dbapi.cursor()
    try:
        cur.execute(
            "CREATE TEMP TABLE IF NOT EXISTS um_latency_bounds "
            "(low REAL NOT NULL PRIMARY KEY, bucket INTEGER NOT NULL) WITHOUT ROWID"
        )
        bounds = latency_bounds()
        if cur.execute("SELECT count(*) FROM temp.um_latency_bounds").fetchone()[0] != len(bounds):
            cur.execute("DELETE FROM temp.um_latency_bounds")
            insert_rows(cur, "INSERT INTO temp.um_latency_bounds (low, bucket)", bounds)
    finally:
        cur.close()


def _in_sql(ms: str) -> str:
    return f"{ms} >= 0 AND {ms} < {SQL_LIMIT_MS}"


def bucket_sql(ms: str) -> str:
    """SQL for ``latency_bucket(ms)`` of the column ``ms`` (needs :func:`register_functions`):
    the last bound at or below it, 0 below the first."""
    found = (
        f"coalesce((SELECT b.bucket FROM temp.um_latency_bounds AS b WHERE b.low <= {ms} "
        "ORDER BY b.low DESC LIMIT 1), 0)"
    )
    return f"CASE WHEN {_in_sql(ms)} THEN {found} ELSE um_latency_bucket({ms}) END"


def micros_sql(ms: str) -> str:
    """SQL for ``round(ms * 1000)`` (half to even) of the column ``ms``: below 2**53 the
    product's integer part and fraction are exact (needs :func:`register_functions`)."""
    x = f"({ms} * 1000)"
    whole = f"CAST({x} AS INTEGER)"
    rounded = f"{whole} + ({x} - {whole} > 0.5 OR ({x} - {whole} = 0.5 AND {whole} % 2 = 1))"
    return f"CASE WHEN {_in_sql(ms)} THEN {rounded} ELSE um_response_us({ms}) END"


_STANDARD = ", ".join(f"'{m}'" for m in sorted(STANDARD_METHODS))


def raw_method_sql(method: str) -> str:
    """SQL for ``endpoint_method(method)`` of the column ``method``."""
    return f"CASE WHEN {method} IN ({_STANDARD}) THEN {method} ELSE '{OTHER_METHOD}' END"


def raw_route_sql(path: str, matched: str) -> str:
    """SQL for ``endpoint_route(path, matched)`` of the columns ``path`` and ``matched``."""
    return f"CASE WHEN {matched} THEN {path} ELSE '{UNMATCHED_ROUTE}' END"


def raw_requests(where: str = "") -> str:
    """The raw requests (``where``: an SQL condition that chooses which, if any) as a source of
    :func:`usage_middleware._sqliterollups.roll_up_requests`: the labels as ``endpoint_method``
    and ``endpoint_route`` make them, the bucket and microseconds as :func:`bucket_sql` and
    :func:`micros_sql`, computed as the rollups read each row (nothing is copied first).

    ``LIMIT -1`` (no limit) keeps SQLite from flattening the subquery into the grouping that
    reads it, which would compute a row's bucket again for every group it starts."""
    return (
        "(SELECT api_key_id, requested_at, status_code, request_size, response_size, "
        f"{bucket_sql('response_time_ms')} AS latency_bucket, "
        f"{micros_sql('response_time_ms')} AS response_us, "
        f"{raw_method_sql('method')} AS endpoint_method, "
        f"{raw_route_sql('path', 'route_matched')} AS endpoint_route "
        f"FROM main.api_requests{f' WHERE {where}' if where else ''} LIMIT -1)"
    )


_RAW_RANGE = raw_requests("requested_at >= ? AND requested_at < ?")
# The time of the SEAL_ROWS-th raw row from the instant on, if there is one before the target.
_NTH = (
    "SELECT requested_at FROM main.api_requests WHERE requested_at >= ? AND requested_at < ? "
    "ORDER BY requested_at LIMIT 1 OFFSET ?"
)
_MOVE = "UPDATE main.rollup_seals SET sealed_before = ? WHERE dataset = ?"


def sqlite_seal(engine: Engine, before: datetime | None = None) -> int:
    """Fold the raw requests before ``before`` (default :func:`seal_target` of this process's
    clock) that no seal holds yet into every request rollup but the monthly ones, and the UTC
    days that ended before the new instant into those; returns how many requests were folded.

    An instant already at or past ``before`` is left alone: a seal never moves back.
    """
    folded = 0
    while True:
        with engine.connect() as conn:
            conn.info["usage_write"] = True  # BEGIN IMMEDIATE: the only writer until commit
            try:
                with conn.begin():
                    dbapi: Any = conn.connection.dbapi_connection
                    cur = dbapi.cursor()
                    try:
                        instants = read_instants(cur)
                        if instants is None:
                            return folded  # a file from before sealing, until create_schema()
                        instant, months = instants
                        midnight = _floor_day(instant)
                        if months is not None and midnight > months:
                            # the days the last seal completed, in a transaction of their own
                            days = (utc_text(months)[:10], utc_text(midnight)[:10])
                            for statement in MONTH_ROLLS:
                                cur.execute(statement, days)
                            cur.execute(_MOVE, (utc_text(midnight), "request_days"))
                            continue
                        now = datetime.now(timezone.utc)
                        target = seal_target(now) if before is None else before
                        if target <= instant:
                            return folded
                        end = utc_text(target.astimezone(timezone.utc))
                        lo, hi = utc_text(instant), end
                        row = cur.execute(_NTH, (lo, hi, SEAL_ROWS)).fetchone()
                        if row is not None:
                            hi = max(row[0], utc_text(instant + timedelta(microseconds=1)))
                        # a file from before the month instant: its monthly tiers are sealed
                        # with the others, until create_schema() adds it
                        tiers = NOT_MONTHLY if months is not None else None
                        folded += roll_up_requests(cur, _RAW_RANGE, (lo, hi), tiers)
                        cur.execute(_MOVE, (hi, "requests"))
                        midnight = _floor_day(stored_utc(hi))
                    finally:
                        cur.close()
            finally:
                conn.info.pop("usage_write", None)
        if hi >= end and (months is None or midnight <= months):
            return folded
