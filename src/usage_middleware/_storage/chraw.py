"""Failures and exports on ClickHouse: pages of raw rows, each id once (``FINAL``).

Both are keyset pages, ordered in the engine and cut with ``LIMIT``: failures newest first by
``(time, kind, id)``, exports oldest first by ``(time, id)``. Ids are compared as their text,
whose order is the numeric order the other backends page by (ClickHouse orders the ``UUID`` type
by its halves). Raw rows only: past the raw TTL these see nothing, which the export says with
its retention header, like the other backends after pruning.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from .base import EXPORT_COLUMNS, Failure, FailureKey, Scope
from .chread import keys_condition, upload_filters
from .chseal import EPOCH, micros

__all__ = ["export_rows", "failure_rows"]

Run = Callable[[str, dict[str, Any]], list[tuple[Any, ...]]]

_FAILED = {
    "upload": (
        "file_uploads", "uploaded_at", "upload_status = 'failed'",
        "toString(provider) AS c1, toString(file_type) AS c2, declared_type AS c3, "
        "toNullable(file_size) AS c4, NULL AS c5, NULL AS c6, NULL AS c7",
    ),
    "request": (
        "api_requests", "requested_at", "(status_code >= 400 OR error_message IS NOT NULL)",
        "NULL AS c1, NULL AS c2, NULL AS c3, NULL AS c4, toNullable(toString(method)) AS c5, "
        "toNullable(path) AS c6, toNullable(status_code) AS c7",
    ),
}  # fmt: skip


def failure_rows(
    run: Run,
    scope: Scope,
    start: datetime,
    end: datetime,
    kinds: tuple[str, ...],
    before: FailureKey | None,
    limit: int,
    settings: str,
) -> list[Failure]:
    if scope.keys is not None and not scope.keys:
        return []
    params: dict[str, Any] = {"start": micros(start), "end": micros(end), "limit": limit}
    keys = keys_condition(scope, params)
    parts = []
    for kind in ("upload", "request"):
        if kind not in kinds:
            continue
        table, t, failed, columns = _FAILED[kind]
        where = keys + (upload_filters(scope, params) if kind == "upload" else "")
        if before is not None:
            params.update(b_at=micros(before[0]), b_kind=before[1], b_id=str(before[2]))
            where += (
                f" AND {t} <= fromUnixTimestamp64Micro({{b_at:Int64}}, 'UTC')"
                f" AND (toUnixTimestamp64Micro({t}), '{kind}', toString(id))"
                " < ({b_at:Int64}, {b_kind:String}, {b_id:String})"
            )
        parts.append(f"""
    SELECT '{kind}' AS kind, toUnixTimestamp64Micro({t}) AS at, toString(id) AS sid,
           has_key AS hk, toString(api_key_id) AS kid, {columns}, error_message AS c8
    FROM {table} FINAL
    WHERE {where} AND {failed}
      AND {t} >= fromUnixTimestamp64Micro({{start:Int64}}, 'UTC')
      AND {t} < fromUnixTimestamp64Micro({{end:Int64}}, 'UTC')
    ORDER BY at DESC, sid DESC
    LIMIT {{limit:UInt32}}""")
    if not parts:
        return []
    sql = (
        "SELECT * FROM (" + "\n    UNION ALL".join(parts) + "\n)\n"
        f"ORDER BY at DESC, kind DESC, sid DESC LIMIT {{limit:UInt32}} SETTINGS {settings}"
    )
    return [
        Failure(
            kind, EPOCH + timedelta(microseconds=int(at)), uuid.UUID(sid),
            uuid.UUID(key) if has_key else None, provider=provider, file_type=file_type,
            declared_type=declared, file_size=None if size is None else int(size),
            method=method, route=route, status_code=None if status is None else int(status),
            error_message=error,
        )
        for (kind, at, sid, has_key, key, provider, file_type, declared, size, method, route,
             status, error) in run(sql, params)
    ]  # fmt: skip


# How each exported column is read (ids and the key as text; times as microseconds).
_EXPORT_EXPR = {
    "id": "toString(id)",
    "api_key_id": "if(has_key, toString(api_key_id), NULL)",
    "request_id": "toString(request_id)",
    "upload_status": "toString(upload_status)",
    "method": "toString(method)",
    "provider": "toString(provider)",
    "file_type": "toString(file_type)",
    "uploaded_at": "toUnixTimestamp64Micro(uploaded_at)",
    "requested_at": "toUnixTimestamp64Micro(requested_at)",
}
_TABLES = {"uploads": ("file_uploads", "uploaded_at"), "requests": ("api_requests", "requested_at")}


def export_rows(
    run: Run,
    dataset: str,
    scope: Scope,
    start: datetime,
    end: datetime,
    after: tuple[datetime, uuid.UUID] | None,
    limit: int,
    settings: str,
) -> list[tuple[Any, ...]]:
    if scope.keys is not None and not scope.keys:
        return []
    table, t = _TABLES[dataset]
    columns = EXPORT_COLUMNS[dataset]
    params: dict[str, Any] = {"start": micros(start), "end": micros(end), "limit": limit}
    where = keys_condition(scope, params)
    if dataset == "uploads":
        where += upload_filters(scope, params)
    if after is not None:
        params.update(a_at=micros(after[0]), a_id=str(after[1]))
        where += (
            f" AND {t} >= fromUnixTimestamp64Micro({{a_at:Int64}}, 'UTC')"
            f" AND (toUnixTimestamp64Micro({t}), toString(id)) > ({{a_at:Int64}}, {{a_id:String}})"
        )
    select = ", ".join(_EXPORT_EXPR.get(c, c) for c in columns)
    sql = f"""
SELECT {select}
FROM {table} FINAL
WHERE {where}
  AND {t} >= fromUnixTimestamp64Micro({{start:Int64}}, 'UTC')
  AND {t} < fromUnixTimestamp64Micro({{end:Int64}}, 'UTC')
ORDER BY toUnixTimestamp64Micro({t}), toString(id)
LIMIT {{limit:UInt32}} SETTINGS {settings}"""
    at = columns.index(t)
    out = []
    for row in run(sql, params):
        values = list(row)
        values[at] = (EPOCH + timedelta(microseconds=int(values[at]))).isoformat(
            timespec="microseconds"
        )
        out.append(tuple(values))
    return out
