"""The SQL backends' reads for ``GET /requests``: requests by endpoint, and per period.

Both follow the plan of :mod:`.plan`, like the upload reads. Requests by endpoint over one range
(:func:`endpoint_rows`) read the endpoint rollups by :func:`.plan.request_plan`: whole UTC months
from ``monthly_endpoint_usage``, days from ``daily_endpoint_usage``, and hours and sub-hour edges
from ``quarter_endpoint_usage`` (there is no hourly endpoint tier: an hour piece is the same
``[lo, hi)`` read from the quarter hours). The method, route and status filters are conditions on
the rollups' own labels.

Requests per period (:func:`request_series`) follow :func:`.plan.series_plan`. Without a filter
they read the request histogram tiers (``*_request_usage``), folding the fine latency bucket into
the coarse one in SQL (``(fine + 4) / 5``, what :func:`~usage_middleware._schema.endpoint_bucket`
computes): a key's day there is one row per fine bucket in use — a hundred or two — where the
endpoint tiers hold one per endpoint, status code and coarse bucket, thousands for an API of
thirty routes, and they have an hourly tier besides. Both are exact, so the answer is the same
either way; with a filter only the endpoint tiers know the labels.

Raw rows are read for the edges off the quarter-hour grid (historical offsets before 1979) and
for the requests that no seal holds yet (:func:`._sqlread.sealed_reads`), and are labelled
like the writer labels them (:func:`~usage_middleware._schema.endpoint_method`,
:func:`~usage_middleware._schema.endpoint_route`): here on PostgreSQL, in SQL on SQLite, where
they are bucketed and summed per group too (a fetched row per request is a step that lets go of
the GIL). The per-key-per-day route cap cannot be applied to them: which routes a day admitted
depends on the order rows were written in, which raw rows do not keep. So a request read from
raw rows keeps its route where the rollups may say ``(other)`` — only for keys with more than
``ROUTES_PER_KEY_DAY`` routes on that UTC day, and for a recent request only until its quarter
hour is sealed.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    BigInteger,
    Integer,
    Select,
    case,
    cast,
    func,
    literal_column,
    select,
    union_all,
)

from .._schema import (
    ENDPOINT_BUCKET_WIDTH,
    api_requests,
    daily_endpoint_usage,
    daily_request_usage,
    endpoint_bucket,
    endpoint_method,
    endpoint_route,
    hourly_request_usage,
    monthly_endpoint_usage,
    monthly_request_usage,
    quarter_endpoint_usage,
    quarter_request_usage,
)
from .._sqliteseal import bucket_sql, micros_sql, raw_method_sql, raw_route_sql
from ._sqlread import sealed_reads
from .base import EndpointRow, RequestFilter, Scope, SeriesRow
from .plan import Piece, request_plan, series_plan
from .statements import (
    FilterShape,
    Shape,
    Statement,
    coarse_bucket,
    filter_clauses,
    filter_params,
    joined,
    piece_params,
    request_clauses,
    scope_params,
)

if TYPE_CHECKING:
    from .sql import SQLBackend

__all__ = ["endpoint_rows", "request_series"]

# tier -> (table, time column); an hour piece is read from the quarter-hour endpoint tier
_ENDPOINT_SOURCES = {
    "month": (monthly_endpoint_usage, monthly_endpoint_usage.c.usage_month),
    "day": (daily_endpoint_usage, daily_endpoint_usage.c.usage_date),
    "quarter": (quarter_endpoint_usage, quarter_endpoint_usage.c.usage_quarter),
}
_ENDPOINT_TIER = {"month": "month", "day": "day", "hour": "quarter", "quarter": "quarter"}
_HISTOGRAM_SOURCES = {
    "month": (monthly_request_usage, monthly_request_usage.c.usage_month),
    "day": (daily_request_usage, daily_request_usage.c.usage_date),
    "hour": (hourly_request_usage, hourly_request_usage.c.usage_hour),
    "quarter": (quarter_request_usage, quarter_request_usage.c.usage_quarter),
}
_HISTOGRAM_TIER = {"month": "month", "day": "day", "hour": "hour", "quarter": "quarter"}
_DATES = ("month", "day")  # tiers keyed by a date, not a timestamp
_LABELS = ("method", "route", "status_code", "latency_bucket")
_COUNTERS = ("total_requests", "total_response_us", "total_request_bytes", "total_response_bytes")
_WIDTH = ENDPOINT_BUCKET_WIDTH  # fine buckets to a coarse one
_RAW = ("method", "path", "route_matched", "status_code", "response_time_ms", "request_size",
        "response_size")  # fmt: skip


def _utc_indexed(tier: str, shape: Shape) -> bool:
    """Whether an all-keys read of ``tier`` compares UTC wall-clock times (the expression
    of the sub-day tiers' time index on PostgreSQL, see :func:`.statements.joined`)."""
    return tier in ("hour", "quarter") and not shape.keys


def _read_as(pieces: Sequence[Piece], tiers: dict[str, str]) -> list[Piece]:
    """``pieces`` named for the tier that reads them, before they are cut at the seal instants:
    an hour piece read from the quarter-hour endpoint tier becomes a quarter piece. The hourly
    tiers hold the requests before the hour instant, the quarter-hour ones those before the
    seal instant, which on PostgreSQL may be up to an hour later. An hour piece that spans the
    hour instant is cut there, its part from the instant on read from the quarter hours: read
    from a quarter-hour tier itself, that part was read twice."""
    return [x._replace(grain=tiers[x.grain]) if x.grain in tiers else x for x in pieces]


def _by_tier(pieces: Sequence[Piece]) -> dict[str, list[Piece]]:
    """The pieces (named for their tier by :func:`_read_as`; ``raw``: raw rows) per tier, in
    plan order."""
    out: dict[str, list[Piece]] = {}
    for x in pieces:
        out.setdefault(x.grain, []).append(x)
    return out


def _signed(j: Any, name: str) -> Any:
    return cast(j.c.sign * j.c[name], BigInteger).label(name)


def _union(selects: list[Select[Any]]) -> Any:
    return (selects[0] if len(selects) == 1 else union_all(*selects)).subquery("parts")


@lru_cache(maxsize=128)
def _endpoint_statement(
    tiers: tuple[str, ...], dialect: str, shape: Shape, fshape: FilterShape
) -> Statement:
    """``EndpointRow`` columns summed over the endpoint rollups of ``tiers``, each read over
    its pieces in ``{tier}_pieces``."""
    selects: list[Select[Any]] = []
    for tier in tiers:
        table, at = _ENDPOINT_SOURCES[tier]
        where = [*filter_clauses(table, shape, dialect), *request_clauses(table, fshape, dialect)]
        j = joined(
            f"{tier}_pieces", tier in _DATES, dialect, table, at, (*_LABELS, *_COUNTERS), where,
            _COUNTERS, utc_hour=_utc_indexed(tier, shape),
        )  # fmt: skip
        selects.append(select(*(j.c[n] for n in _LABELS), *(_signed(j, c) for c in _COUNTERS)))
    u = _union(selects)
    stmt = select(
        *(u.c[n] for n in _LABELS), *(cast(func.sum(u.c[c]), BigInteger) for c in _COUNTERS)
    ).group_by(*(u.c[n] for n in _LABELS))
    return Statement(stmt, dialect)


@lru_cache(maxsize=128)
def _series_statement(
    source: str, tiers: tuple[str, ...], dialect: str, shape: Shape, fshape: FilterShape
) -> Statement:
    """``SeriesRow`` columns per (period, coarse bucket) over the ``source`` tiers
    (``histogram``: the request histograms, unfiltered; ``endpoint``: the endpoint rollups)."""
    selects: list[Select[Any]] = []
    for tier in tiers:
        if source == "histogram":
            table, at = _HISTOGRAM_SOURCES[tier]
            summed: tuple[str, ...] = ("total_requests", "error_requests", "total_response_us")
            names: tuple[str, ...] = ("latency_bucket", *summed)
            where = filter_clauses(table, shape, dialect)
        else:
            table, at = _ENDPOINT_SOURCES[tier]
            summed = ("total_requests", "total_response_us")
            names = ("status_code", "latency_bucket", *summed)
            where = [
                *filter_clauses(table, shape, dialect), *request_clauses(table, fshape, dialect)
            ]  # fmt: skip
        folded = source == "histogram" and dialect == "postgresql"
        j = joined(
            f"{tier}_pieces", tier in _DATES, dialect, table, at, names, where, summed,
            utc_hour=_utc_indexed(tier, shape), coarse=folded,
        )  # fmt: skip
        if source == "histogram":
            errors: Any = j.c.error_requests
            # the fine bucket's coarse one, integer division (buckets are never negative);
            # PostgreSQL folded it while summing each interval
            bucket = j.c.latency_bucket if folded else coarse_bucket(j.c.latency_bucket)
        else:
            errors = case((j.c.status_code >= literal_column("400"), j.c.total_requests), else_=0)
            bucket = j.c.latency_bucket
        selects.append(
            select(
                j.c.p.label("p"),
                bucket.label("b"),
                cast(j.c.sign * j.c.total_requests, BigInteger).label("n"),
                cast(j.c.sign * errors, BigInteger).label("e"),
                cast(j.c.sign * j.c.total_response_us, BigInteger).label("us"),
            )
        )
    u = _union(selects)
    stmt = select(
        u.c.p, u.c.b, *(cast(func.sum(u.c[c]), BigInteger) for c in ("n", "e", "us"))
    ).group_by(u.c.p, u.c.b)
    return Statement(stmt, dialect)


@lru_cache(maxsize=32)
def _raw_statement(dialect: str, shape: Shape, fshape: FilterShape) -> Statement:
    """Raw ``api_requests`` rows over ``raw_pieces`` with their period and sign; the status
    filter applies here, the labels' filters in Python (after labelling)."""
    ar = api_requests
    where = [*filter_clauses(ar, shape, dialect), *request_clauses(ar, fshape, dialect)]
    j = joined("raw_pieces", False, dialect, ar, ar.c.requested_at, _RAW, where)
    return Statement(select(j.c.p, j.c.sign, *(j.c[n] for n in _RAW)), dialect)


@lru_cache(maxsize=32)
def _raw_grouped_statement(shape: Shape, fshape: FilterShape) -> Statement:
    """SQLite: the rows of :func:`_raw_statement` summed per period, labels, status code and
    coarse latency bucket ``(p, method, route, status, bucket, requests, µs, in, out)``,
    labelled and bucketed in SQL as the writer does (the connection's ``register_functions``).

    Fetching a row is a step of the statement, and the driver lets go of the GIL around each:
    beside a busy event loop each step waits for the GIL to come back, so a read of many raw
    rows one by one (a quarter hour of a busy server) crawled. The groups are few."""
    dialect = "sqlite"
    ar = api_requests
    where = [*filter_clauses(ar, shape, dialect), *request_clauses(ar, fshape, dialect)]
    j = joined("raw_pieces", False, dialect, ar, ar.c.requested_at, _RAW, where)
    raw = select(
        j.c.p.label("p"), j.c.sign.label("sign"), j.c.method.label("method"),
        j.c.path.label("path"), j.c.route_matched.label("matched"),
        j.c.status_code.label("s"), j.c.response_time_ms.label("ms"),
        j.c.request_size.label("i"), j.c.response_size.label("o"),
    ).subquery("um_raw")  # fmt: skip
    coarse = f"({bucket_sql('um_raw.ms')} + {_WIDTH - 1}) / {_WIDTH}"
    labelled = select(
        raw.c.p,
        raw.c.sign,
        literal_column(raw_method_sql("um_raw.method")).label("m"),
        literal_column(raw_route_sql("um_raw.path", "um_raw.matched")).label("r"),
        raw.c.s,
        literal_column(coarse, Integer).label("b"),
        literal_column(micros_sql("um_raw.ms"), BigInteger).label("us"),
        raw.c.i,
        raw.c.o,
    ).subquery("um_labelled")
    groups = (labelled.c.p, labelled.c.m, labelled.c.r, labelled.c.s, labelled.c.b)
    stmt = select(
        *groups,
        *(
            cast(func.sum(labelled.c.sign * labelled.c[c]), BigInteger) if c else
            cast(func.sum(labelled.c.sign), BigInteger)
            for c in ("", "us", "i", "o")
        ),
    ).group_by(*groups)  # fmt: skip
    return Statement(stmt, dialect)


def _statements(
    backend: SQLBackend,
    scope: Scope,
    filters: RequestFilter,
    pieces: Sequence[Piece],
    tiers: dict[str, str],
    rolled: Any,
) -> tuple[list[tuple[Statement, dict[str, Any]]], bool]:
    """The rollup statement (``rolled(tiers, dialect, shape, fshape)``) and, when the plan has
    raw pieces, the raw one after it; and whether there is a raw one."""
    dialect = backend.name
    shape, params = scope_params(scope, dialect, uploads=False)
    fshape, fparams = filter_params(filters)
    params.update(fparams)
    by_tier = _by_tier(pieces)
    out: list[tuple[Statement, dict[str, Any]]] = []
    rollups = tuple(t for t in dict.fromkeys(tiers.values()) if t in by_tier)
    if rollups:
        p = dict(params)
        for t in rollups:
            p.update(piece_params(by_tier[t], f"{t}_pieces", t in _DATES, dialect))
        out.append((rolled(rollups, dialect, shape, fshape), p))
    raw = "raw" in by_tier
    if raw:
        p = {**params, **piece_params(by_tier["raw"], "raw_pieces", False, dialect)}
        raw_statement = (
            _raw_grouped_statement(shape, fshape) if dialect == "sqlite" else
            _raw_statement(dialect, shape, fshape)
        )  # fmt: skip
        out.append((raw_statement, p))
    return out, raw


def _labelled(rows: list[Any], filters: RequestFilter) -> list[tuple[Any, ...]]:
    """Raw rows ``(period, sign, method label, route label, status, ms, in, out)`` inside
    ``filters``."""
    out = []
    for p, sign, method, path, matched, status, ms, size_in, size_out in rows:
        m, r = endpoint_method(method), endpoint_route(path, bool(matched))
        if filters.matches(m, r, status):
            out.append((p, sign, m, r, status, ms, size_in, size_out))
    return out


def endpoint_rows(
    backend: SQLBackend, scope: Scope, start: datetime, end: datetime, filters: RequestFilter
) -> list[EndpointRow]:
    """Requests in ``[start, end)`` by endpoint, status code and coarse latency bucket."""
    if scope.keys is not None and not scope.keys:
        return []
    results, raw = sealed_reads(
        backend,
        _read_as(request_plan(start, end), _ENDPOINT_TIER),
        lambda pieces: _statements(
            backend, scope, filters, pieces, _ENDPOINT_TIER, _endpoint_statement
        ),
    )
    out: list[EndpointRow] = []
    for rows in results[: len(results) - raw]:
        out += [(m, r, s, b, int(n), int(us), int(i), int(o)) for m, r, s, b, n, us, i, o in rows]
    if raw and backend.name == "sqlite":
        out += [
            (m, r, s, b, int(n), int(us), int(i), int(o))
            for _, m, r, s, b, n, us, i, o in results[-1]
            if filters.matches(m, r, s)
        ]
    elif raw:
        out += [
            (m, r, s, endpoint_bucket(ms), sign, sign * round(ms * 1000), sign * i, sign * o)
            for _, sign, m, r, s, ms, i, o in _labelled(results[-1], filters)
        ]
    return out


def request_series(
    backend: SQLBackend, scope: Scope, bounds: Sequence[datetime], filters: RequestFilter
) -> list[SeriesRow]:
    """Requests per period ``[bounds[i], bounds[i+1])`` and coarse latency bucket."""
    if scope.keys is not None and not scope.keys:
        return []
    if filters.empty:
        tiers, source = _HISTOGRAM_TIER, "histogram"
    else:
        tiers, source = _ENDPOINT_TIER, "endpoint"

    def rolled(rollups: tuple[str, ...], dialect: str, shape: Shape, fs: FilterShape) -> Any:
        return _series_statement(source, rollups, dialect, shape, fs)

    results, raw = sealed_reads(
        backend,
        _read_as(series_plan(bounds), tiers),
        lambda pieces: _statements(backend, scope, filters, pieces, tiers, rolled),
    )
    out: list[SeriesRow] = []
    for rows in results[: len(results) - raw]:
        out += [(p, b, int(n), int(e), int(us)) for p, b, n, e, us in rows]
    if raw and backend.name == "sqlite":
        out += [
            (p, b, int(n), int(n) if s >= 400 else 0, int(us))
            for p, m, r, s, b, n, us, _, _ in results[-1]
            if filters.matches(m, r, s)
        ]
    elif raw:
        out += [
            (p, endpoint_bucket(ms), sign, sign * (s >= 400), sign * round(ms * 1000))
            for p, sign, _, _, s, ms, _, _ in _labelled(results[-1], filters)
        ]
    return out
