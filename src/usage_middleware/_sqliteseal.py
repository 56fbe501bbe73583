"""Sealing on SQLite: the raw requests of a closed stretch of time folded into the rollups.

``rollup_seals`` holds the seal instant: every request rollup (histograms by month, day, hour
and quarter hour, endpoint rollups, ``endpoint_routes``) holds exactly the raw requests before
it. Writers store a request at or after it as a raw row only (:mod:`usage_middleware._sqlitewrite`),
which costs what a plain insert costs; a seal moves the instant to the end of the last whole
UTC quarter hour that ended ``SEAL_LAG`` ago and rolls the raw rows in between up with the
writer's own statements, so each rollup row is written once per quarter hour for all of its
traffic instead of once per batch.

Unlike PostgreSQL's, a SQLite seal fills the hourly, daily and monthly tiers too: SQLite updates
a row in place, so there is nothing to gain from rolling those once an hour. The write
transaction (``BEGIN IMMEDIATE``) makes a seal the only writer, in this process and in any other
sharing the file; each transaction folds at most ``SEAL_ROWS`` raw rows, so the writers it holds
off wait a few seconds at most, and a backlog (history loaded in bulk) is sealed in steps, each
exact on its own. Readers never wait: they take the rollups up to the instant and raw rows from
it on, and read again if a seal committed in between (``_storage._sqlread.sealed_reads``).
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import Connection, Engine

from ._schema import (
    OTHER_METHOD,
    STANDARD_METHODS,
    UNMATCHED_ROUTE,
    latency_bucket,
)
from ._sqliterollups import roll_up_staged_requests
from ._sqlitewrite import CREATE_STAGING, read_instant, stored_utc, utc_text
from ._storage.plan import seal_target

__all__ = ["SEAL_ROWS", "STAGE_RAW", "register_functions", "seals_table", "sqlite_seal"]

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


def register_functions(dbapi: Any) -> None:
    """The writer's Python functions, for statements over raw rows: the buckets and
    microseconds must agree bit for bit with what the writer stages (SQLite's own ``round``
    rounds halves away from zero, and its math functions may be missing)."""
    dbapi.create_function("um_latency_bucket", 1, latency_bucket, deterministic=True)
    dbapi.create_function("um_response_us", 1, lambda ms: round(ms * 1000), deterministic=True)


_STANDARD = ", ".join(f"'{m}'" for m in sorted(STANDARD_METHODS))
#: Raw requests staged as the writer stages them (append a WHERE clause to choose which).
#: The labels are plain SQL, the same tests as ``endpoint_method`` and ``endpoint_route``; the
#: bucket and microseconds come from the writer's Python functions.
STAGE_RAW = (
    "INSERT INTO temp.um_stage_requests SELECT id, api_key_id, method, path, status_code, "
    "response_time_ms, request_size, response_size, error_message, requested_at, route_matched, "
    "um_latency_bucket(response_time_ms), um_response_us(response_time_ms), "
    f"CASE WHEN method IN ({_STANDARD}) THEN method ELSE '{OTHER_METHOD}' END, "
    f"CASE WHEN route_matched THEN path ELSE '{UNMATCHED_ROUTE}' END FROM main.api_requests"
)
_STAGE_RANGE = f"{STAGE_RAW} WHERE requested_at >= ? AND requested_at < ?"
# The time of the SEAL_ROWS-th raw row from the instant on, if there is one before the target.
_NTH = (
    "SELECT requested_at FROM main.api_requests WHERE requested_at >= ? AND requested_at < ? "
    "ORDER BY requested_at LIMIT 1 OFFSET ?"
)
_MOVE = "UPDATE main.rollup_seals SET sealed_before = ? WHERE dataset = 'requests'"


def sqlite_seal(engine: Engine, before: datetime | None = None) -> int:
    """Fold the raw requests before ``before`` (default :func:`seal_target` of this process's
    clock) that no seal holds yet into every request rollup; returns how many were folded.

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
                        instant = read_instant(cur)
                        if instant is None:
                            return folded  # a file from before sealing, until create_schema()
                        now = datetime.now(timezone.utc)
                        target = seal_target(now) if before is None else before
                        if target <= instant:
                            return folded
                        end = utc_text(target.astimezone(timezone.utc))
                        lo, hi = utc_text(instant), end
                        row = cur.execute(_NTH, (lo, hi, SEAL_ROWS)).fetchone()
                        if row is not None:
                            hi = max(row[0], utc_text(instant + timedelta(microseconds=1)))
                        register_functions(dbapi)
                        for statement in CREATE_STAGING:
                            cur.execute(statement)
                        cur.execute("DELETE FROM temp.um_stage_requests")
                        cur.execute(_STAGE_RANGE, (lo, hi))
                        folded += int(cur.rowcount)
                        roll_up_staged_requests(cur)
                        cur.execute("DELETE FROM temp.um_stage_requests")
                        cur.execute(_MOVE, (hi,))
                    finally:
                        cur.close()
            finally:
                conn.info.pop("usage_write", None)
        if hi >= end:
            return folded
