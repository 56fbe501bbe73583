"""``GET /requests`` and ``GET /consumers``: request analytics and usage per API key.

Both are shaped here from backend primitives (:class:`usage_middleware._storage.base.Reader`),
the same for every engine:

* ``/requests`` — requests by endpoint label, status code and coarse latency bucket over the
  whole range (totals, endpoints, status codes) and per period (the series). Counts and sums
  are exact; percentiles are nearest-rank over the merged histograms, each reported as its
  bucket's representative, within ``ENDPOINT_RELATIVE_ERROR`` (10 %) of the exact value; the
  totals' within 2 % when no method, route or status filter is given.
* ``/consumers`` — per key: uploads (honouring the provider and type filters), requests, and
  the newest activity in the range; most uploads first.

Requests have no provider or file type: such filters are accepted, listed in ``ignored``,
and change nothing, so a dashboard can send one set of filters everywhere.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping, Sequence
from concurrent.futures import Future
from typing import Any
from uuid import UUID

from ._failures import parse_limit
from ._pool import settle, submit
from ._queries import _both, _percentages, _range_json, percentile
from ._schema import endpoint_method, endpoint_representative
from ._storage.base import (
    ConsumerRow,
    EndpointRow,
    Histogram,
    RequestFilter,
    RequestsReader,
    Scope,
    SeriesRow,
)
from ._store import UsageStore
from ._timerange import QueryError, QuerySpec, periods

__all__ = [
    "DEFAULT_CONSUMERS",
    "MAX_CONSUMERS",
    "NO_FILTER",
    "consumers_answer",
    "parse_consumer_limit",
    "parse_request_filter",
    "requests_answer",
]

DEFAULT_CONSUMERS = 100
MAX_CONSUMERS = 1000
_MAX_VALUE_LENGTH = 512  # a stored path is at most 512 characters
_STATUS_CLASS = re.compile(r"([1-5])xx", re.IGNORECASE)
_STATUS_CODE = re.compile(r"[1-5][0-9]{2}")
NO_FILTER = RequestFilter()

# --- parameters ------------------------------------------------------------------------------


def _values(params: Mapping[str, Sequence[str]], name: str, limit: int) -> list[str]:
    values = [v for v in params.get(name) or [] if v != ""]
    if len(values) > limit:
        raise QueryError(
            "too_many_values", f"at most {limit} {name} values are allowed, got {len(values)}", name
        )
    for v in values:
        if len(v) > _MAX_VALUE_LENGTH:
            raise QueryError(
                "invalid_value", f"{name} values are at most {_MAX_VALUE_LENGTH} characters", name
            )
    return values


def parse_request_filter(params: Mapping[str, Sequence[str]], max_values: int) -> RequestFilter:
    """``method``, ``route`` and ``status`` of a ``/requests`` query; :class:`QueryError`
    (400) for a status that is neither a class (``2xx``) nor a code from 100 to 599.

    Methods compare case-insensitively and by label: a non-standard method selects every
    non-standard method (``OTHER``), as the rollups group them.
    """
    methods = sorted({endpoint_method(m.upper()) for m in _values(params, "method", max_values)})
    routes = sorted({r.replace("\x00", "\ufffd") for r in _values(params, "route", max_values)})
    statuses: set[tuple[int, int]] = set()
    for value in _values(params, "status", max_values):
        m = _STATUS_CLASS.fullmatch(value)
        if m:
            lo = int(m.group(1)) * 100
            statuses.add((lo, lo + 99))
        elif _STATUS_CODE.fullmatch(value):
            statuses.add((int(value), int(value)))
        else:
            raise QueryError(
                "invalid_status",
                f"unknown status {value[:20]!r}; use 1xx to 5xx or a code from 100 to 599",
                "status",
            )
    return RequestFilter(tuple(methods), tuple(routes), tuple(sorted(statuses)))


def parse_consumer_limit(params: Mapping[str, Sequence[str]]) -> int:
    """``limit`` of a ``/consumers`` query: 1 to 1,000, default 100."""
    return parse_limit(params.get("limit") or [], DEFAULT_CONSUMERS, MAX_CONSUMERS)


# --- /requests ---------------------------------------------------------------------------------


class _Latency:
    """Requests and their exact response-time sum plus the merged coarse histogram."""

    __slots__ = ("buckets", "requests", "response_us")

    def __init__(self) -> None:
        self.buckets: dict[int, int] = {}
        self.requests = 0
        self.response_us = 0

    def add(self, bucket: int, requests: int, response_us: int) -> None:
        self.buckets[bucket] = self.buckets.get(bucket, 0) + requests
        self.requests += requests
        self.response_us += response_us

    def average(self) -> float:
        return round(self.response_us / self.requests / 1000, 4) if self.requests > 0 else 0.0

    def percentile(self, q: float) -> float:
        """Nearest-rank ``q`` quantile as its bucket's representative (0.0 when empty)."""
        if self.requests <= 0:
            return 0.0
        rank = math.ceil(q * self.requests)
        seen = 0
        for bucket in sorted(self.buckets):
            seen += self.buckets[bucket]
            if seen >= rank:
                return round(endpoint_representative(bucket), 6)
        return 0.0


class _Endpoint(_Latency):
    __slots__ = ("errors", "request_bytes", "response_bytes")

    def __init__(self) -> None:
        super().__init__()
        self.errors = 0
        self.request_bytes = 0
        self.response_bytes = 0


def _ignored(spec: QuerySpec) -> list[str]:
    given = (("provider", spec.providers), ("file_type", spec.file_types))
    return [name for name, values in given if values]


def _latency_json(x: _Latency) -> dict[str, float]:
    return {
        "avg_response_ms": x.average(),
        "p50_response_ms": x.percentile(0.5),
        "p95_response_ms": x.percentile(0.95),
        "p99_response_ms": x.percentile(0.99),
    }


def _fine_json(h: Histogram) -> dict[str, float]:
    return {f"p{q}_response_ms": round(percentile(h, q / 100), 6) for q in (50, 95, 99)}


def _shape(
    spec: QuerySpec,
    rows: list[EndpointRow],
    series_rows: list[SeriesRow],
    fine: Histogram | None = None,
) -> dict[str, Any]:
    """The answer; ``fine``, when given, is the same requests' finer histogram, which the
    totals' percentiles are read from instead."""
    total = _Endpoint()
    by_endpoint: dict[tuple[str, str], _Endpoint] = {}
    by_status: dict[int, int] = {}
    client = server = 0
    for method, route, status, bucket, n, us, req_bytes, resp_bytes in rows:
        errors = n if status >= 400 else 0
        endpoint = by_endpoint.get((method, route))
        if endpoint is None:
            endpoint = by_endpoint[method, route] = _Endpoint()
        for acc in (total, endpoint):
            acc.add(bucket, n, us)
            acc.errors += errors
            acc.request_bytes += req_bytes
            acc.response_bytes += resp_bytes
        by_status[status] = by_status.get(status, 0) + n
        if 400 <= status < 500:
            client += n
        elif status >= 500:
            server += n
    endpoints = sorted(
        ((k, e) for k, e in by_endpoint.items() if e.requests > 0),
        key=lambda kv: (-kv[1].requests, kv[0]),
    )
    shares = _percentages([e.requests for _, e in endpoints])
    statuses = sorted(((s, n) for s, n in by_status.items() if n > 0), key=lambda x: (-x[1], x[0]))
    status_shares = _percentages([n for _, n in statuses])

    ps = periods(spec)
    per_period: dict[int, _Latency] = {}
    period_errors: dict[int, int] = {}
    for p, bucket, n, errors, us in series_rows:
        per_period.setdefault(p, _Latency()).add(bucket, n, us)
        period_errors[p] = period_errors.get(p, 0) + errors
    series = []
    for i, period in enumerate(ps):
        x = per_period.get(i) or _Latency()
        series.append(
            {
                "period": period.label,
                "requests": x.requests,
                "errors": period_errors.get(i, 0),
                "avg_response_ms": x.average(),
                "p50_response_ms": x.percentile(0.5),
                "p95_response_ms": x.percentile(0.95),
            }
        )
    return {
        "range": _range_json(spec),
        "totals": {
            "requests": total.requests,
            "errors": total.errors,
            "client_errors": client,
            "server_errors": server,
            **_latency_json(total),
            **(_fine_json(fine) if fine and 0 < fine.requests == total.requests else {}),
            "request_bytes": total.request_bytes,
            "response_bytes": total.response_bytes,
        },
        "series": series,
        "endpoints": [
            {
                "method": method,
                "route": route,
                "requests": e.requests,
                "errors": e.errors,
                "error_rate": round(e.errors / e.requests, 4),
                **_latency_json(e),
                "request_bytes": e.request_bytes,
                "response_bytes": e.response_bytes,
                "percentage": share,
            }
            for ((method, route), e), share in zip(endpoints, shares, strict=True)
        ],
        "status_codes": [
            {"status_code": s, "requests": n, "percentage": share}
            for (s, n), share in zip(statuses, status_shares, strict=True)
        ],
        "ignored": _ignored(spec),
    }


def requests_answer(
    store: UsageStore,
    spec: QuerySpec,
    key_ids: Collection[UUID] | None,
    filters: RequestFilter = NO_FILTER,
) -> dict[str, Any]:
    """The ``GET /requests`` answer for the local range, key scope and request filters.

    The whole-range read and the per-period read are independent; on a pooled server they
    run at the same time. Without a method, route or status filter the totals' percentiles
    come from the per-key request histograms ``/granular`` reads (within 2 %, the same
    ``p95_response_ms`` as its ``requests``), a third read beside the two.
    """
    if key_ids is not None and not key_ids:
        return _shape(spec, [], [])
    store.ensure_schema()
    backend = store.backend
    scope = Scope(None if key_ids is None else tuple(key_ids))
    bounds = [*(p.start for p in periods(spec)), spec.end_utc]
    fine = None
    later: Future[Histogram] | None = None
    if filters.empty:
        if backend.parallel_reads:
            later = submit(lambda: backend.request_histogram(scope, spec.start_utc, spec.end_utc))
        else:
            fine = backend.request_histogram(scope, spec.start_utc, spec.end_utc)
    try:
        if isinstance(backend, RequestsReader):
            rows, series_rows = backend.requests_reads(scope, bounds, filters)
        else:
            rows, series_rows = _both(
                store,
                lambda: backend.endpoint_rows(scope, spec.start_utc, spec.end_utc, filters),
                lambda: backend.request_series(scope, bounds, filters),
            )
    except BaseException:
        if later is not None:
            settle([later])
        raise
    if later is not None:
        fine = later.result()
    return _shape(spec, rows, series_rows, fine)


# --- /consumers --------------------------------------------------------------------------------


def consumers_answer(
    store: UsageStore,
    spec: QuerySpec,
    key_ids: Collection[UUID] | None,
    limit: int = DEFAULT_CONSUMERS,
) -> dict[str, Any]:
    """The ``GET /consumers`` answer without labels (the router adds them): one row per key
    of the scope with usage in the range, most uploads first (then most requests, then key),
    at most ``limit``; ``more`` says whether keys were left out."""
    found: list[ConsumerRow] = []
    if key_ids is None or key_ids:
        store.ensure_schema()
        scope = Scope(None if key_ids is None else tuple(key_ids), spec.providers, spec.file_types)
        found = store.backend.consumer_rows(scope, spec.start_utc, spec.end_utc)
    rows = sorted(
        (r for r in found if r[1] > 0 or r[4] > 0),
        key=lambda r: (-r[1], -r[4], "" if r[0] is None else str(r[0])),
    )
    return {
        "range": _range_json(spec),
        "consumers": [
            {
                "api_key_id": None if key is None else str(key),
                "label": None,
                "uploads": uploads,
                "bytes": size,
                "failed_uploads": failed,
                "requests": requests,
                "errors": errors,
                "last_seen": None if seen is None else seen.isoformat(),
            }
            for key, uploads, size, failed, requests, errors, seen in rows[:limit]
        ],
        "more": len(rows) > limit,
    }
