"""A small ASGI app whose endpoint hands records to a Recorder, for the reliability tests and the
recorder benchmark. ``create_app()`` reads its configuration from the environment:
USAGE_TEST_DB_URL, USAGE_TEST_SPOOL, and USAGE_TEST_START_EARLY=1 to start the recorder at
import time (before a pre-forking server forks, which the recorder must survive)."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from usage_middleware import Recorder, RequestRecord, UploadRecord, UsageStore


def build_app(recorder: Recorder) -> Starlette:
    """``POST /upload?id=<uuid>`` submits one upload and one request record with that id."""

    async def upload(request: Request) -> JSONResponse:
        body = await request.body()
        record_id = uuid.UUID(request.query_params["id"])
        recorder.submit(
            UploadRecord(
                id=record_id,
                request_id=record_id,
                provider="test",
                file_type="image/png",
                file_size=len(body),
            )
        )
        recorder.submit(
            RequestRecord(id=record_id, method="POST", path="/upload", request_size=len(body))
        )
        return JSONResponse({"pid": os.getpid()})

    async def stats(request: Request) -> JSONResponse:
        return JSONResponse(recorder.stats())

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        recorder.start()
        yield
        await anyio.to_thread.run_sync(recorder.shutdown, 10.0)

    return Starlette(
        routes=[Route("/upload", upload, methods=["POST"]), Route("/stats", stats)],
        lifespan=lifespan,
    )


def create_app() -> Starlette:
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
