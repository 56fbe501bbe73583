"""``GET /export``: the raw rows of a range, streamed as CSV or NDJSON with flat memory.

CSV is parsed back with :mod:`csv` and compared with the records written; cells a spreadsheet
would evaluate come back with a leading quote; another key's rows never appear; bad parameters
are the usual JSON 400; a range reaching past raw-row retention says so in a header. Memory is
checked structurally (the backend is asked for pages of at most ``CHUNK_ROWS`` rows, by keyset)
and by exporting 50,000 rows under tracemalloc, whose peak must stay far below what holding the
rows would take (a generous bound that only an unstreamed export exceeds).
"""

from __future__ import annotations

import csv
import io
import json
import tracemalloc
import uuid
from datetime import date, datetime, timedelta, timezone
from typing import Any

import anyio
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import insert
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Mount
from test_queries import shared_store, shared_stores

from usage_middleware import RequestRecord, UploadRecord, UsageRouter, UsageStore
from usage_middleware._schema import usage_retention
from usage_middleware._storage.base import Scope

__all__ = ["shared_store", "shared_stores"]  # fixtures used here

UTC = timezone.utc
AT = datetime(2025, 9, 10, 12, tzinfo=UTC)
RANGE = [("start", "2025-09-01"), ("end", "2025-09-30")]


def app_for(store: UsageStore, **options: Any) -> Starlette:
    def authorize(request: Request) -> list[str]:
        return [k for k in request.headers.get("x-keys", "").split(",") if k]

    return Starlette(
        routes=[Mount("/usage", UsageRouter(store, authorize=authorize, **options))]
    )


def get(app: Any, params: Any, keys: str) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get("/usage/export", params=params, headers={"x-keys": keys})

    return anyio.run(go)


def upload_row(u: UploadRecord) -> list[str]:
    """What the CSV holds for ``u`` (before neutralisation)."""
    values = [
        u.id, u.api_key_id, u.request_id, u.provider, u.file_type, u.declared_type,
        u.file_size, u.file_name, u.upload_status, u.error_message,
        u.uploaded_at.isoformat(timespec="microseconds"),
    ]  # fmt: skip
    return ["" if v is None else str(v) for v in values]


def request_row(r: RequestRecord) -> list[str]:
    values = [
        r.id, r.api_key_id, r.method, r.path, r.status_code, repr(r.response_time_ms),
        r.request_size, r.response_size, r.error_message,
        r.requested_at.isoformat(timespec="microseconds"),
    ]  # fmt: skip
    return ["" if v is None else str(v) for v in values]


def spreadsheet_safe(cell: str) -> str:
    return "'" + cell if cell[:1] in ("=", "+", "-", "@", "\t", "\r") else cell


TEXT = st.text(
    alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), max_size=12
)


@pytest.mark.slow
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    drawn=st.lists(
        st.tuples(
            st.one_of(TEXT, st.sampled_from(["=1+1", "+x", "-2", "@SUM(A1)", "\tx", "\rx", "a,b"])),
            st.one_of(TEXT, st.just('say "hi"\nbye')),
            st.integers(-60 * 24 * 12, 60 * 24 * 25),
            st.booleans(),
            st.sampled_from([True, True, False]),
        ),
        max_size=30,
    ),
    chunk=st.integers(1, 7),
)
def test_csv_parses_back_to_the_raw_rows_of_the_range_and_scope(
    shared_store: UsageStore, drawn: list[tuple[Any, ...]], chunk: int, monkeypatch: Any
) -> None:
    """RFC 4180 CSV with a header; parsed back, the rows are the scope's uploads of the range,
    oldest first, with formula-like text quoted; the same whatever the page size."""
    import usage_middleware._export as export_module

    mine, theirs = uuid.uuid4(), uuid.uuid4()
    uploads = [
        UploadRecord(
            api_key_id=mine if is_mine else theirs, provider="s3", file_type="image/png",
            file_size=abs(minute), file_name=name or None, error_message=message or None,
            upload_status="success" if ok else "failed",
            uploaded_at=AT + timedelta(minutes=minute),
        )
        for name, message, minute, ok, is_mine in drawn
    ]  # fmt: skip
    shared_store.write(uploads)
    monkeypatch.setattr(export_module, "CHUNK_ROWS", chunk)
    r = get(app_for(shared_store), RANGE, str(mine))
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/csv; charset=utf-8"
    assert r.headers["content-disposition"] == (
        'attachment; filename="usage-uploads-2025-09-01_2025-09-30.csv"'
    )
    assert "\r\n" in r.text
    parsed = list(csv.reader(io.StringIO(r.text, newline="")))
    assert parsed[0] == [
        "id", "api_key_id", "request_id", "provider", "file_type", "declared_type",
        "file_size", "file_name", "upload_status", "error_message", "uploaded_at",
    ]  # fmt: skip
    inside = [
        u for u in uploads
        if u.api_key_id == mine and date(2025, 9, 1) <= u.uploaded_at.date() <= date(2025, 9, 30)
    ]  # fmt: skip
    inside.sort(key=lambda u: (u.uploaded_at, u.id))
    assert parsed[1:] == [[spreadsheet_safe(c) for c in upload_row(u)] for u in inside]


def test_export_reads_pages_by_keyset_never_the_whole_range(
    store: UsageStore, monkeypatch: Any
) -> None:
    """Structural flatness: every read asks for at most CHUNK_ROWS rows after the last one
    seen, and the body arrives as one chunk per page."""
    import usage_middleware._export as export_module

    key = uuid.uuid4()
    store.write(
        [
            UploadRecord(api_key_id=key, provider="s3", file_type="image/png", file_size=i,
                         uploaded_at=AT + timedelta(seconds=i))
            for i in range(23)
        ]
    )  # fmt: skip
    monkeypatch.setattr(export_module, "CHUNK_ROWS", 5)
    calls: list[tuple[Any, int]] = []
    original = store.backend.export_rows

    def spy(dataset: str, scope: Any, start: Any, end: Any, after: Any, limit: int) -> Any:
        calls.append((after, limit))
        return original(dataset, scope, start, end, after, limit)

    monkeypatch.setattr(store.backend, "export_rows", spy)
    export = export_module.Export(store, _spec(), [key], "uploads", "ndjson")
    export.prepare()
    chunks = list(export.body())
    assert [len(c.splitlines()) for c in chunks] == [5, 5, 5, 5, 3]
    assert [limit for _, limit in calls] == [5] * 5
    assert calls[0][0] is None
    lines = [json.loads(line) for c in chunks for line in c.splitlines()]
    assert [x["file_size"] for x in lines] == list(range(23))
    # each page continues after the previous page's last (time, id)
    for (after, _), last in zip(calls[1:], lines[4::5], strict=False):
        assert after == (datetime.fromisoformat(last["uploaded_at"]), uuid.UUID(last["id"]))


def _spec() -> Any:
    from usage_middleware._timerange import QuerySpec

    return QuerySpec(start=date(2025, 9, 1), end=date(2025, 9, 30))


def test_exporting_50k_rows_keeps_memory_flat(tmp_path: Any) -> None:
    """50,000 rows through the router's ASGI app, the body counted and dropped as it is sent:
    the tracemalloc peak stays under a third of what reading the same rows at once takes (a
    generous bound that only an export holding the range exceeds; no timing)."""
    store = UsageStore(f"sqlite:///{tmp_path}/big.db")
    store.create_schema()
    key = uuid.uuid4()
    n = 50_000
    for lo in range(0, n, 10_000):
        store.write(
            [
                UploadRecord(api_key_id=key, provider="s3", file_type="image/png", file_size=i,
                             file_name=f"file-{i:06d}.png",
                             uploaded_at=AT + timedelta(seconds=i))
                for i in range(lo, lo + 10_000)
            ]
        )  # fmt: skip
    router = UsageRouter(store, public=True)
    received = lines = 0

    async def send(message: Any) -> None:
        nonlocal received, lines
        if message["type"] == "http.response.start":
            assert message["status"] == 200
        body = message.get("body", b"")
        received += len(body)
        lines += body.count(b"\n")

    requested = False

    async def receive() -> Any:
        nonlocal requested
        if requested:  # the client stays connected
            await anyio.sleep_forever()
        requested = True
        return {"type": "http.request", "body": b"", "more_body": False}

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
        "scheme": "http", "path": "/export", "raw_path": b"/export", "root_path": "",
        "query_string": b"start=2025-09-01&end=2025-09-30", "headers": [],
        "server": ("test", 80), "client": ("test", 1),
    }  # fmt: skip
    try:
        store.ensure_schema()
        tracemalloc.start()
        anyio.run(router, scope, receive, send)
        _, streamed_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        tracemalloc.start()
        held = store.backend.export_rows(  # the same rows, held at once
            "uploads", Scope(), AT - timedelta(days=9), AT + timedelta(days=20), None, n
        )
        _, held_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    finally:
        store.dispose()
    assert lines == n + 1 and len(held) == n
    assert received > 5 * 2**20
    assert streamed_peak < held_peak / 3, (streamed_peak / 2**20, held_peak / 2**20)


def test_ndjson_and_requests(store: UsageStore) -> None:
    key = uuid.uuid4()
    req = RequestRecord(
        api_key_id=key, method="POST", path="/files/{id}", status_code=500,
        response_time_ms=12.5, request_size=3, response_size=4, error_message="=boom",
        requested_at=AT,
    )  # fmt: skip
    store.write([req])
    r = get(app_for(store), [*RANGE, ("dataset", "requests"), ("format", "ndjson")], str(key))
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/x-ndjson"
    assert r.headers["content-disposition"].endswith('usage-requests-2025-09-01_2025-09-30.ndjson"')
    rows = [json.loads(line) for line in r.text.splitlines()]
    assert rows == [
        {
            "id": str(req.id), "api_key_id": str(key), "method": "POST", "path": "/files/{id}",
            "status_code": 500, "response_time_ms": 12.5, "request_size": 3, "response_size": 4,
            "error_message": "=boom",
            "requested_at": AT.isoformat(timespec="microseconds"),
        }
    ]  # fmt: skip
    # upload filters do not apply to requests: said in a header
    r = get(app_for(store), [*RANGE, ("dataset", "requests"), ("provider", "s3")], str(key))
    assert r.headers["x-usage-ignored"] == "provider"
    assert len(r.text.splitlines()) == 2  # header and the row
    assert r.text.splitlines()[1].split(",")[8] == "'=boom"


def test_a_key_outside_the_scope_is_never_exported(store: UsageStore) -> None:
    mine, theirs = uuid.uuid4(), uuid.uuid4()
    store.write(
        [
            UploadRecord(api_key_id=k, provider="s3", file_type="image/png", file_size=1,
                         uploaded_at=AT)
            for k in (mine, theirs, None)
        ]
    )  # fmt: skip
    app = app_for(store)
    for dataset in ("uploads", "requests"):
        r = get(app, [*RANGE, ("dataset", dataset)], str(mine))
        assert str(theirs) not in r.text
    r = get(app, [*RANGE, ("api_key_id", str(theirs))], str(mine))
    assert r.status_code == 403
    r = get(app, RANGE, "")
    assert r.status_code == 200 and len(r.text.splitlines()) == 1  # the header only


@pytest.mark.parametrize(
    ("params", "code", "parameter"),
    [
        ([("dataset", "UPLOADS")], "invalid_dataset", "dataset"),
        ([("dataset", "keys")], "invalid_dataset", "dataset"),
        ([("dataset", "uploads"), ("format", "xlsx")], "invalid_format", "format"),
        ([("dataset", "uploads"), ("dataset", "requests")], "repeated_parameter", "dataset"),
        ([("start", "2025-02-30"), ("end", "2025-03-01")], "invalid_date", "start"),
    ],
)
def test_bad_export_parameters_are_json_400(
    store: UsageStore, params: list[tuple[str, str]], code: str, parameter: str
) -> None:
    r = get(app_for(store), params, "")
    assert r.status_code == 400
    body = r.json()["error"]
    assert (body["code"], body["parameter"]) == (code, parameter) and body["message"]


def test_a_range_past_retention_says_so_in_a_header(store: UsageStore) -> None:
    key = uuid.uuid4()
    store.write([UploadRecord(api_key_id=key, provider="s3", file_type="image/png",
                              file_size=1, uploaded_at=AT)])  # fmt: skip
    app = app_for(store)
    assert "x-usage-retention-start" not in get(app, RANGE, str(key)).headers
    since = datetime(2025, 9, 5, tzinfo=UTC)
    with store.engine.begin() as conn:
        conn.execute(insert(usage_retention), [{"table_name": "file_uploads",
                                                "raw_complete_from": since}])  # fmt: skip
    r = get(app, RANGE, str(key))
    assert datetime.fromisoformat(r.headers["x-usage-retention-start"]) == since
    later = [("start", "2025-09-05"), ("end", "2025-09-30")]
    assert "x-usage-retention-start" not in get(app, later, str(key)).headers
    # the requests table was never pruned
    r = get(app, [*RANGE, ("dataset", "requests")], str(key))
    assert "x-usage-retention-start" not in r.headers


def test_every_backend_exports_the_same_text(shared_store: UsageStore) -> None:
    """Keyless rows, request ids and microseconds come out the same on every backend."""
    request_id = uuid.uuid4()
    upload = UploadRecord(
        api_key_id=None, request_id=request_id, provider="p-" + request_id.hex, file_size=0,
        uploaded_at=datetime(2031, 1, 2, 3, 4, 5, 6, tzinfo=UTC),
    )  # fmt: skip
    shared_store.write([upload])
    app = Starlette(routes=[Mount("/usage", UsageRouter(shared_store, public=True))])
    params = {"start": "2031-01-02", "end": "2031-01-02", "format": "ndjson",
              "provider": upload.provider}  # fmt: skip
    r = get(app, params, "")
    assert [json.loads(line) for line in r.text.splitlines()] == [
        {
            "id": str(upload.id), "api_key_id": None, "request_id": str(request_id),
            "provider": upload.provider, "file_type": upload.file_type, "declared_type": None,
            "file_size": 0, "file_name": None, "upload_status": "success",
            "error_message": None, "uploaded_at": "2031-01-02T03:04:05.000006+00:00",
        }
    ]  # fmt: skip
