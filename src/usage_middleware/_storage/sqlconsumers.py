"""The SQL backends' read for ``GET /consumers``: usage per API key over a range.

Uploads, bytes and failed uploads per key are summed from the upload rollups over the same plan
as the upload reads (:func:`.plan.plan`: days, hours, quarter hours, raw rows off the grid),
honouring the provider and type filters; requests and errors per key from the request histogram
tiers over :func:`.plan.request_plan` (whole UTC months from the monthly tier). On PostgreSQL
these statements run at the same time.

``last_seen`` — the key's newest upload (inside the filters) or request in the range — is then
read for each key that has usage (:mod:`.sqlseen`).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any
from uuid import UUID

from sqlalchemy import (
    BigInteger,
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
    daily_usage,
    file_uploads,
    hourly_request_usage,
    hourly_usage,
    monthly_request_usage,
    quarter_request_usage,
    quarter_usage,
)
from ._sqlread import _SPLIT_DAYS, _halves, sealed_reads
from .base import ConsumerRow, Scope
from .plan import Piece, plan, request_plan
from .sqlseen import last_seen
from .statements import Shape, Statement, filter_clauses, joined, piece_params, scope_params

if TYPE_CHECKING:
    from .sql import SQLBackend

__all__ = ["consumer_rows"]

_UPLOAD_SOURCES = {
    "day": (daily_usage, daily_usage.c.usage_date),
    "hour": (hourly_usage, hourly_usage.c.usage_hour),
    "quarter": (quarter_usage, quarter_usage.c.usage_quarter),
}
_REQUEST_SOURCES = {
    "month": (monthly_request_usage, monthly_request_usage.c.usage_month),
    "day": (daily_request_usage, daily_request_usage.c.usage_date),
    "hour": (hourly_request_usage, hourly_request_usage.c.usage_hour),
    "quarter": (quarter_request_usage, quarter_request_usage.c.usage_quarter),
}
_DATES = ("month", "day")
_UPLOAD_SUMS = ("total_uploads", "total_file_size", "failed_requests")
_REQUEST_SUMS = ("total_requests", "error_requests")


def _sum(column: Any) -> Any:
    return cast(func.sum(cast(column, BigInteger)), BigInteger)


@lru_cache(maxsize=64)
def _upload_statement(grain: str, dialect: str, shape: Shape) -> Statement:
    """(key, uploads, bytes, failed) over one upload source's pieces in ``{grain}_pieces``."""
    if grain == "raw":
        fu = file_uploads
        j = joined(
            "raw_pieces", False, dialect, fu, fu.c.uploaded_at,
            ("api_key_id", "file_size", "upload_status"), filter_clauses(fu, shape, dialect),
        )  # fmt: skip
        failed = case((j.c.upload_status == "success", 0), else_=1)
        cols: list[Any] = [j.c.sign, j.c.sign * j.c.file_size, j.c.sign * failed]
    else:
        table, at = _UPLOAD_SOURCES[grain]
        j = joined(
            f"{grain}_pieces", grain == "day", dialect, table, at, ("api_key_id", *_UPLOAD_SUMS),
            filter_clauses(table, shape, dialect), _UPLOAD_SUMS,
            utc_hour=grain != "day" and not shape.keys,
        )  # fmt: skip
        cols = [j.c.sign * j.c[c] for c in _UPLOAD_SUMS]
    stmt = select(j.c.api_key_id, *map(_sum, cols)).group_by(j.c.api_key_id)
    return Statement(stmt, dialect)


@lru_cache(maxsize=64)
def _request_statement(grains: tuple[str, ...], dialect: str, shape: Shape) -> Statement:
    """(key, requests, errors) over the request histogram tiers and raw rows of ``grains``."""
    selects: list[Select[Any]] = []
    for grain in grains:
        if grain == "raw":
            ar = api_requests
            j = joined(
                "raw_pieces", False, dialect, ar, ar.c.requested_at, ("api_key_id", "status_code"),
                filter_clauses(ar, shape, dialect),
            )  # fmt: skip
            errors = case((j.c.status_code >= literal_column("400"), 1), else_=0)
            cols: list[Any] = [j.c.sign, j.c.sign * errors]
        else:
            table, at = _REQUEST_SOURCES[grain]
            j = joined(
                f"{grain}_pieces", grain in _DATES, dialect, table, at,
                ("api_key_id", *_REQUEST_SUMS), filter_clauses(table, shape, dialect),
                _REQUEST_SUMS, utc_hour=grain not in _DATES and not shape.keys,
            )  # fmt: skip
            cols = [j.c.sign * j.c[c] for c in _REQUEST_SUMS]
        selects.append(
            select(
                j.c.api_key_id.label("k"),
                *(cast(c, BigInteger).label(n) for c, n in zip(cols, ("n", "e"), strict=True)),
            )
        )
    u = (selects[0] if len(selects) == 1 else union_all(*selects)).subquery("parts")
    return Statement(select(u.c.k, _sum(u.c.n), _sum(u.c.e)).group_by(u.c.k), dialect)


def _grouped(pieces: Sequence[Piece]) -> dict[str, list[Piece]]:
    out: dict[str, list[Piece]] = {}
    for x in pieces:
        out.setdefault(x.grain, []).append(x)
    return out


def _statements(
    scope: Scope, start: datetime, end: datetime, dialect: str, requests: list[Piece]
) -> tuple[list[tuple[Statement, dict[str, Any]]], None]:
    """The request statement first (over the request pieces ``requests``), then one upload
    statement per source (PostgreSQL: a long daily read as two, for two cores)."""
    shape, params = scope_params(scope, dialect)
    request_shape, request_params = scope_params(scope, dialect, uploads=False)
    by_grain = _grouped(requests)
    grains = tuple(g for g in (*_REQUEST_SOURCES, "raw") if g in by_grain)
    out = [(_request_statement(grains, dialect, request_shape), dict(request_params))]
    for g in grains:
        out[0][1].update(piece_params(by_grain[g], f"{g}_pieces", g in _DATES, dialect))
    parts: list[tuple[str, list[Piece]]] = []
    for grain, pieces in _grouped(plan([start, end])).items():
        days = sum((x.hi - x.lo).days for x in pieces) if grain == "day" else 0
        if dialect == "postgresql" and days >= _SPLIT_DAYS:
            parts.extend((grain, half) for half in _halves(pieces) if half)
        else:
            parts.append((grain, pieces))
    for grain, pieces in parts:
        out.append(
            (
                _upload_statement(grain, dialect, shape),
                {**params, **piece_params(pieces, f"{grain}_pieces", grain == "day", dialect)},
            )
        )
    return out, None


def consumer_rows(
    backend: SQLBackend, scope: Scope, start: datetime, end: datetime
) -> list[ConsumerRow]:
    """One row per key with an upload (inside the filters) or a request in ``[start, end)``."""
    if scope.keys is not None and not scope.keys:
        return []
    results, _ = sealed_reads(
        backend,
        request_plan(start, end),
        lambda pieces: _statements(scope, start, end, backend.name, pieces),
    )
    acc: dict[UUID | None, list[int]] = {}
    for key, n, e in results[0]:
        c = acc.setdefault(key, [0] * 5)
        c[3] += n
        c[4] += e
    for rows in results[1:]:
        for key, u, b, f in rows:
            c = acc.setdefault(key, [0] * 5)
            c[0] += u
            c[1] += b
            c[2] += f
    active = {k: c for k, c in acc.items() if c[0] or c[3]}  # signed pieces may cancel out
    seen = last_seen(backend, scope, start, end, active)
    return [(k, *c, seen.get(k)) for k, c in active.items()]  # type: ignore[misc]
