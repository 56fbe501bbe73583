"""PostgreSQL's sealed request rollups: live requests are raw rows, a seal folds them in.

Whatever was sealed when — nothing, part of a range, everything, in steps, while writers write
— the rollups hold exactly the raw requests before the seal instant, and every answer equals the
in-memory backend's (itself checked against raw aggregation in ``test_requests.py``) for the
same records. Late requests (before the instant) carry their own rollups; replays count once;
retention never prunes a request that no seal holds.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.endpoints import rebuilt_endpoints, stored_endpoints, stored_request_rows
from support.pg import PG_ADMIN_URL, create_database, drop_database, require_postgres
from support.rollups import (
    FAR,
    assert_rollups_exact,
    random_request,
    sealed_hours,
    sealed_instant,
)
from test_queries import app_for, get
from test_requests import scenarios

from usage_middleware import RequestRecord, UsageStore
from usage_middleware._storage import _sqlread
from usage_middleware._storage.base import RequestFilter, Scope

pytestmark = pytest.mark.postgres

UTC = timezone.utc
ROLLUPS = (
    "monthly_request_usage", "daily_request_usage", "hourly_request_usage",
    "quarter_request_usage", "monthly_endpoint_usage", "daily_endpoint_usage",
    "quarter_endpoint_usage", "endpoint_routes",
)  # fmt: skip


@pytest.fixture
def pg(pg_url: str) -> Iterator[UsageStore]:
    store = UsageStore(pg_url)
    store.create_schema()
    yield store
    store.dispose()


def _requests(rng: random.Random, n: int, start: datetime, hours: float) -> list[RequestRecord]:
    """Requests over ``hours`` from ``start``, latencies on and around the bucket edges too."""
    out = []
    for _ in range(n):
        r = random_request(rng)
        ms = rng.choice([r.response_time_ms, 0.0, 0.001, 0.0010001, 12.5, 0.0125, 1000.5, 5e6])
        at = start + timedelta(seconds=rng.random() * hours * 3600)
        out.append(replace(r, response_time_ms=ms, requested_at=at))
    return out


def _rollup_rows(store: UsageStore) -> int:
    from sqlalchemy import text

    with store.engine.connect() as conn:
        return sum(conn.execute(text(f"SELECT count(*) FROM {t}")).scalar_one() for t in ROLLUPS)


def test_live_requests_are_raw_until_sealed_then_equal_the_rebuild(
    pg: UsageStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Live batches (a replay among them) leave the rollups empty; seals in steps of at most
    SEAL_ROWS rows fold them into the quarter-hour tiers, and the UTC hours they complete into
    the coarser ones; every rollup then equals aggregating the raw rows in Python
    with the writer's own bucket and label functions, edges of the latency buckets included."""
    import usage_middleware._pgseal as pgseal

    rng = random.Random(1)
    start = datetime(2025, 3, 30, 22, tzinfo=UTC)
    records = _requests(rng, 3_000, start, 30)
    for i in range(0, len(records), 700):
        assert pg.write(records[i : i + 700]) == len(records[i : i + 700])
    assert pg.write(records[:1_000]) == 0  # a replay: COPY refuses, staging counts none
    assert _rollup_rows(pg) == 0
    assert_rollups_exact(pg)  # nothing before the instant, nothing rolled up

    monkeypatch.setattr(pgseal, "SEAL_ROWS", 400)
    middle = start + timedelta(hours=11, minutes=7, seconds=3)
    assert pg.seal(middle) == sum(r.requested_at < middle for r in records)
    assert sealed_instant(pg) == middle
    # the hours that ended before the instant are rolled into the coarse tiers, whole
    assert sealed_hours(pg) == middle.replace(minute=0, second=0)
    assert_rollups_exact(pg)
    assert pg.seal(middle - timedelta(hours=1)) == 0  # never back
    assert sealed_instant(pg) == middle
    assert pg.seal(FAR) == sum(r.requested_at >= middle for r in records)
    assert_rollups_exact(pg)
    assert stored_endpoints(pg) == rebuilt_endpoints(stored_request_rows(pg))


def test_late_requests_carry_their_rollups(pg: UsageStore) -> None:
    """Requests before the instant (a spool replay, a slow request recorded late) are written
    with their rollups at once; a batch mixing late and live ones splits, each counted once."""
    rng = random.Random(2)
    start = datetime(2025, 5, 1, tzinfo=UTC)
    pg.write(_requests(rng, 500, start, 10))
    instant = start + timedelta(hours=5)
    pg.seal(instant)
    mixed = _requests(rng, 800, start, 10)
    assert pg.write(mixed + mixed[:50]) == 800
    assert pg.write(mixed) == 0
    assert sealed_instant(pg) == instant
    assert_rollups_exact(pg)
    late = [r for r in mixed if r.requested_at < instant]
    assert late and len(late) < len(mixed)
    pg.seal(FAR)
    assert_rollups_exact(pg)


def test_a_seal_adds_to_a_rollup_row_that_a_fresh_period_should_not_have(pg: UsageStore) -> None:
    """A seal plainly inserts the rows of periods that start at or after its old instant (none
    of their rollup rows can exist). Should one exist after all (written by hand), the seal does
    not fail for ever on the duplicate: it upserts instead, adding to that row."""
    from sqlalchemy import text

    quarter = datetime(2025, 6, 2, 9, 15, tzinfo=UTC)
    record = replace(
        random_request(random.Random(4)),
        api_key_id=None,
        status_code=200,
        response_time_ms=0.0,
        requested_at=quarter + timedelta(minutes=3),
    )
    pg.seal(quarter)  # the instant is at the start of the quarter hour: it is a fresh period
    assert pg.write([record]) == 1
    with pg.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO quarter_request_usage (api_key_id, usage_quarter, latency_bucket, "
                "total_requests, error_requests, total_response_us, total_request_bytes, "
                "total_response_bytes) VALUES (NULL, :q, 0, 5, 0, 0, 0, 0)"
            ),
            {"q": quarter},
        )
    assert pg.seal(FAR) == 1
    with pg.engine.connect() as conn:
        totals = conn.execute(
            text("SELECT total_requests FROM quarter_request_usage WHERE usage_quarter = :q"),
            {"q": quarter},
        ).scalars()
        assert list(totals) == [6]
        daily = conn.execute(text("SELECT sum(total_requests) FROM daily_request_usage"))
        assert daily.scalar() == 6  # the day, summed from its quarter hours


# --- answers at every seal state ------------------------------------------------------------


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[UsageStore, UsageStore]]:
    """A PostgreSQL store emptied before each example, and the in-memory reference."""
    require_postgres()
    url = create_database(PG_ADMIN_URL, "um_test_seal_")
    store = UsageStore(url)
    store.create_schema()
    try:
        yield store, UsageStore("memory://")
    finally:
        store.dispose()
        drop_database(PG_ADMIN_URL, url)


def _reset(pair: tuple[UsageStore, UsageStore]) -> tuple[UsageStore, UsageStore]:
    from sqlalchemy import text

    pg, _ = pair
    with pg.engine.begin() as conn:
        conn.execute(
            text(
                f"TRUNCATE file_uploads, api_requests, {', '.join(ROLLUPS)}, "
                "daily_usage, hourly_usage, quarter_usage, quarter_mismatch_usage"
            )
        )
        conn.execute(text("UPDATE rollup_seals SET sealed_before = '0001-01-01 00:00+00'"))
    return pg, UsageStore("memory://")


def _answers(store: UsageStore, s: dict[str, Any]) -> list[Any]:
    params = [("start", s["start"].isoformat()), ("end", s["end"].isoformat()),
              ("tz", s["tz_name"])]  # fmt: skip
    if s["granularity"]:
        params.append(("granularity", s["granularity"]))
    if s["narrow"] is not None:
        params.append(("api_key_id", str(s["keys"][s["narrow"]])))
    filters = [("method", m) for m in s["methods"]] + [("route", r) for r in s["routes"]]
    filters += [("status", x) for x in s["statuses"]]
    headers = {"x-keys": ",".join(map(str, s["keys"]))}
    app = app_for(store)
    out = []
    for path, extra in (("requests", filters), ("requests", []), ("consumers", []),
                        ("granular", [])):  # fmt: skip
        r = get(app, f"/usage/{path}", params + extra, headers)
        assert r.status_code == 200, r.text
        body = r.json()
        out.append(body["requests"] if path == "granular" else body)
    return out


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    scenario=scenarios(), cuts=st.lists(st.integers(0, 10**6), max_size=3), split=st.floats(0, 1)
)
def test_answers_equal_the_reference_whatever_was_sealed(
    pair: tuple[UsageStore, UsageStore], scenario: dict[str, Any], cuts: list[int], split: float
) -> None:
    """Half the requests written, seals at instants among them, the rest written (late or
    live): /requests (with and without filters), /consumers and /granular's request totals
    equal the in-memory backend's for the same records, in every zone and granularity."""
    pg, memory = _reset(pair)
    s = scenario
    records = [*s["requests"], *s["uploads"]]
    times = sorted(r.requested_at for r in s["requests"])
    cut = round(split * len(records))
    pg.write(records[:cut])
    memory.write(records)
    if times:
        for c in sorted(cuts):
            pg.seal(times[c % len(times)] + timedelta(microseconds=c % 3 - 1))
    pg.write(records[cut:])
    assert _answers(pg, s) == _answers(memory, s)


def test_a_seal_during_a_read_is_not_counted_twice(
    pg: UsageStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A seal that commits between a read's statements moves requests from the raw part to the
    rollups under it, and rolls hours from the quarter-hour tiers into the coarse ones: the read
    sees the instants move and reads again."""
    rng = random.Random(3)
    start = datetime(2025, 6, 30, 18, tzinfo=UTC)
    records = _requests(rng, 400, start, 20)
    pg.write(records)
    memory = UsageStore("memory://")
    memory.write(records)
    real = _sqlread.run_reads
    sealed: list[int] = []
    once = threading.Lock()  # the router reads in threads: the first read to finish seals

    def sealing_reads(backend: Any, statements: Any) -> Any:
        results = real(backend, statements)
        with once:
            if not sealed:
                sealed.append(pg.seal(start + timedelta(hours=12)))
        return results

    monkeypatch.setattr(_sqlread, "run_reads", sealing_reads)
    app_pg, app_mem = app_for(pg), app_for(memory)
    params = [("start", "2025-06-30"), ("end", "2025-07-02"), ("granularity", "hour")]
    keys = sorted({str(r.api_key_id) for r in records if r.api_key_id})
    headers = {"x-keys": ",".join(keys)}
    got = get(app_pg, "/usage/requests", params, headers).json()
    assert sealed_hours(pg) == datetime(2025, 7, 1, 6, tzinfo=UTC)
    assert sealed == [sum(r.requested_at < start + timedelta(hours=12) for r in records)]
    assert got == get(app_mem, "/usage/requests", params, headers).json()


def test_concurrent_writers_and_seals_stay_exact(pg: UsageStore) -> None:
    """Three threads write batches (some requests late, replays among them) while a fourth
    seals at rising instants, past a UTC midnight (rolls among them): every request is
    counted once, each rollup holds exactly those before its instant, and a final seal folds in
    the rest."""
    start = datetime(2025, 7, 31, 21, tzinfo=UTC)
    errors: list[BaseException] = []
    written: list[RequestRecord] = []
    lock = threading.Lock()

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(12):
                batch = _requests(rng, 150, start, 6)
                pg.write(batch)
                pg.write(batch[:20])
                with lock:
                    written.extend(batch)
        except BaseException as exc:
            errors.append(exc)

    def sealer() -> None:
        try:
            for minutes in range(0, 360, 15):
                pg.seal(start + timedelta(minutes=minutes, seconds=7))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(3)]
    threads.append(threading.Thread(target=sealer))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(stored_request_rows(pg)) == len(written)
    assert sealed_hours(pg) == datetime(2025, 8, 1, 2, tzinfo=UTC)
    assert_rollups_exact(pg)
    pg.seal(FAR)
    assert_rollups_exact(pg)


def test_writers_seal_a_due_quarter_hour_on_their_own(
    pg: UsageStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writing process checks for a due quarter hour (here at every write): the instant moves
    to the last whole quarter hour that ended two minutes ago, and the rollups hold what came
    before it."""
    from usage_middleware._storage import postgres

    monkeypatch.setattr(postgres, "SEAL_INTERVAL", 0.0)
    now = datetime.now(UTC)
    rng = random.Random(4)
    records = _requests(rng, 200, now - timedelta(hours=2), 2)
    pg.write(records)
    instant = sealed_instant(pg)
    assert instant is not None and now - timedelta(minutes=18) < instant <= now
    assert instant.minute % 15 == 0 and instant.second == instant.microsecond == 0
    assert_rollups_exact(pg)
    assert _rollup_rows(pg) > 0


def test_retention_keeps_requests_that_no_seal_holds(pg: UsageStore) -> None:
    """usage_maintain() run straight from SQL (a cron job in the database) with a one-day
    retention prunes requests only up to the seal instant: a month of requests the seal holds
    goes, a later month that no seal holds stays whole, so no answer loses them."""
    from sqlalchemy import text

    rng = random.Random(5)
    month = datetime.now(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    older = (month - timedelta(days=70)).replace(day=1)  # two months back
    old = (month - timedelta(days=35)).replace(day=1)  # last month
    records = _requests(rng, 200, older + timedelta(days=2), 48)
    records += _requests(rng, 200, old + timedelta(days=2), 48)
    pg.write(records)
    with pg.engine.begin() as conn:
        conn.execute(text("SELECT * FROM usage_maintain(3, NULL, 50000)"))  # partitions
    instant = old + timedelta(days=1)
    assert pg.seal(instant) == 200
    before = sorted(pg.backend.endpoint_rows(Scope(), older, month, RequestFilter()))
    with pg.engine.begin() as conn:
        while conn.execute(text("SELECT more FROM usage_maintain(3, 1, 50000)")).scalar_one():
            pass
    kept = {r["id"] for r in stored_request_rows(pg)}
    assert kept == {r.id for r in records if r.requested_at >= instant}
    assert sorted(pg.backend.endpoint_rows(Scope(), older, month, RequestFilter())) == before


def test_sqlite_and_memory_have_nothing_to_seal(sqlite_url: str) -> None:
    """Engines whose writes roll up every row at once answer a seal with zero."""
    for store in (UsageStore(sqlite_url), UsageStore("memory://")):
        store.write([RequestRecord(requested_at=datetime(2025, 1, 1, tzinfo=UTC))])
        assert store.seal() == 0
        assert store.seal(FAR) == 0
        store.dispose()


def test_a_schema_from_before_sealing_keeps_the_old_plan(pg_url: str) -> None:
    """Until create_schema() adds rollup_seals, writers of this release write every request
    with its rollups, a seal does nothing, and reads take the rollups whole."""
    from sqlalchemy import text

    new = UsageStore(pg_url)
    new.create_schema()
    new.dispose()
    old = UsageStore(pg_url, auto_create_schema=False)
    try:
        with old.engine.begin() as conn:
            conn.execute(text("DROP TABLE rollup_seals"))
        rng = random.Random(6)
        records = _requests(rng, 300, datetime(2025, 9, 1, tzinfo=UTC), 30)
        assert old.write(records) == 300
        assert old.seal(FAR) == 0
        assert _rollup_rows(old) > 0
        memory = UsageStore("memory://")
        memory.write(records)
        keys = sorted({str(r.api_key_id) for r in records if r.api_key_id})
        params = [("start", "2025-09-01"), ("end", "2025-09-03"), ("granularity", "hour")]
        headers = {"x-keys": ",".join(keys)}
        for path in ("requests", "consumers", "granular"):
            got = get(app_for(old), f"/usage/{path}", params, headers).json()
            assert got == get(app_for(memory), f"/usage/{path}", params, headers).json(), path
    finally:
        old.dispose()


def test_a_schema_from_before_the_hour_instant_is_cut_back_to_a_midnight(pg_url: str) -> None:
    """An install whose coarse tiers followed the seal instant (no ``request_hours`` row yet):
    writers keep them so, a seal does nothing, answers stay exact; create_schema() then cuts the
    coarse tiers back to the UTC midnight before the seal instant (deleting that day's hours and
    day, taking the day's quarter hours off its month), and from there seals roll whole hours."""
    from sqlalchemy import text

    store = UsageStore(pg_url)
    store.create_schema()
    instant = datetime(2025, 10, 31, 17, 20, 7, tzinfo=UTC)  # a month's last day, off the grid
    with store.engine.begin() as conn:
        conn.execute(text("DELETE FROM rollup_seals WHERE dataset = 'request_hours'"))
        conn.execute(
            text("UPDATE rollup_seals SET sealed_before = :at WHERE dataset = 'requests'"),
            {"at": instant},
        )
    try:
        rng = random.Random(7)
        records = _requests(rng, 800, datetime(2025, 10, 30, 12, tzinfo=UTC), 40)
        assert store.write(records) == 800  # those before the instant with every rollup
        assert store.seal(FAR) == 0
        memory = UsageStore("memory://")
        memory.write(records)
        keys = sorted({str(r.api_key_id) for r in records if r.api_key_id})
        headers = {"x-keys": ",".join(keys)}

        def same_answers() -> None:
            for tz in ("UTC", "Asia/Kolkata", "America/St_Johns"):
                params = [("start", "2025-10-29"), ("end", "2025-11-02"), ("tz", tz),
                          ("granularity", "hour")]  # fmt: skip
                for path in ("requests", "consumers", "granular"):
                    got = get(app_for(store), f"/usage/{path}", params, headers).json()
                    want = get(app_for(memory), f"/usage/{path}", params, headers).json()
                    assert got == want, (path, tz)

        same_answers()
        store.create_schema()
        assert sealed_instant(store) == instant
        assert sealed_hours(store) == datetime(2025, 10, 31, tzinfo=UTC)
        assert_rollups_exact(store)
        same_answers()
        assert store.seal(FAR) == sum(r.requested_at >= instant for r in records)
        assert_rollups_exact(store)
        same_answers()
    finally:
        store.dispose()
