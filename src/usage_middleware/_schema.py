"""Table definitions shared by the writer and the read path, plus the latency sketch.

PostgreSQL gets its schema from the SQL files in ``sql/`` (the same files Supabase users run);
SQLite gets the equivalent built from the SQLAlchemy tables below. Queries on both dialects are
written against these ``Table`` objects.

Tables:

* ``file_uploads``, ``api_requests`` — raw rows (public).
* ``daily_usage`` — exact rollup of ``file_uploads`` by UTC date, key, provider and type (public).
* ``hourly_usage`` — the same by UTC hour; lets local-time-zone days be answered from rollups.
* ``quarter_usage`` — the same by UTC quarter hour (``usage_quarter`` at :00/:15/:30/:45): the
  sub-hour edges of :30/:45 offset zones, so no answer needs raw rows (they can be pruned).
* ``monthly_request_usage`` / ``daily_request_usage`` / ``hourly_request_usage`` —
  ``api_requests`` rolled up by UTC month, day or hour, key and latency bucket (a mergeable log
  histogram, see :func:`latency_bucket`), so p95 over a year is a sum over a few thousand rows
  instead of a sort over millions. ``usage_month`` is the first day of the UTC month.
* ``quarter_request_usage`` — the same by UTC quarter hour.
* ``quarter_mismatch_usage`` — uploads whose declared type differs from the detected one, by
  UTC quarter hour, key, provider, type and declared type (sparse: only mismatches).
* ``usage_retention`` — how far back raw rows are complete once retention pruned some.

Rollup rows with no API key use NULL; their uniqueness treats NULLs as equal
(``NULLS NOT DISTINCT`` on PostgreSQL, an ``ifnull`` expression index on SQLite).
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Date,
    DateTime,
    Double,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    Table,
    Text,
    Uuid,
    func,
    literal_column,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator

UTC = timezone.utc


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in and out, on every dialect (SQLite stores naive UTC text)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime passed to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)  # type: ignore[no-any-return]
        return value.astimezone(UTC)  # type: ignore[no-any-return]


metadata = MetaData()


def _counters() -> list[Column[Any]]:
    return [
        Column("total_uploads", BigInteger, nullable=False, server_default="0"),
        Column("total_file_size", BigInteger, nullable=False, server_default="0"),
        Column("successful_requests", BigInteger, nullable=False, server_default="0"),
        Column("failed_requests", BigInteger, nullable=False, server_default="0"),
    ]


def _request_counters() -> list[Column[Any]]:
    return [
        Column("latency_bucket", SmallInteger, nullable=False),
        Column("total_requests", BigInteger, nullable=False, server_default="0"),
        Column("error_requests", BigInteger, nullable=False, server_default="0"),
        Column("total_response_us", BigInteger, nullable=False, server_default="0"),
        Column("total_request_bytes", BigInteger, nullable=False, server_default="0"),
        Column("total_response_bytes", BigInteger, nullable=False, server_default="0"),
    ]


file_uploads = Table(
    "file_uploads",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("api_key_id", Uuid, nullable=True),
    Column("request_id", Uuid, nullable=True),
    Column("provider", Text, nullable=False),
    Column("file_type", Text, nullable=False),
    Column("declared_type", Text, nullable=True),
    Column("file_size", BigInteger, nullable=False),
    Column("file_name", Text, nullable=True),
    Column("upload_status", Text, nullable=False),
    Column("error_message", Text, nullable=True),
    Column("uploaded_at", UTCDateTime, nullable=False),
)
Index("idx_file_uploads_key_time", file_uploads.c.api_key_id, file_uploads.c.uploaded_at)
Index("idx_file_uploads_time", file_uploads.c.uploaded_at)

api_requests = Table(
    "api_requests",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("api_key_id", Uuid, nullable=True),
    Column("method", Text, nullable=False),
    Column("path", Text, nullable=False),
    Column("status_code", Integer, nullable=False),
    Column("response_time_ms", Double, nullable=False),
    Column("request_size", BigInteger, nullable=False),
    Column("response_size", BigInteger, nullable=False),
    Column("error_message", Text, nullable=True),
    Column("requested_at", UTCDateTime, nullable=False),
    # False when no route matched and ``path`` is the raw path (rollups label it "(unmatched)")
    Column("route_matched", Boolean, nullable=False, server_default=literal_column("1")),
)
# One index, time first: on SQLite a live request is one raw row, and an index led by the key
# (PostgreSQL's ``(api_key_id, requested_at)``) is inserted into at one place per key in every
# batch, which cost the writer more than half of what it spends on a row. Reads of one key
# filter on the index's second column over short ranges; ``last_seen`` narrows its ranges with
# the quarter-hour rollup first (``_storage.sqlseen``).
REQUEST_TIME_INDEX = Index(
    "idx_api_requests_time_key", api_requests.c.requested_at, api_requests.c.api_key_id
)

daily_usage = Table(
    "daily_usage",
    metadata,
    Column("usage_date", Date, nullable=False),
    Column("api_key_id", Uuid, nullable=True),
    Column("provider", Text, nullable=False),
    Column("file_type", Text, nullable=False),
    *_counters(),
)
hourly_usage = Table(
    "hourly_usage",
    metadata,
    Column("usage_hour", UTCDateTime, nullable=False),
    Column("api_key_id", Uuid, nullable=True),
    Column("provider", Text, nullable=False),
    Column("file_type", Text, nullable=False),
    *_counters(),
)
daily_request_usage = Table(
    "daily_request_usage",
    metadata,
    Column("usage_date", Date, nullable=False),
    Column("api_key_id", Uuid, nullable=True),
    *_request_counters(),
)
monthly_request_usage = Table(
    "monthly_request_usage",
    metadata,
    Column("usage_month", Date, nullable=False),
    Column("api_key_id", Uuid, nullable=True),
    *_request_counters(),
)
hourly_request_usage = Table(
    "hourly_request_usage",
    metadata,
    Column("usage_hour", UTCDateTime, nullable=False),
    Column("api_key_id", Uuid, nullable=True),
    *_request_counters(),
)
quarter_usage = Table(
    "quarter_usage",
    metadata,
    Column("usage_quarter", UTCDateTime, nullable=False),
    Column("api_key_id", Uuid, nullable=True),
    Column("provider", Text, nullable=False),
    Column("file_type", Text, nullable=False),
    *_counters(),
)
quarter_request_usage = Table(
    "quarter_request_usage",
    metadata,
    Column("usage_quarter", UTCDateTime, nullable=False),
    Column("api_key_id", Uuid, nullable=True),
    *_request_counters(),
)

# Uploads whose declared type differs from the detected one, by UTC quarter hour, key, provider,
# type and declared type: a sparse exact rollup (rows only where a mismatch happened), so
# ``type_mismatches`` is answered the same after raw rows are pruned. Reads sum the quarters of
# a range; only edges off the quarter-hour grid come from raw rows.
quarter_mismatch_usage = Table(
    "quarter_mismatch_usage",
    metadata,
    Column("usage_quarter", UTCDateTime, nullable=False),
    Column("api_key_id", Uuid, nullable=True),
    Column("provider", Text, nullable=False),
    Column("file_type", Text, nullable=False),
    Column("declared_type", Text, nullable=False),
    Column("total_uploads", BigInteger, nullable=False, server_default="0"),
)



def _endpoint_columns() -> list[Column[Any]]:
    return [
        Column("api_key_id", Uuid, nullable=True),
        Column("method", Text, nullable=False),
        Column("route", Text, nullable=False),
        Column("status_code", SmallInteger, nullable=False),
        Column("latency_bucket", SmallInteger, nullable=False),
        Column("total_requests", BigInteger, nullable=False, server_default="0"),
        Column("total_response_us", BigInteger, nullable=False, server_default="0"),
        Column("total_request_bytes", BigInteger, nullable=False, server_default="0"),
        Column("total_response_bytes", BigInteger, nullable=False, server_default="0"),
    ]


# ``api_requests`` by UTC month, day or quarter hour, key, endpoint (method and route labels,
# see :func:`endpoint_method` / :func:`endpoint_route`), status code and coarse latency bucket
# (:func:`endpoint_bucket`): what ``GET /requests`` answers from. Errors are the rows with
# status_code >= 400. Hours are read as four quarter hours, so there is no hourly tier.
monthly_endpoint_usage = Table(
    "monthly_endpoint_usage",
    metadata,
    Column("usage_month", Date, nullable=False),
    *_endpoint_columns(),
)
daily_endpoint_usage = Table(
    "daily_endpoint_usage",
    metadata,
    Column("usage_date", Date, nullable=False),
    *_endpoint_columns(),
)
quarter_endpoint_usage = Table(
    "quarter_endpoint_usage",
    metadata,
    Column("usage_quarter", UTCDateTime, nullable=False),
    *_endpoint_columns(),
)
# The named routes each key has on each UTC day (at most ROUTES_PER_KEY_DAY): the route cap's
# memory. A route that is not here once the day is full is rolled up as "(other)".
endpoint_routes = Table(
    "endpoint_routes",
    metadata,
    Column("api_key_id", Uuid, nullable=True),
    Column("usage_date", Date, nullable=False),
    Column("route", Text, nullable=False),
)

# Newest-first keyset reads of failures (``GET /failures``): partial indexes holding only the
# failed rows, per key and for every key. PostgreSQL's twins are in the schema file.
# Literals, not parameters: a planner can use a partial index only for a query whose condition
# visibly implies the index's (a prepared statement's generic plan knows no parameter values).
FAILED_UPLOAD = file_uploads.c.upload_status == literal_column("'failed'")
FAILED_REQUEST = (api_requests.c.status_code >= literal_column("400")) | (
    api_requests.c.error_message.isnot(None)
)
FAILURE_INDEXES = (
    Index(
        "idx_file_uploads_failed_key_time",
        file_uploads.c.api_key_id,
        file_uploads.c.uploaded_at.desc(),
        file_uploads.c.id.desc(),
        sqlite_where=FAILED_UPLOAD,
    ),
    Index(
        "idx_file_uploads_failed_time",
        file_uploads.c.uploaded_at.desc(),
        file_uploads.c.id.desc(),
        sqlite_where=FAILED_UPLOAD,
    ),
    Index(
        "idx_api_requests_failed_key_time",
        api_requests.c.api_key_id,
        api_requests.c.requested_at.desc(),
        api_requests.c.id.desc(),
        sqlite_where=FAILED_REQUEST,
    ),
    Index(
        "idx_api_requests_failed_time",
        api_requests.c.requested_at.desc(),
        api_requests.c.id.desc(),
        sqlite_where=FAILED_REQUEST,
    ),
)

# Per raw table, the instant from which its raw rows are complete (retention removed none at or
# after it); no row: none was ever removed. Written by ``_maintain``; the rollups are never pruned.
usage_retention = Table(
    "usage_retention",
    metadata,
    Column("table_name", Text, primary_key=True),
    Column("raw_complete_from", UTCDateTime, nullable=False),
)

# Rollup identity: the columns an upsert conflicts on, in lock order (sort keys the same way).
ROLLUP_KEYS: dict[str, tuple[str, ...]] = {
    "daily_usage": ("api_key_id", "usage_date", "provider", "file_type"),
    "hourly_usage": ("api_key_id", "usage_hour", "provider", "file_type"),
    "monthly_request_usage": ("api_key_id", "usage_month", "latency_bucket"),
    "daily_request_usage": ("api_key_id", "usage_date", "latency_bucket"),
    "hourly_request_usage": ("api_key_id", "usage_hour", "latency_bucket"),
    "quarter_usage": ("api_key_id", "usage_quarter", "provider", "file_type"),
    "quarter_request_usage": ("api_key_id", "usage_quarter", "latency_bucket"),
    "quarter_mismatch_usage": (
        "api_key_id",
        "usage_quarter",
        "provider",
        "file_type",
        "declared_type",
    ),
    "monthly_endpoint_usage": (
        "api_key_id", "usage_month", "method", "route", "status_code", "latency_bucket",
    ),
    "daily_endpoint_usage": (
        "api_key_id", "usage_date", "method", "route", "status_code", "latency_bucket",
    ),
    "quarter_endpoint_usage": (
        "api_key_id", "usage_quarter", "method", "route", "status_code", "latency_bucket",
    ),
    "endpoint_routes": ("api_key_id", "usage_date", "route"),
}

# Unique indexes. PostgreSQL's live in sql/usage_tracking_schema.sql (NULLS NOT DISTINCT);
# these SQLite twins fold NULL keys with ifnull() so that upserts find them.
for _table in (
    daily_usage,
    hourly_usage,
    monthly_request_usage,
    daily_request_usage,
    hourly_request_usage,
    quarter_usage,
    quarter_request_usage,
    quarter_mismatch_usage,
    monthly_endpoint_usage,
    daily_endpoint_usage,
    quarter_endpoint_usage,
    endpoint_routes,
):
    _keys = ROLLUP_KEYS[_table.name]
    Index(
        f"uq_{_table.name}",
        func.ifnull(_table.c.api_key_id, literal_column("''")),
        *(_table.c[name] for name in _keys[1:]),
        unique=True,
    )
    Index(f"idx_{_table.name}_{_keys[1]}", _table.c[_keys[1]])

ALL_TABLES = (
    "file_uploads",
    "api_requests",
    "daily_usage",
    "hourly_usage",
    "monthly_request_usage",
    "daily_request_usage",
    "hourly_request_usage",
    "quarter_usage",
    "quarter_request_usage",
    "quarter_mismatch_usage",
    "monthly_endpoint_usage",
    "daily_endpoint_usage",
    "quarter_endpoint_usage",
    "endpoint_routes",
)

# --- latency sketch -------------------------------------------------------------------------
# A DDSketch-style log histogram: bucket i holds values in (MIN * G**(i-1), MIN * G**i].
# Reporting a bucket by LATENCY_REPRESENTATIVE(i) is within LATENCY_RELATIVE_ERROR of any value
# in it, and buckets from different hours/days/processes merge by adding counts.
LATENCY_RELATIVE_ERROR = 0.02
_GAMMA = (1 + LATENCY_RELATIVE_ERROR) / (1 - LATENCY_RELATIVE_ERROR)
_LOG_GAMMA = math.log(_GAMMA)
_MIN_MS = 0.001  # 1 µs; anything faster shares bucket 0
_MAX_BUCKET = 32767


def latency_bucket(ms: float) -> int:
    """Histogram bucket of a response time in milliseconds."""
    if ms <= _MIN_MS:
        return 0
    return min(_MAX_BUCKET, math.ceil(math.log(ms / _MIN_MS) / _LOG_GAMMA))


def latency_bucket_start(bucket: int) -> float:
    """The least float :func:`latency_bucket` puts in ``bucket`` (``>= 1``) or above: the
    analytic bound, stepped float by float until the function agrees, so that a table of these
    answers as the function does (the SQLite statements bucket raw rows so)."""
    low = _MIN_MS * _GAMMA ** (bucket - 1)
    while latency_bucket(low) >= bucket:
        low = math.nextafter(low, -math.inf)
    while latency_bucket(low) < bucket:
        low = math.nextafter(low, math.inf)
    return low


def latency_representative(bucket: int) -> float:
    """A value within ``LATENCY_RELATIVE_ERROR`` of every value in ``bucket`` (ms)."""
    if bucket <= 0:
        return _MIN_MS
    return 2 * _MIN_MS * _GAMMA**bucket / (_GAMMA + 1)


# Endpoint rollups use a coarser sketch: ENDPOINT_BUCKET_WIDTH consecutive buckets as one, so a
# key-day of thirty routes holds a few thousand rows, not tens of thousands.
ENDPOINT_BUCKET_WIDTH = 5
_ENDPOINT_GAMMA = _GAMMA**ENDPOINT_BUCKET_WIDTH
#: Every percentile ``GET /requests`` reports is within this of the exact value (9.96 %).
ENDPOINT_RELATIVE_ERROR = (_ENDPOINT_GAMMA - 1) / (_ENDPOINT_GAMMA + 1)


def endpoint_bucket(ms: float) -> int:
    """Coarse histogram bucket of a response time: fine buckets ``5c-4 .. 5c`` are bucket c."""
    return -(-latency_bucket(ms) // ENDPOINT_BUCKET_WIDTH)


def endpoint_representative(bucket: int) -> float:
    """A value within ``ENDPOINT_RELATIVE_ERROR`` of every value in coarse ``bucket`` (ms)."""
    if bucket <= 0:
        return _MIN_MS
    hi = _MIN_MS * _GAMMA ** (bucket * ENDPOINT_BUCKET_WIDTH)
    lo = hi / _ENDPOINT_GAMMA
    return 2 * lo * hi / (lo + hi)


# --- endpoint labels: bounded cardinality by design -----------------------------------------
STANDARD_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"}
)
#: The method label of every request whose method is not in ``STANDARD_METHODS``.
OTHER_METHOD = "OTHER"
#: The route label of every request whose path matched no route of the application.
UNMATCHED_ROUTE = "(unmatched)"
#: The route label of named routes past a key's daily cap.
OTHER_ROUTE = "(other)"
#: Distinct named routes one key keeps per UTC day in the endpoint rollups; later new routes of
#: that key and day are rolled up as ``(other)`` (counted, never dropped). Which routes keep
#: their name on a day past the cap depends on the order rows were written in.
ROUTES_PER_KEY_DAY = 200


def endpoint_method(method: str) -> str:
    """The method label rollups group a request under."""
    return method if method in STANDARD_METHODS else OTHER_METHOD


def endpoint_route(path: str, route_matched: bool) -> str:
    """The route label before the daily cap: the template, or ``(unmatched)``."""
    return path if route_matched else UNMATCHED_ROUTE
