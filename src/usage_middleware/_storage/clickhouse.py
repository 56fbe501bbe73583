"""The ClickHouse backend: a ClickHouse server (``clickhouse://``) or chdb in-process (``chdb://``).

The statements are the same for both; :mod:`.chclient` hides the difference.

Why every answer is exact (each ``id`` counted once, whatever was replayed):

* Raw rows only, no materialised-view counters. ``file_uploads`` and ``api_requests`` are
  ``ReplacingMergeTree`` tables ordered by ``(api_key_id, time, id)``. A record is immutable by
  id, so every copy of an id — a retried batch, a spool replay that regrouped records, two
  writers racing — has the same whole sorting key, and a read with ``FINAL`` sees each id once
  whatever merges have or have not happened. The version column ``first_seen`` keeps the
  *earliest inserted* copy, so the ``inserted_at`` a read sees for an id never changes once it
  is visible (a later copy cannot replace it).
* Answers are computed in the engine from raw rows, per quarter hour, and mapped to the periods
  by their UTC bounds (every zone's local midnight and hour is on a UTC quarter hour).
* A sealed tier, for speed and for raw retention. :meth:`ClickHouseBackend.maintain` aggregates
  whole UTC days older than ``settle_days`` into quarter-hour rollups (``upload_quarters``,
  ``request_quarters``) and, from those, day rollups (``upload_days``, ``request_days``: read for
  the days no period bound cuts) under a *seal*: ``(day, version, watermark)`` in ``usage_seals``. A
  seal of a day holds exactly the day's ids whose first copy was inserted at or before its watermark
  (raw ``FINAL``, ``inserted_at <= watermark``); a read takes the day's rows of its newest seal from
  the rollups plus, from raw, the ids first inserted after the watermark. Each id is in exactly one
  of the two, so a record arriving for a sealed day counts at once, and the next ``maintain`` folds
  it in: a new seal = the previous seal's rows + the raw ids in ``(old watermark, new watermark]``,
  written under a new version, the seal row last. A reader only uses rollup rows of the version its
  seal row names, so a half-written seal is never read, and superseded versions are deleted an hour
  after their successor.
* The watermark is the server's ``now64() - visibility_margin``: rows stamped earlier are
  visible by the time the seal reads them (an INSERT taking longer than the margin, 5 minutes by
  default, between stamping and commit is the one way to break this).
* Raw retention (``raw_retention_days``): a TTL on ``greatest(time, inserted_at)``, at least
  ``settle_days + 2`` days, so a row is dropped only long after a ``maintain`` folded it into a
  seal, and no answer changes when it goes. ``maintain`` runs on ``create_schema`` and from the
  write path at most every ``maintain_interval`` seconds. The case that cannot be exact: raw
  rows that the TTL drops before any ``maintain`` sealed them (no ``maintain`` ran for
  ``raw_retention_days - settle_days`` days) are gone from every answer.

Write counts: a write first selects which of its ids are stored (by key, time range and id,
through the primary key) and inserts only the others, one INSERT per table with an
``insert_deduplication_token`` hashed from the sorted ids. The returned count of new rows is
exact for one writer and may over-count under concurrent writers inserting the same ids at
once; the answers stay exact (``FINAL``).

On a cluster (``create_schema(cluster=...)``), see docs/clickhouse.md.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from datetime import date, datetime, timedelta, timezone
from typing import Any

from sqlalchemy.engine import URL

from .._errors import ConfigurationError, DatabaseUnavailableError, ReadTimeoutError
from .._records import RequestRecord, UploadRecord
from .._schema import latency_bucket
from .base import Failure, FailureKey, Histogram, MaintainResult, Scope, UploadRow
from .chclient import Client, EmbeddedClient, HTTPClient
from .legacy import LegacySource, MigrationResult
from .memory import MemoryBackend

__all__ = ["ClickHouseBackend", "schema_statements"]

UTC = timezone.utc
NIL = uuid.UUID(int=0)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MAX_DAY = date(2299, 12, 31)
_SEAL_CACHE_SECONDS = 60.0
_SCHEMA_TABLES = ("file_uploads", "api_requests", "upload_quarters", "request_quarters",
                  "upload_days", "request_days", "usage_seals")  # fmt: skip
_ROLLUPS = ("upload_quarters", "request_quarters", "upload_days", "request_days")

UPLOAD_COLUMNS = (
    "id", "api_key_id", "has_key", "request_id", "provider", "file_type", "declared_type",
    "file_size", "upload_status", "file_name", "error_message", "uploaded_at",
)  # fmt: skip
REQUEST_COLUMNS = (
    "id", "api_key_id", "has_key", "method", "path", "status_code", "response_time_ms",
    "response_us", "latency_bucket", "request_size", "response_size", "error_message",
    "requested_at",
)  # fmt: skip

_RAW_TAIL = """
    inserted_at DateTime64(6, 'UTC') DEFAULT now64(6),
    first_seen UInt64 DEFAULT 18446744073709551615 - toUnixTimestamp64Micro(inserted_at),
    INDEX inserted inserted_at TYPE minmax GRANULARITY 1"""

_TABLES: dict[str, tuple[str, str, str, str]] = {
    # name: (columns, engine version column, partition key, order key)
    "file_uploads": (
        """
    id UUID,
    api_key_id UUID,
    has_key Bool,
    request_id Nullable(UUID),
    provider LowCardinality(String),
    file_type LowCardinality(String),
    declared_type Nullable(String),
    file_size UInt64,
    upload_status Enum8('success' = 1, 'failed' = 2),
    file_name Nullable(String),
    error_message Nullable(String),
    uploaded_at DateTime64(6, 'UTC'),"""
        + _RAW_TAIL,
        "first_seen",
        "toYYYYMM(uploaded_at)",
        "(api_key_id, uploaded_at, id)",
    ),
    "api_requests": (
        """
    id UUID,
    api_key_id UUID,
    has_key Bool,
    method LowCardinality(String),
    path String,
    status_code UInt16,
    response_time_ms Float64,
    response_us UInt64,
    latency_bucket UInt16,
    request_size UInt64,
    response_size UInt64,
    error_message Nullable(String),
    requested_at DateTime64(6, 'UTC'),"""
        + _RAW_TAIL,
        "first_seen",
        "toYYYYMM(requested_at)",
        "(api_key_id, requested_at, id)",
    ),
    "upload_quarters": (
        """
    day Date,
    version DateTime64(6, 'UTC'),
    api_key_id UUID,
    has_key Bool,
    quarter DateTime('UTC'),
    provider LowCardinality(String),
    file_type LowCardinality(String),
    uploads UInt64,
    bytes UInt64,
    successful UInt64,
    failed UInt64""",
        "",
        "toYYYYMM(day)",
        "(api_key_id, has_key, day, version, quarter, provider, file_type)",
    ),
    "request_quarters": (
        """
    day Date,
    version DateTime64(6, 'UTC'),
    api_key_id UUID,
    has_key Bool,
    quarter DateTime('UTC'),
    bucket UInt16,
    requests UInt64,
    errors UInt64,
    response_us UInt64""",
        "",
        "toYYYYMM(day)",
        "(api_key_id, has_key, day, version, quarter, bucket)",
    ),
    "upload_days": (
        """
    day Date,
    version DateTime64(6, 'UTC'),
    api_key_id UUID,
    has_key Bool,
    provider LowCardinality(String),
    file_type LowCardinality(String),
    uploads UInt64,
    bytes UInt64,
    successful UInt64,
    failed UInt64""",
        "",
        "toYYYYMM(day)",
        "(api_key_id, has_key, day, version, provider, file_type)",
    ),
    "request_days": (
        """
    day Date,
    version DateTime64(6, 'UTC'),
    api_key_id UUID,
    has_key Bool,
    bucket UInt16,
    requests UInt64,
    errors UInt64,
    response_us UInt64""",
        "",
        "toYYYYMM(day)",
        "(api_key_id, has_key, day, version, bucket)",
    ),
    "usage_seals": (
        """
    day Date,
    version DateTime64(6, 'UTC'),
    watermark DateTime64(6, 'UTC')""",
        "version",
        "tuple()",
        "day",
    ),
}
_RAW_TIME = {"file_uploads": "uploaded_at", "api_requests": "requested_at"}


def _ttl(table: str, days: int | None) -> str:
    if days is None or table not in _RAW_TIME:
        return ""
    t = _RAW_TIME[table]
    return f"\nTTL toDateTime(greatest({t}, inserted_at)) + INTERVAL {int(days)} DAY"


def schema_statements(
    database: str, *, cluster: str | None = None, raw_retention_days: int | None = None
) -> list[str]:
    """The DDL of the usage tables.

    Without ``cluster``: (Replacing)MergeTree tables. With ``cluster``: per table a local
    ``<name>_local`` ``Replicated…MergeTree`` ``ON CLUSTER`` and a ``Distributed`` table with the
    plain name sharded by ``cityHash64(api_key_id)`` (one key's rows on one shard, so ``FINAL``,
    which works per shard, still sees every copy of an id); ``usage_seals`` is replicated to every
    node whole (it is tiny and every shard's reads need it).
    """
    db = f"`{database}`."
    out = []
    for name, (columns, version, partition, order) in _TABLES.items():
        kind = "ReplacingMergeTree" if version else "MergeTree"
        ttl = _ttl(name, raw_retention_days)
        # quarter rows are read for the scattered days a period bound cuts: small granules
        fine = ", index_granularity = 1024" if name.endswith("_quarters") else ""
        if cluster is None:
            engine = f"{kind}({version})"
            settings = f"\nSETTINGS non_replicated_deduplication_window = 1000{fine}"
            out.append(
                f"CREATE TABLE IF NOT EXISTS {db}{name} ({columns}\n)\nENGINE = {engine}\n"
                f"PARTITION BY {partition}\nORDER BY {order}{ttl}{settings}"
            )
            continue
        on = f" ON CLUSTER `{cluster}`"
        shard = "all" if name == "usage_seals" else "{shard}"
        path = f"'/clickhouse/tables/{shard}/{{database}}/{name}', '{{replica}}'"
        args = f"{path}, {version}" if version else path
        local = name if name == "usage_seals" else f"{name}_local"
        out.append(
            f"CREATE TABLE IF NOT EXISTS {db}{local}{on} ({columns}\n)\n"
            f"ENGINE = Replicated{kind}({args})\nPARTITION BY {partition}\nORDER BY {order}{ttl}"
            + (f"\nSETTINGS {fine[2:]}" if fine else "")
        )
        if name != "usage_seals":
            out.append(
                f"CREATE TABLE IF NOT EXISTS {db}{name}{on} AS {db}{local}\n"
                f"ENGINE = Distributed(`{cluster}`, `{database}`, {local}, cityHash64(api_key_id))"
            )
    return out


def _micros(t: datetime) -> int:
    """An aware instant as integer microseconds since the epoch (exact, no float)."""
    return (t - _EPOCH) // timedelta(microseconds=1)


def _aligned(t: datetime) -> bool:
    return t.second == 0 and t.microsecond == 0 and t.minute % 15 == 0


def _token(kind: str, ids: Iterable[uuid.UUID]) -> str:
    digest = hashlib.sha256(kind.encode())
    for i in sorted(ids):
        digest.update(i.bytes)
    return digest.hexdigest()


class _Seals:
    """The newest seal of each day in a range: days, versions and watermarks (microseconds)."""

    __slots__ = ("days", "first", "last", "min_watermark", "versions", "watermarks")

    def __init__(self, rows: list[tuple[Any, ...]]) -> None:
        self.days = [date.fromisoformat(str(r[0])) for r in rows]
        self.versions = [int(r[1]) for r in rows]
        self.watermarks = [int(r[2]) for r in rows]
        self.first = min(self.days) if self.days else None
        self.last = max(self.days) if self.days else None
        self.min_watermark = min(self.watermarks) if self.watermarks else 0

    def version_condition(self, params: dict[str, Any]) -> str:
        """Which rollup rows belong to the newest seals: per run of consecutive days sealed
        under one version, a range test (cheap, and the primary key prunes with it), or a
        per-day lookup when the seals are too fragmented."""
        runs: list[list[Any]] = []
        for d, v in zip(self.days, self.versions, strict=True):
            if runs and runs[-1][2] == v and runs[-1][1] + timedelta(days=1) == d:
                runs[-1][1] = d
            else:
                runs.append([d, d, v])
        if not runs:
            return "0"
        if len(runs) > _MAX_SEAL_RUNS:
            return (
                "toUnixTimestamp64Micro(version) = transform(day, {seal_days:Array(Date)}, "
                "{seal_versions:Array(Int64)}, toInt64(0))"
            )
        tests = []
        for i, (lo, hi, v) in enumerate(runs):
            params.update({f"run{i}_lo": lo, f"run{i}_hi": hi, f"run{i}_v": v})
            tests.append(
                f"(day >= {{run{i}_lo:Date}} AND day <= {{run{i}_hi:Date}} AND "
                f"version = fromUnixTimestamp64Micro({{run{i}_v:Int64}}, 'UTC'))"
            )
        return "(" + " OR ".join(tests) + ")"

    def params(self) -> dict[str, Any]:
        """The parameters the read statements take the seals from."""
        first = self.first or date(1970, 1, 1)
        end = self.last + timedelta(days=1) if self.last else first
        return {
            "seal_days": self.days,
            "seal_versions": self.versions,
            "seal_watermarks": self.watermarks,
            "sealed_from": _micros(datetime(first.year, first.month, first.day, tzinfo=UTC)),
            "sealed_to": _micros(datetime(end.year, end.month, end.day, tzinfo=UTC)),
            "min_watermark": self.min_watermark,
        }


# Seals of the days of a range: the newest version of each day.
_SEALS_SQL = """
SELECT toString(day), toUnixTimestamp64Micro(max(version)),
       toUnixTimestamp64Micro(argMax(watermark, version))
FROM usage_seals
WHERE day >= {lo:Date} AND day <= {hi:Date}
GROUP BY day
ORDER BY day
"""

# The read statements are a UNION ALL of four parts, each row counted in exactly one:
# sealed days that lie whole inside one period (day rollup), the other sealed days (quarter
# rollup, cut at the bounds), raw rows of unsealed days, and raw rows of sealed days first
# inserted after their seal's watermark. The raw parts are split so that the primary key prunes
# the first and the minmax index on inserted_at the second (FINAL stays exact: every copy of an
# id has the same time, so it falls in the same part).
_SEALED_VERSION = """
    AND @SEALED_VERSION@"""
# More runs of days than this and a read checks versions per day with transform() instead.
_MAX_SEAL_RUNS = 16
_DAYS_PART = (
    """
    AND day >= {whole_lo:Date} AND day <= {whole_hi:Date}
    AND NOT has({split_days:Array(Date)}, day)"""
    + _SEALED_VERSION
)
_QUARTERS_PART = (
    """
    AND day >= toDate(fromUnixTimestamp64Micro({start:Int64}, 'UTC'))
    AND day <= toDate(fromUnixTimestamp64Micro({end:Int64}, 'UTC'))
    AND (day IN {split_days:Array(Date)} OR day < {whole_lo:Date} OR day > {whole_hi:Date})
    AND quarter >= fromUnixTimestamp64Micro({start:Int64}, 'UTC')
    AND quarter < fromUnixTimestamp64Micro({end:Int64}, 'UTC')"""
    + _SEALED_VERSION
)
_UNSEALED_PART = """
    AND {t} >= fromUnixTimestamp64Micro({{start:Int64}}, 'UTC')
    AND {t} < fromUnixTimestamp64Micro({{end:Int64}}, 'UTC')
    AND ({t} < fromUnixTimestamp64Micro({{sealed_from:Int64}}, 'UTC')
         OR {t} >= fromUnixTimestamp64Micro({{sealed_to:Int64}}, 'UTC'))"""
_LATE_PART = """
    AND {t} >= fromUnixTimestamp64Micro(greatest({{start:Int64}}, {{sealed_from:Int64}}), 'UTC')
    AND {t} < fromUnixTimestamp64Micro(least({{end:Int64}}, {{sealed_to:Int64}}), 'UTC')
    AND inserted_at > fromUnixTimestamp64Micro({{min_watermark:Int64}}, 'UTC')
    AND toUnixTimestamp64Micro(inserted_at) > transform(toDate({t}), {{seal_days:Array(Date)}},
        {{seal_watermarks:Array(Int64)}}, toInt64(0))"""

_READ_SETTINGS = """
SETTINGS use_skip_indexes_if_final = 1, use_skip_indexes_if_final_exact_mode = 1{timeout}"""

_UPLOADS_RAW = """
    SELECT {bucket} AS t, provider, file_type,
           count() AS u, sum(file_size) AS b, countIf(upload_status = 'success') AS s,
           countIf(upload_status = 'failed') AS f
    FROM file_uploads FINAL
    WHERE {keys}{filters}{part}
    GROUP BY t, provider, file_type"""

_UPLOADS_SQL = """
SELECT arrayCount(x -> x <= t, {{bounds:Array(Int64)}}) - 1 AS period, provider, file_type,
       sum(u), sum(b), sum(s), sum(f)
FROM (
    SELECT toUnixTimestamp(toDateTime(day, 'UTC')) * 1000000 AS t, provider, file_type,
           uploads AS u, bytes AS b, successful AS s, failed AS f
    FROM upload_days
    WHERE {keys}{filters}{days_part}
    UNION ALL
    SELECT toUnixTimestamp(quarter) * 1000000 AS t, provider, file_type,
           uploads AS u, bytes AS b, successful AS s, failed AS f
    FROM upload_quarters
    WHERE {keys}{filters}{quarters_part}
    UNION ALL{unsealed}
    UNION ALL{late}
)
GROUP BY period, provider, file_type{settings}
"""

_REQUESTS_RAW = """
    SELECT latency_bucket AS bucket, count() AS n, countIf(status_code >= 400) AS e,
           sum(response_us) AS us
    FROM api_requests FINAL
    WHERE {keys}{part}
    GROUP BY bucket"""

_REQUESTS_SQL = """
SELECT bucket, sum(n), sum(e), sum(us)
FROM (
    SELECT bucket, requests AS n, errors AS e, response_us AS us
    FROM request_days
    WHERE {keys}{days_part}
    UNION ALL
    SELECT bucket, requests AS n, errors AS e, response_us AS us
    FROM request_quarters
    WHERE {keys}{quarters_part}
    UNION ALL{unsealed}
    UNION ALL{late}
)
GROUP BY bucket{settings}
"""

# maintain(): days below the horizon with raw ids first inserted after their seal's watermark
# (every day with rows, the first time) and not after the new watermark.
_LATE_DAYS_SQL = """
SELECT DISTINCT toString(toDate({t}))
FROM {table}
WHERE {t} < fromUnixTimestamp64Micro({{horizon:Int64}}, 'UTC')
  AND ({t} < fromUnixTimestamp64Micro({{sealed_from:Int64}}, 'UTC')
       OR {t} >= fromUnixTimestamp64Micro({{sealed_to:Int64}}, 'UTC'))
  AND inserted_at <= fromUnixTimestamp64Micro({{watermark:Int64}}, 'UTC')
UNION DISTINCT
SELECT DISTINCT toString(toDate({t}))
FROM {table}
WHERE {t} < fromUnixTimestamp64Micro({{horizon:Int64}}, 'UTC')
  AND {t} >= fromUnixTimestamp64Micro({{sealed_from:Int64}}, 'UTC')
  AND {t} < fromUnixTimestamp64Micro({{sealed_to:Int64}}, 'UTC')
  AND inserted_at > fromUnixTimestamp64Micro({{min_watermark:Int64}}, 'UTC')
  AND inserted_at <= fromUnixTimestamp64Micro({{watermark:Int64}}, 'UTC')
  AND toUnixTimestamp64Micro(inserted_at) > transform(toDate({t}), {{seal_days:Array(Date)}},
      {{seal_watermarks:Array(Int64)}}, toInt64(0))
"""

# maintain(): each sealed day's totals per key, provider and type (or latency bucket), from the
# quarter rows the same seal just wrote.
_SEAL_UPLOAD_DAYS_SQL = """
INSERT INTO upload_days (day, version, api_key_id, has_key, provider, file_type, uploads, bytes,
                         successful, failed)
SELECT day, version, api_key_id, has_key, provider, file_type, sum(uploads), sum(bytes),
       sum(successful), sum(failed)
FROM upload_quarters
WHERE has({days:Array(Date)}, day) AND version = fromUnixTimestamp64Micro({version:Int64}, 'UTC')
GROUP BY day, version, api_key_id, has_key, provider, file_type
"""
_SEAL_REQUEST_DAYS_SQL = """
INSERT INTO request_days (day, version, api_key_id, has_key, bucket, requests, errors,
                          response_us)
SELECT day, version, api_key_id, has_key, bucket, sum(requests), sum(errors), sum(response_us)
FROM request_quarters
WHERE has({days:Array(Date)}, day) AND version = fromUnixTimestamp64Micro({version:Int64}, 'UTC')
GROUP BY day, version, api_key_id, has_key, bucket
"""

# maintain(): a new seal of ``days`` = their current seal's rollup rows + the raw ids first
# inserted in (old watermark, new watermark].
_SEAL_UPLOADS_SQL = """
INSERT INTO upload_quarters (day, version, api_key_id, has_key, quarter, provider, file_type,
                             uploads, bytes, successful, failed)
SELECT day, fromUnixTimestamp64Micro({version:Int64}, 'UTC'), api_key_id, has_key, quarter,
       provider, file_type, sum(u), sum(b), sum(s), sum(f)
FROM (
    SELECT day, api_key_id, has_key, quarter, provider, file_type,
           uploads AS u, bytes AS b, successful AS s, failed AS f
    FROM upload_quarters
    WHERE has({days:Array(Date)}, day)
      AND toUnixTimestamp64Micro(version) = transform(day, {seal_days:Array(Date)},
          {seal_versions:Array(Int64)}, toInt64(0))
    UNION ALL
    SELECT toDate(uploaded_at) AS day, api_key_id, has_key,
           toStartOfFifteenMinutes(uploaded_at) AS quarter, provider, file_type,
           1 AS u, file_size AS b, upload_status = 'success' AS s, upload_status = 'failed' AS f
    FROM file_uploads FINAL
    WHERE has({days:Array(Date)}, toDate(uploaded_at))
      AND uploaded_at >= fromUnixTimestamp64Micro({lo:Int64}, 'UTC')
      AND uploaded_at < fromUnixTimestamp64Micro({hi:Int64}, 'UTC')
      AND inserted_at <= fromUnixTimestamp64Micro({watermark:Int64}, 'UTC')
      AND toUnixTimestamp64Micro(inserted_at) > transform(toDate(uploaded_at),
          {seal_days:Array(Date)}, {seal_watermarks:Array(Int64)}, toInt64(0))
)
GROUP BY day, api_key_id, has_key, quarter, provider, file_type
SETTINGS use_skip_indexes_if_final = 1, use_skip_indexes_if_final_exact_mode = 1
"""

_SEAL_REQUESTS_SQL = """
INSERT INTO request_quarters (day, version, api_key_id, has_key, quarter, bucket, requests,
                              errors, response_us)
SELECT day, fromUnixTimestamp64Micro({version:Int64}, 'UTC'), api_key_id, has_key, quarter,
       bucket, sum(n), sum(e), sum(us)
FROM (
    SELECT day, api_key_id, has_key, quarter, bucket, requests AS n, errors AS e,
           response_us AS us
    FROM request_quarters
    WHERE has({days:Array(Date)}, day)
      AND toUnixTimestamp64Micro(version) = transform(day, {seal_days:Array(Date)},
          {seal_versions:Array(Int64)}, toInt64(0))
    UNION ALL
    SELECT toDate(requested_at) AS day, api_key_id, has_key,
           toStartOfFifteenMinutes(requested_at) AS quarter, latency_bucket AS bucket,
           1 AS n, status_code >= 400 AS e, response_us AS us
    FROM api_requests FINAL
    WHERE has({days:Array(Date)}, toDate(requested_at))
      AND requested_at >= fromUnixTimestamp64Micro({lo:Int64}, 'UTC')
      AND requested_at < fromUnixTimestamp64Micro({hi:Int64}, 'UTC')
      AND inserted_at <= fromUnixTimestamp64Micro({watermark:Int64}, 'UTC')
      AND toUnixTimestamp64Micro(inserted_at) > transform(toDate(requested_at),
          {seal_days:Array(Date)}, {seal_watermarks:Array(Int64)}, toInt64(0))
)
GROUP BY day, api_key_id, has_key, quarter, bucket
SETTINGS use_skip_indexes_if_final = 1, use_skip_indexes_if_final_exact_mode = 1
"""

# Rollup rows of versions that an older-than-an-hour seal superseded, or of seals that never
# finished: no reader can still be using them (reads are bounded by read_timeout).
_CLEANUP_SQL = """
ALTER TABLE {table} DELETE
WHERE version < now64(6) - INTERVAL 1 HOUR
  AND toUnixTimestamp64Micro(version) != transform(day, {{seal_days:Array(Date)}},
      {{seal_versions:Array(Int64)}}, toInt64(0))
  AND NOT has({{fresh_days:Array(Date)}}, day)
"""
_STALE_SQL = """
SELECT count() FROM {table}
WHERE version < now64(6) - INTERVAL 1 HOUR
  AND toUnixTimestamp64Micro(version) != transform(day, {{seal_days:Array(Date)}},
      {{seal_versions:Array(Int64)}}, toInt64(0))
  AND NOT has({{fresh_days:Array(Date)}}, day)
"""


_RAW_UPLOADS_SQL = """
SELECT toString(id), has_key, toString(api_key_id), toString(request_id), provider, file_type,
       declared_type, file_size, toString(upload_status), file_name, error_message,
       toUnixTimestamp64Micro(uploaded_at)
FROM file_uploads FINAL
WHERE {keys}
  AND uploaded_at >= fromUnixTimestamp64Micro({{start:Int64}}, 'UTC')
  AND uploaded_at < fromUnixTimestamp64Micro({{end:Int64}}, 'UTC')
"""
_RAW_REQUESTS_SQL = """
SELECT toString(id), has_key, toString(api_key_id), method, path, status_code, response_time_ms,
       request_size, response_size, error_message, toUnixTimestamp64Micro(requested_at)
FROM api_requests FINAL
WHERE {keys}
  AND requested_at >= fromUnixTimestamp64Micro({{start:Int64}}, 'UTC')
  AND requested_at < fromUnixTimestamp64Micro({{end:Int64}}, 'UTC')
"""


class ClickHouseBackend:
    """Usage tables in ClickHouse (a server over HTTP, or chdb in this process).

    Options (``engine_options`` of ``UsageStore``): ``raw_retention_days`` (default ``None``:
    keep raw rows), ``settle_days`` (default 2: days older than this are sealed),
    ``maintain_interval`` (seconds between automatic :meth:`maintain` runs from the write path,
    default 3600; 0 turns them off), ``visibility_margin`` (seconds, default 300) and, for a
    server, ``secure`` and ``settings`` (passed to clickhouse-connect).
    """

    parallel_reads: bool
    embedded: bool
    ephemeral: bool

    def __init__(
        self,
        url: URL,
        *,
        connect_timeout: float,
        read_timeout: float | None,
        raw_retention_days: int | None = None,
        write_timeout: float | None = None,
        engine_options: dict[str, Any],
    ) -> None:
        options = dict(engine_options)
        self.settle_days = _int_option(options.pop("settle_days", 2), "settle_days", 1)
        retention = options.pop("raw_retention_days", raw_retention_days)
        self.raw_retention_days = (
            None if retention is None else _int_option(retention, "raw_retention_days", 1)
        )
        if self.raw_retention_days is not None and (
            self.raw_retention_days < self.settle_days + 2
        ):
            raise ConfigurationError(
                f"raw_retention_days={self.raw_retention_days} must be at least settle_days + 2 "
                f"= {self.settle_days + 2}: raw rows may be dropped only after they are sealed"
            )
        self.maintain_interval = float(options.pop("maintain_interval", 3600))
        self.visibility_margin = float(options.pop("visibility_margin", 300))
        self.read_timeout = read_timeout
        self.url = url
        self.client: Client
        if url.drivername == "chdb":
            secure = options.pop("secure", None)
            if options or secure is not None:
                raise ConfigurationError(
                    f"engine_options {sorted([*options, *(['secure'] if secure else [])])} do "
                    "not apply to a chdb store"
                )
            self.name = "chdb"
            self.embedded = True
            self.ephemeral = not url.database
            self.database = "default"
            self.client = EmbeddedClient(url.database)
            self.parallel_reads = False
        else:
            secure = bool(options.pop("secure", url.query.get("secure") in ("true", "1")))
            settings = dict(options.pop("settings", {}))
            if options:
                raise ConfigurationError(
                    f"unknown engine_options for a ClickHouse store: {sorted(options)}"
                )
            self.name = "clickhouse"
            self.embedded = False
            self.ephemeral = False
            self.database = url.database or "default"
            self.client = HTTPClient(
                host=url.host or "localhost",
                port=url.port,
                username=url.username,
                password=url.password,
                database=self.database,
                secure=secure,
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                settings=settings,
            )
            self.parallel_reads = True
        self.cluster: str | None = None
        self._seal_cache: tuple[float, list[tuple[Any, ...]]] = (-math.inf, [])
        self._maintained_at = 0.0
        self._maintain_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ClickHouseBackend({self.client.where!r})"

    # --- schema ------------------------------------------------------------------------------

    def create_schema(self, cluster: str | None = None) -> None:
        """Create the tables (``ON CLUSTER`` with ``cluster``), then seal what is due."""
        if cluster is not None and self.name == "chdb":
            raise ConfigurationError("chdb is one embedded server: it has no cluster")
        self._run_statements(
            schema_statements(
                self.database, cluster=cluster, raw_retention_days=self.raw_retention_days
            )
        )
        self.cluster = cluster
        self.seal()

    def _run_statements(self, statements: Sequence[str]) -> None:
        for statement in statements:
            self.client.command(statement)

    def has_schema(self) -> bool:
        rows = self.client.query(
            "SELECT name FROM system.tables WHERE database = {db:String}",
            {"db": self.database},
        )
        return set(_SCHEMA_TABLES) <= {r[0] for r in rows}

    # --- writing -----------------------------------------------------------------------------

    def write(self, uploads: Sequence[UploadRecord], requests: Sequence[RequestRecord]) -> int:
        new = 0
        if uploads:
            fresh = self._absent("file_uploads", "uploaded_at", uploads, _upload_time)
            rows = [_upload_row(u) for u in uploads if u.id in fresh]
            if rows:
                self.client.insert("file_uploads", UPLOAD_COLUMNS, rows, _token("u", fresh))
            new += len(rows)
        if requests:
            fresh = self._absent("api_requests", "requested_at", requests, _request_time)
            rows = [_request_row(r) for r in requests if r.id in fresh]
            if rows:
                self.client.insert("api_requests", REQUEST_COLUMNS, rows, _token("r", fresh))
            new += len(rows)
        if self.maintain_interval and time.monotonic() - self._maintained_at > (
            self.maintain_interval
        ):
            self.seal()
        return new

    def _absent(
        self, table: str, column: str, records: Sequence[Any], when: Any
    ) -> set[uuid.UUID]:
        """Ids of ``records`` not stored yet, looked up through the primary key: a record's
        copies share its key and time, so the batch's keys and time span bound the search."""
        times = [when(r) for r in records]
        ids = {r.id for r in records}
        keys = sorted({r.api_key_id or NIL for r in records})
        stored = self.client.query(
            f"SELECT DISTINCT toString(id) FROM {table} "
            "WHERE api_key_id IN {keys:Array(UUID)} "
            f"AND {column} >= fromUnixTimestamp64Micro({{lo:Int64}}, 'UTC') "
            f"AND {column} <= fromUnixTimestamp64Micro({{hi:Int64}}, 'UTC') "
            "AND id IN {ids:Array(UUID)}",
            {"keys": keys, "lo": _micros(min(times)), "hi": _micros(max(times)), "ids": list(ids)},
        )
        return ids - {uuid.UUID(r[0]) for r in stored}

    # --- sealing -----------------------------------------------------------------------------

    def seal(self) -> int:
        """Seal whole UTC days older than ``settle_days`` into the quarter-hour rollups, fold
        late rows of sealed days into a new seal, and delete superseded rollup versions.

        Returns how many days got a new seal. Safe to run from several processes at once:
        every seal is self-contained, and readers use the newest complete one.
        """
        with self._maintain_lock:
            self._maintained_at = time.monotonic()
            ((now_us,),) = self.client.query("SELECT toUnixTimestamp64Micro(now64(6))")
            now_us = int(now_us)
            watermark = now_us - int(self.visibility_margin * 1_000_000)
            today = (_EPOCH + timedelta(microseconds=now_us)).date()
            horizon_day = today - timedelta(days=self.settle_days)
            horizon = _micros(datetime(horizon_day.year, horizon_day.month, horizon_day.day,
                                       tzinfo=UTC))  # fmt: skip
            seals = _Seals(self.client.query(_SEALS_SQL, {"lo": date(1970, 1, 1),
                                                          "hi": horizon_day}))  # fmt: skip
            params = {**seals.params(), "horizon": horizon, "watermark": watermark}
            late: set[date] = set()
            for table, t in _RAW_TIME.items():
                sql = _LATE_DAYS_SQL.format(t=t, table=table)
                late.update(date.fromisoformat(r[0]) for r in self.client.query(sql, params))
            sealed = set(seals.days)
            days = set(late)
            if days or sealed:
                # keep the sealed days one contiguous run: also seal the (empty) days between
                first = min(days | sealed)
                d = first
                while d < horizon_day:
                    if d not in sealed:
                        days.add(d)
                    d += timedelta(days=1)
            if days:
                self._seal(sorted(days), seals, now_us, watermark)
            self._seal_cache = (-math.inf, [])
            self._cleanup(now_us)
            return len(days)

    def _seal(self, days: list[date], seals: _Seals, version: int, watermark: int) -> None:
        lo, hi = days[0], days[-1] + timedelta(days=1)
        params = {
            **seals.params(),
            "days": days,
            "version": version,
            "watermark": watermark,
            "lo": _micros(datetime(lo.year, lo.month, lo.day, tzinfo=UTC)),
            "hi": _micros(datetime(hi.year, hi.month, hi.day, tzinfo=UTC)),
        }
        self.client.command(_SEAL_UPLOADS_SQL, params)
        self.client.command(_SEAL_REQUESTS_SQL, params)
        self.client.command(_SEAL_UPLOAD_DAYS_SQL, params)
        self.client.command(_SEAL_REQUEST_DAYS_SQL, params)
        stamp = _EPOCH + timedelta(microseconds=version)
        mark = _EPOCH + timedelta(microseconds=watermark)
        rows = [(d, stamp, mark) for d in days]
        self.client.insert(
            "usage_seals", ("day", "version", "watermark"), rows, f"seal-{version}-{days[0]}"
        )

    def _cleanup(self, now_us: int) -> None:
        seals = _Seals(self._all_seals())
        hour_ago = now_us - 3_600_000_000
        fresh = [d for d, v in zip(seals.days, seals.versions, strict=True) if v > hour_ago]
        params = {"seal_days": seals.days, "seal_versions": seals.versions, "fresh_days": fresh}
        for table in _ROLLUPS:
            ((stale,),) = self.client.query(_STALE_SQL.format(table=table), params)
            if int(stale):
                # a Distributed table takes no mutation: delete from the local tables
                cluster = self._cluster_of(table)
                target = table if cluster is None else f"{table}_local ON CLUSTER `{cluster}`"
                self.client.command(_CLEANUP_SQL.format(table=target), params)

    def _cluster_of(self, table: str) -> str | None:
        """The cluster a ``Distributed`` usage table spans (None for a local table)."""
        rows = self.client.query(
            "SELECT engine, engine_full FROM system.tables "
            "WHERE database = {db:String} AND name = {name:String}",
            {"db": self.database, "name": table},
        )
        if not rows or rows[0][0] != "Distributed":
            return None
        return str(rows[0][1]).split("(", 1)[1].split(",", 1)[0].strip(" '`")

    # --- health and lifecycle ----------------------------------------------------------------

    def ping(self) -> None:
        self.client.query("SELECT 1")

    def maintain(self, raw_retention_days: int | None, months_ahead: int) -> MaintainResult:
        """Seal what is due. Raw retention on ClickHouse is the raw tables' TTL, set at schema
        creation from the store's ``raw_retention_days``; a different age here is refused."""
        if raw_retention_days is not None and raw_retention_days != self.raw_retention_days:
            raise ConfigurationError(
                "on ClickHouse raw retention is a table TTL fixed when the schema is created: "
                f"pass UsageStore(..., raw_retention_days={raw_retention_days})"
            )
        self.seal()
        return MaintainResult()

    def retention_start(self, tables: list[str]) -> datetime | None:
        """From when raw rows are surely complete: the TTL's horizon (None without one)."""
        if self.raw_retention_days is None:
            return None
        return datetime.now(UTC) - timedelta(days=self.raw_retention_days)

    def migrate_legacy(self, source: LegacySource) -> MigrationResult:
        raise ConfigurationError(
            "legacy totals are migrated into a SQLite or PostgreSQL store; ClickHouse has none"
        )

    # --- failures, exports and type mismatches: from the raw rows ----------------------------
    # Answered by reading the range's raw rows (each id once, FINAL) into the in-memory
    # reference backend: exact while raw rows are kept, not yet optimised for long ranges, and
    # without a sealed tier, so past the raw TTL these three see nothing.

    def _raw_view(self, scope: Scope, start: datetime, end: datetime) -> MemoryBackend:
        params: dict[str, Any] = {"start": _micros(start), "end": _micros(end)}
        keys = _keys_condition(scope, params)
        view = MemoryBackend()
        uploads = [
            UploadRecord(
                id=uuid.UUID(r[0]), api_key_id=None if not r[1] else uuid.UUID(r[2]),
                request_id=None if r[3] is None else uuid.UUID(r[3]), provider=r[4],
                file_type=r[5], declared_type=r[6], file_size=int(r[7]), upload_status=r[8],
                file_name=r[9], error_message=r[10],
                uploaded_at=_EPOCH + timedelta(microseconds=int(r[11])),
            )
            for r in self._read(_RAW_UPLOADS_SQL.format(keys=keys), params)
        ]
        requests = [
            RequestRecord(
                id=uuid.UUID(r[0]), api_key_id=None if not r[1] else uuid.UUID(r[2]),
                method=r[3], path=r[4], status_code=int(r[5]), response_time_ms=float(r[6]),
                request_size=int(r[7]), response_size=int(r[8]), error_message=r[9],
                requested_at=_EPOCH + timedelta(microseconds=int(r[10])),
            )
            for r in self._read(_RAW_REQUESTS_SQL.format(keys=keys), params)
        ]
        view.write(uploads, requests)
        return view

    def failure_rows(
        self,
        scope: Scope,
        start: datetime,
        end: datetime,
        kinds: tuple[str, ...],
        before: FailureKey | None,
        limit: int,
    ) -> list[Failure]:
        view = self._raw_view(scope, start, end)
        return view.failure_rows(scope, start, end, kinds, before, limit)

    def export_rows(
        self,
        dataset: str,
        scope: Scope,
        start: datetime,
        end: datetime,
        after: tuple[datetime, uuid.UUID] | None,
        limit: int,
    ) -> list[tuple[Any, ...]]:
        view = self._raw_view(scope, start, end)
        return view.export_rows(dataset, scope, start, end, after, limit)

    def mismatch_rows(
        self, scope: Scope, start: datetime, end: datetime
    ) -> list[tuple[str, str, int]]:
        return self._raw_view(scope, start, end).mismatch_rows(scope, start, end)

    def before_fork(self) -> None:
        """Nothing: the child forgets the parent's connections in :meth:`after_fork`."""

    def after_fork(self) -> None:
        self.client.forked()
        self._maintain_lock = threading.Lock()

    def close(self) -> None:
        self.client.close()

    # --- reading -----------------------------------------------------------------------------

    def _seals_for(self, bounds: Sequence[datetime]) -> _Seals:
        """The seals a read over ``bounds`` may use: none unless every bound is on a UTC
        quarter hour (the rollup's grain); otherwise the read is answered from raw rows."""
        if not all(_aligned(b) for b in bounds):
            return _Seals([])
        lo, hi = bounds[0].date().isoformat(), bounds[-1].date().isoformat()
        return _Seals([r for r in self._all_seals() if lo <= str(r[0]) <= hi])

    def _all_seals(self) -> list[tuple[Any, ...]]:
        """Every day's newest seal, remembered for ``_SEAL_CACHE_SECONDS``: an older seal
        is still whole and exact (its rollup rows outlive being superseded by an hour), so
        reads may skip asking for a minute."""
        at, rows = self._seal_cache
        if time.monotonic() - at > _SEAL_CACHE_SECONDS:
            rows = self.client.query(_SEALS_SQL, {"lo": date(1970, 1, 1), "hi": _MAX_DAY})
            self._seal_cache = (time.monotonic(), rows)
        return rows

    def _read(self, sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        try:
            return self.client.query(sql, params)
        except (ConfigurationError, DatabaseUnavailableError):
            raise
        except Exception as exc:
            if "TIMEOUT_EXCEEDED" in str(exc) and self.read_timeout is not None:
                raise ReadTimeoutError(
                    f"a usage query ran longer than read_timeout={self.read_timeout:g} s and "
                    "was cancelled"
                ) from exc
            raise

    def _settings(self) -> str:
        timeout = ""
        if self.read_timeout is not None:
            timeout = f", max_execution_time = {max(1, round(self.read_timeout))}"
        return _READ_SETTINGS.format(timeout=timeout)

    def _read_params(self, bounds: Sequence[datetime]) -> dict[str, Any]:
        """Seals plus which UTC days of the range may come whole from the day rollups: those
        no bound cuts (a day holding a bound strictly inside is read by quarter hour)."""
        start, end = bounds[0], bounds[-1]
        split = sorted({b.date() for b in bounds if b.time() != datetime.min.time()})
        whole_lo = start.date() + timedelta(days=start.time() != datetime.min.time())
        seals = self._seals_for(bounds)
        params = seals.params()
        params["sealed_version"] = seals.version_condition(params)
        return {
            **params,
            "bounds": [_micros(b) for b in bounds],
            "start": _micros(start),
            "end": _micros(end),
            "split_days": split,
            "whole_lo": whole_lo,
            "whole_hi": max(whole_lo - timedelta(days=1), end.date() - timedelta(days=1)),
        }

    def upload_rows(self, scope: Scope, bounds: Sequence[datetime]) -> list[UploadRow]:
        if scope.keys is not None and not scope.keys:
            return []
        params = self._read_params(bounds)
        sealed = params.pop("sealed_version")
        keys = _keys_condition(scope, params)
        filters = ""
        if scope.providers:
            filters += " AND provider IN {providers:Array(String)}"
            params["providers"] = list(scope.providers)
        if scope.file_types:
            filters += (
                " AND (file_type IN {exact_types:Array(String)}"
                " OR arrayExists(p -> startsWith(file_type, p), {type_prefixes:Array(String)}))"
            )
            params["exact_types"] = [f for f in scope.file_types if not f.endswith("/*")]
            params["type_prefixes"] = [f[:-1] for f in scope.file_types if f.endswith("/*")]
        bucket = (
            "toUnixTimestamp(toStartOfFifteenMinutes(uploaded_at)) * 1000000"
            if all(_aligned(b) for b in bounds)
            else "toUnixTimestamp64Micro(uploaded_at)"
        )
        t = "uploaded_at"
        sql = _UPLOADS_SQL.format(
            keys=keys,
            filters=filters,
            days_part=_DAYS_PART.replace("@SEALED_VERSION@", sealed),
            quarters_part=_QUARTERS_PART.replace("@SEALED_VERSION@", sealed),
            unsealed=_UPLOADS_RAW.format(
                bucket=bucket, keys=keys, filters=filters, part=_UNSEALED_PART.format(t=t)
            ),
            late=_UPLOADS_RAW.format(
                bucket=bucket, keys=keys, filters=filters, part=_LATE_PART.format(t=t)
            ),
            settings=self._settings(),
        )
        return [
            (int(p), str(provider), str(ft), int(u), int(b), int(s), int(f))
            for p, provider, ft, u, b, s, f in self._read(sql, params)
        ]

    def request_histogram(self, scope: Scope, start: datetime, end: datetime) -> Histogram:
        out = Histogram()
        if scope.keys is not None and not scope.keys:
            return out
        params = self._read_params([start, end])
        sealed = params.pop("sealed_version")
        keys = _keys_condition(scope, params)
        t = "requested_at"
        sql = _REQUESTS_SQL.format(
            keys=keys,
            days_part=_DAYS_PART.replace("@SEALED_VERSION@", sealed),
            quarters_part=_QUARTERS_PART.replace("@SEALED_VERSION@", sealed),
            unsealed=_REQUESTS_RAW.format(keys=keys, part=_UNSEALED_PART.format(t=t)),
            late=_REQUESTS_RAW.format(keys=keys, part=_LATE_PART.format(t=t)),
            settings=self._settings(),
        )
        for bucket, n, e, us in self._read(sql, params):
            out.add(int(bucket), int(n), int(e), int(us))
        return out


def _keys_condition(scope: Scope, params: dict[str, Any]) -> str:
    if scope.keys is None:
        return "1"
    params["keys"] = list(scope.keys)
    return "api_key_id IN {keys:Array(UUID)} AND has_key = true"


def _int_option(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigurationError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _upload_time(r: UploadRecord) -> datetime:
    return r.uploaded_at


def _request_time(r: RequestRecord) -> datetime:
    return r.requested_at


def _upload_row(u: UploadRecord) -> tuple[Any, ...]:
    key = u.api_key_id
    return (
        u.id, key or NIL, key is not None, u.request_id, u.provider, u.file_type, u.declared_type,
        u.file_size, u.upload_status, u.file_name, u.error_message, u.uploaded_at,
    )  # fmt: skip


def _request_row(r: RequestRecord) -> tuple[Any, ...]:
    key = r.api_key_id
    ms = r.response_time_ms
    return (
        r.id, key or NIL, key is not None, r.method, r.path, r.status_code, ms,
        round(ms * 1000), latency_bucket(ms), r.request_size, r.response_size, r.error_message,
        r.requested_at,
    )  # fmt: skip
