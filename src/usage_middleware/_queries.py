"""The read path: local-time usage answered exactly from the rollups.

A query covers the UTC instants [local start 00:00, local end+1 00:00) cut into periods
(:func:`usage_middleware._timerange.periods`). Each period is read from the coarsest source that
fits inside it:

* ``daily_usage`` for whole UTC days inside the period,
* ``hourly_usage`` for whole UTC hours inside it that no whole day covers,
* ``quarter_usage`` for the sub-hour edges (zones with :30/:45 offsets; every offset in use
  anywhere since 1979 is a multiple of 15 minutes),
* raw ``file_uploads`` only for what lies off the quarter-hour grid: edges set by historical
  offsets such as local mean time before standard time (Kolkata before 1906) and a few early
  standard times (Amsterdam +00:20 until 1940, Monrovia -00:44:30 until 1972, Kiritimati
  -10:40 until 1979). Only answers about such times need raw rows; every other answer is the
  same after raw rows are deleted (retention), rollups kept.

The plan is a list of pieces ``(source, UTC interval, period, sign)``; a UTC day cut by a
period boundary may be read as its daily row minus the shorter side (see :func:`plan`). Each
source is joined to its pieces (passed as array/JSON parameters, so the statement text is fixed
and cached), the sources are combined with ``UNION ALL`` and summed by (period, provider,
file_type) in the database. Because every rollup is exact, the answer equals aggregating the
raw rows over the same local range — for every time zone — while a year for one key costs some
thousands of rollup rows instead of every raw row.

API-request statistics take the same route over the whole range, with one more, coarser tier
(:func:`request_plan`: whole UTC months from ``monthly_request_usage``): merged latency
histograms give p95 within ``LATENCY_RELATIVE_ERROR`` and sums give the exact mean.

The functions are synchronous (they block on the database): call them from a worker thread in
async code. ``key_ids=None`` means every key (including rows without one); an empty collection
means no key and gives zeros without touching the database.
"""

from __future__ import annotations

import json
import math
from bisect import bisect_right
from collections import defaultdict
from collections.abc import Collection, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any, NamedTuple
from uuid import UUID

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
    union_all,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.exc import DBAPIError

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
    monthly_request_usage,
    quarter_request_usage,
    quarter_usage,
)
from ._store import UsageStore
from ._timerange import QuerySpec, periods

__all__ = [
    "breakdowns",
    "granular",
    "history",
    "plan",
    "request_plan",
    "request_stats",
]

_QUARTER = timedelta(minutes=15)
_HOUR = timedelta(hours=1)
_DAY = timedelta(days=1)


# --- planning: which UTC intervals come from which source ------------------------------------


class Piece(NamedTuple):
    """Rows of one source over the UTC interval [lo, hi), added to ``period`` times ``sign``.

    ``grain`` is ``month`` (monthly rollup; request statistics only), ``day`` (daily rollup),
    ``hour`` (hourly rollup), ``quarter`` (quarter-hour rollup) or ``raw`` (raw rows).
    """

    grain: str
    lo: datetime
    hi: datetime
    period: int
    sign: int


# Period bounds are mostly whole hours: the aligned case skips building a new datetime.


def _floor_hour(t: datetime) -> datetime:
    if t.minute or t.second or t.microsecond:
        return t.replace(minute=0, second=0, microsecond=0)
    return t


def _ceil_hour(t: datetime) -> datetime:
    if t.minute or t.second or t.microsecond:
        return t.replace(minute=0, second=0, microsecond=0) + _HOUR
    return t


def _floor_quarter(t: datetime) -> datetime:
    if t.minute % 15 or t.second or t.microsecond:
        return t.replace(minute=t.minute - t.minute % 15, second=0, microsecond=0)
    return t


def _ceil_quarter(t: datetime) -> datetime:
    if t.minute % 15 or t.second or t.microsecond:
        return t.replace(minute=t.minute - t.minute % 15, second=0, microsecond=0) + _QUARTER
    return t


def _floor_day(t: datetime) -> datetime:
    if t.hour or t.minute or t.second or t.microsecond:
        return t.replace(hour=0, minute=0, second=0, microsecond=0)
    return t


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
    """Whole UTC hours of [lo, hi) from the hourly rollup, the sub-hour edges from the
    quarter-hour rollup, and raw rows only for what lies off the quarter-hour grid."""
    q0, q1 = _ceil_quarter(lo), _floor_quarter(hi)
    if q0 >= q1:
        _emit(out, "raw", lo, hi, period, sign)
        return
    _emit(out, "raw", lo, q0, period, sign)
    h0, h1 = _ceil_hour(q0), _floor_hour(q1)
    if h0 >= h1:
        _emit(out, "quarter", q0, q1, period, sign)
    else:
        _emit(out, "quarter", q0, h0, period, sign)
        _emit(out, "hour", h0, h1, period, sign)
        _emit(out, "quarter", h1, q1, period, sign)
    _emit(out, "raw", q1, hi, period, sign)


def _cost(lo: datetime, hi: datetime) -> int:
    """Rough cost of reading [lo, hi) as :func:`_split` does, in hourly-row units: each
    sub-hour edge (quarter hours or raw rows) counts one."""
    q0, q1 = _ceil_quarter(lo), _floor_quarter(hi)
    if q0 >= q1:
        return 1
    h0, h1 = _ceil_hour(q0), _floor_hour(q1)
    off_grid = (lo < q0) + (q1 < hi)
    if h0 >= h1:
        return 1 + off_grid
    return (h1 - h0) // _HOUR + (q0 < h0) + (h1 < q1) + off_grid


def plan(bounds: Sequence[datetime]) -> list[Piece]:
    """How to read periods ``[bounds[i], bounds[i+1])`` exactly with the fewest rows.

    A UTC day inside one period is one daily read. A day cut by a period boundary or by the
    range edge is read either piece by piece (whole hours from the hourly rollup, sub-hour
    edges from the quarter-hour rollup, see :func:`_split`), or — when cheaper — as its daily
    row given to the period with the largest piece, the other pieces subtracted from that
    period (and added to their own unless they lie outside the range). A New York week
    boundary at 05:00 UTC thus costs five hourly reads instead of twenty-four. Every rollup is
    exact, so the sum is exact.
    """
    start, end = bounds[0], bounds[-1]
    out: _Out = {}
    d = _floor_day(start)
    while d < end:
        e = d + _DAY
        lo, hi = max(d, start), min(e, end)
        i = bisect_right(bounds, lo) - 1
        if (lo, hi) == (d, e) and e <= bounds[i + 1]:
            # a whole day inside period i, and so are the days up to the next boundary's day
            stop = _floor_day(bounds[i + 1])
            _emit(out, "day", d, stop, i, 1)
            d = stop
            continue
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


# Rough cost of reading request histograms, in rows: a month or a day holds nearly every
# latency bucket a key uses (a month a few more), an hour a fraction of them.
_MONTH_COST = 6


def _request_cost(x: Piece) -> int:
    """Rough cost of reading one day, hour, quarter-hour or raw piece of the request plan."""
    if x.grain == "day":
        return 4 * ((x.hi - x.lo) // _DAY)
    if x.grain == "hour":
        return (x.hi - x.lo) // _HOUR
    return 1


def _month_start(t: datetime) -> datetime:
    return _floor_day(t).replace(day=1)


def _next_month(t: datetime) -> datetime:
    return (t.replace(day=28) + timedelta(days=4)).replace(day=1)


def request_plan(start: datetime, end: datetime) -> list[Piece]:
    """Pieces (all of period 0) that read the request histograms over ``[start, end)``.

    Whole UTC months come from the monthly rollup, consecutive ones as one range. A month the
    range only partly covers is read through :func:`plan` (days, hours, edges), or — when
    that is cheaper — as the month's row minus the parts outside the range. Costs count
    histogram rows (:func:`_request_cost`): a local year in New York is one read of twelve
    monthly rows minus its first five UTC hours plus five hours of the next January, instead
    of 365 daily reads.
    """
    out: _Out = {}
    m = _month_start(start)
    while m < end:
        m1 = _next_month(m)
        lo, hi = max(m, start), min(m1, end)
        use_month = (lo, hi) == (m, m1)
        parts: list[tuple[int, Piece]] = []  # (sign, piece) read besides or instead of it
        if not use_month:
            direct = plan([lo, hi])
            outside = [x for a, b in ((m, lo), (hi, m1)) if a < b for x in plan([a, b])]
            minus = _MONTH_COST + sum(map(_request_cost, outside))
            use_month = minus < sum(map(_request_cost, direct))
            parts = [(-1, x) for x in outside] if use_month else [(1, x) for x in direct]
        if use_month:
            _emit(out, "month", m, m1, 0, 1)
        for sign, x in parts:
            _emit(out, x.grain, x.lo, x.hi, 0, sign * x.sign)
        m = m1
    return [piece for pieces in out.values() for piece in pieces]


# --- statements: text fixed per shape, values as parameters -----------------------------------


@dataclass(frozen=True)
class _Shape:
    """What a statement's text depends on besides its source: which filters are present."""

    keys: bool
    providers: bool
    types: bool
    families: bool


def _escape_like(value: str) -> str:
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _scope(
    spec: QuerySpec, key_ids: Collection[UUID] | None, dialect: str, *, uploads: bool = True
) -> tuple[_Shape, dict[str, Any]]:
    """The shape of a query's filters and their values as parameters (see :func:`_where`)."""
    params: dict[str, Any] = {}
    if key_ids is not None:
        params["keys"] = sorted(key_ids)
    if uploads:
        if spec.providers:
            params["providers"] = list(spec.providers)
        exact = [t for t in spec.file_types if not t.endswith("/*")]
        families = [_escape_like(t[:-1]) + "%" for t in spec.file_types if t.endswith("/*")]
        if exact:
            params["types"] = exact
        if families:
            params["families"] = families if dialect == "postgresql" else json.dumps(families)
    shape = _Shape(*(n in params for n in ("keys", "providers", "types", "families")))
    return shape, params


def _where(table: Table, shape: _Shape, dialect: str) -> list[ColumnElement[bool]]:
    """The filters of ``shape`` on ``table``, reading their values from parameters: arrays with
    ``= ANY`` / ``LIKE ANY`` on PostgreSQL, expanding ``IN`` and a JSON list on SQLite."""
    pg = dialect == "postgresql"

    def among(col: Any, name: str, kind: Any) -> Any:
        if pg:
            return col == any_(bindparam(name, type_=ARRAY(kind)))
        return col.in_(bindparam(name, expanding=True))

    out: list[ColumnElement[bool]] = []
    if shape.keys:
        key: Any = table.c.api_key_id
        if not pg and table.name in ROLLUP_KEYS:
            # the SQLite rollup indexes are on ifnull(api_key_id, ''): say it the same way
            key = type_coerce(func.ifnull(key, literal_column("''")), Uuid())
        out.append(among(key, "keys", Uuid()))
    if shape.providers:
        out.append(among(table.c.provider, "providers", String()))
    kinds: list[ColumnElement[bool]] = []
    if shape.types:
        kinds.append(among(table.c.file_type, "types", String()))
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


class _Statement:
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


def _piece_params(
    pieces: Sequence[Piece], name: str, as_date: bool, dialect: str
) -> dict[str, Any]:
    """The values :func:`_joined`'s statement reads its pieces from."""
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
        f"{name}_lo": _pg_array(lo.date() if as_date else lo for lo, _ in intervals),
        f"{name}_hi": _pg_array(hi.date() if as_date else hi for _, hi in intervals),
        f"{name}_net": _pg_array(net[interval] for interval in intervals),
        f"{name}_i": _pg_array(index[(x.lo, x.hi)] for x in pieces),
        f"{name}_p": _pg_array(x.period for x in pieces),
        f"{name}_sign": _pg_array(x.sign for x in pieces),
    }


def _pg_array(values: Iterable[object]) -> str:
    """A PostgreSQL array literal of integers, dates or timestamps (none needs quoting), which
    the statement casts: one text parameter instead of psycopg dumping every element."""
    return "{" + ",".join(map(str, values)) + "}"


def _joined(
    name: str,
    as_date: bool,
    dialect: str,
    table: Table,
    at: Any,
    names: Sequence[str],
    where: list[Any],
    summed: Sequence[str] = (),
    cancelling: Sequence[str] = (),
) -> Any:
    """Source rows of ``table`` inside each piece (:func:`_piece_params`), with the piece's
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
            .subquery(f"{table.name}_joined")
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
    grouped = {
        n: case((d.c.net != 0, table.c[n])).label(n) if n in cancelling else table.c[n]
        for n in names
        if n not in summed
    }
    keys = list(grouped.values())
    cols = [
        cast(func.sum(table.c[n]), BigInteger).label(n) if n in summed else grouped[n]
        for n in names
    ]
    rows = select(*cols).where(at >= d.c.lo, at < d.c.hi, *where)
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
        .subquery(f"{table.name}_joined")
    )


# --- uploads ----------------------------------------------------------------------------------

Counts = list[int]  # uploads, bytes, successful, failed

_UPLOAD_COUNTERS = ("total_uploads", "total_file_size", "successful_requests", "failed_requests")
_UPLOAD_SOURCES = {
    "day": (daily_usage, daily_usage.c.usage_date),
    "hour": (hourly_usage, hourly_usage.c.usage_hour),
    "quarter": (quarter_usage, quarter_usage.c.usage_quarter),
}
_DATES = ("month", "day")  # grains whose rollups are keyed by a date, not a timestamp


@lru_cache(maxsize=128)
def _upload_statement(grain: str, dialect: str, shape: _Shape) -> _Statement:
    """Uploads of one source (daily, hourly or quarter-hour rollup, raw rows) summed by
    (period, provider, file_type) over the pieces in parameter ``{grain}_pieces``."""
    name = f"{grain}_pieces"
    if grain == "raw":
        fu = file_uploads
        names: tuple[str, ...] = ("provider", "file_type", "file_size", "upload_status")
        where = _where(fu, shape, dialect)
        j = _joined(name, False, dialect, fu, fu.c.uploaded_at, names, where)
        ok = case((j.c.upload_status == "success", 1), else_=0)
        cols: list[Any] = [j.c.sign, j.c.sign * j.c.file_size, j.c.sign * ok]
        cols.append(j.c.sign * (1 - ok))
    else:
        table, at = _UPLOAD_SOURCES[grain]
        names = ("provider", "file_type", *_UPLOAD_COUNTERS)
        where = _where(table, shape, dialect)
        # hours and quarters are what a cut day's pieces move between periods (see plan())
        cancelling = ("provider", "file_type") if grain != "day" else ()
        j = _joined(
            name, grain == "day", dialect, table, at, names, where, _UPLOAD_COUNTERS, cancelling
        )
        # daily pieces are never subtracted (see plan())
        cols = [j.c[n] if grain == "day" else j.c.sign * j.c[n] for n in _UPLOAD_COUNTERS]
    stmt = select(
        j.c.p,
        j.c.provider,
        j.c.file_type,
        *(cast(func.sum(cast(c, BigInteger)), BigInteger) for c in cols),
    )
    if dialect == "postgresql":
        # Only the three marginals are needed: a year by week is ~70 rows instead of
        # ~2,000 (period x provider x type); columns a row is not grouped by are NULL.
        stmt = stmt.group_by(func.grouping_sets(j.c.p, j.c.provider, j.c.file_type))
    else:
        stmt = stmt.group_by(j.c.p, j.c.provider, j.c.file_type)
    return _Statement(stmt, dialect)


def upload_statements(
    spec: QuerySpec, key_ids: Collection[UUID] | None, starts: list[datetime], dialect: str
) -> list[tuple[_Statement, dict[str, Any]]]:
    """Statements and their parameters answering uploads for periods starting at ``starts``,
    one per source (daily, hourly, quarter-hour rollup, raw rows). Their rows add up; on PostgreSQL
    they run concurrently."""
    shape, scope = _scope(spec, key_ids, dialect)
    by_grain: dict[str, list[Piece]] = {}
    for x in plan([*starts, spec.end_utc]):
        by_grain.setdefault(x.grain, []).append(x)
    parts = [(grain, pieces) for grain, pieces in by_grain.items() if grain != "day"]
    days = by_grain.get("day", [])
    if dialect == "postgresql" and sum((x.hi - x.lo).days for x in days) >= _SPLIT_DAYS:
        parts.extend(("day", half) for half in _halves(days))  # the longest read: on two cores
    elif days:
        parts.append(("day", days))
    return [
        (
            _upload_statement(grain, dialect, shape),
            {**scope, **_piece_params(pieces, f"{grain}_pieces", grain == "day", dialect)},
        )
        for grain, pieces in parts
    ]


# Daily reads at least this long run as two concurrent statements.
_SPLIT_DAYS = 120


def _halves(pieces: list[Piece]) -> tuple[list[Piece], list[Piece]]:
    """``pieces`` in two runs of about the same number of days."""
    total = sum((x.hi - x.lo).days for x in pieces)
    seen = 0
    for i, x in enumerate(pieces):
        seen += (x.hi - x.lo).days
        if 2 * seen >= total:
            return pieces[: i + 1], pieces[i + 1 :]
    return pieces, []


# Runs the independent statements of one PostgreSQL answer at the same time (each on its own
# pooled connection); bounded, so concurrent dashboards queue instead of draining the pool.
_POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="usage-query")


def _rows(store: UsageStore, statement: _Statement, params: dict[str, Any]) -> list[Any]:
    """Run one read statement. PostgreSQL: its cached text straight through psycopg on a
    pooled connection in autocommit — one round trip, no BEGIN/ROLLBACK, no SQLAlchemy
    execution machinery; driver errors surface as SQLAlchemy's, as everywhere else."""
    store.ensure_schema()
    if statement.sql is None:
        with store.engine.connect() as conn:
            return [tuple(r) for r in conn.execute(statement.stmt, params)]
    import psycopg

    raw = store.engine.raw_connection()  # pre-pinged by the pool
    driver: Any = raw.driver_connection
    try:
        driver.autocommit = True
        with driver.cursor() as cur:
            cur.execute(statement.sql, {**statement.constants, **params})
            rows: list[Any] = cur.fetchall()
            return rows
    except psycopg.Error as exc:
        broken = bool(driver.broken or driver.closed)
        if broken:
            raw.invalidate()
        raise DBAPIError.instance(
            statement.sql, params, exc, psycopg.Error, connection_invalidated=broken
        ) from exc
    finally:
        if not driver.closed:
            driver.autocommit = False  # the pool's next user (a writer) expects transactions
        raw.close()


def _upload_rows(
    store: UsageStore, spec: QuerySpec, key_ids: Collection[UUID] | None, starts: list[datetime]
) -> list[tuple[int | None, str | None, str | None, int, int, int, int]]:
    """(period index, provider, file_type, uploads, bytes, successful, failed) rows."""
    if key_ids is not None and not key_ids:
        return []
    statements = upload_statements(spec, key_ids, starts, store.dialect)
    if store.dialect == "postgresql" and len(statements) > 1:
        futures = [_POOL.submit(_rows, store, *s) for s in statements[1:]]
        rows = _rows(store, *statements[0])
        for future in futures:
            rows.extend(future.result())
        return rows
    # one SQLite connection may be shared (in-memory databases): stay sequential
    return [row for s in statements for row in _rows(store, *s)]


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
    rows: list[tuple[int | None, str | None, str | None, int, int, int, int]],
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
    """The ``GET /granular`` answer: totals, zero-filled series, breakdowns and request stats.

    The upload and request statements are independent; on PostgreSQL they run at the same
    time on pooled connections, so the answer takes about as long as the slowest one.
    """
    ps = periods(spec)
    starts = [p.start for p in ps]
    if store.dialect == "postgresql":
        requests = _POOL.submit(request_stats, store, spec, key_ids)
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
) -> list[tuple[int | None, str | None, str | None, int, int, int, int]]:
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


_REQUEST_SOURCES = {
    "quarter": (quarter_request_usage, quarter_request_usage.c.usage_quarter),
    "month": (monthly_request_usage, monthly_request_usage.c.usage_month),
    "day": (daily_request_usage, daily_request_usage.c.usage_date),
    "hour": (hourly_request_usage, hourly_request_usage.c.usage_hour),
}
_REQUEST_COUNTERS = ("total_requests", "error_requests", "total_response_us")


@lru_cache(maxsize=128)
def _histogram_statement(grains: tuple[str, ...], dialect: str, shape: _Shape) -> _Statement:
    """The merged latency histogram ``(bucket, requests, errors, response µs)`` over the
    request rollups of ``grains``, each read over its pieces in ``{grain}_pieces``."""
    selects: list[Select[Any]] = []
    for grain in grains:
        table, at = _REQUEST_SOURCES[grain]
        names = ("latency_bucket", *_REQUEST_COUNTERS)
        where = _where(table, shape, dialect)
        j = _joined(
            f"{grain}_pieces", grain in _DATES, dialect, table, at, names, where, _REQUEST_COUNTERS
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
    return _Statement(stmt, dialect)


@lru_cache(maxsize=32)
def _raw_request_statement(dialect: str, shape: _Shape) -> _Statement:
    """Raw ``api_requests`` rows ``(sign, response ms, status)`` over ``raw_pieces``."""
    ar = api_requests
    where = _where(ar, shape, dialect)
    names = ("response_time_ms", "status_code")
    j = _joined("raw_pieces", False, dialect, ar, ar.c.requested_at, names, where)
    return _Statement(select(j.c.sign, j.c.response_time_ms, j.c.status_code), dialect)


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
    dialect = store.dialect
    shape, scope = _scope(spec, key_ids, dialect, uploads=False)
    by_grain: dict[str, list[Piece]] = {}
    for x in request_plan(spec.start_utc, spec.end_utc):
        by_grain.setdefault(x.grain, []).append(x)
    buckets: dict[int, int] = defaultdict(int)
    total = errors = total_us = 0
    grains = tuple(g for g in _REQUEST_SOURCES if g in by_grain)
    if grains:
        params = dict(scope)
        for g in grains:
            params.update(_piece_params(by_grain[g], f"{g}_pieces", g in _DATES, dialect))
        for lb, n, e, us in _rows(store, _histogram_statement(grains, dialect, shape), params):
            buckets[lb] += n
            total += n
            errors += e
            total_us += us
    if "raw" in by_grain:
        raw_params = {**scope, **_piece_params(by_grain["raw"], "raw_pieces", False, dialect)}
        for sign, ms, status in _rows(store, _raw_request_statement(dialect, shape), raw_params):
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
