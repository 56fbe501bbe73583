"""Queued records as plain tuples, which the cyclic garbage collector stops tracking.

A record and its UUIDs are objects the garbage collector tracks for as long as they live. In
the queue records wait from a fraction of a second to many seconds (while the database is slow),
long enough to be moved into the oldest generation: a busy queue then makes full collections
more frequent and longer, and every thread stops while one runs, the event loop included. A
tuple of strings, numbers, datetimes and ``None`` stops being tracked at the first collection
it meets, so the queue holds each record as such a tuple: :func:`pack` on submit (about 0.1 µs),
:func:`unpack` when it leaves the queue. Anything else (a subclass, a record whose UUID fields
are not plain UUIDs, not a record at all) is queued as it is.

The tuples carry the fields in the order of ``_REQUEST_FIELDS`` / ``_UPLOAD_FIELDS``; should
the record types' fields ever differ from those, nothing is packed (``PACKING`` is False), so a
field cannot be lost.

The writer takes a batch off the queue as a :class:`PackedBatch`: a sequence of records that
unpacks each one only when it is read. A store whose backend can write rows straight from
these tuples (SQLite, PostgreSQL, ClickHouse) asks the batch for them with
:meth:`PackedBatch.split`: no record and no second validation for the requests and uploads the
middleware made, the bulk of a busy service's rows.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from dataclasses import fields
from typing import Any, overload

from .._records import (
    RequestRecord,
    UploadRecord,
    new_id_int,
    normal_request_values,
    normal_upload_values,
    uuid_from_int,
)

__all__ = [
    "PACKING",
    "PackedBatch",
    "RequestValues",
    "UploadValues",
    "new_request_item",
    "normal_packed_request",
    "normal_packed_upload",
    "pack",
    "packed_id",
    "packed_kind",
    "unpack",
]

Record = UploadRecord | RequestRecord

_UUID = uuid.UUID
_new = object.__new__

_REQUEST = object()  # the first item of a packed request (no GC tracking, cannot be forged)
_UPLOAD = object()
_REQUEST_FIELDS = (
    "method",
    "path",
    "status_code",
    "response_time_ms",
    "request_size",
    "response_size",
    "api_key_id",
    "error_message",
    "requested_at",
    "id",
    "route_matched",
)
_UPLOAD_FIELDS = (
    "provider",
    "file_type",
    "file_size",
    "upload_status",
    "api_key_id",
    "request_id",
    "declared_type",
    "file_name",
    "error_message",
    "uploaded_at",
    "id",
)
PACKING = (
    tuple(f.name for f in fields(RequestRecord)) == _REQUEST_FIELDS
    and tuple(f.name for f in fields(UploadRecord)) == _UPLOAD_FIELDS
)


def _uuid(value: int | None) -> uuid.UUID | None:
    return None if value is None else uuid_from_int(value)


def pack(record: object) -> object:
    """``record`` as a tuple of untracked values, or ``record`` itself. Never raises."""
    try:
        kind = type(record)
        if kind is RequestRecord and PACKING:
            r: RequestRecord = record  # type: ignore[assignment]
            rid, key = r.id, r.api_key_id
            if type(rid) is _UUID and (key is None or type(key) is _UUID):
                return (
                    _REQUEST,
                    r.method,
                    r.path,
                    r.status_code,
                    r.response_time_ms,
                    r.request_size,
                    r.response_size,
                    None if key is None else key.int,
                    r.error_message,
                    r.requested_at,
                    rid.int,
                    r.route_matched,
                )
        elif kind is UploadRecord and PACKING:
            u: UploadRecord = record  # type: ignore[assignment]
            uid, key, req = u.id, u.api_key_id, u.request_id
            if (
                type(uid) is _UUID
                and (key is None or type(key) is _UUID)
                and (req is None or type(req) is _UUID)
            ):
                return (
                    _UPLOAD,
                    u.provider,
                    u.file_type,
                    u.file_size,
                    u.upload_status,
                    None if key is None else key.int,
                    None if req is None else req.int,
                    u.declared_type,
                    u.file_name,
                    u.error_message,
                    u.uploaded_at,
                    uid.int,
                )
    except Exception:  # a record missing a field: queued as it is, the store rejects it
        pass
    return record


def new_request_item(
    method: str,
    path: str,
    status_code: int,
    response_time_ms: float,
    request_size: int,
    response_size: int,
    api_key_id: uuid.UUID | None,
    error_message: str | None,
    requested_at: Any,
    route_matched: bool,
    /,
) -> object:
    """``pack(RequestRecord._unchecked(...))`` of these values, a new id drawn, with no record
    made: the middleware's path for a request with no upload, once per request."""
    if PACKING and (api_key_id is None or type(api_key_id) is _UUID):
        return (
            _REQUEST, method, path, status_code, response_time_ms, request_size, response_size,
            None if api_key_id is None else api_key_id.int, error_message, requested_at,
            new_id_int(), route_matched,
        )  # fmt: skip
    record = RequestRecord._unchecked(
        method, path, status_code, response_time_ms, request_size, response_size, api_key_id,
        error_message, requested_at, route_matched,
    )  # fmt: skip
    return pack(record)


def packed_kind(item: object) -> str | None:
    """``"r"`` for a packed request, ``"u"`` for a packed upload (their values in the order
    :func:`pack` gives them), None for anything else."""
    if type(item) is tuple and len(item) == 12:
        kind = item[0]
        if kind is _REQUEST:
            return "r"
        if kind is _UPLOAD:
            return "u"
    return None


def packed_id(item: object) -> int:
    """The id, as an integer, of a queue item (a packed record, or a record)."""
    kind = packed_kind(item)
    if kind is not None:
        return item[10] if kind == "r" else item[11]  # type: ignore[index, no-any-return]
    return item.id.int  # type: ignore[attr-defined, no-any-return]


def normal_packed_request(
    method: Any,
    path: Any,
    status_code: Any,
    response_time_ms: Any,
    request_size: Any,
    response_size: Any,
    api_key_id: int | None,
    error_message: Any,
    requested_at: Any,
    rid: int,
    route_matched: Any,
) -> object | None:
    """What :func:`pack` makes of the validated request of these values (ids as integers in
    range), made without the record; None when validation would change or refuse a value (such
    a request must become a record and be validated)."""
    if normal_request_values(
        method, path, status_code, response_time_ms, request_size, response_size,
        error_message, requested_at, route_matched,
    ):  # fmt: skip
        return (
            _REQUEST, method, path, status_code, response_time_ms, request_size, response_size,
            api_key_id, error_message, requested_at, rid, route_matched,
        )  # fmt: skip
    return None


def normal_packed_upload(
    provider: Any,
    file_type: Any,
    file_size: Any,
    upload_status: Any,
    api_key_id: int | None,
    request_id: int | None,
    declared_type: Any,
    file_name: Any,
    error_message: Any,
    uploaded_at: Any,
    uid: int,
) -> object | None:
    """:func:`normal_packed_request` for an upload."""
    if normal_upload_values(
        provider, file_type, file_size, upload_status, declared_type, file_name, error_message,
        uploaded_at,
    ):  # fmt: skip
        return (
            _UPLOAD, provider, file_type, file_size, upload_status, api_key_id, request_id,
            declared_type, file_name, error_message, uploaded_at, uid,
        )  # fmt: skip
    return None


def unpack(item: object) -> Record:
    """The record :func:`pack` made ``item`` from (an equal one), or ``item`` itself: whatever
    was submitted, which the store rejects if it is no record."""
    if type(item) is not tuple or len(item) != 12:
        return item  # type: ignore[return-value]
    kind = item[0]
    if kind is _REQUEST:
        r = _new(RequestRecord)
        (
            _,
            r.method,
            r.path,
            r.status_code,
            r.response_time_ms,
            r.request_size,
            r.response_size,
            key,
            r.error_message,
            r.requested_at,
            rid,
            r.route_matched,
        ) = item
        r.api_key_id = _uuid(key)
        r.id = _uuid(rid)  # type: ignore[assignment]
        return r
    if kind is _UPLOAD:
        u = _new(UploadRecord)
        (
            _,
            u.provider,
            u.file_type,
            u.file_size,
            u.upload_status,
            key,
            req,
            u.declared_type,
            u.file_name,
            u.error_message,
            u.uploaded_at,
            uid,
        ) = item
        u.api_key_id = _uuid(key)
        u.request_id = _uuid(req)
        u.id = _uuid(uid)  # type: ignore[assignment]
        return u
    return item  # type: ignore[return-value]


#: A request as the backends' ``write_packed`` takes it: ``api_requests``' columns in order — id,
#: api_key_id, method, path, status_code, response_time_ms, request_size, response_size,
#: error_message, requested_at, route_matched — the two ids as 128-bit integers.
RequestValues = tuple[Any, ...]
#: An upload as ``write_packed`` takes it: id, api_key_id, request_id, provider, file_type,
#: declared_type, file_size, file_name, upload_status, error_message, uploaded_at — the three
#: ids as 128-bit integers.
UploadValues = tuple[Any, ...]


class PackedBatch(Sequence[Record]):
    """Records as the queue held them, each unpacked only when read (indexing, iterating);
    a slice is a batch too. :meth:`split` hands a store the rows it may write as they are."""

    __slots__ = ("items",)

    def __init__(self, items: list[object]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    @overload
    def __getitem__(self, index: int) -> Record: ...

    @overload
    def __getitem__(self, index: slice) -> PackedBatch: ...

    def __getitem__(self, index: int | slice) -> Record | PackedBatch:
        if isinstance(index, slice):
            return PackedBatch(self.items[index])
        return unpack(self.items[index])

    def __iter__(self) -> Iterator[Record]:
        return map(unpack, self.items)

    def split(self) -> tuple[list[RequestValues], list[UploadValues], list[Record]]:
        """The packed requests and uploads whose values need no validation (see
        :func:`~usage_middleware._records.normal_request_values` and
        :func:`~usage_middleware._records.normal_upload_values`) as :data:`RequestValues` and
        :data:`UploadValues`, in queue order, and every other item unpacked: records with a
        value to normalise or refuse, anything that was queued as it was submitted."""
        requests: list[RequestValues] = []
        uploads: list[UploadValues] = []
        rest: list[Record] = []
        for item in self.items:
            if type(item) is tuple and len(item) == 12:
                kind = item[0]
                if kind is _REQUEST and normal_request_values(
                    item[1], item[2], item[3], item[4], item[5], item[6], item[8], item[9], item[11]
                ):
                    (_, method, path, status, ms, rq, rs, key, error, at, rid, matched) = item
                    requests.append(
                        (rid, key, method, path, status, ms, rq, rs, error, at, matched)
                    )
                    continue
                if kind is _UPLOAD and normal_upload_values(
                    item[1], item[2], item[3], item[4], item[7], item[8], item[9], item[10]
                ):
                    (_, provider, ftype, size, ok, key, req, declared, name, error, at, uid) = item
                    uploads.append(
                        (uid, key, req, provider, ftype, declared, size, name, ok, error, at)
                    )
                    continue
            rest.append(unpack(item))
        return requests, uploads, rest
