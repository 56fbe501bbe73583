"""The storage backend interface: what the recorder writes through and the read path reads from.

A backend is one database engine behind two small protocols:

* :class:`Writer` — what the recorder and ``UsageStore.write`` need: the schema, one idempotent
  write of a batch (raw rows and every rollup in one transaction, each ``id`` counted once), a
  health ping, and the process hooks (a fork must not share connections).
* :class:`Reader` — the primitives the read path is built from: uploads summed per
  (period, provider, file type) over UTC period bounds, and the merged latency histogram of
  requests over a UTC range; requests by endpoint and status code and per period, and usage
  per key; for failures, exports and declared-type mismatches, keyset pages of failed or raw
  rows and mismatch counts. Everything the HTTP API answers (series,
  breakdowns, shares, percentiles) is shaped from these in engine-neutral Python, so every
  backend gives the same answer for the same records — which the contract tests check,
  backend by backend.

How a backend answers is its own business: the SQL backends read exact rollups and only the
edges from raw rows; the in-memory backend (``usage_middleware.testing``) scans its rows.
Adding an engine means one module that implements :class:`Backend`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, runtime_checkable
from uuid import UUID

from .._records import RequestRecord, UploadRecord
from .._schema import api_requests, file_uploads

if TYPE_CHECKING:
    from .legacy import LegacySource, MigrationResult

__all__ = [
    "EXPORT_COLUMNS",
    "Backend",
    "ConsumerRow",
    "EndpointRow",
    "Failure",
    "FailureKey",
    "GranularReader",
    "GranularReads",
    "Histogram",
    "MaintainResult",
    "PackedRows",
    "PackedWriter",
    "Reader",
    "RequestFilter",
    "RequestsReader",
    "Scope",
    "SeriesRow",
    "UploadRow",
    "Writer",
    "is_failed_request",
    "request_value_rows",
    "upload_value_rows",
]

# (period index, provider, file_type, uploads, bytes, successful, failed). A row may be a full
# group or a marginal: a None column means "summed over every value" (GROUPING SETS). Rows add.
UploadRow = tuple[int | None, str | None, str | None, int, int, int, int]


@dataclass(frozen=True)
class Scope:
    """Which rows a read covers besides time: API keys (``None``: every key, rows without a key
    included), providers and file types (exact ``image/png`` or family ``image/*``; empty: all).
    """

    keys: tuple[UUID, ...] | None = None
    providers: tuple[str, ...] = ()
    file_types: tuple[str, ...] = ()

    def matches_upload(self, record: UploadRecord) -> bool:
        """Whether ``record`` is inside the scope (the reference the SQL filters agree with)."""
        if self.keys is not None and record.api_key_id not in self.keys:
            return False
        if self.providers and record.provider not in self.providers:
            return False
        if self.file_types:
            t = record.file_type
            return any(
                t == f or (f.endswith("/*") and t.startswith(f[:-1])) for f in self.file_types
            )
        return True

    def matches_request(self, record: RequestRecord) -> bool:
        return self.keys is None or record.api_key_id in self.keys


# --- request analytics and consumers (read path II) -------------------------------------------


@dataclass(frozen=True)
class RequestFilter:
    """Which requests ``GET /requests`` covers besides key and time: method and route labels
    (as the endpoint rollups hold them) and status codes, as inclusive ``(lo, hi)`` ranges
    (``4xx`` is ``(400, 499)``). Empty: no narrowing by that column."""

    methods: tuple[str, ...] = ()
    routes: tuple[str, ...] = ()
    statuses: tuple[tuple[int, int], ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.methods or self.routes or self.statuses)

    def matches(self, method: str, route: str, status_code: int) -> bool:
        """Whether a request with these labels is inside the filter (the SQL agrees)."""
        if self.methods and method not in self.methods:
            return False
        if self.routes and route not in self.routes:
            return False
        return not self.statuses or any(lo <= status_code <= hi for lo, hi in self.statuses)


# (method, route, status_code, latency bucket, requests, response_us, request_bytes,
# response_bytes): requests over a whole range by endpoint label, status code and coarse latency
# bucket (``_schema.endpoint_bucket``). Rows may repeat a group (and carry negative counts that
# a later row makes up); they add.
EndpointRow = tuple[str, str, int, int, int, int, int, int]

# (period index, coarse latency bucket, requests, errors, response_us); rows add.
SeriesRow = tuple[int, int, int, int, int]

# (api_key_id, uploads, bytes, failed_uploads, requests, errors, last_seen): one key's usage
# in a range; ``last_seen`` is its newest upload or request in the range (None: none stored).
ConsumerRow = tuple[UUID | None, int, int, int, int, int, datetime | None]


# --- failures, export and type mismatches (read path II) --------------------------------------

# Position of a failure in the newest-first order: (time, kind, id), compared descending as a
# tuple ("upload" sorts after "request", so at one instant uploads come first).
FailureKey = tuple[datetime, str, UUID]


@dataclass(frozen=True)
class Failure:
    """A failed upload (``kind="upload"``) or a request answered with status >= 400 or an
    exception (``kind="request"``); the other kind's columns are None."""

    kind: str
    at: datetime
    id: UUID
    api_key_id: UUID | None
    provider: str | None = None
    file_type: str | None = None
    declared_type: str | None = None
    file_size: int | None = None
    method: str | None = None
    route: str | None = None
    status_code: int | None = None
    error_message: str | None = None

    @property
    def key(self) -> FailureKey:
        return (self.at, self.kind, self.id)


def is_failed_request(record: RequestRecord) -> bool:
    """The reference definition of a failed request (the SQL filters and indexes agree)."""
    return record.status_code >= 400 or record.error_message is not None


@dataclass
class Histogram:
    """Requests over a range: counts per latency bucket plus exact sums."""

    buckets: dict[int, int] = field(default_factory=dict)
    requests: int = 0
    errors: int = 0
    response_us: int = 0

    def add(self, bucket: int, requests: int, errors: int, response_us: int) -> None:
        self.buckets[bucket] = self.buckets.get(bucket, 0) + requests
        self.requests += requests
        self.errors += errors
        self.response_us += response_us


# The columns an export carries, in order: the raw table's own with the time column last (the
# keyset orders by it). ``route_matched`` is left out: ``path`` already shows the raw path.
EXPORT_COLUMNS: dict[str, tuple[str, ...]] = {
    "uploads": tuple(file_uploads.c.keys()),
    "requests": tuple(c.name for c in api_requests.c if c.name != "route_matched"),
}


@dataclass(frozen=True)
class MaintainResult:
    """What one maintenance run did.

    ``skipped`` counts PostgreSQL partitions due for dropping whose lock was not granted within
    5 s (a long read held it); the next run drops them.
    """

    partitions_created: int = 0
    partitions_dropped: int = 0
    rows_deleted: int = 0
    skipped: int = 0


@runtime_checkable
class Writer(Protocol):
    """The write side of a backend."""

    #: The engine's name (``sqlite``, ``postgresql``, ``memory``, …).
    name: str
    #: The database is this process's own file or memory, not a server shared with others.
    embedded: bool
    #: The database vanishes with the process (memory).
    ephemeral: bool

    def create_schema(self, cluster: str | None = None) -> None:
        """Create every table, index and function; safe to call any number of times.
        ``cluster`` names a cluster to create replicated tables on, where the engine has
        clusters (ClickHouse); elsewhere it is a ConfigurationError."""

    def has_schema(self) -> bool:
        """True when every usage table exists."""

    def write(self, uploads: Sequence[UploadRecord], requests: Sequence[RequestRecord]) -> int:
        """Store validated, id-unique records with their rollups in one transaction; return how
        many rows were new. Records already stored count zero and change nothing."""

    def ping(self) -> None:
        """Raise unless the database answers a trivial statement."""

    def seal(self, before: datetime | None = None) -> int:
        """Fold raw rows that no rollup holds yet into the rollups, up to ``before`` (default:
        what the engine deems settled); returns how many. Engines whose writes roll up every
        row at once (memory) have nothing to do."""

    def maintain(self, raw_retention_days: int | None, months_ahead: int) -> MaintainResult:
        """Create what future rows need (partitions) and prune raw rows older than
        ``raw_retention_days`` (None: keep them); rollups are never pruned. Idempotent."""

    def retention_start(self, tables: list[str]) -> datetime | None:
        """The latest instant before which raw rows of ``tables`` were pruned (None: never)."""

    def migrate_legacy(self, source: LegacySource) -> MigrationResult:
        """Move legacy per-provider totals from the host's table ``source`` into the rollups
        once (a marker row makes later calls do nothing); ConfigurationError where the engine
        holds no such table."""

    def before_fork(self) -> None:
        """Close what a child must not share (SQLite file handles); called with no write running."""

    def after_fork(self) -> None:
        """Forget connections inherited from the parent process (called in a forked child)."""

    def close(self) -> None:
        """Release pooled connections."""


class PackedRows(NamedTuple):
    """Rows written as plain values, never made into records: id-unique, none among the
    batch's records, their values already what validation would leave them as. The recorder's
    queue hands them over so (making a record and validating it again cost as much as building
    the row, and the record's objects are ones the garbage collector tracks)."""

    #: Tuples of ``api_requests``' columns in order (id, api_key_id, method, path,
    #: status_code, response_time_ms, request_size, response_size, error_message, requested_at,
    #: route_matched), the two ids as 128-bit integers.
    requests: Sequence[tuple[Any, ...]] = ()
    #: Tuples of ``file_uploads``' columns (id, api_key_id, request_id, provider, file_type,
    #: declared_type, file_size, file_name, upload_status, error_message, uploaded_at), the
    #: three ids as 128-bit integers.
    uploads: Sequence[tuple[Any, ...]] = ()


def _int(value: UUID | None) -> int | None:
    return None if value is None else value.int


def _request_values(r: RequestRecord) -> tuple[Any, ...]:
    return (
        r.id.int, _int(r.api_key_id), r.method, r.path, r.status_code, r.response_time_ms,
        r.request_size, r.response_size, r.error_message, r.requested_at, r.route_matched,
    )  # fmt: skip


def _upload_values(u: UploadRecord) -> tuple[Any, ...]:
    return (
        u.id.int, _int(u.api_key_id), _int(u.request_id), u.provider, u.file_type,
        u.declared_type, u.file_size, u.file_name, u.upload_status, u.error_message,
        u.uploaded_at,
    )  # fmt: skip


def request_value_rows(
    requests: Sequence[RequestRecord], packed: Sequence[tuple[Any, ...]]
) -> list[tuple[Any, ...]]:
    """The ``requests`` (records) as :class:`PackedRows` holds requests, followed by the
    ``packed`` ones: the one list every backend formats, records and packed rows alike."""
    rows = [_request_values(r) for r in requests]
    rows += packed
    return rows


def upload_value_rows(
    uploads: Sequence[UploadRecord], packed: Sequence[tuple[Any, ...]]
) -> list[tuple[Any, ...]]:
    """:func:`request_value_rows` for uploads."""
    rows = [_upload_values(u) for u in uploads]
    rows += packed
    return rows


@runtime_checkable
class PackedWriter(Protocol):
    """A backend that also writes rows given as plain values (:class:`PackedRows`): SQLite,
    PostgreSQL and ClickHouse."""

    def write_packed(
        self,
        uploads: Sequence[UploadRecord],
        requests: Sequence[RequestRecord],
        packed: PackedRows,
    ) -> int:
        """:meth:`Writer.write` of ``uploads``, ``requests`` and the ``packed`` rows."""


@runtime_checkable
class Reader(Protocol):
    """The read side of a backend."""

    #: Whether independent reads may run at once (a pooled server); False where one
    #: connection may be shared (an in-memory SQLite database) or reads are in-process.
    parallel_reads: bool

    def upload_rows(self, scope: Scope, bounds: Sequence[datetime]) -> list[UploadRow]:
        """Uploads in ``scope`` summed per period ``[bounds[i], bounds[i+1])`` (UTC), provider
        and file type; rows may be marginals (see :data:`UploadRow`)."""

    def request_histogram(self, scope: Scope, start: datetime, end: datetime) -> Histogram:
        """Requests of the scope's keys in the UTC range ``[start, end)``."""

    def failure_rows(
        self,
        scope: Scope,
        start: datetime,
        end: datetime,
        kinds: tuple[str, ...],
        before: FailureKey | None,
        limit: int,
    ) -> list[Failure]:
        """Up to ``limit`` failures of ``kinds`` (``upload``, ``request``) in the UTC range
        ``[start, end)`` and ``scope`` (provider and type filters apply to uploads), newest
        first by :data:`FailureKey` and strictly after ``before`` in that order (keyset)."""

    def export_rows(
        self,
        dataset: str,
        scope: Scope,
        start: datetime,
        end: datetime,
        after: tuple[datetime, UUID] | None,
        limit: int,
    ) -> list[tuple[Any, ...]]:
        """Up to ``limit`` raw rows of ``dataset`` (``uploads`` or ``requests``) in ``[start,
        end)`` and ``scope``, oldest first by (time, id) and strictly after ``after`` (keyset).
        Columns in :data:`EXPORT_COLUMNS` order, ready to write: ids as canonical UUID text,
        times as ISO 8601 UTC text with microseconds (``2025-09-01T12:00:00.000000+00:00``),
        numbers and other text as stored, missing values None."""

    def mismatch_rows(
        self, scope: Scope, start: datetime, end: datetime
    ) -> list[tuple[str, str, int]]:
        """Uploads in ``[start, end)`` and ``scope`` whose declared type differs from the
        detected one, as (file_type, declared_type, uploads) rows (rows may repeat a pair;
        they add)."""

    def endpoint_rows(
        self, scope: Scope, start: datetime, end: datetime, filters: RequestFilter
    ) -> list[EndpointRow]:
        """Requests of the scope's keys in ``[start, end)`` inside ``filters``, by endpoint
        label, status code and coarse latency bucket (see :data:`EndpointRow`)."""

    def request_series(
        self, scope: Scope, bounds: Sequence[datetime], filters: RequestFilter
    ) -> list[SeriesRow]:
        """Requests of the scope's keys inside ``filters`` per period ``[bounds[i],
        bounds[i+1])`` and coarse latency bucket (see :data:`SeriesRow`)."""

    def consumer_rows(self, scope: Scope, start: datetime, end: datetime) -> list[ConsumerRow]:
        """One row per key of the scope with an upload or a request in ``[start, end)``
        (``scope.keys`` None: every key, rows without one as key None); upload columns honour
        the scope's provider and type filters, request columns do not."""


class GranularReads(NamedTuple):
    """Every read of one ``/granular`` answer (see :class:`GranularReader`)."""

    rows: list[UploadRow]  # the range's periods, as ``Reader.upload_rows`` gives them
    histogram: Histogram  # the range's requests
    previous_rows: list[UploadRow]  # the previous range as period 0 (totals only)
    previous_histogram: Histogram
    mismatches: list[tuple[str, str, int]]  # as ``Reader.mismatch_rows``


@runtime_checkable
class GranularReader(Protocol):
    """A backend that reads all of ``/granular`` at once. Where each statement has a large
    fixed cost (ClickHouse spends milliseconds planning one, and chdb runs them one at a
    time), two reads instead of five save most of an answer's time; the read path uses this in
    place of the five primitives when a backend has it."""

    def granular_reads(
        self, scope: Scope, bounds: Sequence[datetime], previous: datetime | None
    ) -> GranularReads:
        """The reads of ``/granular`` over periods ``bounds`` (UTC); ``previous`` starts the
        previous range, which ends at ``bounds[0]`` (None: there is none, its reads are
        empty)."""


@runtime_checkable
class RequestsReader(Protocol):
    """A backend that reads ``/requests``' endpoint rows and series at once (one read instead
    of two, for the reason of :class:`GranularReader`)."""

    def requests_reads(
        self, scope: Scope, bounds: Sequence[datetime], filters: RequestFilter
    ) -> tuple[list[EndpointRow], list[SeriesRow]]:
        """``Reader.endpoint_rows`` over the whole of ``bounds`` and ``Reader.request_series``
        per period."""


@runtime_checkable
class Backend(Writer, Reader, Protocol):
    """One engine: both sides."""
