"""The shipped test doubles: a host tests its annotate() calls without a database."""

from __future__ import annotations

import uuid

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from test_middleware_helpers import Lifespan, multipart, request

from usage_middleware import UsageMiddleware, annotate
from usage_middleware.testing import CollectingRecorder

KEY = uuid.UUID("11111111-1111-4111-8111-111111111111")
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64


def host_app(recorder: CollectingRecorder) -> Starlette:
    async def upload(request: Request) -> JSONResponse:
        async with request.form() as form:
            annotate(request, provider="s3", api_key_id=KEY)
            return JSONResponse({"files": len(form)})

    app = Starlette(routes=[Route("/upload", upload, methods=["POST"])])
    app.add_middleware(UsageMiddleware, recorder=recorder)
    return app


def test_collecting_recorder_keeps_the_rows_the_app_produced() -> None:
    """Each request gives one request row and one upload row per file, annotations applied."""
    recorder = CollectingRecorder()
    app = host_app(recorder)
    files = [("a", "a.png", "image/png", PNG), ("b", "b.txt", "text/plain", b"hi")]
    body, headers = multipart(files)

    async def run() -> None:
        async with Lifespan(app) as client:
            response = await client.post("/upload", content=body, headers=headers)
            assert response.status_code == 200

    anyio.run(run)
    assert (recorder.started, recorder.shutdowns) == (1, 1)
    assert recorder.stats()["state"] == "stopped"
    assert [(u.provider, u.api_key_id, u.file_type) for u in recorder.uploads] == [
        ("s3", KEY, "image/png"),
        ("s3", KEY, "text/plain"),
    ]
    assert [u.file_size for u in recorder.uploads] == [len(PNG), 2]
    (row,) = recorder.requests
    assert (row.method, row.path, row.status_code, row.api_key_id) == ("POST", "/upload", 200, KEY)
    assert all(u.request_id == row.id for u in recorder.uploads)
    assert recorder.stats()["written"] == 3


def test_clear_forgets_records_between_tests() -> None:
    """clear() empties the lists; the recorder keeps collecting afterwards."""
    recorder = CollectingRecorder()
    app = host_app(recorder)
    body, headers = multipart([("a", "a.png", "image/png", PNG)])
    request(app, "POST", "/upload", content=body, headers=headers)
    assert recorder.stats()["state"] == "running"
    recorder.clear()
    assert recorder.records == []
    request(app, "POST", "/upload", content=body, headers=headers)
    assert len(recorder.uploads) == 1 and len(recorder.requests) == 1
