"""The SQLite backend: embedded, zero set-up, the default choice.

WAL journal, ``synchronous=NORMAL`` and a busy timeout, so several processes can share one
file; writers take the lock up front (``BEGIN IMMEDIATE``) instead of upgrading a read lock,
which SQLite answers with an immediate "database is locked". The write plan is
:mod:`usage_middleware._sqlitewrite`; requests are sealed into their rollups a quarter hour at a
time (:mod:`usage_middleware._sqliteseal`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, create_engine, event, inspect
from sqlalchemy.engine import URL
from sqlalchemy.pool import StaticPool

from .._records import RequestRecord, UploadRecord
from .._schema import FAILURE_INDEXES, metadata
from .._sqliteseal import month_instant, register_functions, seals_table, sqlite_seal
from .._sqliteupgrade import (
    add_route_matched,
    backfill_endpoints,
    backfill_mismatches,
    backfill_quarters,
    replace_request_indexes,
)
from .._sqlitewrite import sqlite_write
from .base import MaintainResult, PackedRows
from .legacy import LegacySource, MigrationResult, migrate_sqlite
from .maintenance import sqlite_prune
from .sql import SQLBackend

__all__ = ["SQLiteBackend"]

# A monthly request rollup added to an older database is filled from the daily one.
_MONTHLY_BACKFILL = """
INSERT INTO monthly_request_usage (usage_month, api_key_id, latency_bucket, total_requests,
    error_requests, total_response_us, total_request_bytes, total_response_bytes)
SELECT substr(usage_date, 1, 7) || '-01', api_key_id, latency_bucket, sum(total_requests),
       sum(error_requests), sum(total_response_us), sum(total_request_bytes),
       sum(total_response_bytes)
  FROM daily_request_usage
 GROUP BY 1, 2, 3
"""


class SQLiteBackend(SQLBackend):
    name = "sqlite"
    parallel_reads = False
    embedded = True

    def __init__(
        self,
        url: URL,
        *,
        connect_timeout: float,
        read_timeout: float | None,
        write_timeout: float,
        engine_options: dict[str, Any],
    ) -> None:
        super().__init__(url, read_timeout=read_timeout, write_timeout=write_timeout)
        options = dict(engine_options)
        database = url.database or ""
        in_memory = (
            database in ("", ":memory:")
            or "mode=memory" in database
            or url.query.get("mode") == "memory"
        )
        self.in_memory = self.ephemeral = in_memory
        connect_args = dict(options.pop("connect_args", {}))
        connect_args.setdefault("timeout", max(connect_timeout, 30.0))
        connect_args.setdefault("check_same_thread", False)
        if in_memory:
            options.setdefault("poolclass", StaticPool)
        self.engine = engine = create_engine(url, connect_args=connect_args, **options)
        busy_ms = int(connect_args["timeout"] * 1000)

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            # Let SQLAlchemy's "begin" hook emit BEGIN itself, so writers can take the lock early.
            dbapi_conn.isolation_level = None
            cursor = dbapi_conn.cursor()
            if not in_memory:
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute("PRAGMA synchronous=NORMAL")
                cursor.execute("PRAGMA temp_store=MEMORY")
            cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
            cursor.close()
            register_functions(dbapi_conn)  # what reads and seals over raw rows compute with

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            immediate = conn.info.get("usage_write", False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    def _create_schema(self) -> None:
        """Missing tables in one write transaction; a ``monthly_request_usage`` added to an older
        database is filled from ``daily_request_usage``, quarter-hour rollups from the hourly
        ones and raw rows, and endpoint rollups from raw requests (which get ``route_matched``,
        and one time-first index in place of their older two), before any writer sees them
        (:mod:`usage_middleware._sqliteupgrade`); ``rollup_seals`` last, its seal instant after
        every request those rollups hold, and its month instant at the midnight before that."""
        with self.engine.connect() as conn:
            conn.info["usage_write"] = True
            try:
                with conn.begin():
                    present = set(inspect(conn).get_table_names())
                    add_route_matched(conn, present)
                    metadata.create_all(conn, checkfirst=True)
                    if "monthly_request_usage" not in present and "daily_request_usage" in present:
                        conn.exec_driver_sql(_MONTHLY_BACKFILL)
                    backfill_quarters(conn, present)
                    backfill_mismatches(conn, present)
                    backfill_endpoints(conn, present)
                    for index in FAILURE_INDEXES:  # tables that predate them lack them
                        index.create(conn, checkfirst=True)
                    replace_request_indexes(conn)
                    seals_table(conn, present)
                    month_instant(conn)
            finally:
                conn.info.pop("usage_write", None)

    def _maintain(self, raw_retention_days: int | None, months_ahead: int) -> MaintainResult:
        """No partitions; raw rows past retention are deleted in short batches."""
        if raw_retention_days is None:
            return MaintainResult()
        return MaintainResult(rows_deleted=sqlite_prune(self, raw_retention_days))

    def _seal(self, before: datetime | None) -> int:
        return sqlite_seal(self.engine, before)

    def _migrate_legacy(self, conn: Connection, source: LegacySource) -> MigrationResult:
        return migrate_sqlite(conn, source)

    def _write_batch(
        self,
        conn: Connection,
        uploads: list[UploadRecord],
        requests: list[RequestRecord],
        packed: PackedRows,
    ) -> tuple[int, datetime | None]:
        return sqlite_write(conn, uploads, requests, packed)

    def before_fork(self) -> None:
        # SQLite file handles must not be shared with a child (an in-memory database has
        # nothing to share but its one connection, which must stay).
        if not self.in_memory:
            self.engine.dispose()
