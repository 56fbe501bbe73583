"""UsageMiddleware through real Starlette and FastAPI apps: the rows requests and files produce."""

from __future__ import annotations

import copy
import dataclasses
import functools
import gc
import logging
import uuid
from datetime import datetime, timezone
from typing import Any

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import func, select
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route
from test_middleware_helpers import (
    HTML,
    JPEG,
    PNG,
    CollectingRecorder,
    Lifespan,
    drive,
    fastapi_app,
    multipart,
    request,
    starlette_app,
    websocket_echo,
)
from test_middleware_helpers import upload as upload_endpoint

from usage_middleware import (
    ALL_KEYS,
    ConfigurationError,
    Recorder,
    UsageMiddleware,
    UsageRouter,
    UsageStore,
    _keys,
    annotate,
    api_key_uuid,
)
from usage_middleware._keys import key_from_headers
from usage_middleware._recording.compact import packed_kind
from usage_middleware._schema import api_requests, daily_usage, file_uploads

FRAMEWORKS = ["starlette", "fastapi"]


def make(framework: str, **options: Any) -> tuple[Any, CollectingRecorder]:
    return (starlette_app if framework == "starlette" else fastapi_app)(**options)


def three_files() -> tuple[bytes, list[tuple[bytes, bytes]]]:
    return multipart(
        [
            ("note", None, None, b"just a form field"),
            ("a", "cat.png", "image/png", JPEG),
            ("b", "doc.jpg", "image/jpeg", HTML),
            ("c", "raw.bin", None, PNG),
        ]
    )


# --- api_requests ---------------------------------------------------------------------------


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_request_row_has_route_template_status_and_sizes(framework: str) -> None:
    """A GET gives one row: method, route template, status, bytes counted from the messages."""
    app, recorder = make(framework)
    response = request(app, "GET", "/items/42")
    assert response.status_code == 200
    [row] = recorder.records
    assert row.method == "GET"
    assert row.path == "/items/{item_id}"
    assert row.status_code == 200
    assert row.request_size == 0
    assert row.response_size == len(response.content)
    assert row.error_message is None
    assert 0 < row.response_time_ms < 5000
    assert abs((datetime.now(timezone.utc) - row.requested_at).total_seconds()) < 60


def test_unmatched_path_is_recorded_raw() -> None:
    """With no matching route the raw path is recorded, with the status actually sent."""
    app, recorder = starlette_app()
    request(app, "GET", "/no/such/thing")
    [row] = recorder.requests
    assert (row.path, row.status_code) == ("/no/such/thing", 404)


def test_mounted_route_template_includes_the_mount_template() -> None:
    """A route under a parametrised Mount is recorded with both templates, not the values."""
    app, recorder = starlette_app()
    request(app, "GET", "/orgs/acme/items/7")
    request(app, "GET", "/orgs/other/items/8")
    assert [r.path for r in recorder.requests] == ["/orgs/{org}/items/{item_id}"] * 2


def test_fastapi_router_prefix_is_part_of_the_template() -> None:
    """An APIRouter's prefix appears in the template FastAPI matched."""
    app, recorder = fastapi_app()
    request(app, "GET", "/v1/things/abc")
    assert recorder.requests[0].path == "/v1/things/{thing_id}"


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_exception_before_sending_records_500_and_propagates(framework: str) -> None:
    """An app that raises before responding gives status 500 and the error, and still raises."""
    app, recorder = make(framework)
    result = anyio.run(drive, app, "GET", "/boom", [], [])
    assert isinstance(result.error, ValueError)
    assert result.status == 500  # Starlette's ServerErrorMiddleware, outside ours, answered
    [row] = recorder.requests
    assert row.status_code == 500
    assert row.error_message == "ValueError: exploded before sending"


def test_exception_after_response_started_keeps_the_status_sent() -> None:
    """When the app raises mid-stream, the status already sent is recorded, with the error."""
    app, recorder = starlette_app()
    result = anyio.run(drive, app, "GET", "/late-boom", [], [])
    assert isinstance(result.error, ValueError)
    [row] = recorder.requests
    assert row.status_code == 200
    assert row.response_size == len(b"partial")
    assert row.error_message == "ValueError: exploded while streaming"


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_response_time_excludes_background_tasks(framework: str) -> None:
    """The clock stops at the last body message, before the 0.3 s background task runs."""
    app, recorder = make(framework)
    request(app, "GET", "/slow-background")
    [row] = recorder.requests
    assert row.response_time_ms < 250


def test_request_bytes_are_counted_without_content_length() -> None:
    """A chunked body with no Content-Length is measured from the messages, chunk by chunk."""
    app, recorder = starlette_app()
    chunks = [b"x" * 1000, b"y" * 10, b"", b"z" * 5]
    result = anyio.run(drive, app, "POST", "/digest", [], chunks)
    assert result.status == 200
    assert recorder.requests[0].request_size == 1015


def test_request_that_lies_about_content_length_is_measured() -> None:
    """A Content-Length that disagrees with the body does not change the count."""
    app, recorder = starlette_app()
    headers = [(b"content-length", b"999999")]
    anyio.run(drive, app, "POST", "/digest", headers, [b"abc"])
    assert recorder.requests[0].request_size == 3


# --- file_uploads ---------------------------------------------------------------------------


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_one_upload_row_per_file_with_sniffed_and_declared_types(framework: str) -> None:
    """Three files (and a plain field) give three rows: real type, spoofed claim kept, size."""
    app, recorder = make(framework)
    body, headers = three_files()
    response = request(app, "POST", "/upload", content=body, headers=dict(headers))
    assert response.json() == {"files": ["cat.png", "doc.jpg", "raw.bin"]}
    [req] = recorder.requests
    assert req.request_size == len(body)
    uploads = recorder.uploads
    assert [(u.file_type, u.declared_type, u.file_size) for u in uploads] == [
        ("image/jpeg", "image/png", len(JPEG)),
        ("text/html", "image/jpeg", len(HTML)),
        ("image/png", None, len(PNG)),
    ]
    for u in uploads:
        assert u.upload_status == "success"
        assert u.error_message is None
        assert u.request_id == req.id
        assert u.provider == "unknown"
        assert u.file_name is None
        assert req.requested_at <= u.uploaded_at


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_uploads_failed_on_error_status_with_reason(framework: str) -> None:
    """A 4xx response marks every file of the request failed, saying which status."""
    app, recorder = make(framework)
    body, headers = three_files()
    request(app, "POST", "/upload?status=413", content=body, headers=dict(headers))
    assert {(u.upload_status, u.error_message) for u in recorder.uploads} == {
        ("failed", "HTTP 413")
    }


@pytest.mark.parametrize(
    ("status", "expected"),
    [(201, ("success", None)), (204, ("success", None)), (303, ("failed", "HTTP 303"))],
)
def test_only_a_2xx_response_makes_an_upload_successful(
    status: int, expected: tuple[str, str | None]
) -> None:
    """Success means a 2xx response; a redirect after the upload is a failed upload."""
    app, recorder = starlette_app()
    body, headers = three_files()
    response = request(app, "POST", f"/upload?status={status}", content=body, headers=dict(headers))
    assert response.status_code == status
    assert [r.status_code for r in recorder.requests] == [status]
    assert {(u.upload_status, u.error_message) for u in recorder.uploads} == {expected}


def test_annotate_success_wins_over_a_redirect() -> None:
    """The endpoint can still declare its files stored when it answers with a redirect."""
    app, recorder = starlette_app()
    body, headers = three_files()
    query = "status=303&upload_status=success"
    request(app, "POST", f"/upload?{query}", content=body, headers=dict(headers))
    assert {(u.upload_status, u.error_message) for u in recorder.uploads} == {("success", None)}


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_uploads_failed_when_the_endpoint_raises(framework: str) -> None:
    """An exception in the endpoint marks the files failed with the exception as reason."""
    app, recorder = make(framework)
    body, headers = three_files()
    result = anyio.run(drive, app, "POST", "/upload?raise=1", headers, [body])
    assert isinstance(result.error, RuntimeError)
    assert recorder.requests[0].status_code == 500
    assert {(u.upload_status, u.error_message) for u in recorder.uploads} == {
        ("failed", "RuntimeError: storage provider down")
    }


def test_client_disconnect_mid_body_marks_the_upload_failed() -> None:
    """A client that goes away mid-body leaves a failed row for the partial file."""
    app, recorder = starlette_app()
    body, headers = multipart([("f", "big.jpg", "image/jpeg", JPEG + bytes(100_000))])
    anyio.run(
        functools.partial(drive, disconnect=True), app, "POST", "/upload", headers, [body[:50_000]]
    )
    [req] = recorder.requests
    assert req.request_size == 50_000
    assert req.error_message is not None and "disconnected mid-body" in req.error_message
    [up] = recorder.uploads
    assert up.upload_status == "failed"
    assert up.error_message is not None
    assert up.error_message.startswith("client disconnected mid-body")
    assert up.file_type == "image/jpeg"
    assert 0 < up.file_size < 50_000


def test_request_rejected_without_reading_the_body_records_only_the_request() -> None:
    """Files the app never read are unknown: the request row is written, no upload rows."""
    app, recorder = starlette_app()
    body, headers = three_files()
    request(app, "POST", "/reject", content=body, headers=dict(headers))
    assert [r.status_code for r in recorder.requests] == [401]
    assert recorder.uploads == []


def test_upload_rows_are_already_what_validation_makes_of_them() -> None:
    """Upload rows are built unchecked on the request path; what came from the client or a
    hook is normalised there already, so the store's validation changes nothing."""
    app, recorder = starlette_app(provider=lambda scope: " s3\x00east ", record_file_names=True)
    body, headers = multipart(
        [
            ("f", "a\x00" + "n" * 300 + ".png", "Image/PNG; charset=x", PNG),
            ("g", "b.txt", "text/plain", b"hello"),
            ("h", "c.bin", "Application/Octet-Stream", JPEG),
        ]
    )
    long_reason = "e" * 600
    url = f"/upload?status=413&error_message={long_reason}"
    request(app, "POST", url, content=body, headers=dict(headers))
    uploads = recorder.uploads
    assert [(u.file_type, u.declared_type) for u in uploads] == [
        ("image/png", None),
        ("text/plain", None),
        ("image/jpeg", "application/octet-stream"),
    ]
    assert {u.provider for u in uploads} == {"s3\ufffdeast"}
    assert uploads[0].file_name is not None and len(uploads[0].file_name) == 255
    assert "\x00" not in uploads[0].file_name
    assert {len(u.error_message or "") for u in uploads} == {500}
    for upload in uploads:
        validated = copy.copy(upload)
        validated.validate()
        assert dataclasses.astuple(validated) == dataclasses.astuple(upload)


def test_empty_file_input_is_not_an_upload() -> None:
    """A browser's empty file input (no name, no bytes) is not counted as a file."""
    app, recorder = starlette_app()
    body, headers = multipart([("f", "", "application/octet-stream", b"")])
    request(app, "POST", "/upload", content=body, headers=dict(headers))
    assert recorder.uploads == []


def test_raw_body_upload_on_configured_paths() -> None:
    """A PUT of a body on a raw-upload path is one file, typed from its bytes."""

    async def put(request: Request) -> PlainTextResponse:
        size = sum([len(c) async for c in request.stream()])
        return PlainTextResponse(str(size), status_code=201)

    app, recorder = starlette_app(
        raw_upload_paths=["/files/"],
        record_file_names=True,
        routes=[Route("/files/{name}", put, methods=["PUT"])],
    )
    request(app, "PUT", "/files/holiday.png", content=JPEG, headers={"content-type": "image/png"})
    request(
        app, "PUT", "/files/notes.txt", content=b"hello", headers={"content-type": "text/plain"}
    )
    request(app, "POST", "/digest", content=JPEG, headers={"content-type": "image/jpeg"})
    assert [
        (u.file_name, u.file_type, u.declared_type, u.file_size, u.upload_status)
        for u in recorder.uploads
    ] == [
        ("holiday.png", "image/jpeg", "image/png", len(JPEG), "success"),
        ("notes.txt", "text/plain", None, 5, "success"),
    ]
    assert [r.path for r in recorder.requests] == ["/files/{name}", "/files/{name}", "/digest"]


def test_raw_upload_hook_decides_per_request() -> None:
    """The raw_upload hook picks raw-body uploads by anything in the scope."""
    app, recorder = starlette_app(raw_upload=lambda scope: scope["method"] == "PUT")
    request(app, "PUT", "/digest", content=PNG, headers={"content-type": "image/png"})
    request(app, "POST", "/digest", content=PNG, headers={"content-type": "image/png"})
    assert [u.file_type for u in recorder.uploads] == ["image/png"]


def test_file_names_are_kept_only_when_opted_in() -> None:
    """record_file_names=True stores the client's file name; the default stores none."""
    app, recorder = starlette_app(record_file_names=True)
    body, headers = three_files()
    request(app, "POST", "/upload", content=body, headers=dict(headers))
    assert [u.file_name for u in recorder.uploads] == ["cat.png", "doc.jpg", "raw.bin"]


def test_files_beyond_the_per_request_cap_are_not_recorded(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """max_files_per_request bounds how many rows one request can produce; a request that
    goes past it is counted in stats() and logged once, without the API key."""
    raw_key = "sk_live_capped_key"
    recorder = CollectingRecorder()
    routes = [Route("/upload", upload_endpoint, methods=["POST"])]
    app = UsageMiddleware(Starlette(routes=routes), recorder=recorder, max_files_per_request=2)
    body, headers = multipart(
        [
            ("a", "1.png", "image/png", PNG),
            ("b", "2.png", "image/png", PNG),
            ("empty", "", "application/octet-stream", b""),  # an empty file input: no file
            ("c", "3.png", "image/png", PNG),
            ("d", "4.png", "image/png", PNG),
            ("note", None, None, b"a form field"),
        ]
    )
    headers = [*headers, (b"x-api-key", raw_key.encode())]
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            response = request(app, "POST", "/upload", content=body, headers=headers)
            assert response.status_code == 200
    assert len(recorder.uploads) == 4
    assert app.stats()["requests_capped"] == 2
    warnings = [r for r in caplog.records if "not parsed" in r.getMessage()]
    assert len(warnings) == 2
    assert "more than 2 files" in warnings[0].getMessage()
    assert "/upload" in warnings[0].getMessage()
    assert raw_key not in caplog.text


# --- annotate and hooks -------------------------------------------------------------------


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_annotate_sets_fields_and_wins_over_hooks(framework: str) -> None:
    """Fields annotated by the endpoint override the provider and key hooks and the status."""
    key = uuid.uuid4()
    app, recorder = make(
        framework, provider=lambda scope: "from-hook", api_key_id=lambda scope: uuid.uuid4()
    )
    body, headers = three_files()
    query = f"provider=vercel&api_key_id={key}&upload_status=failed&error_message=quota%20exceeded"
    request(app, "POST", f"/upload?{query}", content=body, headers=dict(headers))
    assert recorder.requests[0].api_key_id == key
    assert {
        (u.provider, u.api_key_id, u.upload_status, u.error_message) for u in recorder.uploads
    } == {("vercel", key, "failed", "quota exceeded")}


def test_annotate_success_overrides_an_error_status() -> None:
    """An endpoint may declare its files stored even though the response is an error."""
    app, recorder = starlette_app()
    body, headers = three_files()
    request(
        app, "POST", "/upload?status=500&upload_status=success", content=body, headers=dict(headers)
    )
    assert {(u.upload_status, u.error_message) for u in recorder.uploads} == {("success", None)}


def test_annotate_rejects_unknown_fields_and_bad_values() -> None:
    """Unknown names raise TypeError; bad values raise ValueError; nothing else is needed."""
    scope: dict[str, Any] = {"type": "http"}
    with pytest.raises(TypeError, match="file_type"):
        annotate(scope, file_type="image/png")
    with pytest.raises(ValueError, match="upload_status"):
        annotate(scope, upload_status="ok")
    with pytest.raises(ValueError, match="api_key_id"):
        annotate(scope, api_key_id="sk_live_raw_key")
    with pytest.raises(ValueError, match="provider"):
        annotate(scope, provider="")
    with pytest.raises(TypeError, match="Request or an ASGI scope"):
        annotate(object(), provider="s3")
    annotate(scope, provider="s3")  # no middleware in front: validated, then ignored


def test_default_key_hook_gives_one_stable_id_for_both_headers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """x-api-key and Authorization: Bearer with the same key give the same id; no raw key kept."""
    raw = "sk_live_SECRET_4f9a"
    app, recorder = starlette_app()
    with caplog.at_level(logging.DEBUG):
        request(app, "GET", "/items/1", headers={"x-api-key": raw})
        request(app, "GET", "/items/1", headers={"authorization": f"Bearer {raw}"})
        request(app, "GET", "/items/1", headers={"authorization": f"Basic {raw}"})
        request(app, "GET", "/items/1")
    ids = [r.api_key_id for r in recorder.requests]
    assert ids == [api_key_uuid(raw), api_key_uuid(raw), None, None]
    assert ids[0] == uuid.uuid5(uuid.UUID("5b0f1f5e-8a47-5c1e-9d0b-7a1c3e2f4d60"), raw)
    assert raw not in repr(recorder.records)
    assert raw not in caplog.text


def _key_by_the_rules(headers: list[tuple[bytes, Any]]) -> uuid.UUID | None:
    """The default hook's rules, computed afresh: the first non-blank x-api-key, else the first
    Authorization whose scheme is Bearer (any case) and whose token is not blank."""
    for name, value in headers:
        if name == b"x-api-key" and bytes(value).strip():
            return api_key_uuid(bytes(value).decode("latin-1"))
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = bytes(value).strip().partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return api_key_uuid(token.strip().decode("latin-1"))
    return None


_HEADER_VALUES = st.sampled_from(
    [b"k1", b" k1 ", b"k2", b"", b"  ", b"Bearer k1", b"bearer k2", b"BEARER  k1 ", b"Basic k1",
     b"Bearer", b"Bearer  ", b"Token k2", b"caf\xe9"]
)  # fmt: skip


@given(
    st.lists(
        st.tuples(
            st.sampled_from([b"x-api-key", b"authorization", b"host", b"x-other"]),
            _HEADER_VALUES,
            st.booleans(),
        ),
        max_size=6,
    )
)
def test_default_key_hook_follows_its_rules_whatever_it_remembers(
    spec: list[tuple[bytes, bytes, bool]],
) -> None:
    """The hook remembers the ids of header values it has seen: the same headers give the same
    id the second time, and every time the id the rules give (values as bytes or bytearray)."""
    headers = [(name, bytearray(value) if mutable else value) for name, value, mutable in spec]
    expected = _key_by_the_rules(headers)
    scope = {"type": "http", "headers": headers}
    assert key_from_headers(scope) == expected
    assert key_from_headers(scope) == expected


def test_default_key_hook_is_right_after_its_memory_starts_over() -> None:
    """More distinct keys than the hook remembers: each still gets its own id."""
    keys = [f"key-{i}".encode() for i in range(10_000)]
    for _ in range(2):
        for key in keys:
            got = key_from_headers({"type": "http", "headers": [(b"x-api-key", key)]})
            assert got == api_key_uuid(key.decode())
            bearer = [(b"authorization", b"Bearer " + key)]
            assert key_from_headers({"type": "http", "headers": bearer}) == got


def test_default_key_hook_keeps_no_credentials_that_are_not_keys() -> None:
    """What the hook remembers is values that carry a key: a Basic (or other scheme's)
    Authorization value is read and forgotten, never kept in the process."""
    secret = b"Basic dXNlcjpodW50ZXIy"
    assert key_from_headers({"type": "http", "headers": [(b"authorization", secret)]}) is None
    assert secret not in _keys._BY_AUTHORIZATION
    assert secret not in _keys._BY_API_KEY


def test_hooks_that_raise_are_logged_and_ignored(caplog: pytest.LogCaptureFixture) -> None:
    """A failing hook never fails the request; its message (maybe a key) is not logged."""

    def bad(scope: Any) -> Any:
        raise RuntimeError("sk_live_leaked_in_message")

    app, recorder = starlette_app(provider=bad, api_key_id=bad, exclude=bad, raw_upload=bad)
    body, headers = three_files()
    with caplog.at_level(logging.WARNING):
        response = request(app, "POST", "/upload", content=body, headers=dict(headers))
    assert response.status_code == 200
    assert recorder.requests[0].api_key_id is None
    assert {u.provider for u in recorder.uploads} == {"unknown"}
    assert "hook raised RuntimeError" in caplog.text
    assert "sk_live_leaked_in_message" not in caplog.text


def test_provider_may_be_a_string_or_a_callable() -> None:
    """provider='s3' applies to every file; a callable decides per request."""
    body, headers = three_files()
    app, recorder = starlette_app(provider="s3")
    request(app, "POST", "/upload", content=body, headers=dict(headers))
    assert {u.provider for u in recorder.uploads} == {"s3"}
    app, recorder = starlette_app(provider=lambda scope: scope["path"].strip("/") + "-store")
    request(app, "POST", "/upload", content=body, headers=dict(headers))
    assert {u.provider for u in recorder.uploads} == {"upload-store"}


def test_excluded_paths_and_the_usage_router_are_not_recorded(sqlite_url: str) -> None:
    """exclude_paths, the exclude hook and requests served by UsageRouter leave no rows."""
    store = UsageStore(sqlite_url)
    router = UsageRouter(store, authorize=lambda request: ALL_KEYS)
    app, recorder = starlette_app(
        exclude_paths=["/health"],
        exclude=lambda scope: scope["path"] == "/items/secret",
        routes=[Mount("/api/usage", router)],
    )
    assert request(app, "GET", "/api/usage/granular?range=7d").status_code == 200
    request(app, "GET", "/health")
    request(app, "GET", "/items/secret")
    request(app, "GET", "/items/public")
    assert [r.path for r in recorder.requests] == ["/items/{item_id}"]
    store.dispose()


def test_concurrent_requests_keep_their_own_state() -> None:
    """Interleaved requests never mix sizes, keys or annotations."""
    app, recorder = starlette_app()

    async def one(i: int) -> None:
        body, headers = multipart([("f", f"{i}.bin", None, bytes([i]) * (1000 + i))])
        headers = [*headers, (b"x-api-key", f"key-{i}".encode())]
        chunks = [body[j : j + 97] for j in range(0, len(body), 97)]
        await drive(app, "POST", f"/upload?provider=p{i}", headers, chunks)

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(one, i)

    anyio.run(main)
    assert len(recorder.uploads) == 20
    by_request = {r.id: r for r in recorder.requests}
    for up in recorder.uploads:
        req = by_request[up.request_id]
        i = up.file_size - 1000
        assert req.api_key_id == api_key_uuid(f"key-{i}")
        assert up.provider == f"p{i}"


class ServerCycle:
    """What uvicorn does per request: one object holds the scope, its bound methods are the
    ``receive`` and ``send`` the app gets."""

    def __init__(self, path: str) -> None:
        self.scope: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "root_path": "",
            "query_string": b"",
            "headers": [(b"host", b"test"), (b"x-api-key", b"k")],
            "client": ("127.0.0.1", 1234),
            "server": ("127.0.0.1", 80),
        }
        self.status = 0

    async def receive(self) -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]


def test_requests_leave_no_reference_cycles() -> None:
    """Per-request state that holds the server's send is not reachable from the scope, so a
    finished request is freed by reference counting, never left to the garbage collector."""
    app, recorder = starlette_app()

    async def serve(n: int) -> list[int]:
        statuses = []
        for i in range(n):
            cycle = ServerCycle(f"/items/{i}")
            await app(cycle.scope, cycle.receive, cycle.send)
            statuses.append(cycle.status)
        return statuses

    async def main() -> int:
        await serve(3)  # first request: lazy start, route cache, imports
        gc.collect()
        gc.disable()
        try:
            assert await serve(50) == [200] * 50
            return gc.collect()
        finally:
            gc.enable()

    assert anyio.run(main) == 0
    assert len(recorder.requests) == 53


def test_constructor_validates_its_options() -> None:
    """Bad options fail at construction with a message naming them."""
    app = Starlette()
    with pytest.raises(ConfigurationError, match="store"):
        UsageMiddleware(app)
    with pytest.raises(ConfigurationError, match="exclude_paths"):
        UsageMiddleware(app, recorder=CollectingRecorder(), exclude_paths=["health"])
    with pytest.raises(ConfigurationError, match="max_files_per_request"):
        UsageMiddleware(app, recorder=CollectingRecorder(), max_files_per_request=0)
    with pytest.raises(ConfigurationError, match="provider"):
        UsageMiddleware(app, recorder=CollectingRecorder(), provider="")


# --- other traffic, lifespan, end to end --------------------------------------------------


def test_websocket_passes_through_untouched() -> None:
    """Websocket traffic works as without the middleware and is not recorded."""
    app, recorder = starlette_app()
    sent = anyio.run(websocket_echo, app, "/ws", "ping")
    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.send", "websocket.close"]
    assert sent[1]["text"] == "ping"
    assert recorder.records == []


def test_lifespan_starts_and_shuts_the_recorder_down() -> None:
    """Lifespan startup starts the recorder; shutdown shuts it down, once each."""
    app, recorder = starlette_app()

    async def run() -> None:
        async with Lifespan(app) as client:
            assert recorder.started == 1
            await client.get("/items/1")
        assert recorder.shutdowns == 1

    anyio.run(run)
    assert len(recorder.requests) == 1


def test_first_request_starts_the_recorder_without_lifespan() -> None:
    """A server that sends no lifespan events still gets a started recorder."""
    app, recorder = starlette_app()
    request(app, "GET", "/items/1")
    request(app, "GET", "/items/2")
    assert recorder.started == 1


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_end_to_end_into_sqlite_flushed_on_shutdown(framework: str, sqlite_url: str) -> None:
    """Through the real recorder and store: after lifespan shutdown every row is in SQLite."""
    store = UsageStore(sqlite_url)
    app, _ = make(framework, recorder=Recorder(store))
    body, headers = three_files()

    async def run() -> None:
        async with Lifespan(app) as client:
            for _ in range(5):
                await client.post("/upload?provider=vercel", content=body, headers=dict(headers))
            await client.get("/items/3", headers={"x-api-key": "k"})

    anyio.run(run)
    with store.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(api_requests)).scalar() == 6
        types = conn.execute(
            select(file_uploads.c.file_type, func.count()).group_by(file_uploads.c.file_type)
        ).all()
        assert sorted(types) == [("image/jpeg", 5), ("image/png", 5), ("text/html", 5)]
        total = conn.execute(select(func.sum(daily_usage.c.total_uploads))).scalar()
        assert total == 15
    store.dispose()


def test_a_request_with_no_upload_reaches_its_recorder_as_the_queues_tuple(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request with no upload goes to the middleware's own recorder as the tuple its queue
    holds (no record is made on the request path), and is stored as its record would be."""
    store = UsageStore(sqlite_url)
    recorder = Recorder(store)
    items: list[object] = []
    submit_item = recorder.submit_item

    def spy(item: object) -> None:
        items.append(item)
        submit_item(item)

    def no_record(record: object) -> None:
        raise AssertionError("a request went to the recorder as a record")

    monkeypatch.setattr(recorder, "submit_item", spy)
    monkeypatch.setattr(recorder, "submit", no_record)
    app, _ = make("starlette", recorder=recorder)

    async def run() -> None:
        async with Lifespan(app) as client:
            await client.get("/items/7", headers={"x-api-key": "k"})
            await client.get("/nowhere")
            await client.get("/boom")

    anyio.run(run)
    assert [packed_kind(i) for i in items] == ["r", "r", "r"]
    with store.engine.connect() as conn:
        rows = conn.execute(
            select(
                api_requests.c.path, api_requests.c.status_code, api_requests.c.api_key_id,
                api_requests.c.route_matched,
            ).order_by(api_requests.c.requested_at)
        ).all()  # fmt: skip
    assert [tuple(r) for r in rows] == [
        ("/items/{item_id}", 200, api_key_uuid("k"), True),
        ("/nowhere", 404, None, False),
        ("/boom", 500, None, True),
    ]
    store.dispose()


def test_store_option_builds_a_recorder_with_options(sqlite_url: str) -> None:
    """store= alone is enough: the middleware builds and runs its own recorder."""
    store = UsageStore(sqlite_url)
    app = Starlette(routes=[Route("/", lambda request: PlainTextResponse("ok"))])
    app.add_middleware(UsageMiddleware, store=store, recorder_options={"batch_size": 10})

    async def run() -> None:
        async with Lifespan(app) as client:
            await client.get("/")

    anyio.run(run)
    with store.engine.connect() as conn:
        assert conn.execute(select(api_requests.c.path)).scalars().all() == ["/"]
    store.dispose()


def test_request_rows_are_normalised_by_the_store_before_they_are_written(sqlite_url: str) -> None:
    """Rows built on the request path unchecked are validated on write: a raw path with NUL and
    over-long text is stored made safe, never as is."""
    store = UsageStore(sqlite_url)
    app, _ = make("starlette", recorder=Recorder(store))
    long_path = "/missing/" + "x" * 2000

    async def run() -> None:
        async with Lifespan(app) as client:
            await client.get("/nul%00here")
            await client.get(long_path)

    anyio.run(run)
    with store.engine.connect() as conn:
        paths = set(conn.execute(select(api_requests.c.path)).scalars())
    assert "/nul\ufffdhere" in paths
    assert not any("\x00" in path for path in paths)
    assert max(len(path) for path in paths) == 512
    store.dispose()
