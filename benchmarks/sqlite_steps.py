"""What a busy event loop does to SQLite writes in a background thread, in one run.

    .venv/bin/python benchmarks/sqlite_steps.py [--rows 5000] [--repeats 5]

The sqlite3 driver releases the GIL around every step of a statement, and ``executemany`` steps
once per row. A thread that has released the GIL while another thread runs Python gets it back
only after the interpreter's switch interval (5 ms), so per-row steps in the recorder's thread
crawl while the server is busy. This times one batch of ``--rows`` raw request rows written by
a thread of its own, with another thread spinning in Python and without, two ways:
``executemany`` and :func:`usage_middleware._sqlitebulk.insert_rows` (multi-row ``VALUES``
statements, a step per chunk of rows), into a table with the raw table's indexes. Medians of
``--repeats`` runs.

The same holds for a Python function that a statement calls once a row (each call takes the
GIL), and for fetching rows (each fetched row is a step). So it also times, from a thread of
its own, alone and beside the spinning thread, a claim of the recorder's spool (``--claim-rows``
spooled requests leased for replay), a seal (``store.seal``: ``--seal-rows`` live requests
of an hour ago folded into the request rollups) and a read (the latency histogram of
``--read-rows`` raw requests that no seal holds yet, the default ``read_timeout`` of 10 s in
force), each on a new file. To set them against other
code, run the script with that code's ``src`` first on ``PYTHONPATH`` (a git worktree of an
earlier commit).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

from usage_middleware import RequestRecord, UsageStore
from usage_middleware._sqlitebulk import insert_rows

COLUMNS = (
    "id, api_key_id, method, path, status_code, response_time_ms, request_size, "
    "response_size, error_message, requested_at, route_matched"
)


def rows(n: int) -> list[tuple[Any, ...]]:
    key = uuid.uuid4().hex
    return [
        (uuid.uuid4().hex, key, "GET", "/files/{id}", 200, 12.5, 100, 2_000, None,
         f"2031-01-01 00:{i // 6000 % 60:02d}:{i // 100 % 60:02d}.{i % 100:06d}", True)
        for i in range(n)
    ]  # fmt: skip


def _spin(stop: threading.Event) -> None:
    """Pure Python, as an event loop serving requests: holds the GIL until made to drop it."""
    x = 0
    while not stop.is_set():
        x += 1


def timed_in_thread(write: Callable[[], None], busy: bool) -> float:
    """Seconds ``write`` takes in a thread of its own, another thread spinning or none."""
    took: list[float] = []

    def run() -> None:
        start = time.perf_counter()
        write()
        took.append(time.perf_counter() - start)

    stop = threading.Event()
    spinner = threading.Thread(target=_spin, args=(stop,))
    if busy:
        spinner.start()
    writer = threading.Thread(target=run)
    writer.start()
    writer.join()
    stop.set()
    if busy:
        spinner.join()
    return took[0]


def requests(n: int, start: datetime, spread: timedelta) -> list[RequestRecord]:
    """``n`` requests of 50 keys over 30 routes, their times spread over ``spread``."""
    keys = [uuid.uuid4() for _ in range(50)]
    return [
        RequestRecord(
            method="GET", path=f"/r{i % 30}", status_code=200 if i % 9 else 500,
            response_time_ms=0.3 + (i * 7919 % 4000) / 10, request_size=0,
            response_size=2_000, api_key_id=keys[i % 50], requested_at=start + spread * i / n,
        )
        for i in range(n)
    ]  # fmt: skip


def timed_seal(tmp: str, n: int, busy: bool) -> float:
    """Seconds a seal of ``n`` live requests (50 keys, 30 routes, an hour ago) takes in a thread
    of its own, on a new file."""
    path = os.path.join(tmp, f"seal-{uuid.uuid4().hex}.db")
    store = UsageStore(f"sqlite:///{path}")
    store.create_schema()
    hour = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0)
    start = hour - timedelta(hours=1)
    store.write(requests(n, start, timedelta(hours=1)))
    took = timed_in_thread(lambda: store.seal(hour), busy)
    store.dispose()
    return took


def timed_claim(tmp: str, n: int, busy: bool) -> float:
    """Seconds a claim of ``n`` spooled requests takes in a thread of its own, on a new spool."""
    from usage_middleware._recording.spool import Spool

    path = os.path.join(tmp, f"spool-{uuid.uuid4().hex}.sqlite3")
    spool = Spool(path, max_records=n)
    spool.open()
    spool.put(requests(n, datetime.now(timezone.utc), timedelta(0)))
    took = timed_in_thread(lambda: spool.claim(n), busy)
    spool.close()
    return took


def timed_read(tmp: str, n: int, busy: bool) -> float:
    """Seconds the latency histogram of ``n`` raw requests (ahead of every seal) takes to read
    in a thread of its own, on a new file; inf if it ran past ``read_timeout``."""
    from usage_middleware._errors import ReadTimeoutError
    from usage_middleware._storage.base import Scope

    path = os.path.join(tmp, f"read-{uuid.uuid4().hex}.db")
    store = UsageStore(f"sqlite:///{path}")
    store.create_schema()
    at = datetime.now(timezone.utc) + timedelta(days=2)
    store.write(requests(n, at, timedelta(seconds=1)))

    def read() -> None:
        try:
            store.backend.request_histogram(Scope(), at - timedelta(days=1), at + timedelta(days=1))
        except ReadTimeoutError:
            took.append(math.inf)

    took: list[float] = []
    elapsed = timed_in_thread(read, busy)
    store.dispose()
    return took[0] if took else elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=5_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seal-rows", type=int, default=20_000, help="0: no seal")
    parser.add_argument("--claim-rows", type=int, default=2_000, help="0: no claim")
    parser.add_argument("--read-rows", type=int, default=100_000, help="0: no read")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = UsageStore(f"sqlite:///{os.path.join(tmp, 'usage.db')}")
        store.create_schema()  # the raw table and its indexes
        conn: Any = store.engine.raw_connection()
        dbapi = conn.driver_connection
        head = f"INSERT INTO api_requests ({COLUMNS})"
        marks = ", ".join("?" * 11)

        def many(batch: list[tuple[Any, ...]]) -> None:
            cur = dbapi.cursor()
            cur.execute("BEGIN IMMEDIATE")
            cur.executemany(f"{head} VALUES ({marks}) ON CONFLICT (id) DO NOTHING", batch)
            cur.execute("COMMIT")

        def chunked(batch: list[tuple[Any, ...]]) -> None:
            cur = dbapi.cursor()
            cur.execute("BEGIN IMMEDIATE")
            insert_rows(cur, head, batch, "ON CONFLICT (id) DO NOTHING")
            cur.execute("COMMIT")

        operations = (
            ("claim", timed_claim, args.claim_rows),
            ("read", timed_read, args.read_rows),
            ("seal", timed_seal, args.seal_rows),
        )
        results: dict[tuple[str, bool], list[float]] = {}
        for _ in range(args.repeats):
            for name, fn in (("executemany", many), ("insert_rows", chunked)):
                for busy in (False, True):
                    batch = rows(args.rows)
                    took = timed_in_thread(lambda fn=fn, batch=batch: fn(batch), busy)
                    results.setdefault((name, busy), []).append(took)
            for name, timed, n in operations:
                for busy in (False, True) if n else ():
                    results.setdefault((name, busy), []).append(timed(tmp, n, busy))
        conn.close()
        store.dispose()
    print(f"{args.rows:,} rows written by a thread of their own (median of {args.repeats}):")
    for name in ("executemany", "insert_rows"):
        idle = statistics.median(results[name, False]) * 1000
        busy = statistics.median(results[name, True]) * 1000
        print(
            f"  {name:12} alone {idle:8.1f} ms | beside a busy thread {busy:8.1f} ms "
            f"({busy / idle:.0f}x)"
        )
    ratio = statistics.median(results["executemany", True]) / statistics.median(
        results["insert_rows", True]
    )
    print(f"  beside a busy thread, executemany takes {ratio:.0f}x as long as insert_rows")
    what = {
        "claim": f"a claim of {args.claim_rows:,} spooled requests",
        "read": f"a read of {args.read_rows:,} raw requests (inf: past read_timeout)",
        "seal": f"a seal of {args.seal_rows:,} live requests",
    }
    for name, _, n in operations:
        if n:
            idle = statistics.median(results[name, False]) * 1000
            busy = statistics.median(results[name, True]) * 1000
            print(
                f"{what[name]}, in a thread of its own: alone {idle:.1f} ms | beside a busy "
                f"thread {busy:.1f} ms ({busy / idle:.1f}x)"
            )


if __name__ == "__main__":
    main()
