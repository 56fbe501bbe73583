"""Partitions and raw-row retention inside the SQL engines (what their ``maintain`` runs).

PostgreSQL keeps the raw tables partitioned by UTC month (see ``sql/usage_tracking_schema.sql``);
``public.usage_maintain()`` there creates partitions ahead and drops those past the retention
age, so :func:`pg_maintain` only calls it — once per batch of a converted install's old rows,
each call its own transaction. SQLite has no partitions: old raw rows are deleted in batches of
:data:`SQLITE_BATCH`, each its own short write transaction, so a recorder writing meanwhile waits
for one batch at most, never for the whole prune. The rollups are never pruned.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING

from sqlalchemy import Engine, func, inspect, select, text
from sqlalchemy.exc import ProgrammingError

from .._schema import usage_retention
from .base import MaintainResult

if TYPE_CHECKING:
    from .sql import SQLBackend

__all__ = ["pg_maintain", "prepare_pg_upgrade", "sql_retention_start", "sqlite_prune"]

logger = logging.getLogger(__name__)

UTC = timezone.utc
RAW_TABLES = (("file_uploads", "uploaded_at"), ("api_requests", "requested_at"))
SQLITE_BATCH = 5_000
PG_BATCH = 50_000


def pg_maintain(backend: SQLBackend, days: int | None, months_ahead: int) -> MaintainResult:
    created = dropped = deleted = skipped = 0
    while True:
        with backend.engine.begin() as conn:
            row = conn.execute(
                text("SELECT * FROM public.usage_maintain(:ahead, :days, :batch)"),
                {"ahead": months_ahead, "days": days, "batch": PG_BATCH},
            ).one()
        created += row.partitions_created
        dropped += row.partitions_dropped
        deleted += row.rows_deleted
        skipped = row.skipped
        if not row.more:
            return MaintainResult(created, dropped, deleted, skipped)


_SQLITE_RETENTION_UPSERT = (
    "INSERT INTO usage_retention (table_name, raw_complete_from) VALUES (?, ?) "
    "ON CONFLICT (table_name) DO UPDATE "
    "SET raw_complete_from = max(raw_complete_from, excluded.raw_complete_from)"
)


def sqlite_prune(backend: SQLBackend, days: int, batch: int = SQLITE_BATCH) -> int:
    """Delete raw rows older than ``days`` days, ``batch`` rows per write transaction."""
    cutoff = datetime.now(UTC) - timedelta(days=days)
    # The form the write path stores (naive UTC text), so the comparison is the index's.
    cutoff_text = cutoff.replace(tzinfo=None).isoformat(" ", "microseconds")
    total = 0
    usage_retention.create(backend.engine, checkfirst=True)  # absent from pre-retention installs
    for table, column in RAW_TABLES:
        while True:
            with backend.engine.connect() as conn:
                conn.info["usage_write"] = True
                try:
                    with conn.begin():
                        n = conn.exec_driver_sql(
                            f"DELETE FROM {table} WHERE rowid IN "
                            f"(SELECT rowid FROM {table} WHERE {column} < ? LIMIT ?)",
                            (cutoff_text, batch),
                        ).rowcount
                        if n:
                            conn.exec_driver_sql(_SQLITE_RETENTION_UPSERT, (table, cutoff_text))
                finally:
                    conn.info.pop("usage_write", None)
            total += n
            if n < batch:
                break
    return total


def sql_retention_start(backend: SQLBackend, names: list[str]) -> datetime | None:
    """The latest instant before which retention removed raw rows of the tables ``names``
    (None: none was ever removed)."""
    query = select(func.max(usage_retention.c.raw_complete_from)).where(
        usage_retention.c.table_name.in_(names)
    )
    with backend.engine.connect() as conn:
        if not inspect(conn).has_table("usage_retention"):
            return None  # an install older than retention: nothing was ever pruned
        value: datetime | None = conn.execute(query).scalar()
    return value


_PLAIN_RAW_TABLES = (
    "SELECT c.relname FROM pg_catalog.pg_class AS c "
    "WHERE c.oid IN (to_regclass('public.file_uploads'), to_regclass('public.api_requests')) "
    "AND c.relkind = 'r'"
)
_INVALID_INDEX = (
    "SELECT NOT i.indisvalid FROM pg_catalog.pg_index AS i WHERE i.indexrelid = to_regclass(%s)"
)


def prepare_pg_upgrade(engine: Engine) -> None:
    """Build, CONCURRENTLY, the unique (id, time) index an unpartitioned raw table needs.

    The schema file converts such a table into the partition of its old rows, and that needs a
    primary key on (id, time). With this index already there, it is taken as is, so the
    conversion's lock lasts one scan of the table instead of an index build; built
    concurrently, it never blocks writers. Does nothing once the tables are partitioned.
    """
    with engine.connect() as conn:
        plain = {row[0] for row in conn.exec_driver_sql(_PLAIN_RAW_TABLES)}
        conn.rollback()
    if not plain:
        return
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("SELECT pg_advisory_lock(7215120302)")
        try:
            plain = {row[0] for row in conn.exec_driver_sql(_PLAIN_RAW_TABLES)}
            for table, column in RAW_TABLES:
                if table not in plain:
                    continue
                name = f"um_{table}_id_time"
                # An interrupted concurrent build leaves an invalid index behind: rebuild it.
                if conn.exec_driver_sql(_INVALID_INDEX, (f"public.{name}",)).scalar():
                    conn.exec_driver_sql(f"DROP INDEX CONCURRENTLY public.{name}")
                try:
                    conn.exec_driver_sql(
                        f"CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS {name} "
                        f"ON public.{table} (id, {column})"
                    )
                except ProgrammingError as exc:
                    # Converted meanwhile by another process: nothing left to prepare.
                    logger.info("usage-middleware: %s index not built: %s", table, exc.orig)
        finally:
            conn.exec_driver_sql("SELECT pg_advisory_unlock(7215120302)")
