"""Several worker processes: a forked child, uvicorn --workers 4, gunicorn with uvicorn workers."""

from __future__ import annotations

import os
import threading
import uuid
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text
from support.checks import assert_exactly_once, scalar
from support.servers import free_port, gunicorn_argv, server_process, stop, uvicorn_argv

from usage_middleware import Recorder, UploadRecord, UsageStore

pytestmark = pytest.mark.slow


def load(base: str, n: int, threads: int = 8) -> set[int]:
    """``n`` uploads over fresh connections; returns the pids of the workers that served them."""
    pids: set[int] = set()
    errors: list[BaseException] = []

    def client(count: int) -> None:
        try:
            for i in range(count):
                # A new connection every few requests, so the kernel spreads them over workers.
                if i % 25 == 0:
                    http = httpx.Client(base_url=base, timeout=10.0)
                name = f"{uuid.uuid4()}.bin"
                response = http.post("/upload", files={"file": (name, b"x" * i, "image/png")})
                response.raise_for_status()
                pids.add(response.json()["pid"])
                if i % 25 == 24 or i == count - 1:
                    http.close()
        except BaseException as exc:
            errors.append(exc)

    share = [n // threads + (1 if i < n % threads else 0) for i in range(threads)]
    workers = [threading.Thread(target=client, args=(c,), daemon=True) for c in share]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    if errors:
        raise errors[0]
    return pids


def test_forked_child_gets_a_fresh_recorder_and_parent_keeps_its_records(
    db_url: str, tmp_path: Path
) -> None:
    """A child forked from a running recorder starts its own worker and never re-writes the
    parent's queued records; both processes' records land exactly once."""
    store = UsageStore(db_url)
    store.create_schema()
    recorder = Recorder(store, spool_path=tmp_path / "spool.db", flush_interval=30)
    recorder.start()
    recorder.submit_many(UploadRecord(file_size=1) for _ in range(50))  # queued, not written
    with store.engine.connect() as conn:  # a pooled connection the child must not reuse
        conn.execute(text("SELECT 1"))
    pid = os.fork()
    if pid == 0:  # the child: report through the exit status, never return into pytest
        code = 1
        try:
            fresh = recorder.stats()
            ok = fresh["queued"] == 0 and fresh["state"] == "not_started"
            recorder.submit_many(UploadRecord(file_size=2) for _ in range(20))
            ok = ok and recorder.stats()["state"] == "running"
            recorder.shutdown(timeout=20)
            ok = ok and recorder.stats()["written"] == 20
            code = 0 if ok else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    try:
        assert os.waitstatus_to_exitcode(status) == 0
        assert recorder.stats()["queued"] == 50
        recorder.shutdown(timeout=20)
        assert scalar(store, "SELECT count(*) FROM file_uploads WHERE file_size = 1") == 50
        assert scalar(store, "SELECT count(*) FROM file_uploads WHERE file_size = 2") == 20
        assert scalar(store, "SELECT sum(total_uploads) FROM daily_usage") == 70
    finally:
        store.dispose()


@pytest.mark.postgres
def test_uvicorn_with_four_workers_keeps_the_rollup_exact(pg_url: str, tmp_path: Path) -> None:
    """Four uvicorn worker processes under load record every request once; rollups are exact."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {"USAGE_TEST_DB_URL": pg_url, "USAGE_TEST_SPOOL": str(tmp_path / "spool.db")}
    store = UsageStore(pg_url)
    store.create_schema()
    try:
        argv = uvicorn_argv(port, "--workers", "4")
        with server_process(argv, env, f"{base}/stats") as proc:
            pids = load(base, 2000)
            assert stop(proc) == 0  # graceful: every worker flushes on lifespan shutdown
        assert len(pids) >= 2, pids
        assert_exactly_once(store, 2000)
    finally:
        store.dispose()


def test_gunicorn_with_uvicorn_workers_forked_after_an_early_start(
    sqlite_url: str, tmp_path: Path
) -> None:
    """gunicorn --preload forks workers from a master whose recorder already runs; each
    worker records on its own and the SQLite rollup is exact after a graceful stop."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {
        "USAGE_TEST_DB_URL": sqlite_url,
        "USAGE_TEST_SPOOL": str(tmp_path / "spool.db"),
        "USAGE_TEST_START_EARLY": "1",
    }
    store = UsageStore(sqlite_url)
    store.create_schema()
    try:
        argv = gunicorn_argv(port, 3, "--preload")
        with server_process(argv, env, f"{base}/stats") as proc:
            pids = load(base, 1200)
            assert stop(proc) == 0
        assert len(pids) >= 2, pids
        assert_exactly_once(store, 1200)
    finally:
        store.dispose()
