"""The read path: local-time usage answered exactly from the rollups.

A query covers the UTC instants [local start 00:00, local end+1 00:00) cut into periods
(:func:`usage_middleware._timerange.periods`). Each period is read from the coarsest source that
fits inside it:

* ``daily_usage`` for whole UTC days inside the period,
* ``hourly_usage`` for whole UTC hours inside it that no whole day covers,
* raw ``file_uploads`` only for the sub-hour edges (zones with :30/:45 offsets).

All three sources go into one ``UNION ALL`` whose rows are tagged with their period by a
balanced ``CASE`` tree (a binary search over the period boundaries, in SQL), then grouped by
(period, provider, file_type) in the database. Because every rollup is exact, the answer equals
aggregating the raw rows over the same local range — for every time zone — while 12 months cost
a few hundred rollup rows instead of millions of raw ones.

API-request statistics take the same route over the whole range: merged latency histograms
(``*_request_usage``) give p95 within ``LATENCY_RELATIVE_ERROR`` and sums give the exact mean.

The functions are synchronous (they block on the database): call them from a worker thread in
async code. ``key_ids=None`` means every key (including rows without one); an empty collection
means no key and gives zeros without touching the database.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from itertools import pairwise
from typing import Any
from uuid import UUID

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Integer,
    Select,
    Table,
    and_,
    case,
    cast,
    func,
    literal,
    literal_column,
    or_,
    select,
    union_all,
)

from ._schema import (
    api_requests,
    daily_request_usage,
    daily_usage,
    file_uploads,
    hourly_request_usage,
    hourly_usage,
    latency_bucket,
    latency_representative,
)
from ._store import UsageStore
from ._timerange import QuerySpec, periods

__all__ = [
    "breakdowns",
    "granular",
    "history",
    "request_stats",
]

_HOUR = timedelta(hours=1)
_DAY = timedelta(days=1)
_OR_CHUNK = 100  # ranges per OR list; SQLite caps expression depth at 1000


# --- planning: which UTC intervals come from which source ------------------------------------


@dataclass
class _Plan:
    """UTC intervals per source, merged where adjacent; boundaries are the period starts."""

    days: list[tuple[datetime, datetime]]
    hours: list[tuple[datetime, datetime]]
    raw: list[tuple[datetime, datetime]]


def _floor_hour(t: datetime) -> datetime:
    return t.replace(minute=0, second=0, microsecond=0)


def _ceil_hour(t: datetime) -> datetime:
    f = _floor_hour(t)
    return f if f == t else f + _HOUR


def _floor_day(t: datetime) -> datetime:
    return t.replace(hour=0, minute=0, second=0, microsecond=0)


def _ceil_day(t: datetime) -> datetime:
    f = _floor_day(t)
    return f if f == t else f + _DAY


def _append(intervals: list[tuple[datetime, datetime]], a: datetime, b: datetime) -> None:
    if a >= b:
        return
    if intervals and intervals[-1][1] == a:
        intervals[-1] = (intervals[-1][0], b)
    else:
        intervals.append((a, b))


def plan(bounds: Sequence[datetime]) -> _Plan:
    """Split consecutive periods ``[bounds[i], bounds[i+1])`` into day, hour and raw pieces."""
    p = _Plan([], [], [])
    for a, b in pairwise(bounds):
        d0, d1 = _ceil_day(a), _floor_day(b)
        h0, h1 = _ceil_hour(a), _floor_hour(b)
        if h0 >= h1:  # not one whole UTC hour inside: all raw
            _append(p.raw, a, b)
            continue
        _append(p.raw, a, h0)
        if d0 < d1:
            _append(p.hours, h0, d0)
            _append(p.days, d0, d1)
            _append(p.hours, d1, h1)
        else:
            _append(p.hours, h0, h1)
        _append(p.raw, h1, b)
    return p


def _bisect_case(column: Any, bounds: Sequence[Any]) -> ColumnElement[Any]:
    """SQL for ``bisect_right(bounds, column)``: the period index, by a balanced CASE tree."""

    def node(lo: int, hi: int) -> ColumnElement[Any]:
        # the answer lies in [lo, hi]
        if lo == hi:
            return literal_column(str(lo), Integer)  # our own small int: inline, not a parameter
        mid = (lo + hi) // 2  # bounds[mid] separates index mid from mid + 1
        return case((column < bounds[mid], node(lo, mid)), else_=node(mid + 1, hi))

    return node(0, len(bounds))


def _within(column: Any, intervals: Sequence[tuple[Any, Any]]) -> ColumnElement[bool]:
    return or_(*(and_(column >= a, column < b) for a, b in intervals))


def _chunks(intervals: list[tuple[Any, Any]]) -> list[list[tuple[Any, Any]]]:
    return [intervals[i : i + _OR_CHUNK] for i in range(0, len(intervals), _OR_CHUNK)]


def _inner_bounds(starts: Sequence[Any], lo: Any, hi: Any) -> list[Any]:
    """Period boundaries that can separate values in [lo, hi); the rest only add CASE depth."""
    return [s for s in starts if lo < s < hi] if starts else []


def _index_offset(starts: Sequence[Any], lo: Any) -> int:
    """How many boundaries lie at or before ``lo`` (added back to a trimmed CASE's result)."""
    return sum(1 for s in starts if s <= lo)


def _period_expr(column: Any, starts: Sequence[Any], lo: Any, hi: Any) -> ColumnElement[Any]:
    inner = _inner_bounds(starts, lo, hi)
    base = _index_offset(starts, lo)
    expr = _bisect_case(column, inner)
    return expr if base == 0 else expr + base


# --- filters ----------------------------------------------------------------------------------


def _escape_like(value: str) -> str:
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _file_type_filter(column: Any, file_types: Sequence[str]) -> ColumnElement[bool] | None:
    if not file_types:
        return None
    exact = [t for t in file_types if not t.endswith("/*")]
    families = [t[:-1] for t in file_types if t.endswith("/*")]
    parts: list[ColumnElement[bool]] = []
    if exact:
        parts.append(column.in_(exact))
    parts.extend(column.like(_escape_like(f) + "%", escape="\\") for f in families)
    return or_(*parts)


def _filters(
    table: Table, spec: QuerySpec, key_ids: Collection[UUID] | None, *, uploads: bool = True
) -> list[ColumnElement[bool]]:
    out: list[ColumnElement[bool]] = []
    if key_ids is not None:
        out.append(table.c.api_key_id.in_(sorted(key_ids)))
    if uploads:
        if spec.providers:
            out.append(table.c.provider.in_(spec.providers))
        ft = _file_type_filter(table.c.file_type, spec.file_types)
        if ft is not None:
            out.append(ft)
    return out


def _as_date(t: datetime) -> date:
    return t.date()


# --- uploads ----------------------------------------------------------------------------------

Counts = list[int]  # uploads, bytes, successful, failed


def _upload_selects(
    spec: QuerySpec, key_ids: Collection[UUID] | None, starts: Sequence[datetime], p: _Plan
) -> list[Select[Any]]:
    selects: list[Select[Any]] = []
    day_starts = [_ceil_day(s) for s in starts[1:]]
    hour_starts = [_ceil_hour(s) for s in starts[1:]]
    raw_starts = list(starts[1:])
    rollups: list[tuple[Table, Any, list[tuple[Any, Any]], list[Any]]] = [
        (
            daily_usage,
            daily_usage.c.usage_date,
            [(_as_date(a), _as_date(b)) for a, b in p.days],
            [_as_date(s) for s in day_starts],
        ),
        (hourly_usage, hourly_usage.c.usage_hour, list(p.hours), hour_starts),
    ]
    for table, column, intervals, bounds in rollups:
        for chunk in _chunks(intervals):
            selects.append(
                select(
                    _period_expr(column, bounds, chunk[0][0], chunk[-1][1]).label("p"),
                    table.c.provider,
                    table.c.file_type,
                    table.c.total_uploads.label("u"),
                    table.c.total_file_size.label("b"),
                    table.c.successful_requests.label("s"),
                    table.c.failed_requests.label("f"),
                ).where(_within(column, chunk), *_filters(table, spec, key_ids))
            )
    fu = file_uploads
    ok = case((fu.c.upload_status == "success", 1), else_=0)
    for chunk in _chunks(p.raw):
        selects.append(
            select(
                _period_expr(fu.c.uploaded_at, raw_starts, chunk[0][0], chunk[-1][1]).label("p"),
                fu.c.provider,
                fu.c.file_type,
                literal(1, BigInteger).label("u"),
                fu.c.file_size.label("b"),
                cast(ok, BigInteger).label("s"),
                cast(1 - ok, BigInteger).label("f"),
            ).where(_within(fu.c.uploaded_at, chunk), *_filters(fu, spec, key_ids))
        )
    return selects


def _upload_rows(
    store: UsageStore, spec: QuerySpec, key_ids: Collection[UUID] | None, starts: list[datetime]
) -> list[tuple[int, str, str, int, int, int, int]]:
    """(period index, provider, file_type, uploads, bytes, successful, failed) rows."""
    if key_ids is not None and not key_ids:
        return []
    bounds = [*starts, spec.end_utc]
    selects = _upload_selects(spec, key_ids, starts, plan(bounds))
    if not selects:
        return []
    union = (selects[0] if len(selects) == 1 else union_all(*selects)).subquery("pieces")
    stmt = select(
        union.c.p,
        union.c.provider,
        union.c.file_type,
        *(cast(func.sum(union.c[c]), BigInteger) for c in ("u", "b", "s", "f")),
    ).group_by(union.c.p, union.c.provider, union.c.file_type)
    store.ensure_schema()
    with store.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(stmt)]


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


def _fold(
    rows: list[tuple[int, str, str, int, int, int, int]],
) -> tuple[dict[int, Counts], dict[str, Counts], dict[str, Counts], Counts]:
    by_period: dict[int, Counts] = defaultdict(lambda: [0, 0, 0, 0])
    by_type: dict[str, Counts] = defaultdict(lambda: [0, 0, 0, 0])
    by_provider: dict[str, Counts] = defaultdict(lambda: [0, 0, 0, 0])
    totals = [0, 0, 0, 0]
    for p, provider, file_type, *values in rows:
        for acc in (by_period[p], by_type[file_type], by_provider[provider], totals):
            for i, v in enumerate(values):
                acc[i] += v
    return by_period, by_type, by_provider, totals


def granular(
    store: UsageStore, spec: QuerySpec, key_ids: Collection[UUID] | None = None
) -> dict[str, Any]:
    """The ``GET /granular`` answer: totals, zero-filled series, breakdowns and request stats."""
    ps = periods(spec)
    rows = _upload_rows(store, spec, key_ids, [p.start for p in ps])
    by_period, by_type, by_provider, totals = _fold(rows)
    series = []
    for i, period in enumerate(ps):
        c = by_period.get(i, [0, 0, 0, 0])
        series.append(
            {
                "period": period.label,
                "uploads": c[0],
                "bytes": c[1],
                "successful": c[2],
                "failed": c[3],
            }
        )
    return {
        "range": _range_json(spec),
        "totals": {
            "uploads": totals[0],
            "bytes": totals[1],
            "successful": totals[2],
            "failed": totals[3],
        },
        "series": series,
        "file_types": _breakdown(by_type, "file_type"),
        "providers": _breakdown(by_provider, "provider"),
        "requests": request_stats(store, spec, key_ids),
    }


def _whole_range_rows(
    store: UsageStore, spec: QuerySpec, key_ids: Collection[UUID] | None
) -> list[tuple[int, str, str, int, int, int, int]]:
    """Upload rows for the whole range as a single period (granularity does not matter)."""
    return _upload_rows(store, spec, key_ids, [spec.start_utc])


def breakdowns(
    store: UsageStore, spec: QuerySpec, key_ids: Collection[UUID] | None = None
) -> dict[str, Any]:
    """Totals plus file type and provider breakdowns (``/file-types`` and ``/providers``)."""
    _, by_type, by_provider, totals = _fold(_whole_range_rows(store, spec, key_ids))
    return {
        "range": _range_json(spec),
        "totals": {
            "uploads": totals[0],
            "bytes": totals[1],
            "successful": totals[2],
            "failed": totals[3],
        },
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


# --- API requests -----------------------------------------------------------------------------


def request_stats(
    store: UsageStore, spec: QuerySpec, key_ids: Collection[UUID] | None = None
) -> dict[str, Any]:
    """Requests in the local range and key scope: total, errors (status >= 400), mean, p95.

    p95 is the nearest-rank 95th percentile read from merged latency histograms, reported as
    its bucket's representative: within ``LATENCY_RELATIVE_ERROR`` (2 %) of the exact value.
    """
    empty = {"total": 0, "errors": 0, "avg_response_ms": 0.0, "p95_response_ms": 0.0}
    if key_ids is not None and not key_ids:
        return empty
    p = plan([spec.start_utc, spec.end_utc])
    buckets: dict[int, int] = defaultdict(int)
    total = errors = total_us = 0
    selects: list[Select[Any]] = []
    for table, column, intervals in (
        (
            daily_request_usage,
            daily_request_usage.c.usage_date,
            [(_as_date(a), _as_date(b)) for a, b in p.days],
        ),
        (hourly_request_usage, hourly_request_usage.c.usage_hour, p.hours),
    ):
        if intervals:
            selects.append(
                select(
                    table.c.latency_bucket.label("lb"),
                    table.c.total_requests.label("n"),
                    table.c.error_requests.label("e"),
                    table.c.total_response_us.label("us"),
                ).where(_within(column, intervals), *_filters(table, spec, key_ids, uploads=False))
            )
    store.ensure_schema()
    with store.engine.connect() as conn:
        if selects:
            union = (selects[0] if len(selects) == 1 else union_all(*selects)).subquery("pieces")
            stmt = select(
                union.c.lb, *(cast(func.sum(union.c[c]), BigInteger) for c in ("n", "e", "us"))
            ).group_by(union.c.lb)
            for lb, n, e, us in conn.execute(stmt):
                buckets[lb] += n
                total += n
                errors += e
                total_us += us
        if p.raw:
            ar = api_requests
            raw = select(ar.c.response_time_ms, ar.c.status_code).where(
                _within(ar.c.requested_at, p.raw), *_filters(ar, spec, key_ids, uploads=False)
            )
            for ms, status in conn.execute(raw):
                buckets[latency_bucket(ms)] += 1
                total += 1
                errors += status >= 400
                total_us += round(ms * 1000)
    if total == 0:
        return empty
    rank = math.ceil(0.95 * total)
    seen = 0
    p95 = 0.0
    for lb in sorted(buckets):
        seen += buckets[lb]
        if seen >= rank:
            p95 = latency_representative(lb)
            break
    return {
        "total": total,
        "errors": errors,
        "avg_response_ms": round(total_us / total / 1000, 4),
        "p95_response_ms": round(p95, 6),
    }
