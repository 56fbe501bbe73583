"""Local days and hours at the awkward places: DST switches, :30/:45 offsets, +14:00."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

from usage_middleware import ALL_KEYS, UploadRecord, UsageRouter, UsageStore

UTC = timezone.utc


def granular(store: UsageStore, **params: str) -> dict[str, Any]:
    """``GET /granular`` through a real app mounted with an all-keys router."""
    app = Starlette(routes=[Mount("/u", UsageRouter(store, authorize=lambda r: ALL_KEYS))])

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get("/u/granular", params=params)

    response = anyio.run(go)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def upload_at(*instants: datetime) -> list[UploadRecord]:
    key = uuid.uuid4()
    return [
        UploadRecord(api_key_id=key, provider="s3", file_type="image/png", file_size=1,
                     uploaded_at=t)
        for t in instants
    ]  # fmt: skip


def test_new_york_fall_back_day_has_25_hours_with_the_repeated_hour_twice(
    store: UsageStore,
) -> None:
    """On 2025-11-02 in New York 01:00 appears twice (EDT then EST) and the day has 25 hours."""
    store.write(upload_at(datetime(2025, 11, 2, 5, 30, tzinfo=UTC),  # 01:30 EDT
                          datetime(2025, 11, 2, 6, 30, tzinfo=UTC),  # 01:30 EST
                          datetime(2025, 11, 2, 6, 45, tzinfo=UTC)))  # fmt: skip
    body = granular(store, start="2025-11-02", end="2025-11-02", tz="America/New_York",
                    granularity="hour")  # fmt: skip
    series = body["series"]
    assert len(series) == 25
    periods = [e["period"] for e in series]
    assert periods[1:3] == ["2025-11-02T01:00:00-04:00", "2025-11-02T01:00:00-05:00"]
    assert [e["uploads"] for e in series[1:3]] == [1, 2]
    assert body["totals"]["uploads"] == 3


def test_new_york_spring_forward_day_has_23_hours_without_2am(store: UsageStore) -> None:
    """On 2025-03-09 in New York 02:00 does not exist; 03:00 EDT follows 01:00 EST."""
    store.write(upload_at(datetime(2025, 3, 9, 6, 59, tzinfo=UTC),  # 01:59 EST
                          datetime(2025, 3, 9, 7, 0, tzinfo=UTC)))  # 03:00 EDT  # fmt: skip
    body = granular(store, start="2025-03-09", end="2025-03-09", tz="America/New_York",
                    granularity="hour")  # fmt: skip
    periods = [e["period"] for e in body["series"]]
    assert len(periods) == 23
    assert "2025-03-09T02:00:00-05:00" not in periods
    assert "2025-03-09T02:00:00-04:00" not in periods
    assert periods[1:3] == ["2025-03-09T01:00:00-05:00", "2025-03-09T03:00:00-04:00"]
    assert [e["uploads"] for e in body["series"][1:3]] == [1, 1]


@pytest.mark.parametrize(
    ("tz", "midnight_utc"),
    [
        ("Asia/Kolkata", datetime(2025, 6, 9, 18, 30, tzinfo=UTC)),  # +05:30
        ("Asia/Kathmandu", datetime(2025, 6, 9, 18, 15, tzinfo=UTC)),  # +05:45
        ("America/St_Johns", datetime(2025, 6, 10, 2, 30, tzinfo=UTC)),  # -02:30 (NDT)
        ("Pacific/Kiritimati", datetime(2025, 6, 9, 10, 0, tzinfo=UTC)),  # +14:00
    ],
)
def test_local_day_begins_at_local_midnight(
    store: UsageStore, tz: str, midnight_utc: datetime
) -> None:
    """A microsecond before local midnight of 2025-06-10 counts on the 9th, midnight on the 10th."""
    tick = timedelta(microseconds=1)
    store.write(upload_at(midnight_utc - tick, midnight_utc, midnight_utc + timedelta(hours=23)))
    body = granular(store, start="2025-06-09", end="2025-06-11", tz=tz, granularity="day")
    assert [(e["period"], e["uploads"]) for e in body["series"]] == [
        ("2025-06-09", 1), ("2025-06-10", 2), ("2025-06-11", 0)
    ]  # fmt: skip


def test_lord_howe_half_hour_dst_day_is_23_and_a_half_hours(store: UsageStore) -> None:
    """Lord Howe moves clocks by 30 minutes: 2025-10-05 lasts 23.5 hours and is counted whole."""
    start = datetime(2025, 10, 4, 13, 30, tzinfo=UTC)  # 2025-10-05 00:00 +10:30
    end = datetime(2025, 10, 5, 13, 0, tzinfo=UTC)  # 2025-10-06 00:00 +11:00
    store.write(upload_at(start, end - timedelta(microseconds=1), end))
    body = granular(store, start="2025-10-05", end="2025-10-06", tz="Australia/Lord_Howe",
                    granularity="day")  # fmt: skip
    assert [(e["period"], e["uploads"]) for e in body["series"]] == [
        ("2025-10-05", 2), ("2025-10-06", 1)
    ]  # fmt: skip
    hours = granular(store, start="2025-10-05", end="2025-10-05", tz="Australia/Lord_Howe",
                     granularity="hour")["series"]  # fmt: skip
    labels = [e["period"] for e in hours]
    assert "2025-10-05T01:00:00+10:30" in labels and "2025-10-05T02:30:00+11:00" not in labels
    assert sum(e["uploads"] for e in hours) == 2


def test_weeks_are_iso_weeks_cut_by_the_range(store: UsageStore) -> None:
    """Weeks start on Monday; the first is labelled with the range start and counts from it."""
    store.write(upload_at(datetime(2025, 10, 30, 12, tzinfo=UTC),  # Thursday before the range
                          datetime(2025, 11, 1, 12, tzinfo=UTC),  # Saturday
                          datetime(2025, 11, 3, 5, 0, tzinfo=UTC)))  # Monday 00:00 EST  # fmt: skip
    body = granular(store, start="2025-11-01", end="2025-11-10", tz="America/New_York",
                    granularity="week")  # fmt: skip
    assert [(e["period"], e["uploads"]) for e in body["series"]] == [
        ("2025-11-01", 1), ("2025-11-03", 1), ("2025-11-10", 0)
    ]  # fmt: skip


def test_months_are_cut_by_the_range(store: UsageStore) -> None:
    """Month periods start on the 1st, except the first, which starts at the range start."""
    store.write(upload_at(datetime(2025, 1, 31, 23, tzinfo=UTC),
                          datetime(2025, 2, 1, 1, tzinfo=UTC)))  # fmt: skip
    body = granular(store, start="2025-01-15", end="2025-03-02", tz="UTC", granularity="month")
    assert [(e["period"], e["uploads"]) for e in body["series"]] == [
        ("2025-01-15", 1), ("2025-02-01", 1), ("2025-03-01", 0)
    ]  # fmt: skip
