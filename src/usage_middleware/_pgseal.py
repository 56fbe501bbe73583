"""Sealing on PostgreSQL: the raw requests of a closed stretch of time folded into the rollups.

``rollup_seals`` holds the instant before which the request rollups hold every raw row (see
:mod:`usage_middleware._pgrequests`). A seal moves it to the end of the last whole UTC quarter
hour that ended at least ``SEAL_LAG`` ago, so that each rollup row of a quarter hour is written
once for all of its traffic, and requests still in flight when their quarter hour ends (their
time is their start) are rarely late. Each transaction folds at most about ``SEAL_ROWS`` raw
rows, so that the writers it holds off (advisory lock, exclusive) wait seconds, not minutes, and a
backlog (a bulk load of history) is sealed in steps, each one exact on its own.

Several processes may seal at once: they queue on the lock, and the later ones find the instant
already moved and do nothing. Readers never wait for a seal: they take the rollups up to the
instant and the raw rows from it on (and read again if a seal committed meanwhile).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import datetime, timedelta
from typing import Any

import psycopg
from sqlalchemy import Connection, Engine

from ._pgrequests import SEAL_LOCK, SEAL_SQL, SEAL_UPSERT_SQL
from ._storage.plan import _floor_quarter

__all__ = ["SEAL_INTERVAL", "SEAL_LAG", "SEAL_ROWS", "pg_seal", "seal_due"]

#: How far behind the clock a seal stays: requests that started earlier and are recorded later
#: (slow responses, the recorder's batching) are written with their rollups.
SEAL_LAG = timedelta(minutes=2)
#: How often (seconds) a writing process checks whether a quarter hour is due for sealing.
SEAL_INTERVAL = 60.0
#: Raw rows folded per seal transaction, at most (about: rows of one instant stay together).
SEAL_ROWS = 1_000_000


def seal_target(now: datetime) -> datetime:
    """The end of the last whole UTC quarter hour that had ended ``SEAL_LAG`` before ``now``
    (``now`` in UTC)."""
    return _floor_quarter(now - SEAL_LAG)


def seal_due(now: datetime, sealed_before: datetime) -> bool:
    """Whether a seal at ``now`` would move the instant."""
    return seal_target(now) > sealed_before


def pg_seal(
    engine: Engine,
    bounded: Callable[[Connection, float], AbstractContextManager[Any]],
    timeout: float,
    before: datetime | None = None,
) -> int:
    """Fold the raw requests before ``before`` (default :func:`seal_target` of the server's
    clock) that no seal holds yet into the rollups; returns how many rows were folded.

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
                    cur.execute(
                        "SELECT sealed_before, now() FROM public.rollup_seals "
                        "WHERE dataset = 'requests'"
                    )
                    sealed_before, now = cur.fetchone()
                    target = seal_target(now) if before is None else before
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
                    cur.execute("SAVEPOINT um_seal")
                    try:
                        cur.execute(SEAL_SQL, bounds)
                    except psycopg.errors.UniqueViolation:
                        cur.execute("ROLLBACK TO SAVEPOINT um_seal")
                        cur.execute(SEAL_UPSERT_SQL, bounds)
                    folded += int(cur.fetchone()[0])
                    cur.execute(
                        "UPDATE public.rollup_seals SET sealed_before = %(hi)s "
                        "WHERE dataset = 'requests'",
                        {"hi": hi},
                    )
            finally:
                conn.info.pop("usage_write", None)
        if hi >= target:
            return folded
