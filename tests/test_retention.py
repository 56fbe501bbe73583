"""Answers come from rollups alone: deleting old raw rows (retention) changes no answer.

Records are written through ``store.write``; the upload series, breakdowns and request
statistics are read through the query functions, then raw rows older than a random cutoff are
deleted (rollups kept) and everything is read again. Zones with :30 and :45 offsets put period
boundaries inside UTC hours, where the quarter-hour rollups answer instead of raw rows.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import date, datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import delete
from support.strategies import request_records, upload_records

from usage_middleware import RequestRecord, UploadRecord, UsageStore
from usage_middleware._queries import breakdowns, granular
from usage_middleware._schema import api_requests, file_uploads
from usage_middleware._storage.plan import plan, request_plan
from usage_middleware._timerange import QuerySpec, periods

UTC = timezone.utc
ZONES = [
    "UTC",
    "Asia/Kolkata",  # +05:30
    "Asia/Kathmandu",  # +05:45
    "Australia/Eucla",  # +08:45
    "Pacific/Chatham",  # +12:45 / +13:45
    "America/St_Johns",  # -03:30 / -02:30
    "Australia/Lord_Howe",  # +10:30 / +11:00
    "America/New_York",
    "Pacific/Kiritimati",  # +14:00
]
# near DST switches of the zones above (Chatham and Lord Howe in April and September/October)
ANCHORS = [date(2025, 3, 30), date(2025, 4, 3), date(2025, 9, 25), date(2025, 10, 30)]
PROVIDERS = ["s3", "vercel", "r2"]
TYPES = ["image/png", "image/jpeg", "application/pdf"]
TYPE_FILTERS = [*TYPES, "image/*"]
WEEKS = 5


@pytest.fixture(scope="module")
def shared_stores(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, UsageStore]]:
    """One store per backend (PostgreSQL when a server answers) reused by every example."""
    from support.pg import with_postgres

    stores = {"sqlite": UsageStore(f"sqlite:///{tmp_path_factory.mktemp('r')}/usage.db")}
    with with_postgres(stores):
        yield stores


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def shared_store(
    request: pytest.FixtureRequest, shared_stores: dict[str, UsageStore]
) -> UsageStore:
    if request.param not in shared_stores:
        from support.pg import require_postgres

        require_postgres()
    return shared_stores[request.param]


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, Any]:
    tz_name = draw(st.sampled_from(ZONES))
    tz = ZoneInfo(tz_name)
    anchor = draw(st.sampled_from(ANCHORS))
    lo = datetime(anchor.year, anchor.month, anchor.day, tzinfo=UTC) - timedelta(days=7)
    keys = [uuid.uuid4(), uuid.uuid4()]
    start = anchor + timedelta(days=draw(st.integers(-3, 3)))
    granularity = draw(st.sampled_from(["hour", "day", "week", "month"]))
    length = draw(st.integers(1, 3) if granularity == "hour" else st.integers(1, 3 * 7))
    end = start + timedelta(days=length - 1)
    # instants at the local midnights of the range and its periods' edges, within a second
    edges = [
        datetime(d.year, d.month, d.day, tzinfo=tz).astimezone(UTC) + timedelta(microseconds=us)
        for d in (start, end + timedelta(days=1), start + timedelta(days=1))
        for us in (-1, 0, 1, 999_999)
    ]
    # any second of the weeks around the range: every quarter of every hour occurs
    instant = st.one_of(
        st.integers(0, WEEKS * 7 * 86400).map(lambda s: lo + timedelta(seconds=s)),
        st.sampled_from(edges),
    )
    uploads = draw(
        st.lists(
            upload_records(
                instant,
                [*keys, None],
                PROVIDERS,
                TYPES,
                # /granular's type_mismatches come from their own rollup (image/png on a png
                # upload is no mismatch: it is stored as None)
                st.sampled_from([None, "image/png", "application/octet-stream"]),
            ),
            min_size=1,
            max_size=40,
        )
    )
    requests = draw(
        st.lists(
            request_records(
                instant,
                [*keys, None],
                [200, 201, 400, 500],
                st.floats(0.05, 60_000, allow_nan=False),
            ),
            max_size=25,
        )
    )
    scope = draw(st.sampled_from(["all", "both", "one"]))
    return {
        "spec": QuerySpec(
            start=start,
            end=end,
            tz_name=tz_name,
            granularity=granularity,
            providers=tuple(draw(st.lists(st.sampled_from(PROVIDERS), max_size=2, unique=True))),
            file_types=tuple(
                draw(st.lists(st.sampled_from(TYPE_FILTERS), max_size=2, unique=True))
            ),
        ),
        # None reads every key, rows without one included
        "key_ids": None if scope == "all" else keys if scope == "both" else keys[:1],
        "keys": keys,
        "cutoff": draw(instant | st.just(lo + timedelta(weeks=WEEKS + 1))),
        "uploads": uploads,
        "requests": requests,
    }


def answers(store: UsageStore, spec: QuerySpec, key_ids: list[uuid.UUID] | None) -> Any:
    """The ``/granular`` answer (series, breakdowns, request statistics, the previous range,
    declared-type mismatches) and the whole-range breakdowns."""
    return granular(store, spec, key_ids), breakdowns(store, spec, key_ids)


@pytest.mark.slow
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(scenario=scenarios())
def test_deleting_old_raw_rows_changes_no_answer(
    shared_store: UsageStore, scenario: dict[str, Any]
) -> None:
    """Every answer is the same before and after raw rows older than the cutoff are deleted."""
    s = scenario
    store = shared_store
    store.write([*s["uploads"], *s["requests"]])
    before = answers(store, s["spec"], s["key_ids"])
    store.seal(s["cutoff"])  # retention prunes only requests a seal holds (PostgreSQL)
    with store.engine.begin() as conn:
        conn.execute(delete(file_uploads).where(file_uploads.c.uploaded_at < s["cutoff"]))
        conn.execute(delete(api_requests).where(api_requests.c.requested_at < s["cutoff"]))
    after = answers(store, s["spec"], s["key_ids"])
    assert after == before


def test_deleting_every_raw_row_keeps_a_kolkata_week_exact(store: UsageStore) -> None:
    """Kolkata's days start at :30 UTC; with all raw rows gone the days still hold exactly the
    uploads and requests of their local dates, including those a minute either side of
    midnight."""
    kolkata = ZoneInfo("Asia/Kolkata")
    key = uuid.uuid4()
    instants = [
        datetime(2025, 6, d, h, m, tzinfo=kolkata)
        for d in (2, 3, 4)
        for h, m in ((0, 0), (0, 14), (23, 59), (12, 31))
    ]
    store.write(
        [
            UploadRecord(api_key_id=key, provider="s3", file_type="image/png", file_size=10,
                         uploaded_at=t)
            for t in instants
        ]
        + [
            RequestRecord(api_key_id=key, method="GET", path="/", status_code=200,
                          response_time_ms=5.0, request_size=1, response_size=1, requested_at=t)
            for t in instants
        ]
    )  # fmt: skip
    spec = QuerySpec(date(2025, 6, 3), date(2025, 6, 4), "Asia/Kolkata", "day")
    before = granular(store, spec, [key])
    store.seal(datetime(2100, 1, 1, tzinfo=timezone.utc))  # PostgreSQL: retention's premise
    with store.engine.begin() as conn:
        conn.execute(delete(file_uploads))
        conn.execute(delete(api_requests))
    after = granular(store, spec, [key])
    assert after == before
    assert [e["uploads"] for e in after["series"]] == [4, 4]
    assert after["requests"]["total"] == 8


@pytest.mark.parametrize(
    "tz_name",
    [
        "Asia/Kolkata",
        "Asia/Kathmandu",
        "Australia/Eucla",
        "Pacific/Chatham",
        "America/St_Johns",
        "Australia/Lord_Howe",
    ],
)
def test_a_year_in_a_half_or_quarter_hour_zone_reads_no_raw_rows(tz_name: str) -> None:
    """A year by hour, day, week or month, uploads and requests, plans no raw read: sub-hour
    edges come from the quarter-hour rollup."""
    grains: set[str] = set()
    for granularity in ("hour", "day", "week", "month"):
        spec = QuerySpec(date(2025, 1, 1), date(2025, 12, 31), tz_name, granularity)
        starts = [p.start for p in periods(spec)]
        pieces = [*plan([*starts, spec.end_utc]), *request_plan(spec.start_utc, spec.end_utc)]
        grains |= {x.grain for x in pieces}
        assert "raw" not in {x.grain for x in pieces}, granularity
    assert "quarter" in grains


def test_only_offsets_off_the_quarter_hour_grid_read_raw_rows() -> None:
    """Kolkata's days before standard time (Madras time, +05:21:10, until 1906) start off the
    quarter-hour grid: there, and only there, edges shorter than a quarter hour come from raw
    rows."""
    spec = QuerySpec(date(1900, 1, 1), date(1900, 1, 31), "Asia/Kolkata", "week")
    starts = [p.start for p in periods(spec)]
    raw = [x for x in plan([*starts, spec.end_utc]) if x.grain == "raw"]
    assert raw
    assert all(x.hi - x.lo < timedelta(minutes=15) for x in raw)
