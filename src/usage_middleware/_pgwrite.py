"""The PostgreSQL write path: binary COPY into a staging table, then one statement per table.

Per batch and table, the rows are COPYed (binary) into a session-local temporary table that
empties itself at commit, and a single statement does the rest inside the server::

    WITH new AS (INSERT INTO file_uploads SELECT .. FROM staging ORDER BY id
                 ON CONFLICT DO NOTHING RETURNING ..),
         g   AS (SELECT .. FROM new GROUP BY key, UTC quarter hour),
         q   AS (INSERT INTO quarter_usage SELECT .. FROM g ORDER BY key
                 ON CONFLICT ON CONSTRAINT uq_quarter_usage DO UPDATE SET counter = counter + ..),
         h   AS (.. g summed by hour into hourly_usage ..),
         d   AS (.. g summed by day into daily_usage ..),
         m   AS (.. new rows whose declared type differs, by quarter, into quarter_mismatch_usage)
    SELECT count(*) FROM new, count(*) FROM d, h, q, m  -- this order is the lock order

The raw insert names no conflict target on purpose: the raw tables are partitioned by month, so
their primary key is (id, time), which a replay (same id, same time) hits; an install whose
tables are not converted yet has it on (id). Either way only an already stored id conflicts.

Only rows that ``RETURNING`` reports as new reach the rollups, so a replayed batch adds nothing;
everything commits together, so no crash can separate a row from its count. Raw rows are
inserted in ``id`` order and rollup rows in unique-key order, the rollups one after the other
in the order the final ``SELECT`` reads them (coarsest first, as the legacy migration writes):
concurrent writers take row locks in one global order and cannot deadlock.

Values that must agree bit for bit with Python (the latency bucket, microseconds) are computed
in Python and staged as extra columns; UTC day, hour and quarter hour are computed by the server.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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

__all__ = ["pg_write"]

_UPLOAD_COLUMNS = (
    "id",
    "api_key_id",
    "request_id",
    "provider",
    "file_type",
    "declared_type",
    "file_size",
    "file_name",
    "upload_status",
    "error_message",
    "uploaded_at",
)
_UPLOAD_TYPES = (
    "uuid", "uuid", "uuid", "text", "text", "text", "int8", "text", "text", "text", "timestamptz",
)  # fmt: skip

_REQUEST_COLUMNS = (
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
_REQUEST_EXTRA = (
    "latency_bucket", "response_us", "endpoint_method", "endpoint_route", "endpoint_bucket",
)  # fmt: skip
_REQUEST_TYPES = (
    "uuid", "uuid", "text", "text", "int4", "float8", "int8", "int8", "text", "timestamptz",
    "bool", "int2", "int8", "text", "text", "int2",
)  # fmt: skip

# The server's half of the write bound, set for this transaction only (so it holds behind a
# transaction-mode pooler too): a statement stuck on a lock is cancelled, and a transaction whose
# client went silent is ended, releasing the rollup rows it locked.
# A session's staging tables may predate this release (a pooled server connection outlives the
# client that made them): the newest staged column tells, and the ALTER adds what is missing.
_STAGING_PRESENT = (
    "SELECT set_config('statement_timeout', %(ms)s, true), "
    "set_config('idle_in_transaction_session_timeout', %(ms)s, true), "
    "to_regclass('pg_temp.um_stage_uploads') IS NOT NULL "
    "AND EXISTS (SELECT FROM pg_catalog.pg_attribute "
    "WHERE attrelid = to_regclass('pg_temp.um_stage_requests') AND attname = 'endpoint_bucket')"
)
_CREATE_STAGING = """
CREATE TEMPORARY TABLE IF NOT EXISTS um_stage_uploads
    (LIKE public.file_uploads) ON COMMIT DELETE ROWS;
CREATE TEMPORARY TABLE IF NOT EXISTS um_stage_requests
    (LIKE public.api_requests) ON COMMIT DELETE ROWS;
ALTER TABLE um_stage_requests
    ADD COLUMN IF NOT EXISTS route_matched boolean,
    ADD COLUMN IF NOT EXISTS latency_bucket smallint,
    ADD COLUMN IF NOT EXISTS response_us bigint,
    ADD COLUMN IF NOT EXISTS endpoint_method text,
    ADD COLUMN IF NOT EXISTS endpoint_route text COLLATE "C",
    ADD COLUMN IF NOT EXISTS endpoint_bucket smallint;
"""

_UPLOAD_COUNTERS = """
    count(*)::bigint AS total_uploads,
    sum(file_size)::bigint AS total_file_size,
    count(*) FILTER (WHERE upload_status = 'success')::bigint AS successful_requests,
    count(*) FILTER (WHERE upload_status <> 'success')::bigint AS failed_requests
"""
_UPLOAD_SUMS = """
    sum(total_uploads)::bigint, sum(total_file_size)::bigint,
    sum(successful_requests)::bigint, sum(failed_requests)::bigint
"""
_UPLOAD_SET = """
    total_uploads = t.total_uploads + EXCLUDED.total_uploads,
    total_file_size = t.total_file_size + EXCLUDED.total_file_size,
    successful_requests = t.successful_requests + EXCLUDED.successful_requests,
    failed_requests = t.failed_requests + EXCLUDED.failed_requests
"""
_UPLOAD_COUNTER_NAMES = "total_uploads, total_file_size, successful_requests, failed_requests"

# The new rows are grouped once by UTC quarter hour (:00, :15, :30, :45); the hourly, daily and
# monthly rollups are sums of those groups, so the raw rows are aggregated only once.
_QUARTER = "date_bin('15 minutes', utc_at, TIMESTAMP '2000-01-01') AS q"

_INSERT_UPLOADS = f"""
WITH new AS (
    INSERT INTO public.file_uploads ({", ".join(_UPLOAD_COLUMNS)})
    SELECT {", ".join(_UPLOAD_COLUMNS)} FROM pg_temp.um_stage_uploads AS s
    ORDER BY s.id
    ON CONFLICT DO NOTHING
    RETURNING api_key_id, provider, file_type, declared_type, file_size, upload_status,
              (uploaded_at AT TIME ZONE 'UTC') AS utc_at
), grouped AS (
    SELECT api_key_id, {_QUARTER}, provider, file_type, {_UPLOAD_COUNTERS}
      FROM new
     GROUP BY 1, 2, 3, 4
), quarter AS (
    INSERT INTO public.quarter_usage AS t
        (api_key_id, usage_quarter, provider, file_type, {_UPLOAD_COUNTER_NAMES})
    SELECT api_key_id, q AT TIME ZONE 'UTC', provider, file_type, {_UPLOAD_COUNTER_NAMES}
      FROM grouped
     ORDER BY 1, 2, 3, 4
    ON CONFLICT ON CONSTRAINT uq_quarter_usage DO UPDATE SET {_UPLOAD_SET}
    RETURNING 1
), hourly AS (
    INSERT INTO public.hourly_usage AS t
        (api_key_id, usage_hour, provider, file_type, {_UPLOAD_COUNTER_NAMES})
    SELECT api_key_id, date_trunc('hour', q) AT TIME ZONE 'UTC', provider, file_type,
           {_UPLOAD_SUMS}
      FROM grouped
     GROUP BY 1, 2, 3, 4
     ORDER BY 1, 2, 3, 4
    ON CONFLICT ON CONSTRAINT uq_hourly_usage DO UPDATE SET {_UPLOAD_SET}
    RETURNING 1
), daily AS (
    INSERT INTO public.daily_usage AS t
        (api_key_id, usage_date, provider, file_type, {_UPLOAD_COUNTER_NAMES})
    SELECT api_key_id, q::date, provider, file_type, {_UPLOAD_SUMS}
      FROM grouped
     GROUP BY 1, 2, 3, 4
     ORDER BY 1, 2, 3, 4
    ON CONFLICT ON CONSTRAINT uq_daily_usage DO UPDATE SET {_UPLOAD_SET}
    RETURNING 1
), mismatch AS (
    INSERT INTO public.quarter_mismatch_usage AS t
        (api_key_id, usage_quarter, provider, file_type, declared_type, total_uploads)
    SELECT api_key_id, {_QUARTER.removesuffix(" AS q")} AT TIME ZONE 'UTC', provider, file_type,
           declared_type, count(*)
      FROM new
     WHERE declared_type IS NOT NULL AND declared_type <> file_type
     GROUP BY 1, 2, 3, 4, 5
     ORDER BY 1, 2, 3, 4, 5
    ON CONFLICT ON CONSTRAINT uq_quarter_mismatch_usage
    DO UPDATE SET total_uploads = t.total_uploads + EXCLUDED.total_uploads
    RETURNING 1
)
SELECT (SELECT count(*) FROM new), (SELECT count(*) FROM daily), (SELECT count(*) FROM hourly),
       (SELECT count(*) FROM quarter), (SELECT count(*) FROM mismatch)
"""

_REQUEST_COUNTERS = """
    count(*)::bigint AS total_requests,
    count(*) FILTER (WHERE status_code >= 400)::bigint AS error_requests,
    sum(response_us)::bigint AS total_response_us,
    sum(request_size)::bigint AS total_request_bytes,
    sum(response_size)::bigint AS total_response_bytes
"""
_REQUEST_SUMS = """
    sum(total_requests)::bigint, sum(error_requests)::bigint, sum(total_response_us)::bigint,
    sum(total_request_bytes)::bigint, sum(total_response_bytes)::bigint
"""
_REQUEST_SET = """
    total_requests = t.total_requests + EXCLUDED.total_requests,
    error_requests = t.error_requests + EXCLUDED.error_requests,
    total_response_us = t.total_response_us + EXCLUDED.total_response_us,
    total_request_bytes = t.total_request_bytes + EXCLUDED.total_request_bytes,
    total_response_bytes = t.total_response_bytes + EXCLUDED.total_response_bytes
"""
_REQUEST_COUNTER_NAMES = (
    "total_requests, error_requests, total_response_us, total_request_bytes, total_response_bytes"
)

# The endpoint rollups' labels: method and route staged as computed in Python, the route then
# capped per key and UTC day. held: the named routes the batch's key-days have (as of this
# statement's snapshot); the batch's other named routes are admitted in route order into the
# room left (ROUTES_PER_KEY_DAY minus held). Under READ COMMITTED a concurrent writer may have
# inserted one of them since the snapshot: the upsert then waits for it and, DO UPDATE being
# what it is, returns the row anyway, so a route is named exactly when endpoint_routes holds it.
# Two writers that both saw room may together pass the cap by what their batches admitted.
# The NULL key joins as a hashable equality: (key IS NULL, coalesce(key, nil UUID)).
_NIL = "'00000000-0000-0000-0000-000000000000'::uuid"
_SAME_KEY = (
    "({a}.api_key_id IS NULL) = ({b}.api_key_id IS NULL) "
    f"AND coalesce({{a}}.api_key_id, {_NIL}) = coalesce({{b}}.api_key_id, {_NIL})"
)
_ENDPOINT_COUNTER_NAMES = (
    "total_requests, total_response_us, total_request_bytes, total_response_bytes"
)
_ENDPOINT_SUMS = """
    sum(total_requests)::bigint, sum(total_response_us)::bigint,
    sum(total_request_bytes)::bigint, sum(total_response_bytes)::bigint
"""
_ENDPOINT_SET = """
    total_requests = t.total_requests + EXCLUDED.total_requests,
    total_response_us = t.total_response_us + EXCLUDED.total_response_us,
    total_request_bytes = t.total_request_bytes + EXCLUDED.total_request_bytes,
    total_response_bytes = t.total_response_bytes + EXCLUDED.total_response_bytes
"""


def _endpoint_tier(name: str, table: str, column: str, when: str) -> str:
    return f"""{name} AS (
    INSERT INTO public.{table} AS t
        (api_key_id, {column}, method, route, status_code, latency_bucket,
         {_ENDPOINT_COUNTER_NAMES})
    SELECT api_key_id, {when}, method, route, status_code, latency_bucket, {_ENDPOINT_SUMS}
      FROM labelled
     GROUP BY 1, 2, 3, 4, 5, 6
     ORDER BY 1, 2, 3, 4, 5, 6
    ON CONFLICT ON CONSTRAINT uq_{table} DO UPDATE SET {_ENDPOINT_SET}
    RETURNING 1
)"""


# Coarsest first, as the request tiers.
_ENDPOINT_TIERS = ",\n".join(
    (
        _endpoint_tier(
            "emonthly", "monthly_endpoint_usage", "usage_month", "date_trunc('month', q)::date"
        ),
        _endpoint_tier("edaily", "daily_endpoint_usage", "usage_date", "q::date"),
        _endpoint_tier(
            "equarter", "quarter_endpoint_usage", "usage_quarter", "q AT TIME ZONE 'UTC'"
        ),
    )
)

_INSERT_REQUESTS = f"""
WITH new AS (
    INSERT INTO public.api_requests ({", ".join(_REQUEST_COLUMNS)})
    SELECT {", ".join(_REQUEST_COLUMNS)} FROM pg_temp.um_stage_requests AS s
    ORDER BY s.id
    ON CONFLICT DO NOTHING
    RETURNING id, api_key_id, status_code, request_size, response_size,
              (requested_at AT TIME ZONE 'UTC') AS utc_at
), staged AS (
    SELECT n.api_key_id, {_QUARTER.replace("utc_at", "n.utc_at")}, n.status_code,
           n.request_size, n.response_size, s.latency_bucket, s.response_us, s.endpoint_method,
           s.endpoint_route, s.endpoint_bucket
      FROM new AS n
      JOIN pg_temp.um_stage_requests AS s USING (id)
), grouped AS (
    SELECT api_key_id, q, latency_bucket, {_REQUEST_COUNTERS}
      FROM staged
     GROUP BY 1, 2, 3
), quarter AS (
    INSERT INTO public.quarter_request_usage AS t
        (api_key_id, usage_quarter, latency_bucket, {_REQUEST_COUNTER_NAMES})
    SELECT api_key_id, q AT TIME ZONE 'UTC', latency_bucket, {_REQUEST_COUNTER_NAMES}
      FROM grouped
     ORDER BY 1, 2, 3
    ON CONFLICT ON CONSTRAINT uq_quarter_request_usage DO UPDATE SET {_REQUEST_SET}
    RETURNING 1
), hourly AS (
    INSERT INTO public.hourly_request_usage AS t
        (api_key_id, usage_hour, latency_bucket, {_REQUEST_COUNTER_NAMES})
    SELECT api_key_id, date_trunc('hour', q) AT TIME ZONE 'UTC', latency_bucket, {_REQUEST_SUMS}
      FROM grouped
     GROUP BY 1, 2, 3
     ORDER BY 1, 2, 3
    ON CONFLICT ON CONSTRAINT uq_hourly_request_usage DO UPDATE SET {_REQUEST_SET}
    RETURNING 1
), daily AS (
    INSERT INTO public.daily_request_usage AS t
        (api_key_id, usage_date, latency_bucket, {_REQUEST_COUNTER_NAMES})
    SELECT api_key_id, q::date, latency_bucket, {_REQUEST_SUMS}
      FROM grouped
     GROUP BY 1, 2, 3
     ORDER BY 1, 2, 3
    ON CONFLICT ON CONSTRAINT uq_daily_request_usage DO UPDATE SET {_REQUEST_SET}
    RETURNING 1
), monthly AS (
    INSERT INTO public.monthly_request_usage AS t
        (api_key_id, usage_month, latency_bucket, {_REQUEST_COUNTER_NAMES})
    SELECT api_key_id, date_trunc('month', q)::date, latency_bucket, {_REQUEST_SUMS}
      FROM grouped
     GROUP BY 1, 2, 3
     ORDER BY 1, 2, 3
    ON CONFLICT ON CONSTRAINT uq_monthly_request_usage DO UPDATE SET {_REQUEST_SET}
    RETURNING 1
), endpoints AS (
    SELECT api_key_id, q, endpoint_method AS method, endpoint_route AS route,
           status_code::smallint AS status_code, endpoint_bucket AS latency_bucket,
           count(*)::bigint AS total_requests, sum(response_us)::bigint AS total_response_us,
           sum(request_size)::bigint AS total_request_bytes,
           sum(response_size)::bigint AS total_response_bytes
      FROM staged
     GROUP BY 1, 2, 3, 4, 5, 6
), wanted AS (
    SELECT DISTINCT api_key_id, q::date AS d, route
      FROM endpoints
     WHERE route <> '{UNMATCHED_ROUTE}'
), days AS (
    SELECT DISTINCT api_key_id, d FROM wanted
), held AS (
    SELECT e.api_key_id, e.usage_date AS d, e.route
      FROM days JOIN public.endpoint_routes AS e
        ON e.api_key_id = days.api_key_id AND e.usage_date = days.d
    UNION ALL
    SELECT e.api_key_id, e.usage_date, e.route
      FROM days JOIN public.endpoint_routes AS e
        ON days.api_key_id IS NULL AND e.api_key_id IS NULL AND e.usage_date = days.d
), ranked AS (
    SELECT api_key_id, d, route, held,
           count(*) FILTER (WHERE held) OVER (PARTITION BY api_key_id, d) AS n_held,
           row_number() OVER (PARTITION BY api_key_id, d, held ORDER BY route) AS n
      FROM (SELECT api_key_id, d, route, bool_or(held) AS held
              FROM (SELECT api_key_id, d, route, true AS held FROM held
                    UNION ALL
                    SELECT api_key_id, d, route, false FROM wanted) AS u
             GROUP BY 1, 2, 3) AS c
), admitted AS (
    INSERT INTO public.endpoint_routes AS t (api_key_id, usage_date, route)
    SELECT api_key_id, d, route
      FROM ranked
     WHERE NOT held AND n <= {ROUTES_PER_KEY_DAY} - n_held
     ORDER BY 1, 2, 3
    ON CONFLICT ON CONSTRAINT uq_endpoint_routes DO UPDATE SET route = EXCLUDED.route
    RETURNING api_key_id, usage_date AS d, route
), named AS (
    SELECT api_key_id, d, route FROM held
    UNION ALL
    SELECT api_key_id, d, route FROM admitted
), labelled AS (
    SELECT p.api_key_id, p.q, p.method,
           CASE WHEN p.route = '{UNMATCHED_ROUTE}' OR n.route IS NOT NULL THEN p.route
                ELSE '{OTHER_ROUTE}' END AS route,
           p.status_code, p.latency_bucket, p.total_requests, p.total_response_us,
           p.total_request_bytes, p.total_response_bytes
      FROM endpoints AS p
      LEFT JOIN named AS n
        ON n.d = p.q::date AND n.route = p.route AND {_SAME_KEY.format(a="n", b="p")}
), {_ENDPOINT_TIERS}
SELECT (SELECT count(*) FROM new), (SELECT count(*) FROM monthly), (SELECT count(*) FROM daily),
       (SELECT count(*) FROM hourly), (SELECT count(*) FROM quarter),
       (SELECT count(*) FROM admitted), (SELECT count(*) FROM emonthly),
       (SELECT count(*) FROM edaily), (SELECT count(*) FROM equarter)
"""


def pg_write(
    conn: Connection,
    uploads: Sequence[UploadRecord],
    requests: Sequence[RequestRecord],
    timeout: float,
) -> int:
    """Write validated, id-unique records inside ``conn``'s open transaction; returns new rows.

    ``timeout`` (seconds) bounds each statement and any idle time of the transaction.
    """
    dbapi: Any = conn.connection.dbapi_connection
    written = 0
    with dbapi.cursor() as cur:
        # Checked in every transaction, not remembered per client connection: behind a
        # transaction-mode pooler (PgBouncer, Supavisor) each transaction may run on a different
        # server connection, and DISCARD ALL drops temporary tables.
        cur.execute(_STAGING_PRESENT, {"ms": str(max(1, round(timeout * 1000)))})
        if not cur.fetchone()[2]:
            cur.execute(_CREATE_STAGING)
        if uploads:
            with cur.copy(
                f"COPY pg_temp.um_stage_uploads ({', '.join(_UPLOAD_COLUMNS)}) "
                "FROM STDIN (FORMAT BINARY)"
            ) as copy:
                copy.set_types(_UPLOAD_TYPES)
                write_row = copy.write_row
                for u in uploads:
                    write_row(
                        (
                            u.id,
                            u.api_key_id,
                            u.request_id,
                            u.provider,
                            u.file_type,
                            u.declared_type,
                            u.file_size,
                            u.file_name,
                            u.upload_status,
                            u.error_message,
                            u.uploaded_at,
                        )
                    )
            cur.execute(_INSERT_UPLOADS)
            written += cur.fetchone()[0]
        if requests:
            with cur.copy(
                f"COPY pg_temp.um_stage_requests ({', '.join(_REQUEST_COLUMNS + _REQUEST_EXTRA)}) "
                "FROM STDIN (FORMAT BINARY)"
            ) as copy:
                copy.set_types(_REQUEST_TYPES)
                write_row = copy.write_row
                for r in requests:
                    ms = r.response_time_ms
                    fine = latency_bucket(ms)
                    write_row(
                        (
                            r.id,
                            r.api_key_id,
                            r.method,
                            r.path,
                            r.status_code,
                            ms,
                            r.request_size,
                            r.response_size,
                            r.error_message,
                            r.requested_at,
                            r.route_matched,
                            fine,
                            round(ms * 1000),
                            r.method if r.method in STANDARD_METHODS else OTHER_METHOD,
                            r.path if r.route_matched else UNMATCHED_ROUTE,
                            -(-fine // ENDPOINT_BUCKET_WIDTH),
                        )
                    )
            cur.execute(_INSERT_REQUESTS)
            written += cur.fetchone()[0]
    return written
