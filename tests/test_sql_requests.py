"""The SQL request and consumer reads beyond what the backend contract compares: the series
plan's month tier, and ``last_seen`` once retention pruned the raw rows it was read from."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

from hypothesis import given
from hypothesis import strategies as st

from usage_middleware import RequestRecord, UploadRecord, UsageStore
from usage_middleware._storage.base import Scope
from usage_middleware._storage.plan import series_plan

UTC = timezone.utc


@given(
    start=st.datetimes(datetime(2024, 1, 1), datetime(2026, 1, 1)).map(
        lambda t: t.replace(second=0, microsecond=0, tzinfo=UTC)
    ),
    lengths=st.lists(st.integers(1, 120 * 24 * 60), min_size=1, max_size=6),
)
def test_series_plan_covers_each_period_exactly_once(start: datetime, lengths: list[int]) -> None:
    """Every instant of period i is covered exactly once by period i's signed pieces and by no
    other period's; whole UTC months inside a period's days come from the monthly tier."""
    bounds = [start]
    for minutes in lengths:
        bounds.append(bounds[-1] + timedelta(minutes=minutes))
    pieces = series_plan(bounds)
    for x in pieces:
        assert x.lo < x.hi
        if x.grain == "month":
            assert x.sign == 1 and x.lo.day == x.hi.day == 1
            assert x.lo.time() == x.hi.time() == datetime.min.time()
    edges = sorted({*bounds, *(x.lo for x in pieces), *(x.hi for x in pieces)})
    for t in (e + d for e in edges for d in (-timedelta(microseconds=1), timedelta(0))):
        for i in range(len(bounds) - 1):
            cover = sum(x.sign for x in pieces if x.period == i and x.lo <= t < x.hi)
            assert cover == (1 if bounds[i] <= t < bounds[i + 1] else 0), (t, i)


def test_series_plan_reads_whole_months_from_the_monthly_tier() -> None:
    """A UTC year by month is twelve monthly reads, no daily ones."""
    bounds = [datetime(2025, m, 1, tzinfo=UTC) for m in range(1, 13)]
    bounds.append(datetime(2026, 1, 1, tzinfo=UTC))
    assert [(x.grain, x.period) for x in series_plan(bounds)] == [
        ("month", i) for i in range(12)
    ]


def _request(key: object, at: datetime) -> RequestRecord:
    return RequestRecord(
        api_key_id=key, method="GET", path="/files", status_code=200, response_time_ms=2.0,  # type: ignore[arg-type]
        request_size=1, response_size=1, requested_at=at,
    )  # fmt: skip


def _upload(key: object, at: datetime, provider: str = "s3") -> UploadRecord:
    return UploadRecord(
        api_key_id=key, provider=provider, file_type="image/png", file_size=5, uploaded_at=at,  # type: ignore[arg-type]
    )  # fmt: skip


def _floor_quarter(t: datetime) -> datetime:
    return t.replace(minute=t.minute - t.minute % 15, second=0, microsecond=0)


def test_last_seen_after_retention_is_exact_or_its_quarter_hour(store: UsageStore) -> None:
    """Once raw rows older than the retention are deleted, a key whose newest activity is
    still kept keeps its exact last_seen; a key whose newest activity was pruned gets the
    start of that activity's UTC quarter hour from the rollups (never later, never none),
    honouring the provider filter; every count is unchanged."""
    now = datetime.now(UTC).replace(microsecond=0)
    # PostgreSQL drops whole monthly partitions: "old" lies in a month entirely past retention
    old, recent = now - timedelta(days=100, minutes=7), now - timedelta(days=3, seconds=11)
    pruned, kept, mixed = (uuid.UUID(int=i, version=4) for i in (1, 2, 3))
    store.write([
        _upload(pruned, old - timedelta(hours=2)), _request(pruned, old),
        _upload(pruned, old + timedelta(minutes=3), provider="vercel"),
        _upload(kept, old), _request(kept, recent),
        _upload(mixed, old + timedelta(minutes=1)), _request(mixed, old - timedelta(days=1)),
        _upload(None, recent),
    ])  # fmt: skip
    start, end = now - timedelta(days=150), now + timedelta(days=1)
    scopes = [Scope(), Scope(providers=("s3",)), Scope(keys=(pruned, mixed))]
    before = {scope: sorted(store.backend.consumer_rows(scope, start, end), key=str)
              for scope in scopes}  # fmt: skip
    store.maintain()  # partitions for every month, as a daily run would have made them
    store.maintain(raw_retention_days=30)
    assert store.backend.retention_start(["file_uploads", "api_requests"]) is not None
    for scope in scopes:
        after = sorted(store.backend.consumer_rows(scope, start, end), key=str)
        assert [row[:-1] for row in after] == [row[:-1] for row in before[scope]]
        seen = {row[0]: row[-1] for row in after}
        newest_pruned = old + timedelta(minutes=0 if scope.providers else 3)
        assert seen[pruned] == _floor_quarter(newest_pruned)
        assert seen.get(mixed) == _floor_quarter(old + timedelta(minutes=1))
        if scope.keys is None:
            assert seen[kept] == recent and seen[None] == recent
    # a range that ends before retention: every last_seen from the quarter-hour rollups
    rows = store.backend.consumer_rows(Scope(), start, now - timedelta(days=35))
    assert {row[0]: row[-1] for row in rows} == {
        pruned: _floor_quarter(old + timedelta(minutes=3)),
        kept: _floor_quarter(old),
        mixed: _floor_quarter(old + timedelta(minutes=1)),
    }
