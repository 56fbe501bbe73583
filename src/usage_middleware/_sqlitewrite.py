"""The SQLite write path: the same plan as PostgreSQL's, on the sqlite3 driver directly.

Inside the ``BEGIN IMMEDIATE`` transaction ``UsageStore.write`` opens (so this process is the
only writer until commit), the batch goes into a connection-local temporary table with one
``executemany``; rows whose ``id`` is already stored are deleted from it; the rest are copied
into the raw table and rolled up with ``INSERT .. SELECT .. GROUP BY .. ON CONFLICT DO UPDATE``.
Counting from the staging table after the delete means only new rows reach the rollups.

Endpoint rollups follow the route cap (see ``_schema.ROUTES_PER_KEY_DAY``): the batch's new
named routes of each key and UTC day are admitted into ``endpoint_routes`` in route order while
the day has room, staged rows whose route was not admitted are relabelled ``(other)``, and then
the three endpoint tiers are rolled up like the others. Being the only writer, SQLite never
exceeds the cap.

Values are staged in exactly the form SQLAlchemy stores them on SQLite (UUIDs as 32 hex digits,
UTC datetimes as ``YYYY-MM-DD HH:MM:SS.ffffff``, dates as ``YYYY-MM-DD``), so the read path, which
goes through the ``_schema`` tables, reads them back unchanged. Skipping SQLAlchemy's per-value
processing here is what makes the path several times faster. Labels and latency buckets come
from the very Python functions the reference backend uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

from sqlalchemy import Connection

from ._records import RequestRecord, UploadRecord
from ._schema import (
    ENDPOINT_BUCKET_WIDTH,
    OTHER_METHOD,
    OTHER_ROUTE,
    ROUTES_PER_KEY_DAY,
    STANDARD_METHODS,
    UNMATCHED_ROUTE,
    latency_bucket,
)

__all__ = [
    "CREATE_STAGING",
    "ENDPOINT_ROLLUPS",
    "ENDPOINT_STATEMENTS",
    "MISMATCH_ROLLUP",
    "sqlite_write",
]

_UPLOAD_COLUMNS = (
    "id, api_key_id, request_id, provider, file_type, declared_type, file_size, file_name, "
    "upload_status, error_message, uploaded_at"
)
_REQUEST_COLUMNS = (
    "id, api_key_id, method, path, status_code, response_time_ms, request_size, "
    "response_size, error_message, requested_at, route_matched"
)

CREATE_STAGING = (
    f"CREATE TEMP TABLE IF NOT EXISTS um_stage_uploads ({_UPLOAD_COLUMNS})",
    f"CREATE TEMP TABLE IF NOT EXISTS um_stage_requests "
    f"({_REQUEST_COLUMNS}, latency_bucket, response_us, endpoint_method, endpoint_route, "
    "endpoint_bucket)",
)


def _checked_add(column: str) -> str:
    """``column + excluded.column`` that fails instead of overflowing.

    SQLite's ``+`` silently turns an integer overflow into an inexact REAL; ``abs()`` of the
    smallest integer raises ``integer overflow`` (as ``sum()`` does), which the store reports as
    refused records (as PostgreSQL's ``bigint out of range``). Both terms are sums of values
    that are never negative, so the sum overflows exactly when the test says. Used for the byte
    and time sums, the only counters that can grow that large; the per-batch sums are ``sum()``.
    """
    return (
        f"CASE WHEN {column} > 9223372036854775807 - excluded.{column} "
        f"THEN abs(-9223372036854775807 - 1) ELSE {column} + excluded.{column} END"
    )


def _quarter(column: str) -> str:
    """The UTC quarter hour (:00, :15, :30, :45) of a stored UTC timestamp, as stored text."""
    minute = f"substr({column}, 15, 2)"
    return (
        f"substr({column}, 1, 14) || CASE WHEN {minute} < '15' THEN '00' "
        f"WHEN {minute} < '30' THEN '15' WHEN {minute} < '45' THEN '30' ELSE '45' END "
        "|| ':00.000000'"
    )


_UPLOAD_STATEMENTS = (
    "DELETE FROM temp.um_stage_uploads WHERE id IN (SELECT id FROM main.file_uploads)",
    f"INSERT INTO main.file_uploads ({_UPLOAD_COLUMNS}) "
    f"SELECT {_UPLOAD_COLUMNS} FROM temp.um_stage_uploads ORDER BY id",
)
_UPLOAD_COUNTERS = (
    "count(*), sum(file_size), sum(upload_status = 'success'), sum(upload_status <> 'success')"
)
_UPLOAD_SET = (
    "total_uploads = total_uploads + excluded.total_uploads, "
    f"total_file_size = {_checked_add('total_file_size')}, "
    "successful_requests = successful_requests + excluded.successful_requests, "
    "failed_requests = failed_requests + excluded.failed_requests"
)
_UPLOAD_ROLLUPS = tuple(
    f"INSERT INTO main.{table} (api_key_id, {when_column}, provider, file_type, total_uploads, "
    "total_file_size, successful_requests, failed_requests) "
    f"SELECT api_key_id, {when} AS w, provider, file_type, {_UPLOAD_COUNTERS} "
    "FROM temp.um_stage_uploads WHERE true "
    "GROUP BY api_key_id, w, provider, file_type ORDER BY api_key_id, w, provider, file_type "
    f"ON CONFLICT (ifnull(api_key_id, ''), {when_column}, provider, file_type) "
    f"DO UPDATE SET {_UPLOAD_SET}"
    for table, when_column, when in (
        ("daily_usage", "usage_date", "substr(uploaded_at, 1, 10)"),
        ("hourly_usage", "usage_hour", "substr(uploaded_at, 1, 13) || ':00:00.000000'"),
        ("quarter_usage", "usage_quarter", _quarter("uploaded_at")),
    )
)

# Uploads whose declared type differs from the detected one (sparse: no row for the rest).
_MISMATCH_WHERE = "declared_type IS NOT NULL AND declared_type <> file_type"
_MISMATCH_ROLLUP = (
    "INSERT INTO main.quarter_mismatch_usage (api_key_id, usage_quarter, provider, file_type, "
    "declared_type, total_uploads) "
    f"SELECT api_key_id, {_quarter('uploaded_at')} AS w, provider, file_type, declared_type, "
    f"count(*) FROM {{source}} WHERE {_MISMATCH_WHERE} "
    "GROUP BY api_key_id, w, provider, file_type, declared_type "
    "ORDER BY api_key_id, w, provider, file_type, declared_type "
    "ON CONFLICT (ifnull(api_key_id, ''), usage_quarter, provider, file_type, declared_type) "
    "DO UPDATE SET total_uploads = total_uploads + excluded.total_uploads"
)
_UPLOAD_ROLLUPS = (*_UPLOAD_ROLLUPS, _MISMATCH_ROLLUP.format(source="temp.um_stage_uploads"))
MISMATCH_ROLLUP = _MISMATCH_ROLLUP


_REQUEST_STATEMENTS = (
    "DELETE FROM temp.um_stage_requests WHERE id IN (SELECT id FROM main.api_requests)",
    f"INSERT INTO main.api_requests ({_REQUEST_COLUMNS}) "
    f"SELECT {_REQUEST_COLUMNS} FROM temp.um_stage_requests ORDER BY id",
)
_REQUEST_COUNTERS = (
    "count(*), sum(status_code >= 400), sum(response_us), sum(request_size), sum(response_size)"
)
_REQUEST_SET = (
    "total_requests = total_requests + excluded.total_requests, "
    "error_requests = error_requests + excluded.error_requests, "
    f"total_response_us = {_checked_add('total_response_us')}, "
    f"total_request_bytes = {_checked_add('total_request_bytes')}, "
    f"total_response_bytes = {_checked_add('total_response_bytes')}"
)
_REQUEST_ROLLUPS = tuple(
    f"INSERT INTO main.{table} (api_key_id, {when_column}, latency_bucket, total_requests, "
    "error_requests, total_response_us, total_request_bytes, total_response_bytes) "
    f"SELECT api_key_id, {when} AS w, latency_bucket, {_REQUEST_COUNTERS} "
    "FROM temp.um_stage_requests WHERE true "
    "GROUP BY api_key_id, w, latency_bucket ORDER BY api_key_id, w, latency_bucket "
    f"ON CONFLICT (ifnull(api_key_id, ''), {when_column}, latency_bucket) "
    f"DO UPDATE SET {_REQUEST_SET}"
    for table, when_column, when in (
        ("monthly_request_usage", "usage_month", "substr(requested_at, 1, 7) || '-01'"),
        ("daily_request_usage", "usage_date", "substr(requested_at, 1, 10)"),
        ("hourly_request_usage", "usage_hour", "substr(requested_at, 1, 13) || ':00:00.000000'"),
        ("quarter_request_usage", "usage_quarter", _quarter("requested_at")),
    )
)


# --- endpoint rollups and the route cap -----------------------------------------------------
# The cap's two steps run on the staged rows (new ones only, after the delete above): admit the
# batch's new named routes per key and UTC day, in route order, into the room the day has left
# (SQLite runs an INSERT's SELECT to completion before inserting when it reads the target table,
# so the room is the day's count before this batch); then relabel every staged route that is not
# in endpoint_routes as "(other)".
_SAME_KEY = "ifnull(e.api_key_id, '') = ifnull({k}, '')"
_ADMIT_ROUTES = (
    "INSERT INTO main.endpoint_routes (api_key_id, usage_date, route) "
    "SELECT k, d, r FROM ("
    "SELECT k, d, r, row_number() OVER (PARTITION BY ifnull(k, ''), d ORDER BY r) AS n "
    "FROM (SELECT DISTINCT api_key_id AS k, substr(requested_at, 1, 10) AS d, "
    "endpoint_route AS r FROM temp.um_stage_requests "
    f"WHERE endpoint_route <> '{UNMATCHED_ROUTE}') AS w "
    "WHERE NOT EXISTS (SELECT 1 FROM main.endpoint_routes AS e "
    f"WHERE {_SAME_KEY.format(k='w.k')} AND e.usage_date = w.d AND e.route = w.r)"
    ") AS c "
    f"WHERE n <= {ROUTES_PER_KEY_DAY} - (SELECT count(*) FROM main.endpoint_routes AS e "
    f"WHERE {_SAME_KEY.format(k='c.k')} AND e.usage_date = c.d) "
    "ORDER BY ifnull(k, ''), d, r"
)
_RELABEL = (
    f"UPDATE temp.um_stage_requests SET endpoint_route = '{OTHER_ROUTE}' "
    f"WHERE endpoint_route <> '{UNMATCHED_ROUTE}' AND NOT EXISTS ("
    "SELECT 1 FROM main.endpoint_routes AS e "
    f"WHERE {_SAME_KEY.format(k='um_stage_requests.api_key_id')} "
    "AND e.usage_date = substr(um_stage_requests.requested_at, 1, 10) "
    "AND e.route = um_stage_requests.endpoint_route)"
)
_ENDPOINT_SET = (
    "total_requests = total_requests + excluded.total_requests, "
    f"total_response_us = {_checked_add('total_response_us')}, "
    f"total_request_bytes = {_checked_add('total_request_bytes')}, "
    f"total_response_bytes = {_checked_add('total_response_bytes')}"
)
_ENDPOINT_GROUP = "api_key_id, w, endpoint_method, endpoint_route, status_code, endpoint_bucket"
ENDPOINT_ROLLUPS = {
    table: f"INSERT INTO main.{table} (api_key_id, {when_column}, method, route, status_code, "
    "latency_bucket, total_requests, total_response_us, total_request_bytes, "
    "total_response_bytes) "
    f"SELECT api_key_id, {when} AS w, endpoint_method, endpoint_route, status_code, "
    "endpoint_bucket, count(*), sum(response_us), sum(request_size), sum(response_size) "
    f"FROM temp.um_stage_requests WHERE true GROUP BY {_ENDPOINT_GROUP} "
    f"ORDER BY {_ENDPOINT_GROUP} "
    f"ON CONFLICT (ifnull(api_key_id, ''), {when_column}, method, route, status_code, "
    f"latency_bucket) DO UPDATE SET {_ENDPOINT_SET}"
    for table, when_column, when in (
        ("monthly_endpoint_usage", "usage_month", "substr(requested_at, 1, 7) || '-01'"),
        ("daily_endpoint_usage", "usage_date", "substr(requested_at, 1, 10)"),
        ("quarter_endpoint_usage", "usage_quarter", _quarter("requested_at")),
    )
}
#: The cap's statements on the staged rows, then the endpoint tiers (the backfill reuses them).
ENDPOINT_STATEMENTS = (_ADMIT_ROUTES, _RELABEL, *ENDPOINT_ROLLUPS.values())

_METHODS = STANDARD_METHODS
_WIDTH = ENDPOINT_BUCKET_WIDTH


def _hex(value: UUID | None) -> str | None:
    return None if value is None else value.hex


def _utc_text(value: datetime) -> str:
    """A validated (aware, UTC) datetime as SQLAlchemy stores it on SQLite: its ISO text
    without the ``+00:00`` (cheaper than converting it to a naive datetime first)."""
    return value.isoformat(" ", "microseconds")[:26]


def _request_row(r: RequestRecord) -> tuple[Any, ...]:
    """A request as staged: its columns, then its latency bucket, microseconds and labels."""
    ms = r.response_time_ms
    fine = latency_bucket(ms)
    return (
        r.id.hex,
        None if r.api_key_id is None else r.api_key_id.hex,
        r.method,
        r.path,
        r.status_code,
        ms,
        r.request_size,
        r.response_size,
        r.error_message,
        _utc_text(r.requested_at),
        r.route_matched,
        fine,
        round(ms * 1000),
        r.method if r.method in _METHODS else OTHER_METHOD,
        r.path if r.route_matched else UNMATCHED_ROUTE,
        -(-fine // _WIDTH),
    )


def sqlite_write(
    conn: Connection, uploads: Sequence[UploadRecord], requests: Sequence[RequestRecord]
) -> int:
    """Write validated, id-unique records inside ``conn``'s open write transaction."""
    dbapi: Any = conn.connection.dbapi_connection
    cur = dbapi.cursor()
    written = 0
    try:
        for statement in CREATE_STAGING:
            cur.execute(statement)
        if uploads:
            cur.execute("DELETE FROM temp.um_stage_uploads")
            cur.executemany(
                "INSERT INTO temp.um_stage_uploads VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                [
                    (
                        u.id.hex,
                        _hex(u.api_key_id),
                        _hex(u.request_id),
                        u.provider,
                        u.file_type,
                        u.declared_type,
                        u.file_size,
                        u.file_name,
                        u.upload_status,
                        u.error_message,
                        _utc_text(u.uploaded_at),
                    )
                    for u in uploads
                ],
            )
            for statement in _UPLOAD_STATEMENTS:
                cur.execute(statement)
            written += cur.rowcount
            for statement in _UPLOAD_ROLLUPS:
                cur.execute(statement)
            cur.execute("DELETE FROM temp.um_stage_uploads")
        if requests:
            cur.execute("DELETE FROM temp.um_stage_requests")
            cur.executemany(
                "INSERT INTO temp.um_stage_requests VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                [_request_row(r) for r in requests],
            )
            for statement in _REQUEST_STATEMENTS:
                cur.execute(statement)
            written += cur.rowcount
            for statement in (*_REQUEST_ROLLUPS, *ENDPOINT_STATEMENTS):
                cur.execute(statement)
            cur.execute("DELETE FROM temp.um_stage_requests")
    finally:
        cur.close()
    return written
