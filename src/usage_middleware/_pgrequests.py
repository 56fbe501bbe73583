"""The PostgreSQL write plan of requests: raw rows, and the rollups sealed behind them.

The request rollups are *sealed*: ``rollup_seals`` holds three instants. The *fine* tiers (the
quarter-hour histogram and endpoint rollup, and ``endpoint_routes``, the route cap) hold every
raw row before the seal instant (``requests``) and none after it; the *coarse* tiers (the
histograms by hour and day, the endpoint rollups by day) likewise for the hour instant
(``request_hours``), a whole UTC hour at or before the seal instant; the *monthly* tiers (the
histograms and endpoint rollups by month) for the month instant (``request_days``), a UTC
midnight at or before the hour instant.

* A live request (at or after the seal instant) is written as a raw row only: binary COPY
  straight into ``api_requests``, sorted by id (concurrent writers lock index entries in one
  order). COPY has no ``ON CONFLICT``: a batch holding an id already stored (a replay) fails it,
  and the batch is redone under a savepoint through staging with ``ON CONFLICT DO NOTHING``.
* A late request (before the seal instant: a spool replay, a long upload recorded late) is
  written with its rollups, as every request once was: staged, inserted with ``ON CONFLICT DO
  NOTHING RETURNING``, and only the new rows reach the fine tiers, the coarse ones if they are
  older than the hour instant and the monthly ones if older than the month instant, in the same
  statement.
* A seal (:mod:`usage_middleware._pgseal`) folds the raw rows between the old and the new seal
  instant into the fine tiers with the same statement, reading them from ``api_requests``; when
  the new instant has passed a whole UTC hour, a *roll* sums the fine rows of the hours it
  completed into the coarse tiers and moves the hour instant there; when that has passed a UTC
  midnight, a *month roll* sums the daily rows of the days it completed into the monthly tiers
  and moves the month instant there.

So each fine rollup row is written once per quarter hour for all the traffic of that quarter
hour, each coarse one once per hour and each monthly one once per day, instead of once per
batch; writers do what a raw COPY does. Writers hold advisory lock ``SEAL_LOCK`` shared for
their transaction and read the instants after taking it; a seal holds it exclusively, so no
write made under old instants commits after the seal has moved them.

The statements of the tiers, the seal and the rolls are in :mod:`usage_middleware._pgrollups`.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from operator import itemgetter
from typing import Any

import psycopg
from psycopg import postgres
from psycopg.adapt import Dumper
from psycopg.pq import Format

from ._pgrollups import QUARTER, coarse_tiers, fine_tiers, monthly_tiers
from ._schema import (
    ENDPOINT_BUCKET_WIDTH,
    OTHER_METHOD,
    STANDARD_METHODS,
    UNMATCHED_ROUTE,
    latency_bucket,
)

__all__ = ["INSTANTS_SQL", "SEAL_LOCK", "IdDumper", "write_requests"]

#: Taken shared by every request write, exclusively by a seal (see the module docstring).
SEAL_LOCK = 7215120302

REQUEST_COLUMNS = (
    "id",
    "api_key_id",
    "method",
    "path",
    "status_code",
    "response_time_ms",
    "request_size",
    "response_size",
    "error_message",
    "requested_at",
    "route_matched",
)
# Staged after the columns: values that must agree bit for bit with the Python reference.
REQUEST_EXTRA = (
    "latency_bucket", "response_us", "endpoint_method", "endpoint_route", "endpoint_bucket",
)  # fmt: skip
_RAW_TYPES = (
    "uuid", "uuid", "text", "text", "int4", "float8", "int8", "int8", "text", "timestamptz",
    "bool",
)  # fmt: skip
_STAGED_TYPES = (*_RAW_TYPES, "int2", "int8", "text", "text", "int2")

_COLUMNS = ", ".join(REQUEST_COLUMNS)

# The coarse tiers hold exactly the requests before the hour instant, the monthly ones those
# before the month instant (see the module docstring): a late request reaches them only if it
# is older than that.
_BEFORE = "(SELECT * FROM {} WHERE q < (%({})s::timestamptz AT TIME ZONE 'UTC')) AS g"
_LATE_COARSE = coarse_tiers(
    False, _BEFORE.format("grouped", "coarse"), _BEFORE.format("labelled", "coarse")
)
_LATE_MONTHS = monthly_tiers(
    False, _BEFORE.format("grouped", "months"), _BEFORE.format("labelled", "months")
)

# Late rows: inserted from staging; the ones that were new go on to the rollups.
_INSERT_ROLLED = f"""
WITH new AS (
    INSERT INTO public.api_requests ({_COLUMNS})
    SELECT {_COLUMNS} FROM pg_temp.um_stage_requests AS s
    ORDER BY s.id
    ON CONFLICT DO NOTHING
    RETURNING id, api_key_id, status_code, request_size, response_size,
              (requested_at AT TIME ZONE 'UTC') AS utc_at
), staged AS (
    SELECT n.api_key_id, {QUARTER.replace("utc_at", "n.utc_at")}, n.status_code,
           n.request_size, n.response_size, s.latency_bucket, s.response_us, s.endpoint_method,
           s.endpoint_route, s.endpoint_bucket
      FROM new AS n
      JOIN pg_temp.um_stage_requests AS s USING (id)
), {fine_tiers(split=False)}, {_LATE_COARSE}, {_LATE_MONTHS}
SELECT count(*) FROM new"""

# A replayed live batch: raw rows only, the ones not stored yet.
_INSERT_RAW = f"""
INSERT INTO public.api_requests ({_COLUMNS})
SELECT {_COLUMNS} FROM pg_temp.um_stage_requests AS s
ORDER BY s.id
ON CONFLICT DO NOTHING
"""


class IdDumper(Dumper):
    """A ``uuid`` value in binary COPY from the id's 128-bit integer (or a ``UUID``). Packed
    rows carry their ids as integers: a row of plain values is one the garbage collector stops
    tracking, where ``UUID`` objects would be tracked (and promoted, and walked by full
    collections) for as long as the batch is being written."""

    format = Format.BINARY
    oid = postgres.types["uuid"].oid

    def dump(self, obj: Any) -> bytes:
        value: int = obj if type(obj) is int else obj.int
        return value.to_bytes(16, "big")


def _stage(cur: Any, rows: Sequence[tuple[Any, ...]]) -> None:
    """COPY raw ``rows`` into the (emptied) staging table with their Python-computed extras."""
    cur.execute("DELETE FROM pg_temp.um_stage_requests")
    with cur.copy(
        f"COPY pg_temp.um_stage_requests ({_COLUMNS}, {', '.join(REQUEST_EXTRA)}) "
        "FROM STDIN (FORMAT BINARY)"
    ) as copy:
        copy.set_types(_STAGED_TYPES)
        write_row = copy.write_row
        for row in rows:
            ms = row[5]
            fine = latency_bucket(ms)
            write_row(
                (
                    *row,
                    fine,
                    round(ms * 1000),
                    row[2] if row[2] in STANDARD_METHODS else OTHER_METHOD,
                    row[3] if row[10] else UNMATCHED_ROUTE,
                    -(-fine // ENDPOINT_BUCKET_WIDTH),
                )
            )


def _copy_live(cur: Any, rows: Sequence[tuple[Any, ...]]) -> int:
    """Raw rows only, by binary COPY; a batch that holds a stored id is redone through
    staging, each id once. Returns how many rows were new."""
    cur.execute("SAVEPOINT um_live")
    try:
        with cur.copy(f"COPY public.api_requests ({_COLUMNS}) FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(_RAW_TYPES)
            write_row = copy.write_row
            for row in rows:
                write_row(row)
    except psycopg.errors.UniqueViolation:
        cur.execute("ROLLBACK TO SAVEPOINT um_live")
        _stage(cur, rows)
        cur.execute(_INSERT_RAW)
        return int(cur.rowcount)
    return len(rows)  # the savepoint ends with the transaction: no round trip for it


#: The three instants in one row: (the seal instant, the hour instant, the month instant). The
#: hour instant is NULL on a schema from before it (until ``create_schema()`` adds it), whose
#: coarse tiers hold what the fine ones hold: every request before the seal instant; the month
#: instant likewise, its monthly tiers holding what the hourly and daily ones hold.
INSTANTS_SQL = (
    "SELECT max(sealed_before) FILTER (WHERE dataset = 'requests'), "
    "max(sealed_before) FILTER (WHERE dataset = 'request_hours'), "
    "max(sealed_before) FILTER (WHERE dataset = 'request_days') FROM public.rollup_seals"
)

# Every request rolled up, on a schema from before rollup_seals.
_NEVER = datetime.max.replace(tzinfo=timezone.utc)
_NO_SEAL = {"coarse": _NEVER, "months": _NEVER}


def write_requests(
    cur: Any, rows: list[tuple[Any, ...]], sealing: bool
) -> tuple[int, datetime | None]:
    """Write id-unique raw request ``rows`` (``._storage.base.request_value_rows``) in ``cur``'s
    open transaction (staging tables present, :class:`IdDumper` registered on ``cur``); returns
    how many rows were new and the seal instant they were written under.

    Without ``sealing`` (a schema from before ``rollup_seals``, until ``create_schema()``
    upgrades it) every request is written with its rollups, as that schema's readers expect.
    """
    if not sealing:
        _stage(cur, rows)
        cur.execute(_INSERT_ROLLED, _NO_SEAL)
        return int(cur.fetchone()[0]), None
    cur.execute(f"SELECT pg_advisory_xact_lock_shared({SEAL_LOCK})")
    # A statement of its own: its snapshot is taken after the lock, so it sees the last seal.
    cur.execute(INSTANTS_SQL)
    sealed_before, coarse, months = cur.fetchone()
    # in id order (integers, compared in C), so neighbouring ids fill the same index pages
    rows.sort(key=itemgetter(0))
    late = [row for row in rows if row[9] < sealed_before]
    live = [row for row in rows if row[9] >= sealed_before] if late else rows
    written = 0
    if late:
        _stage(cur, late)
        coarse = sealed_before if coarse is None else coarse
        cur.execute(
            _INSERT_ROLLED, {"coarse": coarse, "months": coarse if months is None else months}
        )
        written += int(cur.fetchone()[0])
    if live:
        written += _copy_live(cur, live)
    return written, sealed_before
