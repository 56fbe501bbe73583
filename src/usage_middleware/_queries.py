"""The read path's answers: local-time usage shaped into the JSON the router serves.

A query covers the UTC instants [local start 00:00, local end+1 00:00) cut into periods
(:func:`usage_middleware._timerange.periods`). The store's backend answers a few primitives
(:class:`usage_middleware._storage.base.Reader`): uploads summed per period, provider and file
type, the merged latency histogram of requests, and declared-type mismatch counts. Everything
else — zero-filled series,
breakdowns with shares that add up to 100, totals, mean and p95 — is shaped here, the same for
every engine, so engines differ only in how fast they answer, never in what.

The functions are synchronous (they block on the database): call them from a worker thread in
async code. ``key_ids=None`` means every key (including rows without one); an empty collection
means no key and gives zeros without touching the database.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import Future
from datetime import date, timedelta
from typing import Any, TypeVar
from uuid import UUID

from ._errors import ReadTimeoutError
from ._pool import settle, submit
from ._schema import latency_representative
from ._storage.base import GranularReader, Histogram, Scope, UploadRow
from ._store import UsageStore
from ._timerange import QuerySpec, periods

__all__ = ["ReadTimeoutError", "breakdowns", "granular", "history", "request_stats"]

Counts = list[int]  # uploads, bytes, successful, failed
_T = TypeVar("_T")


def _scope(spec: QuerySpec, key_ids: Collection[UUID] | None) -> Scope:
    keys = None if key_ids is None else tuple(key_ids)
    return Scope(keys, spec.providers, spec.file_types)


def _upload_rows(
    store: UsageStore, spec: QuerySpec, key_ids: Collection[UUID] | None, bounds: list[Any]
) -> list[UploadRow]:
    if key_ids is not None and not key_ids:
        return []
    store.ensure_schema()
    return store.backend.upload_rows(_scope(spec, key_ids), bounds)


def _both(store: UsageStore, first: Callable[[], _T], second: Callable[[], Any]) -> tuple[_T, Any]:
    """Run two independent reads, at the same time where the backend allows it."""
    if not store.backend.parallel_reads:
        return first(), second()
    later = submit(second)
    try:
        result = first()
    finally:
        settle([later])
    return result, later.result()


def _percentages(counts: Sequence[int]) -> list[float]:
    """Shares of ``counts`` in percent with two decimals that add up to exactly 100.

    Largest-remainder rounding: floor every share to 0.01 %, then hand the missing hundredths
    to the largest remainders.
    """
    total = sum(counts)
    if total == 0:
        return [0.0 for _ in counts]
    scaled = [c * 10000 for c in counts]  # in units of 0.01 %
    floors = [s // total for s in scaled]
    missing = 10000 - sum(floors)
    order = sorted(range(len(counts)), key=lambda i: (-(scaled[i] % total), i))
    for i in order[:missing]:
        floors[i] += 1
    return [f / 100 for f in floors]


def _breakdown(acc: dict[str, Counts], name: str) -> list[dict[str, Any]]:
    items = sorted(acc.items(), key=lambda kv: (-kv[1][0], kv[0]))
    shares = _percentages([v[0] for _, v in items])
    return [
        {name: k, "uploads": v[0], "bytes": v[1], "percentage": share}
        for (k, v), share in zip(items, shares, strict=True)
    ]


def _range_json(spec: QuerySpec) -> dict[str, Any]:
    return {
        "start": spec.start.isoformat(),
        "end": spec.end.isoformat(),
        "tz": spec.tz_name,
        "granularity": spec.granularity,
    }


def _add(acc: dict[Any, Counts], key: Any, u: int, b: int, s: int, f: int) -> None:
    c = acc.get(key)
    if c is None:
        acc[key] = [u, b, s, f]
    else:
        c[0] += u
        c[1] += b
        c[2] += s
        c[3] += f


def _fold(
    rows: list[UploadRow],
) -> tuple[dict[int, Counts], dict[str, Counts], dict[str, Counts], Counts]:
    """Series, breakdowns and totals from (period, provider, type) rows — full groups, or the
    marginals of a GROUPING SETS query (a row counts only where its column is not NULL)."""
    by_period: dict[int, Counts] = {}
    by_type: dict[str, Counts] = {}
    by_provider: dict[str, Counts] = {}
    totals = [0, 0, 0, 0]
    for p, provider, file_type, u, b, s, f in rows:
        if p is not None:
            _add(by_period, p, u, b, s, f)
            totals[0] += u
            totals[1] += b
            totals[2] += s
            totals[3] += f
        if file_type is not None:
            _add(by_type, file_type, u, b, s, f)
        if provider is not None:
            _add(by_provider, provider, u, b, s, f)
    # a subtraction can leave a type or provider with nothing in the range
    for acc in (by_type, by_provider):
        for key in [k for k, c in acc.items() if c[0] == 0 and c[1] == 0]:
            del acc[key]
    return by_period, by_type, by_provider, totals


def granular(
    store: UsageStore, spec: QuerySpec, key_ids: Collection[UUID] | None = None
) -> dict[str, Any]:
    """The ``GET /granular`` answer: totals, zero-filled series, breakdowns, request stats,
    and the ``previous`` range's totals and ``type_mismatches``.

    The reads are independent; on a pooled server they run at the same time, so the answer
    takes about as long as the slowest one. A backend that reads them all at once
    (``GranularReader``) answers them in one call.
    """
    ps = periods(spec)
    bounds = [*(p.start for p in ps), spec.end_utc]
    backend = store.backend
    if isinstance(backend, GranularReader) and (key_ids is None or key_ids):
        store.ensure_schema()
        prev = previous_range(spec)
        previous = (
            None
            if prev is None
            else dataclasses.replace(spec, start=prev[0], end=prev[1]).start_utc
        )
        reads = backend.granular_reads(_scope(spec, key_ids), bounds, previous)
        rows, request_block = reads.rows, _request_json(reads.histogram)
        additions = _additions_json(
            prev, reads.previous_rows, reads.previous_histogram, reads.mismatches
        )
    else:
        finish_additions, started = start_granular_additions(store, spec, key_ids)
        try:
            rows, request_block = _both(
                store,
                lambda: _upload_rows(store, spec, key_ids, bounds),
                lambda: request_stats(store, spec, key_ids),
            )
        except BaseException:
            settle(started)
            raise
        additions = finish_additions()
    by_period, by_type, by_provider, totals = _fold(rows)
    series = []
    for i, period in enumerate(ps):
        c = by_period.get(i, [0, 0, 0, 0])
        series.append({"period": period.label, **_counts(c)})
    return {
        "range": _range_json(spec),
        "totals": _counts(totals),
        "series": series,
        "file_types": _breakdown(by_type, "file_type"),
        "providers": _breakdown(by_provider, "provider"),
        "requests": request_block,
        **additions,
    }


def _counts(c: Sequence[int]) -> dict[str, int]:
    """The four upload counters as the JSON a period or the totals carry."""
    return {"uploads": c[0], "bytes": c[1], "successful": c[2], "failed": c[3]}


def _whole_range_rows(
    store: UsageStore, spec: QuerySpec, key_ids: Collection[UUID] | None
) -> list[UploadRow]:
    """Upload rows for the whole range as a single period (granularity does not matter)."""
    return _upload_rows(store, spec, key_ids, [spec.start_utc, spec.end_utc])


def breakdowns(
    store: UsageStore, spec: QuerySpec, key_ids: Collection[UUID] | None = None
) -> dict[str, Any]:
    """Totals plus file type and provider breakdowns (``/file-types`` and ``/providers``)."""
    _, by_type, by_provider, totals = _fold(_whole_range_rows(store, spec, key_ids))
    return {
        "range": _range_json(spec),
        "totals": _counts(totals),
        "file_types": _breakdown(by_type, "file_type"),
        "providers": _breakdown(by_provider, "provider"),
    }


def history(
    store: UsageStore, spec: QuerySpec, key_ids: Collection[UUID] | None = None
) -> list[dict[str, Any]]:
    """Per-provider totals in the old aggregated API's shape, most uploads first."""
    _, _, by_provider, _ = _fold(_whole_range_rows(store, spec, key_ids))
    items = sorted(by_provider.items(), key=lambda kv: (-kv[1][0], kv[0]))
    return [{"provider": k, "total_uploads": v[0], "total_size": v[1]} for k, v in items]


def request_stats(
    store: UsageStore, spec: QuerySpec, key_ids: Collection[UUID] | None = None
) -> dict[str, Any]:
    """Requests in the local range and key scope: total, errors (status >= 400), mean, p95.

    p95 is the nearest-rank 95th percentile read from merged latency histograms, reported as
    its bucket's representative: within ``LATENCY_RELATIVE_ERROR`` (2 %) of the exact value.
    """
    if key_ids is not None and not key_ids:
        return _request_json(Histogram())
    store.ensure_schema()
    return _request_json(
        store.backend.request_histogram(_scope(spec, key_ids), spec.start_utc, spec.end_utc)
    )


def _request_json(h: Histogram) -> dict[str, Any]:
    if h.requests == 0:
        return {"total": 0, "errors": 0, "avg_response_ms": 0.0, "p95_response_ms": 0.0}
    return {
        "total": h.requests,
        "errors": h.errors,
        "avg_response_ms": round(h.response_us / h.requests / 1000, 4),
        "p95_response_ms": round(percentile(h, 0.95), 6),
    }


def percentile(h: Histogram, q: float) -> float:
    """The nearest-rank ``q`` quantile of ``h``, as its bucket's representative: within
    ``LATENCY_RELATIVE_ERROR`` (2 %) of the exact value."""
    rank = math.ceil(q * h.requests)
    seen = 0
    for lb in sorted(h.buckets):
        seen += h.buckets[lb]
        if seen >= rank:
            return latency_representative(lb)
    return 0.0


# --- /granular: the previous range and declared-type mismatches -------------------------------


def previous_range(spec: QuerySpec) -> tuple[date, date] | None:
    """The equally long local range (in days) that ends the day before ``spec`` starts; None
    when it would begin before the earliest date a query may name."""
    days = (spec.end - spec.start).days + 1
    if spec.start.toordinal() - days < date(2, 1, 1).toordinal():
        return None
    return spec.start - timedelta(days=days), spec.start - timedelta(days=1)


def _type_mismatches(rows: list[tuple[str, str, int]]) -> list[dict[str, Any]]:
    acc: dict[tuple[str, str], int] = {}
    for file_type, declared, n in rows:
        acc[file_type, declared] = acc.get((file_type, declared), 0) + n
    items = sorted(((k, n) for k, n in acc.items() if n), key=lambda kv: (-kv[1], kv[0]))
    return [{"file_type": t, "declared_type": d, "uploads": n} for (t, d), n in items]


def start_granular_additions(
    store: UsageStore, spec: QuerySpec, key_ids: Collection[UUID] | None
) -> tuple[Callable[[], dict[str, Any]], list[Future[Any]]]:
    """Start reading ``/granular``'s ``previous`` and ``type_mismatches``; the returned call
    finishes and answers them (the reads it started are returned beside it, for an answer that
    fails before it finishes to wait for).

    ``previous``: upload totals plus ``requests`` and ``errors`` of :func:`previous_range`
    (same zone, same key scope and filters; ``start``/``end`` name it, null with zeros when it
    cannot exist); ``type_mismatches``: uploads in the range whose declared type differs from
    the detected one, per (file_type, declared_type), most uploads first. Both come from
    rollups, so they do not change when raw rows are pruned. Where the backend allows it, the
    two request-free reads start on the read pool at once (they overlap the main answer's
    reads); the upload read of the previous range, which may itself fan out, runs in the
    finishing call."""
    zero = {"uploads": 0, "bytes": 0, "successful": 0, "failed": 0, "requests": 0, "errors": 0}
    if key_ids is not None and not key_ids:
        empty = {"previous": {"start": None, "end": None, **zero}, "type_mismatches": []}
        return (lambda: empty), []
    store.ensure_schema()
    scope = _scope(spec, key_ids)
    backend = store.backend
    prev = previous_range(spec)
    prev_spec = None if prev is None else dataclasses.replace(spec, start=prev[0], end=prev[1])

    def histogram() -> Histogram:
        if prev_spec is None:
            return Histogram()
        return backend.request_histogram(scope, prev_spec.start_utc, prev_spec.end_utc)

    def mismatches() -> list[tuple[str, str, int]]:
        return backend.mismatch_rows(scope, spec.start_utc, spec.end_utc)

    started: list[Future[Any]] = []
    if backend.parallel_reads:
        later_histogram, later_mismatches = submit(histogram), submit(mismatches)
        started = [later_histogram, later_mismatches]

    def finish() -> dict[str, Any]:
        try:
            rows = [] if prev_spec is None else _whole_range_rows(store, prev_spec, key_ids)
        except BaseException:
            settle(started)
            raise
        if backend.parallel_reads:
            h, found = later_histogram.result(), later_mismatches.result()
        else:
            h, found = histogram(), mismatches()
        return _additions_json(prev, rows, h, found)

    return finish, started


def _additions_json(
    prev: tuple[date, date] | None,
    rows: list[UploadRow],
    h: Histogram,
    mismatches: list[tuple[str, str, int]],
) -> dict[str, Any]:
    """``previous`` and ``type_mismatches`` from the previous range's upload rows and request
    histogram and the range's mismatch rows."""
    previous = {
        "start": None if prev is None else prev[0].isoformat(),
        "end": None if prev is None else prev[1].isoformat(),
        **_counts(_fold(rows)[3]),
        "requests": h.requests,
        "errors": h.errors,
    }
    return {"previous": previous, "type_mismatches": _type_mismatches(mismatches)}
