"""The two row types the package stores: one per uploaded file, one per HTTP request.

Records validate and normalise themselves on construction, so a bad value raises a
``ValueError`` naming the field at the call site, long before any batch is written. Text is
made safe for every backend (PostgreSQL ``text`` cannot hold NUL) and capped in length. Sizes
and times are bounded so that the rollups' bigint sums of them cannot overflow in any realistic
group: a record the database would refuse is refused here, not retried by the recorder.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

import uuid_utils

from ._schema import STANDARD_METHODS

__all__ = [
    "RequestRecord",
    "UploadRecord",
    "new_id",
    "new_id_int",
    "normal_request_values",
    "normal_upload_values",
    "normalize_mime",
    "uuid_from_int",
]

UTC = timezone.utc
UPLOAD_STATUSES = frozenset({"success", "failed"})
OCTET_STREAM = "application/octet-stream"

_MAX_PROVIDER = 64
_MAX_MIME = 127
_MAX_FILE_NAME = 255
_MAX_ERROR = 500
_MAX_PATH = 512
_MAX_METHOD = 16
# 1 PiB: 8,191 such sizes still fit one bigint rollup counter.
MAX_SIZE = 2**50
# A year: 292,000 such times, in microseconds, still fit one bigint rollup counter.
MAX_RESPONSE_TIME_MS = 365 * 86_400_000.0

UploadStatus = Literal["success", "failed"]


_new_object = object.__new__
_UUID = uuid.UUID
# UUID is immutable (its __setattr__ raises); its slots' own setters are the cheapest way in.
_set_uuid_int: Callable[[uuid.UUID, int], None] = vars(_UUID)["int"].__set__
_set_uuid_safe: Callable[[uuid.UUID, uuid.SafeUUID], None] = vars(_UUID)["is_safe"].__set__
_SAFE_UNKNOWN = uuid.SafeUUID.unknown
# The generator's 128-bit integer; the private name is what ``uuid_utils.compat`` itself uses.
_uuid7_int: Callable[[], int] = getattr(uuid_utils, "_uuid7_int", lambda: uuid_utils.uuid7().int)


def new_id_int() -> int:
    """The 128-bit integer of a :func:`new_id` (for rows kept as values)."""
    return _uuid7_int()


def new_id() -> uuid.UUID:
    """A new time-ordered (version 7) UUID: sorts by creation time, so inserts stay local.

    Made from the native generator's integer without ``UUID.__init__``'s argument parsing
    (the value is always in range), as ``uuid_utils.compat`` does: a third of the cost.
    """
    return uuid_from_int(_uuid7_int())


def uuid_from_int(value: int) -> uuid.UUID:
    """``uuid.UUID(int=value)`` for a value known to be in range, without ``__init__``'s
    argument parsing (a third of the cost): for ids that were UUIDs a moment ago."""
    out = _new_object(_UUID)
    _set_uuid_int(out, value)
    _set_uuid_safe(out, _SAFE_UNKNOWN)
    return out


def _now() -> datetime:
    return datetime.now(UTC)


def _text(value: Any, name: str, limit: int, *, required: bool = False) -> str | None:
    if value is None:
        if required:
            raise ValueError(f"{name} is required (got None)")
        return None
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a str, got {type(value).__name__}")
    text: str = value
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text


def normalize_mime(value: str | None) -> str | None:
    """``'Image/JPEG; charset=x'`` -> ``'image/jpeg'``; empty -> ``None``."""
    if not value:
        return None
    value = value.split(";", 1)[0].strip().lower()
    if not value:
        return None
    if "\x00" in value:
        value = value.replace("\x00", "\ufffd")
    return value[:_MAX_MIME]


def _uuid(value: Any, name: str) -> uuid.UUID | None:
    if value is None or type(value) is uuid.UUID:
        return value
    if isinstance(value, uuid.UUID):
        return uuid.UUID(int=value.int)
    if isinstance(value, str):
        try:
            return uuid.UUID(value)
        except ValueError:
            raise ValueError(f"{name} must be a UUID, got {value!r:.60}") from None
    raise ValueError(f"{name} must be a UUID or str, got {type(value).__name__}")


def _size(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    if value > MAX_SIZE:
        raise ValueError(f"{name} must be at most 2**50 (1 PiB), got {value}")
    return value


def _timestamp(value: Any, name: str) -> datetime:
    if not isinstance(value, datetime):
        raise ValueError(f"{name} must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware (got naive {value.isoformat()})")
    when: datetime = value
    if when.tzinfo is not UTC:
        when = when.astimezone(UTC)
    return when


def normal_request_values(
    method: Any,
    path: Any,
    status_code: Any,
    response_time_ms: Any,
    request_size: Any,
    response_size: Any,
    error_message: Any,
    requested_at: Any,
    route_matched: Any,
    /,
) -> bool:
    """A request's fields (but its ids) are what validation would leave them as: exact types,
    values in range, no text to cap or mend. Validation keeps such values unchanged, so a
    request made of them needs none (see ``RequestRecord.validate``)."""
    return (
        type(method) is str
        and method in STANDARD_METHODS  # upper case and short: normal at a glance
        and type(path) is str
        and 0 < len(path) <= _MAX_PATH
        and "\x00" not in path
        and type(status_code) is int
        and 100 <= status_code <= 599
        and type(response_time_ms) is float
        and 0 <= response_time_ms <= MAX_RESPONSE_TIME_MS
        and type(request_size) is int
        and 0 <= request_size <= MAX_SIZE
        and type(response_size) is int
        and 0 <= response_size <= MAX_SIZE
        and (
            error_message is None
            or (
                type(error_message) is str
                and len(error_message) <= _MAX_ERROR
                and "\x00" not in error_message
            )
        )
        and type(requested_at) is datetime
        and requested_at.tzinfo is UTC
        and type(route_matched) is bool
    )


def _normal_mime(value: Any) -> bool:
    """``value`` is a str that :func:`normalize_mime` returns unchanged."""
    return (
        type(value) is str
        and 0 < len(value) <= _MAX_MIME
        and ";" not in value
        and "\x00" not in value
        and value.strip().lower() == value
    )


def _normal_text(value: Any, limit: int) -> bool:
    """``value`` is None or a str that ``_text`` keeps as it is."""
    return value is None or (type(value) is str and len(value) <= limit and "\x00" not in value)


def normal_upload_values(
    provider: Any,
    file_type: Any,
    file_size: Any,
    upload_status: Any,
    declared_type: Any,
    file_name: Any,
    error_message: Any,
    uploaded_at: Any,
    /,
) -> bool:
    """An upload's fields (but its ids) are what validation would leave them as (see
    :func:`normal_request_values`)."""
    return (
        type(provider) is str
        and 0 < len(provider) <= _MAX_PROVIDER
        and "\x00" not in provider
        and provider.strip() == provider
        and _normal_mime(file_type)
        and type(file_size) is int
        and 0 <= file_size <= MAX_SIZE
        and type(upload_status) is str
        and upload_status in UPLOAD_STATUSES
        and (declared_type is None or (_normal_mime(declared_type) and declared_type != file_type))
        and _normal_text(file_name, _MAX_FILE_NAME)
        and _normal_text(error_message, _MAX_ERROR)
        and type(uploaded_at) is datetime
        and uploaded_at.tzinfo is UTC
    )


@dataclass(slots=True, kw_only=True)
class UploadRecord:
    """One uploaded file: a row of ``file_uploads``."""

    provider: str = "unknown"
    file_type: str = OCTET_STREAM
    file_size: int = 0
    upload_status: UploadStatus = "success"
    api_key_id: uuid.UUID | None = None
    request_id: uuid.UUID | None = None
    declared_type: str | None = None
    file_name: str | None = None
    error_message: str | None = None
    uploaded_at: datetime = field(default_factory=_now)
    id: uuid.UUID = field(default_factory=new_id)

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def _unchecked(
        cls,
        provider: str,
        file_type: str,
        declared_type: str | None,
        file_size: int,
        upload_status: UploadStatus,
        error_message: str | None,
        api_key_id: uuid.UUID | None,
        request_id: uuid.UUID | None,
        file_name: str | None,
        uploaded_at: datetime,
        /,
    ) -> UploadRecord:
        """A record of values the caller produced itself (``file_type`` already normalised,
        ids, size, status and an aware UTC time of its own), built without checking their types.

        Only what came from the client or a hook is normalised, as :meth:`validate` would, so the
        record reads the same before and after ``UsageStore.write`` validates it.
        """
        record = _new_object(cls)
        text = _text(provider, "provider", _MAX_PROVIDER, required=True)
        record.provider = text.strip() or "unknown" if text is not None else "unknown"
        record.file_type = file_type
        declared = normalize_mime(declared_type)
        record.declared_type = None if declared == file_type else declared
        record.file_size = file_size
        record.upload_status = upload_status
        record.error_message = _text(error_message, "error_message", _MAX_ERROR)
        record.api_key_id = api_key_id
        record.request_id = request_id
        record.file_name = _text(file_name, "file_name", _MAX_FILE_NAME)
        record.uploaded_at = uploaded_at
        record.id = new_id()
        return record

    def validate(self) -> None:
        """Check and normalise every field; raises ``ValueError`` naming the first bad one."""
        if not self._is_normal():
            self._normalise()

    def _is_normal(self) -> bool:
        """Every field is already what :meth:`_normalise` would leave it as (as
        ``RequestRecord._is_normal``)."""
        key, request = self.api_key_id, self.request_id
        return (
            type(self.id) is _UUID
            and (key is None or type(key) is _UUID)
            and (request is None or type(request) is _UUID)
            and normal_upload_values(
                self.provider,
                self.file_type,
                self.file_size,
                self.upload_status,
                self.declared_type,
                self.file_name,
                self.error_message,
                self.uploaded_at,
            )
        )

    def _normalise(self) -> None:
        self.id = _uuid(self.id, "id") or new_id()
        self.api_key_id = _uuid(self.api_key_id, "api_key_id")
        self.request_id = _uuid(self.request_id, "request_id")
        provider = _text(self.provider, "provider", _MAX_PROVIDER, required=True)
        self.provider = provider.strip() or "unknown" if provider is not None else "unknown"
        if not isinstance(self.file_type, str):
            raise ValueError(f"file_type must be a str, got {type(self.file_type).__name__}")
        self.file_type = normalize_mime(self.file_type) or OCTET_STREAM
        if self.declared_type is not None:
            if not isinstance(self.declared_type, str):
                raise ValueError(
                    f"declared_type must be a str, got {type(self.declared_type).__name__}"
                )
            declared = normalize_mime(self.declared_type)
            self.declared_type = None if declared == self.file_type else declared
        self.file_size = _size(self.file_size, "file_size")
        if self.upload_status not in UPLOAD_STATUSES:
            raise ValueError(
                f"upload_status must be 'success' or 'failed', got {self.upload_status!r:.40}"
            )
        self.file_name = _text(self.file_name, "file_name", _MAX_FILE_NAME)
        self.error_message = _text(self.error_message, "error_message", _MAX_ERROR)
        self.uploaded_at = _timestamp(self.uploaded_at, "uploaded_at")


@dataclass(slots=True, kw_only=True)
class RequestRecord:
    """One HTTP request: a row of ``api_requests``."""

    method: str = "GET"
    path: str = "/"
    status_code: int = 200
    response_time_ms: float = 0.0
    request_size: int = 0
    response_size: int = 0
    api_key_id: uuid.UUID | None = None
    error_message: str | None = None
    requested_at: datetime = field(default_factory=_now)
    id: uuid.UUID = field(default_factory=new_id)
    #: ``path`` is a route the application matched (its template), not an unmatched raw path.
    #: Request rollups group unmatched paths under one label, so a scanner probing random
    #: paths adds one group, not one per path.
    route_matched: bool = True

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def _unchecked(
        cls,
        method: str,
        path: str,
        status_code: int,
        response_time_ms: float,
        request_size: int,
        response_size: int,
        api_key_id: uuid.UUID | None,
        error_message: str | None,
        requested_at: datetime,
        route_matched: bool,
        /,
    ) -> RequestRecord:
        """A record of values the caller produced itself, built without validating them.

        For the middleware's per-request path, where validation would be half its cost.
        Nothing unchecked is stored: ``UsageStore.write`` validates every record first.
        """
        record = _new_object(cls)
        record.method = method
        record.path = path
        record.status_code = status_code
        record.response_time_ms = response_time_ms
        record.request_size = request_size
        record.response_size = response_size
        record.api_key_id = api_key_id
        record.error_message = error_message
        record.requested_at = requested_at
        record.route_matched = route_matched
        record_id = _new_object(_UUID)  # new_id(), inlined: this runs once per request
        _set_uuid_int(record_id, _uuid7_int())
        _set_uuid_safe(record_id, _SAFE_UNKNOWN)
        record.id = record_id
        return record

    def validate(self) -> None:
        """Check and normalise every field; raises ``ValueError`` naming the first bad one."""
        if not self._is_normal():
            self._normalise()

    def _is_normal(self) -> bool:
        """Every field is already what :meth:`_normalise` would leave it as: exact types, values
        in range, nothing to cap or replace. What the middleware builds is, and this check costs
        about a third of the full pass; the store validates every request it writes."""
        key = self.api_key_id
        return (
            type(self.id) is _UUID
            and (key is None or type(key) is _UUID)
            and normal_request_values(
                self.method,
                self.path,
                self.status_code,
                self.response_time_ms,
                self.request_size,
                self.response_size,
                self.error_message,
                self.requested_at,
                self.route_matched,
            )
        )

    def _normalise(self) -> None:
        self.id = _uuid(self.id, "id") or new_id()
        self.api_key_id = _uuid(self.api_key_id, "api_key_id")
        method = _text(self.method, "method", _MAX_METHOD, required=True)
        self.method = method.upper() if method is not None else "GET"
        self.path = _text(self.path, "path", _MAX_PATH, required=True) or "/"
        status = self.status_code
        if isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 599:
            raise ValueError(f"status_code must be an int in 100..599, got {status!r:.40}")
        ms = self.response_time_ms
        if isinstance(ms, bool) or not isinstance(ms, (int, float)):
            raise ValueError(f"response_time_ms must be a number, got {type(ms).__name__}")
        if not 0 <= ms <= MAX_RESPONSE_TIME_MS:  # NaN fails this too
            raise ValueError(
                f"response_time_ms must be in 0..{MAX_RESPONSE_TIME_MS:.0f} (a year), got {ms!r}"
            )
        self.response_time_ms = float(ms)
        self.request_size = _size(self.request_size, "request_size")
        self.response_size = _size(self.response_size, "response_size")
        self.error_message = _text(self.error_message, "error_message", _MAX_ERROR)
        self.requested_at = _timestamp(self.requested_at, "requested_at")
        if type(self.route_matched) is not bool:
            raise ValueError(
                f"route_matched must be a bool, got {type(self.route_matched).__name__}"
            )
