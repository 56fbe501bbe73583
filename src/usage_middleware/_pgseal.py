"""Sealing on PostgreSQL: the raw requests of a closed stretch of time folded into the rollups.

``rollup_seals`` holds the instants before which the request rollups hold every raw row (see
:mod:`usage_middleware._pgrequests`). A seal moves the seal instant to the end of the last whole
UTC quarter hour that ended at least ``SEAL_LAG`` ago, folding the raw rows in between into the
quarter-hour tiers, so that each of their rows is written once for all of its quarter hour's
traffic and requests still in flight when their quarter hour ends (their time is their start)
are rarely late. When that passes a whole UTC hour, the same transaction rolls the completed
hours' quarter-hour rows into the hourly and daily tiers and moves the hour instant there: a
coarse row is written once an hour, not once a quarter hour, and a roll holds the writers off
for an hour's rows at most (a day's, at a thousand requests a second, would take tens of
seconds). When the hour instant has passed a UTC midnight, the next transaction rolls the
completed days' daily rows (one per group and day, however many hours fed it) into the monthly
tiers and moves the month instant there: a monthly row is written once a day, not once an hour,
and the writers wait for the hour's roll and the day's separately. Each transaction folds at
most about
``SEAL_ROWS`` raw rows, so that the writers it holds off (advisory lock, exclusive) wait
seconds, not minutes, and a backlog (a bulk load of history) is sealed in steps, each one exact
on its own.

Several processes may seal at once: they queue on the lock, and the later ones find the instant
already moved and do nothing. Readers never wait for a seal: they take each tier up to its
instant and the raw rows from the seal instant on (and read again if a seal committed
meanwhile).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg
from sqlalchemy import Connection, Engine

from ._pgrequests import INSTANTS_SQL, SEAL_LOCK
from ._pgrollups import (
    MONTHS_SQL,
    MONTHS_UPSERT_SQL,
    ROLL_SQL,
    ROLL_UPSERT_SQL,
    SEAL_SQL,
    SEAL_UPSERT_SQL,
)
from ._storage.plan import _floor_day, _floor_hour, seal_target

__all__ = ["SEAL_ROWS", "pg_seal"]

#: Raw rows folded per seal transaction, at most (about: rows of one instant stay together).
SEAL_ROWS = 1_000_000


_MOVE = "UPDATE public.rollup_seals SET sealed_before = %(to)s WHERE dataset = %(dataset)s"


def _fold(cur: Any, statement: str, fallback: str, bounds: dict[str, datetime]) -> int:
    """Run a seal or roll ``statement``; should one of the rollup rows it inserts plainly
    exist after all (see ``_pgrollups._tier``), run ``fallback``, which upserts them."""
    cur.execute("SAVEPOINT um_seal")
    try:
        cur.execute(statement, bounds)
    except psycopg.errors.UniqueViolation:
        cur.execute("ROLLBACK TO SAVEPOINT um_seal")
        cur.execute(fallback, bounds)
    return int(cur.fetchone()[0])


def pg_seal(
    engine: Engine,
    bounded: Callable[[Connection, float], AbstractContextManager[Any]],
    timeout: float,
    before: datetime | None = None,
) -> int:
    """Fold the raw requests before ``before`` (default :func:`seal_target` of the server's
    clock) that no seal holds yet into the fine rollups, the UTC hours that ended before the
    new instant into the coarse ones and the UTC days that ended before it into the monthly
    ones; returns how many raw rows were folded.

    An instant already at or past ``before`` is left alone: a seal never moves back.
    """
    folded = 0
    while True:
        with engine.connect() as conn:
            conn.info["usage_write"] = True
            try:
                dbapi: Any = conn.connection.dbapi_connection
                with bounded(conn, timeout), conn.begin(), dbapi.cursor() as cur:
                    ms = str(max(1, round(timeout * 1000)))
                    cur.execute(
                        "SELECT set_config('statement_timeout', %(ms)s, true), "
                        "set_config('work_mem', '64MB', true)",
                        {"ms": ms},
                    )
                    cur.execute("SELECT to_regclass('public.rollup_seals') IS NOT NULL")
                    if not cur.fetchone()[0]:
                        return folded  # a schema from before sealing: create_schema() upgrades it
                    cur.execute(f"SELECT pg_advisory_xact_lock({SEAL_LOCK})")
                    cur.execute(INSTANTS_SQL)
                    sealed_before, hours, days = cur.fetchone()
                    if hours is None or days is None:
                        return folded  # a schema from before these instants: likewise
                    midnight = _floor_day(hours.astimezone(timezone.utc))
                    if midnight > days:
                        # The days a roll completed, into the monthly tiers in a transaction of
                        # their own: the writers wait for one roll at a time.
                        bounds = {"lo": days, "hi": midnight}
                        _fold(cur, MONTHS_SQL, MONTHS_UPSERT_SQL, bounds)
                        cur.execute(_MOVE, {"dataset": "request_days", "to": midnight})
                        continue
                    cur.execute("SELECT now()")
                    target = seal_target(cur.fetchone()[0]) if before is None else before
                    if target <= sealed_before:
                        return folded
                    # The time of the SEAL_ROWS-th raw row from the instant on, if there is one
                    # before the target: this step stops there.
                    cur.execute(
                        "SELECT requested_at FROM public.api_requests "
                        "WHERE requested_at >= %(lo)s AND requested_at < %(hi)s "
                        "ORDER BY requested_at OFFSET %(n)s LIMIT 1",
                        {"lo": sealed_before, "hi": target, "n": SEAL_ROWS},
                    )
                    row = cur.fetchone()
                    hi = target
                    if row is not None:
                        hi = max(row[0], sealed_before + timedelta(microseconds=1))
                    bounds = {"lo": sealed_before, "hi": hi}
                    folded += _fold(cur, SEAL_SQL, SEAL_UPSERT_SQL, bounds)
                    cur.execute(_MOVE, {"dataset": "requests", "to": hi})
                    whole_hours = _floor_hour(hi.astimezone(timezone.utc))
                    if whole_hours > hours:
                        bounds = {"lo": hours, "hi": whole_hours}
                        _fold(cur, ROLL_SQL, ROLL_UPSERT_SQL, bounds)
                        cur.execute(_MOVE, {"dataset": "request_hours", "to": whole_hours})
                        midnight = _floor_day(whole_hours)
            finally:
                conn.info.pop("usage_write", None)
        if hi >= target and midnight <= days:
            return folded
