"""Sealing: whole UTC days of deduplicated raw rows folded into the rollups, and their cleanup.

A seal of a set of days is ``(day, version, watermark)`` rows in ``rollup_seals``; it holds
exactly the days' ids whose first copy was inserted at or before the watermark (raw ``FINAL``,
``inserted_at <= watermark``), summed per UTC quarter hour, hour and day in ``upload_rollup``,
``request_rollup`` and ``endpoint_rollup`` under the seal's ``version``. A new seal of a day is
the previous seal's quarter rows plus the raw ids first inserted in (old watermark, new
watermark], so late rows are folded in without recounting; hours are summed from the new quarter
rows and days from the hours. The seal rows are written last: a reader uses only rollup rows of
the version a seal row names, so a half-written seal is never read. Rows of superseded versions
are deleted an hour after their successor (a reader may use a seal list up to a minute old and
reads are bounded by ``read_timeout``).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from datetime import date, datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, NamedTuple

from .chschema import LAG, METHOD_LABEL, RAW_TIME, ROLLUPS

if TYPE_CHECKING:
    from .chclient import Client

__all__ = ["SEALS_SQL", "Seals", "seal_days", "stale_versions"]

UTC = timezone.utc
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_DAY = timedelta(days=1)
_FINAL_SETTINGS = (
    "SETTINGS use_skip_indexes_if_final = 1, use_skip_indexes_if_final_exact_mode = 1"
)

# Every day's newest seal.
SEALS_SQL = """
SELECT toString(day), toUnixTimestamp64Micro(max(version)),
       toUnixTimestamp64Micro(argMax(watermark, version))
FROM rollup_seals
GROUP BY day
ORDER BY day
"""


def micros(t: datetime) -> int:
    """An aware instant as integer microseconds since the epoch (exact, no float)."""
    return (t - EPOCH) // timedelta(microseconds=1)


def midnight(d: date) -> datetime:
    return datetime(d.year, d.month, d.day, tzinfo=UTC)


class Seals:
    """The newest seal of each day, sorted by day: versions and watermarks in microseconds."""

    __slots__ = ("days", "versions", "watermarks")

    def __init__(self, rows: Sequence[tuple[Any, ...]]) -> None:
        self.days = [date.fromisoformat(str(r[0])) for r in rows]
        self.versions = [int(r[1]) for r in rows]
        self.watermarks = [int(r[2]) for r in rows]

    def within(self, start: datetime, end: datetime) -> Seals:
        """The seals of the UTC days that ``[start, end)`` touches."""
        i = bisect_left(self.days, start.date())
        j = bisect_right(self.days, (end - timedelta(microseconds=1)).date())
        out = Seals(())
        out.days, out.versions = self.days[i:j], self.versions[i:j]
        out.watermarks = self.watermarks[i:j]
        return out

    def spans(self, start: datetime, end: datetime) -> list[tuple[datetime, datetime]]:
        """``[start, end)`` cut to the runs of consecutive sealed days (UTC instants)."""
        out: list[tuple[datetime, datetime]] = []
        for d in self.days:
            lo, hi = max(start, midnight(d)), min(end, midnight(d) + _DAY)
            if lo >= hi:
                continue
            if out and out[-1][1] == lo:
                out[-1] = (out[-1][0], hi)
            else:
                out.append((lo, hi))
        return out

    def gaps(self, start: datetime, end: datetime) -> list[tuple[datetime, datetime]]:
        """The parts of ``[start, end)`` on no sealed day (UTC instants)."""
        out, at = [], start
        for lo, hi in self.spans(start, end):
            if at < lo:
                out.append((at, lo))
            at = hi
        if at < end:
            out.append((at, end))
        return out

    def tail(self, t: str, start: datetime, end: datetime) -> str:
        """A condition that holds for every raw row of ``[start, end)`` that is in no seal (on
        an unsealed day, or inserted after its day's seal's watermark) and lets the ``lag`` skip
        index pass over the rest; literals, so the index sees constants.

        A row of a sealed day ``D`` is late only if ``inserted_at > watermark(D)``: it was
        stored after the oldest watermark, and its lag (``inserted_at - time``) exceeds
        ``watermark(D) - end of D``. Seals run ``settle_days`` after a day ends, so that floor is
        about two days, while rows written live are stored seconds after their time: the index
        skips every granule of them, however many days (each with its own watermark) the range
        spans; rows loaded in bulk and sealed at once are skipped by the oldest watermark."""
        tests = [
            f"({t} >= fromUnixTimestamp64Micro({micros(lo)}, 'UTC') "
            f"AND {t} < fromUnixTimestamp64Micro({micros(hi)}, 'UTC'))"
            for lo, hi in self.gaps(start, end)
        ]
        if self.days:
            floor = min(
                w - micros(midnight(d) + _DAY)
                for d, w in zip(self.days, self.watermarks, strict=True)
            )
            oldest = min(self.watermarks)
            tests.append(
                f"({LAG.format(t=t)} > {floor} "
                f"AND inserted_at > fromUnixTimestamp64Micro({oldest}, 'UTC'))"
            )
        return "(" + (" OR ".join(tests) or "0") + ")"

    def params(self) -> dict[str, Any]:
        """The parameters read statements take the seals from."""
        return {
            "seal_days": self.days,
            "seal_versions": self.versions,
            "seal_watermarks": self.watermarks,
        }


class _Rollup(NamedTuple):
    """How one rollup is built from its raw table: grouping columns and summed measures as
    (raw expression, aggregate)."""

    raw: str
    dims: tuple[tuple[str, str], ...]  # (rollup column, raw expression)
    measures: tuple[tuple[str, str, str], ...]  # (rollup column, raw expression, aggregate)


_BUILD = {
    "upload_rollup": _Rollup(
        "file_uploads",
        (
            ("provider", "provider"),
            ("file_type", "file_type"),
            # only a differing declared type is kept (the mismatch breakdown); '' otherwise
            ("declared_type", "if(ifNull(declared_type, file_type) = file_type, '', "
                              "assumeNotNull(declared_type))"),
        ),
        (
            ("uploads", "1", "sum"),
            ("bytes", "file_size", "sum"),
            ("successful", "upload_status = 'success'", "sum"),
            ("failed", "upload_status = 'failed'", "sum"),
            ("last_at", "uploaded_at", "max"),
        ),
    ),
    "request_rollup": _Rollup(
        "api_requests",
        (("bucket", "latency_bucket"),),
        (
            ("requests", "1", "sum"),
            ("errors", "status_code >= 400", "sum"),
            ("response_us", "response_us", "sum"),
            ("last_at", "requested_at", "max"),
        ),
    ),
    "endpoint_rollup": _Rollup(
        "api_requests",
        (
            ("method", METHOD_LABEL),
            ("route", "route_label"),
            ("status_code", "status_code"),
            ("bucket", "intDiv(latency_bucket + 4, 5)"),
        ),
        (
            ("requests", "1", "sum"),
            ("response_us", "response_us", "sum"),
            ("request_bytes", "request_size", "sum"),
            ("response_bytes", "response_size", "sum"),
        ),
    ),
}
_RANGE = """t >= fromUnixTimestamp64Micro({lo:Int64}, 'UTC')
      AND t < fromUnixTimestamp64Micro({hi:Int64}, 'UTC')"""


def _quarters_sql(rollup: str) -> str:
    """The new seal's quarter rows: the previous seal's plus the newly sealed raw ids."""
    b = _BUILD[rollup]
    t = RAW_TIME[b.raw]
    names = [c for c, _ in b.dims] + [c for c, _, _ in b.measures]
    inner = [f"d{i}" for i in range(len(b.dims))] + [f"m{i}" for i in range(len(b.measures))]
    aggs = [f"{agg}(m{i})" for i, (_, _, agg) in enumerate(b.measures)]
    dims = ", ".join(inner[: len(b.dims)])
    old = ", ".join(f"{c} AS {a}" for c, a in zip(names, inner, strict=True))
    raw = ", ".join(
        f"{e} AS {a}"
        for e, a in zip(
            [e for _, e in b.dims] + [e for _, e, _ in b.measures], inner, strict=True
        )
    )
    return f"""
INSERT INTO {rollup} (grain, day, version, api_key_id, has_key, t, {", ".join(names)})
SELECT 'quarter', s_day, fromUnixTimestamp64Micro({{version:Int64}}, 'UTC'), api_key_id, has_key,
       s_t, {dims}, {", ".join(aggs)}
FROM (
    SELECT day AS s_day, api_key_id, has_key, t AS s_t, {old}
    FROM {rollup}
    WHERE grain = 'quarter' AND {_RANGE} AND has({{days:Array(Date)}}, day)
      AND toUnixTimestamp64Micro(version) = transform(day, {{seal_days:Array(Date)}},
          {{seal_versions:Array(Int64)}}, toInt64(0))
    UNION ALL
    SELECT toDate({t}) AS s_day, api_key_id, has_key, toStartOfFifteenMinutes({t}) AS s_t, {raw}
    FROM {b.raw} FINAL
    WHERE {t} >= fromUnixTimestamp64Micro({{lo:Int64}}, 'UTC')
      AND {t} < fromUnixTimestamp64Micro({{hi:Int64}}, 'UTC')
      AND has({{days:Array(Date)}}, toDate({t}))
      AND inserted_at <= fromUnixTimestamp64Micro({{watermark:Int64}}, 'UTC')
      AND toUnixTimestamp64Micro(inserted_at) > transform(toDate({t}), {{seal_days:Array(Date)}},
          {{seal_watermarks:Array(Int64)}}, toInt64(0))
)
GROUP BY s_day, api_key_id, has_key, s_t, {dims}
{_FINAL_SETTINGS}"""


def _coarser_sql(rollup: str, grain: str, finer: str, start_of: str) -> str:
    """The new seal's ``grain`` rows summed from its ``finer`` rows."""
    b = _BUILD[rollup]
    dims = [c for c, _ in b.dims]
    names = dims + [c for c, _, _ in b.measures]
    aggs = [f"{agg}({c})" for c, _, agg in b.measures]
    return f"""
INSERT INTO {rollup} (grain, day, version, api_key_id, has_key, t, {", ".join(names)})
SELECT '{grain}', day, version, api_key_id, has_key, {start_of}(t) AS s_t, {", ".join(dims)},
       {", ".join(aggs)}
FROM {rollup}
WHERE grain = '{finer}' AND {_RANGE}
  AND version = fromUnixTimestamp64Micro({{version:Int64}}, 'UTC')
GROUP BY day, version, api_key_id, has_key, s_t, {", ".join(dims)}"""


def seal_statements() -> list[str]:
    """Every rollup's quarter, hour and day rows of a new seal, in dependency order."""
    out = []
    for rollup in ROLLUPS:
        out.append(_quarters_sql(rollup))
        out.append(_coarser_sql(rollup, "hour", "quarter", "toStartOfHour"))
        out.append(_coarser_sql(rollup, "day", "hour", "toStartOfDay"))
    return out


# Days below the horizon with raw ids inserted after their seal's watermark (every day with
# rows, the first time) and not after the new watermark. No FINAL: a later copy of a sealed id
# makes a day be sealed again for nothing, which is harmless.
_DUE_SQL = """
SELECT DISTINCT toString(toDate({t}))
FROM {table}
WHERE {t} < fromUnixTimestamp64Micro({{horizon:Int64}}, 'UTC') AND {tail}
  AND inserted_at <= fromUnixTimestamp64Micro({{watermark:Int64}}, 'UTC')
  AND toUnixTimestamp64Micro(inserted_at) > transform(toDate({t}), {{seal_days:Array(Date)}},
      {{seal_watermarks:Array(Int64)}}, toInt64(0))
"""


def seal_days(client: Client, seals: Seals, now_us: int, margin_us: int, settle: int) -> int:
    """Seal the days due at ``now_us``; return how many got a new seal."""
    watermark = now_us - margin_us
    today = (EPOCH + timedelta(microseconds=now_us)).date()
    horizon_day = today - timedelta(days=settle)
    horizon = midnight(horizon_day)
    params = {**seals.params(), "horizon": micros(horizon), "watermark": watermark}
    due: set[date] = set()
    for table, t in RAW_TIME.items():
        sql = _DUE_SQL.format(t=t, table=table, tail=seals.tail(t, EPOCH, horizon))
        due.update(date.fromisoformat(r[0]) for r in client.query(sql, params))
    sealed = set(seals.days)
    if due or sealed:
        # keep the sealed days one run: the (empty) days between are sealed too
        d = min(due | sealed)
        while d < horizon_day:
            if d not in sealed:
                due.add(d)
            d += _DAY
    if not due:
        return 0
    days = sorted(due)
    params = {
        **seals.params(),
        "days": days,
        "version": now_us,
        "watermark": watermark,
        "lo": micros(midnight(days[0])),
        "hi": micros(midnight(days[-1]) + _DAY),
    }
    for statement in seal_statements():
        client.command(statement, params)
    stamp, mark = EPOCH + timedelta(microseconds=now_us), EPOCH + timedelta(microseconds=watermark)
    client.insert(
        "rollup_seals",
        (("day", "date"), ("version", "time"), ("watermark", "time")),
        [days, [stamp] * len(days), [mark] * len(days)],
        f"seal-{now_us}-{days[0]}",
    )
    return len(days)


# Rollup rows of versions that an older-than-an-hour seal superseded, or of seals that never
# finished: no reader can still be using them.
_STALE = """
WHERE version < now64(6) - INTERVAL 1 HOUR
  AND toUnixTimestamp64Micro(version) != transform(day, {seal_days:Array(Date)},
      {seal_versions:Array(Int64)}, toInt64(0))
  AND NOT has({fresh_days:Array(Date)}, day)"""


def stale_versions(seals: Seals, now_us: int) -> tuple[str, str, dict[str, Any]]:
    """The count and the delete of stale rollup rows (``@TABLE@`` to fill in) and their
    parameters."""
    hour_ago = now_us - 3_600_000_000
    fresh = [d for d, v in zip(seals.days, seals.versions, strict=True) if v > hour_ago]
    params = {"seal_days": seals.days, "seal_versions": seals.versions, "fresh_days": fresh}
    return "SELECT count() FROM @TABLE@" + _STALE, "ALTER TABLE @TABLE@ DELETE" + _STALE, params
