"""Reliability under failure: a database outage mid-load, and a worker killed with SIGKILL."""

from __future__ import annotations

import os
import signal
import statistics
import threading
import uuid
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text
from support.checks import assert_exactly_once, scalar, wait_for
from support.recorder_app import build_app
from support.servers import free_port, post_uploads, server_process, uvicorn_argv, uvicorn_in_thread
from support.tcpproxy import TcpProxy

from usage_middleware import Recorder, UsageStore

pytestmark = [pytest.mark.postgres, pytest.mark.slow]




def test_outage_during_load_keeps_requests_fast_and_lands_every_row_once(
    proxied: tuple[TcpProxy, str, UsageStore], tmp_path: Path
) -> None:
    """1,000 requests while the database is cut and restored: all fast, every row exactly once."""
    proxy, url, direct = proxied
    store = UsageStore(url, connect_timeout=1)
    recorder = Recorder(
        store,
        spool_path=tmp_path / "spool.db",
        flush_interval=0.05,
        backoff_initial=0.05,
        backoff_max=0.4,
    )
    ids = [str(uuid.uuid4()) for _ in range(1000)]
    try:
        with uvicorn_in_thread(build_app(recorder)) as base:
            cut, restored = threading.Timer(0.6, proxy.cut), threading.Timer(1.8, proxy.restore)
            cut.start()
            restored.start()
            latencies = post_uploads(base, ids, threads=8, pace=0.02)
            restored.join()
            assert wait_for(lambda: scalar(direct, "SELECT count(*) FROM file_uploads") == 1000)
            stats = recorder.stats()
    finally:
        recorder.shutdown(5)
        store.dispose()
    assert len(latencies) == 1000
    assert stats["failed_writes"] >= 1 and stats["spooled"] >= 1, stats
    assert stats["dropped"] == stats["rejected"] == 0
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99)]
    assert p99 < 0.25, f"p99 {p99 * 1000:.1f} ms"
    assert latencies[-1] < 1.0, f"slowest {latencies[-1] * 1000:.1f} ms"
    assert statistics.median(latencies) < 0.05
    assert_exactly_once(direct, 1000)


def test_sigkill_mid_load_then_restart_replays_the_spool_without_double_counting(
    proxied: tuple[TcpProxy, str, UsageStore], tmp_path: Path
) -> None:
    """A worker killed with SIGKILL mid-load loses no spooled record and counts none twice."""
    proxy, url, direct = proxied
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {"USAGE_TEST_DB_URL": url, "USAGE_TEST_SPOOL": str(tmp_path / "spool.db")}
    healthy = [str(uuid.uuid4()) for _ in range(200)]
    during_outage = [str(uuid.uuid4()) for _ in range(300)]
    at_kill = [str(uuid.uuid4()) for _ in range(300)]

    def stats() -> dict[str, int]:
        return dict(httpx.get(f"{base}/stats", timeout=5).json())

    with server_process(uvicorn_argv(port), env, f"{base}/stats") as proc:
        post_uploads(base, healthy)
        assert wait_for(lambda: stats()["written"] == 400)
        proxy.cut()
        post_uploads(base, during_outage)
        assert wait_for(lambda: stats()["spool_pending"] == 600 and stats()["queued"] == 0)
        killer = threading.Timer(0.3, os.killpg, args=(proc.pid, signal.SIGKILL))
        killer.start()
        with pytest.raises(httpx.HTTPError):
            post_uploads(base, at_kill, threads=4, pace=0.005)
        killer.join()
        assert proc.wait(10) == -signal.SIGKILL
    proxy.restore()
    with server_process(uvicorn_argv(port), env, f"{base}/stats"):
        assert wait_for(lambda: stats()["replayed"] >= 600 and stats()["spool_pending"] == 0)
    with direct.engine.connect() as conn:
        names = conn.execute(text("SELECT file_name FROM file_uploads"))
        stored = {str(r[0]).removesuffix(".bin") for r in names}
    assert set(healthy + during_outage) <= stored
    assert stored <= set(healthy + during_outage + at_kill)
    assert_exactly_once(direct, len(stored))
