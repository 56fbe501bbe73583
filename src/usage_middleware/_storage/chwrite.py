"""The ClickHouse write path: a batch becomes one INSERT per raw table, of the rows not stored yet.

Rows go by column (:data:`.chclient.Columns`), so converting a batch costs a few list
comprehensions, not a tuple per row. Which ids are stored is asked through the primary key —
every copy of a record shares its key and time, so the batch's keys and time span bound the
search — in the same statement as the INSERT on chdb, one statement earlier on a server (see
:meth:`.chclient.Client.insert_new`).

Request rows carry their endpoint route label, fixed here as every backend's writer fixes it: a
key's new named routes of a UTC day are admitted in route order while the day holds fewer than
``ROUTES_PER_KEY_DAY``; later ones are ``(other)``. ``endpoint_routes`` remembers the named
routes; this process caches what it learnt (both facts are permanent: a route named on a day
stays named, and a route turned away from a full day never gets in), so a steady stream of known
routes asks nothing. Two processes admitting routes to the same day at the same moment may let
it hold a few more than the cap; every request is still counted once, under the label its row
carries.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Sequence
from datetime import date, datetime, timedelta, timezone
from typing import Any

from .._records import RequestRecord, UploadRecord
from .._schema import (
    OTHER_ROUTE,
    ROUTES_PER_KEY_DAY,
    UNMATCHED_ROUTE,
    endpoint_route,
    latency_bucket,
)
from .chclient import Client, Columns

__all__ = ["NIL", "RouteCap", "request_data", "upload_data", "write_new"]

NIL = uuid.UUID(int=0)
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_CACHE_LIMIT = 100_000  # key-days remembered before the cache starts over

UPLOAD_KINDS: Columns = (
    ("id", "uuid"), ("api_key_id", "uuid"), ("has_key", "bool"), ("request_id", "uuid?"),
    ("provider", "str"), ("file_type", "str"), ("declared_type", "str?"), ("file_size", "int"),
    ("upload_status", "str"), ("file_name", "str?"), ("error_message", "str?"),
    ("uploaded_at", "time"),
)  # fmt: skip
REQUEST_KINDS: Columns = (
    ("id", "uuid"), ("api_key_id", "uuid"), ("has_key", "bool"), ("method", "str"),
    ("path", "str"), ("status_code", "int"), ("response_time_ms", "float"),
    ("response_us", "int"), ("latency_bucket", "int"), ("request_size", "int"),
    ("response_size", "int"), ("error_message", "str?"), ("requested_at", "time"),
    ("route_matched", "bool"), ("route_label", "str"),
)  # fmt: skip


def upload_data(uploads: Sequence[UploadRecord]) -> list[list[Any]]:
    """The columns of :data:`UPLOAD_KINDS` for ``uploads``."""
    keys = [u.api_key_id for u in uploads]
    return [
        [u.id for u in uploads],
        [k or NIL for k in keys],
        [k is not None for k in keys],
        [u.request_id for u in uploads],
        [u.provider for u in uploads],
        [u.file_type for u in uploads],
        [u.declared_type for u in uploads],
        [u.file_size for u in uploads],
        [u.upload_status for u in uploads],
        [u.file_name for u in uploads],
        [u.error_message for u in uploads],
        [u.uploaded_at for u in uploads],
    ]


def request_data(requests: Sequence[RequestRecord], labels: Sequence[str]) -> list[list[Any]]:
    """The columns of :data:`REQUEST_KINDS` for ``requests`` with their route ``labels``."""
    keys = [r.api_key_id for r in requests]
    ms = [r.response_time_ms for r in requests]
    return [
        [r.id for r in requests],
        [k or NIL for k in keys],
        [k is not None for k in keys],
        [r.method for r in requests],
        [r.path for r in requests],
        [r.status_code for r in requests],
        ms,
        [round(m * 1000) for m in ms],
        [latency_bucket(m) for m in ms],
        [r.request_size for r in requests],
        [r.response_size for r in requests],
        [r.error_message for r in requests],
        [r.requested_at for r in requests],
        [r.route_matched for r in requests],
        list(labels),
    ]


def _micros(t: datetime) -> int:
    return (t - _EPOCH) // timedelta(microseconds=1)


def write_new(
    client: Client,
    table: str,
    kinds: Columns,
    data: list[list[Any]],
    time_column: str,
    times: list[datetime],
) -> int:
    """Insert the rows of ``data`` whose id is not stored; return how many were new."""
    stored = (
        f"api_key_id IN {{keys:Array(UUID)}} "
        f"AND {time_column} >= fromUnixTimestamp64Micro({{lo:Int64}}, 'UTC') "
        f"AND {time_column} <= fromUnixTimestamp64Micro({{hi:Int64}}, 'UTC')"
    )
    params = {"keys": sorted(set(data[1])), "lo": _micros(min(times)), "hi": _micros(max(times))}
    return client.insert_new(table, kinds, data, stored, params)


class RouteCap:
    """The route labels of new request rows, under the per-key, per-UTC-day route cap."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # (key, day) -> (named routes, routes turned away), as far as this process knows
        self._known: dict[tuple[uuid.UUID | None, date], tuple[set[str], set[str]]] = {}

    def labels(self, client: Client, requests: Sequence[RequestRecord]) -> list[str]:
        routes = [endpoint_route(r.path, r.route_matched) for r in requests]
        days = [r.requested_at.date() for r in requests]
        with self._lock:
            if len(self._known) > _CACHE_LIMIT:
                self._known.clear()
            unknown: dict[tuple[uuid.UUID | None, date], set[str]] = {}
            for r, route, day in zip(requests, routes, days, strict=True):
                if route == UNMATCHED_ROUTE:
                    continue
                named, away = self._known.get((r.api_key_id, day), (set(), set()))
                if route not in named and route not in away:
                    unknown.setdefault((r.api_key_id, day), set()).add(route)
            if unknown:
                self._admit(client, unknown)
            out = []
            for r, route, day in zip(requests, routes, days, strict=True):
                if route != UNMATCHED_ROUTE and route in self._known[r.api_key_id, day][1]:
                    route = OTHER_ROUTE
                out.append(route)
            return out

    def _admit(
        self, client: Client, unknown: dict[tuple[uuid.UUID | None, date], set[str]]
    ) -> None:
        """Learn the named routes and fill of the key-days with routes this process has not
        seen yet, admit new routes while a day has room, and remember the outcome."""
        wanted = sorted(set().union(*unknown.values()))
        rows = client.query(
            "SELECT toString(api_key_id), has_key, toString(day), uniqExact(route), "
            "groupUniqArrayIf(route, has({wanted:Array(String)}, route)) "
            "FROM endpoint_routes "
            "WHERE api_key_id IN {keys:Array(UUID)} AND day IN {days:Array(Date)} "
            "GROUP BY api_key_id, has_key, day",
            {
                "wanted": wanted,
                "keys": sorted({k or NIL for k, _ in unknown}),
                "days": sorted({d for _, d in unknown}),
            },
        )
        found = {
            (uuid.UUID(k) if has else None, date.fromisoformat(d)): (int(n), set(named))
            for k, has, d, n, named in rows
        }
        admitted: list[tuple[uuid.UUID | None, date, str]] = []
        for key_day, routes in unknown.items():
            count, named_here = found.get(key_day, (0, set()))
            named, away = self._known.setdefault(key_day, (set(), set()))
            named |= named_here
            for route in sorted(routes - named_here):
                if count < ROUTES_PER_KEY_DAY:
                    named.add(route)
                    admitted.append((*key_day, route))
                    count += 1
                else:
                    away.add(route)
        if admitted:
            data: list[list[Any]] = [
                [k or NIL for k, _, _ in admitted],
                [k is not None for k, _, _ in admitted],
                [d for _, d, _ in admitted],
                [route for _, _, route in admitted],
            ]
            kinds: Columns = (("api_key_id", "uuid"), ("has_key", "bool"), ("day", "date"),
                              ("route", "str"))  # fmt: skip
            client.insert("endpoint_routes", kinds, data, "")
