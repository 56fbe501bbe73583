"""Which rollup tier answers which part of a UTC range: the plan the SQL backends read by.

A query covers periods ``[bounds[i], bounds[i+1])`` of UTC instants. Each period is read from
the coarsest source that fits inside it:

* the daily rollup for whole UTC days inside the period,
* the hourly rollup for whole UTC hours inside it that no whole day covers,
* the quarter-hour rollup for the sub-hour edges (zones with :30/:45 offsets; every offset in
  use anywhere since 1979 is a multiple of 15 minutes),
* raw rows only for what lies off the quarter-hour grid: edges set by historical offsets such as
  local mean time before standard time (Kolkata before 1906) and a few early standard times
  (Amsterdam +00:20 until 1940, Monrovia -00:44:30 until 1972, Kiritimati -10:40 until 1979).
  Only answers about such times need raw rows; every other answer is the same after raw rows
  are deleted (retention), rollups kept.

The plan is a list of pieces ``(source, UTC interval, period, sign)``; a UTC day cut by a
period boundary may be read as its daily row minus the shorter side (see :func:`plan`).
Request statistics add one coarser tier, whole UTC months (:func:`request_plan` for one range,
:func:`series_plan` for periods). Because every
rollup is exact, summing the pieces gives exactly what aggregating the raw rows would.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from typing import NamedTuple

__all__ = [
    "SEAL_INTERVAL",
    "SEAL_LAG",
    "Piece",
    "Seals",
    "cut_at",
    "plan",
    "request_plan",
    "seal_due",
    "seal_target",
    "series_plan",
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


def series_plan(bounds: Sequence[datetime]) -> list[Piece]:
    """:func:`plan`, with the whole UTC months inside a period's daily pieces read from the
    monthly request tiers: a year by month in UTC is twelve monthly reads instead of 365 daily
    ones (daily pieces are never subtracted, so every carved month keeps the sign +1)."""
    out: list[Piece] = []
    for x in plan(bounds):
        m0 = _month_start(x.lo)
        if m0 < x.lo:
            m0 = _next_month(m0)
        m1 = _month_start(x.hi)
        if x.grain != "day" or m0 >= m1:
            out.append(x)
            continue
        for grain, lo, hi in (("day", x.lo, m0), ("month", m0, m1), ("day", m1, x.hi)):
            if lo < hi:
                out.append(Piece(grain, lo, hi, x.period, x.sign))
    return out


class Seals(NamedTuple):
    """The instants of the sealed request rollups (PostgreSQL, SQLite): the quarter-hour tiers
    hold exactly the raw rows before ``fine``; the hourly and daily ones exactly those before
    ``coarse``, a whole UTC hour at or before ``fine``; the monthly ones exactly those before
    ``months``, a UTC midnight at or before ``coarse`` (SQLite: all three are ``fine``)."""

    fine: datetime
    coarse: datetime
    months: datetime


#: How far behind the clock a seal stays: requests that started earlier and are recorded later
#: (slow responses, the recorder's batching) are written with their rollups.
SEAL_LAG = timedelta(minutes=2)
#: How often (seconds) a writing process checks whether a quarter hour is due for sealing.
SEAL_INTERVAL = 60.0


def seal_target(now: datetime) -> datetime:
    """The end of the last whole UTC quarter hour that had ended ``SEAL_LAG`` before ``now``
    (aware)."""
    return _floor_quarter(now.astimezone(timezone.utc) - SEAL_LAG)


def seal_due(now: datetime, sealed_before: datetime) -> bool:
    """Whether a seal at ``now`` would move the instant."""
    return seal_target(now) > sealed_before


_COARSE = frozenset(("day", "hour"))


def cut_at(pieces: Sequence[Piece], seals: Seals | None) -> tuple[list[Piece], bool]:
    """``pieces`` for rollups sealed at ``seals`` (None: every row in every tier), and whether
    any piece reaches past an instant.

    A monthly piece wholly from the month instant on is read from the daily tier instead; one
    that spans it stays (its rows hold its part before the instant, no more) and gains a daily
    piece for its part from the instant on, with the same period and sign. Then likewise at the
    coarse instant (a daily or hourly piece past it becomes a quarter-hour one), and at the fine
    instant (a quarter-hour piece past it becomes raw rows). The month instant is a UTC
    midnight, so the daily piece it leaves is whole days; the coarse one a whole hour.
    """
    if seals is None or not pieces:
        return list(pieces), False
    fine, coarse, months = seals
    if pieces[0].hi.tzinfo is None:  # pieces in naive UTC
        fine, coarse, months = (
            t.astimezone(timezone.utc).replace(tzinfo=None) for t in (fine, coarse, months)
        )
    out: list[Piece] = []
    touched = False
    for x in pieces:
        for grains, instant, finer in (
            (("month",), months, "day"),
            (_COARSE, coarse, "quarter"),
            (("quarter",), fine, "raw"),
        ):
            if x.grain not in grains or x.hi <= instant:
                continue
            touched = True
            if x.lo < instant:
                out.append(x)
                x = Piece(finer, instant, x.hi, x.period, x.sign)
            else:
                x = x._replace(grain=finer)
        out.append(x)
    return out, touched
