"""The ClickHouse backend's aggregate reads, one statement each (see :mod:`.chread`).

Each takes the seals of its range, a ``run`` callable (the backend's timed, error-mapping
query) and the backend's :class:`.chread.SealedAnswers`, and returns the rows the
:class:`.base.Reader` protocol promises. A read is its sealed rollup part and its raw part in
one statement until the sealed part's answer is remembered, then the raw part alone. Raw
measures are cast to ``Int64``, as the rollup sums are, so the two add in one ``UNION ALL``.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

from .._pool import settle, submit
from .base import (
    ConsumerRow,
    EndpointRow,
    GranularReads,
    Histogram,
    RequestFilter,
    Scope,
    SeriesRow,
    UploadRow,
)
from .chread import (
    METHOD_LABEL,
    PERIOD_OF_Q,
    Read,
    SealedAnswers,
    build,
    keys_condition,
    raw_period,
    request_filters,
    upload_filters,
)
from .chseal import EPOCH, Seals

__all__ = [
    "consumer_rows",
    "endpoint_and_series_rows",
    "granular_reads",
    "granular_rows",
    "request_histograms",
]


Run = Callable[[str, dict[str, Any]], list[tuple[Any, ...]]]


def _union(rollup: str, raw: str) -> str:
    return f"{rollup}\n    UNION ALL{raw}" if rollup else raw


def _parts(
    run: Run,
    answers: SealedAnswers,
    outer: Callable[[str], str],
    read: Read,
    raw: str,
    params: dict[str, Any],
) -> list[tuple[Any, ...]]:
    """The rows of ``outer`` over the sealed rollup rows and the raw rows, which add. ``outer``
    keeps the two apart by their ``sealed`` column (its first): the sealed part's rows are
    remembered in ``answers``, and once they are, a read runs ``outer`` over the raw rows
    alone."""
    if not read.rollup:
        return [r[1:] for r in run(outer(raw), params)]
    sealed_sql = outer(read.rollup)
    known = answers.peek(sealed_sql, params)
    if known is not None:
        return known + [r[1:] for r in run(outer(raw), params)]
    rows = run(outer(_union(read.rollup, raw)), params)
    sealed = [r[1:] for r in rows if r[0]]
    answers.put(sealed_sql, params, sealed)
    return sealed + [r[1:] for r in rows if not r[0]]


def consumer_rows(
    run: Run, seals: Seals, scope: Scope, start: datetime, end: datetime, settings: str
) -> list[ConsumerRow]:
    """Uploads and requests per key; both builds plan the same cover and share its
    parameters."""
    params: dict[str, Any] = {}
    keys = keys_condition(scope, params)
    filters = upload_filters(scope, params)
    bounds = [start, end]
    ups = build(
        "upload_rollup",
        "api_key_id AS kid, has_key AS hk, toInt64(uploads) AS u, toInt64(bytes) AS b, "
        "toInt64(failed) AS fl, toInt64(0) AS n, toInt64(0) AS e, "
        "toUnixTimestamp64Micro(last_at) AS l",
        keys + filters, "uploaded_at", seals, bounds,
    )  # fmt: skip
    reqs = build(
        "request_rollup",
        "api_key_id AS kid, has_key AS hk, toInt64(0) AS u, toInt64(0) AS b, toInt64(0) AS fl, "
        "toInt64(requests) AS n, toInt64(errors) AS e, toUnixTimestamp64Micro(last_at) AS l",
        keys, "requested_at", seals, bounds,
    )  # fmt: skip
    params.update(ups.params)
    params.update(reqs.params)
    raw_ups = f"""
    SELECT 0 AS sealed, 0 AS period, api_key_id AS kid, has_key AS hk, toInt64(count()) AS u,
           toInt64(sum(file_size)) AS b, toInt64(countIf(upload_status = 'failed')) AS fl,
           toInt64(0) AS n, toInt64(0) AS e, max(toUnixTimestamp64Micro(uploaded_at)) AS l
    FROM file_uploads FINAL
    WHERE {keys}{filters} AND {ups.raw_where}
    GROUP BY api_key_id, has_key"""
    raw_reqs = f"""
    SELECT 0 AS sealed, 0 AS period, api_key_id AS kid, has_key AS hk, toInt64(0) AS u,
           toInt64(0) AS b, toInt64(0) AS fl, toInt64(count()) AS n,
           toInt64(countIf(status_code >= 400)) AS e,
           max(toUnixTimestamp64Micro(requested_at)) AS l
    FROM api_requests FINAL
    WHERE {keys} AND {reqs.raw_where}
    GROUP BY api_key_id, has_key"""
    union = _union(_union(ups.rollup, raw_ups), _union(reqs.rollup, raw_reqs))
    sql = f"""
SELECT toString(kid), hk, sum(u), sum(b), sum(fl), sum(n), sum(e), max(l)
FROM ({union})
GROUP BY kid, hk SETTINGS {settings}"""
    return [
        (
            uuid.UUID(k) if hk else None, int(u), int(b), int(fl), int(n), int(e),
            EPOCH + timedelta(microseconds=int(last)),
        )
        for k, hk, u, b, fl, n, e, last in run(sql, params)
    ]  # fmt: skip


def granular_rows(
    run: Run,
    answers: SealedAnswers,
    seals: Seals,
    scope: Scope,
    bounds: Sequence[datetime],
    current: int,
    settings: str,
) -> tuple[list[UploadRow], list[tuple[str, str, int]]]:
    """``/granular``'s upload reads in one statement: the marginal rows of :func:`upload_rows`
    over ``bounds`` (providers and types only of periods ``current`` on: the earlier ones are
    the previous range) and the declared-type mismatches of those periods."""
    params: dict[str, Any] = {"current": current}
    where = keys_condition(scope, params) + upload_filters(scope, params)
    read = build(
        "upload_rollup",
        "provider, file_type, declared_type AS declared, toInt64(uploads) AS u, "
        "toInt64(bytes) AS b, toInt64(successful) AS s, toInt64(failed) AS f",
        where, "uploaded_at", seals, bounds,
    )  # fmt: skip
    params.update(read.params)
    q = raw_period("uploaded_at", bounds, params)
    raw = f"""
    SELECT 0 AS sealed, {PERIOD_OF_Q} AS period, provider, file_type, declared, u, b, s, f
    FROM (
        SELECT {q} AS q, provider, file_type,
               if(ifNull(declared_type, file_type) = file_type, '',
                  assumeNotNull(declared_type)) AS declared,
               toInt64(count()) AS u, toInt64(sum(file_size)) AS b,
               toInt64(countIf(upload_status = 'success')) AS s,
               toInt64(countIf(upload_status = 'failed')) AS f
        FROM file_uploads FINAL
        WHERE {where} AND {read.raw_where}
        GROUP BY q, provider, file_type, declared
    )"""

    def outer(source: str) -> str:
        return f"""
SELECT sealed, period, period >= {{current:Int32}} AS now, provider, file_type, declared,
       sum(u), sum(b), sum(s), sum(f)
FROM ({source})
GROUP BY GROUPING SETS ((sealed, period), (sealed, now, provider), (sealed, now, file_type),
                       (sealed, now, file_type, declared))
SETTINGS group_by_use_nulls = 1, {settings}"""

    out: list[UploadRow] = []
    mismatches: list[tuple[str, str, int]] = []
    rows = _parts(run, answers, outer, read, raw, params)
    for p, now, provider, file_type, declared, u, b, s, f in rows:
        if p is not None:
            out.append((int(p), None, None, int(u), int(b), int(s), int(f)))
        elif not now:
            continue  # a breakdown of the previous range: not asked for
        elif declared is None:
            out.append((None, provider, file_type, int(u), int(b), int(s), int(f)))
        elif declared:
            mismatches.append((str(file_type), str(declared), int(u)))
    return out, mismatches


def request_histograms(
    run: Run,
    answers: SealedAnswers,
    seals: Seals,
    scope: Scope,
    bounds: Sequence[datetime],
    settings: str,
) -> list[Histogram]:
    """The request histogram of each period of ``bounds``, in one statement."""
    params: dict[str, Any] = {}
    where = keys_condition(scope, params)
    read = build(
        "request_rollup",
        "bucket, toInt64(requests) AS n, toInt64(errors) AS e, toInt64(response_us) AS us",
        where, "requested_at", seals, bounds,
    )  # fmt: skip
    params.update(read.params)
    q = raw_period("requested_at", bounds, params)
    raw = f"""
    SELECT 0 AS sealed, {PERIOD_OF_Q} AS period, bucket, n, e, us
    FROM (
        SELECT {q} AS q, latency_bucket AS bucket, toInt64(count()) AS n,
               toInt64(countIf(status_code >= 400)) AS e, toInt64(sum(response_us)) AS us
        FROM api_requests FINAL
        WHERE {where} AND {read.raw_where}
        GROUP BY q, bucket
    )"""

    def outer(source: str) -> str:
        return f"""
SELECT sealed, period, bucket, sum(n), sum(e), sum(us) FROM ({source})
GROUP BY sealed, period, bucket SETTINGS {settings}"""

    rows = _parts(run, answers, outer, read, raw, params)
    out = [Histogram() for _ in range(len(bounds) - 1)]
    for p, bucket, n, e, us in rows:
        out[int(p)].add(int(bucket), int(n), int(e), int(us))
    return out


def endpoint_and_series_rows(
    run: Run,
    answers: SealedAnswers,
    seals: Seals,
    scope: Scope,
    bounds: Sequence[datetime],
    filters: RequestFilter,
    settings: str,
) -> tuple[list[EndpointRow], list[SeriesRow]]:
    """``/requests``' two endpoint reads in one statement: :func:`endpoint_rows` over the
    whole of ``bounds`` and :func:`request_series` per period, as two grouping sets."""
    params: dict[str, Any] = {}
    keys = keys_condition(scope, params)
    read = build(
        "endpoint_rollup",
        "method AS m, route AS r, status_code AS sc, bucket AS cb, toInt64(requests) AS n, "
        "toInt64(if(status_code >= 400, requests, 0)) AS e, toInt64(response_us) AS us, "
        "toInt64(request_bytes) AS qb, toInt64(response_bytes) AS pb",
        keys + request_filters(filters, params, "method", "route"), "requested_at", seals,
        bounds,
    )  # fmt: skip
    params.update(read.params)
    q = raw_period("requested_at", bounds, params)
    raw = f"""
    SELECT 0 AS sealed, {PERIOD_OF_Q} AS period, m, r, sc, cb, n, e, us, qb, pb
    FROM (
        SELECT {q} AS q, {METHOD_LABEL} AS m, route_label AS r, status_code AS sc,
               intDiv(latency_bucket + 4, 5) AS cb, toInt64(count()) AS n,
               toInt64(countIf(status_code >= 400)) AS e, toInt64(sum(response_us)) AS us,
               toInt64(sum(request_size)) AS qb, toInt64(sum(response_size)) AS pb
        FROM api_requests FINAL
        WHERE {keys}{request_filters(filters, params, METHOD_LABEL, "route_label")}
          AND {read.raw_where}
        GROUP BY q, m, r, sc, cb
    )"""

    def outer(source: str) -> str:
        return f"""
SELECT sealed, period, m, r, sc, cb, sum(n), sum(e), sum(us), sum(qb), sum(pb)
FROM ({source})
GROUP BY GROUPING SETS ((sealed, m, r, sc, cb), (sealed, period, cb))
SETTINGS group_by_use_nulls = 1, {settings}"""

    rows = _parts(run, answers, outer, read, raw, params)
    endpoints: list[EndpointRow] = []
    series: list[SeriesRow] = []
    for p, m, r, sc, cb, n, e, us, qb, pb in rows:
        if p is None:
            endpoints.append((str(m), str(r), int(sc), int(cb), int(n), int(us), int(qb), int(pb)))
        else:
            series.append((int(p), int(cb), int(n), int(e), int(us)))
    return endpoints, series


def granular_reads(
    run: Run,
    answers: SealedAnswers,
    seals_of: Callable[[Sequence[datetime]], Seals],
    scope: Scope,
    bounds: Sequence[datetime],
    previous: datetime | None,
    settings: str,
    *,
    parallel: bool,
) -> GranularReads:
    """``/granular``'s reads in two statements: :func:`granular_rows` with the previous range as
    one more period before the first, and :func:`request_histograms` of the two ranges, at the
    same time when ``parallel`` (a server). ``seals_of`` gives the seals a read over some
    bounds may use."""
    start, end = bounds[0], bounds[-1]
    span = list(bounds) if previous is None else [previous, *bounds]
    current = len(span) - len(bounds)
    ranges = [start, end] if previous is None else [previous, start, end]

    def requests() -> list[Histogram]:
        return request_histograms(run, answers, seals_of(ranges), scope, ranges, settings)

    later = submit(requests) if parallel else None
    try:
        rows, mismatches = granular_rows(
            run, answers, seals_of(span), scope, span, current, settings
        )
    finally:
        if later is not None:
            settle([later])
    histograms = requests() if later is None else later.result()
    ours: list[UploadRow] = []
    before: list[UploadRow] = []
    for row in rows:
        p = row[0]
        if p is None or p >= current:
            ours.append((None if p is None else p - current, *row[1:]))
        else:
            before.append(row)
    if previous is None:
        return GranularReads(ours, histograms[0], [], Histogram(), mismatches)
    return GranularReads(ours, histograms[1], before, histograms[0], mismatches)
