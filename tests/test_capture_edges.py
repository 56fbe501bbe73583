"""Capture at the edges: headers Starlette still accepts, caps that stop parsing, a disconnect
reported while the last body message is sent, raw bodies the app never read, long files whose
messages are counted without the parser."""

from __future__ import annotations

import functools
import hashlib
import itertools
import random
from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from python_multipart.multipart import MultipartParser
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Message
from test_middleware_helpers import (
    JPEG,
    PNG,
    CollectingRecorder,
    drive,
    multipart,
    request,
    starlette_app,
)

from usage_middleware import UsageMiddleware
from usage_middleware._capture import multipart as _capture

# --- which parts are files: Starlette's notion -----------------------------------------------


def _part(disposition: str, data: bytes, boundary: str = "B0undary") -> tuple[bytes, str]:
    body = (
        f"--{boundary}\r\nContent-Disposition: {disposition}\r\nContent-Type: image/jpeg\r\n\r\n"
    ).encode() + data
    return body + f"\r\n--{boundary}--\r\n".encode(), boundary


@pytest.mark.parametrize(
    "disposition",
    [
        'form-data; name="' + "n" * 1100 + '"; filename="cat.jpg"',
        'form-data; name="f"; note="' + "x" * 1100 + '"; filename="cat.jpg"',
        'form-data; name="f"; ' + "a=b; " * 700 + 'filename="cat.jpg"',
    ],
    ids=["1100-char-field-name", "long-extra-parameter", "many-parameters"],
)
def test_a_file_named_after_a_long_disposition_is_recorded(disposition: str) -> None:
    """Starlette stores a part with a filename parameter as a file, wherever the parameter is
    in the header; the upload gets its row."""
    app, recorder = starlette_app(record_file_names=True)
    body, boundary = _part(disposition, JPEG)
    headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
    response = request(app, "POST", "/upload", content=body, headers=headers)
    assert response.json() == {"files": ["cat.jpg"]}  # what the app got: one file
    assert [(u.file_name, u.file_type, u.file_size) for u in recorder.uploads] == [
        ("cat.jpg", "image/jpeg", len(JPEG))
    ]


@pytest.mark.parametrize(
    "content_type",
    [
        " multipart/form-data; boundary=B0undary",
        "\tmultipart/form-data; boundary=B0undary",
        "Multipart/Form-Data; boundary=B0undary",
        "MULTIPART/FORM-DATA; BOUNDARY=B0undary",
        "multipart/form-data; boundary = B0undary",
        "multipart/form-data;boundary=B0undary ",
        'multipart/form-data; boundary="B0undary"',
        "multipart/form-data ; charset=utf-8; boundary=B0undary",
    ],
)
def test_content_types_starlette_parses_give_upload_rows(content_type: str) -> None:
    """Every spelling of the multipart Content-Type that Starlette parses is captured."""
    app, recorder = starlette_app()
    body, _ = _part('form-data; name="f"; filename="cat.jpg"', JPEG)
    response = request(app, "POST", "/upload", content=body, headers={"content-type": content_type})
    assert response.json() == {"files": ["cat.jpg"]}
    assert [(u.file_type, u.file_size) for u in recorder.uploads] == [("image/jpeg", len(JPEG))]


# --- caps: parsing stops ---------------------------------------------------------------------


class PartCounter:
    """Counts the parts python-multipart's parser reports (all parsers in the process)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.parts = 0
        original = MultipartParser.callback

        def counting(parser: Any, name: str, *args: Any) -> None:
            if name == "part_begin":
                self.parts += 1
            original(parser, name, *args)  # type: ignore[arg-type]

        monkeypatch.setattr(MultipartParser, "callback", counting)


def _digest_app(**options: Any) -> tuple[UsageMiddleware, CollectingRecorder]:
    async def digest(request: Request) -> Response:
        hasher = hashlib.sha256()
        async for chunk in request.stream():
            hasher.update(chunk)
        return PlainTextResponse(hasher.hexdigest())

    recorder = CollectingRecorder()
    app = Starlette(routes=[Route("/in", digest, methods=["POST"])])
    return UsageMiddleware(app, recorder=recorder, **options), recorder


def _chunks(body: bytes, size: int = 65536) -> list[bytes]:
    return [body[i : i + size] for i in range(0, len(body), size)]


def test_parsing_stops_at_the_first_file_past_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    """20,000 tiny file parts: the parser sees max_files_per_request + 1 of them, then is
    dropped; the app still receives the whole body untouched."""
    counter = PartCounter(monkeypatch)
    app, recorder = _digest_app(max_files_per_request=1000)
    body, headers = multipart([("f", f"{i}.png", "image/png", b"x") for i in range(20_000)])
    result = anyio.run(drive, app, "POST", "/in", headers, _chunks(body))
    assert result.body == hashlib.sha256(body).hexdigest().encode()
    assert counter.parts == 1001
    assert len(recorder.uploads) == 1000
    assert app.stats()["requests_capped"] == 1


def test_parsing_stops_after_a_bounded_number_of_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    """50,000 empty form fields: parsing stops after max_files_per_request + 1000 parts."""
    counter = PartCounter(monkeypatch)
    app, recorder = _digest_app(max_files_per_request=10)
    body, headers = multipart([(f"k{i}", None, None, b"") for i in range(50_000)])
    result = anyio.run(drive, app, "POST", "/in", headers, _chunks(body))
    assert result.body == hashlib.sha256(body).hexdigest().encode()
    assert counter.parts == 10 + 1000 + 1
    assert recorder.uploads == []
    assert [r.status_code for r in recorder.requests] == [200]
    assert app.stats()["requests_capped"] == 1


def test_files_before_the_part_cap_are_recorded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A form Starlette accepts (its defaults: 1000 files, 1000 fields) is parsed whole."""
    counter = PartCounter(monkeypatch)
    app, recorder = _digest_app(max_files_per_request=1000)
    parts: list[tuple[str, str | None, str | None, bytes]] = [
        (f"k{i}", None, None, b"v") for i in range(1000)
    ]
    parts += [("f", f"{i}.png", "image/png", PNG) for i in range(1000)]
    body, headers = multipart(parts)
    anyio.run(drive, app, "POST", "/in", headers, _chunks(body))
    assert counter.parts == 2000
    assert len(recorder.uploads) == 1000
    assert {u.upload_status for u in recorder.uploads} == {"success"}
    assert app.stats()["requests_capped"] == 0


# --- a disconnect while the last body message is sent ----------------------------------------


@pytest.mark.parametrize("spec_version", ["2.0", "2.3"])
def test_disconnect_during_the_last_send_is_not_a_failure(spec_version: str) -> None:
    """Below ASGI 2.4 Starlette's StreamingResponse listens for a disconnect while it sends;
    a server may report one while the last body message is in its hands. The response was
    delivered: the rows say so."""

    async def endpoint(request: Request) -> Response:
        form = await request.form()
        await form.close()

        async def chunks() -> Any:
            yield b"one,"
            yield b"two"

        return StreamingResponse(chunks(), status_code=201)

    recorder = CollectingRecorder()
    app = UsageMiddleware(
        Starlette(routes=[Route("/upload", endpoint, methods=["POST"])]), recorder=recorder
    )
    body, headers = multipart([("f", "cat.jpg", "image/jpeg", JPEG)])
    sent: list[Message] = []

    async def run() -> None:
        last_send_started = anyio.Event()
        disconnect_reported = anyio.Event()
        requests = iter([{"type": "http.request", "body": body, "more_body": False}])

        async def receive() -> Message:
            message = next(requests, None)
            if message is not None:
                return message
            await last_send_started.wait()
            disconnect_reported.set()
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            sent.append(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                last_send_started.set()
                await disconnect_reported.wait()
                await anyio.sleep(0)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": spec_version},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/upload",
            "raw_path": b"/upload",
            "root_path": "",
            "query_string": b"",
            "headers": [(b"host", b"test"), *headers],
            "client": ("127.0.0.1", 1234),
            "server": ("127.0.0.1", 80),
        }
        with anyio.fail_after(10):
            await app(scope, receive, send)

    anyio.run(run)
    assert b"".join(m.get("body", b"") for m in sent) == b"one,two"
    [row] = recorder.requests
    assert (row.status_code, row.response_size, row.error_message) == (201, 7, None)
    assert [(u.upload_status, u.error_message) for u in recorder.uploads] == [("success", None)]


# --- raw bodies the app never read -----------------------------------------------------------


def test_a_raw_upload_rejected_unread_is_one_failed_row() -> None:
    """A raw-body request is one attempted upload even when the app answers without reading
    it: a failed row with the bytes the app read (none). A multipart body the app never read
    has no known files, so no rows (only the request's)."""

    async def forbid(request: Request) -> Response:
        return PlainTextResponse("no", status_code=403)

    async def ignore(request: Request) -> Response:
        return PlainTextResponse("ok", status_code=200)

    app, recorder = starlette_app(
        raw_upload_paths=["/files/"],
        routes=[
            Route("/files/forbidden/{name}", forbid, methods=["PUT"]),
            Route("/files/ignored/{name}", ignore, methods=["PUT"]),
        ],
    )
    for path in ("/files/forbidden/a.png", "/files/ignored/b.png"):
        request(app, "PUT", path, content=PNG, headers={"content-type": "image/png"})
    body, headers = multipart([("f", "c.png", "image/png", PNG)])
    request(app, "POST", "/reject", content=body, headers=dict(headers))
    assert [r.status_code for r in recorder.requests] == [403, 200, 401]
    assert [
        (u.request_id, u.file_type, u.file_size, u.upload_status, u.error_message)
        for u in recorder.uploads
    ] == [
        (recorder.requests[0].id, "image/png", 0, "failed", "HTTP 403"),
        (
            recorder.requests[1].id,
            "image/png",
            0,
            "failed",
            "incomplete file: the app did not read it all",
        ),
    ]


def test_a_disposition_longer_than_what_is_kept_is_a_file_without_a_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With a parser that allows header lines longer than the 16 KiB the capture keeps, a part
    whose filename may lie past them is recorded as a file without a name, not lost."""
    monkeypatch.setattr(
        _capture, "MultipartParser", functools.partial(MultipartParser, max_header_size=1 << 20)
    )
    app, recorder = _digest_app(record_file_names=True)
    for name in ("n" * 20_000, "f"):
        body, boundary = _part(f'form-data; name="{name}"; filename="cat.jpg"', JPEG)
        headers = [(b"content-type", f"multipart/form-data; boundary={boundary}".encode())]
        anyio.run(drive, app, "POST", "/in", headers, [body])
    assert [(u.file_name, u.file_type, u.file_size) for u in recorder.uploads] == [
        (None, "image/jpeg", len(JPEG)),
        ("cat.jpg", "image/jpeg", len(JPEG)),
    ]


# --- long files: messages counted without the parser ------------------------------------------

_BOUNDARY = "b0undary-Xy"
_DELIMITER = b"\r\n--" + _BOUNDARY.encode()


def _captured(chunks: list[bytes], *, parser_only: bool = False) -> tuple[Any, ...]:
    """What the capture makes of ``chunks``; ``parser_only``: every message through the parser."""
    capture = _capture.MultipartCapture(_BOUNDARY.encode(), max_files=1000, max_parts=2000)
    if parser_only:
        capture._count_after = 1 << 62
    for chunk in chunks:
        capture.feed(chunk)
    capture.close(True)
    files = [(f.file_name, f.declared_type, f.size, f.complete, f.file_type) for f in capture.files]
    return files, capture.error, capture.finished, capture.parts


def _data(rng: random.Random, size: int) -> bytes:
    """``size`` bytes of file data full of what a delimiter starts with, or nearly is."""
    out = bytearray()
    while len(out) < size:
        pick = rng.random()
        if pick < 0.5:
            out += rng.randbytes(rng.randint(1, 40_000))
        elif pick < 0.75:
            out += _DELIMITER[: rng.randint(1, len(_DELIMITER) - 1)]
        elif pick < 0.9:
            # a whole delimiter the parser reads as data: not followed by CRLF, "--" or padding
            out += _DELIMITER + rng.choice([b"X", b"-X", b"\rX"])
        else:
            out += rng.choice([b"\r", b"\r\n", b"\r\r\n--", b"--"])
    # cut short it could end in a whole delimiter, and the part with it
    return bytes(out[: size - 1]) + b"." if size else b""


def _split(rng: random.Random, body: bytes) -> list[bytes]:
    """Messages of every size, cut inside delimiters and near-delimiters on purpose."""
    cuts = set()
    at = body.find(_DELIMITER[:2])
    while at != -1:
        if rng.random() < 0.3:
            cuts.add(at + rng.randint(0, len(_DELIMITER) + 3))
        at = body.find(_DELIMITER[:2], at + 1)
    at = 0
    while at < len(body):
        at += rng.choice([1, 41, 42, 43, 4096, 65536, 65536, 65536, 100_000])
        cuts.add(at)
    points = sorted({0, len(body)} | {c for c in cuts if 0 < c < len(body)})
    return [body[a:b] for a, b in itertools.pairwise(points)]


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_long_files_are_counted_as_the_parser_counts_them(seed: int) -> None:
    """Messages counted without the parser change nothing: for bodies whose files hold delimiter
    prefixes and near-delimiters, cut anywhere (even mid-delimiter), some truncated or broken
    after a long file, the capture is the same as with every message parsed."""
    rng = random.Random(seed)
    parts: list[tuple[str, str | None, str | None, bytes]] = []
    for i in range(rng.randint(1, 3)):
        size = rng.choice([0, 100, 70_000, 140_000, 300_000])
        if rng.random() < 0.8:
            parts.append((f"f{i}", f"{i}.bin", "application/octet-stream", _data(rng, size)))
        else:
            parts.append((f"k{i}", None, None, _data(rng, size)))
    body, _ = multipart(parts, boundary=_BOUNDARY)
    damage = rng.choice(["none", "none", "truncated", "bad header", "padding"])
    if damage == "truncated":
        body = body[: rng.randint(0, len(body))]
    elif damage == "bad header":
        body = body.replace(b"Content-Type:", b"Content Type:")
    elif damage == "padding":
        body = body.replace(_DELIMITER + b"\r\n", _DELIMITER + b" \t \r\n")
    chunks = _split(rng, body)
    assert _captured(chunks) == _captured(chunks, parser_only=True)
    if damage in ("none", "padding"):
        files, error, finished, _ = _captured(chunks)
        assert error is None and finished
        assert [f[2] for f in files] == [len(p[3]) for p in parts if p[1] is not None]


@pytest.mark.parametrize("delimiter_at", range(len(_DELIMITER) + 3))
def test_a_delimiter_split_after_a_long_file_ends_it(delimiter_at: int) -> None:
    """After 200 KiB of a file, the delimiter that ends it is cut at each of its bytes (and the
    CRLF after it): the file keeps its exact size and the next file is found."""
    body, _ = multipart(
        [("f", "a.bin", None, b"a" * 200_000), ("g", "b.png", "image/png", PNG)],
        boundary=_BOUNDARY,
    )
    end = body.index(_DELIMITER)
    chunks = [body[i : i + 65536] for i in range(0, end, 65536)]
    chunks += [body[end : end + delimiter_at], body[end + delimiter_at :]]
    chunks = [c for c in chunks if c]
    files, error, finished, parts = _captured(chunks)
    assert [(f[0], f[2], f[4]) for f in files] == [
        ("a.bin", 200_000, "application/octet-stream"),
        ("b.png", len(PNG), "image/png"),
    ]
    assert (error, finished, parts) == (None, True, 2)
    assert _captured(chunks) == _captured(chunks, parser_only=True)


def test_a_long_file_is_counted_without_parsing_most_messages(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A 4 MiB file in 64 KiB messages: the parser sees the first two (the part's head, the
    file's first 64 KiB) and the last; every other message is only counted."""
    writes = 0
    original = MultipartParser.write

    def counting(parser: MultipartParser, data: bytes) -> int:
        nonlocal writes
        writes += 1
        return original(parser, data)

    monkeypatch.setattr(MultipartParser, "write", counting)
    body, _ = multipart([("f", "a.jpg", "image/jpeg", JPEG + bytes(4 << 20))], boundary=_BOUNDARY)
    chunks = [body[i : i + 65536] for i in range(0, len(body), 65536)]
    files, error, finished, _ = _captured(chunks)
    assert [(f[2], f[4]) for f in files] == [(len(JPEG) + (4 << 20), "image/jpeg")]
    assert error is None and finished
    assert writes == 3
