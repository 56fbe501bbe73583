"""UploadRecord / RequestRecord validation: bad values raise ValueError naming the field."""

from __future__ import annotations

import pickle
import uuid
from collections.abc import Callable
from dataclasses import fields
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from usage_middleware import RequestRecord, UploadRecord

UTC = timezone.utc


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"file_size": -1}, "file_size"),
        ({"file_size": 1.5}, "file_size"),
        ({"file_size": True}, "file_size"),
        ({"file_size": 2**63}, "file_size"),
        ({"file_size": 2**62}, "file_size"),  # two of them overflow a bigint rollup sum
        ({"file_size": 2**50 + 1}, "file_size"),
        ({"upload_status": "ok"}, "upload_status"),
        ({"uploaded_at": datetime(2025, 1, 1)}, "uploaded_at"),
        ({"uploaded_at": "2025-01-01"}, "uploaded_at"),
        ({"api_key_id": "not-a-uuid"}, "api_key_id"),
        ({"request_id": 12}, "request_id"),
        ({"provider": None}, "provider"),
        ({"provider": 5}, "provider"),
        ({"file_type": b"image/png"}, "file_type"),
        ({"file_name": 3}, "file_name"),
    ],
)
def test_upload_record_rejects_bad_fields(fields: dict[str, object], named: str) -> None:
    """Each invalid upload field raises ValueError whose message names that field."""
    with pytest.raises(ValueError, match=named):
        UploadRecord(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"status_code": 99}, "status_code"),
        ({"status_code": "200"}, "status_code"),
        ({"response_time_ms": -1.0}, "response_time_ms"),
        ({"response_time_ms": float("nan")}, "response_time_ms"),
        ({"response_time_ms": float("inf")}, "response_time_ms"),
        ({"response_time_ms": 365 * 86_400_000.0 + 1}, "response_time_ms"),
        ({"request_size": -3}, "request_size"),
        ({"request_size": 2**50 + 1}, "request_size"),
        ({"response_size": 2**62}, "response_size"),
        ({"response_size": None}, "response_size"),
        ({"requested_at": datetime(2025, 1, 1)}, "requested_at"),
        ({"method": None}, "method"),
        ({"path": None}, "path"),
    ],
)
def test_request_record_rejects_bad_fields(fields: dict[str, object], named: str) -> None:
    """Each invalid request field raises ValueError whose message names that field."""
    with pytest.raises(ValueError, match=named):
        RequestRecord(**fields)  # type: ignore[arg-type]


def test_sizes_and_times_are_bounded_so_rollup_sums_cannot_overflow() -> None:
    """The largest values a record may state: 1 PiB, a year; 8,191 such sizes fit a bigint."""
    assert UploadRecord(file_size=2**50).file_size == 2**50
    request = RequestRecord(
        request_size=2**50, response_size=2**50, response_time_ms=365 * 86_400_000.0
    )
    assert (request.request_size, request.response_time_ms) == (2**50, 365 * 86_400_000.0)


def test_upload_record_normalises_values() -> None:
    """MIME types lose parameters and case, timestamps become UTC, text loses NUL, ids parse."""
    key = uuid.uuid4()
    record = UploadRecord(
        api_key_id=str(key),
        provider="  ",
        file_type="Image/JPEG; q=1",
        declared_type="image/jpeg",
        file_name="a\x00b",
        uploaded_at=datetime(2025, 1, 1, 2, tzinfo=timezone(timedelta(hours=2))),
    )
    assert record.api_key_id == key
    assert record.provider == "unknown"
    assert record.file_type == "image/jpeg"
    assert record.declared_type is None  # same as the effective type
    assert record.file_name == "a\ufffdb"
    assert record.uploaded_at == datetime(2025, 1, 1, tzinfo=UTC)
    assert record.uploaded_at.tzinfo is UTC


def test_long_text_is_capped() -> None:
    """Over-long text fields are truncated with an ellipsis instead of failing the write."""
    record = RequestRecord(path="/" + "x" * 10_000, error_message="e" * 10_000)
    assert len(record.path) == 512 and record.path.endswith("…")
    assert len(record.error_message or "") == 500


def test_ids_are_time_ordered_by_default() -> None:
    """Default ids are version 7 UUIDs that sort by creation time."""
    ids = [UploadRecord().id for _ in range(50)]
    assert all(i.version == 7 for i in ids)
    assert ids == sorted(ids)


def test_generated_ids_are_ordinary_uuids() -> None:
    """Ids made straight from the generator's integer behave as any uuid.UUID does."""
    rid = RequestRecord().id
    assert type(rid) is uuid.UUID
    assert (rid.version, rid.variant, rid.is_safe) == (7, uuid.RFC_4122, uuid.SafeUUID.unknown)
    parsed = uuid.UUID(str(rid))
    assert parsed == rid and hash(parsed) == hash(rid)
    assert pickle.loads(pickle.dumps(rid)) == rid
    with pytest.raises(TypeError):
        rid.int = 1  # type: ignore[misc]


class _Status(int):
    """An int subclass (as ``http.HTTPStatus`` is)."""


class _Millis(float):
    """A float subclass."""


class _Text(str):
    """A str subclass."""


# Per field: values the full pass keeps as they are, and values it changes or refuses.
_NORMAL = {
    "id": st.uuids(),
    "api_key_id": st.none() | st.uuids(),
    "method": st.sampled_from(["GET", "POST", "PUT", "DELETE"]),
    "path": st.text(min_size=1, max_size=512).filter(lambda p: "\x00" not in p),
    "status_code": st.integers(100, 599),
    "response_time_ms": st.floats(0, 365 * 86_400_000.0),
    "request_size": st.integers(0, 2**50),
    "response_size": st.integers(0, 2**50),
    "error_message": st.none() | st.text(max_size=500).filter(lambda e: "\x00" not in e),
    "requested_at": st.datetimes(timezones=st.just(UTC)),
    "route_matched": st.booleans(),
}
_ODD = {
    "id": st.uuids().map(str) | st.just("not-a-uuid"),
    "api_key_id": st.uuids().map(str) | st.integers(0, 3),
    "method": st.sampled_from(
        ["get", "M-SEARCH", "", "G\x00T", "X" * 20, None, 3, _Text("GET"), ["GET"]]
    ),
    "path": st.sampled_from(["", "/\x00", "/" + "p" * 512, None, b"/"]),
    "status_code": st.sampled_from([99, 600, True, 200.0, "200", _Status(404)]),
    "response_time_ms": st.sampled_from(
        [-0.5, float("nan"), float("inf"), 3, True, "1", _Millis(2)]
    )
    | st.floats(min_value=365 * 86_400_000.0, exclude_min=True),
    "request_size": st.sampled_from([-1, 2**50 + 1, False, 1.0, None, _Status(3)]),
    "response_size": st.sampled_from([-1, 2**50 + 1, True, 2.5, None]),
    "error_message": st.sampled_from(["e" * 501, "\x00", 5, b"x"]),
    "requested_at": st.datetimes(timezones=st.none() | st.timezones())
    | st.sampled_from(["2025-01-01", None]),
    "route_matched": st.sampled_from([1, 0, None]),
}


_MIME = st.from_regex(r"[a-z]{1,20}/[a-z0-9.+-]{1,40}", fullmatch=True)
_UPLOAD_NORMAL = {
    "provider": st.text(min_size=1, max_size=64).filter(
        lambda p: "\x00" not in p and p.strip() == p
    ),
    "file_type": _MIME,
    "file_size": st.integers(0, 2**50),
    "upload_status": st.sampled_from(["success", "failed"]),
    "api_key_id": st.none() | st.uuids(),
    "request_id": st.none() | st.uuids(),
    "declared_type": st.none() | _MIME,
    "file_name": st.none() | st.text(max_size=255).filter(lambda n: "\x00" not in n),
    "error_message": st.none() | st.text(max_size=500).filter(lambda e: "\x00" not in e),
    "uploaded_at": st.datetimes(timezones=st.just(UTC)),
    "id": st.uuids(),
}
_UPLOAD_ODD = {
    "provider": st.sampled_from([" s3", "s3 ", "   ", "", "s\x003", "p" * 65, None, _Text("s3")]),
    "file_type": st.sampled_from(
        ["Image/PNG", "image/png; q=1", " image/png", "", ";", "a/\x00", "t/" + "x" * 130]
    )
    | st.sampled_from([None, _Text("image/png"), 5]),
    "file_size": st.sampled_from([-1, 2**50 + 1, True, 1.0, None, _Status(3)]),
    "upload_status": st.sampled_from(["ok", "Success", None, _Text("failed")]),
    "api_key_id": st.uuids().map(str) | st.integers(0, 3),
    "request_id": st.uuids().map(str) | st.just("nope"),
    "declared_type": st.sampled_from(["", "IMAGE/PNG", "image/png;x", 7, _Text("a/b")]),
    "file_name": st.sampled_from(["n" * 256, "a\x00b", 5, b"x", _Text("f")]),
    "error_message": st.sampled_from(["e" * 501, "\x00", 5, b"x"]),
    "uploaded_at": st.datetimes(timezones=st.none() | st.timezones())
    | st.sampled_from(["2025-01-01", None]),
    "id": st.uuids().map(str) | st.just("not-a-uuid"),
}


def _validation_outcomes(
    kind: type[RequestRecord] | type[UploadRecord], values: dict[str, object]
) -> tuple[object, object]:
    """What ``validate()`` and the full pass each leave of a record of ``values`` made without
    validation: its fields (with their types and time zones), or the error raised."""

    def outcome(check: Callable[[object], None]) -> object:
        record = object.__new__(kind)
        for name, value in values.items():
            setattr(record, name, value)
        try:
            check(record)
        except ValueError as exc:
            return ("raises", str(exc))
        stored = [getattr(record, f.name) for f in fields(kind)]
        return [(type(v), v, getattr(v, "tzinfo", None)) for v in stored]

    return outcome(kind.validate), outcome(kind._normalise)  # type: ignore[arg-type]


@settings(max_examples=500, deadline=None)
@given(st.fixed_dictionaries(_NORMAL), st.sampled_from(sorted(_ODD)), st.data())
def test_request_validation_takes_its_short_path_only_for_values_the_full_pass_keeps(
    values: dict[str, object], odd: str, data: st.DataObject
) -> None:
    """``validate()`` skips the full pass when every field is already normal; it must leave
    exactly what the full pass leaves (or raise as it does): for normal records, and for
    records with one field of any other value."""
    if data.draw(st.booleans()):
        values = {**values, odd: data.draw(_ODD[odd])}
    short, full = _validation_outcomes(RequestRecord, values)
    assert short == full


@pytest.mark.parametrize("odd", [None, "declared_type=file_type", *sorted(_UPLOAD_ODD)])
@settings(max_examples=60, deadline=None)
@given(values=st.fixed_dictionaries(_UPLOAD_NORMAL), data=st.data())
def test_upload_validation_takes_its_short_path_only_for_values_the_full_pass_keeps(
    values: dict[str, object], odd: str | None, data: st.DataObject
) -> None:
    """As for requests, one field at a time: a declared type equal to the file type is one
    more value the full pass changes (to None), so the short path must not take it either."""
    if odd == "declared_type=file_type":
        values = {**values, "declared_type": values["file_type"]}
    elif odd is not None:
        values = {**values, odd: data.draw(_UPLOAD_ODD[odd])}
    short, full = _validation_outcomes(UploadRecord, values)
    assert short == full


def test_the_middlewares_request_records_are_already_normal() -> None:
    """What the middleware builds passes the short check, so the store's re-validation of
    each request costs a third of the full pass."""
    record = RequestRecord._unchecked(
        "GET", "/v1/upload/{id}", 201, 12.5, 1024, 80, uuid.uuid4(), None,
        datetime.now(UTC), True,
    )  # fmt: skip
    assert record._is_normal()
    record.validate()
    assert record._is_normal()
    record.method = "get"
    assert not record._is_normal()


def test_the_middlewares_upload_records_are_already_normal() -> None:
    """As for requests: the uploads the middleware builds need no full pass in the store."""
    record = UploadRecord._unchecked(
        " vercel ", "image/png", "Image/PNG; q=1", 2048, "success", None, uuid.uuid4(),
        None, "cat.png", datetime.now(UTC),
    )  # fmt: skip
    assert (record.provider, record.declared_type) == ("vercel", None)
    assert record._is_normal()
    record.provider = "vercel "
    assert not record._is_normal()
