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
routes asks nothing. An embedded store is its directory's only writer, so it decides new routes
from what it holds as well (:class:`RouteCap`). Two processes admitting routes to the same day
of a server at the same moment may let it hold a few more than the cap; every request is still
counted once, under the label its row carries.
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
from .base import request_value_rows, upload_value_rows
from .chclient import Client, Columns, EmbeddedClient

__all__ = [
    "NIL",
    "RouteCap",
    "request_columns",
    "request_data",
    "route_cap",
    "upload_data",
    "write_new",
]

NIL = uuid.UUID(int=0)
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_CACHE_LIMIT = 100_000  # key-days remembered before the cache starts over
_NOTHING: tuple[set[str], set[str]] = (set(), set())  # a key-day not known: read, never changed

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


def _transposed(rows: Sequence[tuple[Any, ...]], width: int) -> list[list[Any]]:
    return [list(column) for column in zip(*rows, strict=True)] if rows else [[]] * width


def upload_data(
    uploads: Sequence[UploadRecord], packed: Sequence[tuple[Any, ...]] = ()
) -> list[list[Any]]:
    """The columns of :data:`UPLOAD_KINDS` for ``uploads`` and the ``packed`` ones
    (:class:`.base.PackedRows` values)."""
    rows = upload_value_rows(uploads, packed)
    ids, keys, request_ids, providers, types, declared, sizes, names, statuses, errors, times = (
        _transposed(rows, 11)
    )
    return [
        ids, [k or 0 for k in keys], [k is not None for k in keys], request_ids, providers,
        types, declared, sizes, statuses, names, errors, times,
    ]  # fmt: skip


def request_columns(
    requests: Sequence[RequestRecord], packed: Sequence[tuple[Any, ...]] = ()
) -> list[list[Any]]:
    """``api_requests``' columns of ``requests`` and the ``packed`` ones, in the order of
    :class:`.base.PackedRows` (ids as integers)."""
    return _transposed(request_value_rows(requests, packed), 11)


def request_data(columns: list[list[Any]], labels: Sequence[str]) -> list[list[Any]]:
    """The columns of :data:`REQUEST_KINDS` from :func:`request_columns` and route ``labels``."""
    ids, keys, methods, paths, statuses, ms, sizes_in, sizes_out, errors, times, matched = columns
    return [
        ids, [k or 0 for k in keys], [k is not None for k in keys], methods, paths, statuses, ms,
        [round(m * 1000) for m in ms], [latency_bucket(m) for m in ms], sizes_in, sizes_out,
        errors, times, matched, list(labels),
    ]  # fmt: skip


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
    params = {
        "keys": [uuid.UUID(int=k) for k in sorted(set(data[1]))],
        "lo": _micros(min(times)),
        "hi": _micros(max(times)),
    }
    return client.insert_new(table, kinds, data, stored, params)


class RouteCap:
    """The route labels of new request rows, under the per-key, per-UTC-day route cap.

    With ``sole_writer`` (an embedded chdb store: its directory is open in this process only,
    and every store on it here shares one cap, :func:`route_cap`), nothing but this object
    adds to ``endpoint_routes``, so once it has read a key-day's routes it decides that day's
    new routes itself, and a day after the newest one stored when it first looked needs no read
    at all: a steady stream of new routes asks nothing. Otherwise (a server, which other
    processes write too) each batch with routes this process has not seen yet asks once.
    """

    def __init__(self, *, sole_writer: bool = False) -> None:
        self._lock = threading.Lock()
        self._sole = sole_writer
        # (key, day) -> (named routes, routes turned away), as far as this process knows; with
        # a sole writer, every named route of the key-day
        self._known: dict[tuple[uuid.UUID | None, date], tuple[set[str], set[str]]] = {}
        # sole writer: no key-day after this one has routes this object does not hold (None:
        # none stored, once _asked)
        self._stored_until: date | None = None
        self._asked = False

    def forget(self) -> None:
        """Drop what was learnt (the store was closed: another process may write next)."""
        with self._lock:
            self._reset()

    def _reset(self) -> None:
        self._known.clear()
        self._asked = False
        self._stored_until = None

    def labels(
        self,
        client: Client,
        keys: Sequence[int | None],
        times: Sequence[datetime],
        paths: Sequence[str],
        matched: Sequence[bool],
    ) -> list[str]:
        """The labels of requests given by column (keys as integers, None for no key)."""
        # each distinct (key, day, path, matched) once: a batch holds far fewer than rows
        first: dict[tuple[int | None, date, str, bool], int] = {}
        rows = [
            first.setdefault((k, t.date(), p, m), i)
            for i, (k, t, p, m) in enumerate(zip(keys, times, paths, matched, strict=True))
        ]
        distinct = [
            (None if k is None else uuid.UUID(int=k), day, endpoint_route(path, m), i)
            for (k, day, path, m), i in first.items()
        ]
        with self._lock:
            if len(self._known) > _CACHE_LIMIT:
                self._start_over()
            unknown: dict[tuple[uuid.UUID | None, date], set[str]] = {}
            for key, day, route, _ in distinct:
                if route == UNMATCHED_ROUTE:
                    continue
                named, away = self._known.get((key, day), _NOTHING)
                if route not in named and route not in away:
                    unknown.setdefault((key, day), set()).add(route)
            if unknown:
                self._admit(client, unknown)
            label = {}
            for key, day, route, i in distinct:
                if route != UNMATCHED_ROUTE and route in self._known[key, day][1]:
                    route = OTHER_ROUTE
                label[i] = route
            return [label[i] for i in rows]

    def _start_over(self) -> None:
        """Empty a full cache; a sole writer then reads again every day it had seen."""
        if self._sole and self._known:
            newest = max(day for _, day in self._known)
            if self._stored_until is None or newest > self._stored_until:
                self._stored_until = newest
        self._known.clear()

    def _admit(
        self, client: Client, unknown: dict[tuple[uuid.UUID | None, date], set[str]]
    ) -> None:
        """Learn the named routes and fill of the key-days with routes this process has not
        decided yet, admit new routes while a day has room, and remember the outcome."""
        found = self._read(client, unknown)
        admitted: list[tuple[uuid.UUID | None, date, str]] = []
        for key_day, routes in unknown.items():
            count, named_here = found.get(key_day, (0, set()))
            named, away = self._known.setdefault(key_day, (set(), set()))
            named |= named_here
            if self._sole:
                count = len(named)  # every named route of the day is here
            for route in sorted(routes - named):
                if count < ROUTES_PER_KEY_DAY:
                    named.add(route)
                    admitted.append((*key_day, route))
                    count += 1
                else:
                    away.add(route)
        if admitted:
            data: list[list[Any]] = [
                [0 if k is None else k.int for k, _, _ in admitted],
                [k is not None for k, _, _ in admitted],
                [d for _, d, _ in admitted],
                [route for _, _, route in admitted],
            ]
            kinds: Columns = (("api_key_id", "uuid"), ("has_key", "bool"), ("day", "date"),
                              ("route", "str"))  # fmt: skip
            try:
                client.insert("endpoint_routes", kinds, data, "")
            except BaseException:
                self._reset()  # the routes taken above may not be stored: learn them again
                raise

    def _read(
        self, client: Client, unknown: dict[tuple[uuid.UUID | None, date], set[str]]
    ) -> dict[tuple[uuid.UUID | None, date], tuple[int, set[str]]]:
        """What ``endpoint_routes`` holds of the key-days in question: each one's count of
        named routes and which of the wanted routes it names (a sole writer: all it names, and
        only for the key-days it has not read yet)."""
        if self._sole:
            if not self._asked:
                ((newest,),) = client.query(
                    "SELECT if(count() = 0, '', toString(max(day))) FROM endpoint_routes"
                )
                self._stored_until = date.fromisoformat(newest) if newest else None
                self._asked = True
            until = self._stored_until
            unknown = {
                (key, day): routes
                for (key, day), routes in unknown.items()
                if (key, day) not in self._known and until is not None and day <= until
            }
            if not unknown:
                return {}
            wanted = "groupUniqArray(route)"
        else:
            wanted = "groupUniqArrayIf(route, has({wanted:Array(String)}, route))"
        params: dict[str, Any] = {
            "keys": sorted({k or NIL for k, _ in unknown}),
            "days": sorted({d for _, d in unknown}),
        }
        if not self._sole:
            params["wanted"] = sorted(set().union(*unknown.values()))
        rows = client.query(
            "SELECT toString(api_key_id), has_key, toString(day), uniqExact(route), "
            f"{wanted} FROM endpoint_routes "
            "WHERE api_key_id IN {keys:Array(UUID)} AND day IN {days:Array(Date)} "
            "GROUP BY api_key_id, has_key, day",
            params,
        )
        return {
            (uuid.UUID(k) if has else None, date.fromisoformat(d)): (int(n), set(named))
            for k, has, d, n, named in rows
        }


_SHARED: dict[str, RouteCap] = {}
_SHARED_LOCK = threading.Lock()


def route_cap(client: Client) -> RouteCap:
    """The route cap of a store on ``client``: an embedded store is the only writer of its
    directory, and the stores of this process on one directory share one cap."""
    if not isinstance(client, EmbeddedClient):
        return RouteCap()
    if client.path is None:  # in memory: a database of its own
        return RouteCap(sole_writer=True)
    with _SHARED_LOCK:
        cap = _SHARED.get(client.path)
        if cap is None:
            cap = _SHARED[client.path] = RouteCap(sole_writer=True)
        return cap
