"""One request's exchange with the server: the wrapped ``receive`` and ``send``.

Per chunk it only counts bytes and feeds the upload capture; the status is taken at
``http.response.start`` and the clock stops at the last body message.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Awaitable
from time import perf_counter

from starlette.types import Message, Receive, Scope, Send

from .multipart import MultipartCapture, RawCapture

__all__ = ["Capture", "Exchange", "header"]

Capture = MultipartCapture | RawCapture


class Exchange:
    """One request's state: counters from the messages and its upload capture; its bound
    ``receive``/``send`` are what the app is given.

    It holds the server's ``send`` (and so, in uvicorn, the server's per-request object, which
    holds the scope): it must never be reachable from the scope, or every request would leave a
    reference cycle for the garbage collector.
    """

    __slots__ = (
        "_receive",
        "_send",
        "body_done",
        "capture",
        "disconnected",
        "end",
        "handed_over",
        "received",
        "sent",
        "status",
    )

    def __init__(self, receive: Receive, send: Send, capture: Capture | None) -> None:
        self._receive = receive
        self._send = send
        self.capture = capture
        self.received = 0
        self.sent = 0
        self.status: int | None = None
        self.end: float | None = None  # perf_counter() once the last body message was sent
        # Set before the last body message is awaited: a disconnect the server reports while
        # that send is in progress (ASGI < 2.4 servers listen for one meanwhile) is no failure.
        self.handed_over = False
        self.body_done = False
        self.disconnected = False

    async def receive(self) -> Message:
        message = await self._receive()
        kind = message["type"]
        if kind == "http.request":
            body = message.get("body", b"")
            if body:
                self.received += len(body)
                if self.capture is not None:
                    self.capture.feed(body)
            if not message.get("more_body", False):
                self.body_done = True
        elif kind == "http.disconnect" and not self.handed_over:
            self.disconnected = True
        return message

    def send(self, message: Message) -> Awaitable[None]:
        """Count, then return the server's own awaitable: no coroutine of ours per message,
        except around the last one, after which the clock stops."""
        kind = message["type"]
        if kind == "http.response.start":
            self.status = message["status"]
        elif kind == "http.response.body":
            body = message.get("body", b"")
            if body:
                self.sent += len(body)
            if not message.get("more_body", False):
                return self._send_last(message)
        elif kind == "http.response.pathsend":
            return self._send_file(message)
        return self._send(message)

    async def _send_last(self, message: Message) -> None:
        self.handed_over = True
        await self._send(message)
        self.end = perf_counter()

    async def _send_file(self, message: Message) -> None:
        self.handed_over = True
        await self._send(message)
        self.end = perf_counter()
        with contextlib.suppress(OSError):
            self.sent += os.path.getsize(message["path"])

    def error_text(self, error: BaseException | None) -> str | None:
        """The request's ``error_message``: the exception, and whether the client went away."""
        text = None
        if error is not None:
            message = str(error)
            text = f"{type(error).__name__}: {message}" if message else type(error).__name__
        if self.disconnected:
            what = "mid-body" if not self.body_done else "before the response completed"
            text = f"client disconnected {what}" + (f" ({text})" if text else "")
        return text


def header(scope: Scope, wanted: bytes) -> bytes | None:
    for name, value in scope.get("headers", ()):
        if name == wanted:
            return bytes(value)
    return None
