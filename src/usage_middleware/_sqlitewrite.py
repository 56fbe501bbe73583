"""The SQLite write path: the same plan as PostgreSQL's, on the sqlite3 driver directly.

Inside the ``BEGIN IMMEDIATE`` transaction ``UsageStore.write`` opens (so this process is the
only writer until commit), uploads go into a connection-local temporary table (multi-row
``VALUES`` statements, not ``executemany``: see :mod:`usage_middleware._sqlitebulk`); rows whose
``id`` is already stored are deleted from it; the rest are copied into the raw table and rolled
up with ``INSERT .. SELECT .. GROUP BY .. ON CONFLICT DO UPDATE``. Counting from the staging
table after the delete means only new rows reach the rollups.

Requests are *sealed* as on PostgreSQL (:mod:`usage_middleware._sqliteseal`): a request at or
after the seal instant is a raw row only, inserted straight into ``api_requests`` with
``ON CONFLICT (id) DO NOTHING``; a seal later folds each quarter hour's raw rows into every
request rollup at once. A request before the instant (a spool replay, a long upload recorded
late) is staged and rolled up as it is written, like an upload. Either way the rolled-up rows
are first summed per key, quarter hour and label in a temporary table, and every tier is
summed from that: a quarter hour of traffic holds far fewer such groups than rows.

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

import sqlite3
from collections.abc import Sequence
from datetime import datetime, timezone
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
from ._sqlitebulk import insert_rows

__all__ = [
    "CREATE_STAGING",
    "ENDPOINT_ROLLUPS",
    "MISMATCH_ROLLUP",
    "roll_up_staged_requests",
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
    f"({_REQUEST_COLUMNS}, latency_bucket, response_us, endpoint_method, endpoint_route)",
    # The staged requests summed per key and quarter hour: by fine latency bucket for the
    # histograms, by endpoint labels for the endpoint rollups.
    "CREATE TEMP TABLE IF NOT EXISTS um_request_groups (api_key_id, q, latency_bucket, "
    "n, e, us, rq, rs)",
    "CREATE TEMP TABLE IF NOT EXISTS um_endpoint_groups (api_key_id, q, method, route, "
    "status_code, latency_bucket, n, us, rq, rs)",
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
# A live request: its raw row only (a seal rolls it up), ON CONFLICT (id) DO NOTHING.
_INSERT_LIVE = f"INSERT INTO main.api_requests ({_REQUEST_COLUMNS})"
_REQUEST_SET = (
    "total_requests = total_requests + excluded.total_requests, "
    "error_requests = error_requests + excluded.error_requests, "
    f"total_response_us = {_checked_add('total_response_us')}, "
    f"total_request_bytes = {_checked_add('total_request_bytes')}, "
    f"total_response_bytes = {_checked_add('total_response_bytes')}"
)
# Periods of the grouped rows' UTC quarter hour ``q`` (stored text), per tier.
_MONTH, _DAY, _HOUR = (
    "substr(q, 1, 7) || '-01'",
    "substr(q, 1, 10)",
    ("substr(q, 1, 13) || ':00:00.000000'"),
)
_GROUP_REQUESTS = (
    "INSERT INTO temp.um_request_groups "
    f"SELECT api_key_id, {_quarter('requested_at')} AS q, latency_bucket, count(*), "
    "sum(status_code >= 400), sum(response_us), sum(request_size), sum(response_size) "
    "FROM temp.um_stage_requests GROUP BY api_key_id, q, latency_bucket"
)
_REQUEST_TIERS = (
    "monthly_request_usage", "daily_request_usage", "hourly_request_usage", "quarter_request_usage",
)  # fmt: skip
_REQUEST_ROLLUPS = tuple(
    f"INSERT INTO main.{table} (api_key_id, {when_column}, latency_bucket, total_requests, "
    "error_requests, total_response_us, total_request_bytes, total_response_bytes) "
    f"SELECT api_key_id, {when} AS w, latency_bucket, sum(n), sum(e), sum(us), sum(rq), "
    "sum(rs) FROM temp.um_request_groups WHERE true "
    "GROUP BY api_key_id, w, latency_bucket ORDER BY api_key_id, w, latency_bucket "
    f"ON CONFLICT (ifnull(api_key_id, ''), {when_column}, latency_bucket) "
    f"DO UPDATE SET {_REQUEST_SET}"
    for table, when_column, when in (
        ("monthly_request_usage", "usage_month", _MONTH),
        ("daily_request_usage", "usage_date", _DAY),
        ("hourly_request_usage", "usage_hour", _HOUR),
        ("quarter_request_usage", "usage_quarter", "q"),
    )
)


_METHODS = STANDARD_METHODS
# The coarse (endpoint) bucket of a fine one, as endpoint_bucket: (fine + 4) / 5 in integers.
_WIDTH = ENDPOINT_BUCKET_WIDTH

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
_GROUP_ENDPOINTS = (
    "INSERT INTO temp.um_endpoint_groups "
    f"SELECT api_key_id, {_quarter('requested_at')} AS q, endpoint_method, endpoint_route, "
    f"status_code, (latency_bucket + {_WIDTH - 1}) / {_WIDTH} AS b, count(*), sum(response_us), "
    "sum(request_size), sum(response_size) FROM temp.um_stage_requests "
    "GROUP BY api_key_id, q, endpoint_method, endpoint_route, status_code, b"
)
_ENDPOINT_GROUP = "api_key_id, w, method, route, status_code, latency_bucket"
ENDPOINT_ROLLUPS = {
    table: f"INSERT INTO main.{table} (api_key_id, {when_column}, method, route, status_code, "
    "latency_bucket, total_requests, total_response_us, total_request_bytes, "
    "total_response_bytes) "
    f"SELECT api_key_id, {when} AS w, method, route, status_code, latency_bucket, sum(n), "
    f"sum(us), sum(rq), sum(rs) FROM temp.um_endpoint_groups WHERE true "
    f"GROUP BY {_ENDPOINT_GROUP} ORDER BY {_ENDPOINT_GROUP} "
    f"ON CONFLICT (ifnull(api_key_id, ''), {when_column}, method, route, status_code, "
    f"latency_bucket) DO UPDATE SET {_ENDPOINT_SET}"
    for table, when_column, when in (
        ("monthly_endpoint_usage", "usage_month", _MONTH),
        ("daily_endpoint_usage", "usage_date", _DAY),
        ("quarter_endpoint_usage", "usage_quarter", "q"),
    )
}
_CLEAR_GROUPS = ("DELETE FROM temp.um_request_groups", "DELETE FROM temp.um_endpoint_groups")


def roll_up_staged_requests(cur: Any, tiers: Sequence[str] | None = None) -> None:
    """Roll the staged requests (new ones only) up into the request histograms and, through
    the route cap (``endpoint_routes``), the endpoint rollups; ``tiers`` names the only tables
    to fill (an upgrade's backfill of the tables an older file lacked)."""

    def wanted(table: str) -> bool:
        return tiers is None or table in tiers

    for statement in _CLEAR_GROUPS:
        cur.execute(statement)
    if any(wanted(t) for t in _REQUEST_TIERS):
        cur.execute(_GROUP_REQUESTS)
        for table, statement in zip(_REQUEST_TIERS, _REQUEST_ROLLUPS, strict=True):
            if wanted(table):
                cur.execute(statement)
    if wanted("endpoint_routes"):
        cur.execute(_ADMIT_ROUTES)
    cur.execute(_RELABEL)
    cur.execute(_GROUP_ENDPOINTS)
    for table, statement in ENDPOINT_ROLLUPS.items():
        if wanted(table):
            cur.execute(statement)
    for statement in _CLEAR_GROUPS:
        cur.execute(statement)


def _hex(value: UUID | None) -> str | None:
    return None if value is None else value.hex


def utc_text(value: datetime) -> str:
    """A validated (aware, UTC) datetime as SQLAlchemy stores it on SQLite: its ISO text
    without the ``+00:00`` (cheaper than converting it to a naive datetime first)."""
    return value.isoformat(" ", "microseconds")[:26]


def _raw_row(r: RequestRecord) -> tuple[Any, ...]:
    """A request's ``api_requests`` row, in ``_REQUEST_COLUMNS`` order."""
    return (
        r.id.hex,
        None if r.api_key_id is None else r.api_key_id.hex,
        r.method,
        r.path,
        r.status_code,
        r.response_time_ms,
        r.request_size,
        r.response_size,
        r.error_message,
        utc_text(r.requested_at),
        r.route_matched,
    )


def _request_row(r: RequestRecord) -> tuple[Any, ...]:
    """A request as staged: its columns, then its latency bucket, microseconds and labels."""
    ms = r.response_time_ms
    return (
        *_raw_row(r),
        latency_bucket(ms),
        round(ms * 1000),
        r.method if r.method in _METHODS else OTHER_METHOD,
        r.path if r.route_matched else UNMATCHED_ROUTE,
    )


#: The seal instant: every request rollup holds exactly the raw requests before it.
INSTANT_SQL = "SELECT sealed_before FROM main.rollup_seals WHERE dataset = 'requests'"


def read_instant(cur: Any) -> datetime | None:
    """The seal instant; None on a file from before sealing (every request is rolled up as it
    is written there, until ``create_schema()`` upgrades it)."""
    try:
        row = cur.execute(INSTANT_SQL).fetchone()
    except sqlite3.OperationalError as exc:
        if "no such table" not in str(exc):
            raise
        return None
    return None if row is None else stored_utc(row[0])


def stored_utc(text: str) -> datetime:
    """A UTC datetime stored as text (the inverse of :func:`utc_text`), made aware."""
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc)


def _write_requests(cur: Any, requests: Sequence[RequestRecord]) -> tuple[int, datetime | None]:
    """Live requests as raw rows, late ones staged and rolled up; returns how many were new
    and the seal instant they were written under."""
    instant = read_instant(cur)
    if instant is None:
        late, live = list(requests), []
    else:
        late = [r for r in requests if r.requested_at < instant]
        live = [r for r in requests if r.requested_at >= instant] if late else list(requests)
    written = 0
    if late:
        cur.execute("DELETE FROM temp.um_stage_requests")
        insert_rows(cur, "INSERT INTO temp.um_stage_requests", [_request_row(r) for r in late])
        for statement in _REQUEST_STATEMENTS:
            cur.execute(statement)
        written += cur.rowcount
        roll_up_staged_requests(cur)
        cur.execute("DELETE FROM temp.um_stage_requests")
    if live:
        live.sort(key=lambda r: r.id)  # neighbouring ids fill the same index pages
        written += insert_rows(
            cur, _INSERT_LIVE, [_raw_row(r) for r in live], "ON CONFLICT (id) DO NOTHING"
        )
    return written, instant


def sqlite_write(
    conn: Connection, uploads: Sequence[UploadRecord], requests: Sequence[RequestRecord]
) -> tuple[int, datetime | None]:
    """Write validated, id-unique records inside ``conn``'s open write transaction; returns
    how many rows were new and the seal instant (None: no requests, or no sealing)."""
    dbapi: Any = conn.connection.dbapi_connection
    cur = dbapi.cursor()
    written = 0
    instant = None
    try:
        for statement in CREATE_STAGING:
            cur.execute(statement)
        if uploads:
            cur.execute("DELETE FROM temp.um_stage_uploads")
            insert_rows(
                cur,
                "INSERT INTO temp.um_stage_uploads",
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
                        utc_text(u.uploaded_at),
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
            added, instant = _write_requests(cur, requests)
            written += added
    finally:
        cur.close()
    return written, instant
