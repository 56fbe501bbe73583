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
from typing import Any
from uuid import UUID

from .._errors import ConfigurationError
from .._records import RequestRecord, UploadRecord
from .._schema import (
    OTHER_ROUTE,
    ROUTES_PER_KEY_DAY,
    UNMATCHED_ROUTE,
    endpoint_bucket,
    endpoint_method,
    endpoint_route,
    latency_bucket,
)
from .base import (
    EXPORT_COLUMNS,
    ConsumerRow,
    EndpointRow,
    Failure,
    FailureKey,
    Histogram,
    MaintainResult,
    RequestFilter,
    Scope,
    SeriesRow,
    UploadRow,
    is_failed_request,
)
from .legacy import LegacySource, MigrationResult

__all__ = ["MemoryBackend"]


def _export_value(value: Any) -> Any:
    """A value as :meth:`MemoryBackend.export_rows` gives it (ids and times as text)."""
    if isinstance(value, datetime):
        return value.isoformat(timespec="microseconds")
    return str(value) if isinstance(value, UUID) else value


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
        # per request id, its (method, route) labels, fixed when it was written (route cap)
        self._labels: dict[UUID, tuple[str, str]] = {}
        self._named: dict[tuple[UUID | None, Any], set[str]] = {}

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
            fresh = [r for r in {r.id: r for r in requests}.values() if r.id not in self._requests]
            for request in fresh:
                self._requests[request.id] = dataclasses.replace(request)
            self._label(fresh)
            new += len(fresh)
        return new

    def _label(self, requests: Sequence[RequestRecord]) -> None:
        """Fix new requests' endpoint labels: a key's new named routes of a UTC day are admitted
        in route order while the day holds fewer than ``ROUTES_PER_KEY_DAY``; the rest are
        ``(other)`` (the rule every backend's writer follows)."""
        wanted: dict[tuple[UUID | None, Any], set[str]] = {}
        for r in requests:
            route = endpoint_route(r.path, r.route_matched)
            if route != UNMATCHED_ROUTE:
                wanted.setdefault((r.api_key_id, r.requested_at.date()), set()).add(route)
        for key_day, routes in wanted.items():
            named = self._named.setdefault(key_day, set())
            for route in sorted(routes - named):
                if len(named) >= ROUTES_PER_KEY_DAY:
                    break
                named.add(route)
        for r in requests:
            route = endpoint_route(r.path, r.route_matched)
            if (
                route != UNMATCHED_ROUTE
                and route not in self._named[r.api_key_id, r.requested_at.date()]
            ):
                route = OTHER_ROUTE
            self._labels[r.id] = (endpoint_method(r.method), route)

    def ping(self) -> None:
        """Always answers."""

    def seal(self, before: datetime | None = None) -> int:
        """Nothing to do: this backend answers from its rows."""
        return 0

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

    def failure_rows(
        self,
        scope: Scope,
        start: datetime,
        end: datetime,
        kinds: tuple[str, ...],
        before: FailureKey | None,
        limit: int,
    ) -> list[Failure]:
        with self._lock:
            uploads = list(self._uploads.values())
            requests = list(self._requests.values())
        out: list[Failure] = []
        if "upload" in kinds:
            out += [
                Failure(
                    "upload",
                    u.uploaded_at,
                    u.id,
                    u.api_key_id,
                    provider=u.provider,
                    file_type=u.file_type,
                    declared_type=u.declared_type,
                    file_size=u.file_size,
                    error_message=u.error_message,
                )
                for u in uploads
                if u.upload_status == "failed"
                and start <= u.uploaded_at < end
                and scope.matches_upload(u)
            ]
        if "request" in kinds:
            out += [
                Failure(
                    "request",
                    r.requested_at,
                    r.id,
                    r.api_key_id,
                    method=r.method,
                    route=r.path,
                    status_code=r.status_code,
                    error_message=r.error_message,
                )
                for r in requests
                if is_failed_request(r)
                and start <= r.requested_at < end
                and scope.matches_request(r)
            ]
        if before is not None:
            out = [f for f in out if f.key < before]
        out.sort(key=lambda f: f.key, reverse=True)
        return out[:limit]

    def export_rows(
        self,
        dataset: str,
        scope: Scope,
        start: datetime,
        end: datetime,
        after: tuple[datetime, UUID] | None,
        limit: int,
    ) -> list[tuple[Any, ...]]:
        columns = EXPORT_COLUMNS[dataset]
        with self._lock:
            if dataset == "uploads":
                found: list[Any] = [
                    u
                    for u in self._uploads.values()
                    if start <= u.uploaded_at < end and scope.matches_upload(u)
                ]
            else:
                found = [
                    r
                    for r in self._requests.values()
                    if start <= r.requested_at < end and scope.matches_request(r)
                ]
        at = columns[-1]
        rows = sorted(found, key=lambda r: (getattr(r, at), r.id))
        if after is not None:
            rows = [r for r in rows if (getattr(r, at), r.id) > after]
        return [tuple(_export_value(getattr(r, c)) for c in columns) for r in rows[:limit]]

    def mismatch_rows(
        self, scope: Scope, start: datetime, end: datetime
    ) -> list[tuple[str, str, int]]:
        acc: dict[tuple[str, str], int] = {}
        with self._lock:
            rows = list(self._uploads.values())
        for u in rows:
            if (
                u.declared_type is not None
                and u.declared_type != u.file_type
                and start <= u.uploaded_at < end
                and scope.matches_upload(u)
            ):
                acc[u.file_type, u.declared_type] = acc.get((u.file_type, u.declared_type), 0) + 1
        return [(t, d, n) for (t, d), n in acc.items()]

    def _labelled(
        self, scope: Scope, start: datetime, end: datetime, filters: RequestFilter
    ) -> list[tuple[RequestRecord, str, str]]:
        with self._lock:
            rows = [(r, *self._labels[r.id]) for r in self._requests.values()]
        return [
            (r, method, route)
            for r, method, route in rows
            if start <= r.requested_at < end
            and scope.matches_request(r)
            and filters.matches(method, route, r.status_code)
        ]

    def endpoint_rows(
        self, scope: Scope, start: datetime, end: datetime, filters: RequestFilter
    ) -> list[EndpointRow]:
        acc: dict[tuple[str, str, int, int], list[int]] = {}
        for r, method, route in self._labelled(scope, start, end, filters):
            ms = r.response_time_ms
            c = acc.setdefault((method, route, r.status_code, endpoint_bucket(ms)), [0, 0, 0, 0])
            c[0] += 1
            c[1] += round(ms * 1000)
            c[2] += r.request_size
            c[3] += r.response_size
        return [(*k, *c) for k, c in acc.items()]  # type: ignore[misc]

    def request_series(
        self, scope: Scope, bounds: Sequence[datetime], filters: RequestFilter
    ) -> list[SeriesRow]:
        acc: dict[tuple[int, int], list[int]] = {}
        for r, _, _ in self._labelled(scope, bounds[0], bounds[-1], filters):
            ms = r.response_time_ms
            key = (bisect_right(bounds, r.requested_at) - 1, endpoint_bucket(ms))
            c = acc.setdefault(key, [0, 0, 0])
            c[0] += 1
            c[1] += r.status_code >= 400
            c[2] += round(ms * 1000)
        return [(p, b, c[0], c[1], c[2]) for (p, b), c in acc.items()]

    def consumer_rows(self, scope: Scope, start: datetime, end: datetime) -> list[ConsumerRow]:
        with self._lock:
            uploads = list(self._uploads.values())
            requests = list(self._requests.values())
        acc: dict[UUID | None, list[Any]] = {}
        for u in uploads:
            if start <= u.uploaded_at < end and scope.matches_upload(u):
                c = acc.setdefault(u.api_key_id, [0, 0, 0, 0, 0, None])
                c[0] += 1
                c[1] += u.file_size
                c[2] += u.upload_status != "success"
                c[5] = u.uploaded_at if c[5] is None else max(c[5], u.uploaded_at)
        for r in requests:
            if start <= r.requested_at < end and scope.matches_request(r):
                c = acc.setdefault(r.api_key_id, [0, 0, 0, 0, 0, None])
                c[3] += 1
                c[4] += r.status_code >= 400
                c[5] = r.requested_at if c[5] is None else max(c[5], r.requested_at)
        return [(key, *c) for key, c in acc.items()]
