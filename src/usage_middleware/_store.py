"""UsageStore: the engine, the schema, and the one write path every row takes.

``write()`` inserts raw rows and updates the rollups in the same transaction, counting only the
rows that were actually new (the primary key is the claim), so replays never double count and a
crash between the two cannot happen. Rollup upserts are sorted by their unique key so that
concurrent writers lock rows in the same order and cannot deadlock.

The dialect-specific plans live beside this module: ``_pgwrite`` (binary COPY into a staging
table, one insert-and-roll-up statement per table) and ``_sqlitewrite`` (the same plan on the
sqlite3 driver).
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Iterable
from importlib import resources
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    Connection,
    Engine,
    create_engine,
    event,
    inspect,
)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, OperationalError
from sqlalchemy.pool import StaticPool

from ._errors import ConfigurationError, DatabaseUnavailableError, SchemaMissingError
from ._maintain import check_retention_days, maintain, prepare_pg_upgrade
from ._pgwrite import pg_write
from ._records import RequestRecord, UploadRecord
from ._schema import (
    ALL_TABLES,
    metadata,
)
from ._sqlitewrite import sqlite_write

if TYPE_CHECKING:
    from uuid import UUID

__all__ = ["UsageStore"]

logger = logging.getLogger(__name__)

Record = UploadRecord | RequestRecord

SQL_FILES = ("usage_tracking_schema.sql",)


def sql_text(name: str) -> str:
    """The text of a file shipped in ``usage_middleware/sql`` (the repository's ``sql/``)."""
    return resources.files("usage_middleware").joinpath("sql").joinpath(name).read_text("utf-8")


def _normalize_url(url: str | URL) -> URL:
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise ConfigurationError(
            f"cannot parse database URL {str(url)!r:.80}: use 'sqlite:///path/usage.db' or "
            "'postgresql+psycopg://user:password@host:5432/dbname'"
        ) from exc
    backend = parsed.get_backend_name()
    if backend in ("postgresql", "postgres"):
        if parsed.drivername in ("postgresql", "postgres", "postgresql+psycopg2"):
            parsed = parsed.set(drivername="postgresql+psycopg")
        if parsed.drivername != "postgresql+psycopg":
            raise ConfigurationError(
                f"unsupported PostgreSQL driver {parsed.drivername!r}: use 'postgresql+psycopg://'"
            )
    elif backend == "sqlite":
        if parsed.drivername != "sqlite":
            raise ConfigurationError(
                f"unsupported SQLite driver {parsed.drivername!r}: use 'sqlite:///path/usage.db'"
            )
    else:
        raise ConfigurationError(
            f"unsupported database URL scheme {parsed.drivername!r}: usage-middleware stores to "
            "'sqlite:///path/usage.db' or 'postgresql+psycopg://user@host/dbname'"
        )
    return parsed


_SQLITE_MONTHLY_BACKFILL = """
INSERT INTO monthly_request_usage (usage_month, api_key_id, latency_bucket, total_requests,
    error_requests, total_response_us, total_request_bytes, total_response_bytes)
SELECT substr(usage_date, 1, 7) || '-01', api_key_id, latency_bucket, sum(total_requests),
       sum(error_requests), sum(total_response_us), sum(total_request_bytes),
       sum(total_response_bytes)
  FROM daily_request_usage
 GROUP BY 1, 2, 3
"""


class UsageStore:
    """Owns the SQLAlchemy engine for the usage tables of one database.

    ``url`` is a SQLAlchemy URL: ``sqlite:///usage.db`` (embedded, the default choice) or
    ``postgresql+psycopg://user:pw@host/db`` (``postgresql://`` and ``postgres://`` are accepted
    and use psycopg 3). The constructor does not connect; the schema is created on first use
    unless ``auto_create_schema=False``, in which case a missing schema raises
    :class:`SchemaMissingError`. ``raw_retention_days`` (default None: keep every raw row) is the
    age past which raw rows are pruned, by ``usage-middleware maintain`` and at each
    ``create_schema()``; the rollups are never pruned (see ``_maintain``).
    """

    def __init__(
        self,
        url: str | URL,
        *,
        auto_create_schema: bool = True,
        connect_timeout: float = 5.0,
        engine_options: dict[str, Any] | None = None,
        raw_retention_days: int | None = None,
    ) -> None:
        if connect_timeout <= 0:
            raise ConfigurationError(f"connect_timeout must be > 0, got {connect_timeout!r}")
        self.url = _normalize_url(url)
        self.dialect = "postgresql" if self.url.get_backend_name() != "sqlite" else "sqlite"
        self.auto_create_schema = auto_create_schema
        self.raw_retention_days = check_retention_days(raw_retention_days)
        self._schema_ready = False
        self._schema_lock = threading.Lock()
        self._recorders: weakref.WeakSet[Any] = weakref.WeakSet()
        options: dict[str, Any] = dict(engine_options or {})
        try:
            if self.dialect == "sqlite":
                self.engine = self._sqlite_engine(options, connect_timeout)
            else:
                connect_args = dict(options.pop("connect_args", {}))
                connect_args.setdefault("connect_timeout", max(1, round(connect_timeout)))
                # UTC sessions; no JIT, which costs more than the read path's small indexed
                # statements take (it kicks in on row estimates, not on actual work). Options
                # the caller passes come later and win.
                ours = "-c timezone=UTC -c jit=off"
                connect_args["options"] = f"{ours} {connect_args.get('options', '')}".strip()
                options.setdefault("pool_pre_ping", True)
                self.engine = create_engine(self.url, connect_args=connect_args, **options)
        except (NoSuchModuleError, ImportError) as exc:
            raise ConfigurationError(
                f"the driver for {self.url.drivername!r} is not installed: "
                "pip install 'usage-middleware[postgres]'"
            ) from exc

    def _sqlite_engine(self, options: dict[str, Any], timeout: float) -> Engine:
        database = self.url.database or ""
        in_memory = database in ("", ":memory:") or "mode=memory" in database
        connect_args = dict(options.pop("connect_args", {}))
        connect_args.setdefault("timeout", max(timeout, 30.0))
        connect_args.setdefault("check_same_thread", False)
        if in_memory:
            options.setdefault("poolclass", StaticPool)
        engine = create_engine(self.url, connect_args=connect_args, **options)

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            # Let SQLAlchemy's "begin" hook emit BEGIN itself, so writers can take the lock early.
            dbapi_conn.isolation_level = None
            cursor = dbapi_conn.cursor()
            if not in_memory:
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute(f"PRAGMA busy_timeout={int(connect_args['timeout'] * 1000)}")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            immediate = conn.info.get("usage_write", False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

        return engine

    def __repr__(self) -> str:
        return f"UsageStore({self.url.render_as_string(hide_password=True)!r})"

    # --- schema ------------------------------------------------------------------------------

    def create_schema(self) -> None:
        """Create every table, index and function; safe to call any number of times.

        On PostgreSQL this runs the very files in ``sql/`` under an advisory lock, so several
        processes starting at once do not race; unpartitioned raw tables of an older install are
        converted (see the schema file). On SQLite it builds the equivalent tables. With
        ``raw_retention_days`` set, raw rows past it are then pruned (``_maintain.maintain``).
        """
        try:
            if self.dialect == "sqlite":
                self._create_sqlite_schema()
            else:
                prepare_pg_upgrade(self.engine)
                with self.engine.begin() as conn:
                    conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7215120301)")
                    # Straight to psycopg: no parameters, so the files' own text is sent as is.
                    with conn.connection.dbapi_connection.cursor() as cursor:  # type: ignore[union-attr]
                        for name in SQL_FILES:
                            cursor.execute(sql_text(name))
        except DBAPIError as exc:
            raise self._unavailable(exc) from exc
        self._schema_ready = True
        if self.raw_retention_days is not None:
            maintain(self)

    def _create_sqlite_schema(self) -> None:
        """Create missing tables in one write transaction; a ``monthly_request_usage`` added to
        an older database is filled from ``daily_request_usage`` before any writer sees it."""
        with self.engine.connect() as conn:
            conn.info["usage_write"] = True
            try:
                with conn.begin():
                    present = set(inspect(conn).get_table_names())
                    metadata.create_all(conn, checkfirst=True)
                    if "monthly_request_usage" not in present and "daily_request_usage" in present:
                        conn.exec_driver_sql(_SQLITE_MONTHLY_BACKFILL)
            finally:
                conn.info.pop("usage_write", None)

    def has_schema(self) -> bool:
        """True when every usage table exists."""
        try:
            with self.engine.connect() as conn:
                present = set(inspect(conn).get_table_names())
        except DBAPIError as exc:
            raise self._unavailable(exc) from exc
        return set(ALL_TABLES) <= present

    def ensure_schema(self) -> None:
        """Create the schema (or check it exists, with auto-creation off) once per store."""
        if self._schema_ready:
            return
        with self._schema_lock:
            if self._schema_ready:
                return
            if self.auto_create_schema:
                self.create_schema()
            elif not self.has_schema():
                raise SchemaMissingError(
                    "the usage tables do not exist in "
                    f"{self.url.render_as_string(hide_password=True)}: call store.create_schema(), "
                    "run sql/usage_tracking_schema.sql, or pass auto_create_schema=True"
                )
            self._schema_ready = True

    def _unavailable(self, exc: DBAPIError) -> Exception:
        """``DatabaseUnavailableError`` for errors a retry can cure; others unchanged."""
        message = str(exc.orig).strip()
        if exc.connection_invalidated or (
            isinstance(exc, OperationalError) and "no such table" not in message
        ):
            return DatabaseUnavailableError(
                f"cannot reach {self.url.render_as_string(hide_password=True)}: {message} "
                "(check that the server is running and the URL, file path and credentials "
                "are right; the recorder keeps retrying)"
            )
        return exc

    # --- writing -----------------------------------------------------------------------------

    def write(self, records: Iterable[Record]) -> int:
        """Store uploads and requests in one transaction, rollups included; idempotent by ``id``.

        Every record is validated before anything is written. Returns how many rows were new
        (records whose ``id`` is already stored, or repeated within the batch, count zero).
        """
        uploads: dict[UUID, UploadRecord] = {}
        requests: dict[UUID, RequestRecord] = {}
        for record in records:
            if isinstance(record, UploadRecord):
                record.validate()
                uploads.setdefault(record.id, record)
            elif isinstance(record, RequestRecord):
                record.validate()
                requests.setdefault(record.id, record)
            else:
                raise TypeError(
                    "store.write() takes UploadRecord and RequestRecord, "
                    f"got {type(record).__name__}"
                )
        if not uploads and not requests:
            return 0
        self.ensure_schema()
        try:
            with self.engine.connect() as conn:
                conn.info["usage_write"] = True
                try:
                    with conn.begin():
                        written = self._write_batch(
                            conn, list(uploads.values()), list(requests.values())
                        )
                finally:
                    conn.info.pop("usage_write", None)
        except DBAPIError as exc:
            raise self._unavailable(exc) from exc
        return written

    def _write_batch(
        self,
        conn: Connection,
        uploads: list[UploadRecord],
        requests: list[RequestRecord],
    ) -> int:
        if self.dialect == "postgresql":
            return pg_write(conn, uploads, requests)
        return sqlite_write(conn, uploads, requests)

    # --- lifecycle ---------------------------------------------------------------------------

    def attach_recorder(self, recorder: Any) -> None:
        """Remember a running recorder so health checks can report its stats."""
        self._recorders.add(recorder)

    @property
    def recorders(self) -> list[Any]:
        return list(self._recorders)

    def dispose(self) -> None:
        """Close pooled connections (call after fork, or at exit)."""
        self.engine.dispose()
