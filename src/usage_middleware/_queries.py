"""The read path: local-time usage answered exactly from the rollups.

A query covers the UTC instants [local start 00:00, local end+1 00:00) cut into periods
(:func:`usage_middleware._timerange.periods`). Each period is read from the coarsest source that
fits inside it:

* ``daily_usage`` for whole UTC days inside the period,
* ``hourly_usage`` for whole UTC hours inside it that no whole day covers,
* raw ``file_uploads`` only for the sub-hour edges (zones with :30/:45 offsets).

The plan is a list of pieces ``(source, UTC interval, period, sign)``; a UTC day cut by a
period boundary may be read as its daily row minus the shorter side (see :func:`plan`). Each
source is joined to its pieces (passed as array/JSON parameters, so the statement text is fixed
and cached), the three are combined with ``UNION ALL`` and summed by (period, provider,
file_type) in the database. Because every rollup is exact, the answer equals aggregating the
raw rows over the same local range — for every time zone — while a year for one key costs some
thousands of rollup rows instead of every raw row.

API-request statistics take the same route over the whole range: merged latency histograms
(``*_request_usage``) give p95 within ``LATENCY_RELATIVE_ERROR`` and sums give the exact mean.

The functions are synchronous (they block on the database): call them from a worker thread in
async code. ``key_ids=None`` means every key (including rows without one); an empty collection
means no key and gives zeros without touching the database.
"""

from __future__ import annotations

import json
import math
from bisect import bisect_right
from collections import defaultdict
from collections.abc import Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Date,
    DateTime,
    Integer,
    Select,
    Table,
    Uuid,
    and_,
    bindparam,
    case,
    cast,
    func,
    literal_column,
    or_,
    select,
    true,
    type_coerce,
    union_all,
)
from sqlalchemy.dialects.postgresql import ARRAY

from ._schema import (
    ROLLUP_KEYS,
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


# --- planning: which UTC intervals come from which source ------------------------------------


@dataclass(frozen=True)
class Piece:
    """Rows of one source over the UTC interval [lo, hi), added to ``period`` times ``sign``.

    ``grain`` is ``day`` (daily rollup), ``hour`` (hourly rollup) or ``raw`` (raw rows).
    """

    grain: str
    lo: datetime
    hi: datetime
    period: int
    sign: int


def _floor_hour(t: datetime) -> datetime:
    return t.replace(minute=0, second=0, microsecond=0)


def _ceil_hour(t: datetime) -> datetime:
    f = _floor_hour(t)
    return f if f == t else f + _HOUR


def _floor_day(t: datetime) -> datetime:
    return t.replace(hour=0, minute=0, second=0, microsecond=0)


_Out = dict[tuple[str, int], list[Piece]]  # (grain, sign) -> pieces in time order


def _emit(out: _Out, grain: str, lo: datetime, hi: datetime, period: int, sign: int) -> None:
    if lo >= hi:
        return
    pieces = out.setdefault((grain, sign), [])
    last = pieces[-1] if pieces else None
    if last and (last.period, last.hi) == (period, lo):
        pieces[-1] = Piece(grain, last.lo, hi, period, sign)
    else:
        pieces.append(Piece(grain, lo, hi, period, sign))


def _split(out: _Out, lo: datetime, hi: datetime, period: int, sign: int) -> None:
    """Whole UTC hours of [lo, hi) from the hourly rollup, the sub-hour edges from raw rows."""
    h0, h1 = _ceil_hour(lo), _floor_hour(hi)
    if h0 >= h1:
        _emit(out, "raw", lo, hi, period, sign)
        return
    _emit(out, "raw", lo, h0, period, sign)
    _emit(out, "hour", h0, h1, period, sign)
    _emit(out, "raw", h1, hi, period, sign)


def _cost(lo: datetime, hi: datetime) -> int:
    """Rough cost of reading [lo, hi) from hours and raw edges, in hourly-row units."""
    h0, h1 = _ceil_hour(lo), _floor_hour(hi)
    if h0 >= h1:
        return 1
    return (h1 - h0) // _HOUR + (lo < h0) + (h1 < hi)


def plan(bounds: Sequence[datetime]) -> list[Piece]:
    """How to read periods ``[bounds[i], bounds[i+1])`` exactly with the fewest rows.

    A UTC day inside one period is one daily read. A day cut by a period boundary or by the
    range edge is read either piece by piece (whole hours from the hourly rollup, sub-hour
    edges from raw rows), or — when cheaper — as its daily row given to the period with the
    largest piece, the other pieces subtracted from that period (and added to their own unless
    they lie outside the range). A New York week boundary at 05:00 UTC thus costs five hourly
    reads instead of twenty-four. Every rollup is exact, so the sum is exact.
    """
    start, end = bounds[0], bounds[-1]
    out: _Out = {}
    d = _floor_day(start)
    while d < end:
        e = d + _DAY
        lo, hi = max(d, start), min(e, end)
        i = bisect_right(bounds, lo) - 1
        pieces: list[tuple[datetime, datetime, int]] = []
        a = lo
        while a < hi:
            b = min(hi, bounds[i + 1])
            pieces.append((a, b, i))
            a, i = b, i + 1
        outside = [(x, y) for x, y in ((d, lo), (hi, e)) if x < y]
        if len(pieces) == 1 and not outside:
            _emit(out, "day", d, e, pieces[0][2], 1)
        else:
            big = max(pieces, key=lambda piece: piece[1] - piece[0])
            others = [piece for piece in pieces if piece is not big]
            direct = sum(_cost(x, y) for x, y, _ in pieces)
            subtract = 1 + 2 * sum(_cost(x, y) for x, y, _ in others)
            subtract += sum(_cost(x, y) for x, y in outside)
            if subtract < direct:
                _emit(out, "day", d, e, big[2], 1)
                for x, y in [*((x, y) for x, y, _ in others), *outside]:
                    _split(out, x, y, big[2], -1)
                for x, y, own in others:
                    _split(out, x, y, own, 1)
            else:
                for x, y, own in pieces:
                    _split(out, x, y, own, 1)
        d = e
    return [piece for pieces in out.values() for piece in pieces]


def _pieces_table(pieces: Sequence[Piece], name: str, as_date: bool, dialect: str) -> Any:
    """The pieces as a table ``(lo, hi, p, sign)`` to join the source on.

    The pieces travel as parameters of a fixed statement text — arrays for ``unnest`` on
    PostgreSQL, one JSON array for ``json_each`` on SQLite — so the statement compiles once
    and is cached whatever the number of pieces.
    """
    if dialect == "postgresql":
        kind: Any = Date() if as_date else DateTime(timezone=True)
        lows = [x.lo.date() if as_date else x.lo for x in pieces]
        highs = [x.hi.date() if as_date else x.hi for x in pieces]
        return (
            func.unnest(
                bindparam(f"{name}_lo", lows, type_=ARRAY(kind)),
                bindparam(f"{name}_hi", highs, type_=ARRAY(kind)),
                bindparam(f"{name}_p", [x.period for x in pieces], type_=ARRAY(Integer())),
                bindparam(f"{name}_sign", [x.sign for x in pieces], type_=ARRAY(Integer())),
            )
            .table_valued("lo", "hi", "p", "sign")
            .render_derived(name=name)
        )
    # SQLite stores dates as ISO text and UTCDateTime as naive 'YYYY-MM-DD HH:MM:SS.ffffff'
    fmt = "%Y-%m-%d" if as_date else "%Y-%m-%d %H:%M:%S.%f"
    rows = [[x.lo.strftime(fmt), x.hi.strftime(fmt), x.period, x.sign] for x in pieces]
    each = func.json_each(bindparam(f"{name}_json", json.dumps(rows))).table_valued("value")
    return select(
        *(
            func.json_extract(each.c.value, f"$[{i}]").label(n)
            for i, n in enumerate(("lo", "hi", "p", "sign"))
        )
    ).cte(name)


# --- filters ----------------------------------------------------------------------------------


def _escape_like(value: str) -> str:
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _file_type_filter(col: Any, file_types: Sequence[str]) -> ColumnElement[bool] | None:
    if not file_types:
        return None
    exact = [t for t in file_types if not t.endswith("/*")]
    families = [t[:-1] for t in file_types if t.endswith("/*")]
    parts: list[ColumnElement[bool]] = []
    if exact:
        parts.append(col.in_(exact))
    parts.extend(col.like(_escape_like(f) + "%", escape="\\") for f in families)
    return or_(*parts)


def _filters(
    table: Table,
    spec: QuerySpec,
    key_ids: Collection[UUID] | None,
    dialect: str,
    *,
    uploads: bool = True,
) -> list[ColumnElement[bool]]:
    out: list[ColumnElement[bool]] = []
    if key_ids is not None:
        key: Any = table.c.api_key_id
        if dialect == "sqlite" and table.name in ROLLUP_KEYS:
            # the SQLite rollup indexes are on ifnull(api_key_id, ''): say it the same way
            key = type_coerce(func.ifnull(key, literal_column("''")), Uuid())
        out.append(key.in_(sorted(key_ids)))
    if uploads:
        if spec.providers:
            out.append(table.c.provider.in_(spec.providers))
        ft = _file_type_filter(table.c.file_type, spec.file_types)
        if ft is not None:
            out.append(ft)
    return out


# --- uploads ----------------------------------------------------------------------------------

Counts = list[int]  # uploads, bytes, successful, failed


def _joined(
    r: Any, table: Table, at: Any, names: Sequence[str], where: list[Any], lateral: bool
) -> Any:
    """Source rows of ``table`` inside each piece, with the piece's period and sign.

    PostgreSQL gets a LATERAL join so that every piece is an index range scan (a plain range
    join is estimated badly and planned as a scan of the key's whole history); SQLite's nested
    loops already drive the join from the small pieces table.
    """
    if lateral:
        inner = (
            select(*(table.c[n] for n in names))
            .where(at >= r.c.lo, at < r.c.hi, *where)
            .offset(0)  # keeps the planner from flattening the LATERAL back into a range join
            .lateral(f"{table.name}_rows")
        )
        return (
            select(r.c.p, r.c.sign, *(inner.c[n] for n in names))
            .select_from(r)
            .join(inner, true())
            .subquery(f"{table.name}_joined")
        )
    return (
        select(r.c.p, r.c.sign, *(table.c[n] for n in names))
        .select_from(r)
        .join(table, and_(at >= r.c.lo, at < r.c.hi))
        .where(*where)
        .subquery(f"{table.name}_joined")
    )


_UPLOAD_COUNTERS = ("total_uploads", "total_file_size", "successful_requests", "failed_requests")


def upload_statement(
    spec: QuerySpec, key_ids: Collection[UUID] | None, starts: list[datetime], dialect: str
) -> Select[Any]:
    """The one statement answering uploads for periods starting at ``starts``: each source
    joined to its pieces, summed by (period, provider, file_type)."""
    pieces = plan([*starts, spec.end_utc])
    lateral = dialect == "postgresql"
    selects: list[Select[Any]] = []
    for grain in ("day", "hour", "raw"):
        mine = [x for x in pieces if x.grain == grain]
        if not mine:
            continue
        r = _pieces_table(mine, f"{grain}_pieces", grain == "day", dialect)
        if grain == "raw":
            fu = file_uploads
            names: tuple[str, ...] = ("provider", "file_type", "file_size", "upload_status")
            j = _joined(
                r, fu, fu.c.uploaded_at, names, _filters(fu, spec, key_ids, dialect), lateral
            )
            ok = case((j.c.upload_status == "success", 1), else_=0)
            cols: list[Any] = [j.c.sign, j.c.sign * j.c.file_size, j.c.sign * ok]
            cols.append(j.c.sign * (1 - ok))
        else:
            table = daily_usage if grain == "day" else hourly_usage
            at = table.c.usage_date if grain == "day" else table.c.usage_hour
            names = ("provider", "file_type", *_UPLOAD_COUNTERS)
            j = _joined(r, table, at, names, _filters(table, spec, key_ids, dialect), lateral)
            cols = [j.c.sign * j.c[n] for n in _UPLOAD_COUNTERS]
        selects.append(
            select(
                j.c.p,
                j.c.provider,
                j.c.file_type,
                *(cast(c, BigInteger).label(n) for c, n in zip(cols, "ubsf", strict=True)),
            )
        )
    union = (selects[0] if len(selects) == 1 else union_all(*selects)).subquery("parts")
    return select(
        union.c.p,
        union.c.provider,
        union.c.file_type,
        *(cast(func.sum(union.c[c]), BigInteger) for c in ("u", "b", "s", "f")),
    ).group_by(union.c.p, union.c.provider, union.c.file_type)


def _connect(store: UsageStore) -> Any:
    """A connection for read queries; on PostgreSQL without JIT, which costs more than these
    small indexed queries take (it kicks in on row estimates, not on actual work)."""
    store.ensure_schema()
    conn = store.engine.connect()
    if store.dialect == "postgresql":
        conn.exec_driver_sql("SET LOCAL jit = off")
    return conn


def _upload_rows(
    store: UsageStore, spec: QuerySpec, key_ids: Collection[UUID] | None, starts: list[datetime]
) -> list[tuple[int, str, str, int, int, int, int]]:
    """(period index, provider, file_type, uploads, bytes, successful, failed) rows."""
    if key_ids is not None and not key_ids:
        return []
    stmt = upload_statement(spec, key_ids, starts, store.dialect)
    with _connect(store) as conn:
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
    rows: list[tuple[int, str, str, int, int, int, int]],
) -> tuple[dict[int, Counts], dict[str, Counts], dict[str, Counts], Counts]:
    by_period: dict[int, Counts] = {}
    by_type: dict[str, Counts] = {}
    by_provider: dict[str, Counts] = {}
    totals = [0, 0, 0, 0]
    for p, provider, file_type, u, b, s, f in rows:
        _add(by_period, p, u, b, s, f)
        _add(by_type, file_type, u, b, s, f)
        _add(by_provider, provider, u, b, s, f)
        totals[0] += u
        totals[1] += b
        totals[2] += s
        totals[3] += f
    # a subtraction can leave a type or provider with nothing in the range
    for acc in (by_type, by_provider):
        for key in [k for k, c in acc.items() if c[0] == 0 and c[1] == 0]:
            del acc[key]
    return by_period, by_type, by_provider, totals


def granular(
    store: UsageStore, spec: QuerySpec, key_ids: Collection[UUID] | None = None
) -> dict[str, Any]:
    """The ``GET /granular`` answer: totals, zero-filled series, breakdowns and request stats.

    The upload and request statements are independent; on PostgreSQL they run at the same
    time on two pooled connections, so the answer takes as long as the slower one.
    """
    ps = periods(spec)
    starts = [p.start for p in ps]
    if store.dialect == "postgresql":
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="usage-query") as pool:
            requests = pool.submit(request_stats, store, spec, key_ids)
            rows = _upload_rows(store, spec, key_ids, starts)
            request_block = requests.result()
    else:  # one SQLite connection may be shared (in-memory databases): stay sequential
        rows = _upload_rows(store, spec, key_ids, starts)
        request_block = request_stats(store, spec, key_ids)
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
    }


def _counts(c: Sequence[int]) -> dict[str, int]:
    """The four upload counters as the JSON a period or the totals carry."""
    return {"uploads": c[0], "bytes": c[1], "successful": c[2], "failed": c[3]}


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
    buckets: dict[int, int] = defaultdict(int)
    total = errors = total_us = 0
    pieces = plan([spec.start_utc, spec.end_utc])
    dialect = store.dialect
    lateral = dialect == "postgresql"
    selects: list[Select[Any]] = []
    counters = ("total_requests", "error_requests", "total_response_us")
    for grain in ("day", "hour"):
        mine = [x for x in pieces if x.grain == grain]
        if not mine:
            continue
        r = _pieces_table(mine, f"{grain}_pieces", grain == "day", dialect)
        table = daily_request_usage if grain == "day" else hourly_request_usage
        at = table.c.usage_date if grain == "day" else table.c.usage_hour
        where = _filters(table, spec, key_ids, dialect, uploads=False)
        j = _joined(r, table, at, ("latency_bucket", *counters), where, lateral)
        selects.append(
            select(
                j.c.latency_bucket.label("lb"),
                *(
                    cast(j.c.sign * j.c[c], BigInteger).label(n)
                    for c, n in zip(counters, ("n", "e", "us"), strict=True)
                ),
            )
        )
    raw_pieces = [x for x in pieces if x.grain == "raw"]
    with _connect(store) as conn:
        if selects:
            union = (selects[0] if len(selects) == 1 else union_all(*selects)).subquery("parts")
            stmt = select(
                union.c.lb, *(cast(func.sum(union.c[c]), BigInteger) for c in ("n", "e", "us"))
            ).group_by(union.c.lb)
            for lb, n, e, us in conn.execute(stmt):
                buckets[lb] += n
                total += n
                errors += e
                total_us += us
        if raw_pieces:
            ar = api_requests
            r = _pieces_table(raw_pieces, "raw_pieces", False, store.dialect)
            where = _filters(ar, spec, key_ids, dialect, uploads=False)
            names = ("response_time_ms", "status_code")
            j = _joined(r, ar, ar.c.requested_at, names, where, lateral)
            for sign, ms, status in conn.execute(
                select(j.c.sign, j.c.response_time_ms, j.c.status_code)
            ):
                buckets[latency_bucket(ms)] += sign
                total += sign
                errors += sign * (status >= 400)
                total_us += sign * round(ms * 1000)
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
