"""``GET /requests`` and ``GET /consumers`` equal aggregating raw records in local time.

The properties compare the router's answers with plain Python over the records written — exact
counts and sums, percentiles within the stated sketch error of the exact nearest-rank value —
in zones with DST and :30/:45 offsets and +14:00, every granularity and filter kind, on memory,
SQLite and PostgreSQL. Then: tenant isolation for every parameter combination, labels from the
host's ``key_labels``, and the 400s of the new parameters.
"""

from __future__ import annotations

import math
import uuid
from collections import defaultdict
from datetime import date, datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Mount
from test_queries import (
    ANCHORS,
    PROVIDERS,
    TYPE_FILTERS,
    TYPES,
    ZONES,
    app_for,
    expected_labels,
    get,
    local_label,
    matches_type,
    shared_store,
    shared_stores,
)

from usage_middleware import RequestRecord, UploadRecord, UsageRouter, UsageStore
from usage_middleware._schema import ENDPOINT_RELATIVE_ERROR

__all__ = ["shared_store", "shared_stores"]  # fixtures used here

UTC = timezone.utc
STANDARD = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"}
METHODS = ["GET", "POST", "DELETE", "PURGE"]
PATHS = [("/files", True), ("/files/{id}", True), ("/wp-login.php", False), ("/.env", False)]
STATUSES = [200, 201, 302, 400, 404, 429, 500, 503]
STATUS_FILTERS = ["2xx", "3xx", "4xx", "5xx", "404", "500", "201"]


# --- the independent aggregation ---------------------------------------------------------------


def labels(r: RequestRecord) -> tuple[str, str]:
    return (r.method if r.method in STANDARD else "OTHER"), (
        r.path if r.route_matched else "(unmatched)"
    )


def status_matches(code: int, filters: list[str]) -> bool:
    if not filters:
        return True
    return any((f[0] == str(code)[0]) if f.endswith("xx") else code == int(f) for f in filters)


def nearest_rank(times: list[float], q: float) -> float:
    ordered = sorted(times)
    return ordered[math.ceil(q * len(ordered)) - 1]


def assert_close(got: float, exact: float) -> None:
    """A reported percentile is within the sketch's error of the exact one (1 µs floor)."""
    if exact <= 0.001:
        assert got == pytest.approx(0.001)
    else:
        assert abs(got - exact) <= ENDPOINT_RELATIVE_ERROR * exact + 1e-9, (got, exact)


def assert_latency(got: dict[str, Any], times: list[float], keys: tuple[str, ...]) -> None:
    if not times:
        assert all(got[k] == 0.0 for k in keys)
        return
    assert got["avg_response_ms"] == pytest.approx(sum(times) / len(times), abs=1e-3)
    for k in keys:
        if k != "avg_response_ms":
            q = int(k.split("_")[0][1:]) / 100
            assert_close(got[k], nearest_rank(times, q))


def assert_shares(rows: list[dict[str, Any]], total: int) -> None:
    if not rows:
        return
    assert sum(round(r["percentage"] * 100) for r in rows) == 10000
    for r in rows:
        assert abs(r["percentage"] - 100 * r["requests"] / total) <= 0.01 + 1e-9


def check_requests(body: dict[str, Any], s: dict[str, Any], inside: list[RequestRecord]) -> None:
    tz = ZoneInfo(s["tz_name"])
    granularity = body["range"]["granularity"]
    totals = body["totals"]
    times = [r.response_time_ms for r in inside]
    assert totals["requests"] == len(inside)
    assert totals["errors"] == sum(r.status_code >= 400 for r in inside)
    assert totals["client_errors"] == sum(400 <= r.status_code < 500 for r in inside)
    assert totals["server_errors"] == sum(r.status_code >= 500 for r in inside)
    assert totals["request_bytes"] == sum(r.request_size for r in inside)
    assert totals["response_bytes"] == sum(r.response_size for r in inside)
    assert_latency(
        totals, times, ("avg_response_ms", "p50_response_ms", "p95_response_ms", "p99_response_ms")
    )

    by_endpoint: dict[tuple[str, str], list[RequestRecord]] = defaultdict(list)
    by_status: dict[int, int] = defaultdict(int)
    by_period: dict[str, list[RequestRecord]] = defaultdict(list)
    for r in inside:
        by_endpoint[labels(r)].append(r)
        by_status[r.status_code] += 1
        by_period[local_label(r.requested_at, tz, s["start"], granularity)].append(r)
    got_endpoints = {(e["method"], e["route"]): e for e in body["endpoints"]}
    assert set(got_endpoints) == set(by_endpoint)
    assert [e["requests"] for e in body["endpoints"]] == sorted(
        (len(v) for v in by_endpoint.values()), reverse=True
    )
    for k, rows in by_endpoint.items():
        e = got_endpoints[k]
        errors = sum(r.status_code >= 400 for r in rows)
        assert (e["requests"], e["errors"]) == (len(rows), errors)
        assert e["error_rate"] == round(errors / len(rows), 4)
        assert e["request_bytes"] == sum(r.request_size for r in rows)
        assert e["response_bytes"] == sum(r.response_size for r in rows)
        assert_latency(
            e,
            [r.response_time_ms for r in rows],
            ("avg_response_ms", "p50_response_ms", "p95_response_ms", "p99_response_ms"),
        )
    assert_shares(body["endpoints"], len(inside))
    assert {c["status_code"]: c["requests"] for c in body["status_codes"]} == dict(by_status)
    assert_shares(body["status_codes"], len(inside))

    labels_in_order = expected_labels(tz, s["start"], s["end"], granularity)
    assert [p["period"] for p in body["series"]] == labels_in_order
    for p in body["series"]:
        rows = by_period.get(p["period"], [])
        assert p["requests"] == len(rows)
        assert p["errors"] == sum(r.status_code >= 400 for r in rows)
        assert_latency(
            p,
            [r.response_time_ms for r in rows],
            ("avg_response_ms", "p50_response_ms", "p95_response_ms"),
        )


# --- the property ------------------------------------------------------------------------------


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, Any]:
    tz_name = draw(st.sampled_from([*ZONES, "Pacific/Kiritimati"]))
    tz = ZoneInfo(tz_name)
    start = draw(st.sampled_from(ANCHORS)) + timedelta(days=draw(st.integers(-3, 2)))
    granularity = draw(st.sampled_from([None, "hour", "day", "week", "month"]))
    if granularity in ("hour", None):
        length = draw(st.integers(1, 3))
    else:
        length = draw(st.one_of(st.integers(1, 40), st.integers(60, 120)))
    end = start + timedelta(days=length - 1)
    keys = [uuid.uuid4(), uuid.uuid4()]
    lo = datetime(start.year, start.month, start.day, tzinfo=UTC) - timedelta(days=1)
    span = (length + 2) * 86400
    edges = [
        datetime(d.year, d.month, d.day, tzinfo=tz).astimezone(UTC) + timedelta(microseconds=us)
        for d in (start, end + timedelta(days=1))
        for us in (-1, 0, 1)
    ]
    instant = st.one_of(
        st.integers(0, span * 1000).map(lambda ms: lo + timedelta(milliseconds=ms)),
        st.sampled_from(edges),
    )

    def build(
        at: datetime,
        key: uuid.UUID | None,
        method: str,
        path: tuple[str, bool],
        status: int,
        ms: float,
        size: int,
    ) -> RequestRecord:
        return RequestRecord(
            api_key_id=key,
            method=method,
            path=path[0],
            route_matched=path[1],
            status_code=status,
            response_time_ms=ms,
            request_size=size,
            response_size=2 * size,
            requested_at=at,
        )

    requests = st.builds(
        build,
        instant,
        st.sampled_from([*keys, None]),
        st.sampled_from(METHODS),
        st.sampled_from(PATHS),
        st.sampled_from(STATUSES),
        st.one_of(st.floats(0.0, 60_000, allow_nan=False), st.sampled_from([0.0, 0.001, 250.0])),
        st.integers(0, 10**9),
    )
    uploads = st.builds(
        lambda at, key, provider, ft, size, ok: UploadRecord(
            api_key_id=key,
            provider=provider,
            file_type=ft,
            file_size=size,
            upload_status="success" if ok else "failed",
            uploaded_at=at,
        ),
        instant,
        st.sampled_from([*keys, None]),
        st.sampled_from(PROVIDERS),
        st.sampled_from(TYPES),
        st.integers(0, 10**9),
        st.booleans(),
    )
    return {
        "tz_name": tz_name,
        "start": start,
        "end": end,
        "granularity": granularity,
        "keys": keys,
        "narrow": draw(st.sampled_from([None, 0, 1])),
        "methods": draw(st.lists(st.sampled_from([*METHODS, "get", "other"]), max_size=2)),
        "routes": draw(
            st.lists(st.sampled_from(["/files", "/files/{id}", "(unmatched)"]), max_size=2)
        ),
        "statuses": draw(st.lists(st.sampled_from(STATUS_FILTERS), max_size=2)),
        "providers": draw(st.lists(st.sampled_from(PROVIDERS), max_size=2, unique=True)),
        "types": draw(st.lists(st.sampled_from(TYPE_FILTERS), max_size=2, unique=True)),
        "requests": draw(st.lists(requests, max_size=30)),
        "uploads": draw(st.lists(uploads, max_size=20)),
    }


def _params(s: dict[str, Any], extra: list[tuple[str, str]]) -> list[tuple[str, str]]:
    params = [
        ("start", s["start"].isoformat()),
        ("end", s["end"].isoformat()),
        ("tz", s["tz_name"]),
        *extra,
    ]
    if s.get("granularity"):
        params.append(("granularity", s["granularity"]))
    if s["narrow"] is not None:
        params.append(("api_key_id", str(s["keys"][s["narrow"]])))
    params += [("provider", p) for p in s["providers"]]
    params += [("file_type", t) for t in s["types"]]
    return params


@pytest.mark.slow
@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(scenario=scenarios())
def test_requests_and_consumers_equal_raw_aggregation_in_local_time(
    shared_store: UsageStore, scenario: dict[str, Any]
) -> None:
    s = scenario
    shared_store.write([*s["requests"], *s["uploads"]])
    keys = s["keys"]
    visible = keys if s["narrow"] is None else [keys[s["narrow"]]]
    tz = ZoneInfo(s["tz_name"])

    def in_range(t: datetime) -> bool:
        return s["start"] <= t.astimezone(tz).date() <= s["end"]

    methods = {m.upper() if m.upper() in STANDARD else "OTHER" for m in s["methods"]}
    inside = [
        r
        for r in s["requests"]
        if r.api_key_id in visible
        and in_range(r.requested_at)
        and (not methods or labels(r)[0] in methods)
        and (not s["routes"] or labels(r)[1] in s["routes"])
        and status_matches(r.status_code, s["statuses"])
    ]
    extra = [("method", m) for m in s["methods"]] + [("route", r) for r in s["routes"]]
    extra += [("status", x) for x in s["statuses"]]
    headers = {"x-keys": ",".join(map(str, keys))}
    app = app_for(shared_store)
    r = get(app, "/usage/requests", _params(s, extra), headers)
    assert r.status_code == 200, r.text
    body = r.json()
    check_requests(body, s, inside)
    ignored = [n for n, v in (("provider", s["providers"]), ("file_type", s["types"])) if v]
    assert body["ignored"] == ignored
    if not (s["methods"] or s["routes"] or s["statuses"]):
        # unfiltered totals read the histogram /granular reads: the same p95, within 2 %
        granular = get(app, "/usage/granular", _params(s, []), headers).json()["requests"]
        assert body["totals"]["p95_response_ms"] == granular["p95_response_ms"]
        if inside:
            exact = nearest_rank([r.response_time_ms for r in inside], 0.95)
            assert abs(body["totals"]["p95_response_ms"] - exact) <= 0.02 * exact + 0.001

    # /consumers over the same records: upload columns honour provider and type filters
    r = get(app, "/usage/consumers", _params(s, []), headers)
    assert r.status_code == 200, r.text
    want: dict[str, dict[str, Any]] = {}
    for key in visible:
        ups = [
            u
            for u in s["uploads"]
            if u.api_key_id == key
            and in_range(u.uploaded_at)
            and (not s["providers"] or u.provider in s["providers"])
            and matches_type(u.file_type, s["types"])
        ]
        reqs = [q for q in s["requests"] if q.api_key_id == key and in_range(q.requested_at)]
        if not ups and not reqs:
            continue
        seen = max([u.uploaded_at for u in ups] + [q.requested_at for q in reqs])
        want[str(key)] = {
            "api_key_id": str(key),
            "label": None,
            "uploads": len(ups),
            "bytes": sum(u.file_size for u in ups),
            "failed_uploads": sum(u.upload_status == "failed" for u in ups),
            "requests": len(reqs),
            "errors": sum(q.status_code >= 400 for q in reqs),
            "last_seen": seen.isoformat(),
        }
    got = r.json()["consumers"]
    assert {c["api_key_id"]: c for c in got} == want
    assert [c["uploads"] for c in got] == sorted((c["uploads"] for c in got), reverse=True)


# --- examples ----------------------------------------------------------------------------------

AT = datetime(2025, 6, 10, 12, tzinfo=UTC)
RANGE = {"start": "2025-06-01", "end": "2025-06-30"}


def _req(key: uuid.UUID | None, **kw: Any) -> RequestRecord:
    base: dict[str, Any] = {
        "api_key_id": key,
        "method": "POST",
        "path": "/files",
        "status_code": 201,
        "response_time_ms": 12.0,
        "requested_at": AT,
    }
    base.update(kw)
    return RequestRecord(**base)


def test_requests_answer_shape_and_labels(store: UsageStore) -> None:
    key = uuid.uuid4()
    store.write(
        [
            _req(key),
            _req(key, status_code=500, response_time_ms=300.0),
            _req(key, method="PURGE", path="/cache"),
            *(
                _req(key, method="GET", path=f"/probe/{i}", route_matched=False, status_code=404)
                for i in range(50)
            ),
        ]
    )
    body = get(app_for(store), "/usage/requests", RANGE, {"x-keys": str(key)}).json()
    assert set(body) == {"range", "totals", "series", "endpoints", "status_codes", "ignored"}
    assert body["totals"]["requests"] == 53
    assert body["totals"]["client_errors"] == 50 and body["totals"]["server_errors"] == 1
    endpoints = {(e["method"], e["route"]): e["requests"] for e in body["endpoints"]}
    # fifty random paths that matched no route share one label; a non-standard method another
    assert endpoints == {("GET", "(unmatched)"): 50, ("POST", "/files"): 2, ("OTHER", "/cache"): 1}
    assert body["endpoints"][0]["error_rate"] == 1.0
    assert [c["status_code"] for c in body["status_codes"]] == [404, 201, 500]
    assert body["ignored"] == []
    only = get(
        app_for(store),
        "/usage/requests",
        {**RANGE, "status": "5xx", "provider": "s3"},
        {"x-keys": str(key)},
    ).json()
    assert only["totals"]["requests"] == 1 and only["ignored"] == ["provider"]
    assert only["endpoints"][0]["p50_response_ms"] == pytest.approx(300.0, rel=0.1)


def test_no_parameter_reads_another_keys_requests_or_consumers(store: UsageStore) -> None:
    """A caller scoped to one key sees the same answers whatever another key wrote, and no
    parameter reaches that key's rows or its label."""
    mine, theirs = uuid.uuid4(), uuid.uuid4()
    store.write([_req(mine), _req(mine, status_code=404)])

    def labels_for(ids: list[uuid.UUID]) -> dict[uuid.UUID, str]:
        return {mine: "Mine Ltd", theirs: "Theirs Inc"}

    def authorize(request: Request) -> list[uuid.UUID]:
        return [mine]

    app = Starlette(
        routes=[Mount("/usage", UsageRouter(store, authorize=authorize, key_labels=labels_for))]
    )
    queries: list[dict[str, str]] = [
        RANGE,
        {**RANGE, "status": "4xx"},
        {**RANGE, "method": "POST", "route": "/files"},
        {**RANGE, "tz": "Pacific/Kiritimati"},
        {**RANGE, "api_key_id": str(mine)},
    ]
    before = {
        (path, tuple(q.items())): get(app, f"/usage/{path}", q).json()
        for path in ("requests", "consumers")
        for q in queries
    }
    store.write([_req(theirs, status_code=s) for s in (200, 404, 500)] + [_req(None)])
    store.write(
        [
            UploadRecord(
                api_key_id=theirs, provider="s3", file_type="image/png", file_size=5, uploaded_at=AT
            )
        ]
    )
    for (path, q), answer in before.items():
        assert get(app, f"/usage/{path}", dict(q)).json() == answer
    consumers = before["consumers", tuple(RANGE.items())]["consumers"]
    assert consumers == [
        {
            "api_key_id": str(mine),
            "label": "Mine Ltd",
            "uploads": 0,
            "bytes": 0,
            "failed_uploads": 0,
            "requests": 2,
            "errors": 1,
            "last_seen": AT.isoformat(),
        }
    ]
    for path in ("requests", "consumers"):
        r = get(app, f"/usage/{path}", {**RANGE, "api_key_id": str(theirs)})
        assert r.status_code == 403 and "Theirs" not in r.text


def test_key_labels_may_be_async_and_may_fail(store: UsageStore) -> None:
    key = uuid.uuid4()
    store.write([_req(key)])

    async def named(ids: list[uuid.UUID]) -> dict[str, Any]:
        return {str(i).upper(): "Acme" for i in ids} | {"not-a-key": "x"}

    def broken(ids: list[uuid.UUID]) -> dict[str, str]:
        raise RuntimeError("directory down")

    for hook, label in ((named, "Acme"), (broken, None)):
        app = Starlette(routes=[Mount("/u", UsageRouter(store, public=True, key_labels=hook))])
        r = get(app, "/u/consumers", RANGE)
        assert r.status_code == 200
        assert r.json()["consumers"][0]["label"] == label


def test_consumers_limit_and_order(store: UsageStore) -> None:
    keys = [uuid.uuid4() for _ in range(4)]
    for n, key in enumerate(keys):
        store.write(
            [
                UploadRecord(
                    api_key_id=key,
                    provider="s3",
                    file_type="image/png",
                    file_size=1,
                    uploaded_at=AT,
                )
                for _ in range(n)
            ]
        )
    store.write([_req(keys[0])])
    app = Starlette(routes=[Mount("/u", UsageRouter(store, public=True))])
    body = get(app, "/u/consumers", {**RANGE, "limit": "2"}).json()
    assert [c["api_key_id"] for c in body["consumers"]] == [str(keys[3]), str(keys[2])]
    assert body["more"] is True
    body = get(app, "/u/consumers", RANGE).json()
    assert [c["api_key_id"] for c in body["consumers"]][-1] == str(keys[0])
    assert body["more"] is False


@pytest.mark.parametrize(
    ("path", "params", "parameter", "code"),
    [
        ("/requests", {"status": "6xx"}, "status", "invalid_status"),
        ("/requests", {"status": "99"}, "status", "invalid_status"),
        ("/requests", {"status": "2x"}, "status", "invalid_status"),
        ("/requests", {"method": "x" * 600}, "method", "invalid_value"),
        ("/consumers", {"limit": "0"}, "limit", "invalid_limit"),
        ("/consumers", {"limit": "1001"}, "limit", "invalid_limit"),
        ("/consumers", {"limit": "ten"}, "limit", "invalid_limit"),
    ],
)
def test_bad_parameters_are_json_400s(
    store: UsageStore, path: str, params: dict[str, str], parameter: str, code: str
) -> None:
    app = Starlette(routes=[Mount("/u", UsageRouter(store, public=True))])
    r = get(app, f"/u{path}", {**RANGE, **params})
    assert r.status_code == 400
    assert r.json()["error"]["parameter"] == parameter
    assert r.json()["error"]["code"] == code


def test_too_many_status_values_are_a_400(store: UsageStore) -> None:
    app = Starlette(routes=[Mount("/u", UsageRouter(store, public=True, max_filter_values=2))])
    r = get(app, "/u/requests", [*RANGE.items(), *(("status", s) for s in ("2xx", "4xx", "5xx"))])
    assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_values"


def test_an_empty_scope_gives_zeros(store: UsageStore) -> None:
    store.write([_req(uuid.uuid4())])
    body = get(app_for(store), "/usage/requests", RANGE, {"x-keys": ""}).json()
    assert body["totals"]["requests"] == 0 and body["endpoints"] == []
    assert len(body["series"]) == 30
    assert get(app_for(store), "/usage/consumers", RANGE, {"x-keys": ""}).json()["consumers"] == []


def test_memory_store_caps_routes_per_key_day() -> None:
    """Past the daily cap, new named routes are grouped as ``(other)`` — counted, not dropped."""
    from usage_middleware._schema import ROUTES_PER_KEY_DAY

    store = UsageStore("memory://")
    key = uuid.uuid4()
    n = ROUTES_PER_KEY_DAY + 30
    store.write([_req(key, path=f"/r/{i:04d}") for i in range(n)])
    app = Starlette(routes=[Mount("/u", UsageRouter(store, public=True))])
    body = get(app, "/u/requests", RANGE).json()
    routes = {e["route"]: e["requests"] for e in body["endpoints"]}
    assert len(routes) == ROUTES_PER_KEY_DAY + 1 and routes["(other)"] == 30
    assert body["totals"]["requests"] == n
    # the next day starts a new allowance
    store.write([_req(key, path="/r/9999", requested_at=AT + timedelta(days=1))])
    later = get(app, "/u/requests", {"start": "2025-06-11", "end": "2025-06-11"}).json()
    assert [e["route"] for e in later["endpoints"]] == ["/r/9999"]
    assert date(2025, 6, 11) == (AT + timedelta(days=1)).date()
