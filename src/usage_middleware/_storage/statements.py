"""SQL read statements' building blocks: a statement's text fixed per filter shape, and each
rollup tier joined to its plan pieces.

Statement text depends only on the source and on which filters are present (:class:`Shape`),
so each statement is built and compiled once per process; keys, providers, file types and the
planned pieces travel as parameters (arrays with ``= ANY`` / ``LIKE ANY`` on PostgreSQL,
expanding ``IN`` and JSON on SQLite). :mod:`._sqlread` builds the upload and request statements
from these and runs them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Date,
    DateTime,
    Integer,
    Select,
    String,
    Table,
    Uuid,
    and_,
    any_,
    bindparam,
    case,
    cast,
    exists,
    func,
    literal_column,
    or_,
    select,
    true,
    type_coerce,
)
from sqlalchemy.dialects.postgresql import ARRAY

from .._schema import ENDPOINT_BUCKET_WIDTH, ROLLUP_KEYS
from .base import RequestFilter, Scope
from .plan import Piece

__all__ = [
    "FilterShape",
    "Shape",
    "Statement",
    "coarse_bucket",
    "filter_clauses",
    "filter_params",
    "joined",
    "piece_params",
    "request_clauses",
    "scope_params",
]



@dataclass(frozen=True)
class Shape:
    """What a statement's text depends on besides its source: which filters are present."""

    keys: bool
    providers: bool
    types: bool
    families: bool


def escape_like(value: str) -> str:
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def scope_params(
    scope: Scope, dialect: str, *, uploads: bool = True
) -> tuple[Shape, dict[str, Any]]:
    """A query's filter shape and its values as parameters (see :func:`filter_clauses`)."""
    params: dict[str, Any] = {}
    if scope.keys is not None:
        params["keys"] = sorted(scope.keys)
    if uploads:
        if scope.providers:
            params["providers"] = list(scope.providers)
        exact = [t for t in scope.file_types if not t.endswith("/*")]
        families = [escape_like(t[:-1]) + "%" for t in scope.file_types if t.endswith("/*")]
        if exact:
            params["types"] = exact
        if families:
            params["families"] = families if dialect == "postgresql" else json.dumps(families)
    shape = Shape(*(n in params for n in ("keys", "providers", "types", "families")))
    return shape, params


def filter_clauses(table: Table, shape: Shape, dialect: str) -> list[ColumnElement[bool]]:
    """The filters of ``shape`` on ``table``, reading their values from parameters: arrays with
    ``= ANY`` / ``LIKE ANY`` on PostgreSQL, expanding ``IN`` and a JSON list on SQLite."""
    pg = dialect == "postgresql"
    out: list[ColumnElement[bool]] = []
    if shape.keys:
        key: Any = table.c.api_key_id
        if not pg and table.name in ROLLUP_KEYS:
            # the SQLite rollup indexes are on ifnull(api_key_id, ''): say it the same way
            key = type_coerce(func.ifnull(key, literal_column("''")), Uuid())
        out.append(_among(key, "keys", Uuid(), pg))
    if shape.providers:
        out.append(_among(table.c.provider, "providers", String(), pg))
    kinds: list[ColumnElement[bool]] = []
    if shape.types:
        kinds.append(_among(table.c.file_type, "types", String(), pg))
    if shape.families:
        ft = table.c.file_type
        if pg:  # backslash is PostgreSQL's default LIKE escape
            kinds.append(ft.like(any_(bindparam("families", type_=ARRAY(String())))))
        else:
            each = func.json_each(bindparam("families")).table_valued("value")
            match: Select[Any] = select(literal_column("1")).select_from(each)
            kinds.append(exists(match.where(ft.like(each.c.value, escape="\\"))))
    if kinds:
        out.append(or_(*kinds))
    return out


def _among(col: Any, name: str, kind: Any, pg: bool) -> Any:
    """``col`` is one of the values of list parameter ``name``."""
    if pg:
        return col == any_(bindparam(name, type_=ARRAY(kind)))
    return col.in_(bindparam(name, expanding=True))


@dataclass(frozen=True)
class FilterShape:
    """Which request filters a statement reads: method and route labels, and how many
    disjoint status code ranges (each two parameters, so the text is fixed per count)."""

    methods: bool
    routes: bool
    statuses: int


# Stored status codes are 100..599 (records are validated), so ranges are clipped to a band
# that holds them all and stays inside every integer type a driver binds.
_STATUS_FLOOR, _STATUS_CEILING = 0, 999


def filter_params(filters: RequestFilter) -> tuple[FilterShape, dict[str, Any]]:
    """A request filter's shape and its values as parameters (see :func:`request_clauses`).
    Status ranges are merged into disjoint ones; ranges that hold no code match nothing."""
    params: dict[str, Any] = {}
    if filters.methods:
        params["methods"] = sorted(set(filters.methods))
    if filters.routes:
        params["routes"] = sorted(set(filters.routes))
    merged: list[list[int]] = []
    for lo, hi in sorted(filters.statuses):
        lo, hi = max(lo, _STATUS_FLOOR), min(hi, _STATUS_CEILING)
        if lo > hi:
            continue
        if merged and lo <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    if filters.statuses and not merged:
        merged = [[_STATUS_CEILING + 1, _STATUS_CEILING + 1]]  # no stored code is in it
    for i, (lo, hi) in enumerate(merged):
        params[f"status_lo_{i}"], params[f"status_hi_{i}"] = lo, hi
    return FilterShape("methods" in params, "routes" in params, len(merged)), params


def request_clauses(table: Table, shape: FilterShape, dialect: str) -> list[ColumnElement[bool]]:
    """The request filters of ``shape`` on an endpoint rollup (its method and route labels)
    or on ``api_requests`` (its status codes only: raw rows are labelled in Python)."""
    pg = dialect == "postgresql"
    out: list[ColumnElement[bool]] = []
    if shape.methods and "route" in table.c:
        out.append(_among(table.c.method, "methods", String(), pg))
    if shape.routes and "route" in table.c:
        out.append(_among(table.c.route, "routes", String(), pg))
    if shape.statuses:
        code = table.c.status_code
        out.append(
            or_(
                *(
                    code.between(
                        bindparam(f"status_lo_{i}", type_=Integer()),
                        bindparam(f"status_hi_{i}", type_=Integer()),
                    )
                    for i in range(shape.statuses)
                )
            )
        )
    return out


class Statement:
    """A statement built once per (source, dialect, shape); on PostgreSQL also its compiled
    text, which :func:`_rows` hands straight to psycopg (which prepares it per connection)."""

    def __init__(self, stmt: Select[Any], dialect: str) -> None:
        self.stmt = stmt
        self.sql: str | None = None
        self.constants: dict[str, Any] = {}
        if dialect == "postgresql":
            from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg

            compiled = stmt.compile(dialect=PGDialect_psycopg())  # type: ignore[no-untyped-call]
            self.sql = str(compiled)
            # values the statement carries itself (OFFSET 0, the 'success' literal)
            self.constants = {k: v for k, v in compiled.params.items() if v is not None}


def piece_params(
    pieces: Sequence[Piece], name: str, as_date: bool, dialect: str
) -> dict[str, Any]:
    """The values :func:`joined`'s statement reads its pieces from."""
    if dialect != "postgresql":
        # SQLite stores dates as ISO text and UTCDateTime as naive 'YYYY-MM-DD HH:MM:SS.ffffff'
        fmt = "%Y-%m-%d" if as_date else "%Y-%m-%d %H:%M:%S.%f"
        rows = [[x.lo.strftime(fmt), x.hi.strftime(fmt), x.period, x.sign] for x in pieces]
        return {name: json.dumps(rows)}
    net: dict[tuple[datetime, datetime], int] = {}  # interval -> its signs added up
    for x in pieces:
        net[x.lo, x.hi] = net.get((x.lo, x.hi), 0) + x.sign
    intervals = sorted(net)
    index = {interval: i for i, interval in enumerate(intervals, 1)}  # WITH ORDINALITY's
    return {
        f"{name}_lo": pg_array(lo.date() if as_date else lo for lo, _ in intervals),
        f"{name}_hi": pg_array(hi.date() if as_date else hi for _, hi in intervals),
        f"{name}_net": pg_array(net[interval] for interval in intervals),
        f"{name}_i": pg_array(index[(x.lo, x.hi)] for x in pieces),
        f"{name}_p": pg_array(x.period for x in pieces),
        f"{name}_sign": pg_array(x.sign for x in pieces),
    }


def pg_array(values: Iterable[object]) -> str:
    """A PostgreSQL array literal of integers, dates or timestamps (none needs quoting), which
    the statement casts: one text parameter instead of psycopg dumping every element."""
    return "{" + ",".join(map(str, values)) + "}"


def coarse_bucket(fine: Any) -> Any:
    """The coarse (endpoint) latency bucket of the fine bucket expression ``fine``, as
    ``endpoint_bucket`` computes it, in integer division (buckets are never negative)."""
    low = literal_column(str(ENDPOINT_BUCKET_WIDTH - 1), Integer)
    return (fine + low) // literal_column(str(ENDPOINT_BUCKET_WIDTH), Integer)


def joined(
    name: str,
    as_date: bool,
    dialect: str,
    table: Table,
    at: Any,
    names: Sequence[str],
    where: list[Any],
    summed: Sequence[str] = (),
    cancelling: Sequence[str] = (),
    utc_hour: bool = False,
    coarse: bool = False,
) -> Any:
    """Source rows of ``table`` inside each piece (:func:`piece_params`), with the piece's
    period and sign.

    PostgreSQL gets a LATERAL join so that every piece is an index range scan (a plain range
    join is estimated badly and planned as a scan of the key's whole history). Each distinct
    interval is scanned once and then handed to every (period, sign) that uses it — a New York
    week boundary's five hours are added to one week and subtracted from the next — and the
    ``summed`` columns among ``names`` are summed per interval over the others, so a week of
    daily rows leaves the scan as one row per (provider, type) instead of seven. An interval
    whose uses cancel out (added to one period, subtracted from the next) adds nothing to
    range-wide breakdowns, so it is summed without the ``cancelling`` columns (they come back
    NULL): no grouping by text for the hours of a New York week boundary. On SQLite the
    pieces are one JSON parameter read by ``json_each``, and its nested loops already drive a
    plain join from that small table.

    ``utc_hour`` (hourly rollups read for every key) compares UTC wall-clock hours, the
    expression of the hourly rollups' time index on PostgreSQL (see the schema file), so the
    read is an index range whatever the table's physical order.

    ``coarse`` (PostgreSQL) folds the fine ``latency_bucket`` into the coarse one (``(fine +
    ENDPOINT_BUCKET_WIDTH - 1) / ENDPOINT_BUCKET_WIDTH``) while summing each interval: a week of
    a key's daily histogram rows leaves the scan as a fifth as many rows.
    """
    if dialect != "postgresql":
        each = func.json_each(bindparam(name)).table_valued("value")
        r = select(
            *(
                func.json_extract(each.c.value, f"$[{i}]").label(n)
                for i, n in enumerate(("lo", "hi", "p", "sign"))
            )
        ).cte(name)
        return (
            select(r.c.p, r.c.sign, *(table.c[n] for n in names))
            .select_from(r)
            .join(table, and_(at >= r.c.lo, at < r.c.hi))
            .where(*where)
            .subquery(f"{table.name}joined")
        )
    kind: Any = Date() if as_date else DateTime(timezone=True)
    bounds = [bindparam(f"{name}_{c}", type_=ARRAY(kind)) for c in ("lo", "hi")]
    if cancelling:
        bounds.append(bindparam(f"{name}_net", type_=ARRAY(Integer())))
    d = (
        func.unnest(*bounds)
        .table_valued(*("lo", "hi", "net")[: len(bounds)], with_ordinality="i")
        .render_derived(name=name)
    )
    t = (
        func.unnest(*(bindparam(f"{name}_{c}", type_=ARRAY(Integer())) for c in ("i", "p", "sign")))
        .table_valued("i", "p", "sign")
        .render_derived(name=f"{name}_targets")
    )

    def column(n: str) -> Any:
        c = table.c[n]
        if coarse and n == "latency_bucket":
            return coarse_bucket(c).label(n)
        return c

    grouped = {
        n: case((d.c.net != 0, column(n))).label(n) if n in cancelling else column(n)
        for n in names
        if n not in summed
    }
    keys = list(grouped.values())
    cols = [
        cast(func.sum(table.c[n]), BigInteger).label(n) if n in summed else grouped[n]
        for n in names
    ]
    lo: Any = d.c.lo
    hi: Any = d.c.hi
    if utc_hour:
        at, lo, hi = (func.timezone(literal_column("'UTC'"), x) for x in (at, lo, hi))
    rows = select(*cols).where(at >= lo, at < hi, *where)
    if summed:
        rows = rows.group_by(*keys)
    # OFFSET 0 keeps the planner from flattening the LATERAL back into a range join, and the
    # scan from being repeated per target
    inner = rows.offset(0).lateral(f"{table.name}_rows")
    scanned = (
        select(d.c.i, *(inner.c[n] for n in names))
        .select_from(d)
        .join(inner, true())
        .offset(0)
        .subquery(f"{table.name}_scanned")
    )
    return (
        select(t.c.p, t.c.sign, *(scanned.c[n] for n in names))
        .select_from(scanned)
        .join(t, t.c.i == scanned.c.i)
        .subquery(f"{table.name}joined")
    )
