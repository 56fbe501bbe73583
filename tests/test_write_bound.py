"""Writes through a peer that stops answering fail within ``write_timeout`` instead of hanging.

The proxy freezes: it keeps every connection open and its kernel keeps acknowledging packets,
but nothing is forwarded — what a hung pooler or a partition behind a load balancer looks like.
Keepalives cannot see that, and the server never receives the statement, so only the client's
own bound ends the wait. A waiting thread is given 60 s, far beyond the 1 s bound, so only a
write that hangs fails these tests.
"""

from __future__ import annotations

import random
import threading
import uuid
from pathlib import Path

import pytest
from support.checks import assert_exactly_once, scalar, wait_for
from support.rollups import random_request, random_upload
from support.tcpproxy import TcpProxy

from usage_middleware import (
    ConfigurationError,
    DatabaseUnavailableError,
    Recorder,
    RequestRecord,
    UploadRecord,
    UsageStore,
)

pytestmark = pytest.mark.postgres

HANG = 60.0  # seconds a blocked write gets before the test calls it hung (the bound is 1 s)




def batch(seed: int, n: int) -> list[UploadRecord | RequestRecord]:
    rng = random.Random(seed)
    return [random_upload(rng) for _ in range(n)] + [random_request(rng) for _ in range(n)]


def write_in_thread(store: UsageStore, records: list[UploadRecord | RequestRecord]) -> object:
    """What ``store.write`` returned or raised, or ``"hung"`` when it did not end in time."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(store.write(records))
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(HANG)
    return outcome[0] if outcome else "hung"


@pytest.mark.parametrize("pre_ping", [True, False], ids=["pooled-ping", "in-transaction"])
def test_write_through_a_frozen_peer_fails_then_lands_once_after_thaw(
    proxied: tuple[TcpProxy, str, UsageStore], pre_ping: bool
) -> None:
    """Frozen between writes: the pooled connection's check (or, with it off, the write's own
    statements) is cut off, the write raises DatabaseUnavailableError, and once the peer
    answers again the same batch is stored exactly once."""
    proxy, url, direct = proxied
    store = UsageStore(
        url, connect_timeout=1, write_timeout=1, engine_options={"pool_pre_ping": pre_ping}
    )
    try:
        assert store.write(batch(1, 10)) == 20
        proxy.freeze()
        pending = batch(2, 25)
        outcome = write_in_thread(store, pending)
        assert isinstance(outcome, DatabaseUnavailableError), outcome
        again = write_in_thread(store, pending)  # still frozen: a new connection times out too
        assert isinstance(again, DatabaseUnavailableError), again
        proxy.thaw()
        assert store.write(pending) == 50
        assert store.write(pending) == 0
    finally:
        store.dispose()
    assert_exactly_once(direct, 35)


def test_recorder_behind_a_frozen_peer_backs_off_spools_and_replays_once(
    proxied: tuple[TcpProxy, str, UsageStore], tmp_path: Path
) -> None:
    """The recorder's write fails within the bound: it backs off, spools, and after the thaw
    every record lands exactly once."""
    proxy, url, direct = proxied
    store = UsageStore(url, connect_timeout=1, write_timeout=1)
    recorder = Recorder(
        store,
        spool_path=tmp_path / "spool.db",
        flush_interval=0.05,
        backoff_initial=0.05,
        backoff_max=0.5,
    )
    try:
        recorder.submit_many(batch(3, 20))
        assert recorder.force_flush(HANG)
        proxy.freeze()
        recorder.submit_many(batch(4, 30))
        assert wait_for(
            lambda: (
                recorder.stats()["state"] == "backing_off" and recorder.stats()["spooled"] >= 60
            ),
            timeout=HANG,
        ), recorder.stats()
        stats = recorder.stats()
        assert stats["failed_writes"] >= 1 and stats["dropped"] == 0, stats
        assert "DatabaseUnavailableError" in (stats["last_error"] or ""), stats
        proxy.thaw()
        assert wait_for(
            lambda: (
                recorder.stats()["spool_pending"] == 0
                and recorder.stats()["state"] == "running"
                and scalar(direct, "SELECT count(*) FROM file_uploads") == 50
            ),
            timeout=HANG,
        ), recorder.stats()
    finally:
        recorder.shutdown(5)
        store.dispose()
    assert_exactly_once(direct, 50)


def test_write_timeout_must_be_positive() -> None:
    with pytest.raises(ConfigurationError):
        UsageStore("postgresql+psycopg://u@127.0.0.1/db", write_timeout=0)


def test_a_write_blocked_on_a_lock_is_ended_by_the_server_too(pg_url: str) -> None:
    """The server's half of the bound: a write blocked on a rollup row that another
    transaction holds fails, and its server session stops waiting on the lock (the statement
    is cancelled there, rather than waiting as long as the other transaction lives)."""
    direct = UsageStore(pg_url)
    direct.create_schema()
    store = UsageStore(pg_url, write_timeout=1)
    key = uuid.uuid4()
    record = UploadRecord(api_key_id=key, provider="s3", file_size=1)
    direct.write([record])
    same_day = UploadRecord(
        api_key_id=key, provider="s3", file_size=2, uploaded_at=record.uploaded_at
    )
    waiting = (
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    try:
        with direct.engine.connect() as blocker:
            blocker.exec_driver_sql(
                "SELECT * FROM daily_usage WHERE api_key_id = %(k)s FOR UPDATE", {"k": key}
            )
            outcome = write_in_thread(store, [same_day])
            assert isinstance(outcome, DatabaseUnavailableError), outcome
            assert wait_for(lambda: scalar(direct, waiting) == 0, timeout=HANG)
            blocker.rollback()
        assert store.write([same_day]) == 1
    finally:
        store.dispose()
        direct.dispose()
