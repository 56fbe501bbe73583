"""The recorder when things go wrong underneath it: a spool that cannot grow, values the
database refuses, rows in the spool that cannot be read back. Every record must end up written,
spooled, queued, rejected or dropped, and every failure must show in stats() and the logs."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from support.checks import scalar, wait_for
from support.faults import down_url
from support.rollups import assert_rollups_exact

from usage_middleware import Recorder, RequestRecord, UploadRecord, UsageStore

UTC = timezone.utc
BIG = 2**50  # the largest size a record may state
FIT = (2**63 - 1) // BIG  # how many of them one bigint rollup counter holds
DAY = datetime(2025, 6, 1, 12, tzinfo=UTC)




def spool_rows(path: Path, table: str = "spool") -> list[tuple[object, object]]:
    with sqlite3.connect(path) as conn:
        rows = conn.execute(f"SELECT id, payload FROM {table}").fetchall()
    conn.close()
    return rows


def accounted(stats: dict[str, int]) -> int:
    """Records written, waiting in the spool or the queue, rejected or dropped."""
    return sum(stats[k] for k in ("written", "spool_pending", "queued", "rejected", "dropped"))


# --- a spool that cannot grow -----------------------------------------------------------------

_FULL_SPOOL_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys, time
    from usage_middleware import Recorder, UploadRecord, UsageStore

    url, spool, limit, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    records = [UploadRecord(provider="s3", file_size=i) for i in range(n)]
    recorder = Recorder(
        UsageStore(url, connect_timeout=1), spool_path=spool, batch_size=500,
        max_queue_size=4000, flush_interval=0.02, backoff_initial=0.02, backoff_max=0.1,
    )
    # No file of this process may grow past `limit` bytes from here on: the spool fills up.
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    for i, record in enumerate(records):
        recorder.submit(record)
        if i % 250 == 0:
            time.sleep(0.002)  # let the spiller run against the full spool
    time.sleep(0.5)
    running = recorder.stats()
    recorder.shutdown(timeout=5)
    print(json.dumps({"running": running, "stopped": recorder.stats()}))
    """
)


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE is POSIX")
def test_a_spool_that_cannot_grow_loses_no_record_silently(tmp_path: Path) -> None:
    """With the database down and the spool file capped (RLIMIT_FSIZE), every one of 30,000
    records is spooled or counted as dropped, and the spool failures show in stats and logs."""
    spool = tmp_path / "spool.db"
    n = 30_000
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            _FULL_SPOOL_SCRIPT,
            f"sqlite:///{tmp_path / 'missing-dir' / 'usage.db'}",
            str(spool),
            str(1_000_000),
            str(n),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    stats = out["stopped"]
    in_spool = len(spool_rows(spool))
    assert 0 < in_spool < n  # the cap was reached
    assert stats["spooled"] == stats["spool_pending"] == in_spool
    assert accounted(stats) == n, stats
    assert stats["dropped"] > 0 and stats["queued"] == 0
    assert out["running"]["spool_errors"] > 0
    assert "spool error" in done.stderr and "dropped" in done.stderr


def test_an_unencodable_record_does_not_take_its_spill_chunk_with_it(
    sqlite_url: str, tmp_path: Path, recorders: list[Recorder], caplog: pytest.LogCaptureFixture
) -> None:
    """During an outage the spiller moves records to the spool; one object that is not a record
    is rejected alone instead of failing the whole chunk."""
    recorder = Recorder(
        UsageStore(down_url(sqlite_url, tmp_path)),
        spool_path=tmp_path / "spool.db",
        batch_size=100,
        flush_interval=0.02,
        backoff_initial=120,  # the writer waits; only the spiller moves what follows
    )
    recorders.append(recorder)
    recorder.submit_many(UploadRecord(file_size=i) for i in range(100))
    assert wait_for(lambda: recorder.stats()["spool_pending"] == 100, timeout=20)
    assert recorder.stats()["state"] == "backing_off"
    with caplog.at_level(logging.WARNING, logger="usage_middleware"):
        recorder.submit_many(UploadRecord(file_size=i) for i in range(150))
        recorder.submit("not a record")  # type: ignore[arg-type]
        recorder.submit_many(UploadRecord(file_size=i) for i in range(150))
        assert wait_for(lambda: recorder.stats()["queued"] == 0, timeout=20)
        assert wait_for(lambda: recorder.stats()["spool_pending"] == 400, timeout=20)
    stats = recorder.stats()
    assert (stats["spooled"], stats["rejected"], stats["dropped"]) == (400, 1, 0)
    assert any("rejected" in r.getMessage() for r in caplog.records)


def test_shutdown_spills_the_valid_records_around_an_unencodable_one(
    sqlite_url: str, tmp_path: Path
) -> None:
    """Records left at shutdown are spooled even when one of them cannot be."""
    recorder = Recorder(UsageStore(down_url(sqlite_url, tmp_path)), spool_path=tmp_path / "s.db")
    recorder.shutdown(timeout=1)  # stopped before it started: records now wait for shutdown()
    recorder.submit_many(UploadRecord(file_size=i) for i in range(10))
    recorder.submit(object())  # type: ignore[arg-type]
    recorder.submit_many(UploadRecord(file_size=i) for i in range(10))
    recorder.shutdown(timeout=1)
    stats = recorder.stats()
    assert (stats["spooled"], stats["rejected"], stats["dropped"]) == (20, 1, 0)
    assert len(spool_rows(tmp_path / "s.db")) == 20


# --- values the database refuses ----------------------------------------------------------------


def big_uploads(n: int, key: uuid.UUID) -> list[UploadRecord]:
    """Uploads of the largest allowed size in one rollup group: only FIT of them can be counted."""
    return [
        UploadRecord(
            api_key_id=key, provider="s3", file_type="video/mp4", file_size=BIG, uploaded_at=DAY
        )
        for _ in range(n)
    ]


def ordinary(n: int) -> list[UploadRecord | RequestRecord]:
    key = uuid.uuid4()
    return [
        UploadRecord(api_key_id=key, provider="vercel", file_size=i, uploaded_at=DAY)
        if i % 2
        else RequestRecord(api_key_id=key, path="/files", response_time_ms=i, requested_at=DAY)
        for i in range(n)
    ]


def test_a_batch_whose_rollup_sum_overflows_is_refused_as_permanent(store: UsageStore) -> None:
    """store.write() reports values the database refuses (a bigint rollup sum out of range) as a
    ValueError, changing nothing, not as an outage to retry; the database holds no float sums."""
    key = uuid.uuid4()
    store.write(big_uploads(FIT, key))
    with pytest.raises(ValueError, match="refused"):
        store.write([*ordinary(4), *big_uploads(1, key)])
    assert scalar(store, "SELECT count(*) FROM file_uploads") == FIT
    assert_rollups_exact(store)
    assert store.write(ordinary(4)) == 4


def test_records_the_database_refuses_are_rejected_and_the_rest_keeps_flowing(
    store: UsageStore, tmp_path: Path, recorders: list[Recorder], caplog: pytest.LogCaptureFixture
) -> None:
    """Uploads whose sizes overflow their rollup are isolated by bisection and rejected; the
    others land with exact rollups and the recorder stays running."""
    recorder = Recorder(store, spool_path=tmp_path / "spool.db", batch_size=1000)
    recorders.append(recorder)
    key = uuid.uuid4()
    others = ordinary(600)
    with caplog.at_level(logging.WARNING, logger="usage_middleware"):
        recorder.submit_many([*others[:300], *big_uploads(FIT + 3, key), *others[300:]])
        assert recorder.force_flush(timeout=120)
    stats = recorder.stats()
    assert (stats["written"], stats["rejected"], stats["state"]) == (FIT + 600, 3, "running")
    assert any("rejected" in r.getMessage() for r in caplog.records)
    assert_rollups_exact(store)
    recorder.submit_many(ordinary(10))
    assert recorder.force_flush(timeout=30)
    assert recorder.stats()["written"] == FIT + 610


def test_spooled_records_the_database_refuses_do_not_stall_the_replay(
    db_url: str, tmp_path: Path, recorders: list[Recorder]
) -> None:
    """A spool holding records that overflow a rollup drains on the next start: those are
    rejected, every other spooled record is written."""
    spool = tmp_path / "spool.db"
    down = Recorder(UsageStore(down_url(db_url, tmp_path), connect_timeout=1), spool_path=spool)
    recorders.append(down)
    down.submit_many([*big_uploads(FIT + 2, uuid.uuid4()), *ordinary(300)])
    down.shutdown(timeout=0)
    # the recorder's threads may still be spooling what they held when the deadline passed
    assert wait_for(lambda: down.stats()["spooled"] == FIT + 302, timeout=30), down.stats()

    store = UsageStore(db_url)
    store.create_schema()
    up = Recorder(store, spool_path=spool, batch_size=2000, flush_interval=0.05)
    recorders.append(up)
    up.start()

    def settled() -> bool:
        stats = up.stats()
        return stats["replayed"] + stats["rejected"] == FIT + 302 and stats["spool_pending"] == 0

    assert wait_for(settled, timeout=60)
    stats = up.stats()
    assert (stats["replayed"], stats["rejected"], stats["state"]) == (FIT + 300, 2, "running")
    assert scalar(store, "SELECT count(*) FROM file_uploads") == FIT + 150
    assert_rollups_exact(store)
    assert spool_rows(spool) == []


def test_a_batch_spooled_by_shutdown_and_by_its_failed_write_counts_once(
    sqlite_url: str, tmp_path: Path, recorders: list[Recorder]
) -> None:
    """A shutdown whose deadline passes during a write spools the batch in flight, for the
    process may end before the write does; when that write then fails, the writer spools the
    same batch. The spool keeps one row per record, and ``spooled`` counts each record once."""
    store = UsageStore(sqlite_url)
    store.create_schema()
    writing, release = threading.Event(), threading.Event()

    def write_packed(*args: object) -> int:
        writing.set()
        release.wait(30)
        raise ConnectionError("the database went away during the write")

    backend: Any = store.backend
    backend.write_packed = write_packed
    spool = tmp_path / "spool.db"
    recorder = Recorder(store, spool_path=spool, batch_size=10, flush_interval=0.01)
    recorders.append(recorder)
    recorder.start()
    recorder.submit_many(UploadRecord(provider="s3", file_size=i) for i in range(25))
    assert writing.wait(30)
    recorder.shutdown(timeout=0)  # the batch in flight and the 15 queued ones are spooled
    assert recorder.stats()["spooled"] == 25
    release.set()
    for thread in threading.enumerate():  # the writer spools its failed batch, then stops
        if thread.name == "usage-middleware-recorder":
            thread.join(30)
    assert len(spool_rows(spool)) == 25
    assert recorder.stats()["spooled"] == 25


# --- spool rows that cannot be read back --------------------------------------------------------


def test_unreadable_spool_rows_are_quarantined_and_the_rest_replays(
    sqlite_url: str, tmp_path: Path, recorders: list[Recorder], caplog: pytest.LogCaptureFixture
) -> None:
    """Rows a recorder cannot decode (a time out of range, JSON nested too deep, a size over the
    limit) are moved aside, counted and logged; the valid rows claimed with them are written."""
    spool = tmp_path / "spool.db"
    down = Recorder(UsageStore(down_url(sqlite_url, tmp_path)), spool_path=spool)
    recorders.append(down)
    valid = [UploadRecord(provider="s3", file_size=i) for i in range(50)]
    down.submit_many(valid)
    down.shutdown(timeout=0)

    def upload_payload(size: int, at_us: int) -> str:
        row = [1, "u", uuid.uuid4().hex, None, None, "s3", "image/png", None, size, None,
               "success", None, at_us]  # fmt: skip
        return json.dumps(row)

    # Keys sort before the valid rows' (b"u" + id), so they are claimed in the same batch.
    bad = {
        b"a-time": upload_payload(1, 10**18),
        b"b-nesting": "[" * 100_000 + "]" * 100_000,
        b"c-size": upload_payload(2**62, 0),
        b"d-junk": "{not json",
    }
    with sqlite3.connect(spool) as conn:
        conn.executemany("INSERT INTO spool (id, payload) VALUES (?, ?)", list(bad.items()))
        # A row whose key was stored as text rather than bytes: still readable, still replayed.
        conn.execute(
            "INSERT INTO spool (id, payload) VALUES (?, ?)", ("text-key", upload_payload(7, 0))
        )
    conn.close()

    store = UsageStore(sqlite_url)
    store.create_schema()
    up = Recorder(store, spool_path=spool, flush_interval=0.05)
    recorders.append(up)
    with caplog.at_level(logging.WARNING, logger="usage_middleware"):
        up.start()
        assert wait_for(lambda: up.stats()["replayed"] + up.stats()["quarantined"] == 55)
        assert wait_for(lambda: up.stats()["spool_pending"] == 0)
    stats = up.stats()
    assert (stats["replayed"], stats["quarantined"], stats["rejected"]) == (51, 4, 0)
    assert scalar(store, "SELECT count(*) FROM file_uploads") == 51
    assert spool_rows(spool) == []
    kept = dict(spool_rows(spool, "spool_quarantine"))
    assert kept == bad
    assert any("quarantine" in r.getMessage() for r in caplog.records)
