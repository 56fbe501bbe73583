"""The PostgreSQL backend (plain PostgreSQL 15+ and Supabase), through psycopg 3.

Sessions run in UTC (dates are never shifted by a session time zone) and without JIT, which
costs more than the store's small indexed statements take (it kicks in on row estimates, not
on actual work). The schema is the very SQL file shipped in ``usage_middleware/sql``, run under
an advisory lock so that processes starting at once do not race. The write plan is
:mod:`usage_middleware._pgwrite`.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from sqlalchemy import Connection, create_engine
from sqlalchemy.engine import URL

from .._pgwrite import pg_write
from .._records import RequestRecord, UploadRecord
from .sql import SQLBackend

__all__ = ["PostgresBackend", "sql_text"]

SQL_FILES = ("usage_tracking_schema.sql",)
_SCHEMA_LOCK = 7215120301


def sql_text(name: str) -> str:
    """The text of a file shipped in ``usage_middleware/sql`` (the repository's ``sql/``)."""
    return resources.files("usage_middleware").joinpath("sql").joinpath(name).read_text("utf-8")


class PostgresBackend(SQLBackend):
    name = "postgresql"
    parallel_reads = True

    def __init__(
        self,
        url: URL,
        *,
        connect_timeout: float,
        read_timeout: float | None,
        engine_options: dict[str, Any],
    ) -> None:
        super().__init__(url, read_timeout)
        options = dict(engine_options)
        connect_args = dict(options.pop("connect_args", {}))
        connect_args.setdefault("connect_timeout", max(1, round(connect_timeout)))
        # Options the caller passes come after ours and win.
        ours = "-c timezone=UTC -c jit=off"
        connect_args["options"] = f"{ours} {connect_args.get('options', '')}".strip()
        options.setdefault("pool_pre_ping", True)
        self.engine = create_engine(url, connect_args=connect_args, **options)

    def _create_schema(self) -> None:
        with self.engine.begin() as conn:
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_SCHEMA_LOCK})")
            # Straight to psycopg: no parameters, so the file's own text is sent as is.
            with conn.connection.dbapi_connection.cursor() as cursor:  # type: ignore[union-attr]
                for name in SQL_FILES:
                    cursor.execute(sql_text(name))

    def _write_batch(
        self, conn: Connection, uploads: list[UploadRecord], requests: list[RequestRecord]
    ) -> int:
        return pg_write(conn, uploads, requests)
