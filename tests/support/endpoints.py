"""The endpoint rollups computed in Python from requests, by the route-cap rule, to compare with
what a store holds: batch by batch (:class:`EndpointReference`), or as one batch of every stored
request (:func:`rebuilt_endpoints`, what an upgrade's backfill gives)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from datetime import date, datetime
from typing import Any
from uuid import UUID

from sqlalchemy import select

from usage_middleware import RequestRecord, UsageStore
from usage_middleware._schema import (
    OTHER_ROUTE,
    ROUTES_PER_KEY_DAY,
    UNMATCHED_ROUTE,
    api_requests,
    endpoint_bucket,
    endpoint_method,
    endpoint_route,
)

Rollups = dict[str, dict[tuple[Any, ...], tuple[int, ...]]]
ENDPOINT_TABLES = ("monthly_endpoint_usage", "daily_endpoint_usage", "quarter_endpoint_usage")
ENDPOINT_LABELS = ("method", "route", "status_code", "latency_bucket")
ENDPOINT_COUNTERS = (
    "total_requests",
    "total_response_us",
    "total_request_bytes",
    "total_response_bytes",
)


def _quarter(at: datetime) -> datetime:
    return at.replace(minute=at.minute - at.minute % 15, second=0, microsecond=0)


def _row(r: RequestRecord | dict[str, Any]) -> dict[str, Any]:
    if isinstance(r, dict):
        return r
    return {c: getattr(r, c) for c in api_requests.c.keys()}  # noqa: SIM118


class EndpointReference:
    """The rule applied to batches in the order they are written: a batch's requests not stored
    before are new; per key and UTC day, the new named routes not yet named are admitted in
    sorted order while the day has fewer than ``ROUTES_PER_KEY_DAY``; a request whose route is
    not named is ``(other)``.

    A request is stored before when its id is (``by_time``: its id and time, as PostgreSQL's
    partitioned raw table keys it; a replay carries the same time, so only records that reuse
    an id at another time tell the two apart)."""

    def __init__(self, *, by_time: bool = False) -> None:
        self.by_time = by_time
        self.seen: set[Any] = set()
        self.named: dict[tuple[UUID | None, date], set[str]] = defaultdict(set)
        self.tiers: dict[str, dict[tuple[Any, ...], list[int]]] = {
            name: defaultdict(lambda: [0, 0, 0, 0]) for name in ENDPOINT_TABLES
        }

    def write(
        self, records: Iterable[RequestRecord | dict[str, Any]], *, stored: bool = False
    ) -> None:
        """Apply the rule to one batch (``stored``: rows already stored, each new)."""
        fresh = []
        batch: set[UUID] = set()
        for record in records:
            r = _row(record)
            if not stored:  # the store keeps the first record of each id in a batch
                if r["id"] in batch:
                    continue
                batch.add(r["id"])
            identity = (r["id"], r["requested_at"]) if self.by_time else r["id"]
            if stored or identity not in self.seen:
                self.seen.add(identity)
                fresh.append(r)
        wanted: dict[tuple[UUID | None, date], set[str]] = defaultdict(set)
        for r in fresh:
            route = endpoint_route(r["path"], r["route_matched"])
            if route != UNMATCHED_ROUTE:
                wanted[r["api_key_id"], r["requested_at"].date()].add(route)
        for key_day, routes in wanted.items():
            named = self.named[key_day]
            for route in sorted(routes - named):
                if len(named) >= ROUTES_PER_KEY_DAY:
                    break
                named.add(route)
        for r in fresh:
            at, key = r["requested_at"], r["api_key_id"]
            route = endpoint_route(r["path"], r["route_matched"])
            if route != UNMATCHED_ROUTE and route not in self.named[key, at.date()]:
                route = OTHER_ROUTE
            ms = r["response_time_ms"]
            labels = (endpoint_method(r["method"]), route, r["status_code"], endpoint_bucket(ms))
            values = (1, round(ms * 1000), r["request_size"], r["response_size"])
            for name, when in zip(
                ENDPOINT_TABLES, (at.date().replace(day=1), at.date(), _quarter(at)), strict=True
            ):
                acc = self.tiers[name][(key, when, *labels)]
                for i, v in enumerate(values):
                    acc[i] += v

    def rollups(self) -> Rollups:
        """The three endpoint tiers and ``endpoint_routes``, keyed as :func:`stored_rollups`."""
        out: Rollups = {
            name: {k: tuple(v) for k, v in rows.items()} for name, rows in self.tiers.items()
        }
        out["endpoint_routes"] = {
            (key, day, route): () for (key, day), routes in self.named.items() for route in routes
        }
        return out


def rebuilt_endpoints(requests: list[dict[str, Any]]) -> Rollups:
    """What writing ``requests`` (raw rows as mappings) in one batch gives."""
    reference = EndpointReference()
    reference.write(requests, stored=True)
    return reference.rollups()


def stored_request_rows(store: UsageStore) -> list[dict[str, Any]]:
    """Every stored request, as a mapping of its columns."""
    with store.engine.connect() as conn:
        return [dict(r) for r in conn.execute(select(api_requests)).mappings()]


def stored_endpoints(store: UsageStore) -> Rollups:
    """The endpoint tiers and ``endpoint_routes`` as stored."""
    from support.rollups import stored_rollups

    stored = stored_rollups(store)
    return {name: stored[name] for name in (*ENDPOINT_TABLES, "endpoint_routes")}


def assert_endpoints_consistent(store: UsageStore, slack: int = 0) -> None:
    """What holds however requests were batched, concurrently too: summed over routes, every
    endpoint tier equals the raw rows; a named route of a key-day is in ``endpoint_routes``; a
    key-day names at most ``ROUTES_PER_KEY_DAY + slack`` routes. (PostgreSQL: the requests before
    each tier's instant, which are the ones it holds.)"""
    from support.rollups import sealed_requests

    rebuilt = {
        name: rebuilt_endpoints(sealed_requests(store, name))[name] for name in ENDPOINT_TABLES
    }
    stored = stored_endpoints(store)
    named = set(stored["endpoint_routes"])
    per_day: dict[tuple[Any, Any], int] = defaultdict(int)
    for key, day, _ in named:
        per_day[key, day] += 1
    assert max(per_day.values(), default=0) <= ROUTES_PER_KEY_DAY + slack
    for name in ("daily_endpoint_usage", "quarter_endpoint_usage"):
        for key, when, _, route, *_ in stored[name]:
            if route not in (OTHER_ROUTE, UNMATCHED_ROUTE):
                day = when.date() if isinstance(when, datetime) else when
                assert (key, day, route) in named, (name, key, day, route)
    for name in ENDPOINT_TABLES:
        assert _without_route(stored[name]) == _without_route(rebuilt[name]), name


def _without_route(rows: dict[tuple[Any, ...], tuple[int, ...]]) -> dict[Any, list[int]]:
    out: dict[Any, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for (key, when, method, _, status, bucket), values in rows.items():
        acc = out[key, when, method, status, bucket]
        for i, v in enumerate(values):
            acc[i] += v
    return dict(out)
