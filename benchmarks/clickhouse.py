"""ClickHouse (chdb, in-process) against PostgreSQL, in one run: ingest through ``store.write``,
and ``GET /granular`` and ``GET /requests`` for the busiest key.

    .venv/bin/python benchmarks/clickhouse.py [--rows N[,N...]] [--ingest N] [--batch N]
                                              [--batches recorder|records] [--runs N] [--pg URL]

1. Ingest. benchmarks/ingest.py's live-shaped rows (a batch of 5,000 spans five seconds of
   traffic), uploads and requests, ``--ingest`` of each in batches of ``--batch``, through
   ``store.write`` on PostgreSQL (requests with the seal that folds them into its rollups, as
   ingest.py times them) and on chdb, and as a plain INSERT of the same rows into a
   ``MergeTree`` copy of chdb's raw table (the engine with no id check; the rows are converted
   to columns as ``store.write`` converts them). Rows per second, the first batch a warm-up.
   ``store.write`` is handed what the recorder hands it (``--batches recorder``, the default:
   its queue's packed batches, packing included in the time) or lists of records
   (``--batches records``), on both engines alike. With the recorder's batches, chdb also
   writes them unpacked into records first (new ids, a day later), as it wrote them before it
   took them packed.
2. Reads, for each size in ``--rows``. PostgreSQL gets that many uploads and a fifth as many
   requests over 2025, as benchmarks/query.py builds them (uploads and their rollups in SQL,
   requests through ``store.write``). chdb gets *the same rows*, copied out of PostgreSQL,
   stored a second after their time as live traffic is; it is timed from raw rows alone (12
   months in UTC), then sealed the way a live deployment seals it: each UTC day on its own,
   ``settle_days`` after it ends (the clock is moved back by the settle window and the
   visibility margin, so every day has its own watermark). Then ``/granular`` and
   ``/requests`` for the busiest key over 12 months, 30 days and 1 day in UTC, New York and
   Kolkata on both engines: the first request on its own (chdb remembers the sealed part of a
   read; nothing of it was read before), then the median of ``--runs`` more. Every answer must
   be identical on both engines. chdb is also timed with the statements of an answer run one
   after the other on one connection (``serial``), as it ran before reads had connections of
   their own: the same statements, the remembered sealed parts forgotten first.
   With several sizes, the last table compares them (where chdb overtakes PostgreSQL, if
   anywhere).

Targets: chdb ingest >= 3x PostgreSQL's; 12-month answers < 50 ms at 10,000,000 rows. Creates
and drops its own PostgreSQL databases and chdb directory.
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
from collections.abc import Callable
from dataclasses import replace
from datetime import date, datetime, timedelta, timezone
from typing import Any

import anyio
import httpx
import psycopg
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, make_url
from starlette.applications import Starlette
from starlette.routing import Mount

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ingest import as_batches, make_requests, make_uploads
from query import KEYS, QUERIES, build_postgres, build_postgres_requests

from usage_middleware import ALL_KEYS, RequestRecord, UploadRecord, UsageRouter, UsageStore
from usage_middleware._records import new_id
from usage_middleware._schema import endpoint_route, latency_bucket
from usage_middleware._storage.chread import SealedAnswers
from usage_middleware._storage.chwrite import (
    REQUEST_KINDS,
    UPLOAD_KINDS,
    request_columns,
    request_data,
    upload_data,
)
from usage_middleware._storage.clickhouse import ClickHouseBackend

UTC = timezone.utc
ZONES = ["UTC", "America/New_York", "Asia/Kolkata"]
PATHS = ["/usage/granular", "/usage/requests"]
STORED_AFTER = timedelta(seconds=1)  # live rows are stored about this long after their time


def pg_database(admin: Any, pg: str, prefix: str) -> URL:
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    return make_url(pg).set(database=name)


def drop_database(admin: Any, url: URL) -> None:
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{url.database}" WITH (FORCE)'))


def rate(rows: int, fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return rows / (time.perf_counter() - t0)


# --- ingest -----------------------------------------------------------------------------------


def later(record: Any) -> Any:
    """A copy of ``record`` with a new id, a day later."""
    if isinstance(record, UploadRecord):
        return replace(record, id=new_id(), uploaded_at=record.uploaded_at + timedelta(days=1))
    return replace(record, id=new_id(), requested_at=record.requested_at + timedelta(days=1))


def ingest(admin: Any, pg: str, ch: UsageStore, n: int, batch: int, way: str) -> None:
    rng = random.Random(3)
    uploads = [UploadRecord(**r) for r in make_uploads(n + batch, "live", rng)]
    requests = [RequestRecord(**r) for r in make_requests(n + batch, "live", rng)]
    chunks = {
        "uploads": [uploads[i : i + batch] for i in range(0, len(uploads), batch)],
        "requests": [requests[i : i + batch] for i in range(0, len(requests), batch)],
    }
    # the timed batches, as store.write is handed them (packed in the timed call)
    timed = {name: as_batches(parts[1:], way) for name, parts in chunks.items()}
    url = pg_database(admin, pg, "um_bench_ch_ingest")
    pg_store = UsageStore(url)
    rates: dict[tuple[str, str], float] = {}
    try:
        pg_store.create_schema()
        end = max(r.requested_at for r in requests) + timedelta(microseconds=1)
        for name, parts in chunks.items():
            pg_store.write(parts[0])

            def pg_write(name: str = name) -> None:
                for part in timed[name]():
                    pg_store.write(part)
                if name == "requests":  # live requests are raw rows until a seal folds them
                    pg_store.seal(end)

            rates["PostgreSQL store.write", name] = rate(n, pg_write)
    finally:
        pg_store.dispose()
        drop_database(admin, url)
    client = backend(ch).client
    ways = ["PostgreSQL store.write", "chdb store.write"]
    for name, parts in chunks.items():
        ch.write(parts[0])
        rates["chdb store.write", name] = rate(n, lambda b=timed[name]: [ch.write(x) for x in b()])
    if way == "recorder":
        # the same batches unpacked into records first: how chdb wrote the recorder's batches
        # before it took them packed (new ids, a day later: new rows of new key-days)
        ways.append("chdb store.write, unpacked")
        for name, parts in chunks.items():
            fresh = [[later(r) for r in part] for part in parts[1:]]
            batches = as_batches(fresh, "recorder")
            rates[ways[-1], name] = rate(n, lambda b=batches: [ch.write(list(x)) for x in b()])
    ways.append("chdb plain INSERT")
    for table, order in (("file_uploads", "uploaded_at"), ("api_requests", "requested_at")):
        client.command(
            f"CREATE TABLE plain_{table} AS {table} ENGINE = MergeTree "
            f"PARTITION BY toYYYYMM({order}) ORDER BY (api_key_id, {order})"
        )

    def plain(parts: list[list[Any]], requests: bool) -> None:
        for part in parts[1:]:
            if requests:
                labels = [endpoint_route(r.path, r.route_matched) for r in part]
                data = request_data(request_columns(part), labels)
                kinds, table = REQUEST_KINDS, "api_requests"
            else:
                data, kinds, table = upload_data(part), UPLOAD_KINDS, "file_uploads"
            client.insert(f"plain_{table}", kinds, data, uuid.uuid4().hex)

    rates["chdb plain INSERT", "uploads"] = rate(n, lambda: plain(chunks["uploads"], False))
    rates["chdb plain INSERT", "requests"] = rate(n, lambda: plain(chunks["requests"], True))
    for table in ("file_uploads", "api_requests"):
        client.command(f"DROP TABLE plain_{table}")
    print(f"ingest, live shape, {n:,} rows of each in batches of {batch:,} ({way}): rows/s")
    print(f"{'':<26} {'uploads':>10} {'requests':>10}")
    for what in ways:
        print(f"{what:<26} {rates[what, 'uploads']:>10,.0f} {rates[what, 'requests']:>10,.0f}")
    for name in ("uploads", "requests"):
        ours, pg_rate = rates["chdb store.write", name], rates["PostgreSQL store.write", name]
        print(f"  {name}: chdb store.write is {ours / pg_rate:.2f}x PostgreSQL's store.write, "
              f"{ours / rates['chdb plain INSERT', name]:.2f}x of the plain INSERT")  # fmt: skip


# --- reads ------------------------------------------------------------------------------------

COPY_UPLOADS = """
INSERT INTO file_uploads (id, api_key_id, has_key, provider, file_type, file_size,
                          upload_status, uploaded_at, inserted_at)
SELECT id, api_key_id, true, provider, file_type, file_size, upload_status, uploaded_at,
       uploaded_at + INTERVAL 1 SECOND
FROM postgresql('{host}', '{db}', 'file_uploads', '{user}', '{password}')
"""
REQUESTS_SQL = """
SELECT id, api_key_id, method, path, status_code, response_time_ms, request_size,
       response_size, error_message, requested_at, route_matched
FROM api_requests ORDER BY requested_at
"""


def backend(store: UsageStore) -> ClickHouseBackend:
    b = store.backend
    assert isinstance(b, ClickHouseBackend)
    return b


def copy_requests(url: URL, ch: UsageStore) -> None:
    """The requests out of PostgreSQL through the writer's own column conversion (latency
    buckets computed in Python, as every writer computes them)."""
    client = backend(ch).client
    kinds = (*REQUEST_KINDS, ("inserted_at", "time"))
    dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn) as conn, conn.cursor(name="requests") as cur:
        cur.itersize = 100_000
        cur.execute(REQUESTS_SQL)
        while rows := cur.fetchmany(100_000):
            ms = [r[5] for r in rows]
            times = [r[9] for r in rows]
            data = [
                [r[0].int for r in rows], [r[1].int for r in rows], [True] * len(rows),
                [r[2] for r in rows], [r[3] for r in rows], [r[4] for r in rows], ms,
                [round(m * 1000) for m in ms], [latency_bucket(m) for m in ms],
                [r[6] for r in rows], [r[7] for r in rows], [r[8] for r in rows], times,
                [r[10] for r in rows], [endpoint_route(r[3], r[10]) for r in rows],
                [t + STORED_AFTER for t in times],
            ]  # fmt: skip
            client.insert("api_requests", kinds, data, "")


def seal_day_by_day(ch: UsageStore, first: date, last: date) -> int:
    """Seal each UTC day of ``[first, last]`` as a live writer would have, on its own, when
    ``settle_days`` had passed since it ended: the seal's clock is moved back by the settle
    window and the visibility margin."""
    b = backend(ch)
    settle, margin = b.settle_days, b.visibility_margin
    sealed = 0
    day = first
    try:
        while day <= last:
            now = datetime.now(UTC)
            at = datetime(day.year, day.month, day.day, 1, tzinfo=UTC) + timedelta(days=settle + 1)
            b.settle_days = (now.date() - at.date()).days + settle
            b.visibility_margin = (now - at).total_seconds() + margin
            sealed += b.seal()
            day += timedelta(days=1)
    finally:
        b.settle_days, b.visibility_margin = settle, margin
    return sealed


def timings(store: UsageStore, zones: list[str], queries: Any, runs: int) -> dict[Any, Any]:
    """Per answer: the first request's ms (nothing of it read before), the median of ``runs``
    more, and the answer."""
    app = Starlette(routes=[Mount("/usage", UsageRouter(store, authorize=lambda r: ALL_KEYS))])

    async def timed(path: str, params: dict[str, str]) -> tuple[float, float, Any]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
            times = []
            for _ in range(runs + 1):
                t0 = time.perf_counter()
                response = await client.get(path, params=params)
                times.append((time.perf_counter() - t0) * 1000)
                assert response.status_code == 200, response.text
        return times[0], statistics.median(times[1:]), response.json()

    out = {}
    for path in PATHS:
        for name, start, end in queries:
            for tz in zones:
                params = {"start": start.isoformat(), "end": end.isoformat(), "tz": tz,
                          "api_key_id": str(KEYS[0])}  # fmt: skip
                out[path, name, tz] = anyio.run(timed, path, params)
    return out


def reads(admin: Any, pg: str, ch: UsageStore, rows: int, runs: int) -> dict[str, float]:
    url = pg_database(admin, pg, "um_bench_ch_reads")
    pg_store = UsageStore(url)
    client = backend(ch).client
    try:
        pg_store.create_schema()
        t0 = time.perf_counter()
        print(f"\n{rows:,} uploads + {rows // 5:,} requests over 2025")
        with pg_store.engine.connect() as conn:
            build_postgres(conn, rows)
        build_postgres_requests(pg_store, rows // 5)
        pg_store.seal()
        print(f"  PostgreSQL built in {time.perf_counter() - t0:.0f} s")
        for table in ("file_uploads", "api_requests", "upload_rollup", "request_rollup",
                      "endpoint_rollup", "rollup_seals", "endpoint_routes"):  # fmt: skip
            client.command(f"TRUNCATE TABLE {table}")
        t0 = time.perf_counter()
        host = f"{url.host or '127.0.0.1'}:{url.port or 5432}"
        client.command(COPY_UPLOADS.format(host=host, db=url.database, user=url.username or "",
                                           password=url.password or ""))  # fmt: skip
        copy_requests(url, ch)
        print(f"  chdb: the same rows copied in {time.perf_counter() - t0:.0f} s")
        ((busiest,),) = client.query(
            "SELECT count() FROM file_uploads WHERE api_key_id = {k:UUID}", {"k": KEYS[0]}
        )
        print(f"  busiest key {KEYS[0]}: {int(busiest):,} uploads")

        raw = timings(ch, ["UTC"], QUERIES[:1], max(1, runs // 3))
        t0 = time.perf_counter()
        days = seal_day_by_day(ch, date(2025, 1, 1), date(2025, 12, 31))
        print(f"  chdb: {days} days sealed one by one in {time.perf_counter() - t0:.0f} s")
        sealed = timings(ch, ZONES, QUERIES, runs)
        b = backend(ch)
        b.answers, b.parallel_reads = SealedAnswers(), False
        try:
            serial = timings(ch, ZONES, QUERIES, runs)
        finally:
            b.answers, b.parallel_reads = SealedAnswers(), True
        on_pg = timings(pg_store, ZONES, QUERIES, runs)
    finally:
        pg_store.dispose()
        drop_database(admin, url)
    print(f"\nbusiest key, ms: the first request, then the median of {runs} more (chdb raw "
          "only: 12 months in UTC, median)")  # fmt: skip
    print(f"{'answer':<10} {'range':<10} {'tz':<17} {'chdb raw':>9} {'chdb 1st':>9} "
          f"{'chdb':>7} {'serial 1st':>10} {'serial':>7} {'PG 1st':>7} {'PG':>7} "
          f"{'chdb/PG':>8}")  # fmt: skip
    ratios: dict[str, float] = {}
    for key, (pg_first, pg_ms, pg_body) in on_pg.items():
        ch_first, ch_ms, ch_body = sealed[key]
        serial_first, serial_ms, serial_body = serial[key]
        assert ch_body == pg_body == serial_body, f"answers differ for {key}"
        raw_ms = f"{raw[key][1]:>9.1f}" if key in raw else f"{'':>9}"
        if key in raw:
            assert raw[key][2] == pg_body, f"raw answers differ for {key}"
        path, name, tz = key
        print(f"{path.rsplit('/', 1)[1]:<10} {name:<10} {tz:<17} {raw_ms} {ch_first:>9.1f} "
              f"{ch_ms:>7.1f} {serial_first:>10.1f} {serial_ms:>7.1f} {pg_first:>7.1f} "
              f"{pg_ms:>7.1f} {ch_ms / pg_ms:>8.2f}")  # fmt: skip
        if name == "12 months":
            ratios[f"{path.rsplit('/', 1)[1]} {tz}"] = ch_ms / pg_ms
    print("(every answer identical on both engines)")
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="10000000",
                        help="uploads in the read data sets, comma-separated sizes")  # fmt: skip
    parser.add_argument("--ingest", type=int, default=50_000, help="rows of each data set")
    parser.add_argument("--batch", type=int, default=5_000)
    parser.add_argument(
        "--batches",
        choices=["recorder", "records"],
        default="recorder",
        help="what store.write is handed: the recorder's packed batches, or lists of records",
    )
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument(
        "--pg",
        default=os.environ.get(
            "USAGE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
        ),
    )
    args = parser.parse_args()
    sizes = [int(s) for s in args.rows.split(",")]

    admin = create_engine(args.pg, isolation_level="AUTOCOMMIT")
    tmp = tempfile.TemporaryDirectory(prefix="usage-bench-")
    ch = UsageStore(f"chdb:///{tmp.name}/ch", engine_options={"maintain_interval": 0})
    try:
        ch.create_schema()
        ingest(admin, args.pg, ch, args.ingest, args.batch, args.batches)
        by_size = {rows: reads(admin, args.pg, ch, rows, args.runs) for rows in sizes}
        if len(sizes) > 1:
            print("\n12-month answers, chdb time / PostgreSQL time, by size:")
            names = list(by_size[sizes[0]])
            print(f"{'rows':>12} " + " ".join(f"{n:>26}" for n in names))
            for rows, ratios in by_size.items():
                print(f"{rows:>12,} " + " ".join(f"{ratios[n]:>26.2f}" for n in names))
    finally:
        ch.dispose()
        tmp.cleanup()
        admin.dispose()


if __name__ == "__main__":
    main()
