"""Sealed request rollups (PostgreSQL, SQLite): live requests are raw rows, a seal folds them in.

Whatever was sealed when — nothing, part of a range, everything, in steps, while writers write
— the rollups hold exactly the raw requests before the seal instant, and every answer equals the
in-memory backend's (itself checked against raw aggregation in ``test_requests.py``) for the
same records. Late requests (before the instant) carry their own rollups; replays count once;
retention never prunes a request that no seal holds.
"""

from __future__ import annotations

import math
import random
import threading
import uuid
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
    sealed_days,
    sealed_hours,
    sealed_instant,
)
from test_queries import app_for, get
from test_requests import scenarios

from usage_middleware import RequestRecord, UsageStore
from usage_middleware._sqliteseal import latency_bounds
from usage_middleware._storage import _sqlread
from usage_middleware._storage import sql as sql_backend
from usage_middleware._storage.base import RequestFilter, Scope

UTC = timezone.utc
ROLLUPS = (
    "monthly_request_usage", "daily_request_usage", "hourly_request_usage",
    "quarter_request_usage", "monthly_endpoint_usage", "daily_endpoint_usage",
    "quarter_endpoint_usage", "endpoint_routes",
)  # fmt: skip


@pytest.fixture
def store(db_url: str) -> Iterator[UsageStore]:
    """A store on each sealing engine (SQLite, PostgreSQL)."""
    store = UsageStore(db_url)
    store.create_schema()
    yield store
    store.dispose()


def _seal_rows_of(store: UsageStore) -> Any:
    """The module whose ``SEAL_ROWS`` bounds ``store``'s seal transactions."""
    import usage_middleware._pgseal as pgseal
    import usage_middleware._sqliteseal as sqliteseal

    return pgseal if store.dialect == "postgresql" else sqliteseal


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
    store: UsageStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Live batches (a replay among them) leave the rollups empty; seals in steps of at most
    SEAL_ROWS rows fold them into the quarter-hour tiers, and the UTC hours they complete into
    the coarser ones; every rollup then equals aggregating the raw rows in Python
    with the writer's own bucket and label functions, edges of the latency buckets included."""
    rng = random.Random(1)
    start = datetime(2025, 3, 30, 22, tzinfo=UTC)
    records = _requests(rng, 3_000, start, 30)
    for i in range(0, len(records), 700):
        assert store.write(records[i : i + 700]) == len(records[i : i + 700])
    assert store.write(records[:1_000]) == 0  # a replay: none of it is new
    assert _rollup_rows(store) == 0
    assert_rollups_exact(store)  # nothing before the instant, nothing rolled up

    monkeypatch.setattr(_seal_rows_of(store), "SEAL_ROWS", 400)
    middle = start + timedelta(hours=11, minutes=7, seconds=3)
    assert store.seal(middle) == sum(r.requested_at < middle for r in records)
    assert sealed_instant(store) == middle
    # PostgreSQL: the hours that ended before the instant are rolled into the coarse tiers,
    # whole; SQLite fills every tier up to the instant
    hours = middle.replace(minute=0, second=0) if store.dialect == "postgresql" else middle
    assert sealed_hours(store) == hours
    assert_rollups_exact(store)
    assert store.seal(middle - timedelta(hours=1)) == 0  # never back
    assert sealed_instant(store) == middle
    assert store.seal(FAR) == sum(r.requested_at >= middle for r in records)
    assert_rollups_exact(store)
    assert stored_endpoints(store) == rebuilt_endpoints(stored_request_rows(store))


def test_late_requests_carry_their_rollups(store: UsageStore) -> None:
    """Requests before the instant (a spool replay, a slow request recorded late) are written
    with their rollups at once; a batch mixing late and live ones splits, each counted once."""
    rng = random.Random(2)
    start = datetime(2025, 5, 1, tzinfo=UTC)
    store.write(_requests(rng, 500, start, 10))
    instant = start + timedelta(hours=5)
    store.seal(instant)
    mixed = _requests(rng, 800, start, 10)
    assert store.write(mixed + mixed[:50]) == 800
    assert store.write(mixed) == 0
    assert sealed_instant(store) == instant
    assert_rollups_exact(store)
    late = [r for r in mixed if r.requested_at < instant]
    assert late and len(late) < len(mixed)
    store.seal(FAR)
    assert_rollups_exact(store)


def test_an_hour_read_from_the_quarter_hours_is_cut_at_the_seal_instant(store: UsageStore) -> None:
    """PostgreSQL's hour instant lies up to an hour before its seal instant: hourly tiers hold the
    requests before the first, quarter-hour tiers those before the second. /requests reads an
    hour of its endpoints from the quarter-hour tier; a local day of Kiritimati (UTC+14) is read
    as a UTC day minus its first ten hours, and those hours span the hour instant here, with
    late requests in their quarter hours between the instants. Read as an hour, cut at the hour
    instant, that part came from the quarter hours twice: the day, which holds none of these
    requests, answered -2."""
    key = uuid.UUID("d0cd3881-6723-4935-9eff-766ef4442f15")
    day = datetime(2025, 3, 8, tzinfo=UTC)
    one, ten = day + timedelta(hours=1), day + timedelta(hours=10, microseconds=-1)
    at = [day] * 3 + [one] * 2 + [ten] * 2
    records = [
        RequestRecord(api_key_id=key, path="/files", status_code=200, requested_at=t) for t in at
    ]
    instant = day + timedelta(hours=1, microseconds=1)
    store.seal(instant)
    store.write(records)  # the five before the instant are late: written with their rollups
    assert sealed_instant(store) == instant
    if store.dialect == "postgresql":
        assert sealed_hours(store) == day + timedelta(hours=1)
    memory = UsageStore("memory://")
    memory.write(records)
    headers = {"x-keys": str(key)}
    for zone, on in (("Pacific/Kiritimati", "2025-03-09"), ("UTC", "2025-03-08")):
        params = [("start", on), ("end", on), ("tz", zone)]
        for extra in ([], [("route", "/files")], [("granularity", "day")]):
            got = get(app_for(store), "/usage/requests", params + extra, headers).json()
            assert got == get(app_for(memory), "/usage/requests", params + extra, headers).json()
            assert got["totals"]["requests"] == (7 if zone == "UTC" else 0)


def _assert_same_answers(
    store: UsageStore, records: list[RequestRecord], cases: list[tuple[str, str, str, str]]
) -> None:
    """/requests, /consumers and /granular for each ``(zone, start, end, granularity)`` equal
    the in-memory backend's for ``records``."""
    memory = UsageStore("memory://")
    memory.write(records)
    keys = sorted({str(r.api_key_id) for r in records if r.api_key_id})
    headers = {"x-keys": ",".join(keys)}
    for tz, start, end, granularity in cases:
        params = [("start", start), ("end", end), ("tz", tz), ("granularity", granularity)]
        for path in ("requests", "consumers", "granular"):
            got = get(app_for(store), f"/usage/{path}", params, headers).json()
            want = get(app_for(memory), f"/usage/{path}", params, headers).json()
            assert got == want, (path, tz, granularity)


def test_a_month_read_is_cut_at_the_month_instant(store: UsageStore) -> None:
    """PostgreSQL's monthly tiers hold the whole UTC days before the month instant, the daily
    ones the requests before the hour instant: a whole month read from its monthly rows gains
    its days from the month instant on, their hours from the hour instant on, and so on. Here
    the instants lie mid-month (late requests between them among the writes); /requests,
    /consumers and /granular by month, over the month in UTC and around it in New York, equal
    the in-memory backend's, and so do they after a seal past every request."""
    rng = random.Random(11)
    records = _requests(rng, 1_500, datetime(2025, 9, 28, tzinfo=UTC), 24 * 36)
    instant = datetime(2025, 10, 20, 13, 37, 11, tzinfo=UTC)
    store.write(records[:1_000])
    store.seal(instant)
    store.write(records[1_000:])  # those before the instant are late
    if store.dialect == "postgresql":
        assert sealed_hours(store) == datetime(2025, 10, 20, 13, tzinfo=UTC)
        assert sealed_days(store) == datetime(2025, 10, 20, tzinfo=UTC)
        late = [r.requested_at for r in records[1_000:] if r.requested_at < instant]
        assert any(datetime(2025, 10, 20, tzinfo=UTC) <= t < instant for t in late)
    assert_rollups_exact(store)
    cases = [("UTC", "2025-10-01", "2025-10-31", "month"),
             ("America/New_York", "2025-09-01", "2025-11-30", "month")]  # fmt: skip
    _assert_same_answers(store, records, cases)
    store.seal(FAR)
    assert_rollups_exact(store)
    _assert_same_answers(store, records, cases)


@pytest.mark.postgres
def test_a_seal_adds_to_a_rollup_row_that_a_fresh_period_should_not_have(pg_url: str) -> None:
    """PostgreSQL: a seal plainly inserts the rows of periods that start at or after its old
    instant (none of their rollup rows can exist). Should one exist after all (written by hand),
    the seal does not fail for ever on the duplicate: it upserts instead, adding to that row."""
    from sqlalchemy import text

    store = UsageStore(pg_url)
    store.create_schema()

    quarter = datetime(2025, 6, 2, 9, 15, tzinfo=UTC)
    record = replace(
        random_request(random.Random(4)),
        api_key_id=None,
        status_code=200,
        response_time_ms=0.0,
        requested_at=quarter + timedelta(minutes=3),
    )
    store.seal(quarter)  # the instant is at the start of the quarter hour: it is a fresh period
    assert store.write([record]) == 1
    with store.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO quarter_request_usage (api_key_id, usage_quarter, latency_bucket, "
                "total_requests, error_requests, total_response_us, total_request_bytes, "
                "total_response_bytes) VALUES (NULL, :q, 0, 5, 0, 0, 0, 0)"
            ),
            {"q": quarter},
        )
    assert store.seal(FAR) == 1
    with store.engine.connect() as conn:
        totals = conn.execute(
            text("SELECT total_requests FROM quarter_request_usage WHERE usage_quarter = :q"),
            {"q": quarter},
        ).scalars()
        assert list(totals) == [6]
        daily = conn.execute(text("SELECT sum(total_requests) FROM daily_request_usage"))
        assert daily.scalar() == 6  # the day, summed from its quarter hours
    store.dispose()


# --- answers at every seal state ------------------------------------------------------------


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def pair(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[UsageStore, UsageStore]]:
    """A store of each sealing engine, emptied before each example, and the in-memory
    reference. Its writes never seal on their own (they do once a minute, which would make
    the states an example reaches depend on when it runs): a failing example fails again."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('seal') / 'usage.db'}"
    else:
        require_postgres()
        url = create_database(PG_ADMIN_URL, "um_test_seal_")
    store = UsageStore(url)
    store.create_schema()
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(sql_backend, "SEAL_INTERVAL", math.inf)
            yield store, UsageStore("memory://")
    finally:
        store.dispose()
        if request.param == "postgresql":
            drop_database(PG_ADMIN_URL, url)


_EMPTIED = ("file_uploads", "api_requests", *ROLLUPS, "daily_usage", "hourly_usage",
            "quarter_usage", "quarter_mismatch_usage")  # fmt: skip


def _reset(pair: tuple[UsageStore, UsageStore]) -> tuple[UsageStore, UsageStore]:
    from sqlalchemy import text

    store, _ = pair
    with store.engine.begin() as conn:
        if store.dialect == "postgresql":
            conn.execute(text(f"TRUNCATE {', '.join(_EMPTIED)}"))
            first = "0001-01-01 00:00+00"
        else:
            for table in _EMPTIED:
                conn.execute(text(f"DELETE FROM {table}"))
            first = "0001-01-01 00:00:00.000000"
        conn.execute(text("UPDATE rollup_seals SET sealed_before = :at"), {"at": first})
    return store, UsageStore("memory://")


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
    store, memory = _reset(pair)
    s = scenario
    records = [*s["requests"], *s["uploads"]]
    times = sorted(r.requested_at for r in s["requests"])
    cut = round(split * len(records))
    store.write(records[:cut])
    memory.write(records)
    if times:
        for c in sorted(cuts):
            store.seal(times[c % len(times)] + timedelta(microseconds=c % 3 - 1))
    store.write(records[cut:])
    assert _answers(store, s) == _answers(memory, s)


def test_a_seal_during_a_read_is_not_counted_twice(
    store: UsageStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A seal that commits between a read's statements moves requests from the raw part to the
    rollups under it, and rolls hours from the quarter-hour tiers into the coarse ones: the read
    sees the instants move and reads again."""
    rng = random.Random(3)
    start = datetime(2025, 6, 30, 18, tzinfo=UTC)
    records = _requests(rng, 400, start, 20)
    store.write(records)
    memory = UsageStore("memory://")
    memory.write(records)
    real = _sqlread.run_reads
    sealed: list[int] = []
    once = threading.Lock()  # the router reads in threads: the first read to finish seals

    def sealing_reads(backend: Any, statements: Any) -> Any:
        results = real(backend, statements)
        with once:
            if not sealed:
                sealed.append(store.seal(start + timedelta(hours=12)))
        return results

    monkeypatch.setattr(_sqlread, "run_reads", sealing_reads)
    app_pg, app_mem = app_for(store), app_for(memory)
    params = [("start", "2025-06-30"), ("end", "2025-07-02"), ("granularity", "hour")]
    keys = sorted({str(r.api_key_id) for r in records if r.api_key_id})
    headers = {"x-keys": ",".join(keys)}
    got = get(app_pg, "/usage/requests", params, headers).json()
    assert sealed_hours(store) == datetime(2025, 7, 1, 6, tzinfo=UTC)
    assert sealed == [sum(r.requested_at < start + timedelta(hours=12) for r in records)]
    assert got == get(app_mem, "/usage/requests", params, headers).json()


def test_concurrent_writers_and_seals_stay_exact(store: UsageStore) -> None:
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
                store.write(batch)
                store.write(batch[:20])
                with lock:
                    written.extend(batch)
        except BaseException as exc:
            errors.append(exc)

    def sealer() -> None:
        try:
            for minutes in range(0, 360, 15):
                store.seal(start + timedelta(minutes=minutes, seconds=7))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(3)]
    threads.append(threading.Thread(target=sealer))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(stored_request_rows(store)) == len(written)
    assert sealed_instant(store) == start + timedelta(minutes=345, seconds=7)
    if store.dialect == "postgresql":  # the hour instant: the last whole hour passed
        assert sealed_hours(store) == datetime(2025, 8, 1, 2, tzinfo=UTC)
    assert_rollups_exact(store)
    store.seal(FAR)
    assert_rollups_exact(store)


def test_writers_seal_a_due_quarter_hour_on_their_own(
    store: UsageStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writing process checks for a due quarter hour (here at every write): the instant moves
    to the last whole quarter hour that ended two minutes ago, and the rollups hold what came
    before it."""
    from usage_middleware._storage import sql

    monkeypatch.setattr(sql, "SEAL_INTERVAL", 0.0)
    now = datetime.now(UTC)
    rng = random.Random(4)
    records = _requests(rng, 200, now - timedelta(hours=2), 2)
    store.write(records)
    instant = sealed_instant(store)
    assert instant is not None and now - timedelta(minutes=18) < instant <= now
    assert instant.minute % 15 == 0 and instant.second == instant.microsecond == 0
    assert_rollups_exact(store)
    assert _rollup_rows(store) > 0


@pytest.mark.postgres
def test_retention_keeps_requests_that_no_seal_holds(pg_url: str) -> None:
    """usage_maintain() run straight from SQL (a cron job in the database) with a one-day
    retention prunes requests only up to the seal instant: a month of requests the seal holds
    goes, a later month that no seal holds stays whole, so no answer loses them."""
    from sqlalchemy import text

    store = UsageStore(pg_url)
    store.create_schema()
    rng = random.Random(5)
    month = datetime.now(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    older = (month - timedelta(days=70)).replace(day=1)  # two months back
    old = (month - timedelta(days=35)).replace(day=1)  # last month
    records = _requests(rng, 200, older + timedelta(days=2), 48)
    records += _requests(rng, 200, old + timedelta(days=2), 48)
    store.write(records)
    with store.engine.begin() as conn:
        conn.execute(text("SELECT * FROM usage_maintain(3, NULL, 50000)"))  # partitions
    instant = old + timedelta(days=1)
    assert store.seal(instant) == 200
    before = sorted(store.backend.endpoint_rows(Scope(), older, month, RequestFilter()))
    with store.engine.begin() as conn:
        while conn.execute(text("SELECT more FROM usage_maintain(3, 1, 50000)")).scalar_one():
            pass
    kept = {r["id"] for r in stored_request_rows(store)}
    assert kept == {r.id for r in records if r.requested_at >= instant}
    assert sorted(store.backend.endpoint_rows(Scope(), older, month, RequestFilter())) == before
    store.dispose()


def test_sqlite_retention_keeps_requests_that_no_seal_holds(sqlite_url: str) -> None:
    """SQLite: maintain() seals what is due (up to the clock), then prunes; requests that no
    seal holds (a seal is only ever up to two minutes ago) are never pruned, and no answer
    loses what was pruned."""
    rng = random.Random(5)
    store = UsageStore(sqlite_url)
    now = datetime.now(UTC)
    records = _requests(rng, 200, now - timedelta(days=60), 48)  # sealed, then pruned
    records += _requests(rng, 200, now + timedelta(days=1), 24)  # ahead of every seal
    store.write(records)
    scope, lo, hi = Scope(), now - timedelta(days=90), now + timedelta(days=5)

    def endpoints() -> dict[tuple[Any, ...], list[int]]:
        """Requests by endpoint, status and bucket, summed over the tiers they came from."""
        out: dict[tuple[Any, ...], list[int]] = {}
        for row in store.backend.endpoint_rows(scope, lo, hi, RequestFilter()):
            counts = out.setdefault(tuple(row[:4]), [0] * (len(row) - 4))
            counts[:] = [a + b for a, b in zip(counts, row[4:], strict=True)]
        return out

    before = endpoints()
    assert sum(n for n, *_ in before.values()) == 400
    assert store.maintain(raw_retention_days=30).rows_deleted == 200
    instant = sealed_instant(store)
    assert instant is not None and now - timedelta(minutes=18) < instant <= now
    kept = {r["id"] for r in stored_request_rows(store)}
    assert kept == {r.id for r in records if r.requested_at >= instant}
    assert endpoints() == before
    store.dispose()


def test_memory_has_nothing_to_seal() -> None:
    """The in-memory engine rolls up every row as it is written: a seal folds nothing."""
    store = UsageStore("memory://")
    store.write([RequestRecord(requested_at=datetime(2025, 1, 1, tzinfo=UTC))])
    assert store.seal() == 0
    assert store.seal(FAR) == 0


def test_a_schema_from_before_sealing_keeps_the_old_plan(db_url: str) -> None:
    """Until create_schema() adds rollup_seals, writers of this release write every request
    with its rollups, a seal does nothing, and reads take the rollups whole; then
    create_schema() starts the seal instant just after the newest request."""
    from sqlalchemy import text

    new = UsageStore(db_url)
    new.create_schema()
    new.dispose()
    old = UsageStore(db_url, auto_create_schema=False)
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
        old.create_schema()
        newest = max(r.requested_at for r in records)
        assert sealed_instant(old) == newest + timedelta(microseconds=1)
        assert_rollups_exact(old)
        for path in ("requests", "consumers", "granular"):
            got = get(app_for(old), f"/usage/{path}", params, headers).json()
            assert got == get(app_for(memory), f"/usage/{path}", params, headers).json(), path
    finally:
        old.dispose()


@pytest.mark.parametrize(
    ("engine", "missing"),
    [
        pytest.param("postgresql", ("request_hours", "request_days"), marks=pytest.mark.postgres),
        pytest.param("postgresql", ("request_days",), marks=pytest.mark.postgres),
        ("sqlite", ("request_days",)),
    ],
    ids=["postgresql-hours", "postgresql-months", "sqlite-months"],
)
def test_a_schema_from_before_an_instant_is_cut_back_to_a_midnight(
    engine: str, missing: tuple[str, ...], request: pytest.FixtureRequest
) -> None:
    """An install from before the hour instant (PostgreSQL: its hourly, daily and monthly tiers
    followed the seal instant) or from before the month instant (its monthly tiers followed the
    hour instant; on SQLite, the seal instant): writers keep them so, answers stay exact (a
    PostgreSQL seal does nothing, a SQLite one seals the monthly tiers with the others);
    create_schema() then cuts those tiers back to the UTC midnight at or before the instant they
    followed (deleting that day's hours and day, taking its quarter hours off its month), and
    from there seals roll whole hours and days."""
    from sqlalchemy import text

    pg = engine == "postgresql"
    store = UsageStore(request.getfixturevalue("pg_url" if pg else "sqlite_url"))
    store.create_schema()
    instant = datetime(2025, 10, 31, 17, 20, 7, tzinfo=UTC)  # a month's last day, off the grid
    hours, midnight = datetime(2025, 10, 31, 17, tzinfo=UTC), datetime(2025, 10, 31, tzinfo=UTC)
    records = _requests(random.Random(7), 800, datetime(2025, 10, 30, 12, tzinfo=UTC), 40)
    try:
        with store.engine.begin() as conn:
            for dataset in missing:
                conn.execute(text("DELETE FROM rollup_seals WHERE dataset = :d"), {"d": dataset})
        if pg:
            with store.engine.begin() as conn:
                for dataset, at in (("requests", instant), ("request_hours", hours)):
                    conn.execute(
                        text("UPDATE rollup_seals SET sealed_before = :at WHERE dataset = :d"),
                        {"at": at, "d": dataset},
                    )
            assert store.write(records) == 800  # those before the instant with every rollup
            assert store.seal(FAR) == 0
        else:
            hours = instant  # SQLite's hourly and daily tiers follow the seal instant
            store.write(records[:400])
            assert store.seal(instant) == sum(r.requested_at < instant for r in records[:400])
            assert store.write(records[400:]) == 400  # the late ones with every rollup
        # the monthly tiers follow the next finer instant there is
        assert sealed_days(store) == (instant if "request_hours" in missing else hours)
        assert_rollups_exact(store)
        cases = [("UTC", "2025-10-01", "2025-10-31", "month"),
                 ("Asia/Kolkata", "2025-10-29", "2025-11-02", "hour"),
                 ("America/St_Johns", "2025-10-29", "2025-11-02", "day")]  # fmt: skip
        _assert_same_answers(store, records, cases)
        store.create_schema()
        assert sealed_instant(store) == instant
        assert sealed_hours(store) == (midnight if "request_hours" in missing else hours)
        assert sealed_days(store) == midnight
        assert_rollups_exact(store)
        _assert_same_answers(store, records, cases)
        assert store.seal(FAR) == sum(r.requested_at >= instant for r in records)
        assert_rollups_exact(store)
        _assert_same_answers(store, records, cases)
    finally:
        store.dispose()


# --- SQLite: staging raw rows runs no Python per row ------------------------------------------


def test_the_latency_bounds_answer_as_latency_bucket_does_around_every_edge() -> None:
    """Each bound is the least float of its bucket, and the floats near it (64 either side)
    fall on the side the bound says: the table lookup answers as ``latency_bucket``."""
    import math

    from usage_middleware._schema import latency_bucket
    from usage_middleware._sqliteseal import SQL_LIMIT_MS

    bounds = latency_bounds()
    assert [b for _, b in bounds] == list(range(1, latency_bucket(float(SQL_LIMIT_MS)) + 1))
    assert bounds[0][0] == math.nextafter(0.001, 1.0)
    for low, b in bounds:
        up = down = low
        for _ in range(64):
            assert latency_bucket(up) == b
            down = math.nextafter(down, -math.inf)
            assert latency_bucket(down) == b - 1
            up = math.nextafter(up, math.inf)
    lows = [low for low, _ in bounds]
    assert lows == sorted(set(lows))


# floats on and beside the bounds
_EDGES = st.sampled_from([low for low, _ in latency_bounds()]).flatmap(
    lambda low: st.integers(-3, 3).map(lambda k: _stepped(low, k))
)


def _stepped(x: float, k: int) -> float:
    import math

    for _ in range(abs(k)):
        x = math.nextafter(x, math.copysign(math.inf, k))
    return x


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.floats(min_value=-10.0, max_value=1e14, allow_nan=False),
            st.floats(min_value=0.0, max_value=5e3, allow_nan=False),
            st.integers(0, 2**40).map(lambda n: (n + 0.5) / 1000),  # halves of a microsecond
            st.integers(0, 10**6).map(float),
            _EDGES,
            st.sampled_from([0.0, 0.001, 0.0005, 0.0015, 0.0025, 1e12, 1e12 - 0.125, 3e14]),
        ),
        min_size=1,
        max_size=40,
    )
)
def test_staged_buckets_and_microseconds_equal_the_writers(values: list[float]) -> None:
    """What the seal's statements compute for a response time in SQL (from zero up to
    ``SQL_LIMIT_MS``) or through the Python functions (anything else) equals what the writer
    stages in Python: ``latency_bucket(ms)`` and ``round(ms * 1000)``."""
    import sqlite3

    from usage_middleware._schema import latency_bucket
    from usage_middleware._sqliteseal import bucket_sql, micros_sql, register_functions

    conn = sqlite3.connect(":memory:")
    try:
        register_functions(conn)
        conn.execute("CREATE TABLE t (i INTEGER PRIMARY KEY, ms DOUBLE NOT NULL)")
        conn.executemany("INSERT INTO t VALUES (?, ?)", list(enumerate(values)))
        got = conn.execute(f"SELECT {bucket_sql('ms')}, {micros_sql('ms')} FROM t ORDER BY i")
        assert got.fetchall() == [(latency_bucket(v), round(v * 1000)) for v in values]
    finally:
        conn.close()


def test_a_sqlite_seal_calls_no_python_per_row(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A seal of live rows buckets them without calling the writer's Python functions: such a
    call takes the GIL once a row, and beside a busy event loop each take waits for the switch
    interval (a 20,000-row seal took 45 s instead of 0.2 s). A value outside what the writer
    stores (negative, past ``SQL_LIMIT_MS``) still goes to them, once a row (not again for the
    group the row starts), and is folded as they say."""
    import usage_middleware._sqliteseal as sqliteseal

    sqliteseal.latency_bounds()  # made with the real function, before it is counted
    calls = {"bucket": 0, "micros": 0}
    real_bucket, real_micros = sqliteseal.latency_bucket, sqliteseal._response_us

    def bucket(ms: float) -> int:
        calls["bucket"] += 1
        return real_bucket(ms)

    def micros(ms: float) -> int:
        calls["micros"] += 1
        return real_micros(ms)

    monkeypatch.setattr(sqliteseal, "latency_bucket", bucket)
    monkeypatch.setattr(sqliteseal, "_response_us", micros)
    store = UsageStore(sqlite_url)
    try:
        store.create_schema()
        start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=2)
        records = _requests(random.Random(11), 500, start, 0.5)
        assert store.write(records) == 500
        assert store.seal(start + timedelta(hours=1)) == 500
        assert calls == {"bucket": 0, "micros": 0}
        assert_rollups_exact(store)

        foreign = _requests(random.Random(12), 3, start + timedelta(hours=1), 0.2)
        store.write(foreign)
        from sqlalchemy import text

        with store.engine.begin() as conn:
            for record, ms in zip(foreign, (-5.0, 2e12, 1e13), strict=True):
                conn.execute(
                    text("UPDATE api_requests SET response_time_ms = :ms WHERE id = :id"),
                    {"ms": ms, "id": record.id.hex},
                )
        assert store.seal(start + timedelta(hours=2)) == 3
        assert calls == {"bucket": 3, "micros": 3}
        assert_rollups_exact(store)
    finally:
        store.dispose()
