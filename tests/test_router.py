"""UsageRouter over HTTP: authorization, validation, error shapes, endpoints, mounting."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import date, datetime, timedelta, timezone
from typing import Any
from urllib.parse import quote

import anyio
import httpx
import pytest
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from usage_middleware import (
    ALL_KEYS,
    ConfigurationError,
    Recorder,
    RequestRecord,
    UploadRecord,
    UsageRouter,
    UsageStore,
)

UTC = timezone.utc
KEY_A = uuid.UUID("00000000-0000-4000-8000-00000000000a")
KEY_B = uuid.UUID("00000000-0000-4000-8000-00000000000b")
TODAY = date(2025, 3, 15)


def fixed_today(tz: Any) -> date:
    return TODAY


def call(app: ASGIApp, path: str, params: Any = None, headers: Any = None) -> httpx.Response:
    """One GET through the real ASGI app (httpx's ASGI transport, no network)."""

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get(path, params=params, headers=headers)

    return anyio.run(go)


def header_authorize(request: Request) -> Any:
    """Scope from the ``x-who`` header: 'admin' → all keys, 'a'/'b' → one key, else 401."""
    who = request.headers.get("x-who")
    return {"admin": ALL_KEYS, "a": [KEY_A], "b": [str(KEY_B)], "nobody": []}.get(who or "")


def starlette_app(store: UsageStore, **options: Any) -> Starlette:
    options.setdefault("authorize", header_authorize)
    return Starlette(routes=[Mount("/api/usage", UsageRouter(store, today=fixed_today, **options))])


def seed(store: UsageStore) -> None:
    """Two keys' uploads and requests on 2025-03-10 (UTC), plus one keyless upload."""
    at = datetime(2025, 3, 10, 12, tzinfo=UTC)
    store.write(
        [
            UploadRecord(
                api_key_id=KEY_A,
                provider="s3",
                file_type="image/png",
                file_size=100,
                uploaded_at=at,
            ),
            UploadRecord(
                api_key_id=KEY_A,
                provider="vercel",
                file_type="application/pdf",
                file_size=50,
                upload_status="failed",
                uploaded_at=at,
            ),
            UploadRecord(
                api_key_id=KEY_B, provider="s3", file_type="image/jpeg", file_size=7, uploaded_at=at
            ),
            UploadRecord(
                api_key_id=None, provider="r2", file_type="image/jpeg", file_size=1, uploaded_at=at
            ),
            RequestRecord(
                api_key_id=KEY_A,
                method="POST",
                path="/f",
                status_code=201,
                response_time_ms=10.0,
                request_size=1,
                response_size=1,
                requested_at=at,
            ),
            RequestRecord(
                api_key_id=KEY_A,
                method="POST",
                path="/f",
                status_code=413,
                response_time_ms=30.0,
                request_size=1,
                response_size=1,
                requested_at=at,
            ),
            RequestRecord(
                api_key_id=KEY_B,
                method="GET",
                path="/f",
                status_code=200,
                response_time_ms=5.0,
                request_size=0,
                response_size=1,
                requested_at=at,
            ),
        ]
    )


@pytest.fixture
def seeded(store: UsageStore) -> UsageStore:
    seed(store)
    return store


RANGE = {"start": "2025-03-01", "end": "2025-03-31"}


def test_router_without_authorize_is_refused_unless_public(store: UsageStore) -> None:
    """Forgetting authorize is a configuration error; public=True is the explicit opt-out."""
    with pytest.raises(ConfigurationError, match="authorize"):
        UsageRouter(store)
    app = Starlette(routes=[Mount("/u", UsageRouter(store, public=True))])
    assert call(app, "/u/granular", RANGE).status_code == 200


def test_authorize_none_is_401_and_may_be_async(seeded: UsageStore) -> None:
    """authorize returning None gives 401 JSON; an async authorize is awaited."""

    async def deny(request: Request) -> None:
        return None

    async def allow(request: Request) -> Any:
        return [KEY_A]

    for path in ("/api/usage/granular", "/api/usage/history", "/api/usage/health"):
        r = call(starlette_app(seeded, authorize=deny), path, RANGE)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "unauthorized"
    r = call(starlette_app(seeded, authorize=allow), "/api/usage/granular", RANGE)
    assert r.json()["totals"]["uploads"] == 2


def test_tenants_see_only_their_own_keys(seeded: UsageStore) -> None:
    """Each caller's numbers cover exactly its keys; ALL_KEYS covers everything."""
    app = starlette_app(seeded)
    a = call(app, "/api/usage/granular", RANGE, {"x-who": "a"}).json()
    b = call(app, "/api/usage/granular", RANGE, {"x-who": "b"}).json()
    admin = call(app, "/api/usage/granular", RANGE, {"x-who": "admin"}).json()
    assert a["totals"] == {"uploads": 2, "bytes": 150, "successful": 1, "failed": 1}
    assert {p["provider"] for p in a["providers"]} == {"s3", "vercel"}
    assert a["requests"]["total"] == 2 and a["requests"]["errors"] == 1
    assert b["totals"] == {"uploads": 1, "bytes": 7, "successful": 1, "failed": 0}
    assert b["requests"]["total"] == 1
    assert admin["totals"]["uploads"] == 4
    assert admin["requests"]["total"] == 3


def test_api_key_id_narrows_inside_scope_and_403_outside(seeded: UsageStore) -> None:
    """api_key_id inside the caller's scope narrows; outside it is 403."""
    app = starlette_app(seeded)
    narrowed = call(
        app, "/api/usage/granular", {**RANGE, "api_key_id": str(KEY_B)}, {"x-who": "admin"}
    )
    assert narrowed.json()["totals"]["uploads"] == 1
    denied = call(app, "/api/usage/granular", {**RANGE, "api_key_id": str(KEY_B)}, {"x-who": "a"})
    assert denied.status_code == 403
    assert denied.json()["error"]["parameter"] == "api_key_id"


def test_empty_scope_gives_zeros(seeded: UsageStore) -> None:
    """A caller allowed no keys gets a zero-filled answer, not someone else's data."""
    body = call(starlette_app(seeded), "/api/usage/granular", RANGE, {"x-who": "nobody"}).json()
    assert body["totals"] == {"uploads": 0, "bytes": 0, "successful": 0, "failed": 0}
    assert len(body["series"]) == 31 and all(e["uploads"] == 0 for e in body["series"])
    assert body["file_types"] == [] and body["providers"] == []
    assert body["requests"] == {
        "total": 0,
        "errors": 0,
        "avg_response_ms": 0.0,
        "p95_response_ms": 0.0,
    }


def test_granular_response_shape(seeded: UsageStore) -> None:
    """The answer has its documented keys, a zero-filled series and shares summing to 100."""
    body = call(
        starlette_app(seeded),
        "/api/usage/granular",
        {**RANGE, "granularity": "week"},
        {"x-who": "admin"},
    ).json()
    assert body["range"] == {
        "start": "2025-03-01",
        "end": "2025-03-31",
        "tz": "UTC",
        "granularity": "week",
    }
    assert [e["period"] for e in body["series"]] == [
        "2025-03-01",
        "2025-03-03",
        "2025-03-10",
        "2025-03-17",
        "2025-03-24",
        "2025-03-31",
    ]
    assert [e["uploads"] for e in body["series"]] == [0, 0, 4, 0, 0, 0]
    assert [(f["file_type"], f["uploads"]) for f in body["file_types"]] == [
        ("image/jpeg", 2),
        ("application/pdf", 1),
        ("image/png", 1),
    ]
    assert sum(f["percentage"] for f in body["file_types"]) == pytest.approx(100)
    assert [f["percentage"] for f in body["providers"]] == [50.0, 25.0, 25.0]
    assert body["requests"]["avg_response_ms"] == pytest.approx(15.0)


def test_breakdown_and_history_endpoints(seeded: UsageStore) -> None:
    """/file-types, /providers and /history return the breakdowns alone, filtered alike."""
    app = starlette_app(seeded)
    params = {**RANGE, "file_type": "image/*"}
    ft = call(app, "/api/usage/file-types", params, {"x-who": "admin"}).json()
    assert [f["file_type"] for f in ft["file_types"]] == ["image/jpeg", "image/png"]
    assert "providers" not in ft
    pv = call(
        app, "/api/usage/providers", {**RANGE, "provider": ["s3", "r2"]}, {"x-who": "admin"}
    ).json()
    assert {p["provider"]: p["uploads"] for p in pv["providers"]} == {"s3": 2, "r2": 1}
    history = call(app, "/api/usage/history", RANGE, {"x-who": "a"}).json()
    assert history == [
        {"provider": "s3", "total_uploads": 1, "total_size": 100},
        {"provider": "vercel", "total_uploads": 1, "total_size": 50},
    ]


def test_file_type_family_matches_prefix_literally(store: UsageStore) -> None:
    """A family filter is a literal prefix: LIKE wildcards in the value match nothing extra."""
    at = datetime(2025, 3, 10, tzinfo=UTC)
    store.write(
        [
            UploadRecord(api_key_id=KEY_A, provider="s3", file_type=t, file_size=1, uploaded_at=at)
            for t in ("image/png", "imagex/png", "im%ge/png", "video/mp4")
        ]
    )
    app = starlette_app(store)
    for value, expected in (
        ("image/*", {"image/png"}),
        ("im%ge/*", {"im%ge/png"}),
        ("im_ge/*", set()),
        ("IMAGE/PNG", {"image/png"}),
    ):
        body = call(
            app, "/api/usage/file-types", {**RANGE, "file_type": value}, {"x-who": "a"}
        ).json()
        assert {f["file_type"] for f in body["file_types"]} == expected, value


@pytest.mark.parametrize(
    ("params", "code", "parameter"),
    [
        ({"start": "2025-13-01", "end": "2025-12-31"}, "invalid_date", "start"),
        ({"start": "yesterday", "end": "2025-12-31"}, "invalid_date", "start"),
        ({"start": "2025-03-02", "end": "2025-03-01"}, "invalid_range", "end"),
        ({"start": "2025-03-02"}, "missing_parameter", "end"),
        ({"range": "fortnight"}, "invalid_range", "range"),
        ({"range": "7d", "start": "2025-03-01"}, "conflicting_parameters", "range"),
        ({"range": "7d", "tz": "Mars/Olympus_Mons"}, "invalid_tz", "tz"),
        ({"range": "7d", "tz": "../../etc/passwd"}, "invalid_tz", "tz"),
        ({"range": "7d", "granularity": "minute"}, "invalid_granularity", "granularity"),
        ({"start": "2024-01-01", "end": "2025-12-31"}, "range_too_long", "end"),
        ({"range": "90d", "granularity": "hour"}, "range_too_long", "granularity"),
        ({"range": "7d", "api_key_id": "not-a-uuid"}, "invalid_api_key_id", "api_key_id"),
        ({"range": "7d", "provider": [f"p{i}" for i in range(51)]}, "too_many_values", "provider"),
        ({"range": ["7d", "30d"]}, "repeated_parameter", "range"),
    ],
)
def test_bad_parameters_are_400_with_code_and_parameter(
    seeded: UsageStore, params: dict[str, Any], code: str, parameter: str
) -> None:
    """Each kind of bad input gets a 400 naming the code and the offending parameter."""
    r = call(starlette_app(seeded), "/api/usage/granular", params, {"x-who": "admin"})
    assert r.status_code == 400
    error = r.json()["error"]
    assert (error["code"], error["parameter"]) == (code, parameter)
    assert error["message"]


def test_limits_are_configurable(seeded: UsageStore) -> None:
    """max_range_days and max_filter_values bound what a query may ask for."""
    app = starlette_app(seeded, max_range_days=7, max_filter_values=2)
    assert call(app, "/api/usage/granular", {"range": "7d"}, {"x-who": "a"}).status_code == 200
    too_long = call(app, "/api/usage/granular", {"range": "30d"}, {"x-who": "a"})
    assert too_long.json()["error"]["code"] == "range_too_long"
    too_many = call(
        app,
        "/api/usage/granular",
        {"range": "7d", "file_type": ["a/b", "c/d", "e/f"]},
        {"x-who": "a"},
    )
    assert too_many.json()["error"] == {
        "code": "too_many_values",
        "message": "at most 2 file_type values are allowed, got 3",
        "parameter": "file_type",
    }
    with pytest.raises(ConfigurationError, match="max_range_days"):
        UsageRouter(seeded, public=True, max_range_days=0)


@pytest.mark.parametrize(
    ("preset", "start", "end", "granularity"),
    [
        ("today", "2025-03-15", "2025-03-15", "hour"),
        ("7d", "2025-03-09", "2025-03-15", "day"),
        ("30d", "2025-02-14", "2025-03-15", "day"),
        ("90d", "2024-12-16", "2025-03-15", "day"),
        ("12m", "2024-03-16", "2025-03-15", "week"),
        ("this_month", "2025-03-01", "2025-03-15", "day"),
        ("last_month", "2025-02-01", "2025-02-28", "day"),
    ],
)
def test_presets_end_today_in_the_time_zone(
    store: UsageStore, preset: str, start: str, end: str, granularity: str
) -> None:
    """Presets resolve against today's date in tz and pick a granularity from the length."""
    body = call(
        starlette_app(store),
        "/api/usage/granular",
        {"range": preset, "tz": "Asia/Kathmandu"},
        {"x-who": "a"},
    ).json()
    assert body["range"] == {
        "start": start,
        "end": end,
        "tz": "Asia/Kathmandu",
        "granularity": granularity,
    }


def test_default_range_is_last_30_days(store: UsageStore) -> None:
    """Without start/end/range the router answers the 30 days ending today."""
    body = call(starlette_app(store), "/api/usage/granular", None, {"x-who": "a"}).json()
    assert (body["range"]["start"], body["range"]["end"]) == ("2025-02-14", "2025-03-15")


def test_router_marks_its_requests_excluded(store: UsageStore) -> None:
    """Every request through the router sets the scope flag the capture middleware honours."""
    seen: list[Any] = []

    def outer(app: ASGIApp) -> ASGIApp:
        async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
            async def spy(message: Message) -> None:
                if message["type"] == "http.response.start":
                    seen.append((scope["path"], scope.get("usage_middleware.excluded")))
                await send(message)

            await app(scope, receive, spy)

        return wrapped

    app = outer(starlette_app(store))
    for path in ("/api/usage/", "/api/usage/granular", "/api/usage/nope"):
        call(app, path, None, {"x-who": "a"})
    assert seen == [("/api/usage/", True), ("/api/usage/granular", True), ("/api/usage/nope", True)]


def test_fastapi_mount_serves_api_and_dashboard(seeded: UsageStore) -> None:
    """Mounted in FastAPI the router answers /granular and serves the dashboard page at /."""
    app = FastAPI()
    app.mount("/api/usage", UsageRouter(seeded, authorize=header_authorize, today=fixed_today))
    r = call(app, "/api/usage/granular", RANGE, {"x-who": "b"})
    assert r.status_code == 200 and r.json()["totals"]["uploads"] == 1
    page = call(app, "/api/usage/", None, {"x-who": "b"})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")


def test_health_reports_database_and_recorders(store: UsageStore) -> None:
    """/health says the database answers and lists every attached recorder's stats."""
    recorder = Recorder(store, spool_path=":memory:")
    body = call(starlette_app(store), "/api/usage/health", None, {"x-who": "admin"}).json()
    assert body["status"] == "ok" and body["database"] == "ok"
    assert len(body["recorders"]) == 1
    assert body["recorders"][0]["written"] == 0
    recorder.shutdown(timeout=1)


def test_health_details_are_for_all_keys_callers_only(store: UsageStore) -> None:
    """A tenant (key-scoped caller) gets 403 with none of the process details an ALL_KEYS caller
    sees (recorder counters, pid, spool path, database host and name); /health/live answers
    anyone, even callers authorize refuses, without details."""
    recorder = Recorder(store, spool_path=":memory:")
    try:
        app = starlette_app(store)
        admin = call(app, "/api/usage/health", None, {"x-who": "admin"})
        assert admin.status_code == 200
        stats = admin.json()["recorders"][0]
        assert stats["pid"] > 0 and "spool_path" in stats and "store" in stats
        for who in ("a", "b", "nobody"):
            tenant = call(app, "/api/usage/health", None, {"x-who": who})
            assert tenant.status_code == 403
            assert set(tenant.json()) == {"error"}
            assert tenant.json()["error"]["code"] == "forbidden"
            for detail in ("recorders", "pid", "spool", "written", str(stats["pid"])):
                assert detail not in tenant.text
        assert call(app, "/api/usage/health").status_code == 401
        for headers in (None, {"x-who": "a"}, {"x-who": "admin"}):
            live = call(app, "/api/usage/health/live", None, headers)
            assert live.status_code == 200 and live.json() == {"status": "ok"}
    finally:
        recorder.shutdown(timeout=1)


def test_health_authorize_decides_who_sees_health(store: UsageStore) -> None:
    """health_authorize (sync or async) replaces the default: True shows the details, False is
    403, None is 401, a raising hook a JSON 500."""

    async def ops_only(request: Request) -> bool | None:
        who = request.headers.get("x-ops")
        return None if who is None else who == "yes"

    app = starlette_app(store, health_authorize=ops_only)
    assert call(app, "/api/usage/health", None, {"x-ops": "yes"}).json()["database"] == "ok"
    assert call(app, "/api/usage/health", None, {"x-ops": "no", "x-who": "admin"}).status_code == (
        403
    )
    assert call(app, "/api/usage/health").status_code == 401

    def broken(request: Request) -> bool:
        raise RuntimeError("down")

    r = call(starlette_app(store, health_authorize=broken), "/api/usage/health")
    assert r.status_code == 500 and r.json()["error"]["code"] == "authorize_failed"


@pytest.fixture
def unreachable_pg() -> Iterator[UsageStore]:
    """A store whose PostgreSQL server does not exist (nothing listens on the port)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = UsageStore(f"postgresql+psycopg://postgres@127.0.0.1:{port}/x", connect_timeout=1)
    yield store
    store.dispose()


def test_database_down_is_503_json(unreachable_pg: UsageStore, tmp_path: Any) -> None:
    """An unreachable database answers 503 with a JSON error, never an HTML 500."""
    missing = UsageStore(f"sqlite:///{tmp_path}/no/such/dir/usage.db")
    for store in (unreachable_pg, missing):
        app = starlette_app(store)
        r = call(app, "/api/usage/granular", RANGE, {"x-who": "a"})
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "database_unavailable"
        health = call(app, "/api/usage/health", None, {"x-who": "admin"})
        assert health.status_code == 503 and health.json()["database"] == "unreachable"


@pytest.mark.postgres
def test_failed_query_is_503_and_the_pooled_connection_stays_transactional(pg_url: str) -> None:
    """A statement that fails on a live PostgreSQL connection answers 503; the connection goes
    back to the pool out of autocommit, so the writer that takes it next still gets one
    transaction per batch."""
    store = UsageStore(pg_url, engine_options={"pool_size": 1, "max_overflow": 0})
    try:
        seed(store)
        app = starlette_app(store)
        assert call(app, "/api/usage/granular", RANGE, {"x-who": "a"}).status_code == 200
        with store.engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE daily_usage RENAME TO daily_usage_away")
        r = call(app, "/api/usage/granular", RANGE, {"x-who": "a"})
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "database_unavailable"
        with store.engine.connect() as conn:  # the only pooled connection: the one that failed
            assert conn.connection.driver_connection.autocommit is False  # type: ignore[union-attr]
            conn.exec_driver_sql("CREATE TEMPORARY TABLE rolled_back (x int)")
            conn.rollback()
            assert conn.exec_driver_sql("SELECT to_regclass('rolled_back')").scalar() is None
            conn.exec_driver_sql("ALTER TABLE daily_usage_away RENAME TO daily_usage")
            conn.commit()
        assert call(app, "/api/usage/granular", RANGE, {"x-who": "a"}).status_code == 200
    finally:
        store.dispose()


@pytest.mark.postgres
@pytest.mark.parametrize("path", ["granular", "requests", "consumers"])
def test_a_failed_answer_waits_for_the_reads_it_started(
    pg_url: str, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When one read of an answer fails, the answer (a 503) comes only after the reads running
    beside it have finished: none outlives it holding a pooled connection, which it could
    otherwise hand back to a pool its store has disposed of (and never close)."""
    import threading
    import time as clock

    from usage_middleware._storage import _sqlread

    store = UsageStore(pg_url)
    try:
        seed(store)
        store.seal(datetime(2100, 1, 1, tzinfo=timezone.utc))  # requests read from rollups too
        with store.engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE daily_usage RENAME TO daily_usage_away")
            conn.exec_driver_sql("ALTER TABLE daily_request_usage RENAME TO daily_request_away")
        real = _sqlread._rows
        running = [0]
        lock = threading.Lock()

        def slow_rows(*args: Any) -> Any:
            with lock:
                running[0] += 1
            try:
                clock.sleep(0.3)
                return real(*args)
            finally:
                with lock:
                    running[0] -= 1

        monkeypatch.setattr(_sqlread, "_rows", slow_rows)
        year = {"start": "2025-01-01", "end": "2025-12-31"}
        r = call(starlette_app(store), f"/api/usage/{path}", year, {"x-who": "admin"})
        assert r.status_code == 503, r.text
        assert running[0] == 0
    finally:
        store.dispose()


def test_authorize_that_raises_gives_json_error(store: UsageStore) -> None:
    """A failing authorize hook answers a JSON 500 instead of crashing the app."""

    def broken(request: Request) -> Any:
        raise RuntimeError("session store down")

    r = call(starlette_app(store, authorize=broken), "/api/usage/granular", RANGE)
    assert r.status_code == 500 and r.json()["error"]["code"] == "authorize_failed"


PARAM_NAMES = [
    "start",
    "end",
    "range",
    "tz",
    "provider",
    "file_type",
    "api_key_id",
    "granularity",
    "x",
    # parameters of /failures and /export, and names no endpoint knows
    "limit",
    "cursor",
    "dataset",
    "format",
    "method",
    "route",
    "status",
]
VALUES = st.one_of(
    st.text(max_size=30),
    st.sampled_from(
        [
            "2025-03-01",
            "2025-02-29",
            "0001-01-01",
            "9999-12-31",
            "7d",
            "12m",
            "hour",
            "week",
            "America/New_York",
            "UTC",
            "image/*",
            "%",
            "_",
            "*/*",
            str(KEY_A),
            str(KEY_B),
            "\x00",
            "2025-3-1",
            "0",
            "1",
            "200",
            "201",
            "1000",
            "1001",
            "-5",
            "uploads",
            "requests",
            "csv",
            "ndjson",
            "GET",
            "2xx",
            "5xx",
            "404",
            "/files/{id}",
            "(unmatched)",
            "purge",
            "6xx",
            "99",
            "2XX",
            # a well-formed cursor (time, kind, id) and near misses
            "eyJ0IjoiMjAyNS0wMy0xMFQxMjowMDowMC4wMDAwMDArMDA6MDAiLCJrIjoidXBsb2FkIiwiaSI6IjAwMDAwMDAwMDAwMDQwMDA4MDAwMDAwMDAwMDAwMDBhIn0",
            "eyJ0IjoiMjAyNS0wMy0xMFQxMjowMDowMC4wMDAwMDArMDA6MDAiLCJrIjoidXBsb2FkIn0",
            "e30",
            "====",
        ]
    ),
)
# Endpoints the never-a-500 property covers: every one that reads a query string.
API_PATHS = [
    "/granular",
    "/file-types",
    "/providers",
    "/history",
    "/requests",
    "/consumers",
    "/failures",
    "/export",
]


@pytest.mark.slow
@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    pairs=st.lists(st.tuples(st.sampled_from(PARAM_NAMES), VALUES), max_size=6),
    raw=st.text(max_size=40),
    path=st.sampled_from(API_PATHS),
    who=st.sampled_from(["a", "admin"]),
)
def test_no_query_string_gives_a_500(
    seeded: UsageStore, pairs: list[tuple[str, str]], raw: str, path: str, who: str
) -> None:
    """Whatever the query string, every endpoint answers 200 or a JSON 4xx — never a 500."""
    app = starlette_app(seeded)
    query = "&".join(f"{quote(k)}={quote(v)}" for k, v in pairs)
    for qs in (query, quote(raw, safe="=&%+;")):
        r = call(app, f"/api/usage{path}?{qs}", None, {"x-who": who})
        assert r.status_code in (200, 400, 403), (qs, r.status_code, r.text)
        if r.status_code != 200:
            assert set(r.json()["error"]) == {"code", "message", "parameter"}


def test_query_strings_with_many_parameter_names_are_refused(seeded: UsageStore) -> None:
    """More than MAX_PARAMETER_NAMES distinct names is a 400 in the usual error shape, refused
    during the single pass that groups the values (8,000 names used to be grouped by one scan of
    the whole query per name: seconds on the event loop); up to the cap, known parameters work
    and unknown ones are ignored."""
    from usage_middleware._router import MAX_PARAMETER_NAMES

    app = starlette_app(seeded)
    known = {**RANGE, "provider": "s3", "granularity": "week"}
    filler = [f"x{i}" for i in range(MAX_PARAMETER_NAMES - len(known))]
    at_cap = "&".join([*(f"{k}={v}" for k, v in known.items()), *(f"{n}=1" for n in filler)])
    ok = call(app, f"/api/usage/granular?{at_cap}&provider=r2", None, {"x-who": "admin"})
    assert ok.status_code == 200
    assert ok.json()["range"]["granularity"] == "week"
    assert ok.json()["totals"]["uploads"] == 3  # s3 (KEY_A, KEY_B) and r2 (keyless)
    for extra in (1, 8_000):
        names = "&".join(f"y{i}=1" for i in range(extra))
        r = call(app, f"/api/usage/granular?{at_cap}&{names}", None, {"x-who": "admin"})
        assert r.status_code == 400
        assert r.json() == {
            "error": {
                "code": "too_many_parameters",
                "message": f"at most {MAX_PARAMETER_NAMES} distinct parameter names are allowed",
                "parameter": None,
            }
        }


def test_requests_block_ignores_upload_filters(seeded: UsageStore) -> None:
    """Provider and file type filters narrow uploads but not the API-request statistics."""
    body = call(
        starlette_app(seeded),
        "/api/usage/granular",
        {**RANGE, "provider": "nowhere"},
        {"x-who": "a"},
    ).json()
    assert body["totals"]["uploads"] == 0
    assert body["requests"]["total"] == 2


def test_series_of_a_day_outside_all_data_is_zero(seeded: UsageStore) -> None:
    """Days without rows appear with zeros; the series covers every day of the range."""
    body = call(
        starlette_app(seeded),
        "/api/usage/granular",
        {"start": "2025-03-09", "end": "2025-03-11"},
        {"x-who": "admin"},
    ).json()
    start = date(2025, 3, 9)
    assert [e["period"] for e in body["series"]] == [
        (start + timedelta(days=i)).isoformat() for i in range(3)
    ]
    assert [e["uploads"] for e in body["series"]] == [0, 4, 0]


def test_nul_in_filter_values_matches_stored_text(store: UsageStore) -> None:
    """A NUL in a filter value is normalised like stored text (PostgreSQL cannot hold NUL)."""
    store.write(
        [
            UploadRecord(
                api_key_id=KEY_A,
                provider="a\x00b",
                file_type="image/png",
                file_size=3,
                uploaded_at=datetime(2025, 3, 10, tzinfo=UTC),
            )
        ]
    )
    r = call(
        starlette_app(store),
        "/api/usage/providers",
        {**RANGE, "provider": "a\x00b"},
        {"x-who": "a"},
    )
    assert r.status_code == 200
    assert [p["uploads"] for p in r.json()["providers"]] == [1]
