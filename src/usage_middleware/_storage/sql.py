"""What the SQLite and PostgreSQL backends share: a SQLAlchemy engine, one write transaction
per batch, the mapping of driver errors, and the read statements of :mod:`._sqlread`,
:mod:`.sqlhistogram`, :mod:`.sqlfailures`, :mod:`.sqlrequests`, :mod:`.sqlconsumers`
and :mod:`.sqlseen`.

A subclass says how to make its engine, create its schema and run its write plan
(``_write_batch``); everything else is here, so the two engines cannot drift apart.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from datetime import datetime, timezone
from typing import Any
from uuid import UUID

from sqlalchemy import Connection, Engine, inspect, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import (
    DataError,
    DBAPIError,
    IntegrityError,
    OperationalError,
    ProgrammingError,
)

from .._errors import ConfigurationError, DatabaseUnavailableError, RecordsRefusedError
from .._records import RequestRecord, UploadRecord
from .._schema import ALL_TABLES
from . import _sqlread, sqlconsumers, sqlfailures, sqlhistogram, sqlrequests
from .base import (
    ConsumerRow,
    EndpointRow,
    Failure,
    FailureKey,
    Histogram,
    MaintainResult,
    PackedRows,
    RequestFilter,
    Scope,
    SeriesRow,
    UploadRow,
)
from .legacy import LegacySource, MigrationResult, misfit
from .maintenance import sql_retention_start
from .plan import SEAL_INTERVAL, seal_due
from .urls import display_url, mask_text

__all__ = ["SQLBackend"]

logger = logging.getLogger(__name__)


class SQLBackend(ABC):
    """A backend on a SQLAlchemy engine (subclassed per engine)."""

    name: str
    engine: Engine

    #: ``rollup_seals`` was seen, so requests may be raw rows behind a seal.
    sealing = False

    def __init__(self, url: URL, *, read_timeout: float | None, write_timeout: float) -> None:
        self.url = url
        self.read_timeout = read_timeout
        self.write_timeout = write_timeout
        # Sealing the request rollups: a writing process checks every SEAL_INTERVAL seconds,
        # the first time one interval after it started, whether a quarter hour is due.
        self._seal_lock = threading.Lock()
        self._seal_checked = time.monotonic()
        #: The seal instant the last write saw (None: read it afresh).
        self._sealed_before: datetime | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({display_url(self.url)!r})"

    # --- schema ------------------------------------------------------------------------------

    def create_schema(self, cluster: str | None = None) -> None:
        if cluster is not None:
            raise ConfigurationError(
                f"cluster={cluster!r} applies to a ClickHouse server store, not to {self.name}"
            )
        try:
            self._create_schema()
        except DBAPIError as exc:
            raise self.unavailable(exc) from exc

    @abstractmethod
    def _create_schema(self) -> None:
        """Create the engine's tables; driver errors are mapped by :meth:`create_schema`."""

    def has_schema(self) -> bool:
        try:
            with self.engine.connect() as conn, self._bounded(conn, self.write_timeout):
                present = set(inspect(conn).get_table_names())
        except DBAPIError as exc:
            raise self.unavailable(exc) from exc
        return set(ALL_TABLES) <= present

    # --- writing -----------------------------------------------------------------------------

    def write(self, uploads: Sequence[UploadRecord], requests: Sequence[RequestRecord]) -> int:
        return self._write_then_seal(uploads, requests, PackedRows())

    def write_packed(
        self,
        uploads: Sequence[UploadRecord],
        requests: Sequence[RequestRecord],
        packed: PackedRows,
    ) -> int:
        """:meth:`write`, some rows as plain values (``PackedWriter``)."""
        return self._write_then_seal(uploads, requests, packed)

    def _write_then_seal(
        self,
        uploads: Sequence[UploadRecord],
        requests: Sequence[RequestRecord],
        packed: PackedRows,
    ) -> int:
        """The write, then — at most every ``SEAL_INTERVAL`` seconds — a seal if a quarter hour
        is due. A seal that fails is logged and tried at the next check; the write stands."""
        written = self._write(uploads, requests, packed)
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

    def _write(
        self,
        uploads: Sequence[UploadRecord],
        requests: Sequence[RequestRecord],
        packed: PackedRows,
    ) -> int:
        """One write transaction, bounded by ``write_timeout``. The write plans drive the
        driver's cursor directly, so the driver's own errors are given SQLAlchemy's classes here
        and mapped like any other (:meth:`unavailable`)."""
        driver_error: type[Exception] = self.engine.dialect.loaded_dbapi.Error
        try:
            with self.engine.connect() as conn:
                conn.info["usage_write"] = True
                try:
                    with self._bounded(conn, self.write_timeout), conn.begin():
                        try:
                            written, sealed_before = self._write_batch(
                                conn, list(uploads), list(requests), packed
                            )
                        except driver_error as exc:
                            raise DBAPIError.instance(
                                None, None, exc, driver_error, dialect=self.engine.dialect
                            ) from exc
                finally:
                    conn.info.pop("usage_write", None)
        except DBAPIError as exc:
            raise self.unavailable(exc) from exc
        if sealed_before is not None:
            self._sealed_before = sealed_before
        return written

    def _bounded(self, conn: Connection, timeout: float) -> AbstractContextManager[Any]:
        """A bound on the work done in ``conn``; none by default (SQLite's waits are bounded by
        its busy timeout)."""
        return nullcontext()

    @abstractmethod
    def _write_batch(
        self,
        conn: Connection,
        uploads: list[UploadRecord],
        requests: list[RequestRecord],
        packed: PackedRows,
    ) -> tuple[int, datetime | None]:
        """Run the engine's write plan inside the open write transaction; returns how many rows
        were new and the seal instant its requests were written under (None: no requests)."""

    def unavailable(self, exc: DBAPIError) -> Exception:
        """``DatabaseUnavailableError`` for errors a retry can cure; ``RecordsRefusedError`` for
        values the database refuses, which no retry cures (PostgreSQL's data exceptions, such as
        a bigint sum out of range, and constraint violations: the idempotent conflicts never
        raise; SQLite's checked sums); others unchanged."""
        message = mask_text(str(exc.orig).strip())  # libpq may quote conninfo fragments
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
                f"cannot reach {display_url(self.url)}: {message} "
                "(check that the server is running and the URL, file path and credentials "
                "are right; the recorder keeps retrying)"
            )
        return exc

    # --- health and lifecycle ----------------------------------------------------------------

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def seal(self, before: datetime | None = None) -> int:
        """Fold the raw requests that no seal holds yet, up to ``before`` (default: the last
        whole quarter hour that ended two minutes ago), into the rollups; returns how many."""
        try:
            folded = self._seal(before)
        except DBAPIError as exc:
            raise self.unavailable(exc) from exc
        self._sealed_before = None  # read afresh by the next write
        return folded

    @abstractmethod
    def _seal(self, before: datetime | None) -> int:
        """The engine's seal; driver errors are mapped by :meth:`seal`."""

    def maintain(self, raw_retention_days: int | None, months_ahead: int) -> MaintainResult:
        """A seal first: retention never prunes requests that no seal holds."""
        self.seal()
        try:
            return self._maintain(raw_retention_days, months_ahead)
        except DBAPIError as exc:
            raise self.unavailable(exc) from exc

    @abstractmethod
    def _maintain(self, raw_retention_days: int | None, months_ahead: int) -> MaintainResult:
        """The engine's partitions and pruning; driver errors are mapped by :meth:`maintain`."""

    def migrate_legacy(self, source: LegacySource) -> MigrationResult:
        """One write transaction (SQLite: ``BEGIN IMMEDIATE``, one writer at a time) running the
        engine's migration; a legacy table that is missing or of other types is a
        ConfigurationError saying so."""
        try:
            with self.engine.connect() as conn:
                conn.info["usage_write"] = True
                try:
                    with conn.begin():
                        return self._migrate_legacy(conn, source)
                finally:
                    conn.info.pop("usage_write", None)
        except DBAPIError as exc:
            message = str(exc.orig)
            if isinstance(exc, (DataError, ProgrammingError)) or "no such" in message:
                raise misfit(message) from exc
            raise

    @abstractmethod
    def _migrate_legacy(self, conn: Connection, source: LegacySource) -> MigrationResult:
        """The engine's legacy migration inside the open write transaction."""

    def retention_start(self, tables: list[str]) -> datetime | None:
        try:
            return sql_retention_start(self, tables)
        except DBAPIError as exc:
            raise self.unavailable(exc) from exc

    def before_fork(self) -> None:  # noqa: B027 - a hook engines may extend
        """Nothing by default: pooled network connections are dropped in the child."""

    def after_fork(self) -> None:
        # Pooled connections belong to the parent: forget them without closing them.
        self.engine.dispose(close=False)
        self._seal_lock = threading.Lock()  # a parent's seal may have held it at fork time
        self._seal_checked = time.monotonic()

    def close(self) -> None:
        self.engine.dispose()

    # --- reading -----------------------------------------------------------------------------

    def upload_rows(self, scope: Scope, bounds: Sequence[datetime]) -> list[UploadRow]:
        return _sqlread.upload_rows(self, scope, bounds)

    def request_histogram(self, scope: Scope, start: datetime, end: datetime) -> Histogram:
        return sqlhistogram.request_histogram(self, scope, start, end)

    def failure_rows(
        self,
        scope: Scope,
        start: datetime,
        end: datetime,
        kinds: tuple[str, ...],
        before: FailureKey | None,
        limit: int,
    ) -> list[Failure]:
        return sqlfailures.failure_rows(self, scope, start, end, kinds, before, limit)

    def export_rows(
        self,
        dataset: str,
        scope: Scope,
        start: datetime,
        end: datetime,
        after: tuple[datetime, UUID] | None,
        limit: int,
    ) -> list[tuple[Any, ...]]:
        return sqlfailures.export_rows(self, dataset, scope, start, end, after, limit)

    def mismatch_rows(
        self, scope: Scope, start: datetime, end: datetime
    ) -> list[tuple[str, str, int]]:
        return sqlfailures.mismatch_rows(self, scope, start, end)

    def endpoint_rows(
        self, scope: Scope, start: datetime, end: datetime, filters: RequestFilter
    ) -> list[EndpointRow]:
        return sqlrequests.endpoint_rows(self, scope, start, end, filters)

    def request_series(
        self, scope: Scope, bounds: Sequence[datetime], filters: RequestFilter
    ) -> list[SeriesRow]:
        return sqlrequests.request_series(self, scope, bounds, filters)

    def consumer_rows(self, scope: Scope, start: datetime, end: datetime) -> list[ConsumerRow]:
        return sqlconsumers.consumer_rows(self, scope, start, end)
