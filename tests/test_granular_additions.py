"""``/granular``'s ``previous`` and ``type_mismatches`` equal aggregating raw records in local time.

``previous`` covers the equally long local range (in days) just before the query's, in the same
zone; ``type_mismatches`` counts the range's uploads whose declared type differs from the
detected one. Both are compared with plain Python over the records written, in zones with DST
and :30/:45 offsets, on memory, SQLite and PostgreSQL; then: another key's rows change neither,
and the mismatch rollup is exact and filled on upgrade from the raw rows.
"""

from __future__ import annotations

import uuid
from collections import Counter
from datetime import date, datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text
from support.rollups import assert_rollups_exact
from support.strategies import request_records, upload_records
from test_queries import (
    ANCHORS,
    PROVIDERS,
    TYPE_FILTERS,
    TYPES,
    ZONES,
    app_for,
    get,
    matches_type,
    shared_store,
    shared_stores,
)

from usage_middleware import UploadRecord, UsageStore

__all__ = ["shared_store", "shared_stores"]  # fixtures used here

UTC = timezone.utc
DECLARED = [None, "image/png", "application/octet-stream", "text/plain"]


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, Any]:
    tz_name = draw(st.sampled_from(ZONES))
    tz = ZoneInfo(tz_name)
    start = draw(st.sampled_from(ANCHORS)) + timedelta(days=draw(st.integers(-3, 2)))
    length = draw(st.one_of(st.integers(1, 4), st.integers(25, 40)))
    end = start + timedelta(days=length - 1)
    keys = [uuid.uuid4(), uuid.uuid4()]
    lo = datetime(start.year, start.month, start.day, tzinfo=UTC) - timedelta(days=length + 1)
    span = (2 * length + 3) * 86400
    edges = [
        datetime(d.year, d.month, d.day, tzinfo=tz).astimezone(UTC) + timedelta(microseconds=us)
        for d in (start - timedelta(days=length), start, end + timedelta(days=1))
        for us in (-1, 0, 1)
    ]
    instant = st.one_of(
        st.integers(0, span).map(lambda s: lo + timedelta(seconds=s)), st.sampled_from(edges)
    )
    uploads = upload_records(
        instant, [*keys, None], PROVIDERS, TYPES, st.sampled_from(DECLARED)
    )
    requests = request_records(instant, [*keys, None], [200, 404, 500])
    return {
        "tz_name": tz_name,
        "start": start,
        "end": end,
        "keys": keys,
        "narrow": draw(st.sampled_from([None, 0])),
        "providers": draw(st.lists(st.sampled_from(PROVIDERS), max_size=2, unique=True)),
        "types": draw(st.lists(st.sampled_from(TYPE_FILTERS), max_size=2, unique=True)),
        "uploads": draw(st.lists(uploads, max_size=40)),
        "requests": draw(st.lists(requests, max_size=20)),
    }


def expected(s: dict[str, Any], visible: list[uuid.UUID]) -> dict[str, Any]:
    tz = ZoneInfo(s["tz_name"])
    start, end = s["start"], s["end"]
    days = (end - start).days + 1
    p_start, p_end = start - timedelta(days=days), start - timedelta(days=1)

    def local(t: datetime) -> date:
        return t.astimezone(tz).date()

    uploads = [
        u for u in s["uploads"]
        if u.api_key_id in visible
        and (not s["providers"] or u.provider in s["providers"])
        and matches_type(u.file_type, s["types"])
    ]  # fmt: skip
    before = [u for u in uploads if p_start <= local(u.uploaded_at) <= p_end]
    requests = [
        r for r in s["requests"]
        if r.api_key_id in visible and p_start <= local(r.requested_at) <= p_end
    ]  # fmt: skip
    mismatches = Counter(
        (u.file_type, u.declared_type)
        for u in uploads
        if start <= local(u.uploaded_at) <= end and u.declared_type is not None
    )
    return {
        "previous": {
            "start": p_start.isoformat(),
            "end": p_end.isoformat(),
            "uploads": len(before),
            "bytes": sum(u.file_size for u in before),
            "successful": sum(u.upload_status == "success" for u in before),
            "failed": sum(u.upload_status == "failed" for u in before),
            "requests": len(requests),
            "errors": sum(r.status_code >= 400 for r in requests),
        },
        "type_mismatches": [
            {"file_type": t, "declared_type": d, "uploads": n}
            for (t, d), n in sorted(mismatches.items(), key=lambda kv: (-kv[1], kv[0]))
        ],
    }


@pytest.mark.slow
@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(scenario=scenarios())
def test_previous_and_type_mismatches_equal_raw_aggregation(
    shared_store: UsageStore, scenario: dict[str, Any]
) -> None:
    s = scenario
    shared_store.write([*s["uploads"], *s["requests"]])
    keys = s["keys"]
    visible = keys if s["narrow"] is None else [keys[s["narrow"]]]
    params = [
        ("start", s["start"].isoformat()),
        ("end", s["end"].isoformat()),
        ("tz", s["tz_name"]),
        *(("provider", p) for p in s["providers"]),
        *(("file_type", t) for t in s["types"]),
    ]
    if s["narrow"] is not None:
        params.append(("api_key_id", str(keys[s["narrow"]])))
    r = get(app_for(shared_store), "/usage/granular", params, {"x-keys": ",".join(map(str, keys))})
    assert r.status_code == 200, r.text
    body = r.json()
    want = expected(s, visible)
    assert body["previous"] == want["previous"]
    assert body["type_mismatches"] == want["type_mismatches"]


AT = datetime(2025, 6, 10, 12, tzinfo=UTC)


def _mismatching(key: uuid.UUID | None, n: int, at: datetime = AT) -> list[UploadRecord]:
    return [
        UploadRecord(
            api_key_id=key, provider="s3", file_type="image/png", declared_type="image/gif",
            file_size=1, uploaded_at=at + timedelta(minutes=7 * i),
        )
        for i in range(n)
    ]  # fmt: skip


def test_another_keys_rows_change_neither_previous_nor_mismatches(store: UsageStore) -> None:
    mine, theirs = uuid.uuid4(), uuid.uuid4()
    store.write(_mismatching(mine, 2) + _mismatching(mine, 1, AT - timedelta(days=30)))
    params = {"start": "2025-06-01", "end": "2025-06-30"}
    app = app_for(store)
    alone = get(app, "/usage/granular", params, {"x-keys": str(mine)}).json()
    store.write(_mismatching(theirs, 5) + _mismatching(theirs, 4, AT - timedelta(days=30)))
    store.write(_mismatching(None, 3))
    after = get(app, "/usage/granular", params, {"x-keys": str(mine)}).json()
    assert after["previous"] == alone["previous"]
    assert after["previous"]["uploads"] == 1
    assert after["type_mismatches"] == alone["type_mismatches"] == [
        {"file_type": "image/png", "declared_type": "image/gif", "uploads": 2}
    ]
    empty = get(app, "/usage/granular", params, {"x-keys": ""}).json()
    assert empty["type_mismatches"] == [] and empty["previous"]["uploads"] == 0


def test_the_mismatch_rollup_is_exact_and_filled_on_upgrade(store: UsageStore) -> None:
    """Written with the raw rows; an install that predates the table gets it filled from the
    raw rows when the schema is created again (SQLite: create_schema; PostgreSQL: the schema
    file), and answers stay the same."""
    key = uuid.uuid4()
    store.write(_mismatching(key, 9) + _mismatching(None, 2))
    assert_rollups_exact(store)
    params = {"start": "2025-06-01", "end": "2025-06-30"}
    app = app_for(store)
    before = get(app, "/usage/granular", params, {"x-keys": str(key)}).json()
    assert before["type_mismatches"][0]["uploads"] == 9
    with store.engine.begin() as conn:
        conn.execute(text("DROP TABLE quarter_mismatch_usage"))
    fresh = UsageStore(store.url)
    try:
        fresh.create_schema()
        assert_rollups_exact(fresh)
        after = get(app_for(fresh), "/usage/granular", params, {"x-keys": str(key)}).json()
    finally:
        fresh.dispose()
    assert after["type_mismatches"] == before["type_mismatches"]


def test_a_range_at_the_earliest_dates_has_no_previous_range(store: UsageStore) -> None:
    from starlette.applications import Starlette
    from starlette.routing import Mount

    from usage_middleware import UsageRouter

    app = Starlette(routes=[Mount("/usage", UsageRouter(store, public=True))])
    r = get(app, "/usage/granular", {"start": "0002-01-01", "end": "0002-01-05"})
    assert r.status_code == 200
    assert r.json()["previous"]["start"] is None


def test_mismatches_off_the_quarter_hour_grid_come_from_raw_rows(store: UsageStore) -> None:
    """Kolkata kept local mean time (+05:53:28) until 1906: its days start off the quarter-hour
    grid, and uploads a second either side of local midnight fall on the right side."""
    from zoneinfo import ZoneInfo

    tz = ZoneInfo("Asia/Kolkata")
    key = uuid.uuid4()
    midnight = datetime(1900, 1, 2, tzinfo=tz).astimezone(UTC)
    assert midnight.minute % 15 or midnight.second
    inside = _mismatching(key, 1, midnight)
    inside += _mismatching(key, 1, midnight + timedelta(days=1, seconds=-1))
    outside = _mismatching(key, 1, midnight - timedelta(seconds=1))
    outside += _mismatching(key, 1, midnight + timedelta(days=1))
    store.write(inside + outside)
    params = {"start": "1900-01-02", "end": "1900-01-02", "tz": "Asia/Kolkata"}
    body = get(app_for(store), "/usage/granular", params, {"x-keys": str(key)}).json()
    assert body["type_mismatches"] == [
        {"file_type": "image/png", "declared_type": "image/gif", "uploads": 2}
    ]
    assert body["previous"]["uploads"] == 1
