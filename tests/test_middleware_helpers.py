"""Capture-test helpers (no tests here): a collecting recorder, real apps, an ASGI driver."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import anyio
import httpx
from fastapi import FastAPI
from fastapi import Request as FastAPIRequest
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.types import ASGIApp, Message
from starlette.websockets import WebSocket

from usage_middleware import UsageMiddleware, annotate
from usage_middleware.testing import CollectingRecorder


def _annotations(params: Any) -> dict[str, Any]:
    fields = {}
    for name in ("provider", "api_key_id", "upload_status", "error_message"):
        if name in params:
            fields[name] = params[name]
    return fields


async def upload(request: Request) -> Response:
    """Reads the form like a real upload endpoint; query parameters steer the outcome."""
    form = await request.form()
    files = [v for _, v in form.multi_items() if not isinstance(v, str)]
    names = [f.filename for f in files]
    await form.close()
    annotate(request, **_annotations(request.query_params))
    if "raise" in request.query_params:
        raise RuntimeError("storage provider down")
    status = int(request.query_params.get("status", "200"))
    return JSONResponse({"files": names}, status_code=status)


async def digest(request: Request) -> Response:
    """Hashes the body exactly as the app receives it."""
    hasher = hashlib.sha256()
    async for chunk in request.stream():
        hasher.update(chunk)
    return PlainTextResponse(hasher.hexdigest())


async def item(request: Request) -> Response:
    return JSONResponse({"id": request.path_params["item_id"]})


async def boom(request: Request) -> Response:
    raise ValueError("exploded before sending")


async def late_boom(request: Request) -> Response:
    async def body() -> Any:
        yield b"partial"
        raise ValueError("exploded while streaming")

    return StreamingResponse(body())


async def slow_background(request: Request) -> Response:
    return PlainTextResponse("done", background=BackgroundTask(asyncio.sleep, 0.3))


async def reject(request: Request) -> Response:
    return PlainTextResponse("no key", status_code=401)


async def echo(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_text(await websocket.receive_text())
    await websocket.close()


def starlette_app(**options: Any) -> tuple[Starlette, CollectingRecorder]:
    """A Starlette app with the middleware (options pass through) and a collecting recorder."""
    recorder = options.pop("recorder", None) or CollectingRecorder()
    extra = options.pop("routes", [])
    routes = [
        Route("/upload", upload, methods=["POST"]),
        Route("/digest", digest, methods=["POST", "PUT"]),
        Route("/items/{item_id}", item),
        Route("/boom", boom),
        Route("/late-boom", late_boom),
        Route("/slow-background", slow_background),
        Route("/reject", reject, methods=["POST"]),
        WebSocketRoute("/ws", echo),
        Mount("/orgs/{org}", routes=[Route("/items/{item_id}", item)]),
        *extra,
    ]
    app = Starlette(routes=routes)
    app.add_middleware(UsageMiddleware, recorder=recorder, **options)
    return app, recorder


def fastapi_app(**options: Any) -> tuple[FastAPI, CollectingRecorder]:
    """The same endpoints as a FastAPI app (an APIRouter with a prefix included)."""
    from fastapi import APIRouter

    recorder = options.pop("recorder", None) or CollectingRecorder()
    app = FastAPI()
    api = APIRouter(prefix="/v1")

    @app.post("/upload")
    async def fa_upload(request: FastAPIRequest) -> Response:
        return await upload(request)

    @app.post("/digest")
    async def fa_digest(request: FastAPIRequest) -> Response:
        return await digest(request)

    @app.get("/items/{item_id}")
    async def fa_item(item_id: int) -> dict[str, int]:
        return {"id": item_id}

    @api.get("/things/{thing_id}")
    async def fa_thing(thing_id: str) -> dict[str, str]:
        return {"id": thing_id}

    @app.get("/boom")
    async def fa_boom() -> None:
        raise ValueError("exploded before sending")

    @app.get("/slow-background")
    async def fa_slow(request: FastAPIRequest) -> Response:
        return await slow_background(request)

    @app.post("/reject")
    async def fa_reject() -> Response:
        return PlainTextResponse("no key", status_code=401)

    app.include_router(api)
    app.add_middleware(UsageMiddleware, recorder=recorder, **options)
    return app, recorder


def request(app: ASGIApp, method: str, url: str, **kwargs: Any) -> httpx.Response:
    """One request through the real app (httpx's ASGI transport), 500s returned, not raised."""

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, url, **kwargs)

    return anyio.run(go)


class Exchange:
    """What an ASGI driver saw: the response messages and any exception the app raised."""

    def __init__(self) -> None:
        self.sent: list[Message] = []
        self.error: BaseException | None = None

    @property
    def status(self) -> int | None:
        for message in self.sent:
            if message["type"] == "http.response.start":
                return int(message["status"])
        return None

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")


async def drive(
    app: ASGIApp,
    method: str,
    path: str,
    headers: list[tuple[bytes, bytes]],
    chunks: list[bytes],
    *,
    disconnect: bool = False,
) -> Exchange:
    """Send ``chunks`` as separate ``http.request`` messages (then ``http.disconnect`` instead
    of the final message when ``disconnect``); collect the response."""
    messages: list[Message] = [
        {"type": "http.request", "body": chunk, "more_body": True} for chunk in chunks
    ]
    if disconnect:
        messages.append({"type": "http.disconnect"})
    else:
        messages.append({"type": "http.request", "body": b"", "more_body": False})
    pending = iter(messages)
    result = Exchange()

    async def receive() -> Message:
        message = next(pending, None)
        if message is None:
            await anyio.sleep(3600)  # a real server blocks until the client goes away
            return {"type": "http.disconnect"}
        return message

    async def send(message: Message) -> None:
        result.sent.append(message)

    path, _, query = path.partition("?")
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": query.encode(),
        "headers": [(b"host", b"test"), *headers],
        "client": ("127.0.0.1", 1234),
        "server": ("127.0.0.1", 80),
    }
    try:
        with anyio.fail_after(30):
            await app(scope, receive, send)
    except Exception as exc:
        result.error = exc
    return result


def multipart(
    parts: list[tuple[str, str | None, str | None, bytes]], boundary: str = "b0undary-Xy"
) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """A multipart/form-data body of (field name, file name or None, content type, data)."""
    out = bytearray()
    for name, file_name, content_type, data in parts:
        out += f"--{boundary}\r\n".encode()
        disposition = f'form-data; name="{name}"'
        if file_name is not None:
            disposition += f'; filename="{file_name}"'
        out += f"Content-Disposition: {disposition}\r\n".encode()
        if content_type is not None:
            out += f"Content-Type: {content_type}\r\n".encode()
        out += b"\r\n" + data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    headers = [(b"content-type", f"multipart/form-data; boundary={boundary}".encode())]
    return bytes(out), headers


JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00" + bytes(300)
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x02\x00\x00\x00"
HTML = b"<!DOCTYPE html><html><script>alert(1)</script></html>"


class Lifespan:
    """Runs an app's lifespan like a server: ``async with Lifespan(app) as client: ...``.

    Requests in between go through httpx's ASGI transport (no lifespan of its own)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.sent: list[str] = []
        self._to_app: Any = None
        self._from_app: Any = None
        self._group: Any = None
        self._client: httpx.AsyncClient | None = None
        self._streams: tuple[Any, ...] = ()

    async def __aenter__(self) -> httpx.AsyncClient:
        self._to_app, to_app_out = anyio.create_memory_object_stream[Message](4)
        from_app_in, self._from_app = anyio.create_memory_object_stream[Message](4)
        self._streams = (self._to_app, to_app_out, from_app_in, self._from_app)

        async def receive() -> Message:
            return await to_app_out.receive()

        async def send(message: Message) -> None:
            self.sent.append(message["type"])
            await from_app_in.send(message)

        self._group = anyio.create_task_group()
        await self._group.__aenter__()
        self._group.start_soon(
            self.app, {"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send
        )
        await self._to_app.send({"type": "lifespan.startup"})
        with anyio.fail_after(10):
            assert (await self._from_app.receive())["type"] == "lifespan.startup.complete"
        transport = httpx.ASGITransport(app=self.app, raise_app_exceptions=False)
        self._client = httpx.AsyncClient(transport=transport, base_url="http://test")
        return self._client

    async def __aexit__(self, *exc: object) -> None:
        assert self._client is not None
        await self._client.aclose()
        await self._to_app.send({"type": "lifespan.shutdown"})
        with anyio.fail_after(30):
            assert (await self._from_app.receive())["type"] == "lifespan.shutdown.complete"
        await self._group.__aexit__(None, None, None)
        for stream in self._streams:
            stream.close()


async def websocket_echo(app: ASGIApp, path: str, text: str) -> list[Message]:
    """Open a websocket, send one text frame, close; return what the app sent."""
    incoming: list[Message] = [
        {"type": "websocket.connect"},
        {"type": "websocket.receive", "text": text},
        {"type": "websocket.disconnect", "code": 1000},
    ]
    sent: list[Message] = []

    async def receive() -> Message:
        return incoming.pop(0) if incoming else {"type": "websocket.disconnect", "code": 1000}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "websocket",
        "asgi": {"version": "3.0"},
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"test")],
        "scheme": "ws",
        "client": ("127.0.0.1", 1234),
        "server": ("127.0.0.1", 80),
        "subprotocols": [],
    }
    with anyio.fail_after(10):
        await app(scope, receive, send)
    return sent
