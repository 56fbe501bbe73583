"""The recorder on its own, against real SQLite and PostgreSQL databases."""

from __future__ import annotations

import gc
import json
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from sqlalchemy import Uuid, bindparam, text
from support.checks import scalar, wait_for
from support.faults import down_url
from support.rollups import FAR

from usage_middleware import Recorder, RequestRecord, UploadRecord, UsageStore
from usage_middleware._recording import recorder as recording
from usage_middleware._recording.compact import PACKING, pack, unpack
from usage_middleware._recording.spool import Spool
from usage_middleware._recording.spoolformat import decode_item

UTC = timezone.utc


def uploads_in(store: UsageStore) -> int:
    return scalar(store, "SELECT count(*) FROM file_uploads")


def assert_rollup_exact(store: UsageStore) -> None:
    """daily_usage equals aggregating file_uploads (nothing counted twice or lost), and after
    a seal of every request (PostgreSQL) daily_request_usage equals api_requests."""
    store.seal(FAR)
    raw = scalar(store, "SELECT count(*) FROM file_uploads")
    raw_bytes = scalar(store, "SELECT coalesce(sum(file_size), 0) FROM file_uploads")
    assert scalar(store, "SELECT coalesce(sum(total_uploads), 0) FROM daily_usage") == raw
    assert scalar(store, "SELECT coalesce(sum(total_file_size), 0) FROM daily_usage") == raw_bytes
    requests = scalar(store, "SELECT count(*) FROM api_requests")
    assert scalar(store, "SELECT coalesce(sum(total_requests), 0) FROM daily_request_usage") == (
        requests
    )




def sample_uploads(n: int, **fields: object) -> list[UploadRecord]:
    key = uuid.uuid4()
    return [
        UploadRecord(api_key_id=key, provider="s3", file_type="image/png", file_size=i, **fields)  # type: ignore[arg-type]
        for i in range(n)
    ]


def test_submitted_records_are_written_once_with_exact_rollups(
    store: UsageStore, tmp_path: Path, recorders: list[Recorder]
) -> None:
    """Everything submitted is in the store after force_flush, and the rollups match the rows."""
    recorder = Recorder(store, spool_path=tmp_path / "spool.db", batch_size=500)
    recorders.append(recorder)
    uploads = sample_uploads(3000)
    requests = [RequestRecord(path="/files", status_code=201 + i % 2) for i in range(1200)]
    recorder.submit_many(uploads)
    recorder.submit_many(requests)
    recorder.submit_many(uploads[:100])  # a replay of ids already submitted
    assert recorder.force_flush(timeout=30)
    assert uploads_in(store) == 3000
    assert scalar(store, "SELECT count(*) FROM api_requests") == 1200
    assert_rollup_exact(store)
    stats = recorder.stats()
    assert stats["written"] == 4300
    assert stats["queued"] == stats["dropped"] == stats["spooled"] == 0


def test_full_batch_wakes_the_writer_before_the_interval(
    sqlite_url: str, tmp_path: Path, recorders: list[Recorder]
) -> None:
    """A full batch is written at once, without waiting for a long flush interval."""
    store = UsageStore(sqlite_url)
    store.create_schema()
    recorder = Recorder(store, spool_path=tmp_path / "s.db", batch_size=50, flush_interval=60)
    recorders.append(recorder)
    recorder.start()
    time.sleep(0.2)  # the writer is now asleep for the interval
    recorder.submit_many(sample_uploads(50))
    assert wait_for(lambda: uploads_in(store) == 50, timeout=5)


def test_a_single_record_is_written_within_the_flush_interval(
    sqlite_url: str, tmp_path: Path, recorders: list[Recorder]
) -> None:
    """A lone record reaches the store on the timer, without force_flush or more traffic."""
    store = UsageStore(sqlite_url)
    store.create_schema()
    recorder = Recorder(store, spool_path=tmp_path / "s.db", flush_interval=0.2)
    recorders.append(recorder)
    recorder.start()
    started = time.monotonic()
    recorder.submit(UploadRecord(file_size=7))
    assert wait_for(lambda: uploads_in(store) == 1, timeout=5)
    assert time.monotonic() - started < 2.0


def test_submit_only_queues_on_the_calling_thread(
    sqlite_url: str, tmp_path: Path, recorders: list[Recorder], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Enqueueing does no database or spool work on the caller's thread (the event loop): the
    store writes and the spool puts all happen on the recorder's own threads. What it costs is
    measured by benchmarks/recorder.py, not here."""
    store = UsageStore(sqlite_url)
    recorder = Recorder(
        store,
        spool_path=tmp_path / "s.db",
        flush_interval=0.05,
        batch_size=500,
        max_queue_size=4_000,  # spills past 2,000
    )
    recorders.append(recorder)
    callers: set[int] = set()
    backend: Any = store.backend
    real_write, real_packed, real_put = backend.write, backend.write_packed, Spool.put

    def write(*args: Any) -> int:
        callers.add(threading.get_ident())
        return real_write(*args)

    def write_packed(*args: Any) -> int:
        callers.add(threading.get_ident())
        return real_packed(*args)

    def put(self: Spool, records: Any) -> tuple[int, int]:
        callers.add(threading.get_ident())
        return real_put(self, records)

    monkeypatch.setattr(backend, "write", write)
    monkeypatch.setattr(backend, "write_packed", write_packed)
    monkeypatch.setattr(Spool, "put", put)
    recorder.start()
    for record in sample_uploads(3_000):
        recorder.submit(record)
    # every record written or spooled by the recorder's threads; shutdown() itself may spool
    # what is left on its caller's thread when its deadline passes, which is not submit's work
    deadline = time.monotonic() + 120
    while recorder.stats()["written"] + recorder.stats()["spooled"] < 3_000:
        assert time.monotonic() < deadline, recorder.stats()
        time.sleep(0.01)
    assert callers and threading.get_ident() not in callers
    recorder.shutdown()


def test_submit_never_raises_and_bad_records_are_rejected_alone(
    store: UsageStore, tmp_path: Path, recorders: list[Recorder], caplog: pytest.LogCaptureFixture
) -> None:
    """Records the store can never accept are isolated, counted and logged; the rest land."""
    recorder = Recorder(store, spool_path=tmp_path / "s.db")
    recorders.append(recorder)
    good = sample_uploads(99)
    broken = UploadRecord(file_size=1)
    broken.file_size = -5  # mutated after validation: the store refuses it
    recorder.submit_many([*good[:50], broken, *good[50:]])
    recorder.submit("not a record")  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="usage_middleware"):
        assert recorder.force_flush(timeout=30)
    assert uploads_in(store) == 99
    assert_rollup_exact(store)
    assert recorder.stats()["rejected"] == 2
    assert any("rejected" in r.getMessage() for r in caplog.records)


def test_outage_spools_then_every_record_lands_exactly_once(
    db_url: str, tmp_path: Path, recorders: list[Recorder]
) -> None:
    """While the database is unreachable records go to the spool; on recovery they land once."""
    spool = tmp_path / "spool.db"
    records = sample_uploads(700)
    down = Recorder(
        UsageStore(down_url(db_url, tmp_path), connect_timeout=1),
        spool_path=spool,
        flush_interval=0.05,
        backoff_max=0.2,
    )
    recorders.append(down)
    down.submit_many(records)
    assert wait_for(lambda: down.stats()["spool_pending"] == 700, timeout=20)
    stats = down.stats()
    assert stats["state"] == "backing_off"
    assert stats["failed_writes"] >= 1 and stats["last_error"]
    down.shutdown(timeout=2)

    store = UsageStore(db_url)
    store.create_schema()
    up = Recorder(store, spool_path=spool, flush_interval=0.05)
    recorders.append(up)
    up.submit_many(records[:100])  # the same ids again, live
    up.start()
    assert wait_for(
        lambda: up.stats()["spool_pending"] == 0 and up.stats()["queued"] == 0, timeout=20
    )
    assert up.force_flush(timeout=10)
    assert uploads_in(store) == 700
    assert_rollup_exact(store)
    assert up.stats()["replayed"] == 700


@contextmanager
def beats(progress: Callable[[], int]) -> Iterator[list[int]]:
    """What ``progress()`` reads each time a thread that sleeps a millisecond between reads gets
    the GIL back. The switch interval is set to a second, far longer than any step, so that the
    interpreter never forces a switch: the thread reads only when another lets go of the GIL
    itself, and a stretch that never lets go shows as progress the thread never saw."""
    seen: list[int] = []
    done = threading.Event()

    def beat() -> None:
        while not done.is_set():
            seen.append(progress())
            time.sleep(0.001)

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1.0)
    thread = threading.Thread(target=beat)
    thread.start()
    try:
        yield seen
    finally:
        done.set()
        thread.join()
        sys.setswitchinterval(switch)


def midway(seen: list[int], batch: int) -> set[int]:
    """The counts seen that fall strictly inside a batch of ``batch``."""
    return {n for n in seen if n % batch}


def test_spooling_a_backlog_lets_other_threads_run_between_short_steps(
    sqlite_url: str, tmp_path: Path, recorders: list[Recorder]
) -> None:
    """Spooling holds the GIL while it encodes; a thread that needs it (the event loop) must not
    wait for a whole batch of it. A thread reading how many records are spooled, which can run
    only when the spooling thread lets go of the GIL, sees the count at many points inside the
    batches of 20,000 as 100,000 records go to the spool (a batch spooled in one stretch would
    show only multiples of 20,000). Counted, not timed: benchmarks/overload.py times it."""
    store = UsageStore(sqlite_url)

    def unreachable(records: object) -> int:
        raise ConnectionError("database unreachable")

    store.write = unreachable  # type: ignore[method-assign]
    recorder = Recorder(
        store,
        spool_path=tmp_path / "spool.db",
        batch_size=20_000,
        max_queue_size=400_000,  # far from full: no hurry
        backoff_initial=60,
    )
    recorders.append(recorder)
    recorder.submit_many(sample_uploads(100_000))
    with beats(lambda: recorder.stats()["spooled"]) as seen:
        assert wait_for(lambda: recorder.stats()["spool_pending"] == 100_000, timeout=60)
    assert recorder.stats()["dropped"] == 0
    assert len(midway(seen, 20_000)) >= 20, sorted(set(seen))


def test_replaying_a_backlog_lets_other_threads_run_between_short_steps(
    sqlite_url: str, tmp_path: Path, recorders: list[Recorder], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replay reads its rows back holding the GIL: in steps, as spooling does, so a thread
    that needs the GIL (the event loop) does not wait for a whole batch of them. A thread that
    runs only when the replaying thread lets go of the GIL sees how many rows have been read at
    many points inside the batches of 20,000 (the store takes each batch at once here)."""
    spool_path = tmp_path / "spool.db"
    spool = Spool(spool_path, max_records=100_000)
    spool.open()
    assert spool.put(sample_uploads(60_000)) == (60_000, 60_000)
    spool.close()
    read = 0

    def counted(payload: str) -> object:
        nonlocal read
        item = decode_item(payload)
        read += 1
        return item

    monkeypatch.setattr(recording, "decode_item", counted)
    store = UsageStore(sqlite_url)
    store.write = len  # type: ignore[method-assign, assignment]
    recorder = Recorder(store, spool_path=spool_path, batch_size=20_000)
    recorders.append(recorder)
    with beats(lambda: read) as seen:
        recorder.start()
        assert wait_for(lambda: recorder.stats()["replayed"] == 60_000, timeout=60)
    assert read == 60_000
    assert len(midway(seen, 20_000)) >= 20, sorted(set(seen))


def test_queued_records_add_nothing_for_the_garbage_collector_to_walk(
    sqlite_url: str, tmp_path: Path, recorders: list[Recorder]
) -> None:
    """Records wait in the queue long enough to reach the collector's oldest generation, and
    every full collection (which stops the event loop too) would walk them: queued, they are
    held as values the collector does not track, and they reach the store unchanged."""
    store = UsageStore(sqlite_url)
    store.create_schema()
    recorder = Recorder(store, spool_path=tmp_path / "s.db", flush_interval=60, batch_size=50_000)
    recorders.append(recorder)
    recorder.start()
    key = uuid.uuid4()
    n = 10_000
    gc.collect()
    before = len(gc.get_objects())
    for i in range(n):
        recorder.submit(
            RequestRecord(
                api_key_id=key, path=f"/r/{i}", status_code=200 + i % 300, response_size=i
            )
        )
        recorder.submit(
            UploadRecord(
                api_key_id=None if i % 2 else key,
                request_id=uuid.uuid4(),
                provider="s3",
                file_size=i,
                file_name=f"f{i}.png",
                declared_type="image/png",
                upload_status="failed" if i % 3 else "success",
            )
        )
    gc.collect()
    assert recorder.stats()["queued"] == 2 * n
    tracked = len(gc.get_objects()) - before
    assert tracked < n // 10, f"{tracked} more objects tracked with {2 * n} records queued"
    assert recorder.force_flush(timeout=30)
    assert uploads_in(store) == n
    assert scalar(store, "SELECT count(*) FROM api_requests") == n
    assert scalar(store, "SELECT sum(response_size) FROM api_requests") == n * (n - 1) // 2
    assert scalar(store, "SELECT sum(file_size) FROM file_uploads WHERE api_key_id IS NULL") == (
        n * n // 4
    )
    assert scalar(store, "SELECT count(*) FROM file_uploads WHERE file_name LIKE 'f%.png'") == n
    assert scalar(store, "SELECT count(*) FROM file_uploads WHERE upload_status = 'failed'") == (
        n - (n + 2) // 3
    )


def test_a_record_leaves_the_queue_equal_to_what_was_submitted() -> None:
    """Every field of both record types survives the queue's form, and anything that is not a
    plain record is queued as it is (the store rejects it later, counted)."""
    assert PACKING, "the record types' fields changed: update _recording/compact.py"
    key, request_id = uuid.uuid4(), uuid.uuid4()
    at = datetime(2025, 6, 1, 12, 30, 15, 123456, tzinfo=UTC)
    records: list[object] = [
        RequestRecord(),
        UploadRecord(),
        RequestRecord(
            method="POST",
            path="/files/{id}",
            status_code=503,
            response_time_ms=12.5,
            request_size=10,
            response_size=20,
            api_key_id=key,
            error_message="boom",
            requested_at=at,
            route_matched=False,
        ),
        UploadRecord(
            provider="gcs",
            file_type="image/png",
            file_size=2**40,
            upload_status="failed",
            api_key_id=key,
            request_id=request_id,
            declared_type="image/jpeg",
            file_name="ü.png",
            error_message="too big",
            uploaded_at=at,
        ),
    ]
    for record in records:
        packed = pack(record)
        assert type(packed) is tuple
        out = unpack(packed)
        assert type(out) is type(record) and asdict(out) == asdict(record)  # type: ignore[call-overload]
        assert str(out.id) == str(record.id) and out.id.is_safe is not None  # type: ignore[attr-defined]
    odd = RequestRecord()
    odd.api_key_id = "not a uuid"  # type: ignore[assignment]
    for thing in (odd, ("r", 1), (), "text", None):
        assert pack(thing) is thing and unpack(thing) is thing


def test_shutdown_with_the_database_down_spools_and_the_next_start_replays_losslessly(
    db_url: str, tmp_path: Path, recorders: list[Recorder]
) -> None:
    """Shutdown with no database spools every record; the next start writes them unchanged."""
    spool = tmp_path / "spool.db"
    key = uuid.uuid4()
    at = datetime(2025, 3, 30, 1, 59, 59, 999_999, tzinfo=UTC)
    upload = UploadRecord(
        api_key_id=key,
        request_id=uuid.uuid4(),
        provider="vercel",
        file_type="image/webp",
        declared_type="image/png",
        file_size=2**40 + 3,
        file_name="façade 📷.webp",
        upload_status="failed",
        error_message="client disconnected",
        uploaded_at=at,
    )
    request = RequestRecord(
        id=upload.id,  # ids are unique per table: an upload and a request may share one
        api_key_id=key,
        method="PUT",
        path="/files/{id}",
        status_code=499,
        response_time_ms=0.1 + 0.2,
        request_size=12,
        response_size=0,
        error_message="ClientDisconnect: gone",
        requested_at=at - timedelta(microseconds=1),
    )
    down = Recorder(
        UsageStore(down_url(db_url, tmp_path), connect_timeout=1),
        spool_path=spool,
        flush_interval=30,
    )
    recorders.append(down)
    down.start()
    down.submit_many([upload, request, *sample_uploads(998)])
    started = time.monotonic()
    down.shutdown(timeout=3)
    assert time.monotonic() - started < 6
    assert down.stats()["spooled"] == 1000
    assert down.stats()["dropped"] == 0

    store = UsageStore(db_url)
    store.create_schema()
    up = Recorder(store, spool_path=spool, flush_interval=0.05)
    recorders.append(up)
    up.start()
    assert wait_for(lambda: up.stats()["replayed"] == 1000, timeout=20)
    assert uploads_in(store) == 999
    assert_rollup_exact(store)
    with store.engine.connect() as conn:
        by_id = bindparam("id", type_=Uuid)
        row = conn.execute(
            text("SELECT * FROM file_uploads WHERE id = :id").bindparams(by_id), {"id": upload.id}
        ).one()._mapping
        req = conn.execute(
            text("SELECT * FROM api_requests WHERE id = :id").bindparams(by_id), {"id": request.id}
        ).one()._mapping
    assert str(uuid.UUID(str(row["api_key_id"]))) == str(key)
    assert row["file_name"] == "façade 📷.webp"
    assert row["file_size"] == 2**40 + 3
    assert row["declared_type"] == "image/png"
    assert (row["upload_status"], row["error_message"]) == ("failed", "client disconnected")
    assert _aware(row["uploaded_at"]) == at
    assert req["response_time_ms"] == 0.1 + 0.2
    assert _aware(req["requested_at"]) == at - timedelta(microseconds=1)
    assert (req["path"], req["status_code"]) == ("/files/{id}", 499)


def _aware(value: datetime | str) -> datetime:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def test_drops_happen_only_when_queue_and_spool_are_full_and_are_never_silent(
    sqlite_url: str, tmp_path: Path, recorders: list[Recorder], caplog: pytest.LogCaptureFixture
) -> None:
    """With both bounds full, records are dropped, counted, logged once and exported as metrics."""
    reader = InMemoryMetricReader()
    recorder = Recorder(
        UsageStore(down_url(sqlite_url, tmp_path)),
        spool_path=tmp_path / "spool.db",
        batch_size=10,
        max_queue_size=40,
        max_spool_records=100,
        flush_interval=0.05,
        backoff_max=0.1,
        meter_provider=MeterProvider(metric_readers=[reader]),
    )
    recorders.append(recorder)
    submitted = 0
    with caplog.at_level(logging.WARNING, logger="usage_middleware"):
        for _ in range(30):
            recorder.submit_many(sample_uploads(20))
            submitted += 20
            time.sleep(0.02)
        assert wait_for(lambda: recorder.stats()["spool_pending"] == 100, timeout=10)
    stats = recorder.stats()
    assert stats["written"] == 0
    assert stats["spool_pending"] + stats["queued"] + stats["dropped"] == submitted
    # Queue bound plus the one batch a failed write hands back: everything else was dropped.
    assert stats["dropped"] >= submitted - 100 - 40 - 10
    drop_logs = [r for r in caplog.records if "dropped" in r.getMessage()]
    assert len(drop_logs) == 1  # rate limited
    exported = {
        m.name: sum(p.value for p in m.data.data_points)  # type: ignore[union-attr]
        for rm in reader.get_metrics_data().resource_metrics  # type: ignore[union-attr]
        for sm in rm.scope_metrics
        for m in sm.metrics
    }
    assert exported["usage_middleware.recorder.dropped"] == recorder.stats()["dropped"]
    assert exported["usage_middleware.recorder.spool_pending"] == 100


def test_metrics_and_stats_describe_the_recorder(
    sqlite_url: str, tmp_path: Path, recorders: list[Recorder]
) -> None:
    """stats() is JSON-serialisable, reachable from the store, and mirrored as OTel metrics."""
    reader = InMemoryMetricReader()
    store = UsageStore(sqlite_url)
    recorder = Recorder(
        store, spool_path=tmp_path / "s.db", meter_provider=MeterProvider(metric_readers=[reader])
    )
    recorders.append(recorder)
    recorder.submit_many(sample_uploads(25))
    assert recorder.force_flush(timeout=10)
    stats = json.loads(json.dumps(recorder.stats()))
    assert stats["written"] == 25 and stats["state"] == "running"
    assert stats["pid"] == os.getpid()
    assert recorder in store.recorders
    names = {
        m.name: m
        for rm in reader.get_metrics_data().resource_metrics  # type: ignore[union-attr]
        for sm in rm.scope_metrics
        for m in sm.metrics
    }
    assert names["usage_middleware.recorder.written"].data.data_points[0].value == 25  # type: ignore[union-attr]
    assert names["usage_middleware.recorder.queued"].data.data_points[0].value == 0  # type: ignore[union-attr]


def test_start_and_shutdown_are_idempotent_and_restartable(
    sqlite_url: str, tmp_path: Path, recorders: list[Recorder]
) -> None:
    """start() and shutdown() can be called repeatedly; a stopped recorder can start again."""
    store = UsageStore(sqlite_url)
    recorder = Recorder(store, spool_path=tmp_path / "s.db")
    recorders.append(recorder)
    recorder.start()
    recorder.start()
    recorder.submit_many(sample_uploads(10))
    recorder.shutdown(timeout=5)
    recorder.shutdown(timeout=5)
    assert recorder.stats()["state"] == "stopped"
    assert uploads_in(store) == 10
    recorder.submit_many(sample_uploads(5))
    assert recorder.stats()["queued"] == 5  # not restarted behind the host's back
    recorder.start()
    assert recorder.force_flush(timeout=10)
    recorder.shutdown(timeout=5)
    assert uploads_in(store) == 15


def test_several_recorders_share_one_spool_without_double_counting(
    db_url: str, tmp_path: Path, recorders: list[Recorder]
) -> None:
    """Recorders replaying one spool at once claim disjoint batches; every row counts once."""
    spool = tmp_path / "spool.db"
    down = Recorder(UsageStore(down_url(db_url, tmp_path), connect_timeout=1), spool_path=spool)
    recorders.append(down)
    down.submit_many(sample_uploads(5000))
    down.shutdown(timeout=0)
    assert down.stats()["spooled"] == 5000
    replayers = [
        Recorder(UsageStore(db_url), spool_path=spool, batch_size=250, flush_interval=0.05)
        for _ in range(3)
    ]
    recorders.extend(replayers)
    store = replayers[0].store
    store.create_schema()
    for recorder in replayers:
        recorder.start()
    assert wait_for(lambda: uploads_in(store) == 5000, timeout=60)
    assert wait_for(lambda: all(r.stats()["spool_pending"] == 0 for r in replayers), timeout=20)
    assert_rollup_exact(store)
    assert sum(r.stats()["replayed"] for r in replayers) >= 5000


def test_constructor_validates_options(sqlite_url: str) -> None:
    """Bad options raise ValueError naming the parameter."""
    store = UsageStore(sqlite_url)
    with pytest.raises(ValueError, match="batch_size"):
        Recorder(store, batch_size=0, spool_path=":memory:")
    with pytest.raises(ValueError, match="max_queue_size"):
        Recorder(store, batch_size=10, max_queue_size=5, spool_path=":memory:")
    with pytest.raises(ValueError, match="flush_interval"):
        Recorder(store, flush_interval=0, spool_path=":memory:")
    with pytest.raises(ValueError, match="backoff_max"):
        Recorder(store, backoff_max=0, spool_path=":memory:")


def test_default_spool_lives_in_the_configured_directory_one_file_per_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without spool_path the spool goes to USAGE_MIDDLEWARE_SPOOL_DIR, one file per store URL."""
    monkeypatch.setenv("USAGE_MIDDLEWARE_SPOOL_DIR", str(tmp_path / "spools"))
    a = Recorder(UsageStore(f"sqlite:///{tmp_path / 'a.db'}"))
    a_again = Recorder(UsageStore(f"sqlite:///{tmp_path / 'a.db'}"))
    b = Recorder(UsageStore(f"sqlite:///{tmp_path / 'b.db'}"))
    assert Path(a.spool_path).parent == tmp_path / "spools"
    assert a.spool_path == a_again.spool_path != b.spool_path


def test_records_submitted_after_shutdown_are_spooled_at_interpreter_exit(
    sqlite_url: str, tmp_path: Path, recorders: list[Recorder]
) -> None:
    """Records that arrive after shutdown are not lost: the process spools them as it exits."""
    spool = tmp_path / "spool.db"
    script = (
        "import sys\n"
        "from usage_middleware import Recorder, UploadRecord, UsageStore\n"
        "r = Recorder(UsageStore(sys.argv[1]), spool_path=sys.argv[2])\n"
        "r.start()\n"
        "r.shutdown(5)\n"
        "r.submit_many(UploadRecord(file_size=3) for _ in range(5))\n"
    )
    subprocess.run([sys.executable, "-c", script, sqlite_url, str(spool)], check=True, timeout=60)
    store = UsageStore(sqlite_url)
    store.create_schema()
    recorder = Recorder(store, spool_path=spool, flush_interval=0.05)
    recorders.append(recorder)
    recorder.start()
    assert wait_for(lambda: uploads_in(store) == 5, timeout=20)
    assert recorder.stats()["replayed"] == 5


def test_spool_keys_are_stored_as_their_bytes_and_found_again(tmp_path: Path) -> None:
    """A spooled record's row is keyed by the BLOB of its kind and id, the same record put
    again is the same row, and the keys a claim hands back release and remove their rows;
    a row another writer keyed by text is claimed and removed as well."""
    from usage_middleware._recording.spoolformat import encode, spool_key

    path = tmp_path / "spool.sqlite3"
    spool = Spool(path, max_records=100)
    records = [RequestRecord(path=f"/files/{i}") for i in range(3)]
    assert spool.put(records) == (3, 3)
    assert spool.put(records[:2]) == (2, 0)  # already there: taken, not stored twice
    with spool._transaction() as conn:
        conn.execute(
            "INSERT INTO spool (id, payload) VALUES ('text-key', ?)", (encode(RequestRecord()),)
        )
        conn.execute("UPDATE spool_size SET n = n + 1")
        stored = conn.execute("SELECT typeof(id), id FROM spool ORDER BY id").fetchall()
    assert sorted(stored, key=repr) == sorted(
        [("blob", spool_key(r)) for r in records] + [("text", "text-key")], key=repr
    )
    claimed = spool.claim(10)
    assert sorted(k for k, _ in claimed if isinstance(k, bytes)) == sorted(
        spool_key(r) for r in records
    )
    assert spool.claim(10) == []  # all leased
    spool.release([k for k, _ in claimed])
    assert len(spool.claim(10)) == 4  # released: claimed again
    spool.remove([k for k, _ in claimed])
    assert spool.refresh() == 0
    with spool._transaction() as conn:
        assert conn.execute("SELECT count(*) FROM spool").fetchone() == (0,)
    spool.close()
