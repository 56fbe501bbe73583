"""A small ASGI app whose endpoint hands records to a Recorder, served by uvicorn/gunicorn in
the reliability tests. Configured by environment: USAGE_TEST_DB_URL, USAGE_TEST_SPOOL."""

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

store = UsageStore(os.environ["USAGE_TEST_DB_URL"])
recorder = Recorder(
    store,
    spool_path=os.environ["USAGE_TEST_SPOOL"],
    flush_interval=0.1,
    backoff_initial=0.05,
    backoff_max=0.5,
)


async def upload(request: Request) -> JSONResponse:
    body = await request.body()
    request_id = uuid.UUID(request.query_params["id"])
    recorder.submit(
        UploadRecord(
            id=request_id,
            request_id=request_id,
            provider="test",
            file_type="image/png",
            file_size=len(body),
        )
    )
    recorder.submit(RequestRecord(id=request_id, method="POST", path="/upload", status_code=200))
    return JSONResponse({"pid": os.getpid()})


async def stats(request: Request) -> JSONResponse:
    return JSONResponse(recorder.stats())


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    recorder.start()
    yield
    await anyio.to_thread.run_sync(recorder.shutdown, 10.0)


app = Starlette(
    routes=[Route("/upload", upload, methods=["POST"]), Route("/stats", stats)],
    lifespan=lifespan,
)
