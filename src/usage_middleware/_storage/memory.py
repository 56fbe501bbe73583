"""An in-memory backend: the reference the database backends are tested against, and a store
for tests that should not need a database (``UsageStore("memory://")``).

It keeps the records themselves and answers every read by aggregating them directly, so it is
exact by construction and slow in proportion to what it holds: a test double, not a cache.
Writes are idempotent by ``id`` like every backend's (the first record with an id wins).
"""

from __future__ import annotations

import dataclasses
import threading
from bisect import bisect_right
from collections.abc import Sequence
from datetime import datetime
from uuid import UUID

from .._errors import ConfigurationError
from .._records import RequestRecord, UploadRecord
from .._schema import latency_bucket
from .base import Histogram, MaintainResult, Scope, UploadRow
from .legacy import LegacySource, MigrationResult

__all__ = ["MemoryBackend"]


class MemoryBackend:
    """Records in dictionaries keyed by id; reads scan them. Thread-safe."""

    name = "memory"
    parallel_reads = False
    embedded = True
    ephemeral = True

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._uploads: dict[UUID, UploadRecord] = {}
        self._requests: dict[UUID, RequestRecord] = {}

    def __repr__(self) -> str:
        return f"MemoryBackend(uploads={len(self._uploads)}, requests={len(self._requests)})"

    # --- writer ------------------------------------------------------------------------------

    def create_schema(self, cluster: str | None = None) -> None:
        """Nothing to create."""
        if cluster is not None:
            raise ConfigurationError("the in-memory store has no cluster")

    def has_schema(self) -> bool:
        return True

    def write(self, uploads: Sequence[UploadRecord], requests: Sequence[RequestRecord]) -> int:
        new = 0
        with self._lock:
            for upload in uploads:
                if upload.id not in self._uploads:
                    # a copy: a caller mutating its record later must not change what is stored
                    self._uploads[upload.id] = dataclasses.replace(upload)
                    new += 1
            for request in requests:
                if request.id not in self._requests:
                    self._requests[request.id] = dataclasses.replace(request)
                    new += 1
        return new

    def ping(self) -> None:
        """Always answers."""

    def maintain(self, raw_retention_days: int | None, months_ahead: int) -> MaintainResult:
        """Nothing to do: this backend answers from its rows, so it keeps every one."""
        return MaintainResult()

    def retention_start(self, tables: list[str]) -> datetime | None:
        return None

    def migrate_legacy(self, source: LegacySource) -> MigrationResult:
        raise ConfigurationError(
            "legacy totals are read from a table of the host's SQL database; an in-memory store "
            "has none"
        )

    def before_fork(self) -> None:
        """Nothing is shared with a child but memory, which the fork copies."""

    def after_fork(self) -> None:
        """A child keeps a copy of the parent's rows; the lock is re-made so it is not held."""
        self._lock = threading.Lock()

    def close(self) -> None:
        """Nothing to release."""

    # --- reader ------------------------------------------------------------------------------

    def uploads(self) -> list[UploadRecord]:
        """Every stored upload (copies), oldest first."""
        with self._lock:
            rows = list(self._uploads.values())
        return sorted((dataclasses.replace(r) for r in rows), key=lambda r: (r.uploaded_at, r.id))

    def requests(self) -> list[RequestRecord]:
        """Every stored request (copies), oldest first."""
        with self._lock:
            rows = list(self._requests.values())
        return sorted((dataclasses.replace(r) for r in rows), key=lambda r: (r.requested_at, r.id))

    def upload_rows(self, scope: Scope, bounds: Sequence[datetime]) -> list[UploadRow]:
        start, end = bounds[0], bounds[-1]
        acc: dict[tuple[int, str, str], list[int]] = {}
        with self._lock:
            rows = list(self._uploads.values())
        for r in rows:
            if not (start <= r.uploaded_at < end) or not scope.matches_upload(r):
                continue
            key = (bisect_right(bounds, r.uploaded_at) - 1, r.provider, r.file_type)
            c = acc.setdefault(key, [0, 0, 0, 0])
            ok = r.upload_status == "success"
            c[0] += 1
            c[1] += r.file_size
            c[2] += ok
            c[3] += not ok
        return [(p, provider, t, c[0], c[1], c[2], c[3]) for (p, provider, t), c in acc.items()]

    def request_histogram(self, scope: Scope, start: datetime, end: datetime) -> Histogram:
        out = Histogram()
        with self._lock:
            rows = list(self._requests.values())
        for r in rows:
            if start <= r.requested_at < end and scope.matches_request(r):
                ms = r.response_time_ms
                out.add(latency_bucket(ms), 1, int(r.status_code >= 400), round(ms * 1000))
        return out
