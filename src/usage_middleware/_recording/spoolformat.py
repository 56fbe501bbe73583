"""The spool's row format: one record per row, a compact, versioned JSON array.

UUIDs as hex, timestamps as integer microseconds since the epoch (records are normalised to
UTC, so this is lossless), floats in ``repr`` form (exact round trip); a request whose path
matched no route carries a trailing ``0`` (rows spooled before that field existed decode as
matched). The row's key is the record's kind and id, so a record spooled twice is one row.

Records are encoded from the recorder's queue tuples and read back into them
(:func:`spool_row`, :func:`decode_item`): the rows the middleware makes never become records on
the way. :func:`encode` and :func:`decode` are the same format for records.
"""

from __future__ import annotations

import json
import re
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any, cast

from .._records import RequestRecord, UploadRecord
from .compact import normal_packed_request, normal_packed_upload, pack, packed_kind

__all__ = ["decode", "decode_item", "encode", "spool_key", "spool_row"]

Record = UploadRecord | RequestRecord

UTC = timezone.utc
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_FORMAT = 1
_HEX32 = re.compile("[0-9a-f]{32}")  # an id as encode() writes it
# One encoder for every row: json.dumps() with options builds a new JSONEncoder per call.
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def _us(value: datetime) -> int:
    delta = value - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _dt(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


def _hex(value: uuid.UUID | None) -> str | None:
    return None if value is None else value.hex


def _uuid(value: str | None) -> uuid.UUID | None:
    return None if value is None else uuid.UUID(hex=value)


def spool_key(record: Record) -> bytes:
    """The row key: ids are unique per table, so an upload and a request may share one."""
    return (b"u" if isinstance(record, UploadRecord) else b"r") + record.id.bytes


def encode(record: Record) -> str:
    """One record as a compact JSON array (see the module docstring)."""
    if isinstance(record, UploadRecord):
        return _ENCODER.encode(
            [
                _FORMAT,
                "u",
                record.id.hex,
                _hex(record.api_key_id),
                _hex(record.request_id),
                record.provider,
                record.file_type,
                record.declared_type,
                record.file_size,
                record.file_name,
                record.upload_status,
                record.error_message,
                _us(record.uploaded_at),
            ]
        )
    if isinstance(record, RequestRecord):
        return _ENCODER.encode(
            [
                _FORMAT,
                "r",
                record.id.hex,
                _hex(record.api_key_id),
                record.method,
                record.path,
                record.status_code,
                record.response_time_ms,
                record.request_size,
                record.response_size,
                record.error_message,
                _us(record.requested_at),
                *(() if record.route_matched else (0,)),
            ]
        )
    raise TypeError(f"cannot spool {type(record).__name__}: expected UploadRecord or RequestRecord")


def spool_row(item: object) -> tuple[bytes, str]:
    """The row (key, payload) of a queue item: a packed request or upload is encoded from its
    values as :func:`encode` encodes the record it unpacks to, with no record made."""
    kind = packed_kind(item)
    if kind is None:
        return spool_key(item), encode(item)  # type: ignore[arg-type]
    values = cast(tuple[Any, ...], item)
    if kind == "r":
        (_, method, path, status, ms, rq, rs, key, err, at, rid, matched) = values
        raw = rid.to_bytes(16, "big")  # its .hex(): half the cost of format(rid, "032x")
        payload = [
            _FORMAT, "r", raw.hex(), None if key is None else key.to_bytes(16, "big").hex(),
            method, path, status, ms, rq, rs, err, _us(at), *(() if matched else (0,)),
        ]  # fmt: skip
        return b"r" + raw, _ENCODER.encode(payload)
    (_, provider, ftype, size, ok, key, req, declared, name, err, at, uid) = values
    raw = uid.to_bytes(16, "big")
    payload = [
        _FORMAT, "u", raw.hex(), None if key is None else key.to_bytes(16, "big").hex(),
        None if req is None else req.to_bytes(16, "big").hex(), provider, ftype, declared, size,
        name, ok, err, _us(at),
    ]  # fmt: skip
    return b"u" + raw, _ENCODER.encode(payload)


def _hex_id(value: Any) -> bool:
    return type(value) is str and _HEX32.fullmatch(value) is not None


def decode_item(payload: str) -> object:
    """What the recorder's queue holds for the record of ``payload``: read straight into its
    packed values when validation would keep them (no record made: a replay writes thousands),
    else ``pack(decode(payload))``; ``ValueError`` as :func:`decode`."""
    try:
        data = json.loads(payload)
        if type(data) is list and data[:1] == [_FORMAT]:
            if data[1:2] == ["r"] and len(data) in (12, 13):
                _, _, rid, key, method, path, status, ms, rq, rs, err, at, *rest = data
                if (
                    _hex_id(rid)
                    and (key is None or _hex_id(key))
                    and type(at) is int
                    and rest in ([], [0])
                ):
                    item = normal_packed_request(
                        method, path, status, ms, rq, rs, None if key is None else int(key, 16),
                        err, _dt(at), int(rid, 16), not rest,
                    )  # fmt: skip
                    if item is not None:
                        return item
            elif data[1:2] == ["u"] and len(data) == 13:
                _, _, uid, key, req, provider, ftype, declared, size, name, ok, err, at = data
                if (
                    _hex_id(uid)
                    and (key is None or _hex_id(key))
                    and (req is None or _hex_id(req))
                    and type(at) is int
                ):
                    item = normal_packed_upload(
                        provider, ftype, size, ok, None if key is None else int(key, 16),
                        None if req is None else int(req, 16), declared, name, err, _dt(at),
                        int(uid, 16),
                    )  # fmt: skip
                    if item is not None:
                        return item
    except Exception:  # anything odd is read the long way, which says what is wrong with it
        pass
    return pack(decode(payload))


def decode(payload: str) -> Record:
    """The record :func:`encode` made; ``ValueError`` for anything else.

    Whatever the row holds: JSON nested too deep raises ``RecursionError``, a time out of range
    ``OverflowError``, a field of the wrong type ``AttributeError``; all become ``ValueError``.
    """
    try:
        data = json.loads(payload)
        version, kind, *fields = data
    except Exception as exc:
        raise ValueError(f"unreadable spool payload: {type(exc).__name__}: {exc}") from None
    if version != _FORMAT:
        raise ValueError(f"unknown spool format {version!r:.40}")
    try:
        if kind == "u":
            (rid, key, req, provider, ftype, declared, size, name, status, err, at) = fields
            return UploadRecord(
                id=uuid.UUID(hex=rid),
                api_key_id=_uuid(key),
                request_id=_uuid(req),
                provider=provider,
                file_type=ftype,
                declared_type=declared,
                file_size=size,
                file_name=name,
                upload_status=status,
                error_message=err,
                uploaded_at=_dt(at),
            )
        if kind == "r":
            (rid, key, method, path, status_code, ms, req_size, resp_size, err, at, *rest) = fields
            if rest not in ([], [0]):
                raise ValueError(f"unexpected trailing fields {rest!r:.40}")
            return RequestRecord(
                id=uuid.UUID(hex=rid),
                api_key_id=_uuid(key),
                method=method,
                path=path,
                status_code=status_code,
                response_time_ms=ms,
                request_size=req_size,
                response_size=resp_size,
                error_message=err,
                requested_at=_dt(at),
                route_matched=not rest,
            )
    except Exception as exc:
        raise ValueError(f"invalid spooled record: {type(exc).__name__}: {exc}") from None
    raise ValueError(f"unknown spooled record kind {kind!r:.40}")
