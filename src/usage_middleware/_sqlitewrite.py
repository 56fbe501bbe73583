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
late) is staged and rolled up as it is written, like an upload, with the statements of
:mod:`usage_middleware._sqliterollups` (which also hold the route cap of the endpoint rollups).

Values are staged in exactly the form SQLAlchemy stores them on SQLite (UUIDs as 32 hex digits,
UTC datetimes as ``YYYY-MM-DD HH:MM:SS.ffffff``, dates as ``YYYY-MM-DD``), so the read path, which
goes through the ``_schema`` tables, reads them back unchanged. Skipping SQLAlchemy's per-value
processing here is what makes the path several times faster. Labels and latency buckets come
from the very Python functions the reference backend uses.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from operator import itemgetter
from typing import Any

from sqlalchemy import Connection

from ._records import RequestRecord, UploadRecord
from ._schema import (
    OTHER_METHOD,
    STANDARD_METHODS,
    UNMATCHED_ROUTE,
    latency_bucket,
)
from ._sqlitebulk import insert_rows
from ._sqliterollups import _checked_add, _quarter, roll_up_requests
from ._storage.base import PackedRows, request_value_rows, upload_value_rows

__all__ = [
    "INSTANTS_SQL",
    "MISMATCH_ROLLUP",
    "read_instants",
    "sqlite_write",
    "stored_utc",
    "utc_text",
    "utc_texts",
]

_UPLOAD_COLUMNS = (
    "id, api_key_id, request_id, provider, file_type, declared_type, file_size, file_name, "
    "upload_status, error_message, uploaded_at"
)
_REQUEST_COLUMNS = (
    "id, api_key_id, method, path, status_code, response_time_ms, request_size, "
    "response_size, error_message, requested_at, route_matched"
)

# what a staged request carries after its columns (``_staged_row``)
_STAGED_EXTRA = "latency_bucket, response_us, endpoint_method, endpoint_route"

_CREATE_STAGING = (
    f"CREATE TEMP TABLE IF NOT EXISTS um_stage_uploads ({_UPLOAD_COLUMNS})",
    f"CREATE TEMP TABLE IF NOT EXISTS um_stage_requests ({_REQUEST_COLUMNS}, {_STAGED_EXTRA})",
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
_METHODS = STANDARD_METHODS


# A UTC time as SQLAlchemy stores it on SQLite, up to the second; the microseconds follow.
_SECOND_TEXT = "%04d-%02d-%02d %02d:%02d:%02d."
_TIME_TEXT = _SECOND_TEXT + "%06d"


def utc_text(value: datetime) -> str:
    """A validated (aware, UTC) datetime as SQLAlchemy stores it on SQLite: its ISO text
    without the ``+00:00``, formatted from its fields: ``%`` formatting costs two thirds of
    ``isoformat`` and half of an f-string (rows of a batch: :func:`utc_texts`)."""
    return _TIME_TEXT % (
        value.year,
        value.month,
        value.day,
        value.hour,
        value.minute,
        value.second,
        value.microsecond,
    )


def utc_texts() -> Callable[[datetime], str]:
    """:func:`utc_text` for the many times of one batch: the text up to the second is made once
    per second the batch holds and reused, the microseconds appended (half the cost of
    :func:`utc_text` per row, where a batch of a busy second shares its seconds)."""
    seconds: dict[tuple[int, int, int, int, int, int], str] = {}

    def text(value: datetime) -> str:
        second = (value.year, value.month, value.day, value.hour, value.minute, value.second)
        prefix = seconds.get(second)
        if prefix is None:
            prefix = seconds[second] = _SECOND_TEXT % second
        return prefix + "%06d" % value.microsecond  # noqa: UP031

    return text


# The driver binds str, int and float values directly; any other value (None, a bool) first
# goes through its adaptation lookup, which fails at a cost of about 0.7 µs a value, several
# times the bind itself. So the rows below carry 0 where a nullable text column is NULL, and the
# statements turn it back with NULLIF(?, 0): a str is never equal to the integer 0 in SQLite, so
# only the stand-in becomes NULL. route_matched goes as the 1 or 0 it is stored as.
_NULL = 0


def _marks(columns: str, nullable: frozenset[str]) -> str:
    """One row's placeholders for ``columns`` (as listed in a statement): ``NULLIF(?, 0)`` for
    the ``nullable`` ones, whose NULL is bound as 0."""
    return (
        "(" + ", ".join("NULLIF(?, 0)" if c in nullable else "?" for c in columns.split(", ")) + ")"
    )


# the nullable columns, all text; the staged extras are never NULL
_NULLABLE = frozenset({"api_key_id", "request_id", "declared_type", "file_name", "error_message"})
_REQUEST_MARKS = _marks(_REQUEST_COLUMNS, _NULLABLE)
_STAGED_REQUEST_MARKS = _marks(f"{_REQUEST_COLUMNS}, {_STAGED_EXTRA}", _NULLABLE)
_UPLOAD_MARKS = _marks(_UPLOAD_COLUMNS, _NULLABLE)


def _packed_rows(packed: Sequence[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """The ``api_requests`` rows of ``packed`` requests (their columns with the ids as integers
    and the time as a datetime: see ``usage_middleware._storage.base.PackedRows``; records
    become such values first), in the forms SQLite stores, NULL as 0 (``_REQUEST_MARKS``)."""
    text = utc_texts()
    return [
        (
            rid.to_bytes(16, "big").hex(),  # the 32 hex digits: half the cost of "%032x"
            _NULL if key is None else key.to_bytes(16, "big").hex(),
            method,
            path,
            status,
            ms,
            rq,
            rs,
            _NULL if error is None else error,
            text(at),
            1 if matched else 0,
        )
        for rid, key, method, path, status, ms, rq, rs, error, at, matched in packed
    ]


def _packed_upload_rows(packed: Sequence[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """The ``file_uploads`` rows of ``packed`` uploads (``_UPLOAD_COLUMNS`` order, ids as
    integers: see ``usage_middleware._storage.base.PackedRows``), as :func:`_packed_rows`
    (``_UPLOAD_MARKS``)."""
    text = utc_texts()
    return [
        (
            uid.to_bytes(16, "big").hex(),
            _NULL if key is None else key.to_bytes(16, "big").hex(),
            _NULL if req is None else req.to_bytes(16, "big").hex(),
            provider,
            file_type,
            _NULL if declared is None else declared,
            size,
            _NULL if name is None else name,
            status,
            _NULL if error is None else error,
            text(at),
        )
        for uid, key, req, provider, file_type, declared, size, name, status, error, at in packed
    ]


def _staged_row(row: tuple[Any, ...]) -> tuple[Any, ...]:
    """A raw row as staged: its columns, then its latency bucket, microseconds and labels."""
    ms = row[5]
    return (
        *row,
        latency_bucket(ms),
        round(ms * 1000),
        row[2] if row[2] in _METHODS else OTHER_METHOD,
        row[3] if row[10] else UNMATCHED_ROUTE,
    )


#: The seal instant, before which every request rollup but the monthly ones holds exactly the
#: raw requests, and the month instant, the same for the monthly ones (see
#: :mod:`usage_middleware._sqliteseal`; None on a file from before it, whose monthly tiers
#: follow the seal instant).
INSTANTS_SQL = (
    "SELECT max(sealed_before) FILTER (WHERE dataset = 'requests'), "
    "max(sealed_before) FILTER (WHERE dataset = 'request_days') FROM main.rollup_seals"
)


def read_instants(cur: Any) -> tuple[datetime, datetime | None] | None:
    """The seal instant and the month instant; None on a file from before sealing (every
    request is rolled up as it is written there, until ``create_schema()`` upgrades it)."""
    try:
        fine, months = cur.execute(INSTANTS_SQL).fetchone()
    except sqlite3.OperationalError as exc:
        if "no such table" not in str(exc):
            raise
        return None
    if fine is None:
        return None
    return stored_utc(fine), None if months is None else stored_utc(months)


def stored_utc(text: str) -> datetime:
    """A UTC datetime stored as text (the inverse of :func:`utc_text`), made aware."""
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc)


def _write_requests(cur: Any, rows: list[tuple[Any, ...]]) -> tuple[int, datetime | None]:
    """Live requests as raw rows, late ones staged and rolled up; returns how many were new
    and the seal instant they were written under. ``rows`` are id-unique raw rows."""
    instants = read_instants(cur)
    instant = months = None
    if instants is None:
        late, live = rows, []
    else:
        instant, months = instants
        # fixed-width UTC text orders as the instants do
        cut = utc_text(instant)
        late = [row for row in rows if row[9] < cut]
        live = [row for row in rows if row[9] >= cut] if late else rows
    written = 0
    if late:
        cur.execute("DELETE FROM temp.um_stage_requests")
        insert_rows(
            cur, "INSERT INTO temp.um_stage_requests", [_staged_row(r) for r in late], "",
            _STAGED_REQUEST_MARKS,
        )  # fmt: skip
        for statement in _REQUEST_STATEMENTS:
            cur.execute(statement)
        written += cur.rowcount
        roll_up_requests(cur, months_before=None if months is None else utc_text(months))
        cur.execute("DELETE FROM temp.um_stage_requests")
    if live:
        # in id order, so neighbouring ids fill the same index pages: the rows' fixed-width hex
        # ids sort as the UUIDs do, compared in C rather than by UUID.__lt__
        live.sort(key=itemgetter(0))
        written += insert_rows(
            cur, _INSERT_LIVE, live, "ON CONFLICT (id) DO NOTHING", _REQUEST_MARKS
        )
    return written, instant


def sqlite_write(
    conn: Connection,
    uploads: Sequence[UploadRecord],
    requests: Sequence[RequestRecord],
    packed: PackedRows,
) -> tuple[int, datetime | None]:
    """Write validated, id-unique records and ``packed`` rows inside ``conn``'s open write
    transaction; returns how many rows were new and the seal instant (None: no requests, or no
    sealing)."""
    dbapi: Any = conn.connection.dbapi_connection
    cur = dbapi.cursor()
    written = 0
    instant = None
    try:
        for statement in _CREATE_STAGING:
            cur.execute(statement)
        if uploads or packed.uploads:
            cur.execute("DELETE FROM temp.um_stage_uploads")
            values = upload_value_rows(uploads, packed.uploads)
            insert_rows(
                cur, "INSERT INTO temp.um_stage_uploads", _packed_upload_rows(values), "",
                _UPLOAD_MARKS,
            )  # fmt: skip
            for statement in _UPLOAD_STATEMENTS:
                cur.execute(statement)
            written += cur.rowcount
            for statement in _UPLOAD_ROLLUPS:
                cur.execute(statement)
            cur.execute("DELETE FROM temp.um_stage_uploads")
        if requests or packed.requests:
            rows = _packed_rows(request_value_rows(requests, packed.requests))
            added, instant = _write_requests(cur, rows)
            written += added
    finally:
        cur.close()
    return written, instant
