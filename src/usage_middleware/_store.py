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

import heapq
import itertools
import logging
import os
import re
import socket
import threading
import time
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext, suppress
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
from sqlalchemy.exc import (
    ArgumentError,
    DataError,
    DBAPIError,
    IntegrityError,
    InvalidatePoolError,
    NoSuchModuleError,
    OperationalError,
)
from sqlalchemy.pool import StaticPool

from ._errors import (
    ConfigurationError,
    DatabaseUnavailableError,
    RecordsRefusedError,
    SchemaMissingError,
)
from ._pgwrite import pg_write
from ._records import RequestRecord, UploadRecord
from ._schema import (
    ALL_TABLES,
    metadata,
)
from ._sqlitewrite import sqlite_write

if TYPE_CHECKING:
    from uuid import UUID

__all__ = ["UsageStore", "display_url"]

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


# Query parameters (libpq keywords such as password, sslpassword) whose values must not be shown,
# and the same inside a conninfo string or URL given as a value (libpq expands a dbname holding
# one). Over-masking a harmless value (a key file path) costs nothing.
_SECRET_NAME = r"[A-Za-z_]*(?:pass|pwd|secret|token|key|credential)[A-Za-z_]*"
_SECRET_PARAM = re.compile(rf"(?i)\b({_SECRET_NAME})(\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&]*)")
_URL_USERINFO = re.compile(r"(://[^:@/?#\s]*):[^@/?#\s]*@")
_MASK = "***"


def _mask_text(text: str) -> str:
    text = _URL_USERINFO.sub(rf"\1:{_MASK}@", text)
    return _SECRET_PARAM.sub(rf"\1\2{_MASK}", text)


def display_url(url: str | URL) -> str:
    """``url`` with every credential masked: the password, and each query parameter (or
    conninfo keyword inside one) that names a password, secret, token or key. The one form in
    which a store's URL is shown: repr, errors, recorder stats and logs, metric attributes."""
    parsed = make_url(url)
    query: dict[str, str | tuple[str, ...]] = {}
    for name, value in parsed.query.items():
        if re.fullmatch(_SECRET_NAME, name, re.IGNORECASE):
            query[name] = _MASK
        elif isinstance(value, str):
            query[name] = _mask_text(value)
        else:
            query[name] = tuple(_mask_text(v) for v in value)
    database = parsed.database
    if database and parsed.get_backend_name() != "sqlite":
        database = _mask_text(database)
    shown = parsed.set(query=query, database=database).render_as_string(hide_password=True)
    return shown.replace("%2A%2A%2A", _MASK)


_SQLITE_MONTHLY_BACKFILL = """
INSERT INTO monthly_request_usage (usage_month, api_key_id, latency_bucket, total_requests,
    error_requests, total_response_us, total_request_bytes, total_response_bytes)
SELECT substr(usage_date, 1, 7) || '-01', api_key_id, latency_bucket, sum(total_requests),
       sum(error_requests), sum(total_response_us), sum(total_request_bytes),
       sum(total_response_bytes)
  FROM daily_request_usage
 GROUP BY 1, 2, 3
"""


class _Guard:
    """One bounded operation: a duplicate of its connection's socket, shut down on expiry.

    Holding a duplicate descriptor means the watchdog can only ever shut down this
    connection's socket, even after the driver closed its own descriptor (whose number the
    process may already have reused).
    """

    __slots__ = ("_lock", "_sock", "done")

    def __init__(self, dbapi_connection: Any) -> None:
        self._lock = threading.Lock()
        self._sock = socket.socket(fileno=os.dup(dbapi_connection.fileno()))
        self.done = False

    def fire(self) -> None:
        with self._lock:
            if self.done:
                return
            self.done = True
            # OSError: the peer closed it already, and the blocked call has woken anyway.
            with suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()

    def stop(self) -> None:
        with self._lock:
            if not self.done:
                self.done = True
                self._sock.close()


class _Watchdog:
    """Shuts a PostgreSQL connection's socket down when an operation on it outlives its bound.

    A peer that stops answering (a frozen proxy or pooler, a partition) leaves the client
    waiting forever: a proxy that still acknowledges packets defeats TCP keepalives and
    ``tcp_user_timeout``, and a statement the server never received never hits its
    ``statement_timeout``. Shutting the socket down wakes the blocked call with a disconnect
    error, so SQLAlchemy invalidates the connection and the store reports the database
    unavailable. One thread per process keeps the deadlines, so arming costs microseconds, not
    a thread; finished operations leave their entry until its deadline passes.
    """

    def __init__(self) -> None:
        self._reset()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._heap: list[tuple[float, int, _Guard]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None

    @contextmanager
    def watch(self, dbapi_connection: Any, timeout: float) -> Iterator[None]:
        """Run the block with ``dbapi_connection`` cut off after ``timeout`` seconds."""
        guard = _Guard(dbapi_connection)
        entry = (time.monotonic() + timeout, next(self._seq), guard)
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="usage-middleware-watchdog", daemon=True
                )
                self._thread.start()
            heapq.heappush(self._heap, entry)
            if self._heap[0] is entry:
                self._cond.notify()
        try:
            yield
        finally:
            guard.stop()

    def _run(self) -> None:
        heap = self._heap
        with self._cond:
            while True:
                now = time.monotonic()
                while heap and (heap[0][2].done or heap[0][0] <= now):
                    heapq.heappop(heap)[2].fire()
                self._cond.wait(heap[0][0] - now if heap else None)


_watchdog = _Watchdog()
_watched = _watchdog.watch


class UsageStore:
    """Owns the SQLAlchemy engine for the usage tables of one database.

    ``url`` is a SQLAlchemy URL: ``sqlite:///usage.db`` (embedded, the default choice) or
    ``postgresql+psycopg://user:pw@host/db`` (``postgresql://`` and ``postgres://`` are accepted
    and use psycopg 3). The constructor does not connect; the schema is created on first use
    unless ``auto_create_schema=False``, in which case a missing schema raises
    :class:`SchemaMissingError`. ``read_timeout`` (seconds, default 10; ``None``: no limit)
    bounds each read-path statement, so a slow query gives up instead of holding a thread and a
    pooled connection.

    On PostgreSQL, ``connect_timeout`` bounds getting a connection (connecting, and the liveness
    check of a pooled one) and ``write_timeout`` each ``write()`` from taking its connection to
    its commit, at the client and, per transaction, at the server (``statement_timeout``,
    ``idle_in_transaction_session_timeout``); schema creation gets ten times ``write_timeout``,
    as on upgrade it may fill a new rollup table from an old one.
    """

    def __init__(
        self,
        url: str | URL,
        *,
        auto_create_schema: bool = True,
        connect_timeout: float = 5.0,
        write_timeout: float = 30.0,
        engine_options: dict[str, Any] | None = None,
        read_timeout: float | None = 10.0,
    ) -> None:
        if connect_timeout <= 0:
            raise ConfigurationError(f"connect_timeout must be > 0, got {connect_timeout!r}")
        if read_timeout is not None and not read_timeout > 0:
            raise ConfigurationError(f"read_timeout must be > 0 or None, got {read_timeout!r}")
        self.read_timeout = read_timeout
        if not write_timeout > 0:
            raise ConfigurationError(f"write_timeout must be > 0, got {write_timeout!r}")
        self.url = _normalize_url(url)
        self.display_url = display_url(self.url)
        self.dialect = "postgresql" if self.url.get_backend_name() != "sqlite" else "sqlite"
        self.auto_create_schema = auto_create_schema
        self.connect_timeout = connect_timeout
        self.write_timeout = write_timeout
        self._schema_ready = False
        self._schema_lock = threading.Lock()
        self._recorders: weakref.WeakSet[Any] = weakref.WeakSet()
        options: dict[str, Any] = dict(engine_options or {})
        try:
            if self.dialect == "sqlite":
                self.engine = self._sqlite_engine(options, connect_timeout)
            else:
                self.engine = self._pg_engine(options, connect_timeout)
        except (NoSuchModuleError, ImportError) as exc:
            raise ConfigurationError(
                f"the driver for {self.url.drivername!r} is not installed: "
                "pip install 'usage-middleware[postgres]'"
            ) from exc

    def _pg_engine(self, options: dict[str, Any], timeout: float) -> Engine:
        connect_args = dict(options.pop("connect_args", {}))
        connect_args.setdefault("connect_timeout", max(1, round(timeout)))
        # UTC sessions; no JIT, which costs more than the read path's small indexed
        # statements take (it kicks in on row estimates, not on actual work). Options
        # the caller passes come later and win.
        ours = "-c timezone=UTC -c jit=off"
        connect_args["options"] = f"{ours} {connect_args.get('options', '')}".strip()
        # The pooled connection's liveness check is ours, not pool_pre_ping's, so that it too
        # is bounded: a ping through a frozen proxy would otherwise wait forever.
        ping = options.pop("pool_pre_ping", True)
        engine = create_engine(self.url, connect_args=connect_args, **options)
        if ping:

            @event.listens_for(engine, "connect")
            def _on_connect(_dbapi_conn: Any, record: Any) -> None:
                record.info["usage_fresh"] = True

            @event.listens_for(engine, "checkout")
            def _on_checkout(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
                if record.info.pop("usage_fresh", False):
                    return  # just connected: nothing to check
                try:
                    with _watched(dbapi_conn, timeout):
                        alive = engine.dialect.do_ping(dbapi_conn)
                except engine.dialect.loaded_dbapi.Error as exc:
                    raise InvalidatePoolError(f"pooled connection is dead: {exc}") from exc
                if not alive:
                    raise InvalidatePoolError("pooled connection is dead")

        return engine

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
        return f"UsageStore({self.display_url!r})"

    def _bounded(self, conn: Connection, timeout: float) -> Any:
        """``timeout`` on PostgreSQL work in ``conn`` (SQLite waits are bounded by busy_timeout)."""
        if self.dialect == "sqlite":
            return nullcontext()
        return _watched(conn.connection.dbapi_connection, timeout)

    # --- schema ------------------------------------------------------------------------------

    def create_schema(self) -> None:
        """Create every table, index and function; safe to call any number of times.

        On PostgreSQL this runs the very files in ``sql/`` under an advisory lock, so several
        processes starting at once do not race. On SQLite it builds the equivalent tables.
        """
        try:
            if self.dialect == "sqlite":
                self._create_sqlite_schema()
            else:
                with (
                    self.engine.connect() as conn,
                    self._bounded(conn, 10 * self.write_timeout),
                    conn.begin(),
                ):
                    conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7215120301)")
                    # Straight to psycopg: no parameters, so the files' own text is sent as is.
                    with conn.connection.dbapi_connection.cursor() as cursor:  # type: ignore[union-attr]
                        for name in SQL_FILES:
                            cursor.execute(sql_text(name))
        except DBAPIError as exc:
            raise self._unavailable(exc) from exc
        self._schema_ready = True

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
            with self.engine.connect() as conn, self._bounded(conn, self.write_timeout):
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
                    f"{self.display_url}: call store.create_schema(), "
                    "run sql/usage_tracking_schema.sql, or pass auto_create_schema=True"
                )
            self._schema_ready = True

    def _unavailable(self, exc: DBAPIError) -> Exception:
        """``DatabaseUnavailableError`` for errors a retry can cure; ``RecordsRefusedError`` for
        values the database refuses, which no retry cures (PostgreSQL's data exceptions, such as
        a bigint sum out of range, and constraint violations: the idempotent conflicts never
        raise; SQLite's checked sums); others unchanged."""
        message = _mask_text(str(exc.orig).strip())  # libpq may quote conninfo fragments
        if (isinstance(exc, (DataError, IntegrityError)) and not exc.connection_invalidated) or (
            isinstance(exc, OperationalError) and message == "integer overflow"
        ):
            return RecordsRefusedError(
                f"the database refused the records' values: {message} (retrying cannot help)"
            )
        if exc.connection_invalidated or (
            isinstance(exc, OperationalError) and "no such table" not in message
        ):
            return DatabaseUnavailableError(
                f"cannot reach {self.display_url}: {message} "
                "(check that the server is running and the URL, file path and credentials "
                "are right; the recorder keeps retrying)"
            )
        return exc

    # --- writing -----------------------------------------------------------------------------

    def write(self, records: Iterable[Record]) -> int:
        """Store uploads and requests in one transaction, rollups included; idempotent by ``id``.

        Every record is validated before anything is written. Returns how many rows were new
        (records whose ``id`` is already stored, or repeated within the batch, count zero).
        Values the database refuses (a rollup sum beyond bigint) raise ``RecordsRefusedError``,
        a ``ValueError``, and write nothing; an unreachable database raises
        ``DatabaseUnavailableError``.
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
                    with self._bounded(conn, self.write_timeout), conn.begin():
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
        """Run the dialect's plan. It drives the driver's cursor directly, so the driver's own
        errors are given SQLAlchemy's classes here, for ``write`` to map as any other."""
        driver_error: type[Exception] = self.engine.dialect.loaded_dbapi.Error
        try:
            if self.dialect == "postgresql":
                return pg_write(conn, uploads, requests, self.write_timeout)
            return sqlite_write(conn, uploads, requests)
        except driver_error as exc:
            raise DBAPIError.instance(
                None, None, exc, driver_error, dialect=self.engine.dialect
            ) from exc

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
