"""Several processes writing overlapping rollup keys (and ids) at once lose nothing."""

from __future__ import annotations

import multiprocessing
import random
import uuid
from typing import Any

import pytest
from support.rollups import assert_rollups_exact, random_request, random_upload, raw_counts

from usage_middleware import UsageStore

PROCESSES = 4
BATCHES = 8
BATCH = 250


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


def _worker(url: str, seed: int, start: Any, results: Any) -> None:
    store = UsageStore(url)
    store.ensure_schema()
    batches = _batches(seed)
    start.wait(timeout=60)
    results.put(sum(store.write(batch) for batch in batches))  # type: ignore[arg-type]
    store.dispose()


def _expected_unique() -> tuple[int, int]:
    uploads: set[uuid.UUID] = set()
    requests: set[uuid.UUID] = set()
    for seed in range(1, PROCESSES + 1):
        for batch in _batches(seed):
            for r in batch:
                (uploads if type(r).__name__ == "UploadRecord" else requests).add(r.id)  # type: ignore[attr-defined]
    return len(uploads), len(requests)


@pytest.mark.slow
def test_concurrent_writers_keep_rollups_exact(db_url: str) -> None:
    """4 processes writing the same rollup keys and some of the same ids at once stay exact."""
    setup = UsageStore(db_url)
    setup.create_schema()
    setup.dispose()
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(PROCESSES)
    results = ctx.Queue()
    workers = [
        ctx.Process(target=_worker, args=(db_url, seed, start, results))
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
    store = UsageStore(db_url)
    try:
        assert raw_counts(store) == _expected_unique()
        assert sum(written) == sum(_expected_unique())  # each shared row counted by one writer
        assert_rollups_exact(store)
    finally:
        store.dispose()
