"""``GET /failures``: paging through every page yields exactly the failed rows, newest first.

The expectation is computed here in plain Python from the records written (a failed upload has
``upload_status == "failed"``, a failed request status >= 400 or an error message), over local
ranges in zones with DST and :30/:45 offsets, on memory, SQLite and PostgreSQL. Rows written
between two pages must neither shift nor repeat a page. Other tests: a key outside the caller's
scope never shows up (in items, counts or through a cursor), malformed cursors and limits are the
usual JSON 400, and the answer says when its range reaches past raw-row retention.
"""

from __future__ import annotations

import base64
import json
import uuid
from datetime import date, datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import insert
from test_queries import ANCHORS, ZONES, app_for, get, shared_store, shared_stores

from usage_middleware import RequestRecord, UploadRecord, UsageStore
from usage_middleware._schema import usage_retention

__all__ = ["shared_store", "shared_stores"]  # fixtures used here

UTC = timezone.utc
PROVIDERS = ["s3", "r2"]
TYPES = ["image/png", "application/pdf"]


def failed_upload(u: UploadRecord) -> bool:
    return u.upload_status == "failed"


def failed_request(r: RequestRecord) -> bool:
    return r.status_code >= 400 or r.error_message is not None


def expected_items(
    uploads: list[UploadRecord],
    requests: list[RequestRecord],
    tz: ZoneInfo,
    start: date,
    end: date,
    providers: list[str],
    types: list[str],
) -> list[tuple[Any, ...]]:
    """(at, kind, id) of every failure in the local range, newest first; at one instant
    uploads before requests, then ids descending."""

    def inside(t: datetime) -> bool:
        return start <= t.astimezone(tz).date() <= end

    out = [
        (u.uploaded_at, "upload", u.id)
        for u in uploads
        if failed_upload(u)
        and inside(u.uploaded_at)
        and (not providers or u.provider in providers)
        and (not types or u.file_type in types)
    ]
    if not providers and not types:  # such filters select uploads only
        out += [(r.requested_at, "request", r.id) for r in requests if failed_request(r)]
        out = [x for x in out if inside(x[0])]
    return sorted(out, reverse=True)


def page_through(
    store: UsageStore, params: list[tuple[str, str]], keys: str, limit: int, between: Any = None
) -> tuple[list[dict[str, Any]], int]:
    """Every item of every page (calling ``between(page_number)`` after each page)."""
    items: list[dict[str, Any]] = []
    cursor = None
    pages = 0
    app = app_for(store)
    while True:
        query = [*params, ("limit", str(limit))] + ([("cursor", cursor)] if cursor else [])
        r = get(app, "/usage/failures", query, {"x-keys": keys})
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["items"]) <= limit
        items += body["items"]
        pages += 1
        cursor = body["next"]
        if between is not None:
            between(pages)
        if cursor is None:
            return items, pages
        assert len(body["items"]) == limit  # a short page is the last one
        assert pages < 1000


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, Any]:
    tz_name = draw(st.sampled_from(ZONES))
    tz = ZoneInfo(tz_name)
    start = draw(st.sampled_from(ANCHORS)) + timedelta(days=draw(st.integers(-2, 2)))
    end = start + timedelta(days=draw(st.integers(0, 3)))
    keys = [uuid.uuid4(), uuid.uuid4()]
    lo = datetime(start.year, start.month, start.day, tzinfo=UTC) - timedelta(days=1)
    edges = [
        datetime(d.year, d.month, d.day, tzinfo=tz).astimezone(UTC) + timedelta(microseconds=us)
        for d in (start, end + timedelta(days=1))
        for us in (-1, 0, 1)
    ]
    anywhere = st.one_of(
        st.integers(0, (end - start).days * 24 + 72).map(lambda h: lo + timedelta(hours=h)),
        st.sampled_from(edges),
    )
    # few distinct instants, so that ties (same time, both kinds) fall on page boundaries
    instant = st.sampled_from(draw(st.lists(anywhere, min_size=1, max_size=5)))
    uploads = st.builds(
        lambda at, key, provider, ft, ok: UploadRecord(
            api_key_id=key,
            provider=provider,
            file_type=ft,
            file_size=1,
            upload_status="success" if ok else "failed",
            error_message=None if ok else "storage said no",
            uploaded_at=at,
        ),
        instant,
        st.sampled_from(keys),
        st.sampled_from(PROVIDERS),
        st.sampled_from(TYPES),
        st.booleans(),
    )
    requests = st.builds(
        lambda at, key, status, message: RequestRecord(
            api_key_id=key,
            method="POST",
            path="/files/{id}",
            status_code=status,
            response_time_ms=1.0,
            request_size=1,
            response_size=1,
            error_message=message,
            requested_at=at,
        ),
        instant,
        st.sampled_from(keys),
        st.sampled_from([200, 302, 404, 500]),
        st.sampled_from([None, None, "ValueError: boom"]),
    )
    return {
        "tz_name": tz_name,
        "start": start,
        "end": end,
        "keys": keys,
        "narrow": draw(st.sampled_from([None, 0])),
        "providers": draw(st.lists(st.sampled_from(PROVIDERS), max_size=1)),
        "types": draw(st.lists(st.sampled_from(TYPES), max_size=1)),
        "limit": draw(st.integers(1, 7)),
        "uploads": draw(st.lists(uploads, max_size=25)),
        "requests": draw(st.lists(requests, max_size=25)),
        "late": draw(st.lists(st.one_of(uploads, requests), max_size=6)),
    }


@pytest.mark.slow
@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(scenario=scenarios())
def test_pages_hold_exactly_the_failures_newest_first(
    shared_store: UsageStore, scenario: dict[str, Any]
) -> None:
    """All pages together are the failed rows of the local range, scope and filters, in
    (time, kind, id) descending order, without duplicates or gaps, even when rows are written
    between pages (those that sort after the current page appear; none is repeated)."""
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
    def write_late(page: int) -> None:
        if page == 1 and s["late"]:
            shared_store.write(s["late"])

    limit = s["limit"]
    items, _ = page_through(shared_store, params, ",".join(map(str, keys)), limit, write_late)
    tz = ZoneInfo(s["tz_name"])
    late_uploads = [r for r in s["late"] if isinstance(r, UploadRecord)]
    late_requests = [r for r in s["late"] if isinstance(r, RequestRecord)]
    before = expected_items(
        [r for r in s["uploads"] if r.api_key_id in visible],
        [r for r in s["requests"] if r.api_key_id in visible],
        tz, s["start"], s["end"], s["providers"], s["types"],
    )  # fmt: skip
    after = expected_items(
        [r for r in [*s["uploads"], *late_uploads] if r.api_key_id in visible],
        [r for r in [*s["requests"], *late_requests] if r.api_key_id in visible],
        tz, s["start"], s["end"], s["providers"], s["types"],
    )  # fmt: skip
    # page 1 was read before the late rows were written; later pages hold every row (late
    # ones included) that sorts after page 1's last item: keyset pages neither shift nor repeat
    if len(before) <= limit:
        want = before
    else:
        want = before[:limit] + [x for x in after if x < before[limit - 1]]
    got = [(datetime.fromisoformat(i["at"]), i["kind"]) for i in items]
    assert got == [x[:2] for x in want]
    assert {i["api_key_id"] for i in items} <= {str(k) for k in visible}
    for i in items:
        if i["kind"] == "upload":
            assert i["method"] is None and i["provider"] in PROVIDERS
            assert i["error_message"] == "storage said no"
        else:
            assert i["route"] == "/files/{id}" and i["provider"] is None


def _write_failures(store: UsageStore, key: uuid.UUID, n: int, at: datetime) -> None:
    store.write(
        [
            RequestRecord(
                api_key_id=key,
                method="GET",
                path="/r",
                status_code=500,
                response_time_ms=1.0,
                request_size=0,
                response_size=0,
                requested_at=at + timedelta(seconds=i),
            )
            for i in range(n)
        ]
        + [
            UploadRecord(
                api_key_id=key,
                provider="s3",
                file_type="image/png",
                file_size=1,
                upload_status="failed",
                uploaded_at=at + timedelta(seconds=i),
            )
            for i in range(n)
        ]
    )


RANGE = [("start", "2025-03-01"), ("end", "2025-03-31")]
AT = datetime(2025, 3, 10, 12, tzinfo=UTC)


def test_exact_order_and_ids_with_ties_in_one_page_and_many(store: UsageStore) -> None:
    """Identical times: uploads before requests, ids descending; pages of 1 give the same list."""
    key = uuid.uuid4()
    records: list[Any] = []
    for kind in ("upload", "request"):
        for _ in range(3):
            if kind == "upload":
                records.append(
                    UploadRecord(
                        api_key_id=key, provider="s3", file_type="image/png", file_size=1,
                        upload_status="failed", uploaded_at=AT,
                    )
                )  # fmt: skip
            else:
                records.append(
                    RequestRecord(
                        api_key_id=key, method="GET", path="/r", status_code=404,
                        response_time_ms=1.0, request_size=0, response_size=0, requested_at=AT,
                    )
                )  # fmt: skip
    store.write(records)
    want = sorted(((r.id, "upload" if isinstance(r, UploadRecord) else "request") for r in records),
                  key=lambda x: (x[1], x[0]), reverse=True)  # fmt: skip
    whole = get(app_for(store), "/usage/failures", RANGE, {"x-keys": str(key)}).json()
    assert [i["kind"] for i in whole["items"]] == [k for _, k in want]
    items, pages = page_through(store, RANGE, str(key), 1)
    assert pages == 6
    assert items == whole["items"]


def test_a_key_outside_the_scope_never_appears(store: UsageStore) -> None:
    """Another key's failures are not in any page, and a cursor made from another key's row
    (or any forged position) only moves within the caller's own rows."""
    mine, theirs = uuid.uuid4(), uuid.uuid4()
    _write_failures(store, mine, 3, AT)
    _write_failures(store, theirs, 3, AT + timedelta(hours=1))
    app = app_for(store)
    items, _ = page_through(store, RANGE, str(mine), 2)
    assert len(items) == 6 and {i["api_key_id"] for i in items} == {str(mine)}
    # their newest row as a cursor position: still only my rows after it
    theirs_page = get(app, "/usage/failures", [*RANGE, ("limit", "1")], {"x-keys": str(theirs)})
    forged = theirs_page.json()["next"]
    r = get(app, "/usage/failures", [*RANGE, ("cursor", forged)], {"x-keys": str(mine)})
    assert r.status_code == 200
    assert {i["api_key_id"] for i in r.json()["items"]} == {str(mine)}
    far_future = _cursor({"t": "9998-01-01T00:00:00.000000+00:00", "k": "upload", "i": "f" * 32})
    r = get(app, "/usage/failures", [*RANGE, ("cursor", far_future)], {"x-keys": str(mine)})
    assert [i["api_key_id"] for i in r.json()["items"]] == [str(mine)] * 6
    # asking for their key is 403; an empty scope reads nothing
    r = get(app, "/usage/failures", [*RANGE, ("api_key_id", str(theirs))], {"x-keys": str(mine)})
    assert r.status_code == 403
    r = get(app, "/usage/failures", RANGE, {"x-keys": ""})
    assert r.status_code == 200 and r.json()["items"] == [] and r.json()["next"] is None


def _cursor(body: Any) -> str:
    raw = json.dumps(body).encode() if not isinstance(body, bytes) else body
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


BAD_CURSORS = [
    "abc",
    "!!!!",
    "a" * 500,
    _cursor(b"\xff\xfe"),
    _cursor(b"not json"),
    _cursor([1, 2, 3]),
    _cursor({"t": "2025-03-10T12:00:00.000000+00:00", "k": "upload"}),
    _cursor({"t": "2025-03-10T12:00:00.000000+00:00", "k": "job", "i": "0" * 32}),
    _cursor({"t": "2025-13-10T12:00:00.000000+00:00", "k": "upload", "i": "0" * 32}),
    _cursor({"t": "2025-03-10T12:00:00.000000+05:00", "k": "upload", "i": "0" * 32}),
    _cursor({"t": "9999-12-31T23:59:59.999999+00:00", "k": "upload", "i": "0" * 32}),
    _cursor({"t": "2025-03-10T12:00:00.000000+00:00", "k": "upload", "i": "xyz"}),
    _cursor({"t": 5, "k": "upload", "i": "0" * 32}),
    _cursor({"t": "2025-03-10T12:00:00.000000+00:00", "k": "upload", "i": "0" * 32, "x": 1}),
]


@pytest.mark.parametrize("cursor", BAD_CURSORS)
def test_a_malformed_cursor_is_a_json_400(store: UsageStore, cursor: str) -> None:
    r = get(app_for(store), "/usage/failures", [*RANGE, ("cursor", cursor)], {"x-keys": ""})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_cursor"
    assert r.json()["error"]["parameter"] == "cursor"


@pytest.mark.parametrize("limit", ["0", "201", "-1", "1.5", "ten", "99999999", "1e2"])
def test_a_limit_out_of_range_is_a_json_400(store: UsageStore, limit: str) -> None:
    r = get(app_for(store), "/usage/failures", [*RANGE, ("limit", limit)], {"x-keys": ""})
    assert r.status_code == 400
    assert r.json() == {
        "error": {
            "code": "invalid_limit",
            "message": r.json()["error"]["message"],
            "parameter": "limit",
        }
    }


def test_limit_defaults_to_50_and_allows_200(store: UsageStore) -> None:
    key = uuid.uuid4()
    _write_failures(store, key, 130, AT)  # 260 failures
    app = app_for(store)
    assert len(get(app, "/usage/failures", RANGE, {"x-keys": str(key)}).json()["items"]) == 50
    r = get(app, "/usage/failures", [*RANGE, ("limit", "200")], {"x-keys": str(key)})
    assert len(r.json()["items"]) == 200 and r.json()["next"] is not None


def test_provider_filters_list_uploads_only(store: UsageStore) -> None:
    key = uuid.uuid4()
    _write_failures(store, key, 2, AT)
    body = get(
        app_for(store), "/usage/failures", [*RANGE, ("provider", "s3")], {"x-keys": str(key)}
    ).json()
    assert body["kinds"] == ["upload"]
    assert [i["kind"] for i in body["items"]] == ["upload", "upload"]
    other = get(
        app_for(store), "/usage/failures", [*RANGE, ("provider", "r2")], {"x-keys": str(key)}
    ).json()
    assert other["items"] == []


def test_the_answer_says_when_the_range_reaches_past_retention(store: UsageStore) -> None:
    key = uuid.uuid4()
    _write_failures(store, key, 1, AT)
    app = app_for(store)
    body = get(app, "/usage/failures", RANGE, {"x-keys": str(key)}).json()
    assert body["retention_start"] is None and body["complete"] is True
    pruned_until = datetime(2025, 3, 5, tzinfo=UTC)
    with store.engine.begin() as conn:
        conn.execute(
            insert(usage_retention),
            [
                {"table_name": t, "raw_complete_from": pruned_until}
                for t in ("file_uploads", "api_requests")
            ],
        )
    body = get(app, "/usage/failures", RANGE, {"x-keys": str(key)}).json()
    assert body["complete"] is False
    assert datetime.fromisoformat(body["retention_start"]) == pruned_until
    later = [("start", "2025-03-05"), ("end", "2025-03-31")]
    body = get(app, "/usage/failures", later, {"x-keys": str(key)}).json()
    assert body["complete"] is True
