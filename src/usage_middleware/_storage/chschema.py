"""The ClickHouse backend's tables: raw rows, the sealed rollups, seals and the route cap.

* ``file_uploads``, ``api_requests`` — raw rows, ``ReplacingMergeTree(first_seen)`` ordered by
  ``(api_key_id, time, id)``: every copy of an id shares the whole sorting key, so ``FINAL``
  sees each id once; ``first_seen`` makes the earliest inserted copy win. Partitioned by month
  (the raw TTL drops whole parts). A ``minmax`` index on the time, ``inserted_at`` and the lag
  (``inserted_at`` minus the time) lets a read skip granules that are neither in an unsealed
  range nor stored late enough to have missed their day's seal.
* ``upload_rollup``, ``request_rollup``, ``endpoint_rollup`` — what seals write: sums per UTC
  quarter hour, hour and day (``grain``) of whole sealed days, tagged with the seal ``version``.
  Partitioned by year, so a year of one key is read from a part or two.
* ``rollup_seals`` — per UTC day, its seals (the newest ``version`` wins) with their watermark.
* ``endpoint_routes`` — the named routes of each key and UTC day (the route cap's memory).

On a cluster each table is a ``Replicated…MergeTree`` ``<name>_local`` plus a ``Distributed``
table with the plain name, sharded by ``cityHash64(api_key_id)``; ``rollup_seals`` is one table
replicated to every node.
"""

from __future__ import annotations

__all__ = [
    "LAG",
    "METHOD_LABEL",
    "RAW_TIME",
    "REQUEST_COLUMNS",
    "ROLLUPS",
    "SCHEMA_TABLES",
    "UPLOAD_COLUMNS",
    "lag_index_statements",
    "schema_statements",
    "upgrade_statements",
]

UPLOAD_COLUMNS = (
    "id", "api_key_id", "has_key", "request_id", "provider", "file_type", "declared_type",
    "file_size", "upload_status", "file_name", "error_message", "uploaded_at",
)  # fmt: skip
REQUEST_COLUMNS = (
    "id", "api_key_id", "has_key", "method", "path", "status_code", "response_time_ms",
    "response_us", "latency_bucket", "request_size", "response_size", "error_message",
    "requested_at", "route_matched", "route_label",
)  # fmt: skip
RAW_TIME = {"file_uploads": "uploaded_at", "api_requests": "requested_at"}
#: The endpoint method label of a raw row (``_schema.endpoint_method`` in SQL).
METHOD_LABEL = (
    "if(method IN ('GET', 'HEAD', 'POST', 'PUT', 'PATCH', 'DELETE', 'OPTIONS', 'CONNECT', "
    "'TRACE'), method, 'OTHER')"
)
ROLLUPS = ("upload_rollup", "request_rollup", "endpoint_rollup")

#: How long after its time a raw row was stored, in microseconds (``{t}``: the time column).
LAG = "(toUnixTimestamp64Micro(inserted_at) - toUnixTimestamp64Micro({t}))"
_LAG_INDEX = "lag ({t}, inserted_at, " + LAG + ") TYPE minmax GRANULARITY 1"
_RAW_TAIL = (
    """
    inserted_at DateTime64(6, 'UTC') DEFAULT now64(6),
    first_seen UInt64 DEFAULT 18446744073709551615 - toUnixTimestamp64Micro(inserted_at),
    INDEX """
    + _LAG_INDEX
)

_ROLLUP_HEAD = """
    grain Enum8('quarter' = 1, 'hour' = 2, 'day' = 3),
    day Date,
    version DateTime64(6, 'UTC'),
    api_key_id UUID,
    has_key Bool,
    t DateTime('UTC'),"""

# name: (columns, engine, its version column, partition key, order key)
_TABLES: dict[str, tuple[str, str, str, str, str]] = {
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
        + _RAW_TAIL.format(t="uploaded_at"),
        "ReplacingMergeTree",
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
    requested_at DateTime64(6, 'UTC'),
    route_matched Bool DEFAULT true,
    route_label String DEFAULT if(route_matched, path, '(unmatched)'),"""
        + _RAW_TAIL.format(t="requested_at"),
        "ReplacingMergeTree",
        "first_seen",
        "toYYYYMM(requested_at)",
        "(api_key_id, requested_at, id)",
    ),
    "upload_rollup": (
        _ROLLUP_HEAD
        + """
    provider LowCardinality(String),
    file_type LowCardinality(String),
    declared_type LowCardinality(String),
    uploads UInt64,
    bytes UInt64,
    successful UInt64,
    failed UInt64,
    last_at DateTime64(6, 'UTC')""",
        "MergeTree",
        "",
        "toYear(day)",
        "(api_key_id, has_key, grain, t, version, provider, file_type, declared_type)",
    ),
    "request_rollup": (
        _ROLLUP_HEAD
        + """
    bucket UInt16,
    requests UInt64,
    errors UInt64,
    response_us UInt64,
    last_at DateTime64(6, 'UTC')""",
        "MergeTree",
        "",
        "toYear(day)",
        "(api_key_id, has_key, grain, t, version, bucket)",
    ),
    "endpoint_rollup": (
        _ROLLUP_HEAD
        + """
    method LowCardinality(String),
    route String,
    status_code UInt16,
    bucket UInt16,
    requests UInt64,
    response_us UInt64,
    request_bytes UInt64,
    response_bytes UInt64""",
        "MergeTree",
        "",
        "toYear(day)",
        "(api_key_id, has_key, grain, t, version, method, route, status_code, bucket)",
    ),
    "rollup_seals": (
        """
    day Date,
    version DateTime64(6, 'UTC'),
    watermark DateTime64(6, 'UTC')""",
        "ReplacingMergeTree",
        "version",
        "tuple()",
        "day",
    ),
    "endpoint_routes": (
        """
    api_key_id UUID,
    has_key Bool,
    day Date,
    route String""",
        "ReplacingMergeTree",
        "",
        "toYear(day)",
        "(api_key_id, has_key, day, route)",
    ),
}
SCHEMA_TABLES = tuple(_TABLES)


def _ttl(table: str, days: int | None) -> str:
    if days is None or table not in RAW_TIME:
        return ""
    t = RAW_TIME[table]
    return f"\nTTL toDateTime(greatest({t}, inserted_at)) + INTERVAL {int(days)} DAY"


def schema_statements(
    database: str, *, cluster: str | None = None, raw_retention_days: int | None = None
) -> list[str]:
    """The DDL of the usage tables.

    Without ``cluster``: (Replacing)MergeTree tables. With ``cluster``: per table a local
    ``<name>_local`` ``Replicated…MergeTree`` ``ON CLUSTER`` and a ``Distributed`` table with the
    plain name sharded by ``cityHash64(api_key_id)`` (one key's rows on one shard, so ``FINAL``,
    which works per shard, still sees every copy of an id); ``rollup_seals`` is replicated to
    every node whole (it is tiny and every shard's reads need it).
    """
    db = f"`{database}`."
    out = []
    for name, (columns, kind, version, partition, order) in _TABLES.items():
        ttl = _ttl(name, raw_retention_days)
        if cluster is None:
            # the window keeps the hashes of recent inserts, so a retried INSERT carrying the
            # same deduplication token is dropped by the server
            window = (
                "\nSETTINGS non_replicated_deduplication_window = 1000" if name in RAW_TIME else ""
            )
            out.append(
                f"CREATE TABLE IF NOT EXISTS {db}{name} ({columns}\n)\n"
                f"ENGINE = {kind}({version})\nPARTITION BY {partition}\nORDER BY {order}{ttl}"
                + window
            )
            continue
        on = f" ON CLUSTER `{cluster}`"
        shard = "all" if name == "rollup_seals" else "{shard}"
        path = f"'/clickhouse/tables/{shard}/{{database}}/{name}', '{{replica}}'"
        args = f"{path}, {version}" if version else path
        local = name if name == "rollup_seals" else f"{name}_local"
        out.append(
            f"CREATE TABLE IF NOT EXISTS {db}{local}{on} ({columns}\n)\n"
            f"ENGINE = Replicated{kind}({args})\nPARTITION BY {partition}\nORDER BY {order}{ttl}"
        )
        if name != "rollup_seals":
            out.append(
                f"CREATE TABLE IF NOT EXISTS {db}{name}{on} AS {db}{local}\n"
                f"ENGINE = Distributed(`{cluster}`, `{database}`, {local}, cityHash64(api_key_id))"
            )
    return out


# Columns added to a table after it first shipped: (table, column definition). Applied by
# create_schema to tables that exist already (a CREATE … IF NOT EXISTS leaves them as they were).
_ADDED_COLUMNS = (
    ("api_requests", "route_matched Bool DEFAULT true"),
    ("api_requests", "route_label String DEFAULT if(route_matched, path, '(unmatched)')"),
)


def upgrade_statements(database: str, *, cluster: str | None = None) -> list[str]:
    """``ALTER TABLE … ADD COLUMN IF NOT EXISTS`` for every column added since a table shipped:
    no-ops on a new schema, the upgrade of an older one. Rows stored before read the default."""
    out = []
    for table, column in _ADDED_COLUMNS:
        if cluster is None:
            out.append(f"ALTER TABLE `{database}`.{table} ADD COLUMN IF NOT EXISTS {column}")
            continue
        on = f" ON CLUSTER `{cluster}`"
        for name in (f"{table}_local", table):
            out.append(f"ALTER TABLE `{database}`.{name}{on} ADD COLUMN IF NOT EXISTS {column}")
    return out


def lag_index_statements(database: str, table: str, *, cluster: str | None = None) -> list[str]:
    """Give a raw table made before the ``lag`` skip index that index: add it, build it for the
    parts stored already (a background mutation) and drop ``tail``, the minmax of time and
    ``inserted_at`` it replaces (one watermark cannot cover days sealed at different times)."""
    name = table if cluster is None else f"{table}_local"
    on = "" if cluster is None else f" ON CLUSTER `{cluster}`"
    target = f"`{database}`.{name}{on}"
    return [
        f"ALTER TABLE {target} ADD INDEX IF NOT EXISTS {_LAG_INDEX.format(t=RAW_TIME[table])}",
        f"ALTER TABLE {target} MATERIALIZE INDEX lag",
        f"ALTER TABLE {target} DROP INDEX IF EXISTS tail",
    ]
