"""Bounds on the read path: a time limit per statement, plans that do not depend on a table's
physical order, and a statement pool that survives a fork."""

from __future__ import annotations

import os
import re
import signal
import uuid
from datetime import date, datetime, timedelta, timezone
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

from usage_middleware import (
    ALL_KEYS,
    RequestRecord,
    UploadRecord,
    UsageRouter,
    UsageStore,
    _queries,
)
from usage_middleware._storage._sqlread import upload_statements
from usage_middleware._storage.base import Scope
from usage_middleware._timerange import QuerySpec, periods

UTC = timezone.utc
KEY = uuid.UUID("00000000-0000-4000-8000-000000000003")
HOUR_VIEW = {"start": "2025-03-01", "end": "2025-03-31", "granularity": "hour"}


def get(store: UsageStore, path: str, params: Any) -> httpx.Response:
    """One GET through a mounted UsageRouter whose every caller sees all keys."""
    app = Starlette(routes=[Mount("/u", UsageRouter(store, authorize=lambda r: ALL_KEYS))])

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get(path, params=params)

    return anyio.run(go)


def upload(at: datetime) -> UploadRecord:
    return UploadRecord(
        api_key_id=KEY, provider="s3", file_type="image/png", file_size=5, uploaded_at=at
    )


def _raw_requests(n: int, at: datetime) -> list[RequestRecord]:
    """``n`` requests over ``at``'s hour, on 30 routes with their own latencies."""
    return [
        RequestRecord(
            method="GET", path=f"/r{i % 30}", status_code=500 if i % 11 == 0 else 200,
            response_time_ms=0.25 + (i * 7919 % 100_000) / 100, request_size=i % 700,
            response_size=i % 5_000, api_key_id=KEY,
            requested_at=at + timedelta(microseconds=i * 3_600_000_000 // n),
        )
        for i in range(n)
    ]  # fmt: skip


def test_sqlite_read_past_its_timeout_is_503(sqlite_url: str) -> None:
    """A read running past read_timeout is interrupted (by the watchdog thread) and answers 503
    JSON; the connection it used serves the next read normally. The read sums 100,000 raw
    requests (ahead of every seal), far more work than the watchdog takes to wake."""
    slow = UsageStore(sqlite_url, read_timeout=1e-9)
    at = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) + timedelta(days=2)
    slow.write(_raw_requests(100_000, at))
    day = {"start": at.date().isoformat(), "end": at.date().isoformat()}
    r = get(slow, "/u/requests", day)
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "query_timeout"
    assert set(r.json()["error"]) == {"code", "message", "parameter"}
    slow.dispose()
    normal = UsageStore(sqlite_url)
    assert get(normal, "/u/requests", day).json()["totals"]["requests"] == 100_000
    normal.dispose()


def test_a_sqlite_read_runs_no_python_per_raw_row(sqlite_url: str) -> None:
    """The Python a request read runs does not grow with the raw rows it reads (only with the
    groups they fall into, the same here for 1,000 and 21,000 rows): the rows are
    bucketed, labelled and summed in SQL, and the read's deadline is kept by the watchdog
    thread, not by a progress handler. Python called while a statement steps (a function per
    row, a progress handler every thousand instructions, a fetch per row) takes the GIL each
    time, and beside a busy event loop each take waits for it: a read of 100,000 raw rows took
    0.2 s alone and timed out after 10 s beside a thread spinning in Python."""
    import sys

    from usage_middleware._storage.base import RequestFilter

    store = UsageStore(sqlite_url)
    store.create_schema()
    at = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) + timedelta(days=2)
    lo, hi = at - timedelta(days=1), at + timedelta(days=1)
    bounds = [lo + timedelta(hours=h) for h in range(49)]
    backend = store.backend

    def calls() -> int:
        counted = [0]

        def profile(frame: Any, event: str, arg: Any) -> None:
            counted[0] += event in ("call", "c_call")

        sys.setprofile(profile)
        try:
            backend.request_histogram(Scope(), lo, hi)
            backend.endpoint_rows(Scope(), lo, hi, RequestFilter())
            backend.request_series(Scope(), bounds, RequestFilter())
            backend.request_series(
                Scope(), bounds, RequestFilter(routes=("/r1", "/r2"), statuses=((500, 599),))
            )
        finally:
            sys.setprofile(None)
        return counted[0]

    store.write(_raw_requests(1_000, at))
    calls()  # statements compiled and cached
    few = calls()
    for _ in range(20):  # the same requests again (new ids): the same groups, 21x the rows
        store.write(_raw_requests(1_000, at))
    many = calls()
    assert many - few < 200, (few, many)
    store.dispose()


@pytest.mark.postgres
def test_postgres_read_blocked_past_its_timeout_is_503(pg_url: str) -> None:
    """A read waiting on a lock another session holds is cancelled by statement_timeout and
    answers 503; the pooled connection goes back with the server's own timeout, so writers that
    take it next are not limited."""
    store = UsageStore(pg_url, read_timeout=0.3, engine_options={"pool_size": 1})
    store.write([upload(datetime(2025, 3, 10, 12, tzinfo=UTC))])
    locker = UsageStore(pg_url)
    try:
        with locker.engine.connect() as conn:
            conn.exec_driver_sql("LOCK TABLE daily_usage, hourly_usage IN ACCESS EXCLUSIVE MODE")
            r = get(store, "/u/granular", {"start": "2025-03-01", "end": "2025-03-31"})
            conn.rollback()
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "query_timeout"
        ok = get(store, "/u/granular", {"start": "2025-03-01", "end": "2025-03-31"})
        assert ok.status_code == 200 and ok.json()["totals"]["uploads"] == 1
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("SHOW statement_timeout").scalar() == "0"
    finally:
        locker.dispose()
        store.dispose()


@pytest.mark.postgres
def test_all_keys_hour_view_reads_hours_by_index_on_a_clustered_table(pg_url: str) -> None:
    """hourly_usage CLUSTERed on its unique (key, hour, ...) constraint holds each key's history
    together, so time is uncorrelated with physical order. Reading an hour view for every key
    must still be an index range on the hour — before, a BRIN index matched every block range and
    each of the view's hours scanned the whole table. Reads of one key keep the constraint."""
    store = UsageStore(pg_url)
    store.create_schema()
    raw = store.engine.raw_connection()
    try:
        driver: Any = raw.driver_connection
        driver.autocommit = True
        cur = driver.cursor()
        cur.execute(
            "INSERT INTO hourly_usage (usage_hour, api_key_id, provider, file_type, total_uploads)"
            " SELECT timestamptz '2024-01-01' + h * interval '1 hour',"
            "        ('00000000-0000-4000-8000-' || lpad(k::text, 12, '0'))::uuid,"
            "        'p' || h % 3, 't' || k % 4, 1"
            "   FROM generate_series(0, 365 * 24 - 1) AS h, generate_series(1, 10) AS k"
        )
        cur.execute("CLUSTER hourly_usage USING uq_hourly_usage")
        cur.execute("ANALYZE hourly_usage")
        cur.execute(
            "SELECT correlation FROM pg_stats"
            " WHERE tablename = 'hourly_usage' AND attname = 'usage_hour'"
        )
        assert abs(cur.fetchone()[0]) < 0.5  # physical order is not time order
        spec = QuerySpec(start=date(2024, 6, 10), end=date(2024, 6, 11), granularity="hour")
        starts = [p.start for p in periods(spec)]
        for keys, expected in ((None, "idx_hourly_usage_utc_hour"), ([KEY], "uq_hourly_usage")):
            scope = Scope(None if keys is None else tuple(keys))
            statements = upload_statements(scope, [*starts, spec.end_utc], "postgresql")
            hourly = [(s, p) for s, p in statements if s.sql and "hourly_usage" in s.sql]
            assert len(hourly) == 1
            statement, params = hourly[0]
            cur.execute("EXPLAIN " + (statement.sql or ""), {**statement.constants, **params})
            plan = "\n".join(row[0] for row in cur.fetchall())
            assert "Seq Scan on hourly_usage" not in plan, plan
            used = re.findall(
                r"(?:Index Scan using|Index Only Scan using|Index Scan on) (\w+)", plan
            )
            assert used == [expected], plan
            cur.execute(
                "SELECT a.amname FROM pg_class c JOIN pg_am a ON a.oid = c.relam"
                " WHERE c.relname = %s",
                (expected,),
            )
            assert cur.fetchone() == ("btree",)
            assert re.search(r"Index Cond: .*usage_hour", plan), plan
    finally:
        raw.close()
        store.dispose()


@pytest.mark.postgres
def test_statement_pool_works_in_a_forked_child(pg_url: str) -> None:
    """The statement pool ran tasks before the fork; the child's queries (which use it for
    concurrent statements on PostgreSQL) still complete. Before, the child's pool believed it
    had workers that were not copied and its queries waited forever."""
    store = UsageStore(pg_url)
    store.write([upload(datetime(2025, 3, 10, 12, tzinfo=UTC))])
    spec = QuerySpec(start=date(2025, 3, 1), end=date(2025, 3, 31))
    assert _queries.granular(store, spec)["totals"]["uploads"] == 1  # uses the pool
    store.dispose()
    pid = os.fork()
    if pid == 0:  # the child: report through the exit code, never return into pytest
        code = 3
        try:
            signal.alarm(30)  # a hung pool kills the child instead of the test run
            child = UsageStore(pg_url)
            code = 0 if _queries.granular(child, spec)["totals"]["uploads"] == 1 else 2
            child.dispose()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status), f"the child was killed by signal {os.WTERMSIG(status)}"
    assert os.WEXITSTATUS(status) == 0
