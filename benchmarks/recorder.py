"""Recorder benchmark: enqueue cost (and a request with no upload handed over as a record
against the queue's tuple), the writer's CPU per request row (records against the packed
batches the recorder hands the store), end-to-end rows/s under HTTP load against the direct
``store.write`` ceiling measured in the same run, and request latency with the database healthy
vs cut (through a TCP proxy).

    .venv/bin/python benchmarks/recorder.py [--seconds 6] [--files 20] [--pg postgresql+psycopg://postgres@127.0.0.1:5432/postgres]

The server is uvicorn in a subprocess (the upload app of tests/support behind UsageMiddleware,
each request a multipart upload of ``--files`` files: one request row plus one row per file);
the load comes from client threads in this process, over loopback, for a bounded time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import httpx
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from support.pg import create_database, drop_database  # noqa: E402
from support.servers import free_port, server_process, uvicorn_argv  # noqa: E402
from support.tcpproxy import TcpProxy  # noqa: E402

from usage_middleware import Recorder, RequestRecord, UploadRecord, UsageStore  # noqa: E402
from usage_middleware._recording.compact import (  # noqa: E402
    PackedBatch,
    new_request_item,
    pack,
    unpack,
)


def rows(n: int) -> list[UploadRecord | RequestRecord]:
    key = uuid.uuid4()
    out: list[UploadRecord | RequestRecord] = []
    for i in range(n):
        if i % 21 == 0:
            out.append(RequestRecord(api_key_id=key, path="/upload", status_code=200))
        else:
            out.append(
                UploadRecord(api_key_id=key, provider="s3", file_size=i, file_type="image/png")
            )
    return out


def idle_recorder(tmp: Path, name: str, size: int) -> tuple[UsageStore, Recorder]:
    """A running recorder that writes nothing while it is timed (``size`` records queue)."""
    store = UsageStore(f"sqlite:///{tmp / name}.db")
    recorder = Recorder(
        store,
        spool_path=tmp / f"{name}-spool.db",
        flush_interval=3600,
        batch_size=size,
        max_queue_size=size,
    )
    recorder.start()
    return store, recorder


def enqueue_cost(tmp: Path) -> float:
    """Best-of-5 nanoseconds per submit() into a running recorder."""
    store, recorder = idle_recorder(tmp, "enqueue", 1_000_000)
    records = rows(100_000)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter_ns()
        for record in records:
            recorder.submit(record)
        best = min(best, (time.perf_counter_ns() - t0) / len(records))
    recorder.shutdown(0)
    store.dispose()
    return best


def handoff_cost(tmp: Path) -> tuple[float, float]:
    """Best-of-5 nanoseconds per request with no upload, built from the middleware's values
    and handed to a running recorder: as a record and ``submit()`` (how the middleware did it,
    and does for any other recorder) against the queue's tuple and ``submit_item()``,
    alternating."""
    store, recorder = idle_recorder(tmp, "handoff", 2_000_000)
    now = datetime.now(timezone.utc)
    key = uuid.uuid4()
    values = [("GET", "/files/{id}", 200, 1.5 + i % 7, 10, 2_000, key, None, now, True)
              for i in range(100_000)]  # fmt: skip
    best = {"record": float("inf"), "tuple": float("inf")}
    for _ in range(5):
        for way in best:
            recorder._queue.clear()  # room for the next pass; nothing is written meanwhile
            t0 = time.perf_counter_ns()
            if way == "record":
                for v in values:
                    recorder.submit(RequestRecord._unchecked(*v))
            else:
                for v in values:
                    recorder.submit_item(new_request_item(*v))
            best[way] = min(best[way], (time.perf_counter_ns() - t0) / len(values))
    recorder._queue.clear()
    recorder.shutdown(0)
    store.dispose()
    return best["record"], best["tuple"]


def write_ceiling(url: str, seconds: float, batch: int = 2000) -> float:
    """Rows/s of store.write in batches of ``batch`` on one thread, nothing else running."""
    store = UsageStore(url)
    store.create_schema()
    store.write(rows(batch))  # warm up
    written, busy, t0 = 0, 0.0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        data = rows(batch)  # built outside the timed part: only the write is measured
        t1 = time.perf_counter()
        store.write(data)
        busy += time.perf_counter() - t1
        written += batch
    store.dispose()
    return written / busy


def writer_cost(url: str, rounds: int = 15, batch: int = 2000) -> tuple[float, float]:
    """Median CPU µs per request row of the writer's work for a batch of the middleware's
    requests, taken from the queue: as records (unpacked, then ``store.write``, which validates
    them) and as the packed batch the recorder hands the store; the two alternate batch by
    batch, so the machine's load moves both alike."""
    store = UsageStore(url)
    store.create_schema()
    key = uuid.uuid4()

    def queued() -> list[object]:
        now, request = datetime.now(timezone.utc), RequestRecord._unchecked
        return [
            pack(request("POST", "/upload", 201, 12.5, 4096, 80, key, None, now, True))
            for _ in range(batch)
        ]

    ways: dict[str, Callable[[list[object]], object]] = {
        "records": lambda items: store.write([unpack(i) for i in items]),
        "packed": lambda items: store.write(PackedBatch(items)),
    }
    costs: dict[str, list[float]] = {name: [] for name in ways}
    for way in ways.values():  # warm up
        way(queued())
    for _ in range(rounds):
        for name, way in ways.items():
            items = queued()
            t0 = time.process_time()  # this process only: the database's own work not counted
            way(items)
            costs[name].append((time.process_time() - t0) / batch * 1e6)
    store.dispose()
    return statistics.median(costs["records"]), statistics.median(costs["packed"])


def count_rows(url: str) -> int:
    engine = create_engine(url)
    with engine.connect() as conn:
        n = conn.execute(
            text("SELECT (SELECT count(*) FROM file_uploads) + (SELECT count(*) FROM api_requests)")
        ).scalar()
    engine.dispose()
    return int(n or 0)


def load(base: str, seconds: float, files: int, threads: int, pace: float = 0.0) -> list[float]:
    """Multipart uploads of ``files`` files each for ``seconds``; returns request latencies."""
    stop = time.monotonic() + seconds
    latencies: list[float] = []
    lock = threading.Lock()
    parts = [
        ("file", (f"f{i}.png", b"\x89PNG\r\n\x1a\n" + b"x" * 200, "image/png"))
        for i in range(files)
    ]

    def client() -> None:
        with httpx.Client(base_url=base, timeout=30) as http:
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                http.post("/upload", files=parts).raise_for_status()
                with lock:
                    latencies.append(time.perf_counter() - t0)
                if pace:
                    time.sleep(pace)

    workers = [threading.Thread(target=client) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return latencies


def end_to_end(url: str, tmp: Path, seconds: float, files: int) -> tuple[float, int, float]:
    """Rows/s from the first request until the last row is in the database."""
    store = UsageStore(url)
    store.create_schema()
    store.dispose()
    port = free_port()
    env = {"USAGE_TEST_DB_URL": url, "USAGE_TEST_SPOOL": str(tmp / f"e2e-{port}.db")}
    base = f"http://127.0.0.1:{port}"
    with server_process(uvicorn_argv(port), env, f"{base}/stats"):
        t0 = time.perf_counter()
        latencies = load(base, seconds, files, threads=6)
        expected = len(latencies) * (files + 1)
        deadline = time.monotonic() + 60
        while count_rows(url) < expected and time.monotonic() < deadline:
            time.sleep(0.05)
        elapsed = time.perf_counter() - t0
        landed = count_rows(url)
    return landed / elapsed, landed, len(latencies) / seconds


def p99(values: list[float]) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * 0.99))] * 1000


def latency_healthy_vs_cut(url: str, tmp: Path, seconds: float, files: int) -> tuple[float, ...]:
    parsed = make_url(url)
    proxy = TcpProxy(parsed.host or "127.0.0.1", parsed.port or 5432)
    proxied = parsed.set(port=proxy.port).render_as_string(hide_password=False)
    port = free_port()
    env = {"USAGE_TEST_DB_URL": proxied, "USAGE_TEST_SPOOL": str(tmp / "latency-spool.db")}
    base = f"http://127.0.0.1:{port}"
    try:
        with server_process(uvicorn_argv(port), env, f"{base}/stats"):
            load(base, 1.0, files, threads=4, pace=0.005)  # warm up
            healthy = load(base, seconds, files, threads=4, pace=0.005)
            proxy.cut()
            cut = load(base, seconds, files, threads=4, pace=0.005)
            stats = httpx.get(f"{base}/stats").json()
            proxy.restore()
    finally:
        proxy.close()
    assert stats["failed_writes"] > 0, "the cut was not noticed"
    return (
        statistics.median(healthy) * 1000,
        p99(healthy),
        statistics.median(cut) * 1000,
        p99(cut),
        float(stats["spooled"]),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--files", type=int, default=20)
    parser.add_argument(
        "--pg",
        default=os.environ.get(
            "USAGE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
        ),
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        ns = enqueue_cost(tmp)
        print(f"enqueue: {ns:.0f} ns per submit() (target < 2000 ns)")
        as_record, as_tuple = handoff_cost(tmp)
        print(
            f"a request with no upload, built and handed over: as a record {as_record:.0f} ns, "
            f"as the queue's tuple {as_tuple:.0f} ns ({as_tuple / as_record:.2f}x)"
        )
        pg = create_database(args.pg, "um_bench_")
        try:
            for name, url in (("postgresql", pg), ("sqlite", f"sqlite:///{tmp / 'usage.db'}")):
                as_records, as_packed = writer_cost(url)
                print(
                    f"{name}: writer CPU per request row: records {as_records:.2f} µs, packed "
                    f"batch {as_packed:.2f} µs ({as_packed / as_records:.2f}x)"
                )
                ceiling = write_ceiling(url, args.seconds / 2)
                e2e, landed, rps = end_to_end(url, tmp, args.seconds, args.files)
                print(
                    f"{name}: direct store.write ceiling {ceiling:,.0f} rows/s; end to end under "
                    f"HTTP load {e2e:,.0f} rows/s ({landed:,} rows, {rps:,.0f} req/s of "
                    f"{args.files} files) = {e2e / ceiling:.2f}x the ceiling"
                )
            h_med, h_p99, c_med, c_p99, spooled = latency_healthy_vs_cut(
                pg, tmp, args.seconds / 2, args.files
            )
            print(
                f"latency (postgresql): healthy median {h_med:.2f} ms p99 {h_p99:.2f} ms; "
                f"database cut median {c_med:.2f} ms p99 {c_p99:.2f} ms "
                f"(p99 ratio cut/healthy {c_p99 / h_p99:.2f}x; {spooled:,.0f} records spooled)"
            )
        finally:
            drop_database(args.pg, pg)


if __name__ == "__main__":
    main()
