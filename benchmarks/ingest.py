"""Ingest throughput of ``UsageStore.write`` against raw baselines measured in the same run.

    .venv/bin/python benchmarks/ingest.py [--pg URL] [--rows N] [--batch N]

For each data set and shape of batch it prints rows/s of ``store.write`` (idempotency and every
rollup included) next to a baseline that does the least work the database allows for the same
rows:

* PostgreSQL: binary COPY of the same rows into a table partitioned like the raw table (the same
  monthly partitions, primary key and indexes), no rollup, no conflict check.
* SQLite: ``executemany`` INSERT of the same rows into a table shaped like the raw table, with
  its indexes.

Data sets: ``uploads`` (50 API keys x 5 providers x 10 types; rollups by day, hour and quarter
hour, declared-type mismatches) and ``requests`` (50 keys, 30 routes of an upload API with their
own status and latency mix, 1 % unmatched scanner paths, a few non-standard methods; request
histograms by month, day, hour and quarter hour, and endpoint rollups by month, day and quarter
hour with the route cap). Shapes: ``live`` — a batch of a few thousand rows spanning a few
seconds of next month (requests: each run's rows in a quarter hour of their own, sealed once;
on PostgreSQL also each whole hour's roll into the hourly and daily rollups; on both the day's
roll into the monthly ones, the last hour's and the day's timed after the runs; rates of all
runs together, rolls included — ``--repeats 96`` is a whole day);
``worst`` — timestamps spread at random over the four months that have partitions (nearly every
row its own quarter-hour, hourly and endpoint rollup keys); for requests, the share of the time
the seals and rolls took. It also prints what record validation costs per
row, and how many rollup rows one busy key-day makes: the request histograms alone, and with
the endpoint rollups.

``store.write`` is handed what the recorder's writer hands it (``--batches recorder``, the
default): each batch as the queue holds it, records packed into tuples on submit (the packing
is timed too), from which SQLite and PostgreSQL write the middleware's requests without
building records. ``--batches records`` hands it lists of records, as a direct caller does.

The PostgreSQL server is ``--pg`` (default: ``USAGE_TEST_PG_URL`` or the local server); the
script creates and drops its own databases. Targets: the live shapes ≥ 1/5 of the raw binary COPY
on PostgreSQL (1/4 is the aim) and ≥ 20,000 rows/s into SQLite (half of raw ``executemany`` is
the aim).
"""

from __future__ import annotations

import argparse
import os
import random
import sqlite3
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg
from sqlalchemy.engine import make_url

from usage_middleware import RequestRecord, UploadRecord, UsageStore
from usage_middleware._recording.compact import PackedBatch, pack
from usage_middleware._records import new_id

UTC = timezone.utc
PROVIDERS = ["vercel", "s3", "cloudinary", "supabase", "r2"]
TYPES = [
    "image/jpeg", "image/png", "image/webp", "image/gif", "application/pdf", "video/mp4",
    "text/plain", "application/zip", "audio/mpeg", "application/octet-stream",
]  # fmt: skip
# (method, route, traffic weight, median ms)
ROUTES = [
    ("POST", "/api/upload", 18, 180.0), ("POST", "/api/upload/multipart", 4, 900.0),
    ("GET", "/api/files", 12, 25.0), ("GET", "/api/files/{id}", 16, 12.0),
    ("GET", "/api/files/{id}/download", 9, 60.0), ("DELETE", "/api/files/{id}", 2, 20.0),
    ("PATCH", "/api/files/{id}", 1, 18.0), ("GET", "/api/files/{id}/thumbnail", 8, 35.0),
    ("POST", "/api/files/{id}/transform", 2, 450.0), ("GET", "/api/usage", 3, 40.0),
    ("GET", "/api/usage/daily", 1, 55.0), ("GET", "/api/keys", 1, 8.0),
    ("POST", "/api/keys", 0.3, 15.0), ("DELETE", "/api/keys/{id}", 0.1, 10.0),
    ("POST", "/api/auth/token", 3, 30.0), ("POST", "/api/auth/refresh", 2, 9.0),
    ("GET", "/api/health", 6, 1.5), ("GET", "/api/folders", 2, 22.0),
    ("POST", "/api/folders", 0.5, 25.0), ("GET", "/api/folders/{id}", 1.5, 18.0),
    ("PUT", "/api/folders/{id}", 0.3, 24.0), ("DELETE", "/api/folders/{id}", 0.2, 30.0),
    ("POST", "/api/webhooks", 0.2, 20.0), ("GET", "/api/webhooks", 0.4, 12.0),
    ("POST", "/api/webhooks/{id}/test", 0.1, 300.0), ("GET", "/api/search", 3, 120.0),
    ("POST", "/api/share", 1, 28.0), ("GET", "/s/{token}", 4, 14.0),
    ("OPTIONS", "/api/upload", 2, 0.8), ("HEAD", "/api/files/{id}", 1, 6.0),
]  # fmt: skip
STATUSES = [200] * 80 + [201] * 8 + [204] * 3 + [304] * 2 + [400, 401, 403, 404, 404, 422, 429]
STATUSES += [500, 503]

_KEY_RNG = random.Random(7)
KEYS = [uuid.UUID(int=_KEY_RNG.getrandbits(128), version=4) for _ in range(50)]
LIVE_ROWS_PER_SECOND = 1000  # a live batch of 5,000 rows spans 5 seconds


def _moment(shape: str, i: int, rng: random.Random, offset: float) -> datetime:
    month = datetime.now(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    if shape == "live":
        # next month, ahead of the clock: a writer that finds a quarter hour due seals up to
        # two minutes ago, and live requests are never older than that
        start = (month + timedelta(days=32)).replace(day=2, hour=12)
        return start + timedelta(seconds=offset + (i + rng.random()) / LIVE_ROWS_PER_SECOND)
    # this month and the three ahead, which create_schema() gave partitions
    return month + timedelta(seconds=rng.random() * 118 * 86400)


def make_uploads(n: int, shape: str, rng: random.Random, offset: float = 0.0) -> list[Any]:
    """``n`` upload rows; ids are time-ordered (UUIDv7) as the recorder makes them."""
    rows = []
    for i in range(n):
        ok = rng.random() < 0.97
        rows.append(
            {
                "id": new_id(),
                "api_key_id": rng.choice(KEYS),
                "request_id": uuid.UUID(int=rng.getrandbits(128), version=4),
                "provider": rng.choice(PROVIDERS),
                "file_type": rng.choice(TYPES),
                "file_size": rng.randrange(100, 5_000_000),
                "upload_status": "success" if ok else "failed",
                "error_message": None if ok else "storage provider returned 503",
                "uploaded_at": _moment(shape, i, rng, offset),
            }
        )
    return rows


_WEIGHTS = [r[2] for r in ROUTES]


def make_requests(n: int, shape: str, rng: random.Random, offset: float = 0.0) -> list[Any]:
    """``n`` request rows of the upload API in ``ROUTES``; 1 % unmatched scanner paths."""
    rows = []
    picks = rng.choices(ROUTES, weights=_WEIGHTS, k=n)
    for i, (method, route, _, median) in enumerate(picks):
        matched = rng.random() >= 0.01
        status = rng.choice(STATUSES) if matched else 404
        rows.append(
            {
                "id": new_id(),
                "api_key_id": rng.choice(KEYS),
                "method": method if rng.random() >= 0.001 else "PROPFIND",
                "path": route if matched else f"/{uuid.UUID(int=rng.getrandbits(128)).hex}.php",
                "route_matched": matched,
                "status_code": status,
                "response_time_ms": rng.lognormvariate(0, 0.8) * median,
                "request_size": rng.randrange(0, 20_000),
                "response_size": rng.randrange(0, 200_000),
                "error_message": "Internal Server Error" if status >= 500 else None,
                "requested_at": _moment(shape, i, rng, offset),
            }
        )
    return rows


@dataclass(frozen=True)
class Dataset:
    name: str
    table: str  # the raw table the baseline copies
    time_column: str
    columns: tuple[str, ...]
    pg_types: tuple[str, ...]
    record: Callable[..., Any]
    make: Callable[[int, str, random.Random, float], list[Any]]


UPLOADS = Dataset(
    "uploads",
    "file_uploads",
    "uploaded_at",
    ("id", "api_key_id", "request_id", "provider", "file_type", "declared_type", "file_size",
     "file_name", "upload_status", "error_message", "uploaded_at"),
    ("uuid", "uuid", "uuid", "text", "text", "text", "int8", "text", "text", "text",
     "timestamptz"),
    UploadRecord,
    make_uploads,
)  # fmt: skip
REQUESTS = Dataset(
    "requests",
    "api_requests",
    "requested_at",
    ("id", "api_key_id", "method", "path", "status_code", "response_time_ms", "request_size",
     "response_size", "error_message", "requested_at", "route_matched"),
    ("uuid", "uuid", "text", "text", "int4", "float8", "int8", "int8", "text", "timestamptz",
     "bool"),
    RequestRecord,
    make_requests,
)  # fmt: skip


def as_batches(records: list[Any], way: str) -> Callable[[], list[Any]]:
    """Batches of ``records`` as ``way`` hands them to ``store.write``: the recorder packs
    each record into a tuple on submit and gives the writer the queue's tuples as a batch."""
    if way == "recorder":
        return lambda: [PackedBatch([pack(r) for r in b]) for b in records]
    return lambda: records


def best_rate(rows: int, runs: list[float]) -> float:
    return rows / min(runs)


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_validation(rows: list[dict[str, Any]]) -> tuple[float, float]:
    """µs per row: building an UploadRecord from fields, and re-validating a built one."""
    t_build = timed(lambda: [UploadRecord(**r) for r in rows])
    records = [UploadRecord(**r) for r in rows]
    t_check = timed(lambda: [r.validate() for r in records])
    return t_build / len(rows) * 1e6, t_check / len(rows) * 1e6


def pg_admin(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


# The baseline table: partitioned like the raw table, with the same partitions and indexes.
PARTITIONS = """
SELECT c.relname, pg_get_expr(c.relpartbound, c.oid)
  FROM pg_inherits AS i JOIN pg_class AS c ON c.oid = i.inhrelid
 WHERE i.inhparent = %s::regclass
"""
INDEXES = "SELECT indexdef FROM pg_indexes WHERE schemaname = 'public' AND tablename = %s"


def pg_baseline_table(conn: psycopg.Connection[Any], data: Dataset) -> str:
    raw = f"raw_{data.table}"
    conn.execute(
        f"CREATE TABLE {raw} (LIKE public.{data.table} INCLUDING DEFAULTS) "
        f"PARTITION BY RANGE ({data.time_column})"
    )
    # A partitioned table's index definitions read "ON ONLY public.<table>"; on the baseline
    # they become partitioned indexes, which every partition created below inherits.
    definitions = [d for (d,) in conn.execute(INDEXES, (data.table,)).fetchall()]
    for definition in definitions:
        target = f" ON ONLY public.{data.table} "
        if target not in definition:
            raise RuntimeError(f"unexpected index definition: {definition}")
        conn.execute(
            definition.replace(target, f" ON public.{raw} ").replace("INDEX ", f"INDEX {raw}_", 1)
        )
    for name, bound in conn.execute(PARTITIONS, (f"public.{data.table}",)).fetchall():
        conn.execute(f'CREATE TABLE "raw_{name}" PARTITION OF {raw} {bound}')
    if len(conn.execute(INDEXES, (raw,)).fetchall()) != len(definitions):
        raise RuntimeError(f"{raw} did not get the indexes of {data.table}")
    conn.commit()
    return raw


def bench_postgres(
    pg_url: str, data: Dataset, shape: str, n: int, batch: int, repeats: int, way: str
) -> None:
    name = f"um_bench_{uuid.uuid4().hex[:10]}"
    admin_dsn = pg_admin(pg_url)
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = make_url(pg_url).set(database=name)
    try:
        store = UsageStore(url)
        store.create_schema()
        dsn = pg_admin(url.render_as_string(hide_password=False))
        rng = random.Random(1)
        copy_runs: list[float] = []
        write_runs: list[float] = []
        seal_runs: list[float] = []  # the seals' share of write_runs
        columns = ", ".join(data.columns)
        with psycopg.connect(dsn) as conn:
            raw = pg_baseline_table(conn, data)
            for repeat in range(repeats):
                # requests: each run is the traffic of its own quarter hour, sealed once
                apart = 900.0 if data is REQUESTS else n / LIVE_ROWS_PER_SECOND
                rows = data.make(n, shape, rng, repeat * apart)
                batches = [rows[i : i + batch] for i in range(0, n, batch)]
                records = [[data.record(**r) for r in b] for b in batches]

                def raw_copy(batches: list[list[dict[str, Any]]] = batches) -> None:
                    for b in batches:
                        with (
                            conn.cursor() as cur,
                            cur.copy(f"COPY {raw} ({columns}) FROM STDIN (FORMAT BINARY)") as copy,
                        ):
                            copy.set_types(data.pg_types)
                            for r in b:
                                copy.write_row(tuple(r.get(c) for c in data.columns))
                        conn.commit()

                # Requests: live ones are raw rows until a seal folds them into the quarter-hour
                # rollups; the timed work includes sealing every row written (as one seal, the
                # way a quarter hour is sealed once), and the rolls of the whole hours it passes.
                end = max(r[data.time_column] for r in rows) + timedelta(microseconds=1)

                batched = as_batches(records, way)

                def store_write(
                    batched: Callable[[], list[Any]] = batched, end: datetime = end
                ) -> None:
                    for b in batched():
                        store.write(b)
                    if data is REQUESTS:
                        seal_runs.append(timed(lambda: store.seal(end)))

                copy_runs.append(timed(raw_copy))
                write_runs.append(timed(store_write))
            # Requests: the seal at the next UTC midnight rolls the last hour's quarter hours
            # into the hourly and daily rollups and the day's daily rows into the monthly ones,
            # and the rates are of all runs together, those rolls included.
            roll = 0.0
            if data is REQUESTS:
                day = end.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1)
                roll = timed(lambda: store.seal(day))
        replay = timed(lambda: [store.write(b) for b in records])
        store.dispose()
        if data is REQUESTS:
            copy_rate = n * repeats / sum(copy_runs)
            write_rate = n * repeats / (sum(write_runs) + roll)
        else:
            copy_rate, write_rate = best_rate(n, copy_runs), best_rate(n, write_runs)
        print(
            f"postgresql {data.name:8} {shape:5} batch={batch:>6}: "
            f"store.write{'+seal+roll' if data is REQUESTS else '          '} "
            f"{write_rate:>9,.0f} rows/s | "
            f"raw binary COPY {copy_rate:>9,.0f} rows/s"
            f" | ratio {write_rate / copy_rate:.2f} | replay (all duplicates) "
            f"{n / replay:>9,.0f} rows/s"
            + (
                f" | seals and roll {(sum(seal_runs) + roll) / (sum(write_runs) + roll):.0%}"
                " of the time"
                if data is REQUESTS
                else ""
            )
        )
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _sqlite_value(value: Any) -> Any:
    if isinstance(value, uuid.UUID):
        return value.hex
    return value.isoformat() if isinstance(value, datetime) else value


def sqlite_baseline_table(raw: sqlite3.Connection, store: UsageStore, data: Dataset) -> str:
    """A table with the raw table's columns and indexes (copied from the store's file)."""
    with store.engine.connect() as conn:
        schema = conn.exec_driver_sql(
            "SELECT sql FROM sqlite_master WHERE tbl_name = ? AND sql IS NOT NULL", (data.table,)
        ).all()
    name = f"raw_{data.table}"
    for (sql,) in schema:
        sql = sql.replace(f"ON {data.table} ", f"ON {name} ")
        sql = sql.replace(f"TABLE {data.table} ", f"TABLE {name} ")
        raw.execute(sql.replace("INDEX ", f"INDEX {name}_", 1) if "INDEX" in sql else sql)
    return name


def bench_sqlite(data: Dataset, shape: str, n: int, batch: int, repeats: int, way: str) -> None:
    rng = random.Random(2)
    with tempfile.TemporaryDirectory() as tmp:
        store = UsageStore(f"sqlite:///{os.path.join(tmp, 'usage.db')}")
        store.create_schema()
        raw = sqlite3.connect(os.path.join(tmp, "raw.db"), isolation_level=None)
        raw.execute("PRAGMA journal_mode=WAL")
        raw.execute("PRAGMA synchronous=NORMAL")
        table = sqlite_baseline_table(raw, store, data)
        insert = (
            f"INSERT INTO {table} ({', '.join(data.columns)}) "
            f"VALUES ({', '.join('?' for _ in data.columns)})"
        )
        copy_runs: list[float] = []
        write_runs: list[float] = []
        seal_runs: list[float] = []  # the seals' share of write_runs
        for repeat in range(repeats):
            # requests: each run is the traffic of its own quarter hour, sealed once (as on
            # PostgreSQL; SQLite's seal fills every request rollup but the monthly ones, so there
            # is no hourly roll, only the day's into the monthly rollups)
            apart = 900.0 if data is REQUESTS else n / LIVE_ROWS_PER_SECOND
            rows = data.make(n, shape, rng, repeat * apart)
            batches = [rows[i : i + batch] for i in range(0, n, batch)]
            records = [[data.record(**r) for r in b] for b in batches]
            end = max(r[data.time_column] for r in rows) + timedelta(microseconds=1)

            def raw_insert(batches: list[list[dict[str, Any]]] = batches) -> None:
                for b in batches:
                    raw.execute("BEGIN IMMEDIATE")
                    raw.executemany(
                        insert, [tuple(_sqlite_value(r.get(c)) for c in data.columns) for r in b]
                    )
                    raw.execute("COMMIT")

            batched = as_batches(records, way)

            def store_write(
                batched: Callable[[], list[Any]] = batched, end: datetime = end
            ) -> None:
                for b in batched():
                    store.write(b)
                if data is REQUESTS:
                    seal_runs.append(timed(lambda: store.seal(end)))

            copy_runs.append(timed(raw_insert))
            write_runs.append(timed(store_write))
        # Requests: the seal at the next UTC midnight rolls the day's daily rows into the
        # monthly rollups, and the rates are of all runs together, that roll included.
        roll = 0.0
        if data is REQUESTS:
            day = end.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1)
            roll = timed(lambda: store.seal(day))
            seal_runs.append(roll)
            write_runs.append(roll)
        raw.close()
        store.dispose()
        if data is REQUESTS:  # all runs together, as on PostgreSQL
            base, rate = n * repeats / sum(copy_runs), n * repeats / sum(write_runs)
        else:
            base, rate = best_rate(n, copy_runs), best_rate(n, write_runs)
        print(
            f"sqlite     {data.name:8} {shape:5} batch={batch:>6}: "
            f"store.write{'+seal' if data is REQUESTS else '     '} {rate:>9,.0f} "
            f"rows/s | raw executemany {base:>9,.0f} rows/s | ratio {rate / base:.2f}"
            + (f" | seals {sum(seal_runs) / sum(write_runs):.0%} of the time" if seal_runs else "")
        )


BEFORE = ("monthly_request_usage", "daily_request_usage", "hourly_request_usage",
          "quarter_request_usage")  # fmt: skip
ENDPOINTS = ("monthly_endpoint_usage", "daily_endpoint_usage", "quarter_endpoint_usage",
             "endpoint_routes")  # fmt: skip


def busy_key_day(n: int) -> None:
    """Rollup rows one key's day of ``n`` requests (this mix, spread over the UTC day) makes."""
    rng = random.Random(3)
    day = datetime(2025, 6, 3, tzinfo=UTC)
    rows = make_requests(n, "live", rng)
    for r in rows:
        r["api_key_id"] = KEYS[0]
        r["requested_at"] = day + timedelta(seconds=rng.random() * 86_400)
    rows.sort(key=lambda r: r["requested_at"])
    with tempfile.TemporaryDirectory() as tmp:
        store = UsageStore(f"sqlite:///{os.path.join(tmp, 'usage.db')}")
        for i in range(0, n, 5_000):
            store.write([RequestRecord(**r) for r in rows[i : i + 5_000]])
        store.seal(day + timedelta(days=1))  # live requests are raw rows until sealed
        with store.engine.connect() as conn:
            counts = {
                t: conn.exec_driver_sql(f"SELECT count(*) FROM {t}").scalar_one()
                for t in BEFORE + ENDPOINTS
            }
        store.dispose()
    before = sum(counts[t] for t in BEFORE)
    added = sum(counts[t] for t in ENDPOINTS)
    print(f"rollup rows of one busy key-day ({n:,} requests over {len(ROUTES)} routes):")
    print("  request histograms: " + ", ".join(f"{t} {counts[t]:,}" for t in BEFORE))
    print("  endpoint rollups:   " + ", ".join(f"{t} {counts[t]:,}" for t in ENDPOINTS))
    print(f"  before {before:,} rows, after {before + added:,} ({(before + added) / before:.1f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--pg",
        default=os.environ.get(
            "USAGE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
        ),
    )
    parser.add_argument("--rows", type=int, default=50_000, help="rows per timed run")
    parser.add_argument("--batch", type=int, default=5_000, help="rows per store.write call")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement (best wins)")
    parser.add_argument("--busy-day", type=int, default=100_000, help="requests of the busy day")
    parser.add_argument("--data", choices=["uploads", "requests", "both"], default="both")
    parser.add_argument("--shapes", default="live,worst", help="comma-separated: live, worst")
    parser.add_argument(
        "--batches",
        choices=["recorder", "records"],
        default="recorder",
        help="what store.write is handed: the recorder's packed batches, or lists of records",
    )
    parser.add_argument("--skip-postgres", action="store_true")
    parser.add_argument("--skip-sqlite", action="store_true")
    args = parser.parse_args()

    build_us, check_us = bench_validation(make_uploads(20_000, "live", random.Random(0)))
    print(
        f"validation: UploadRecord(...) {build_us:.2f} µs/row "
        f"({1e6 / build_us:,.0f} rows/s); re-check in write() {check_us:.2f} µs/row"
    )
    handed = {"recorder": "the recorder's batches", "records": "lists of records"}
    print(f"store.write is handed {handed[args.batches]}")
    datasets = [d for d in (UPLOADS, REQUESTS) if args.data in (d.name, "both")]
    for data in datasets:
        for shape in args.shapes.split(","):
            if not args.skip_postgres:
                bench_postgres(
                    args.pg, data, shape, args.rows, args.batch, args.repeats, args.batches
                )
            if not args.skip_sqlite:
                bench_sqlite(data, shape, args.rows, args.batch, args.repeats, args.batches)
    if args.busy_day:
        busy_key_day(args.busy_day)


if __name__ == "__main__":
    main()
