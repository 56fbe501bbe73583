"""Upgrades of SQLite files made by older releases, inside the schema's write transaction.

``SQLiteBackend`` creates missing tables from ``_schema.metadata`` in one ``BEGIN IMMEDIATE``
transaction and then calls these with the tables that were ``present`` before it: a table this
release added is filled from what the older file holds before any writer can see it, so every
rollup is exact from the first write on. Latency buckets, microseconds and endpoint labels come
from the very Python functions the writer stages.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, inspect

from ._schema import REQUEST_TIME_INDEX
from ._sqliterollups import ENDPOINT_ROLLUPS, _quarter, roll_up_requests
from ._sqliteseal import bucket_sql, micros_sql, raw_requests
from ._sqlitewrite import MISMATCH_ROLLUP

__all__ = [
    "add_route_matched",
    "backfill_endpoints",
    "backfill_mismatches",
    "backfill_quarters",
    "replace_request_indexes",
]

ENDPOINT_TABLES = ("endpoint_routes", *ENDPOINT_ROLLUPS)


_BUCKET = bucket_sql("response_time_ms")
_MICROS = micros_sql("response_time_ms")


def add_route_matched(conn: Connection, present: set[str]) -> None:
    """Give an older ``api_requests`` its ``route_matched`` column: every stored row was
    recorded as a matched route (older releases stored no other kind of row)."""
    if "api_requests" not in present:
        return
    columns = {c["name"] for c in inspect(conn).get_columns("api_requests")}
    if "route_matched" not in columns:
        conn.exec_driver_sql(
            "ALTER TABLE api_requests ADD COLUMN route_matched BOOLEAN DEFAULT 1 NOT NULL"
        )


# The indexes older releases gave ``api_requests``, in place of its one time-first index.
_FORMER_REQUEST_INDEXES = ("idx_api_requests_key_time", "idx_api_requests_time")


def replace_request_indexes(conn: Connection) -> None:
    """Give ``api_requests`` its time-first index and drop the two an older file had instead
    (one led by the key, which every batch wrote into at one place per key)."""
    REQUEST_TIME_INDEX.create(conn, checkfirst=True)
    for name in _FORMER_REQUEST_INDEXES:
        conn.exec_driver_sql(f"DROP INDEX IF EXISTS main.{name}")


def backfill_endpoints(conn: Connection, present: set[str]) -> None:
    """Fill the endpoint rollups an older database lacked from its raw requests.

    The stored requests are rolled up as one batch, through the writer's own cap and rollup
    statements: routes are admitted per key and UTC day in route order up to the cap, so the
    result equals what writing every stored request in one batch would have produced."""
    missing = [t for t in ENDPOINT_TABLES if t not in present]
    if "api_requests" not in present or not missing:
        return
    dbapi: Any = conn.connection.dbapi_connection
    cur = dbapi.cursor()
    try:
        roll_up_requests(cur, raw_requests(), tiers=missing)
    finally:
        cur.close()


def backfill_mismatches(conn: Connection, present: set[str]) -> None:
    """Fill ``quarter_mismatch_usage`` from the raw rows when an older database lacked it."""
    if "quarter_mismatch_usage" in present or "file_uploads" not in present:
        return
    # no conflict can arise in an empty table; the upsert form is the writer's own statement
    conn.exec_driver_sql(MISMATCH_ROLLUP.format(source="main.file_uploads"))


# An install that predates the quarter-hour rollups gets them filled in the transaction that
# creates them: minutes 15-59 of each hour from the raw rows, minutes 0-14 as the hourly row
# minus those, so rollup rows without raw rows (migrated totals at 00:00 UTC) carry over.
_LATE = "substr({at}, 15, 2) >= '15'"
_QUARTER_BACKFILL = {
    "quarter_usage": (
        "INSERT INTO main.quarter_usage (usage_quarter, api_key_id, provider, file_type, "
        "total_uploads, total_file_size, successful_requests, failed_requests) "
        "SELECT q, k, p, t, sum(n), sum(b), sum(s), sum(f) FROM ("
        "SELECT usage_hour AS q, api_key_id AS k, provider AS p, file_type AS t, "
        "total_uploads AS n, total_file_size AS b, successful_requests AS s, "
        "failed_requests AS f FROM main.hourly_usage "
        f"UNION ALL SELECT {_quarter('uploaded_at')}, api_key_id, provider, file_type, 1, "
        "file_size, upload_status = 'success', upload_status <> 'success' "
        f"FROM main.file_uploads WHERE {_LATE.format(at='uploaded_at')} "
        "UNION ALL SELECT substr(uploaded_at, 1, 13) || ':00:00.000000', api_key_id, provider, "
        "file_type, -1, -file_size, -(upload_status = 'success'), -(upload_status <> 'success') "
        f"FROM main.file_uploads WHERE {_LATE.format(at='uploaded_at')}"
        ") GROUP BY q, k, p, t HAVING sum(n) <> 0"
    ),
    "quarter_request_usage": (
        "INSERT INTO main.quarter_request_usage (usage_quarter, api_key_id, latency_bucket, "
        "total_requests, error_requests, total_response_us, total_request_bytes, "
        "total_response_bytes) "
        "SELECT q, k, lb, sum(n), sum(e), sum(us), sum(qb), sum(rb) FROM ("
        "SELECT usage_hour AS q, api_key_id AS k, latency_bucket AS lb, total_requests AS n, "
        "error_requests AS e, total_response_us AS us, total_request_bytes AS qb, "
        "total_response_bytes AS rb FROM main.hourly_request_usage "
        f"UNION ALL SELECT {_quarter('requested_at')}, api_key_id, "
        f"{_BUCKET}, 1, status_code >= 400, {_MICROS}, request_size, response_size "
        f"FROM main.api_requests WHERE {_LATE.format(at='requested_at')} "
        "UNION ALL SELECT substr(requested_at, 1, 13) || ':00:00.000000', api_key_id, "
        f"{_BUCKET}, -1, -(status_code >= 400), -({_MICROS}), -request_size, -response_size "
        f"FROM main.api_requests WHERE {_LATE.format(at='requested_at')}"
        ") GROUP BY q, k, lb HAVING sum(n) <> 0"
    ),
}


def backfill_quarters(conn: Connection, present: set[str]) -> None:
    """Fill the quarter-hour rollups that an older database (tables ``present`` before this
    transaction created the missing ones) lacked, inside ``conn``'s open write transaction."""
    if "hourly_usage" not in present or not set(_QUARTER_BACKFILL) - present:
        return
    for table, statement in _QUARTER_BACKFILL.items():
        if table not in present:
            conn.exec_driver_sql(statement)
