"""The ClickHouse backend: a ClickHouse server (``clickhouse://``) or chdb in-process (``chdb://``).

The statements are the same for both; :mod:`.chclient` hides the difference. The backend is
split along its seams: :mod:`.chschema` (tables, cluster DDL, upgrades), :mod:`.chwrite` (one
INSERT per raw table of the rows not stored yet; route labels), :mod:`.chseal` (sealing days
into rollups, cleanup), :mod:`.chread` and :mod:`.chqueries` (one statement per read: sealed
rollups plus the raw rows no seal holds), :mod:`.chraw` (failures and exports from raw rows).

Why every answer is exact (each ``id`` counted once, whatever was replayed), in short — the
long form is docs/clickhouse.md:

* No counter is ever incremented at write time. Raw tables are ``ReplacingMergeTree`` keyed by
  ``(api_key_id, time, id)`` and read with ``FINAL``: every copy of an id (a retried batch, a
  regrouped replay, two writers racing) shares the whole key, so a read sees it once whatever
  merges have happened, and the earliest inserted copy wins.
* Rollups are written only by seals, from raw rows read with ``FINAL``: a seal of a UTC day
  holds exactly the day's ids first inserted at or before its watermark. A read takes a sealed
  day from the rollup rows of its newest seal and, from raw, only ids first inserted after that
  seal's watermark; unsealed days come from raw. Each id is in exactly one of the two.
* The watermark is the server's ``now64() - visibility_margin``: rows stamped earlier are
  visible by the time the seal reads them (an INSERT taking longer than the margin between
  stamping and commit is the one way to break this).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from typing import Any
from uuid import UUID

from sqlalchemy.engine import URL

from .._errors import ConfigurationError, DatabaseUnavailableError, ReadTimeoutError
from .._records import RequestRecord, UploadRecord
from . import chqueries, chraw
from .base import (
    ConsumerRow,
    EndpointRow,
    Failure,
    FailureKey,
    GranularReads,
    Histogram,
    MaintainResult,
    PackedRows,
    RequestFilter,
    Scope,
    SeriesRow,
    UploadRow,
)
from .chclient import Client, EmbeddedClient, HTTPClient
from .chread import FINAL_SETTINGS, SealedAnswers, aligned
from .chschema import (
    RAW_TIME,
    REQUEST_COLUMNS,
    ROLLUPS,
    SCHEMA_TABLES,
    UPLOAD_COLUMNS,
    lag_index_statements,
    schema_statements,
    upgrade_statements,
)
from .chseal import SEALS_SQL, Seals, seal_days, stale_versions
from .chwrite import (
    REQUEST_KINDS,
    UPLOAD_KINDS,
    RouteCap,
    request_columns,
    request_data,
    route_cap,
    upload_data,
    write_new,
)
from .legacy import LegacySource, MigrationResult

__all__ = ["REQUEST_COLUMNS", "UPLOAD_COLUMNS", "ClickHouseBackend", "schema_statements"]

UTC = timezone.utc
_SEAL_CACHE_SECONDS = 60.0


def _int_option(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigurationError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


class ClickHouseBackend:
    """Usage tables in ClickHouse (a server over HTTP, or chdb in this process).

    Options (``engine_options`` of ``UsageStore``): ``raw_retention_days`` (default ``None``:
    keep raw rows), ``settle_days`` (default 2: days older than this are sealed),
    ``maintain_interval`` (seconds between automatic :meth:`maintain` runs from the write path,
    default 3600; 0 turns them off), ``visibility_margin`` (seconds, default 300) and, for a
    server, ``secure`` and ``settings`` (passed to clickhouse-connect).
    """

    parallel_reads: bool
    embedded: bool
    ephemeral: bool

    def __init__(
        self,
        url: URL,
        *,
        connect_timeout: float,
        read_timeout: float | None,
        raw_retention_days: int | None = None,
        engine_options: dict[str, Any],
    ) -> None:
        options = dict(engine_options)
        self.settle_days = _int_option(options.pop("settle_days", 2), "settle_days", 1)
        retention = options.pop("raw_retention_days", raw_retention_days)
        self.raw_retention_days = (
            None if retention is None else _int_option(retention, "raw_retention_days", 1)
        )
        if self.raw_retention_days is not None and (
            self.raw_retention_days < self.settle_days + 2
        ):
            raise ConfigurationError(
                f"raw_retention_days={self.raw_retention_days} must be at least settle_days + 2 "
                f"= {self.settle_days + 2}: raw rows may be dropped only after they are sealed"
            )
        self.maintain_interval = float(options.pop("maintain_interval", 3600))
        self.visibility_margin = float(options.pop("visibility_margin", 300))
        self.read_timeout = read_timeout
        self.url = url
        self.client: Client
        if url.drivername == "chdb":
            secure = options.pop("secure", None)
            if options or secure is not None:
                raise ConfigurationError(
                    f"engine_options {sorted([*options, *(['secure'] if secure else [])])} do "
                    "not apply to a chdb store"
                )
            self.name = "chdb"
            self.embedded = True
            self.ephemeral = not url.database
            self.database = "default"
            self.client = EmbeddedClient(url.database)
            # reads run on connections of their own (one connection in memory)
            self.parallel_reads = not self.ephemeral
        else:
            secure = bool(options.pop("secure", url.query.get("secure") in ("true", "1")))
            settings = dict(options.pop("settings", {}))
            if options:
                raise ConfigurationError(
                    f"unknown engine_options for a ClickHouse store: {sorted(options)}"
                )
            self.name = "clickhouse"
            self.embedded = False
            self.ephemeral = False
            self.database = url.database or "default"
            self.client = HTTPClient(
                host=url.host or "localhost",
                port=url.port,
                username=url.username,
                password=url.password,
                database=self.database,
                secure=secure,
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                settings=settings,
            )
            self.parallel_reads = True
        self.cluster: str | None = None
        self._seal_cache: tuple[float, Seals] = (-math.inf, Seals(()))
        self.answers = SealedAnswers()
        self._maintained_at = 0.0
        self._maintain_lock = threading.Lock()
        self._routes = route_cap(self.client)

    def __repr__(self) -> str:
        return f"ClickHouseBackend({self.client.where!r})"

    # --- schema ------------------------------------------------------------------------------

    def create_schema(self, cluster: str | None = None) -> None:
        """Create the tables (``ON CLUSTER`` with ``cluster``), add the columns an older schema
        lacks, then seal what is due."""
        if cluster is not None and self.name == "chdb":
            raise ConfigurationError("chdb is one embedded server: it has no cluster")
        statements = schema_statements(
            self.database, cluster=cluster, raw_retention_days=self.raw_retention_days
        )
        for statement in [*statements, *upgrade_statements(self.database, cluster=cluster)]:
            self.client.command(statement)
        indexed = {
            r[0]
            for r in self.client.query(
                "SELECT table FROM system.data_skipping_indices "
                "WHERE database = {db:String} AND name = 'lag'",
                {"db": self.database},
            )
        }
        for table in RAW_TIME:
            if (table if cluster is None else f"{table}_local") not in indexed:
                for statement in lag_index_statements(self.database, table, cluster=cluster):
                    self.client.command(statement)
        self.cluster = cluster
        self.seal()

    def has_schema(self) -> bool:
        rows = self.client.query(
            "SELECT name FROM system.tables WHERE database = {db:String}",
            {"db": self.database},
        )
        return set(SCHEMA_TABLES) <= {r[0] for r in rows}

    # --- writing -----------------------------------------------------------------------------

    def write(self, uploads: Sequence[UploadRecord], requests: Sequence[RequestRecord]) -> int:
        """One INSERT per raw table of the records not stored yet (see :mod:`.chwrite`). The
        count of new rows is exact for one writer; writers inserting the same ids at the same
        moment may both count them (the answers count them once)."""
        return self.write_packed(uploads, requests, PackedRows())

    def write_packed(
        self,
        uploads: Sequence[UploadRecord],
        requests: Sequence[RequestRecord],
        packed: PackedRows,
    ) -> int:
        """:meth:`write` of the records and the ``packed`` rows (the recorder's, already
        normal): both become the same columns, in one INSERT per raw table."""
        new = 0
        if uploads or packed.uploads:
            data = upload_data(uploads, packed.uploads)
            new += write_new(
                self.client, "file_uploads", UPLOAD_KINDS, data, "uploaded_at", data[-1]
            )
        if requests or packed.requests:
            columns = request_columns(requests, packed.requests)
            keys, times, paths, matched = columns[1], columns[9], columns[3], columns[10]
            labels = self._routes.labels(self.client, keys, times, paths, matched)
            data = request_data(columns, labels)
            new += write_new(
                self.client, "api_requests", REQUEST_KINDS, data, "requested_at", times
            )
        if self.maintain_interval and time.monotonic() - self._maintained_at > (
            self.maintain_interval
        ):
            self.seal()
        return new

    # --- sealing -----------------------------------------------------------------------------

    def seal(self, before: datetime | None = None) -> int:
        """Seal whole UTC days older than ``settle_days`` into the rollups, fold late rows of
        sealed days into a new seal, and delete superseded rollup versions. ``before`` must be
        None: which days are settled is this backend's own rule.

        Returns how many days got a new seal. Safe to run from several processes at once:
        every seal is self-contained, and readers use the newest complete one.
        """
        if before is not None:
            raise ConfigurationError("ClickHouse seals whole settled days; pass no 'before'")
        with self._maintain_lock:
            self._maintained_at = time.monotonic()
            ((now_us,),) = self.client.query("SELECT toUnixTimestamp64Micro(now64(6))")
            now_us = int(now_us)
            seals = Seals(self.client.query(SEALS_SQL))
            margin = int(self.visibility_margin * 1_000_000)
            sealed = seal_days(self.client, seals, now_us, margin, self.settle_days)
            self._seal_cache = (-math.inf, Seals(()))
            self._cleanup(now_us)
            return sealed

    def _cleanup(self, now_us: int) -> None:
        count, delete, params = stale_versions(Seals(self.client.query(SEALS_SQL)), now_us)
        for table in ROLLUPS:
            ((stale,),) = self.client.query(count.replace("@TABLE@", table), params)
            if int(stale):
                # a Distributed table takes no mutation: delete from the local tables
                cluster = self._cluster_of(table)
                target = table if cluster is None else f"{table}_local ON CLUSTER `{cluster}`"
                self.client.command(delete.replace("@TABLE@", target), params)

    def _cluster_of(self, table: str) -> str | None:
        """The cluster a ``Distributed`` usage table spans (None for a local table)."""
        rows = self.client.query(
            "SELECT engine, engine_full FROM system.tables "
            "WHERE database = {db:String} AND name = {name:String}",
            {"db": self.database, "name": table},
        )
        if not rows or rows[0][0] != "Distributed":
            return None
        return str(rows[0][1]).split("(", 1)[1].split(",", 1)[0].strip(" '`")

    # --- health and lifecycle ----------------------------------------------------------------

    def ping(self) -> None:
        self.client.query("SELECT 1")

    def maintain(self, raw_retention_days: int | None, months_ahead: int) -> MaintainResult:
        """Seal what is due. Raw retention on ClickHouse is the raw tables' TTL, set at schema
        creation from the store's ``raw_retention_days``; a different age here is refused."""
        if raw_retention_days is not None and raw_retention_days != self.raw_retention_days:
            raise ConfigurationError(
                "on ClickHouse raw retention is a table TTL fixed when the schema is created: "
                f"pass UsageStore(..., raw_retention_days={raw_retention_days})"
            )
        self.seal()
        return MaintainResult()

    def retention_start(self, tables: list[str]) -> datetime | None:
        """From when raw rows are surely complete: the TTL's horizon (None without one)."""
        if self.raw_retention_days is None:
            return None
        return datetime.now(UTC) - timedelta(days=self.raw_retention_days)

    def migrate_legacy(self, source: LegacySource) -> MigrationResult:
        raise ConfigurationError(
            "legacy totals are migrated into a SQLite or PostgreSQL store; ClickHouse has none"
        )

    def before_fork(self) -> None:
        """Nothing: the child forgets the parent's connections in :meth:`after_fork`."""

    def after_fork(self) -> None:
        self.client.forked()
        self._maintain_lock = threading.Lock()
        self.answers.forked()
        self._routes = RouteCap(sole_writer=self.embedded)

    def close(self) -> None:
        self._routes.forget()  # another process may write the directory next
        self.client.close()

    # --- reading -----------------------------------------------------------------------------

    def _seals(self, bounds: Sequence[datetime]) -> Seals:
        """The seals a read over ``bounds`` may use: none unless every bound is on a UTC
        quarter hour (the rollups' grain); otherwise the read is answered from raw rows.

        The list is remembered for ``_SEAL_CACHE_SECONDS``: an older seal is still whole and
        exact (its rollup rows outlive being superseded by an hour), so reads may skip asking
        for a minute."""
        if not all(aligned(b) for b in bounds):
            return Seals(())
        at, seals = self._seal_cache
        if time.monotonic() - at > _SEAL_CACHE_SECONDS:
            seals = Seals(self.client.query(SEALS_SQL))
            self._seal_cache = (time.monotonic(), seals)
        return seals.within(bounds[0], bounds[-1])

    def _read(self, sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        try:
            return self.client.query(sql, params)
        except (ConfigurationError, DatabaseUnavailableError):
            raise
        except Exception as exc:
            if "TIMEOUT_EXCEEDED" in str(exc) and self.read_timeout is not None:
                raise ReadTimeoutError(
                    f"a usage query ran longer than read_timeout={self.read_timeout:g} s and "
                    "was cancelled"
                ) from exc
            raise

    def _settings(self) -> str:
        if self.read_timeout is None:
            return FINAL_SETTINGS
        return f"{FINAL_SETTINGS}, max_execution_time = {max(1, round(self.read_timeout))}"

    @staticmethod
    def _none(scope: Scope) -> bool:
        return scope.keys is not None and not scope.keys

    # The primitives are the combined reads with the parts not asked for left unused: one
    # grouping set more costs ClickHouse less than a statement of its own would.

    def upload_rows(self, scope: Scope, bounds: Sequence[datetime]) -> list[UploadRow]:
        if self._none(scope):
            return []
        seals = self._seals(bounds)
        return chqueries.granular_rows(
            self._read, self.answers, seals, scope, bounds, 0, self._settings()
        )[0]

    def granular_reads(
        self, scope: Scope, bounds: Sequence[datetime], previous: datetime | None
    ) -> GranularReads:
        if self._none(scope):
            return GranularReads([], Histogram(), [], Histogram(), [])
        return chqueries.granular_reads(
            self._read, self.answers, self._seals, scope, bounds, previous, self._settings(),
            parallel=self.parallel_reads,
        )  # fmt: skip

    def requests_reads(
        self, scope: Scope, bounds: Sequence[datetime], filters: RequestFilter
    ) -> tuple[list[EndpointRow], list[SeriesRow]]:
        if self._none(scope):
            return [], []
        return chqueries.endpoint_and_series_rows(
            self._read, self.answers, self._seals(bounds), scope, bounds, filters, self._settings()
        )

    def request_histogram(self, scope: Scope, start: datetime, end: datetime) -> Histogram:
        if self._none(scope):
            return Histogram()
        seals = self._seals([start, end])
        return chqueries.request_histograms(
            self._read, self.answers, seals, scope, [start, end], self._settings()
        )[0]

    def mismatch_rows(
        self, scope: Scope, start: datetime, end: datetime
    ) -> list[tuple[str, str, int]]:
        if self._none(scope):
            return []
        seals = self._seals([start, end])
        return chqueries.granular_rows(
            self._read, self.answers, seals, scope, [start, end], 0, self._settings()
        )[1]

    def endpoint_rows(
        self, scope: Scope, start: datetime, end: datetime, filters: RequestFilter
    ) -> list[EndpointRow]:
        return self.requests_reads(scope, [start, end], filters)[0]

    def request_series(
        self, scope: Scope, bounds: Sequence[datetime], filters: RequestFilter
    ) -> list[SeriesRow]:
        return self.requests_reads(scope, bounds, filters)[1]

    def consumer_rows(self, scope: Scope, start: datetime, end: datetime) -> list[ConsumerRow]:
        if self._none(scope):
            return []
        seals = self._seals([start, end])
        return chqueries.consumer_rows(self._read, seals, scope, start, end, self._settings())

    def failure_rows(
        self,
        scope: Scope,
        start: datetime,
        end: datetime,
        kinds: tuple[str, ...],
        before: FailureKey | None,
        limit: int,
    ) -> list[Failure]:
        return chraw.failure_rows(
            self._read, scope, start, end, kinds, before, limit, self._settings()
        )

    def export_rows(
        self,
        dataset: str,
        scope: Scope,
        start: datetime,
        end: datetime,
        after: tuple[datetime, UUID] | None,
        limit: int,
    ) -> list[tuple[Any, ...]]:
        return chraw.export_rows(
            self._read, dataset, scope, start, end, after, limit, self._settings()
        )
