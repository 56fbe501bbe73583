"""Several processes writing overlapping rollup keys (and ids) at once lose nothing, and the
route cap holds within what concurrent batches can add."""

from __future__ import annotations

import multiprocessing
import random
import uuid
from datetime import timedelta
from typing import Any

import pytest
from support.endpoints import assert_endpoints_consistent
from support.rollups import (
    BASE,
    FAR,
    KEYS,
    assert_rollups_exact,
    random_request,
    random_upload,
    raw_counts,
)

from usage_middleware import RequestRecord, UsageStore
from usage_middleware._schema import ROUTES_PER_KEY_DAY

PROCESSES = 4
BATCHES = 8
BATCH = 250
CROWDED_BATCH = 60


def _batches(seed: int) -> list[list[object]]:
    """This worker's batches: its own rows plus rows every worker shares (same ids)."""
    own = random.Random(seed)
    shared = random.Random(0)
    out: list[list[object]] = []
    for _ in range(BATCHES):
        batch: list[object] = [random_upload(own, spread_hours=2) for _ in range(BATCH)]
        batch += [random_upload(shared, spread_hours=2) for _ in range(BATCH // 5)]
        batch += [random_request(own, spread_hours=2) for _ in range(BATCH // 5)]
        own.shuffle(batch)
        out.append(batch)
    return out


def _crowded_batches(seed: int) -> list[list[object]]:
    """Requests of one key on one day over twice as many routes as the cap allows, plus
    requests every worker shares (same ids)."""
    own = random.Random(seed)
    shared = random.Random(0)
    out: list[list[object]] = []
    for _ in range(BATCHES):
        batch: list[object] = []
        for rng, n in ((own, CROWDED_BATCH), (shared, CROWDED_BATCH // 4)):
            batch += [
                RequestRecord(
                    id=uuid.UUID(int=rng.getrandbits(128), version=4),
                    api_key_id=KEYS[0],
                    path=f"/route/{rng.randrange(2 * ROUTES_PER_KEY_DAY)}",
                    status_code=rng.choice([200, 500]),
                    response_time_ms=rng.random() * 100,
                    requested_at=BASE + timedelta(hours=2, seconds=rng.random() * 3600),
                )
                for _ in range(n)
            ]
        own.shuffle(batch)
        out.append(batch)
    return out


def _worker(url: str, seed: int, start: Any, results: Any, crowded: bool = False) -> None:
    store = UsageStore(url)
    store.ensure_schema()
    batches = (_crowded_batches if crowded else _batches)(seed)
    start.wait(timeout=60)
    results.put(sum(store.write(batch) for batch in batches))  # type: ignore[arg-type]
    store.dispose()


def _expected_unique(crowded: bool = False) -> tuple[int, int]:
    uploads: set[uuid.UUID] = set()
    requests: set[uuid.UUID] = set()
    for seed in range(1, PROCESSES + 1):
        for batch in (_crowded_batches if crowded else _batches)(seed):
            for r in batch:
                (uploads if type(r).__name__ == "UploadRecord" else requests).add(r.id)  # type: ignore[attr-defined]
    return len(uploads), len(requests)


def _run(db_url: str, crowded: bool) -> list[int]:
    """Start the workers at once; their counts of new rows."""
    setup = UsageStore(db_url)
    setup.create_schema()
    setup.dispose()
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(PROCESSES)
    results = ctx.Queue()
    workers = [
        ctx.Process(target=_worker, args=(db_url, seed, start, results, crowded))
        for seed in range(1, PROCESSES + 1)
    ]
    for w in workers:
        w.start()
    try:
        written = [results.get(timeout=240) for _ in workers]
    finally:
        for w in workers:
            w.join(timeout=30)
            if w.is_alive():
                w.kill()
    assert all(w.exitcode == 0 for w in workers)
    return written


@pytest.mark.slow
def test_concurrent_writers_keep_rollups_exact(db_url: str) -> None:
    """4 processes writing the same rollup keys and some of the same ids at once stay exact."""
    written = _run(db_url, crowded=False)
    store = UsageStore(db_url)
    try:
        assert raw_counts(store) == _expected_unique()
        assert sum(written) == sum(_expected_unique())  # each shared row counted by one writer
        assert_rollups_exact(store)
        store.seal(FAR)  # PostgreSQL: the live requests folded in afterwards
        assert_rollups_exact(store)
    finally:
        store.dispose()


@pytest.mark.slow
def test_concurrent_writers_past_the_route_cap_count_every_request(db_url: str) -> None:
    """4 processes writing one key-day over twice the cap's routes at once: every request is
    counted once in every endpoint tier, a named route is one endpoint_routes holds, and the day
    holds at most the cap plus what the other writers' in-flight batches admitted (SQLite
    writers take turns: exactly the cap)."""
    written = _run(db_url, crowded=True)
    store = UsageStore(db_url)
    try:
        assert raw_counts(store) == _expected_unique(crowded=True)
        assert sum(written) == sum(_expected_unique(crowded=True))
        slack = 0 if store.dialect == "sqlite" else (PROCESSES - 1) * CROWDED_BATCH * 5 // 4
        store.seal(FAR)  # PostgreSQL: the live requests folded in afterwards
        assert_endpoints_consistent(store, slack=slack)
        with store.engine.connect() as conn:
            named = conn.exec_driver_sql("SELECT count(*) FROM endpoint_routes").scalar()
        assert named >= ROUTES_PER_KEY_DAY
    finally:
        store.dispose()
