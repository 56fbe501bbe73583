"""UsageStore: the public front of one database, whatever its engine.

It validates records, creates the schema once, and hands batches to its backend
(:mod:`usage_middleware._storage`, picked from the URL), whose one write inserts raw rows and
updates the rollups in the same transaction, counting only the rows that were actually new (the
primary key is the claim): replays never double count and no crash can separate a row from its
count. The read path asks the same backend through its reader side.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine
from sqlalchemy.engine import URL

from ._errors import ConfigurationError, SchemaMissingError
from ._maintain import MaintainResult, check_retention_days, maintain, retention_start
from ._recording.compact import PackedBatch, RequestValues, UploadValues
from ._records import RequestRecord, UploadRecord
from ._storage import Backend, normalize_url, open_backend
from ._storage.base import PackedRows, PackedWriter
from ._storage.postgres import sql_text
from ._storage.urls import display_url

if TYPE_CHECKING:
    from datetime import datetime
    from uuid import UUID

__all__ = ["UsageStore", "display_url", "sql_text"]

Record = UploadRecord | RequestRecord


class UsageStore:
    """The usage tables of one database.

    ``url`` picks the engine: ``sqlite:///usage.db`` (embedded, the default choice),
    ``postgresql+psycopg://user:pw@host/db`` (``postgresql://`` and ``postgres://`` are accepted
    and use psycopg 3), ``clickhouse://user:pw@host:8123/db`` or ``chdb:///path/to/dir``
    (ClickHouse, with the ``clickhouse`` extra), or ``memory://`` (in memory, for tests). The
    constructor does not
    connect; the schema is created on first use unless ``auto_create_schema=False``, in which
    case a missing schema raises :class:`SchemaMissingError`. ``read_timeout`` (seconds, default
    10; ``None``: no limit) bounds each read-path statement, so a slow query gives up instead of
    holding a thread and a pooled connection.

    On PostgreSQL, ``connect_timeout`` bounds getting a connection (connecting, and the liveness
    check of a pooled one) and ``write_timeout`` each ``write()`` from taking its connection to
    its commit, at the client and, per transaction, at the server (``statement_timeout``,
    ``idle_in_transaction_session_timeout``); schema creation gets ten times ``write_timeout``,
    as on upgrade it may fill a new rollup table from an old one.

    ``raw_retention_days`` (default None: keep every raw row) is the age past which raw rows are
    pruned, by ``usage-middleware maintain`` and at each ``create_schema()``; the rollups are
    never pruned, so no answer changes.
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
        raw_retention_days: int | None = None,
    ) -> None:
        if connect_timeout <= 0:
            raise ConfigurationError(f"connect_timeout must be > 0, got {connect_timeout!r}")
        if read_timeout is not None and not read_timeout > 0:
            raise ConfigurationError(f"read_timeout must be > 0 or None, got {read_timeout!r}")
        if not write_timeout > 0:
            raise ConfigurationError(f"write_timeout must be > 0, got {write_timeout!r}")
        self.read_timeout = read_timeout
        self.connect_timeout = connect_timeout
        self.write_timeout = write_timeout
        self.url = normalize_url(url)
        self.display_url = display_url(self.url)
        self.raw_retention_days = check_retention_days(raw_retention_days)
        self.backend: Backend = open_backend(
            self.url,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            write_timeout=write_timeout,
            raw_retention_days=self.raw_retention_days,
            engine_options=dict(engine_options or {}),
        )
        self.auto_create_schema = auto_create_schema
        self._schema_ready = False
        self._schema_lock = threading.Lock()
        self._recorders: weakref.WeakSet[Any] = weakref.WeakSet()

    def __repr__(self) -> str:
        return f"UsageStore({self.display_url!r})"

    @property
    def dialect(self) -> str:
        """The engine's name: ``sqlite``, ``postgresql``, ``clickhouse``, ``chdb`` or ``memory``."""
        return self.backend.name

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine of a SQLite or PostgreSQL store (for your own queries)."""
        engine: Engine | None = getattr(self.backend, "engine", None)
        if engine is None:
            raise AttributeError(f"a {self.backend.name} store has no SQLAlchemy engine")
        return engine

    # --- schema ------------------------------------------------------------------------------

    def create_schema(self, *, cluster: str | None = None) -> None:
        """Create every table, index and function; safe to call any number of times.

        On PostgreSQL this runs the very files in ``sql/`` under an advisory lock, so several
        processes starting at once do not race; unpartitioned raw tables of an older install are
        converted (see the schema file). On SQLite it builds the equivalent tables. With
        ``raw_retention_days`` set, raw rows past it are then pruned (:meth:`maintain`).
        ``cluster`` (ClickHouse only) creates replicated tables ``ON CLUSTER`` that name, behind
        ``Distributed`` tables sharded by API key.
        """
        self.backend.create_schema(cluster)
        self._schema_ready = True
        if self.raw_retention_days is not None:
            maintain(self)

    def has_schema(self) -> bool:
        """True when every usage table exists."""
        return self.backend.has_schema()

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
                    f"the usage tables do not exist in {self.display_url}: call "
                    "store.create_schema(), run sql/usage_tracking_schema.sql, or pass "
                    "auto_create_schema=True"
                )
            self._schema_ready = True

    # --- writing -----------------------------------------------------------------------------

    def write(self, records: Iterable[Record]) -> int:
        """Store uploads and requests in one transaction, rollups included; idempotent by ``id``.

        Every record is validated before anything is written. Returns how many rows were new
        (records whose ``id`` is already stored, or repeated within the batch, count zero).
        Values the database refuses (a rollup sum beyond bigint) raise ``RecordsRefusedError``,
        a ``ValueError``, and write nothing; an unreachable database raises
        ``DatabaseUnavailableError``.
        """
        # rows that stay values, by id as its 128-bit integer
        packed_requests: dict[int, RequestValues] = {}
        packed_uploads: dict[int, UploadValues] = {}
        backend = self.backend
        writer = backend if isinstance(backend, PackedWriter) else None
        if writer is not None and type(records) is PackedBatch:
            # The recorder's batch: the rows that need no validation stay tuples.
            plain_requests, plain_uploads, records = records.split()
            for values in plain_requests:
                packed_requests.setdefault(values[0], values)
            for values in plain_uploads:
                packed_uploads.setdefault(values[0], values)
        uploads: dict[UUID, UploadRecord] = {}
        requests: dict[UUID, RequestRecord] = {}
        for record in records:
            if isinstance(record, UploadRecord):
                record.validate()
                if record.id.int not in packed_uploads:
                    uploads.setdefault(record.id, record)
            elif isinstance(record, RequestRecord):
                record.validate()
                if record.id.int not in packed_requests:
                    requests.setdefault(record.id, record)
            else:
                raise TypeError(
                    "store.write() takes UploadRecord and RequestRecord, "
                    f"got {type(record).__name__}"
                )
        if not uploads and not requests and not packed_requests and not packed_uploads:
            return 0
        self.ensure_schema()
        if writer is not None and (packed_requests or packed_uploads):
            rows = PackedRows(list(packed_requests.values()), list(packed_uploads.values()))
            return writer.write_packed(list(uploads.values()), list(requests.values()), rows)
        return backend.write(list(uploads.values()), list(requests.values()))

    # --- maintenance ---------------------------------------------------------------------------

    def maintain(
        self, *, months_ahead: int = 3, raw_retention_days: int | None = None
    ) -> MaintainResult:
        """Create partitions ahead and prune raw rows past ``raw_retention_days`` (default: the
        store's option; None keeps them); idempotent, safe from cron. Rollups are never pruned."""
        return maintain(self, raw_retention_days=raw_retention_days, months_ahead=months_ahead)

    def seal(self, before: datetime | None = None) -> int:
        """Fold recent raw rows into the rollups now, up to ``before`` (default: what the engine
        deems settled); returns how many rows were folded.

        Only engines that roll up behind their writes have anything to do: PostgreSQL and
        SQLite write live requests as raw rows and fold each quarter hour into the request
        rollups once it has ended (two minutes later); ClickHouse seals whole days. Writers and
        ``maintain`` do this on their own, and every answer is exact either way; call it after
        loading history in bulk, so that reads of it come from the rollups at once.
        """
        self.ensure_schema()
        return self.backend.seal(before)

    def retention_start(self, table: str | None = None) -> datetime | None:
        """The instant from which raw rows are complete (None: none was ever pruned); ``table``
        is ``file_uploads`` or ``api_requests``, by default the later of the two."""
        return retention_start(self, table)

    # --- health and lifecycle ----------------------------------------------------------------

    def ping(self) -> None:
        """Raise unless the database answers."""
        self.backend.ping()

    def attach_recorder(self, recorder: Any) -> None:
        """Remember a running recorder so health checks can report its stats."""
        self._recorders.add(recorder)

    @property
    def recorders(self) -> list[Any]:
        return list(self._recorders)

    def dispose(self) -> None:
        """Close pooled connections (at exit, or when done with the store)."""
        self.backend.close()
