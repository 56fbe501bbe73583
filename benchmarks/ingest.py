"""Ingest throughput of ``UsageStore.write`` against raw baselines measured in the same run.

    .venv/bin/python benchmarks/ingest.py [--pg URL] [--rows N] [--batch N]

For each shape of batch it prints rows/s of ``store.write`` (idempotency and all four rollups
included) next to a baseline that does the least work the database allows for the same rows:

* PostgreSQL: binary COPY of the same rows into a table partitioned like ``file_uploads`` (the
  same monthly partitions, primary key and two indexes), no rollup, no conflict check.
* SQLite: ``executemany`` INSERT of the same rows into a ``file_uploads``-shaped table.

Shapes: ``live`` — a batch of a few thousand uploads spanning a few seconds of this month (50 API
keys x 5 providers x 10 types, so few distinct rollup keys); ``worst`` — timestamps spread at
random over the four months that have partitions (this one and three ahead: nearly every row its
own quarter-hour and hourly rollup key). It also prints what record validation costs
per row (``UploadRecord(...)`` construction, and the re-check ``write`` does).

The PostgreSQL server is ``--pg`` (default: ``USAGE_TEST_PG_URL`` or the local server); the
script creates and drops its own database. Targets: ≥ 50,000 rows/s into
PostgreSQL and ≥ 1/4 of the raw binary COPY; ≥ 20,000 rows/s into SQLite.
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
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg
from sqlalchemy.engine import make_url

from usage_middleware import UploadRecord, UsageStore
from usage_middleware._records import new_id

UTC = timezone.utc
PROVIDERS = ["vercel", "s3", "cloudinary", "supabase", "r2"]
TYPES = [
    "image/jpeg", "image/png", "image/webp", "image/gif", "application/pdf", "video/mp4",
    "text/plain", "application/zip", "audio/mpeg", "application/octet-stream",
]  # fmt: skip
COLUMNS = (
    "id, api_key_id, request_id, provider, file_type, declared_type, file_size, file_name, "
    "upload_status, error_message, uploaded_at"
)
RAW_TABLE = """
CREATE TABLE raw_uploads (LIKE public.file_uploads INCLUDING DEFAULTS)
    PARTITION BY RANGE (uploaded_at);
ALTER TABLE raw_uploads ADD PRIMARY KEY (id, uploaded_at);
CREATE INDEX raw_key_time ON raw_uploads (api_key_id, uploaded_at);
CREATE INDEX raw_time ON raw_uploads (uploaded_at);
"""
SQLITE_RAW_TABLE = """
CREATE TABLE raw_uploads (
    id blob PRIMARY KEY, api_key_id blob, request_id blob, provider text NOT NULL,
    file_type text NOT NULL, declared_type text, file_size bigint NOT NULL, file_name text,
    upload_status text NOT NULL, error_message text, uploaded_at text NOT NULL
);
CREATE INDEX raw_key_time ON raw_uploads (api_key_id, uploaded_at);
CREATE INDEX raw_time ON raw_uploads (uploaded_at);
"""
# The partitions of file_uploads, to give the baseline table the same ones.
PARTITIONS = """
SELECT c.relname, pg_get_expr(c.relpartbound, c.oid)
  FROM pg_inherits AS i JOIN pg_class AS c ON c.oid = i.inhrelid
 WHERE i.inhparent = 'public.file_uploads'::regclass
"""
PG_TYPES = (
    "uuid", "uuid", "uuid", "text", "text", "text", "int8", "text", "text", "text", "timestamptz",
)  # fmt: skip


_KEY_RNG = random.Random(7)
KEYS = [uuid.UUID(int=_KEY_RNG.getrandbits(128), version=4) for _ in range(50)]
LIVE_ROWS_PER_SECOND = 1000  # a live batch of 5,000 rows spans 5 seconds


def make_rows(n: int, shape: str, rng: random.Random, offset: float = 0.0) -> list[dict[str, Any]]:
    """``n`` upload rows; ids are time-ordered (UUIDv7) as the recorder makes them."""
    keys = KEYS
    month = datetime.now(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    start = month + timedelta(days=1, hours=12)
    rows = []
    for i in range(n):
        if shape == "live":
            at = start + timedelta(seconds=offset + (i + rng.random()) / LIVE_ROWS_PER_SECOND)
        else:  # this month and the three ahead, which create_schema() gave partitions
            at = month + timedelta(seconds=rng.random() * 118 * 86400)
        ok = rng.random() < 0.97
        rows.append(
            {
                "id": new_id(),
                "api_key_id": rng.choice(keys),
                "request_id": uuid.UUID(int=rng.getrandbits(128), version=4),
                "provider": rng.choice(PROVIDERS),
                "file_type": rng.choice(TYPES),
                "file_size": rng.randrange(100, 5_000_000),
                "upload_status": "success" if ok else "failed",
                "error_message": None if ok else "storage provider returned 503",
                "uploaded_at": at,
            }
        )
    return rows


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


def bench_postgres(pg_url: str, shape: str, n: int, batch: int, repeats: int) -> None:
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
        with psycopg.connect(dsn) as conn:
            conn.execute(RAW_TABLE)
            for name, bound in conn.execute(PARTITIONS).fetchall():
                conn.execute(f'CREATE TABLE "raw_{name}" PARTITION OF raw_uploads {bound}')
            conn.commit()
            for repeat in range(repeats):
                rows = make_rows(n, shape, rng, repeat * n / LIVE_ROWS_PER_SECOND)
                batches = [rows[i : i + batch] for i in range(0, n, batch)]
                records = [[UploadRecord(**r) for r in b] for b in batches]

                def raw_copy(batches: list[list[dict[str, Any]]] = batches) -> None:
                    for b in batches:
                        with (
                            conn.cursor() as cur,
                            cur.copy(
                                f"COPY raw_uploads ({COLUMNS}) FROM STDIN (FORMAT BINARY)"
                            ) as copy,
                        ):
                            copy.set_types(PG_TYPES)
                            for r in b:
                                copy.write_row(
                                    (r["id"], r["api_key_id"], r["request_id"], r["provider"],
                                     r["file_type"], None, r["file_size"], None,
                                     r["upload_status"], r["error_message"], r["uploaded_at"])
                                )  # fmt: skip
                        conn.commit()

                def store_write(records: list[list[UploadRecord]] = records) -> None:
                    for b in records:
                        store.write(b)

                copy_runs.append(timed(raw_copy))
                write_runs.append(timed(store_write))
        replay = timed(lambda: [store.write(b) for b in records])
        store.dispose()
        copy_rate = best_rate(n, copy_runs)
        write_rate = best_rate(n, write_runs)
        print(
            f"postgresql {shape:5} batch={batch:>6}: store.write {write_rate:>9,.0f} rows/s | "
            f"raw binary COPY {copy_rate:>9,.0f} rows/s | ratio {write_rate / copy_rate:.2f} | "
            f"replay (all duplicates) {n / replay:>9,.0f} rows/s"
        )
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def sqlite_row(r: dict[str, Any]) -> tuple[Any, ...]:
    return (
        r["id"].hex,
        r["api_key_id"].hex,
        r["request_id"].hex,
        r["provider"],
        r["file_type"],
        None,
        r["file_size"],
        None,
        r["upload_status"],
        r["error_message"],
        r["uploaded_at"].isoformat(),
    )


def bench_sqlite(shape: str, n: int, batch: int, repeats: int) -> None:
    rng = random.Random(2)
    with tempfile.TemporaryDirectory() as tmp:
        store = UsageStore(f"sqlite:///{os.path.join(tmp, 'usage.db')}")
        store.create_schema()
        raw = sqlite3.connect(os.path.join(tmp, "raw.db"), isolation_level=None)
        raw.execute("PRAGMA journal_mode=WAL")
        raw.execute("PRAGMA synchronous=NORMAL")
        for stmt in SQLITE_RAW_TABLE.split(";"):
            if stmt.strip():
                raw.execute(stmt)
        copy_runs: list[float] = []
        write_runs: list[float] = []
        for repeat in range(repeats):
            rows = make_rows(n, shape, rng, repeat * n / LIVE_ROWS_PER_SECOND)
            batches = [rows[i : i + batch] for i in range(0, n, batch)]
            records = [[UploadRecord(**r) for r in b] for b in batches]

            def raw_insert(batches: list[list[dict[str, Any]]] = batches) -> None:
                for b in batches:
                    raw.execute("BEGIN IMMEDIATE")
                    raw.executemany(
                        f"INSERT INTO raw_uploads ({COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                        [sqlite_row(r) for r in b],
                    )
                    raw.execute("COMMIT")

            def store_write(records: list[list[UploadRecord]] = records) -> None:
                for b in records:
                    store.write(b)

            copy_runs.append(timed(raw_insert))
            write_runs.append(timed(store_write))
        raw.close()
        store.dispose()
        base = best_rate(n, copy_runs)
        rate = best_rate(n, write_runs)
        print(
            f"sqlite     {shape:5} batch={batch:>6}: store.write {rate:>9,.0f} rows/s | "
            f"raw executemany {base:>9,.0f} rows/s | ratio {rate / base:.2f}"
        )


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
    parser.add_argument("--skip-postgres", action="store_true")
    args = parser.parse_args()

    build_us, check_us = bench_validation(make_rows(20_000, "live", random.Random(0)))
    print(
        f"validation: UploadRecord(...) {build_us:.2f} µs/row "
        f"({1e6 / build_us:,.0f} rows/s); re-check in write() {check_us:.2f} µs/row"
    )
    for shape in ("live", "worst"):
        if not args.skip_postgres:
            bench_postgres(args.pg, shape, args.rows, args.batch, args.repeats)
        bench_sqlite(shape, args.rows, args.batch, args.repeats)


if __name__ == "__main__":
    main()
