"""Partitions and raw-row retention: what ``usage-middleware maintain`` (or cron) runs.

PostgreSQL keeps the raw tables partitioned by UTC month (see ``sql/usage_tracking_schema.sql``);
``public.usage_maintain()`` there creates partitions ahead and drops those past the retention
age, so this module only calls it — once per batch of a converted install's old rows, each call
its own transaction. SQLite has no partitions: old raw rows are deleted in batches of
:data:`SQLITE_BATCH`, each its own short write transaction, so a recorder writing meanwhile waits
for one batch at most, never for the whole prune. The rollups are never pruned.

:func:`retention_start` tells the read path from which instant raw rows are complete.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING

from sqlalchemy import Engine, func, inspect, select, text
from sqlalchemy.exc import DBAPIError, ProgrammingError

from ._errors import ConfigurationError
from ._schema import usage_retention

if TYPE_CHECKING:
    from ._store import UsageStore

__all__ = ["MaintainResult", "maintain", "prepare_pg_upgrade", "retention_start"]

logger = logging.getLogger(__name__)

UTC = timezone.utc
RAW_TABLES = (("file_uploads", "uploaded_at"), ("api_requests", "requested_at"))
SQLITE_BATCH = 5_000
PG_BATCH = 50_000
MAX_MONTHS_AHEAD = 120
MAX_RETENTION_DAYS = 36_500


@dataclass(frozen=True)
class MaintainResult:
    """What one :func:`maintain` run did.

    ``skipped`` counts PostgreSQL partitions due for dropping whose lock was not granted within
    5 s (a long read held it); the next run drops them.
    """

    partitions_created: int = 0
    partitions_dropped: int = 0
    rows_deleted: int = 0
    skipped: int = 0


def check_retention_days(days: int | None) -> int | None:
    """``days`` if it is a valid raw retention (None: keep raw rows forever)."""
    if days is not None and (
        isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= MAX_RETENTION_DAYS
    ):
        raise ConfigurationError(
            f"raw_retention_days must be an integer in 1..{MAX_RETENTION_DAYS} or None, "
            f"got {days!r}"
        )
    return days


def maintain(
    store: UsageStore,
    *,
    raw_retention_days: int | None = None,
    months_ahead: int = 3,
) -> MaintainResult:
    """Create raw partitions ahead and prune raw rows past the retention age; idempotent.

    ``raw_retention_days`` defaults to the store's own option; None keeps every raw row. On
    PostgreSQL, months wholly older than the cutoff are dropped (the month holding the cutoff
    keeps all its rows); on SQLite, rows older than the cutoff are deleted in batches.
    """
    days = check_retention_days(
        store.raw_retention_days if raw_retention_days is None else raw_retention_days
    )
    if (
        isinstance(months_ahead, bool)
        or not isinstance(months_ahead, int)
        or not (0 <= months_ahead <= MAX_MONTHS_AHEAD)
    ):
        raise ConfigurationError(
            f"months_ahead must be an integer in 0..{MAX_MONTHS_AHEAD}, got {months_ahead!r}"
        )
    store.ensure_schema()
    try:
        if store.dialect == "postgresql":
            return _pg_maintain(store, days, months_ahead)
        if days is None:
            return MaintainResult()
        return MaintainResult(rows_deleted=_sqlite_prune(store, days))
    except DBAPIError as exc:
        raise store._unavailable(exc) from exc


def _pg_maintain(store: UsageStore, days: int | None, months_ahead: int) -> MaintainResult:
    created = dropped = deleted = skipped = 0
    while True:
        with store.engine.begin() as conn:
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


def _sqlite_prune(store: UsageStore, days: int, batch: int = SQLITE_BATCH) -> int:
    """Delete raw rows older than ``days`` days, ``batch`` rows per write transaction."""
    cutoff = datetime.now(UTC) - timedelta(days=days)
    # The form the write path stores (naive UTC text), so the comparison is the index's.
    cutoff_text = cutoff.replace(tzinfo=None).isoformat(" ", "microseconds")
    total = 0
    usage_retention.create(store.engine, checkfirst=True)  # absent from pre-retention installs
    for table, column in RAW_TABLES:
        while True:
            with store.engine.connect() as conn:
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


def retention_start(store: UsageStore, table: str | None = None) -> datetime | None:
    """The instant from which raw rows are complete: retention removed none at or after it.

    ``table`` is ``"file_uploads"`` or ``"api_requests"``; by default, the later of the two (from
    then on both are complete). None: no raw row was ever pruned, raw rows cover all time.
    """
    names = [name for name, _ in RAW_TABLES]
    if table is not None:
        if table not in names:
            raise ConfigurationError(f"table must be one of {names}, got {table!r}")
        names = [table]
    query = select(func.max(usage_retention.c.raw_complete_from)).where(
        usage_retention.c.table_name.in_(names)
    )
    store.ensure_schema()
    try:
        with store.engine.connect() as conn:
            if not inspect(conn).has_table("usage_retention"):
                return None  # an install older than retention: nothing was ever pruned
            value: datetime | None = conn.execute(query).scalar()
    except DBAPIError as exc:
        raise store._unavailable(exc) from exc
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
