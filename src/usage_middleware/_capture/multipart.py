"""Upload metadata from a request body as it streams past, without keeping the body.

``MultipartCapture`` feeds the body chunks to python-multipart's streaming ``MultipartParser``
and keeps, per file part, only its headers (name, declared type), a byte count and the first
``SNIFF_BYTES`` bytes — so memory does not grow with the upload; past a file's first 64 KiB, a
chunk with no delimiter in it is only counted. ``RawCapture`` does the same for a body that
*is* the file (``PUT /files/x`` with ``Content-Type: image/png``).

Both are fed with ``feed(chunk)`` and closed with ``close(complete)``; neither ever raises: a
parser error, or reaching the file or part cap (``capped``), stops parsing for the rest of that
request and is remembered in ``error``: the parser's work per request is bounded. The
middleware turns the resulting :class:`CapturedFile` list into ``file_uploads`` rows.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone

from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header

from .sniff import SNIFF_BYTES, effective_type

__all__ = [
    "CapturedFile",
    "MultipartCapture",
    "RawCapture",
    "file_name_param",
    "multipart_boundary",
    "parse_options_header",
]

logger = logging.getLogger(__name__)

UTC = timezone.utc

# Bytes of a part's header value kept. python-multipart rejects a header line over 4 KiB (its
# ``DEFAULT_MAX_HEADER_SIZE``), so the whole Content-Disposition is kept and its ``filename``
# found wherever it is; a longer value (a parser without that limit) counts as a file.
_MAX_KEPT_HEADER = 16384

# The exact forms browsers, curl and the HTTP libraries send. For them python-multipart's
# ``parse_options_header`` (a quote-aware scanner, character by character) gives exactly these
# groups: no quoting, escaping or IE path to undo. Anything else goes through it.
_PLAIN_MULTIPART = re.compile(
    rb"multipart/form-data; ?boundary=([0-9A-Za-z'()+_,./:=?-]{1,70})", re.IGNORECASE
)
_PLAIN_DISPOSITION = re.compile(rb'form-data; name="[^"\\]*"(?:; filename="([^"\\]*)")?')
_PART_DATA = MultipartState.PART_DATA
# Bytes of a file after which a message with no delimiter in it is counted without the parser.
# The message that ends such a file is scanned twice (here, then by the parser), which the
# messages counted this way repay; files shorter than this are left to the parser alone. The
# file's type is decided by then.
_COUNT_ONLY_AFTER = max(65536, SNIFF_BYTES)


@dataclass(slots=True)
class CapturedFile:
    """What one uploaded file looked like on the wire."""

    file_name: str | None
    declared_type: str | None
    size: int = 0
    complete: bool = False
    head: bytearray = field(default_factory=bytearray)
    finished_at: datetime | None = None
    file_type: str = ""

    def take(self, data: bytes, start: int, end: int) -> None:
        """Count ``data[start:end]`` and keep what of it the type is sniffed from.

        The type is decided as soon as those bytes are in, not at the file's end: by then a long
        body has flushed the CPU caches, and the same work took several times as long.
        """
        self.size += end - start
        if not self.file_type:
            self.head += data[start : min(end, start + SNIFF_BYTES - len(self.head))]
            if len(self.head) >= SNIFF_BYTES:
                self._decide_type()

    def finish(self, complete: bool) -> None:
        """Freeze the file: decide its type if not yet decided."""
        self.complete = complete
        self.finished_at = datetime.now(UTC)
        if not self.file_type:
            self._decide_type()

    def _decide_type(self) -> None:
        """The type from the head, declared type and name; the head is dropped."""
        try:
            self.file_type = effective_type(bytes(self.head), self.declared_type, self.file_name)
        except Exception:  # a matcher bug must not lose the row
            logger.exception("usage-middleware: file type detection failed")
            self.file_type = effective_type(b"", self.declared_type, self.file_name)
        self.head = bytearray()


def multipart_boundary(content_type: bytes) -> bytes | None:
    """The boundary of a ``multipart/form-data`` Content-Type, or ``None`` if it is not one."""
    plain = _PLAIN_MULTIPART.fullmatch(content_type)
    if plain is not None:
        return plain.group(1)
    kind, params = parse_options_header(content_type)
    if kind != b"multipart/form-data":
        return None
    boundary = params.get(b"boundary")
    return boundary or None


def file_name_param(disposition: bytes | None) -> bytes | None:
    """The ``filename`` parameter of a part's Content-Disposition; ``None`` for a form field."""
    plain = None if disposition is None else _PLAIN_DISPOSITION.fullmatch(disposition)
    if plain is not None:
        return plain.group(1)
    return parse_options_header(disposition)[1].get(b"filename")


def _decode(value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1")


class _Capped(Exception):
    """Raised from a parser callback to stop ``write`` at once: a cap was reached."""


class MultipartCapture:
    """Streams a multipart body through python-multipart and collects its file parts."""

    __slots__ = (
        "_count_after",
        "_current",
        "_cut_disposition",
        "_delimiter",
        "_field",
        "_headers",
        "_max_files",
        "_max_parts",
        "_parser",
        "_truncated",
        "_value",
        "capped",
        "error",
        "files",
        "finished",
        "parts",
    )

    def __init__(self, boundary: bytes, *, max_files: int, max_parts: int) -> None:
        self.files: list[CapturedFile] = []
        self.error: str | None = None
        self.finished = False
        self.capped = False  # parsing stopped at max_files or max_parts: more was not looked at
        self.parts = 0
        self._max_files = max_files
        self._max_parts = max_parts
        self._truncated = False
        self._cut_disposition = False
        self._current: CapturedFile | None = None
        self._headers: dict[bytes, bytes] = {}
        self._field = bytearray()
        self._value = bytearray()
        self._parser: MultipartParser | None = None
        self._delimiter = b"\r\n--" + boundary
        # A partial delimiter at a message's end starts at its last CR: not so if the boundary
        # holds one (no server passes such a header), so then every message goes to the parser.
        self._count_after = _COUNT_ONLY_AFTER if b"\r" not in boundary else 1 << 62
        try:
            self._parser = MultipartParser(
                boundary,
                {
                    "on_part_begin": self._on_part_begin,
                    "on_header_field": self._on_header_field,
                    "on_header_value": self._on_header_value,
                    "on_header_end": self._on_header_end,
                    "on_headers_finished": self._on_headers_finished,
                    "on_part_data": self._on_part_data,
                    "on_part_end": self._on_part_end,
                    "on_end": self._on_end,
                },
            )
        except Exception as exc:
            self.error = f"unparsable multipart body: {exc}"

    # --- parser callbacks (hot path: on_part_data) --------------------------------------------

    def _on_part_begin(self) -> None:
        self.parts += 1
        if self.parts > self._max_parts:
            raise _Capped(f"more than {self._max_parts} parts")
        self._headers = {}
        self._cut_disposition = False
        self._current = None

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        if len(self._field) < 64:
            self._field += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        room = _MAX_KEPT_HEADER - len(self._value)
        if end - start > room:
            self._truncated = True
            end = start + max(room, 0)
        self._value += data[start:end]

    def _on_header_end(self) -> None:
        name = bytes(self._field).strip().lower()
        if name in (b"content-disposition", b"content-type"):
            self._headers[name] = bytes(self._value).strip()
            if self._truncated and name == b"content-disposition":
                self._cut_disposition = True
        self._truncated = False
        self._field.clear()
        self._value.clear()

    def _on_headers_finished(self) -> None:
        raw_name = file_name_param(self._headers.get(b"content-disposition"))
        if raw_name is None and not self._cut_disposition:
            return  # a form field, not a file (a cut header may hide its filename: a file)
        if len(self.files) >= self._max_files:
            raise _Capped(f"more than {self._max_files} files")
        declared = self._headers.get(b"content-type")
        self._current = CapturedFile(
            file_name=None if raw_name is None else _decode(raw_name),
            declared_type=declared.decode("latin-1") if declared else None,
        )

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        current = self._current
        if current is not None:
            current.take(data, start, end)

    def _on_part_end(self) -> None:
        current = self._current
        if current is not None:
            self._current = None
            # An empty, nameless part is a file input the user left empty: no file.
            if current.file_name or current.size:
                current.finish(complete=True)
                self.files.append(current)

    def _on_end(self) -> None:
        self.finished = True

    # --- driver -------------------------------------------------------------------------------

    def feed(self, chunk: bytes) -> None:
        """Parse one body message.

        Well into a file, with the parser between delimiters, a message that holds no
        delimiter, nor the start of one at its end, is file data and nothing else: the parser
        would only report it as such, its state unchanged. It is counted without the parser's
        per-message work, so a long file costs about one ``bytes.find`` per message.
        """
        parser = self._parser
        if parser is None:
            return
        current = self._current
        if (
            current is not None
            and current.size >= self._count_after
            and parser.state == _PART_DATA
            and not parser.index
        ):
            delimiter = self._delimiter
            if chunk.find(delimiter) == -1:
                cr = chunk.rfind(b"\r", max(0, len(chunk) - len(delimiter) + 1))
                if cr == -1 or not delimiter.startswith(chunk[cr:]):
                    current.size += len(chunk)
                    return
        try:
            parser.write(chunk)
        except _Capped as exc:
            self.capped = True
            self._stop(str(exc))
        except Exception as exc:
            self._stop(f"malformed multipart body: {type(exc).__name__}: {exc}")

    def _stop(self, reason: str) -> None:
        self._parser = None
        if self.error is None:
            self.error = reason[:200]
        self._keep_partial()

    def _keep_partial(self) -> None:
        current = self._current
        if current is not None:
            self._current = None
            current.finish(complete=False)
            self.files.append(current)

    def close(self, body_complete: bool) -> None:
        """End of input: a part still open is kept as an incomplete file."""
        if self._parser is not None:
            self._parser = None
            if body_complete and not self.finished and self.error is None:
                self.error = "multipart body ended before its closing boundary"
        self._keep_partial()


class RawCapture:
    """A request body that is one file."""

    __slots__ = ("capped", "error", "file", "files")

    def __init__(self, file_name: str | None, declared_type: str | None) -> None:
        self.file = CapturedFile(file_name=file_name, declared_type=declared_type)
        self.files: list[CapturedFile] = []
        self.error: str | None = None
        self.capped = False

    def feed(self, chunk: bytes) -> None:
        self.file.take(chunk, 0, len(chunk))

    def close(self, body_complete: bool) -> None:
        if not self.files:
            self.file.finish(complete=body_complete)
            self.files.append(self.file)
