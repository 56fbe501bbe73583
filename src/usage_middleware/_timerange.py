"""Query parameters of the read path, and local calendar ranges turned into UTC instants.

Everything time-zone-specific happens here, in Python with :mod:`zoneinfo`; the database only
ever sees UTC instants, so no session time zone can shift a date. A local day
begins at the first instant whose local date is that day, so DST days last 23 or 25 hours and
zones with :30/:45 offsets cut UTC hours in half. Period boundaries are computed the same way:

* ``day`` / ``week`` (ISO, Monday) / ``month``: local midnights, cut by the range;
* ``hour``: one period per local wall-clock hour *and* UTC offset, so the repeated hour of a
  fall-back appears twice (two offsets) and the skipped spring-forward hour does not appear.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone, tzinfo
from itertools import pairwise
from typing import Literal
from uuid import UUID
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

__all__ = [
    "GRANULARITIES",
    "PRESETS",
    "Period",
    "QueryError",
    "QuerySpec",
    "default_granularity",
    "local_midnight",
    "parse_query",
    "periods",
    "preset_range",
]

UTC = timezone.utc
Granularity = Literal["hour", "day", "week", "month"]
GRANULARITIES: tuple[Granularity, ...] = ("hour", "day", "week", "month")
PRESETS = ("today", "7d", "30d", "90d", "12m", "this_month", "last_month")

DEFAULT_MAX_RANGE_DAYS = 400
DEFAULT_MAX_FILTER_VALUES = 50
MAX_HOUR_RANGE_DAYS = 31  # hour series beyond a month are unreadable and mostly raw-row reads
_MAX_VALUE_LENGTH = 255
_DATE_RE = re.compile(r"\d{4}-\d{2}-\d{2}")


class QueryError(ValueError):
    """A bad query parameter; the router answers it with a 400 naming the parameter."""

    def __init__(self, code: str, message: str, parameter: str | None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.parameter = parameter


@dataclass(frozen=True)
class QuerySpec:
    """A validated usage query: an inclusive local date range plus filters.

    ``api_key_ids`` is ``None`` for "no narrowing requested"; the router intersects it with the
    caller's scope before the query runs.
    """

    start: date
    end: date
    tz_name: str = "UTC"
    granularity: Granularity = "day"
    providers: tuple[str, ...] = ()
    file_types: tuple[str, ...] = ()
    api_key_ids: tuple[UUID, ...] | None = None

    @property
    def tz(self) -> tzinfo:
        return _zone(self.tz_name)

    @property
    def start_utc(self) -> datetime:
        return local_midnight(self.start, self.tz)

    @property
    def end_utc(self) -> datetime:
        """The first instant after the range: local midnight of the day after ``end``."""
        return local_midnight(self.end + timedelta(days=1), self.tz)


@dataclass(frozen=True)
class Period:
    """One series entry: its label and its first UTC instant (it ends where the next begins)."""

    label: str
    start: datetime


def _zone(name: str) -> tzinfo:
    return UTC if name == "UTC" else ZoneInfo(name)


def local_midnight(day: date, tz: tzinfo) -> datetime:
    """The first instant (UTC) whose local date in ``tz`` is ``day``.

    ``fold=0`` is right in both DST corner cases: a skipped midnight resolves to the transition
    instant, a repeated midnight to its first occurrence.
    """
    return datetime.combine(day, time(0), tzinfo=tz).astimezone(UTC)


def default_granularity(start: date, end: date) -> Granularity:
    """Up to 2 days: hours; up to 92 days: days; up to 366 days: ISO weeks; longer: months."""
    days = (end - start).days + 1
    if days <= 2:
        return "hour"
    if days <= 92:
        return "day"
    if days <= 366:
        return "week"
    return "month"


def _add_months(day: date, months: int) -> date:
    index = day.year * 12 + day.month - 1 + months
    year, month = divmod(index, 12)
    month += 1
    last = _month_length(year, month)
    return date(year, month, min(day.day, last))


def _month_length(year: int, month: int) -> int:
    nxt = date(year + (month == 12), month % 12 + 1, 1)
    return (nxt - date(year, month, 1)).days


def preset_range(name: str, today: date) -> tuple[date, date]:
    """Inclusive (start, end) of a preset ending ``today`` (``last_month`` ends before it).

    ``7d``/``30d``/``90d`` are that many days including today; ``12m`` is the day after the
    same date a year ago through today.
    """
    if name == "today":
        return today, today
    if name in ("7d", "30d", "90d"):
        return today - timedelta(days=int(name[:-1]) - 1), today
    if name == "12m":
        return _add_months(today, -12) + timedelta(days=1), today
    if name == "this_month":
        return today.replace(day=1), today
    if name == "last_month":
        first = today.replace(day=1)
        return _add_months(first, -1), first - timedelta(days=1)
    raise QueryError(
        "invalid_range", f"unknown range preset {name!r}; use one of {', '.join(PRESETS)}", "range"
    )


def _one(params: Mapping[str, Sequence[str]], name: str) -> str | None:
    values = params.get(name) or []
    if len(values) > 1:
        raise QueryError("repeated_parameter", f"{name} may be given only once", name)
    return values[0] if values else None


def _date(value: str, name: str) -> date:
    if not _DATE_RE.fullmatch(value):
        raise QueryError(
            "invalid_date", f"{name} must be a date YYYY-MM-DD, got {value[:40]!r}", name
        )
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise QueryError(
            "invalid_date", f"{name} is not a calendar date: {value!r}", name
        ) from None


def _tz_name(value: str | None) -> str:
    if value is None or value in ("", "UTC"):
        return "UTC"
    if len(value) > 64 or not re.fullmatch(r"[A-Za-z0-9_+\-/]+", value) or ".." in value:
        raise QueryError("invalid_tz", f"unknown time zone {value[:64]!r}; use an IANA name", "tz")
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise QueryError(
            "invalid_tz", f"unknown time zone {value!r}; use an IANA name", "tz"
        ) from None
    return value


def _values(params: Mapping[str, Sequence[str]], name: str, limit: int) -> tuple[str, ...]:
    raw = [v for v in params.get(name) or [] if v != ""]
    if len(raw) > limit:
        raise QueryError(
            "too_many_values", f"at most {limit} {name} values are allowed, got {len(raw)}", name
        )
    for v in raw:
        if len(v) > _MAX_VALUE_LENGTH:
            raise QueryError("invalid_value", f"{name} values are at most 255 characters", name)
    # stored text had NUL replaced the same way (PostgreSQL text cannot hold it)
    return tuple(dict.fromkeys(v.replace("\x00", "\ufffd") for v in raw))


def parse_query(
    params: Mapping[str, Sequence[str]],
    *,
    today: Callable[[tzinfo], date],
    max_range_days: int = DEFAULT_MAX_RANGE_DAYS,
    max_filter_values: int = DEFAULT_MAX_FILTER_VALUES,
) -> QuerySpec:
    """Validate query parameters (each name mapped to all its values) into a :class:`QuerySpec`.

    Without ``start``/``end``/``range`` the range is the last 30 days in ``tz``. Raises
    :class:`QueryError` for anything the API rejects with a 400.
    """
    tz_name = _tz_name(_one(params, "tz"))
    tz = _zone(tz_name)
    start_s, end_s, preset = _one(params, "start"), _one(params, "end"), _one(params, "range")
    if preset is not None and (start_s is not None or end_s is not None):
        raise QueryError(
            "conflicting_parameters", "give either range or start/end, not both", "range"
        )
    if preset is not None:
        start, end = preset_range(preset, today(tz))
    elif start_s is None and end_s is None:
        start, end = preset_range("30d", today(tz))
    else:
        if start_s is None:
            raise QueryError("missing_parameter", "start is required when end is given", "start")
        if end_s is None:
            raise QueryError("missing_parameter", "end is required when start is given", "end")
        start, end = _date(start_s, "start"), _date(end_s, "end")
        if end < start:
            raise QueryError("invalid_range", f"end {end} is before start {start}", "end")
    days = (end - start).days + 1
    if days > max_range_days:
        raise QueryError(
            "range_too_long",
            f"the range covers {days} days; at most {max_range_days} are allowed",
            "range" if preset is not None else "end",
        )
    if start.year < 2 or end.year > 9998:
        raise QueryError("invalid_date", "dates must be between 0002-01-01 and 9998-12-31", "start")
    gran_s = _one(params, "granularity")
    if gran_s is None or gran_s == "":
        granularity = default_granularity(start, end)
    elif gran_s in GRANULARITIES:
        granularity = gran_s
    else:
        raise QueryError(
            "invalid_granularity",
            f"unknown granularity {gran_s[:20]!r}; use hour, day, week or month",
            "granularity",
        )
    if granularity == "hour" and days > MAX_HOUR_RANGE_DAYS:
        raise QueryError(
            "range_too_long",
            f"hour granularity covers at most {MAX_HOUR_RANGE_DAYS} days; got {days}",
            "granularity",
        )
    providers = _values(params, "provider", max_filter_values)
    file_types = tuple(v.lower() for v in _values(params, "file_type", max_filter_values))
    key_values = _values(params, "api_key_id", max_filter_values)
    keys: list[UUID] = []
    for v in key_values:
        try:
            keys.append(UUID(v))
        except ValueError:
            raise QueryError(
                "invalid_api_key_id", f"api_key_id must be a UUID, got {v[:40]!r}", "api_key_id"
            ) from None
    return QuerySpec(
        start=start,
        end=end,
        tz_name=tz_name,
        granularity=granularity,
        providers=providers,
        file_types=tuple(dict.fromkeys(file_types)),
        api_key_ids=tuple(dict.fromkeys(keys)) if keys else None,
    )


# --- periods ----------------------------------------------------------------------------------


def periods(spec: QuerySpec) -> list[Period]:
    """The series periods of ``spec`` in order; each ends where the next begins (the last at
    ``spec.end_utc``)."""
    tz = spec.tz
    if spec.granularity == "hour":
        return _hour_periods(spec.start_utc, spec.end_utc, tz)
    out: list[Period] = []
    day = spec.start
    while day <= spec.end:
        out.append(Period(day.isoformat(), local_midnight(day, tz)))
        if spec.granularity == "day":
            day += timedelta(days=1)
        elif spec.granularity == "week":
            day += timedelta(days=7 - day.weekday())
        else:
            day = date(day.year + (day.month == 12), day.month % 12 + 1, 1)
    return out


def _offset_changes(start: datetime, end: datetime, tz: tzinfo) -> list[datetime]:
    """Instants in (start, end) where the UTC offset of ``tz`` changes (to the second)."""
    changes: list[datetime] = []
    step = timedelta(hours=1)
    t = start
    prev = t.astimezone(tz).utcoffset()
    while t < end:
        nxt = min(t + step, end)
        off = nxt.astimezone(tz).utcoffset()
        if off != prev:
            lo, hi = t, nxt  # offset(lo) == prev, offset(hi) != prev
            while hi - lo > timedelta(seconds=1):
                mid = lo + (hi - lo) / 2
                mid = mid.replace(microsecond=0)
                if mid <= lo:
                    mid = lo + timedelta(seconds=1)
                if mid.astimezone(tz).utcoffset() == prev:
                    lo = mid
                else:
                    hi = mid
            if hi < end:
                changes.append(hi)
            prev = off
        t = nxt
    return changes


def _hour_periods(start: datetime, end: datetime, tz: tzinfo) -> list[Period]:
    cuts = [start, *_offset_changes(start, end, tz), end]
    out: list[Period] = []
    for seg_start, seg_end in pairwise(cuts):
        offset = seg_start.astimezone(tz).utcoffset() or timedelta(0)
        fixed = timezone(offset)
        wall = seg_start.astimezone(fixed).replace(minute=0, second=0, microsecond=0)
        while True:
            begin = max(seg_start, wall.astimezone(UTC))
            if begin >= seg_end:
                break
            out.append(Period(wall.isoformat(), begin))
            wall += timedelta(hours=1)
    return out
