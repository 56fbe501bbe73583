"""ClickHouse (chdb, in-process) against PostgreSQL: ingest through ``store.write`` and
``GET /granular`` for the busiest key, in one run.

    .venv/bin/python benchmarks/clickhouse.py [--rows N] [--batches N] [--batch N] [--runs N]
                                              [--pg URL]

1. Ingest: the same batches of upload records (``--batches`` x ``--batch``, random keys,
   times spread over a day) go through ``store.write`` on PostgreSQL and on chdb, and as a plain
   INSERT into a ``MergeTree`` table of the same columns on chdb (what the engine does without
   the id check and the deduplication token). Rows per second over all batches, after one
   warm-up batch each.
2. Reads: PostgreSQL gets ``--rows`` uploads (+ a fifth as many requests) with its rollups, built
   by benchmarks/query.py's generator; chdb copies *the same rows* out of PostgreSQL (the
   ``postgresql()`` table function), so both must give identical answers, which is checked. Then
   ``/granular`` (uploads and request stats) for the busiest key over 12 months, 30 days and one
   day, in UTC, New York and Kolkata, median of ``--runs``: on chdb from raw rows only (nothing
   sealed yet) and after ``maintain()`` sealed the year, and on PostgreSQL from its rollups.

Targets: chdb ingest >= 3x PostgreSQL's; 12-month answers < 50 ms. Creates and drops its own
PostgreSQL database and chdb directory.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import anyio
import httpx
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from starlette.applications import Starlette
from starlette.routing import Mount

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from query import KEYS, PROVIDERS, QUERIES, TYPES, build_postgres

from usage_middleware import ALL_KEYS, UploadRecord, UsageRouter, UsageStore
from usage_middleware._storage.clickhouse import (
    UPLOAD_COLUMNS,
    ClickHouseBackend,
    _upload_row,
)

UTC = timezone.utc
ZONES = ["UTC", "America/New_York", "Asia/Kolkata"]


def batches(n: int, size: int) -> list[list[UploadRecord]]:
    rng = random.Random(11)
    day = datetime(2025, 6, 1, tzinfo=UTC)
    return [
        [
            UploadRecord(
                api_key_id=rng.choice(KEYS), provider=rng.choice(PROVIDERS),
                file_type=rng.choice(TYPES), file_size=rng.randrange(1, 10**7),
                upload_status="success" if rng.random() < 0.97 else "failed",
                uploaded_at=day + timedelta(seconds=rng.random() * 86400),
            )
            for _ in range(size)
        ]
        for _ in range(n)
    ]  # fmt: skip


def ingest_rate(write: Any, data: list[list[UploadRecord]]) -> float:
    """Rows per second over ``data[1:]``; ``data[0]`` warms up (imports, first statements)."""
    write(data[0])
    data = data[1:]
    t0 = time.perf_counter()
    for batch in data:
        write(batch)
    return sum(map(len, data)) / (time.perf_counter() - t0)


def granular_ms(store: UsageStore, runs: int) -> dict[tuple[str, str], tuple[float, Any]]:
    app = Starlette(routes=[Mount("/usage", UsageRouter(store, authorize=lambda r: ALL_KEYS))])
    out = {}

    async def timed(params: dict[str, str]) -> tuple[float, Any]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
            first = await client.get("/usage/granular", params=params)
            assert first.status_code == 200, first.text
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                await client.get("/usage/granular", params=params)
                times.append((time.perf_counter() - t0) * 1000)
        return statistics.median(times), first.json()

    for name, start, end in QUERIES:
        for tz in ZONES:
            params = {"start": start.isoformat(), "end": end.isoformat(), "tz": tz,
                      "api_key_id": str(KEYS[0])}  # fmt: skip
            out[(name, tz)] = anyio.run(timed, params)
    return out


COPY_UPLOADS = """
INSERT INTO file_uploads (id, api_key_id, has_key, provider, file_type, file_size,
                          upload_status, uploaded_at)
SELECT id, api_key_id, 1, provider, file_type, file_size, upload_status, uploaded_at
FROM postgresql('{host}', '{db}', 'file_uploads', 'postgres', '')
"""
COPY_REQUESTS = """
INSERT INTO api_requests (id, api_key_id, has_key, method, path, status_code, response_time_ms,
                          response_us, latency_bucket, request_size, response_size, requested_at)
SELECT id, api_key_id, 1, method, path, status_code, response_time_ms,
       toUInt64(round(response_time_ms * 1000)),
       if(response_time_ms <= 0.001, 0,
          least(32767, toUInt16(ceil(log(response_time_ms / 0.001) / log(1.02 / 0.98))))),
       request_size, response_size, requested_at
FROM postgresql('{host}', '{db}', 'api_requests', 'postgres', '')
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--batch", type=int, default=5000)
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--pg", default=os.environ.get(
        "USAGE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"))
    args = parser.parse_args()

    admin = create_engine(args.pg, isolation_level="AUTOCOMMIT")
    name = f"um_bench_ch_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    pg_url = make_url(args.pg).set(database=name)
    tmp = tempfile.TemporaryDirectory()
    pg = UsageStore(pg_url)
    ch = UsageStore(f"chdb:///{tmp.name}/ch",
                    engine_options={"visibility_margin": 0, "maintain_interval": 0})  # fmt: skip
    try:
        pg.create_schema()
        ch.create_schema()
        backend = ch.backend
        assert isinstance(backend, ClickHouseBackend)
        client = backend.client

        # --- ingest ----------------------------------------------------------------------
        data = batches(args.batches + 1, args.batch)
        pg_rate = ingest_rate(pg.write, data)
        ch_rate = ingest_rate(ch.write, data)
        client.command("CREATE TABLE plain AS file_uploads ENGINE = MergeTree "
                       "PARTITION BY toYYYYMM(uploaded_at) ORDER BY (api_key_id, uploaded_at)")
        raw_rate = ingest_rate(
            lambda b: client.insert("plain", UPLOAD_COLUMNS, [_upload_row(u) for u in b],
                                    uuid.uuid4().hex), data)  # fmt: skip
        client.command("DROP TABLE plain")
        n = args.batches * args.batch
        print(f"ingest, {args.batches} batches of {args.batch:,} uploads ({n:,} rows), rows/s:")
        print(f"  PostgreSQL store.write   {pg_rate:>10,.0f}")
        print(f"  chdb store.write         {ch_rate:>10,.0f}   {ch_rate / pg_rate:.1f}x PostgreSQL")
        print(f"  chdb plain INSERT        {raw_rate:>10,.0f}   store.write is "
              f"{ch_rate / raw_rate:.2f}x of it")
        with pg.engine.begin() as conn:
            for table in ("file_uploads", "daily_usage", "hourly_usage"):
                conn.execute(text(f"TRUNCATE {table}"))
        client.command("TRUNCATE TABLE file_uploads")

        # --- reads -----------------------------------------------------------------------
        t0 = time.perf_counter()
        print(f"\nPostgreSQL: building {args.rows:,} uploads + {args.rows // 5:,} requests")
        with pg.engine.connect() as conn:
            build_postgres(conn, args.rows)
        print(f"  built in {time.perf_counter() - t0:.0f} s")
        t0 = time.perf_counter()
        host = f"{pg_url.host or '127.0.0.1'}:{pg_url.port or 5432}"
        client.command(COPY_UPLOADS.format(host=host, db=name))
        client.command(COPY_REQUESTS.format(host=host, db=name))
        print(f"chdb: copied the same rows in {time.perf_counter() - t0:.0f} s")
        ((busiest,),) = client.query(
            "SELECT count() FROM file_uploads WHERE api_key_id = {k:UUID}", {"k": KEYS[0]})
        print(f"busiest key {KEYS[0]}: {int(busiest):,} uploads in 12 months")

        ch_raw = granular_ms(ch, args.runs)
        t0 = time.perf_counter()
        sealed_days = backend.maintain()
        print(f"chdb: maintain() sealed {sealed_days} days in {time.perf_counter() - t0:.1f} s")
        ch_sealed = granular_ms(ch, args.runs)
        pg_ms = granular_ms(pg, args.runs)
        print(f"\n/granular for the busiest key, median of {args.runs} ms")
        print(f"{'range':<10} {'tz':<17} {'chdb raw':>9} {'chdb sealed':>12} {'PostgreSQL':>11}")
        for key, (pg_time, pg_body) in pg_ms.items():
            raw_time, raw_body = ch_raw[key]
            sealed_time, sealed_body = ch_sealed[key]
            assert raw_body == pg_body == sealed_body, f"answers differ for {key}"
            print(f"{key[0]:<10} {key[1]:<17} {raw_time:>9.1f} {sealed_time:>12.1f} "
                  f"{pg_time:>11.1f}")
        print("(every answer identical on both engines)")
    finally:
        ch.dispose()
        pg.dispose()
        tmp.cleanup()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


if __name__ == "__main__":
    main()
