"""The SQLite write path: the same plan as PostgreSQL's, on the sqlite3 driver directly.

Inside the ``BEGIN IMMEDIATE`` transaction ``UsageStore.write`` opens (so this process is the
only writer until commit), the batch goes into a connection-local temporary table with one
``executemany``; rows whose ``id`` is already stored are deleted from it; the rest are copied
into the raw table and rolled up with ``INSERT .. SELECT .. GROUP BY .. ON CONFLICT DO UPDATE``.
Counting from the staging table after the delete means only new rows reach the rollups.

Values are staged in exactly the form SQLAlchemy stores them on SQLite (UUIDs as 32 hex digits,
UTC datetimes as ``YYYY-MM-DD HH:MM:SS.ffffff``, dates as ``YYYY-MM-DD``), so the read path, which
goes through the ``_schema`` tables, reads them back unchanged. Skipping SQLAlchemy's per-value
processing here is what makes the path several times faster.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

from sqlalchemy import Connection

from ._records import RequestRecord, UploadRecord
from ._schema import latency_bucket

__all__ = ["sqlite_write"]

_UPLOAD_COLUMNS = (
    "id, api_key_id, request_id, provider, file_type, declared_type, file_size, file_name, "
    "upload_status, error_message, uploaded_at"
)
_REQUEST_COLUMNS = (
    "id, api_key_id, method, path, status_code, response_time_ms, request_size, "
    "response_size, error_message, requested_at"
)

_CREATE_STAGING = (
    f"CREATE TEMP TABLE IF NOT EXISTS um_stage_uploads ({_UPLOAD_COLUMNS})",
    f"CREATE TEMP TABLE IF NOT EXISTS um_stage_requests "
    f"({_REQUEST_COLUMNS}, latency_bucket, response_us)",
)


def _checked_add(column: str) -> str:
    """``column + excluded.column`` that fails instead of overflowing.

    SQLite's ``+`` silently turns an integer overflow into an inexact REAL, while ``sum()``
    raises ``integer overflow``, which the store reports as refused records (as PostgreSQL's
    ``bigint out of range``). Used for the byte and time sums, the only counters that can grow
    that large; the per-batch sums are ``sum()`` already.
    """
    return f"(SELECT sum(v) FROM (SELECT {column} AS v UNION ALL SELECT excluded.{column}))"


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


def backfill_mismatches(conn: Connection, present: set[str]) -> None:
    """Fill ``quarter_mismatch_usage`` from the raw rows when an older database (tables
    ``present`` before this transaction) lacked it, inside ``conn``'s write transaction."""
    if "quarter_mismatch_usage" in present or "file_uploads" not in present:
        return
    # no conflict can arise in an empty table; the upsert form is the writer's own statement
    conn.exec_driver_sql(_MISMATCH_ROLLUP.format(source="main.file_uploads"))


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


def _hex(value: UUID | None) -> str | None:
    return None if value is None else value.hex


def _utc_text(value: datetime) -> str:
    """A validated (aware, UTC) datetime as SQLAlchemy stores it on SQLite."""
    return value.replace(tzinfo=None).isoformat(" ", "microseconds")


def sqlite_write(
    conn: Connection, uploads: Sequence[UploadRecord], requests: Sequence[RequestRecord]
) -> int:
    """Write validated, id-unique records inside ``conn``'s open write transaction."""
    dbapi: Any = conn.connection.dbapi_connection
    cur = dbapi.cursor()
    written = 0
    try:
        for statement in _CREATE_STAGING:
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
                "INSERT INTO temp.um_stage_requests VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                [
                    (
                        r.id.hex,
                        _hex(r.api_key_id),
                        r.method,
                        r.path,
                        r.status_code,
                        r.response_time_ms,
                        r.request_size,
                        r.response_size,
                        r.error_message,
                        _utc_text(r.requested_at),
                        latency_bucket(r.response_time_ms),
                        round(r.response_time_ms * 1000),
                    )
                    for r in requests
                ],
            )
            for statement in _REQUEST_STATEMENTS:
                cur.execute(statement)
            written += cur.rowcount
            for statement in _REQUEST_ROLLUPS:
                cur.execute(statement)
            cur.execute("DELETE FROM temp.um_stage_requests")
    finally:
        cur.close()
    return written


# An install that predates the quarter-hour rollups gets them filled in the transaction that
# creates them: minutes 15-59 of each hour from the raw rows, minutes 0-14 as the hourly row
# minus those, so rollup rows without raw rows (migrated totals at 00:00 UTC) carry over. The
# latency bucket and microseconds come from the very Python functions the writer uses.
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
        "um_latency_bucket(response_time_ms), 1, status_code >= 400, "
        "um_response_us(response_time_ms), request_size, response_size "
        f"FROM main.api_requests WHERE {_LATE.format(at='requested_at')} "
        "UNION ALL SELECT substr(requested_at, 1, 13) || ':00:00.000000', api_key_id, "
        "um_latency_bucket(response_time_ms), -1, -(status_code >= 400), "
        "-um_response_us(response_time_ms), -request_size, -response_size "
        f"FROM main.api_requests WHERE {_LATE.format(at='requested_at')}"
        ") GROUP BY q, k, lb HAVING sum(n) <> 0"
    ),
}


def backfill_quarters(conn: Connection, present: set[str]) -> None:
    """Fill the quarter-hour rollups that an older database (tables ``present`` before this
    transaction created the missing ones) lacked, inside ``conn``'s open write transaction."""
    if "hourly_usage" not in present or not set(_QUARTER_BACKFILL) - present:
        return
    dbapi: Any = conn.connection.dbapi_connection
    dbapi.create_function("um_latency_bucket", 1, latency_bucket, deterministic=True)
    dbapi.create_function("um_response_us", 1, lambda ms: round(ms * 1000), deterministic=True)
    for table, statement in _QUARTER_BACKFILL.items():
        if table not in present:
            conn.exec_driver_sql(statement)
