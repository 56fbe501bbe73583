"""The PostgreSQL backend (plain PostgreSQL 15+ and Supabase), through psycopg 3.

Every write is bounded by ``write_timeout`` at the client (:mod:`.watchdog`) and, per
transaction, at the server (``statement_timeout``, ``idle_in_transaction_session_timeout``);
getting a pooled connection is bounded by ``connect_timeout``. Sessions run in UTC (dates are
never shifted by a session time zone) and without JIT, which costs more than the store's small
indexed statements take (it kicks in on row estimates, not on actual work). The schema is the
very SQL file shipped in ``usage_middleware/sql``, run under an advisory lock so that processes
starting at once do not race. The write plan is :mod:`usage_middleware._pgwrite`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from datetime import datetime, timezone
from importlib import resources
from typing import Any

from sqlalchemy import Connection, create_engine, event
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError, InvalidatePoolError

from .._pgseal import SEAL_INTERVAL, pg_seal, seal_due
from .._pgwrite import pg_write
from .._records import RequestRecord, UploadRecord
from .base import MaintainResult
from .legacy import LegacySource, MigrationResult, migrate_postgres
from .maintenance import pg_maintain, prepare_pg_upgrade
from .sql import SQLBackend
from .watchdog import watched

__all__ = ["PostgresBackend", "sql_text"]

logger = logging.getLogger(__name__)

SQL_FILES = ("usage_tracking_schema.sql",)
_SCHEMA_LOCK = 7215120301


def sql_text(name: str) -> str:
    """The text of a file shipped in ``usage_middleware/sql`` (the repository's ``sql/``)."""
    return resources.files("usage_middleware").joinpath("sql").joinpath(name).read_text("utf-8")


class PostgresBackend(SQLBackend):
    name = "postgresql"
    parallel_reads = True
    embedded = False
    ephemeral = False

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
        # Sealing (see usage_middleware._pgseal): a writing process checks every SEAL_INTERVAL
        # seconds, the first time one interval after it started, whether a quarter hour is due.
        self._seal_lock = threading.Lock()
        self._seal_checked = time.monotonic()
        self._sealed_before: datetime | None = None
        options = dict(engine_options)
        connect_args = dict(options.pop("connect_args", {}))
        connect_args.setdefault("connect_timeout", max(1, round(connect_timeout)))
        # Options the caller passes come after ours and win.
        ours = "-c timezone=UTC -c jit=off"
        connect_args["options"] = f"{ours} {connect_args.get('options', '')}".strip()
        # The pooled connection's liveness check is ours, not pool_pre_ping's, so that it too
        # is bounded: a ping through a frozen proxy would otherwise wait forever.
        ping = options.pop("pool_pre_ping", True)
        self.engine = engine = create_engine(url, connect_args=connect_args, **options)
        if ping:
            timeout = connect_timeout

            @event.listens_for(engine, "connect")
            def _on_connect(_dbapi_conn: Any, record: Any) -> None:
                record.info["usage_fresh"] = True

            @event.listens_for(engine, "checkout")
            def _on_checkout(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
                if record.info.pop("usage_fresh", False):
                    return  # just connected: nothing to check
                try:
                    with watched(dbapi_conn, timeout):
                        alive = engine.dialect.do_ping(dbapi_conn)
                except engine.dialect.loaded_dbapi.Error as exc:
                    raise InvalidatePoolError(f"pooled connection is dead: {exc}") from exc
                if not alive:
                    raise InvalidatePoolError("pooled connection is dead")

    def _bounded(self, conn: Connection, timeout: float) -> AbstractContextManager[Any]:
        return watched(conn.connection.dbapi_connection, timeout)

    def _create_schema(self) -> None:
        # Unpartitioned raw tables of an older install get their (id, time) index built
        # concurrently first, so the file's conversion holds its lock for one scan only.
        prepare_pg_upgrade(self.engine)
        # An upgrade may fill a new rollup table from an old one: ten write bounds.
        with (
            self.engine.connect() as conn,
            self._bounded(conn, 10 * self.write_timeout),
            conn.begin(),
        ):
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_SCHEMA_LOCK})")
            # Straight to psycopg: no parameters, so the file's own text is sent as is.
            with conn.connection.dbapi_connection.cursor() as cursor:  # type: ignore[union-attr]
                for name in SQL_FILES:
                    cursor.execute(sql_text(name))

    def _maintain(self, raw_retention_days: int | None, months_ahead: int) -> MaintainResult:
        self.seal()  # retention never prunes requests that no seal holds
        return pg_maintain(self, raw_retention_days, months_ahead)

    def _migrate_legacy(self, conn: Connection, source: LegacySource) -> MigrationResult:
        return migrate_postgres(conn, source)

    def _write_batch(
        self, conn: Connection, uploads: list[UploadRecord], requests: list[RequestRecord]
    ) -> int:
        written, sealed_before = pg_write(conn, uploads, requests, self.write_timeout)
        if sealed_before is not None:
            self._sealed_before = sealed_before
        return written

    def write(self, uploads: Sequence[UploadRecord], requests: Sequence[RequestRecord]) -> int:
        """The write, then — at most every ``SEAL_INTERVAL`` seconds — a seal if a quarter hour
        is due. A seal that fails is logged and tried at the next check; the write stands."""
        written = super().write(uploads, requests)
        if (
            self._sealed_before is not None
            and time.monotonic() - self._seal_checked >= SEAL_INTERVAL
            and self._seal_lock.acquire(blocking=False)
        ):
            try:
                self._seal_checked = time.monotonic()
                if seal_due(datetime.now(timezone.utc), self._sealed_before):
                    self.seal()
            except Exception as exc:  # the write succeeded; sealing waits for the next check
                logger.warning("usage-middleware: sealing the request rollups failed: %s", exc)
            finally:
                self._seal_lock.release()
        return written

    def after_fork(self) -> None:
        super().after_fork()
        self._seal_lock = threading.Lock()  # a parent's seal may have held it at fork time
        self._seal_checked = time.monotonic()

    def seal(self, before: datetime | None = None) -> int:
        """Fold the raw requests that no seal holds yet, up to ``before`` (default: the last
        whole quarter hour that ended two minutes ago), into the rollups; returns how many."""
        try:
            folded = pg_seal(self.engine, self._bounded, 10 * self.write_timeout, before)
        except DBAPIError as exc:
            raise self.unavailable(exc) from exc
        self._sealed_before = None  # read afresh by the next write
        return folded
