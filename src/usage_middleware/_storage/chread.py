"""The ClickHouse read statements: sealed rollups plus the raw rows no seal holds, in one pass.

Every read is one statement, a ``UNION ALL`` of two sources that count each id exactly once:

* **Rollup rows of sealed days**, picked by a cover (:func:`cover`): a UTC day inside one
  period is its day row; a day a period bound cuts is its hour and quarter-hour rows. Each
  row's period comes from a lookup of ``(grain, start)`` in the cover's pieces, and only rows of
  the version the day's seal names are read.
* **Raw rows no seal holds** — on unsealed days, or first inserted after their day's seal's
  watermark — read with ``FINAL`` (each id once, its earliest copy deciding whether it is
  late), summed per quarter hour and mapped to periods by the bounds.

Answers are shaped in Python by the engine-neutral read path, so a backend only sums. Bounds off
the quarter-hour grid (historical local mean time) are read from raw rows alone.
"""

from __future__ import annotations

import itertools
import threading
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from .base import RequestFilter, Scope
from .chschema import METHOD_LABEL
from .chseal import EPOCH, Seals, micros
from .plan import Piece

__all__ = [
    "FINAL_SETTINGS",
    "METHOD_LABEL",
    "PERIOD_OF_Q",
    "Read",
    "SealedAnswers",
    "aligned",
    "build",
    "cover",
    "keys_condition",
    "raw_period",
    "request_filters",
    "upload_filters",
]

_GRAIN = {"quarter": 1, "hour": 2, "day": 3}
_STEP = {"quarter": 900, "hour": 3600, "day": 86400}
_HOUR = timedelta(hours=1)
_DAY = timedelta(days=1)
FINAL_SETTINGS = "use_skip_indexes_if_final = 1, use_skip_indexes_if_final_exact_mode = 1"


def aligned(t: datetime) -> bool:
    return t.second == 0 and t.microsecond == 0 and t.minute % 15 == 0


def _ceil(t: datetime, step: timedelta) -> datetime:
    rest = (t - EPOCH) % step
    return t + (step - rest) if rest else t


def _floor(t: datetime, step: timedelta) -> datetime:
    return t - (t - EPOCH) % step


def cover(start: datetime, end: datetime) -> list[Piece]:
    """``[start, end)`` (quarter-aligned) as whole days, whole hours and quarter hours, all
    added to period 0."""
    out: list[Piece] = []

    def edge(lo: datetime, hi: datetime) -> None:
        h0, h1 = _ceil(lo, _HOUR), _floor(hi, _HOUR)
        if h0 >= h1:
            out.append(Piece("quarter", lo, hi, 0, 1))
            return
        parts = (("quarter", lo, h0), ("hour", h0, h1), ("quarter", h1, hi))
        out.extend(Piece(g, a, b, 0, 1) for g, a, b in parts if a < b)

    d0, d1 = _ceil(start, _DAY), _floor(end, _DAY)
    if d0 >= d1:
        edge(start, end)
        return out
    if start < d0:
        edge(start, d0)
    out.append(Piece("day", d0, d1, 0, 1))
    if d1 < end:
        edge(d1, end)
    return out


def keys_condition(scope: Scope, params: dict[str, Any]) -> str:
    if scope.keys is None:
        return "1"
    params["keys"] = list(scope.keys)
    return "api_key_id IN {keys:Array(UUID)} AND has_key"


def upload_filters(scope: Scope, params: dict[str, Any]) -> str:
    """Provider and exact or family type filters (the same columns in raw and rollup rows)."""
    out = ""
    if scope.providers:
        out += " AND provider IN {providers:Array(String)}"
        params["providers"] = list(scope.providers)
    if scope.file_types:
        out += (
            " AND (file_type IN {exact_types:Array(String)}"
            " OR arrayExists(p -> startsWith(file_type, p), {type_prefixes:Array(String)}))"
        )
        params["exact_types"] = [f for f in scope.file_types if not f.endswith("/*")]
        params["type_prefixes"] = [f[:-1] for f in scope.file_types if f.endswith("/*")]
    return out


def request_filters(
    filters: RequestFilter, params: dict[str, Any], method: str, route: str
) -> str:
    """Method and route label and status filters; ``method`` and ``route`` are the labels'
    expressions (columns of the endpoint rollup; computed from raw rows)."""
    out = ""
    if filters.methods:
        out += f" AND {method} IN {{methods:Array(String)}}"
        params["methods"] = list(filters.methods)
    if filters.routes:
        out += f" AND {route} IN {{routes:Array(String)}}"
        params["routes"] = list(filters.routes)
    if filters.statuses:
        tests = [f"status_code BETWEEN {int(lo)} AND {int(hi)}" for lo, hi in filters.statuses]
        out += " AND (" + " OR ".join(tests) + ")"
    return out


class Read(NamedTuple):
    """The two sources of one read: rollup rows with their ``sealed`` (1) and ``period``
    columns, and the raw rows' condition (a raw part selects ``0 AS sealed`` first)."""

    rollup: str  # SQL of the mapped rollup rows ('' when no sealed day is read)
    raw_where: str  # the raw part's condition on time and insertion
    params: dict[str, Any]


def build(
    table: str,
    columns: str,
    where: str,
    raw_time: str,
    seals: Seals,
    bounds: Sequence[datetime],
) -> Read:
    """Plan a read of ``table`` (a rollup) over periods ``bounds`` and the raw rows beside it.

    ``columns`` are the rollup columns to pass on, ``where`` the rollup's key and filter
    conditions. Each sealed span is covered by whole days, whole hours and quarter hours
    (:func:`cover`, per period), so every rollup row read is in one period: one lookup of its
    ``(start, grain)`` gives it. A day a bound cuts costs its 24 hour rows rather than a day
    row less the short side, but the read stays one branch: ClickHouse spends milliseconds
    planning each branch of a statement, far more than summing a few more rows."""
    start, end = bounds[0], bounds[-1]
    params: dict[str, Any] = {"start": micros(start), "end": micros(end), **seals.params()}
    raw_where = (
        f"{raw_time} >= fromUnixTimestamp64Micro({{start:Int64}}, 'UTC') "
        f"AND {raw_time} < fromUnixTimestamp64Micro({{end:Int64}}, 'UTC') "
        f"AND {seals.tail(raw_time, start, end)} "
        f"AND toUnixTimestamp64Micro(inserted_at) > transform(toDate({raw_time}), "
        "{seal_days:Array(Date)}, {seal_watermarks:Array(Int64)}, toInt64(0))"
    )
    pieces: dict[int, int] = {}  # start (s) * 4 + grain -> period
    for lo, hi in seals.spans(start, end):
        first = bisect_right(bounds, lo) - 1
        inside = [lo, *(b for b in bounds if lo < b < hi), hi]
        for period, (a, b) in enumerate(itertools.pairwise(inside)):
            for p in cover(a, b):
                g, step = _GRAIN[p.grain], _STEP[p.grain]
                for s in range(micros(p.lo) // 1_000_000, micros(p.hi) // 1_000_000, step):
                    pieces[s * 4 + g] = first + period
    if not pieces:
        return Read("", raw_where, params)
    sets = []
    for grain, g in _GRAIN.items():
        starts = sorted({k // 4 for k in pieces if k % 4 == g})
        if starts:
            params[f"{grain}_starts"] = starts
            starts_in = f"toUnixTimestamp(t) IN {{{grain}_starts:Array(UInt32)}}"
            sets.append(f"(grain = '{grain}' AND {starts_in})")
    params["piece_k"], params["piece_p"] = list(pieces), list(pieces.values())
    rollup = f"""
    SELECT 1 AS sealed, transform(toUInt64(toUnixTimestamp(t)) * 4 + CAST(grain, 'UInt8'),
                     {{piece_k:Array(UInt64)}}, {{piece_p:Array(Int32)}}, -1) AS period,
           {columns}
    FROM {table}
    WHERE {where} AND ({" OR ".join(sets)})
      AND toUnixTimestamp64Micro(version) = transform(day, {{seal_days:Array(Date)}},
          {{seal_versions:Array(Int64)}}, toInt64(0))"""
    return Read(rollup, raw_where, params)


def raw_period(raw_time: str, bounds: Sequence[datetime], params: dict[str, Any]) -> str:
    """The period of a raw row: its quarter hour (its exact time off the grid) among ``bounds``.
    Raw parts group by this bucket ``q`` first and map the buckets, not the rows."""
    params["bounds"] = [micros(b) for b in bounds]
    if all(aligned(b) for b in bounds):
        # integer arithmetic: toStartOfFifteenMinutes and toUnixTimestamp cannot go before 1970
        micro = f"toUnixTimestamp64Micro({raw_time})"
        return f"({micro} - positiveModulo({micro}, 900000000))"
    return f"toUnixTimestamp64Micro({raw_time})"


PERIOD_OF_Q = "arrayCount(x -> x <= q, {bounds:Array(Int64)}) - 1"


Rows = list[tuple[Any, ...]]


class SealedAnswers:
    """Answers of statements that read only sealed rollup rows, remembered.

    Such a statement names the seal version of every day it reads, and a seal's rollup rows
    never change once its seal row is written (a new seal of a day is a new version), so its
    answer never changes either: it is kept, keyed by the statement and the parameters it uses,
    at most ``budget`` rows in all (the least recently used go first; an answer larger than an
    eighth of the budget is not kept)."""

    def __init__(self, budget: int = 200_000) -> None:
        self.budget = budget
        self.rows = 0  # rows held
        self._answers: OrderedDict[tuple[Any, ...], Rows] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._answers)

    def largest(self) -> int:
        """The rows of the largest answer held."""
        with self._lock:
            return max(map(len, self._answers.values()), default=0)

    def peek(self, sql: str, params: dict[str, Any]) -> Rows | None:
        """The remembered answer of ``sql`` with ``params`` (a copy), if there is one."""
        key = _key(sql, params)
        with self._lock:
            rows = self._answers.get(key)
            if rows is None:
                return None
            self._answers.move_to_end(key)
            return list(rows)

    def put(self, sql: str, params: dict[str, Any], rows: Rows) -> None:
        """Remember ``rows`` as the answer of ``sql`` with ``params``."""
        if len(rows) > self.budget // 8:
            return
        key = _key(sql, params)
        with self._lock:
            if key not in self._answers:
                self._answers[key] = list(rows)
                self.rows += len(rows)
            while self.rows > self.budget:
                self.rows -= len(self._answers.popitem(last=False)[1])

    def forked(self) -> None:
        """In a forked child: a new lock (the parent's may have been held at the fork)."""
        self._lock = threading.Lock()


def _key(sql: str, params: dict[str, Any]) -> tuple[Any, ...]:
    """The statement and the parameters it uses (lists made hashable)."""
    used = [(k, params[k]) for k in sorted(params) if f"{{{k}:" in sql]
    return (sql, *((k, tuple(v) if isinstance(v, list) else v) for k, v in used))
