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

from contextlib import AbstractContextManager
from datetime import datetime
from importlib import resources
from typing import Any

from sqlalchemy import Connection, create_engine, event
from sqlalchemy.engine import URL
from sqlalchemy.exc import InvalidatePoolError

from .._pgseal import pg_seal
from .._pgwrite import pg_write
from .._records import RequestRecord, UploadRecord
from .base import MaintainResult, PackedRows
from .legacy import LegacySource, MigrationResult, migrate_postgres
from .maintenance import pg_maintain, prepare_pg_upgrade
from .sql import SQLBackend
from .watchdog import watched

__all__ = ["PostgresBackend", "sql_text"]

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
                    cursor.execute(sql_text(name), prepare=False)

    def _maintain(self, raw_retention_days: int | None, months_ahead: int) -> MaintainResult:
        return pg_maintain(self, raw_retention_days, months_ahead)

    def _migrate_legacy(self, conn: Connection, source: LegacySource) -> MigrationResult:
        return migrate_postgres(conn, source)

    def _write_batch(
        self,
        conn: Connection,
        uploads: list[UploadRecord],
        requests: list[RequestRecord],
        packed: PackedRows,
    ) -> tuple[int, datetime | None]:
        return pg_write(conn, uploads, requests, packed, self.write_timeout)

    def _seal(self, before: datetime | None) -> int:
        return pg_seal(self.engine, self._bounded, 10 * self.write_timeout, before)
