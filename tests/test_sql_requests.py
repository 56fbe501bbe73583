"""The SQL request and consumer reads beyond what the backend contract compares: the series
plan's month tier, ``last_seen`` once retention pruned the raw rows it was read from, and the
SQL function ``get_request_breakdown``."""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from datetime import date, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import text
from starlette.applications import Starlette
from starlette.routing import Mount
from test_queries import get

from usage_middleware import ALL_KEYS, RequestRecord, UploadRecord, UsageRouter, UsageStore
from usage_middleware._storage.base import Scope
from usage_middleware._storage.plan import series_plan

UTC = timezone.utc
KEY = uuid.UUID("22222222-2222-4222-8222-222222222222")


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


def _newest_in(records: list[RequestRecord | UploadRecord], lo: datetime, hi: datetime) -> dict:
    """The brute-force ``last_seen``: each key's newest record time in ``[lo, hi)``."""
    out: dict[uuid.UUID | None, datetime] = {}
    for r in records:
        at = r.requested_at if isinstance(r, RequestRecord) else r.uploaded_at
        if lo <= at < hi and (r.api_key_id not in out or at > out[r.api_key_id]):
            out[r.api_key_id] = at
    return out


def test_last_seen_is_the_newest_instant_for_ranges_cut_anywhere(store: UsageStore) -> None:
    """``last_seen`` is each key's newest upload or request in the range, for ranges whose
    ends fall anywhere: inside a sealed quarter hour (where the key's requests in it may all
    lie after the end), on the grid, at the seal instant, inside the unsealed tail. SQLite
    finds requests in time windows narrowed by the quarter-hour rollup (it keeps no index led
    by the key), PostgreSQL with its per-key index: both must give the brute-force answer."""
    rng = random.Random(3)
    t0 = datetime(2025, 3, 1, 10, tzinfo=UTC)
    keys: list[uuid.UUID | None] = [uuid.UUID(int=i, version=4) for i in range(1, 7)]
    keys.append(None)
    records: list[RequestRecord | UploadRecord] = []
    for i, key in enumerate(keys):
        # densities from two requests in six hours to one every few minutes
        for _ in range(2 + 40 * i):
            records.append(_request(key, t0 + timedelta(seconds=rng.uniform(0, 6 * 3600))))
    # a key whose quarter 12:00-12:15 holds requests only after 12:05, and one before it
    late = uuid.UUID(int=7, version=4)
    records += [_request(late, t0 + timedelta(hours=2, minutes=m)) for m in (-20, 9, 13)]
    records += [_upload(keys[0], t0 + timedelta(hours=h, minutes=7)) for h in (1, 5)]
    store.write(records)  # type: ignore[arg-type]
    store.seal(t0 + timedelta(hours=4))  # quarters before 14:00 sealed, the rest raw only
    bounds = [t0 + timedelta(minutes=m) for m in (-30, 120, 125, 240, 420)]
    ranges = [(lo, hi) for lo in bounds for hi in bounds if lo < hi]
    for _ in range(40):
        lo, hi = sorted(t0 + timedelta(seconds=rng.uniform(-1800, 7 * 3600)) for _ in range(2))
        ranges.append((lo, hi))
    for lo, hi in ranges:
        rows = store.backend.consumer_rows(Scope(), lo, hi)
        assert {row[0]: row[-1] for row in rows} == _newest_in(records, lo, hi), (lo, hi)


# --- get_request_breakdown (sql/usage_tracking_schema.sql) ------------------------------------

BREAKDOWN_CASES = [
    (date(2025, 9, 1), date(2025, 9, 30), None),  # one whole month: its monthly rows, then days
    (date(2025, 8, 25), date(2025, 10, 3), None),  # days, a whole month, days
    (date(2025, 8, 25), date(2025, 10, 3), KEY),
    (date(2025, 9, 5), date(2025, 9, 5), None),
    (date(2025, 9, 10), date(2025, 9, 10), None),  # the instants' day: hours, quarters, raw
    (date(2025, 9, 10), date(2025, 9, 10), KEY),
    (date(2025, 7, 1), date(2025, 10, 31), KEY),  # whole months around the data
    (date(2025, 9, 2), date(2025, 9, 29), None),  # inside one month: days only
    (date(2024, 1, 1), date(2024, 1, 31), None),  # nothing
]


@pytest.fixture(scope="module")
def breakdown_stores() -> Iterator[tuple[UsageStore, UsageStore]]:
    """A PostgreSQL store and the in-memory reference with the same ~2,000 requests around
    September 2025, shared by the module; PostgreSQL's sealed part way through a day."""
    from support.pg import drop_pg_database, make_pg_database

    url = make_pg_database()
    store, reference = UsageStore(url), UsageStore("memory://")
    rng = random.Random(7)
    base = datetime(2025, 8, 20, tzinfo=UTC)
    records = [
        RequestRecord(
            api_key_id=rng.choice([KEY, uuid.UUID(int=9, version=4), None]),
            method=rng.choice(["GET", "GET", "POST", "PURGE"]),
            path=rng.choice(["/files", "/files/{id}", "/upload", "/.env"]),
            route_matched=rng.random() < 0.9,
            status_code=rng.choice([200, 200, 201, 404, 413, 500]),
            response_time_ms=rng.expovariate(0.05),
            request_size=1,
            response_size=1,
            requested_at=base + timedelta(seconds=rng.random() * 50 * 86400),
        )
        for _ in range(2000)
    ]
    # some in the quarter hours between the two instants the seal below leaves
    records[:0] = [
        RequestRecord(
            api_key_id=rng.choice([KEY, None]), path="/files", status_code=200,
            response_time_ms=rng.expovariate(0.05),
            requested_at=datetime(2025, 9, 10, 7, tzinfo=UTC) + timedelta(seconds=i * 25),
        )
        for i in range(30)
    ]  # fmt: skip
    try:
        store.create_schema()
        for part in (records[:700], records[700:]):
            store.write(part)
            reference.write(part)
            # PostgreSQL: September's monthly rows hold the days before Sep 10 (the month
            # instant), the daily rows the days before it and Sep 10 until 07:00 (the hour
            # instant), the quarter-hour tier until 07:13, the rest raw (the second part's older
            # rows are late)
            store.seal(datetime(2025, 9, 10, 7, 13, tzinfo=UTC))
        yield store, reference
    finally:
        store.dispose()
        drop_pg_database(url)


@pytest.mark.postgres
@pytest.mark.parametrize(("start", "end", "key"), BREAKDOWN_CASES)
def test_get_request_breakdown_agrees_with_the_router(
    breakdown_stores: tuple[UsageStore, UsageStore], start: date, end: date, key: uuid.UUID | None
) -> None:
    """Per method and route, the SQL function gives what ``GET /requests`` gives for the same
    UTC days — requests, errors, mean response time, shares (adding up to exactly 100), order
    — and the router's numbers are the reference's."""
    store, reference = breakdown_stores
    params = {"start": str(start), "end": str(end), "tz": "UTC"}
    if key is not None:
        params["api_key_id"] = str(key)
    endpoints = []
    for s in (store, reference):
        app = Starlette(routes=[Mount("/usage", UsageRouter(s, authorize=lambda r: ALL_KEYS))])
        response = get(app, "/usage/requests", params)
        assert response.status_code == 200, response.text
        endpoints.append(response.json()["endpoints"])
    assert endpoints[0] == endpoints[1]
    with store.engine.connect() as conn:
        rows = conn.execute(
            text("SELECT * FROM public.get_request_breakdown(:s, :e, :k)"),
            {"s": start, "e": end, "k": key},
        ).all()
    want = [(x["method"], x["route"], x["requests"], x["errors"]) for x in endpoints[0]]
    assert [tuple(r[:4]) for r in rows] == want
    for (*_, avg_ms, share), x in zip(rows, endpoints[0], strict=True):
        assert round(avg_ms, 4) == pytest.approx(x["avg_response_ms"], abs=1e-4)
        assert float(share) == x["percentage"]
    if rows:
        assert sum(r[5] for r in rows) == 100


@pytest.mark.postgres
def test_get_request_breakdown_is_invoker_with_pinned_search_path(
    breakdown_stores: tuple[UsageStore, UsageStore],
) -> None:
    """SECURITY INVOKER, search_path '' and no EXECUTE for PUBLIC, like the other functions."""
    store, _ = breakdown_stores
    with store.engine.connect() as conn:
        secdef, config, acl = conn.execute(
            text(
                "SELECT prosecdef, proconfig, proacl::text[] FROM pg_proc "
                "WHERE oid = 'public.get_request_breakdown(date, date, uuid)'::regprocedure"
            )
        ).one()
    assert secdef is False and config == ['search_path=""']
    assert acl is not None and not any(item.startswith("=") for item in acl)
