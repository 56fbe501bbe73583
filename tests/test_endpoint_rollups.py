"""Endpoint rollups on SQLite and PostgreSQL: bounded labels, the route cap, exact counts.

Every written batch is fed to :class:`EndpointReference` too, which applies the cap rule in
Python; the stored tables must equal it, whatever the batching, replays included.
"""

from __future__ import annotations

import random
import uuid
from collections import Counter
from datetime import datetime, timedelta, timezone

import pytest
from support.endpoints import (
    EndpointReference,
    assert_endpoints_consistent,
    rebuilt_endpoints,
    stored_endpoints,
)
from support.rollups import SEALED, assert_rollups_exact, raw_counts

from usage_middleware import RequestRecord, UsageStore
from usage_middleware._schema import (
    OTHER_ROUTE,
    ROUTES_PER_KEY_DAY,
    UNMATCHED_ROUTE,
    endpoint_bucket,
    endpoint_method,
)

UTC = timezone.utc
KEY = uuid.UUID(int=7, version=4)
DAY = datetime(2025, 6, 3, tzinfo=UTC)


def _request(
    rng: random.Random,
    path: str,
    *,
    matched: bool = True,
    key: uuid.UUID | None = KEY,
    at: datetime | None = None,
) -> RequestRecord:
    return RequestRecord(
        id=uuid.UUID(int=rng.getrandbits(128), version=4),
        api_key_id=key,
        method=rng.choice(["GET", "POST", "PATCH", "PURGE"]),
        path=path,
        route_matched=matched,
        status_code=rng.choice([200, 200, 201, 404, 500]),
        response_time_ms=rng.lognormvariate(3, 1.2),
        request_size=rng.randrange(0, 5_000),
        response_size=rng.randrange(0, 50_000),
        requested_at=at or DAY + timedelta(seconds=rng.random() * 86_399),
    )


# PostgreSQL writes live requests as raw rows and seals them later (tests/test_seal.py covers
# that); these tests pin its instant past every request, so each batch carries its own rollups
# and its routes are admitted as one group, as the reference does.
FAR = datetime(2100, 1, 1, tzinfo=UTC)


def _write(store: UsageStore, reference: EndpointReference, batch: list[RequestRecord]) -> int:
    store.seal(FAR)
    written = store.write(batch)
    reference.write(batch)
    return written


def _labels(store: UsageStore, table: str = "daily_endpoint_usage") -> Counter[str]:
    """Requests per route label in ``table``."""
    rows = stored_endpoints(store)[table]
    out: Counter[str] = Counter()
    for (_, _, _, route, _, _), (n, *_) in rows.items():
        out[route] += n
    return out


def test_routes_past_the_cap_are_other_and_every_request_is_counted(store: UsageStore) -> None:
    """1,000 distinct matched routes of one key on one day, in batches: the day keeps
    ROUTES_PER_KEY_DAY named routes (the first ones admitted, each batch's in route order),
    the rest are "(other)", and every request is in every tier exactly once."""
    rng = random.Random(1)
    routes = [f"/r/{i:04d}/{{id}}" for i in range(1_000)]
    records = [_request(rng, route) for route in routes for _ in range(2)]
    rng.shuffle(records)
    reference = EndpointReference()
    for i in range(0, len(records), 400):
        _write(store, reference, records[i : i + 400])
    assert stored_endpoints(store) == reference.rollups()
    labels = _labels(store)
    assert len(labels) == ROUTES_PER_KEY_DAY + 1
    assert sum(labels.values()) == len(records)
    assert labels[OTHER_ROUTE] == len(records) - 2 * ROUTES_PER_KEY_DAY
    assert len(stored_endpoints(store)["endpoint_routes"]) == ROUTES_PER_KEY_DAY
    for table in ("monthly_endpoint_usage", "quarter_endpoint_usage"):
        assert _labels(store, table) == labels
    # Replayed, regrouped: nothing changes.
    for i in range(0, len(records), 333):
        assert _write(store, reference, records[::-1][i : i + 333]) == 0
    assert stored_endpoints(store) == reference.rollups()


@pytest.mark.slow
def test_a_scanner_of_random_paths_adds_one_label(store: UsageStore) -> None:
    """100,000 random unmatched paths of one key on one day: one route label, no named route,
    one daily row per method label, status and latency bucket, and every request counted."""
    rng = random.Random(2)
    records = [
        _request(rng, f"/{uuid.UUID(int=rng.getrandbits(128)).hex}", matched=False)
        for _ in range(100_000)
    ]
    for i in range(0, len(records), 5_000):
        store.write(records[i : i + 5_000])
    store.seal(FAR)  # PostgreSQL: one seal folds them all
    stored = stored_endpoints(store)
    assert stored["endpoint_routes"] == {}
    assert _labels(store) == {UNMATCHED_ROUTE: 100_000}
    groups = {
        (endpoint_method(r.method), r.status_code, endpoint_bucket(r.response_time_ms))
        for r in records
    }
    assert len(stored["daily_endpoint_usage"]) == len(groups) < 1_000
    assert raw_counts(store) == (0, 100_000)


@pytest.mark.parametrize("seed", [3, 4])
def test_any_batching_and_replay_matches_the_reference(store: UsageStore, seed: int) -> None:
    """Requests of three keys (one of them none) over two days and 300 routes, written in
    random batches with repeats inside and across them, then replayed regrouped: the stored
    endpoint tables equal the rule applied batch by batch."""
    rng = random.Random(seed)
    routes = [f"/v1/{i:03d}" for i in range(300)]
    keys = [KEY, uuid.UUID(int=8, version=4), None]
    records = [
        _request(
            rng,
            rng.choice(routes) if rng.random() < 0.9 else f"/raw/{rng.random()}",
            matched=rng.random() < 0.9,
            key=rng.choice(keys),
            at=DAY + timedelta(seconds=rng.random() * 2 * 86_400),
        )
        for _ in range(1_500)
    ]
    reference = EndpointReference()
    position = 0
    while position < len(records):
        size = rng.randrange(1, 400)
        batch = records[position : position + size]
        batch += rng.sample(records[: position + size], min(20, position + size))
        _write(store, reference, batch)
        position += size
    assert stored_endpoints(store) == reference.rollups()
    shuffled = records[:]
    rng.shuffle(shuffled)
    assert _write(store, reference, shuffled) == 0
    assert stored_endpoints(store) == reference.rollups()
    assert_endpoints_consistent(store)


def test_one_batch_equals_the_rebuild_from_raw_rows(store: UsageStore) -> None:
    """Every request in one batch, past the cap on some key-days: the endpoint tables equal the
    rebuild from the raw rows (the rule with every request in one batch), as every rollup. On
    PostgreSQL the batch is written as raw rows and one seal folds them all in."""
    rng = random.Random(5)
    records = [
        _request(
            rng,
            f"/p/{rng.randrange(260)}",
            matched=rng.random() < 0.95,
            key=rng.choice([KEY, None]),
            at=DAY + timedelta(seconds=rng.random() * 3 * 86_400),
        )
        for _ in range(3_000)
    ]
    assert store.write(records) == len(records)
    assert store.seal(FAR) == (len(records) if store.dialect in SEALED else 0)
    assert_rollups_exact(store)
    assert stored_endpoints(store) == rebuilt_endpoints(
        [
            {c: getattr(r, c) for c in ("id", "api_key_id", "method", "path", "route_matched",
                                          "status_code", "response_time_ms", "request_size",
                                          "response_size", "requested_at")}
            for r in records
        ]
    )  # fmt: skip
