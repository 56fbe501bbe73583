"""``GET /failures`` first-page latency and ``GET /export`` throughput and memory.

    .venv/bin/python benchmarks/failures.py [--requests N] [--uploads N] [--pg URL] [--runs N]

Builds, inside a throwaway PostgreSQL database (``generate_series``), ``api_requests`` with
``--requests`` rows (default 2,000,000; 50 API keys with a skewed share, 12 months of 2025, ~5 %
answered >= 400) and ``file_uploads`` with ``--uploads`` rows (default 1,000,000; ~3 % failed),
each inserted in time order as live writes leave them, then VACUUM ANALYZE. No rollups: neither
endpoint reads them. Then, through a mounted ``UsageRouter`` (in-process ASGI call, JSON
included), it times

* the first ``/failures`` page (limit 50) and the page after it, for the busiest key and for
  every key, over 12 months in UTC and America/New_York (median of ``--runs``);
* ``/export?dataset=uploads`` of the whole table (every key, CSV and NDJSON): rows per second
  and the growth of the process's resident set size while streaming (sampled from
  /proc/self/statm each chunk; the body is counted and dropped as it arrives).

Targets: first page < 20 ms; export >= 100,000 rows/s with RSS growth < 50 MiB per 1,000,000
rows. On a shared machine wall time depends on the load: the table also gives rows per CPU
second of this process (the server's share runs on its own core). The database is created and
dropped by the script.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import uuid
from typing import Any

import anyio
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from usage_middleware import UsageRouter, UsageStore

KEYS = [uuid.UUID(int=(0xF0 << 120) | i) for i in range(1, 51)]
PAGE = os.sysconf("SC_PAGE_SIZE")

PG_REQUESTS = """
INSERT INTO api_requests (id, api_key_id, method, path, status_code, response_time_ms,
                          request_size, response_size, error_message, requested_at)
SELECT gen_random_uuid(),
       (CAST(:keys AS uuid[]))[1 + floor(50 * power(random(), 2))::int],
       'POST', '/files',
       CASE WHEN random() < 0.95 THEN 200 WHEN random() < 0.7 THEN 413 ELSE 500 END,
       random() * 100, 1000, 200, NULL, at
FROM (SELECT timestamptz '2025-01-01 00:00:00+00' + random() * interval '365 days' AS at
        FROM generate_series(1, :n) ORDER BY 1) AS s
"""
PG_UPLOADS = """
INSERT INTO file_uploads (id, api_key_id, provider, file_type, declared_type, file_size,
                          file_name, upload_status, error_message, uploaded_at)
SELECT gen_random_uuid(),
       (CAST(:keys AS uuid[]))[1 + floor(50 * power(random(), 2))::int],
       (ARRAY['vercel', 's3', 'cloudinary'])[1 + floor(random() * 3)::int],
       (ARRAY['image/jpeg', 'image/png', 'application/pdf'])[1 + floor(random() * 3)::int],
       NULL, exp(7 + random() * 9)::bigint, 'photo-' || g || '.jpg',
       CASE WHEN random() < 0.97 THEN 'success' ELSE 'failed' END,
       NULL, at
FROM (SELECT g, timestamptz '2025-01-01 00:00:00+00' + random() * interval '365 days' AS at
        FROM generate_series(1, :n) AS g ORDER BY 2) AS s
"""


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def call(router: UsageRouter, path: str, query: str) -> tuple[int, int, int, int]:
    """One GET through the router's ASGI interface: (status, body bytes, lines, peak RSS)."""
    got = {"status": 0, "bytes": 0, "lines": 0, "peak": rss()}
    requested = False

    async def receive() -> Any:
        nonlocal requested
        if requested:
            await anyio.sleep_forever()
        requested = True
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        if message["type"] == "http.response.start":
            got["status"] = message["status"]
        body = message.get("body", b"")
        got["bytes"] += len(body)
        got["lines"] += body.count(b"\n")
        got["peak"] = max(got["peak"], rss())

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
        "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
        "query_string": query.encode(), "headers": [], "server": ("b", 80), "client": ("b", 1),
    }  # fmt: skip
    anyio.run(router, scope, receive, send)
    return got["status"], got["bytes"], got["lines"], got["peak"]


def median_ms(fn: Any, runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2_000_000)
    parser.add_argument("--uploads", type=int, default=1_000_000)
    parser.add_argument("--pg", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    admin = make_url(args.pg)
    name = f"um_bench_failures_{os.getpid()}"
    admin_engine = create_engine(admin, isolation_level="AUTOCOMMIT")
    with admin_engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    store = UsageStore(admin.set(database=name))
    try:
        store.create_schema()
        t = time.perf_counter()
        with store.engine.begin() as conn:
            keys = "{" + ",".join(map(str, KEYS)) + "}"
            conn.execute(text(PG_REQUESTS), {"keys": keys, "n": args.requests})
            conn.execute(text(PG_UPLOADS), {"keys": keys, "n": args.uploads})
        with store.engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("VACUUM ANALYZE"))
            busiest = conn.execute(
                text(
                    "SELECT api_key_id FROM api_requests GROUP BY 1 ORDER BY count(*) DESC "
                    "LIMIT 1"
                )
            ).scalar_one()
            failed = conn.execute(
                text(
                    "SELECT (SELECT count(*) FROM api_requests WHERE api_key_id = :k AND "
                    "status_code >= 400), (SELECT count(*) FROM file_uploads WHERE "
                    "api_key_id = :k AND upload_status = 'failed')"
                ),
                {"k": busiest},
            ).one()
        print(
            f"built {args.requests:,} requests + {args.uploads:,} uploads in "
            f"{time.perf_counter() - t:.0f} s; busiest key: {failed[0]:,} failed requests, "
            f"{failed[1]:,} failed uploads"
        )
        router = UsageRouter(store, public=True)
        print("\n| /failures (limit 50), 12 months | zone | first page ms | next page ms |")
        print("|---|---|---|---|")
        for who, key_q in (("busiest key", f"&api_key_id={busiest}"), ("all keys", "")):
            for zone in ("UTC", "America/New_York"):
                q = f"start=2025-01-01&end=2025-12-31&tz={zone}{key_q}"
                call(router, "/failures", q)  # warm: schema check, prepared statements
                first = median_ms(lambda q=q: call(router, "/failures", q), args.runs)
                import json

                body: dict[str, Any] = {}

                async def fetch(q: str = q, body: dict[str, Any] = body) -> None:
                    import httpx

                    transport = httpx.ASGITransport(app=router)
                    async with httpx.AsyncClient(transport=transport, base_url="http://b") as c:
                        body.update((await c.get(f"/failures?{q}")).json())

                anyio.run(fetch)
                assert len(body["items"]) == 50 and body["next"]
                q2 = f"{q}&cursor={body['next']}"
                nxt = median_ms(lambda q2=q2: call(router, "/failures", q2), args.runs)
                print(f"| {who} | {zone} | {first:.2f} | {nxt:.2f} |")
                json.dumps(body)
        print(
            "\n| /export uploads, every key, 12 months | rows | s | rows/s "
            "| rows per client CPU s | RSS growth MiB |"
        )
        print("|---|---|---|---|---|---|")
        for fmt in ("csv", "ndjson"):
            before = rss()
            cpu = time.process_time()
            t = time.perf_counter()
            status, size, lines, peak = call(
                router, "/export", f"start=2025-01-01&end=2025-12-31&format={fmt}"
            )
            took = time.perf_counter() - t
            cpu = time.process_time() - cpu
            rows = lines - (fmt == "csv")
            assert status == 200 and rows == args.uploads, (status, rows)
            print(
                f"| {fmt} ({size / 2**20:.0f} MiB body) | {rows:,} | {took:.1f} | "
                f"{rows / took:,.0f} | {rows / cpu:,.0f} | {(peak - before) / 2**20:.1f} |"
            )
    finally:
        store.dispose()
        with admin_engine.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin_engine.dispose()


if __name__ == "__main__":
    main()
