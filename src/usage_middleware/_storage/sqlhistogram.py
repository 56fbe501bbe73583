"""The SQL backends' latency histogram of requests (``Histogram``), over one range.

Whole months, days and hours come from the request histogram rollups (``*_request_usage``),
one statement over every grain's planned pieces; sub-hour edges off the quarter-hour grid and
the requests no seal holds yet come from raw rows, bucketed as the writer buckets them. The
plan is cut at the seal instants and read again if a seal commits meanwhile
(:func:`._sqlread.sealed_reads`).
"""

from __future__ import annotations

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
    api_requests,
    daily_request_usage,
    hourly_request_usage,
    latency_bucket,
    monthly_request_usage,
    quarter_request_usage,
)
from .._sqliteseal import bucket_sql, micros_sql
from ._sqlread import _DATES, _UTC_INDEXED, sealed_reads
from .base import Histogram, Scope
from .plan import Piece, request_plan
from .statements import Shape, Statement, filter_clauses, joined, piece_params, scope_params

if TYPE_CHECKING:
    from .sql import SQLBackend

__all__ = ["request_histogram"]

_REQUEST_SOURCES = {
    "quarter": (quarter_request_usage, quarter_request_usage.c.usage_quarter),
    "month": (monthly_request_usage, monthly_request_usage.c.usage_month),
    "day": (daily_request_usage, daily_request_usage.c.usage_date),
    "hour": (hourly_request_usage, hourly_request_usage.c.usage_hour),
}
_REQUEST_COUNTERS = ("total_requests", "error_requests", "total_response_us")


@lru_cache(maxsize=128)
def _histogram_statement(grains: tuple[str, ...], dialect: str, shape: Shape) -> Statement:
    """The merged latency histogram ``(bucket, requests, errors, response µs)`` over the
    request rollups of ``grains``, each read over its pieces in ``{grain}_pieces``."""
    selects: list[Select[Any]] = []
    for grain in grains:
        table, at = _REQUEST_SOURCES[grain]
        names = ("latency_bucket", *_REQUEST_COUNTERS)
        where = filter_clauses(table, shape, dialect)
        j = joined(
            f"{grain}_pieces",
            grain in _DATES,
            dialect,
            table,
            at,
            names,
            where,
            _REQUEST_COUNTERS,
            utc_hour=grain in _UTC_INDEXED and not shape.keys,
        )
        selects.append(
            select(
                j.c.latency_bucket.label("lb"),
                *(
                    cast(j.c.sign * j.c[c], BigInteger).label(n)
                    for c, n in zip(_REQUEST_COUNTERS, ("n", "e", "us"), strict=True)
                ),
            )
        )
    union = (selects[0] if len(selects) == 1 else union_all(*selects)).subquery("parts")
    stmt = select(
        union.c.lb, *(cast(func.sum(union.c[c]), BigInteger) for c in ("n", "e", "us"))
    ).group_by(union.c.lb)
    return Statement(stmt, dialect)


@lru_cache(maxsize=32)
def _raw_request_statement(dialect: str, shape: Shape) -> Statement:
    """Raw ``api_requests`` rows ``(sign, response ms, status)`` over ``raw_pieces``."""
    ar = api_requests
    where = filter_clauses(ar, shape, dialect)
    names = ("response_time_ms", "status_code")
    j = joined("raw_pieces", False, dialect, ar, ar.c.requested_at, names, where)
    return Statement(select(j.c.sign, j.c.response_time_ms, j.c.status_code), dialect)


@lru_cache(maxsize=32)
def _raw_histogram_statement(shape: Shape) -> Statement:
    """SQLite: the rows of :func:`_raw_request_statement` summed per latency bucket
    ``(bucket, requests, errors, µs)``, bucketed in SQL as the writer does (the connection's
    ``register_functions``): fetched one by one, each row is a step that lets go of the GIL,
    and beside a busy event loop waits to get it back."""
    dialect = "sqlite"
    ar = api_requests
    where = filter_clauses(ar, shape, dialect)
    names = ("response_time_ms", "status_code")
    j = joined("raw_pieces", False, dialect, ar, ar.c.requested_at, names, where)
    raw = select(
        j.c.sign.label("sign"), j.c.response_time_ms.label("ms"), j.c.status_code.label("s")
    ).subquery("um_raw")
    bucketed = select(
        literal_column(bucket_sql("um_raw.ms"), Integer).label("lb"),
        raw.c.sign,
        case((raw.c.s >= literal_column("400"), raw.c.sign), else_=0).label("e"),
        literal_column(micros_sql("um_raw.ms"), BigInteger).label("us"),
    ).subquery("um_bucketed")
    stmt = select(
        bucketed.c.lb,
        cast(func.sum(bucketed.c.sign), BigInteger),
        cast(func.sum(bucketed.c.e), BigInteger),
        cast(func.sum(bucketed.c.sign * bucketed.c.us), BigInteger),
    ).group_by(bucketed.c.lb)
    return Statement(stmt, dialect)


def request_histogram(
    backend: SQLBackend, scope: Scope, start: datetime, end: datetime
) -> Histogram:
    """The merged latency histogram of requests in ``[start, end)``: whole months, days and
    hours from the request rollups, sub-hour edges and what no seal holds yet bucketed here
    from raw rows."""
    out = Histogram()
    if scope.keys is not None and not scope.keys:
        return out
    dialect = backend.name
    shape, params = scope_params(scope, dialect, uploads=False)
    planned = request_plan(start, end)

    def build(pieces: list[Piece]) -> tuple[list[tuple[Statement, dict[str, Any]]], bool]:
        by_grain: dict[str, list[Piece]] = {}
        for x in pieces:
            by_grain.setdefault(x.grain, []).append(x)
        statements = []
        grains = tuple(g for g in _REQUEST_SOURCES if g in by_grain)
        if grains:
            histogram_params = dict(params)
            for g in grains:
                histogram_params.update(
                    piece_params(by_grain[g], f"{g}_pieces", g in _DATES, dialect)
                )
            statements.append((_histogram_statement(grains, dialect, shape), histogram_params))
        raw = "raw" in by_grain
        if raw:
            raw_params = {**params, **piece_params(by_grain["raw"], "raw_pieces", False, dialect)}
            raw_statement = (
                _raw_histogram_statement(shape)
                if dialect == "sqlite"
                else _raw_request_statement(dialect, shape)
            )
            statements.append((raw_statement, raw_params))
        return statements, raw

    results, raw = sealed_reads(backend, planned, build)
    for rows in results[: len(results) - raw]:
        for lb, n, e, us in rows:
            out.add(lb, n, e, us)
    if raw and dialect == "sqlite":
        for lb, n, e, us in results[-1]:
            out.add(lb, int(n), int(e), int(us))
    elif raw:
        for sign, ms, status in results[-1]:
            out.add(latency_bucket(ms), sign, sign * (status >= 400), sign * round(ms * 1000))
    return out
