"""Assertions shared by the recorder's HTTP-level tests: waiting, counting, exactly-once."""

from __future__ import annotations

import time
from collections.abc import Callable

from sqlalchemy import text
from support.rollups import FAR

from usage_middleware import UsageStore


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` seconds pass; its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def scalar(store: UsageStore, sql: str) -> int:
    """The single integer a query returns (0 for NULL)."""
    with store.engine.connect() as conn:
        return int(conn.execute(text(sql)).scalar() or 0)


def assert_exactly_once(store: UsageStore, expected: int) -> None:
    """Raw tables hold ``expected`` rows and every rollup sums to the same (on PostgreSQL
    after a seal of every request, which is exact too)."""
    store.seal(FAR)
    assert scalar(store, "SELECT count(*) FROM file_uploads") == expected
    assert scalar(store, "SELECT count(*) FROM api_requests") == expected
    assert scalar(store, "SELECT coalesce(sum(total_uploads), 0) FROM daily_usage") == expected
    assert scalar(store, "SELECT coalesce(sum(total_uploads), 0) FROM hourly_usage") == expected
    assert scalar(store, "SELECT coalesce(sum(total_file_size), 0) FROM daily_usage") == scalar(
        store, "SELECT coalesce(sum(file_size), 0) FROM file_uploads"
    )
    assert (
        scalar(store, "SELECT coalesce(sum(total_requests), 0) FROM daily_request_usage")
        == expected
    )
