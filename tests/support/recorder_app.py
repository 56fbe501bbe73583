"""A small upload app behind UsageMiddleware with a given Recorder, for the reliability tests and
the recorder benchmark. ``create_app()`` reads its configuration from the environment:
USAGE_TEST_DB_URL, USAGE_TEST_SPOOL, and USAGE_TEST_START_EARLY=1 to start the recorder at
import time (before a pre-forking server forks, which the recorder must survive)."""

from __future__ import annotations

import os

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from usage_middleware import Recorder, UsageMiddleware, UsageStore


def build_app(recorder: Recorder) -> UsageMiddleware:
    """``POST /upload`` takes a multipart upload; the middleware records the request and each file
    (file names kept, so a test can name every upload); ``GET /stats`` is not recorded."""

    async def upload(request: Request) -> JSONResponse:
        async with request.form() as form:
            files = [f for f in form.values() if not isinstance(f, str)]
        return JSONResponse({"pid": os.getpid(), "files": len(files)})

    async def stats(request: Request) -> JSONResponse:
        return JSONResponse(recorder.stats())

    app = Starlette(routes=[Route("/upload", upload, methods=["POST"]), Route("/stats", stats)])
    return UsageMiddleware(
        app,
        recorder=recorder,
        provider="test",
        exclude_paths=["/stats"],
        record_file_names=True,
        shutdown_timeout=10.0,
    )


def create_app() -> UsageMiddleware:
    store = UsageStore(os.environ["USAGE_TEST_DB_URL"], connect_timeout=2)
    recorder = Recorder(
        store,
        spool_path=os.environ["USAGE_TEST_SPOOL"],
        flush_interval=0.1,
        backoff_initial=0.05,
        backoff_max=0.5,
    )
    if os.environ.get("USAGE_TEST_START_EARLY") == "1":
        recorder.start()
    return build_app(recorder)
