"""What each index of ``api_requests`` costs the SQLite writer, in one run.

    .venv/bin/python benchmarks/sqlite_indexes.py [--batches 40] [--rounds 3] [--reads N]

A live request is one raw row on SQLite (the seal rolls it up later), so the raw table's
indexes are most of what recording a request costs the database. This writes the middleware's
requests (50 keys, 30 routes, time-ordered ids, one in twenty failed) the way the store writes
them (the same rows, the same multi-row ``INSERT .. ON CONFLICT (id) DO NOTHING``, one
``BEGIN IMMEDIATE`` transaction per batch of 2,000, WAL with ``synchronous=NORMAL``) into
``api_requests`` as ``create_schema()`` makes it, then again with each secondary index dropped
in turn, and with none; as created with each batch inserted in (key, time) order rather than in
id order; and with the two indexes older releases made in place of ``(requested_at,
api_key_id)``: ``(api_key_id, requested_at)`` and ``(requested_at)``. Per variant: CPU a row
(user and system: the system part is mostly writing pages to the WAL and checkpointing them),
and the pages each commit appends to the WAL (counted in a separate pass with automatic
checkpoints off). Medians of ``--rounds`` rounds, the variants in a shuffled order each round,
each on a new file; ratios to the table as created.

Then the reads the key-first index served (``--reads 0`` skips them): each key's newest request
for ``/consumers``' ``last_seen`` over ``--reads`` requests of ``--days`` days written by the
store, found in time windows as the package does, against one probe per key on a
``(api_key_id, requested_at)`` index made on the same file.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import sqlite3
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

from usage_middleware import RequestRecord, UsageStore
from usage_middleware._recording.compact import PackedBatch, new_request_item
from usage_middleware._sqlitebulk import insert_rows
from usage_middleware._sqlitewrite import _INSERT_LIVE, _REQUEST_MARKS, _packed_rows
from usage_middleware._storage.base import Scope
from usage_middleware._storage.plan import _floor_quarter
from usage_middleware._storage.sqlseen import _probe, _sqlite_requests_seen

BATCH = 2000
FORMER = (
    ("idx_api_requests_key_time", "api_key_id, requested_at"),
    ("idx_api_requests_time", "requested_at"),
)
KEYS = [uuid.UUID(int=i + 1, version=4) for i in range(50)]
ROUTES = [f"/v1/r{i}/{{id}}" for i in range(30)]


def table_sql(workdir: str) -> tuple[str, dict[str, str]]:
    """``api_requests``'s CREATE TABLE and its indexes' CREATE INDEX, as the store makes them."""
    path = os.path.join(workdir, "schema.db")
    store = UsageStore(f"sqlite:///{path}")
    store.create_schema()
    store.dispose()
    conn = sqlite3.connect(path)
    try:
        found = conn.execute(
            "SELECT type, name, sql FROM sqlite_master WHERE tbl_name = 'api_requests' "
            "AND sql IS NOT NULL"
        ).fetchall()
    finally:
        conn.close()
    table = next(sql for kind, _, sql in found if kind == "table")
    return table, {name: sql for kind, name, sql in found if kind == "index"}


def batches(n: int) -> list[list[tuple[Any, ...]]]:
    """``n`` batches of the middleware's requests, as the store binds them."""
    rng = random.Random(7)
    start = datetime.now(timezone.utc) - timedelta(hours=1)
    out = []
    for b in range(n):
        items = []
        for i in range(BATCH):
            at = start + timedelta(milliseconds=(b * BATCH + i) * 0.5)
            status = 500 if rng.random() < 0.05 else 200
            route, key, ms = rng.choice(ROUTES), rng.choice(KEYS), rng.expovariate(1 / 20)
            items.append(new_request_item("GET", route, status, ms, 0, 512, key, None, at, True))
        requests, _, rest = PackedBatch(items).split()
        assert not rest
        rows = _packed_rows(requests)
        rows.sort(key=lambda r: r[0])  # id order, as the store inserts them
        out.append(rows)
    return out


def by_key(data: list[list[tuple[Any, ...]]]) -> list[list[tuple[Any, ...]]]:
    """The same batches, each in (key, time, id) order instead of id order."""
    return [sorted(rows, key=lambda r: (str(r[1]), r[9], r[0])) for rows in data]


def write(path: str, table: str, indexes: list[str], data: list[list[Any]], pages: bool) -> float:
    """Write ``data`` into a new ``api_requests``; CPU seconds a row, or with ``pages`` the WAL
    pages a commit appends (automatic checkpoints off)."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        if pages:
            conn.execute("PRAGMA wal_autocheckpoint=0")
        for sql in (table, *indexes):
            conn.execute(sql)
        cur = conn.cursor()
        warm = len(data) // 4  # the first batches fill the file; the rest are measured
        before = resource.getrusage(resource.RUSAGE_SELF)
        for n, rows in enumerate(data):
            if n == warm:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                before = resource.getrusage(resource.RUSAGE_SELF)
            cur.execute("BEGIN IMMEDIATE")
            insert_rows(cur, _INSERT_LIVE, rows, "ON CONFLICT (id) DO NOTHING", _REQUEST_MARKS)
            cur.execute("COMMIT")
        after = resource.getrusage(resource.RUSAGE_SELF)
        measured = len(data) - warm
        if pages:
            frames = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1]
            return float(frames) / measured
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        return cpu / (measured * BATCH)
    finally:
        conn.close()


def reads(workdir: str, requests: int, days: int, runs: int) -> None:
    """What answering ``last_seen`` without the key-first index costs: each key's newest
    request, found as ``/consumers`` finds it (time windows narrowed by the quarter-hour
    rollup, :mod:`usage_middleware._storage.sqlseen`), against the per-key backward probe the
    former ``(api_key_id, requested_at)`` index served (the statement PostgreSQL still uses),
    on the same file with its indexes made as older releases made them after the windows are
    timed; both must give the same answer."""
    rng = random.Random(11)
    weights = [1 / (i + 1) for i in range(len(KEYS))]  # a few busy keys, many quiet ones
    end = _floor_quarter(datetime.now(timezone.utc))
    start = end - timedelta(days=days)
    store = UsageStore(f"sqlite:///{os.path.join(workdir, 'reads.db')}")
    store.create_schema()
    step = (end - start) / requests
    chunk = 20_000
    for lo in range(0, requests, chunk):
        n = range(lo, min(lo + chunk, requests))
        store.write([
            RequestRecord(api_key_id=key, method="GET", path=rng.choice(ROUTES),
                          status_code=200, response_time_ms=5.0, request_size=0,
                          response_size=512, requested_at=start + step * i)
            for i, key in zip(n, rng.choices(KEYS, weights, k=len(n)), strict=True)
        ])  # fmt: skip
    store.seal(end - timedelta(minutes=30))  # the last half hour raw only, as live
    ranges = {
        f"{days} days": (start, end),
        "last day": (end - timedelta(days=1), end),
        "last hour": (end - timedelta(hours=1, minutes=7), end - timedelta(minutes=7)),
    }
    keys: list[uuid.UUID | None] = list(KEYS)

    def timed(read: Callable[..., dict[Any, datetime]]) -> dict[str, tuple[float, Any]]:
        out = {}
        for r, (lo, hi) in ranges.items():
            took = []
            for _ in range(runs):
                t = time.perf_counter()
                answer = read(store.backend, keys, lo, hi)
                took.append(time.perf_counter() - t)
            out[r] = (statistics.median(took), answer)
        return out

    try:
        windows = timed(_sqlite_requests_seen)
        with store.engine.begin() as conn:  # the indexes as older releases made them
            conn.exec_driver_sql("DROP INDEX idx_api_requests_time_key")
            for name, cols in FORMER:
                conn.exec_driver_sql(f"CREATE INDEX {name} ON api_requests ({cols})")
        # the statement PostgreSQL still probes with, as SQLite ran it then
        probes = timed(lambda b, k, lo, hi: _probe(b, "raw", Scope(), k, lo, hi, uploads=False))
    finally:
        store.dispose()
    for r in ranges:
        assert windows[r][1] == probes[r][1], f"{r}: the two reads disagree"
    print(
        f"\nlast_seen of {len(KEYS)} keys' requests, {requests:,} requests over {days} days "
        f"(the last 30 minutes unsealed), medians of {runs} runs"
    )
    print(f"{'range':<14}{'time windows ms':>17}{'per-key index probes ms':>25}{'x':>7}")
    for r in ranges:
        w, p = windows[r][0], probes[r][0]
        print(f"{r:<14}{w * 1e3:>17.2f}{p * 1e3:>25.2f}{w / p:>7.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=40, help="batches of 2,000 rows a run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--reads", type=int, default=500_000, metavar="N", help="requests for the read part"
    )
    parser.add_argument("--days", type=int, default=30, help="days the read part spans")
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="usage-bench-")
    try:
        table, indexes = table_sql(workdir)
        data = batches(max(args.batches, 4))
        created = list(indexes.values())
        # variant: (the indexes made, the batches written)
        variants = {
            "as created": (created, data),
            "as created, batches in key order": (created, by_key(data)),
        }
        for name in indexes:
            if not name.startswith("sqlite_autoindex"):
                kept = [s for n, s in indexes.items() if n != name]
                variants[f"without {name}"] = (kept, data)
        variants["no secondary index"] = ([], data)
        # what releases before the time-first index made: one led by the key, one by time
        former = [s for n, s in indexes.items() if n != "idx_api_requests_time_key"]
        former += [f"CREATE INDEX {name} ON api_requests ({cols})" for name, cols in FORMER]
        variants["former (api_key_id, requested_at) + (requested_at)"] = (former, data)
        cpu: dict[str, list[float]] = {v: [] for v in variants}
        pages: dict[str, float] = {}
        order = list(variants)
        for r in range(args.rounds):
            random.Random(r).shuffle(order)
            for v in order:
                path = os.path.join(workdir, f"{r}-{v.replace(' ', '_')}.db")
                cpu[v].append(write(path, table, *variants[v], pages=False))
                for suffix in ("", "-wal", "-shm"):
                    if os.path.exists(path + suffix):
                        os.remove(path + suffix)
        for v in variants:
            path = os.path.join(workdir, f"pages-{v.replace(' ', '_')}.db")
            pages[v] = write(path, table, *variants[v], pages=True)
        print(
            f"api_requests on SQLite: {len(data) * BATCH:,} requests in batches of {BATCH:,} "
            f"(50 keys, 30 routes), medians of {args.rounds} rounds"
        )
        print(f"{'variant':<52}{'CPU µs/row':>12}{'x':>7}{'WAL pages/commit':>18}{'x':>7}")
        base_cpu, base_pages = statistics.median(cpu["as created"]), pages["as created"]
        for v in variants:
            us = statistics.median(cpu[v])
            print(
                f"{v:<52}{us * 1e6:>12.2f}{us / base_cpu:>7.2f}"
                f"{pages[v]:>18.1f}{pages[v] / base_pages:>7.2f}"
            )
        if args.reads:
            reads(workdir, args.reads, args.days, args.rounds)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
