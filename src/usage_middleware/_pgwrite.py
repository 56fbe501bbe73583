"""The PostgreSQL write path: binary COPY into a staging table, then one statement per table.

Requests have a plan of their own (:mod:`usage_middleware._pgrequests`): live ones are raw rows
only, their rollups sealed every quarter hour. For uploads, per batch the rows are COPYed
(binary) into a session-local temporary table that empties itself at commit, and a single
statement does the rest inside the server::

    WITH new AS (INSERT INTO file_uploads SELECT .. FROM staging ORDER BY id
                 [ON CONFLICT DO NOTHING] RETURNING ..),
         g   AS (SELECT .. FROM new GROUP BY key, UTC quarter hour),
         q   AS (INSERT INTO quarter_usage SELECT .. FROM g ORDER BY key
                 ON CONFLICT ON CONSTRAINT uq_quarter_usage DO UPDATE SET counter = counter + ..),
         h   AS (.. g summed by hour into hourly_usage ..),
         d   AS (.. g summed by day into daily_usage ..),
         m   AS (.. new rows whose declared type differs, by quarter, into quarter_mismatch_usage)
    SELECT count(*) FROM new, count(*) FROM d, h, q, m  -- this order is the lock order

A batch is first inserted plainly, under a savepoint: nearly every batch is new rows, and
``ON CONFLICT DO NOTHING`` makes the server probe the primary key for each row before inserting
it (a sixth of the statement's time on live batches). A batch that holds an id already stored (a
replay, or another process's copy of it) fails with a unique violation and is redone from the
same staging table with ``ON CONFLICT DO NOTHING``, which names no conflict target on purpose:
the raw tables are partitioned by month, so their primary key is (id, time), which a replay
(same id, same time) hits; an install whose tables are not converted yet has it on (id). Either
way only an already stored id conflicts.

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
from datetime import datetime
from typing import Any

import psycopg
from sqlalchemy import Connection

from ._pgrequests import IdDumper, write_requests
from ._pgrollups import QUARTER, added, sums
from ._records import RequestRecord, UploadRecord
from ._storage.base import PackedRows, request_value_rows, upload_value_rows

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
    "WHERE attrelid = to_regclass('pg_temp.um_stage_requests') AND attname = 'endpoint_bucket'), "
    "to_regclass('public.rollup_seals') IS NOT NULL"
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
_UPLOAD_COUNTER_NAMES = "total_uploads, total_file_size, successful_requests, failed_requests"
_UPLOAD_SUMS = sums(_UPLOAD_COUNTER_NAMES)
_UPLOAD_SET = added(_UPLOAD_COUNTER_NAMES)

_INSERT_UPLOADS = f"""
WITH new AS (
    INSERT INTO public.file_uploads ({", ".join(_UPLOAD_COLUMNS)})
    SELECT {", ".join(_UPLOAD_COLUMNS)} FROM pg_temp.um_stage_uploads AS s
    ORDER BY s.id{{conflict}}
    RETURNING api_key_id, provider, file_type, declared_type, file_size, upload_status,
              (uploaded_at AT TIME ZONE 'UTC') AS utc_at
), grouped AS (
    SELECT api_key_id, {QUARTER}, provider, file_type, {_UPLOAD_COUNTERS}
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
    SELECT api_key_id, {QUARTER.removesuffix(" AS q")} AT TIME ZONE 'UTC', provider, file_type,
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
#: Every staged row new (the batch fails on an id already stored), after a savepoint in the
#: same message; and skipping stored ids.
_INSERT_NEW_UPLOADS = "SAVEPOINT um_uploads;\n" + _INSERT_UPLOADS.replace("{conflict}", "")
_INSERT_OR_SKIP_UPLOADS = _INSERT_UPLOADS.replace("{conflict}", "\n    ON CONFLICT DO NOTHING")


def pg_write(
    conn: Connection,
    uploads: Sequence[UploadRecord],
    requests: Sequence[RequestRecord],
    packed: PackedRows,
    timeout: float,
) -> tuple[int, datetime | None]:
    """Write validated, id-unique records and ``packed`` rows inside ``conn``'s open
    transaction; returns how many rows were new and, when there were requests, the seal instant
    they were written under.

    ``timeout`` (seconds) bounds each statement and any idle time of the transaction.
    """
    dbapi: Any = conn.connection.dbapi_connection
    written = 0
    sealed_before = None
    with dbapi.cursor() as cur:
        # ids as 128-bit integers
        cur.adapters.register_dumper(None, IdDumper)
        # Checked in every transaction, not remembered per client connection: behind a
        # transaction-mode pooler (PgBouncer, Supavisor) each transaction may run on a different
        # server connection, and DISCARD ALL drops temporary tables.
        cur.execute(_STAGING_PRESENT, {"ms": str(max(1, round(timeout * 1000)))})
        _, _, staging, sealing = cur.fetchone()
        if not staging:
            cur.execute(_CREATE_STAGING, prepare=False)
        if uploads or packed.uploads:
            with cur.copy(
                f"COPY pg_temp.um_stage_uploads ({', '.join(_UPLOAD_COLUMNS)}) "
                "FROM STDIN (FORMAT BINARY)"
            ) as copy:
                copy.set_types(_UPLOAD_TYPES)
                write_row = copy.write_row
                for row in upload_value_rows(uploads, packed.uploads):  # _UPLOAD_COLUMNS order
                    write_row(row)
            written += _insert_uploads(cur)
        if requests or packed.requests:
            new, sealed_before = write_requests(
                cur, request_value_rows(requests, packed.requests), sealing
            )
            written += new
    return written, sealed_before


def _insert_uploads(cur: Any) -> int:
    """The staged uploads into the raw table and their rollups; returns how many were new.

    The savepoint and the insert go in one message, as the simple query protocol allows for
    statements without parameters (``prepare=False``: a prepared statement holds one): a write
    to a distant database costs no round trip more than a single insert did.
    """
    try:
        cur.execute(_INSERT_NEW_UPLOADS, prepare=False)
        cur.nextset()  # from the savepoint's result to the insert's
    except psycopg.errors.UniqueViolation:
        cur.execute("ROLLBACK TO SAVEPOINT um_uploads")
        cur.execute(_INSERT_OR_SKIP_UPLOADS)
    return int(cur.fetchone()[0])
