"""Streaming capture: the app receives identical messages, malformed bodies pass, memory is flat."""

from __future__ import annotations

import hashlib
import itertools
import subprocess
import sys
import textwrap
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.types import Message, Receive, Scope, Send
from test_middleware_helpers import JPEG, CollectingRecorder, drive, multipart

from usage_middleware import UsageMiddleware
from usage_middleware._capture.multipart import (
    file_name_param,
    multipart_boundary,
    parse_options_header,
)


class RecordingApp:
    """A bare ASGI app that keeps every message it receives and answers with their hash."""

    def __init__(self) -> None:
        self.received: list[Message] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        hasher = hashlib.sha256()
        while True:
            message = await receive()
            self.received.append(message)
            hasher.update(message.get("body", b""))
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": hasher.hexdigest().encode()})


def run(headers: list[tuple[bytes, bytes]], chunks: list[bytes]) -> tuple[Any, Any, Any]:
    """Drive a body through the middleware into RecordingApp."""
    inner = RecordingApp()
    recorder = CollectingRecorder()
    app = UsageMiddleware(inner, recorder=recorder)
    result = anyio.run(drive, app, "POST", "/in", headers, chunks)
    return inner, recorder, result


def expected_messages(chunks: list[bytes]) -> list[Message]:
    return [{"type": "http.request", "body": c, "more_body": True} for c in chunks] + [
        {"type": "http.request", "body": b"", "more_body": False}
    ]


def split(body: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(body)) for c in cuts} | {0, len(body)})
    return [body[a:b] for a, b in itertools.pairwise(points)]


part = st.tuples(
    st.sampled_from(["f", "g", "field"]),
    st.one_of(st.none(), st.sampled_from(["a.png", "b.txt", "c", "ü.pdf"])),
    st.one_of(st.none(), st.sampled_from(["image/png", "text/plain", "application/pdf"])),
    st.binary(max_size=3000),
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    parts=st.lists(part, max_size=5),
    cuts=st.lists(st.integers(min_value=0, max_value=20_000), max_size=30),
)
def test_multipart_passes_through_unchanged_and_sizes_are_exact(
    parts: list[tuple[str, str | None, str | None, bytes]], cuts: list[int]
) -> None:
    """For any parts and any chunking, the app gets the same messages and each file its size."""
    body, headers = multipart(parts, boundary="hyp0thesis-boundary")
    chunks = split(body, cuts)
    inner, recorder, result = run(headers, chunks)
    assert inner.received == expected_messages(chunks)
    assert result.body == hashlib.sha256(body).hexdigest().encode()
    files = [p for p in parts if p[1] is not None and (p[1] or p[3])]
    assert [u.file_size for u in recorder.uploads] == [len(p[3]) for p in files]
    assert all(u.upload_status == "success" for u in recorder.uploads)
    assert recorder.requests[0].request_size == len(body)


@settings(max_examples=40, deadline=None)
@given(body=st.binary(max_size=5000), cuts=st.lists(st.integers(0, 5000), max_size=10))
def test_random_bytes_declared_multipart_pass_through(body: bytes, cuts: list[int]) -> None:
    """Arbitrary bytes under a multipart Content-Type reach the app unchanged, row written."""
    chunks = split(body, cuts)
    headers = [(b"content-type", b"multipart/form-data; boundary=xyz")]
    inner, recorder, result = run(headers, chunks)
    assert inner.received == expected_messages(chunks)
    assert result.status == 200 and result.error is None
    assert len(recorder.requests) == 1


def _malformed() -> dict[str, tuple[list[tuple[bytes, bytes]], bytes]]:
    body, headers = multipart([("f", "a.jpg", "image/jpeg", JPEG)])
    many, many_headers = multipart([("f", f"{i}.txt", "text/plain", b"x") for i in range(10_000)])
    huge_header = (
        b'--b\r\nContent-Disposition: form-data; name="f"; filename="a.bin"\r\n'
        b"X-Padding: " + b"p" * 200_000 + b"\r\n\r\ndata\r\n--b--\r\n"
    )
    mp = b"multipart/form-data"
    return {
        "no boundary": ([(b"content-type", mp)], body),
        "empty boundary": ([(b"content-type", mp + b"; boundary=")], body),
        "boundary too long": ([(b"content-type", mp + b"; boundary=" + b"b" * 300)], body),
        "truncated": (headers, body[: len(body) // 2]),
        "garbage": (headers, b"\x00\xffnot multipart at all\r\n\r\n--" * 100),
        "10,000 parts": (many_headers, many),
        "huge header": ([(b"content-type", mp + b"; boundary=b")], huge_header),
        "no content type": ([], body),
    }


@pytest.mark.parametrize("case", list(_malformed()))
def test_malformed_multipart_passes_through_untouched(case: str) -> None:
    """Broken multipart never breaks the request: same messages, 200, request row written."""
    headers, body = _malformed()[case]
    chunks = [body[i : i + 4096] for i in range(0, len(body), 4096)]
    inner, recorder, result = run(headers, chunks)
    assert inner.received == expected_messages(chunks)
    assert result.status == 200 and result.error is None
    [req] = recorder.requests
    assert req.request_size == len(body)
    assert len(recorder.uploads) <= 1000


def test_truncated_multipart_records_the_partial_file_as_failed() -> None:
    """A body that ends inside a file part leaves a failed row saying it was incomplete."""
    headers, body = _malformed()["truncated"]
    _, recorder, _ = run(headers, [body])
    [upload] = recorder.uploads
    assert upload.upload_status == "failed"
    assert upload.error_message is not None and "incomplete" in upload.error_message
    assert upload.file_type == "image/jpeg"


MEMORY_SCRIPT = textwrap.dedent(
    """
    import anyio, sys
    from usage_middleware import UsageMiddleware

    class Rec:
        def __init__(self): self.records = []
        def start(self): pass
        def submit(self, r): self.records.append(r)
        def submit_many(self, rs): self.records.extend(rs)
        def shutdown(self, timeout=10): pass

    async def sink(scope, receive, send):
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    def peak_kib():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])

    rec = Rec()
    app = UsageMiddleware(sink, recorder=rec)
    boundary = b"memory-test-boundary"
    head = (b"--" + boundary + b"\\r\\nContent-Disposition: form-data; name=\\"f\\"; "
            b"filename=\\"big.bin\\"\\r\\nContent-Type: application/octet-stream\\r\\n\\r\\n")
    tail = b"\\r\\n--" + boundary + b"--\\r\\n"
    chunk = bytes(range(256)) * 256  # 64 KiB, reused: the driver itself allocates nothing

    async def upload(total):
        count = total // len(chunk)
        state = {"i": -1}
        async def receive():
            state["i"] += 1
            i = state["i"]
            if i == 0:
                return {"type": "http.request", "body": head, "more_body": True}
            if i <= count:
                return {"type": "http.request", "body": chunk, "more_body": True}
            return {"type": "http.request", "body": tail, "more_body": False}
        async def send(message):
            pass
        scope = {"type": "http", "method": "POST", "path": "/upload", "root_path": "",
                 "query_string": b"", "headers": [(b"content-type",
                 b"multipart/form-data; boundary=" + boundary)]}
        await app(scope, receive, send)

    anyio.run(upload, 1 << 16)
    before = peak_kib()
    anyio.run(upload, int(sys.argv[1]))
    after = peak_kib()
    sizes = [r.file_size for r in rec.records if hasattr(r, "file_size")]
    print(after - before, sizes[-1])
    """
)


@pytest.mark.slow
def test_a_1_gib_upload_grows_memory_by_less_than_16_mib() -> None:
    """Capturing a 1 GiB multipart upload keeps the process's peak memory flat."""
    size = 1 << 30
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(size)],
        capture_output=True,
        text=True,
        timeout=240,
        check=True,
    )
    growth_kib, recorded = (int(x) for x in out.stdout.split())
    assert recorded == size
    assert growth_kib < 16 * 1024


def _reference_boundary(content_type: bytes) -> bytes | None:
    kind, params = parse_options_header(content_type)
    return (params.get(b"boundary") or None) if kind == b"multipart/form-data" else None


header_piece = st.sampled_from(
    [
        b"multipart/form-data",
        b"Multipart/Form-Data",
        b"text/plain",
        b";",
        b"; ",
        b" ",
        b"\t",
        b"boundary=",
        b"BOUNDARY=",
        b"boundary*=",
        b"name=",
        b'"',
        b"\\",
        b"=",
        b"--b0und",
        b"----WebKitFormBoundary7MA4YWxkTrZu0gW",
        b"a'()+_,./:?-",
        b"\xe9",
        b"\x1f",
        b"x" * 71,
    ]
)


@settings(max_examples=500, deadline=None)
@given(pieces=st.lists(header_piece, max_size=8))
def test_boundary_is_what_python_multipart_reads(pieces: list[bytes]) -> None:
    """The common Content-Type forms are read without the full parser, with the same answer."""
    value = b"".join(pieces)
    assert multipart_boundary(value) == _reference_boundary(value)
    common = b"multipart/form-data; boundary=" + b"".join(pieces)
    assert multipart_boundary(common) == _reference_boundary(common)


disposition_piece = st.sampled_from(
    [
        b"form-data",
        b"Form-Data",
        b"attachment",
        b"; ",
        b";",
        b" ",
        b"name=",
        b"filename=",
        b"filename*=UTF-8''a%20b.txt",
        b'"',
        b"\\",
        b"photo.jpg",
        b"C:\\\\Users\\\\me\\\\a.png",
        b"a;b.txt",
        b"\xc3\xa9t\xc3\xa9.pdf",
        b"",
        b"=",
        b'\\"',
    ]
)


@settings(max_examples=500, deadline=None)
@given(pieces=st.lists(disposition_piece, max_size=10), name=st.sampled_from([b"f", b"my file"]))
def test_file_name_is_what_python_multipart_reads(pieces: list[bytes], name: bytes) -> None:
    """A part's filename comes out as python-multipart's parser gives it, common form or not."""
    value = b"".join(pieces)
    assert file_name_param(value) == parse_options_header(value)[1].get(b"filename")
    browser = b'form-data; name="' + name + b'"; filename="' + b"".join(pieces) + b'"'
    assert file_name_param(browser) == parse_options_header(browser)[1].get(b"filename")
    field = b'form-data; name="' + b"".join(pieces) + b'"'
    assert file_name_param(field) == parse_options_header(field)[1].get(b"filename")
