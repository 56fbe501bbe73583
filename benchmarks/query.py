"""Read answers served from rollups, against raw scans measured in the same run: ``GET
/granular``, and on PostgreSQL also ``GET /requests``, ``GET /consumers`` and ``GET /failures``.

    .venv/bin/python benchmarks/query.py [--rows N] [--requests N] [--sqlite-rows N] [--pg URL]
                                         [--runs N] [--skip-postgres] [--skip-sqlite]

Builds a ``file_uploads`` table of ``--rows`` rows (default 10,000,000; 50 API keys with a
skewed share each, 12 months of 2025, a realistic mix of providers, types, sizes and ~3 %
failures) *inside the database* (PostgreSQL: ``generate_series``; SQLite: a recursive CTE), then
builds every upload rollup from them with ``INSERT .. SELECT .. GROUP BY`` — what
``store.write`` would have produced; the script checks that on a sample by recomputing one key's
rollup rows in Python with the package's own aggregation rules. On PostgreSQL, ``api_requests``
gets ``--requests`` rows (default 10,000,000: the same keys, 30 routes of an upload API with
their own status and latency mix, 1 % unmatched scanner paths; see ``query_requests.py``),
written in time order through ``store.write`` itself in batches of 100,000, so the raw rows,
the request histograms and the endpoint rollups are exactly what the recorder writes. SQLite
gets a fifth as many requests as uploads, built in SQL. Then, for the busiest key, it times

* ``/granular`` through a mounted ``UsageRouter`` (in-process ASGI call, JSON included), and
* the same answer from a raw scan: uploads grouped by local period (PostgreSQL: in SQL with
  ``AT TIME ZONE``; SQLite: by UTC hour in SQL, folded into local periods in Python) plus the
  request count, errors, mean and exact p95, with a covering index on (key, time),

for 12 months, 30 days and 1 day (default granularities: week, day, hour), in UTC and
America/New_York (PostgreSQL also Asia/Kolkata, +05:30). It checks both give the same totals,
breakdowns and series, and prints the median of ``--runs`` runs and the ratio. PostgreSQL
target: 12 months < 50 ms and >= 50x faster than the raw scan.

On PostgreSQL it then times, each against its raw scan and checked against it:

* ``/requests`` for the busiest key over 12 months in UTC and America/New_York (totals,
  weekly series, endpoints, status codes; the raw scan is one pass over the key's rows through
  a covering index with exact percentiles) — target < 50 ms and >= 50x;
* ``/consumers`` for every key over 12 months (raw: both tables grouped by key) — < 100 ms;
* the first ``/failures`` page of the busiest key (raw: all its failures, newest first) —
  < 20 ms;

and prints how many rows one busy key-day is in each request table. Then (``--prune-days``,
default 30) it deletes the raw rows older than 30 days before the data's end, as retention
would, times the same answers again and checks that every one is unchanged (target: still
< 50 ms, Kolkata no slower than twice UTC). The script creates and drops its own database
(PostgreSQL) or temporary file (SQLite, default 1,000,000 rows).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from datetime import date, datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import anyio
import httpx
import query_requests  # this script's sibling: the request analytics part
from sqlalchemy import Connection, create_engine, text
from sqlalchemy.engine import make_url
from starlette.applications import Starlette
from starlette.routing import Mount

from usage_middleware import ALL_KEYS, UsageRouter, UsageStore
from usage_middleware._schema import latency_bucket
from usage_middleware._sqliterollups import _quarter

UTC = timezone.utc
YEAR_START = datetime(2025, 1, 1, tzinfo=UTC)
KEYS = [uuid.UUID(int=(0xB0 << 120) | i) for i in range(1, 51)]
# weighted by repetition: a plausible mix for an upload API
PROVIDERS = ["vercel"] * 4 + ["s3"] * 3 + ["cloudinary"] * 2 + ["supabase"]
TYPES = (
    ["image/jpeg"] * 7 + ["image/png"] * 5 + ["application/pdf"] * 3 + ["image/webp"] * 2
    + ["video/mp4", "text/csv", "application/zip", "image/gif", "application/octet-stream"]
)  # fmt: skip
QUERIES = [("12 months", date(2025, 1, 1), date(2025, 12, 31)),
           ("30 days", date(2025, 10, 15), date(2025, 11, 13)),
           ("1 day", date(2025, 11, 2), date(2025, 11, 2))]  # fmt: skip
ZONES = ["UTC", "America/New_York"]
# PostgreSQL's raw scan groups in SQL with AT TIME ZONE, so it can check a :30 zone too (the
# SQLite one groups by UTC hour, which cannot split a Kolkata day).
PG_ZONES = [*ZONES, "Asia/Kolkata"]
DATA_END = datetime(2026, 1, 1, tzinfo=UTC)


def _sql_array(values: list[str]) -> str:
    return "ARRAY[" + ", ".join(f"'{v}'" for v in values) + "]"


# --- building the data set ---------------------------------------------------------------------

PG_UPLOADS = f"""
INSERT INTO file_uploads (id, api_key_id, provider, file_type, file_size, upload_status,
                          uploaded_at)
SELECT gen_random_uuid(),
       (CAST(:keys AS uuid[]))[1 + floor(50 * power(random(), 2))::int],
       ({_sql_array(PROVIDERS)})[1 + floor(random() * {len(PROVIDERS)})::int],
       ({_sql_array(TYPES)})[1 + floor(random() * {len(TYPES)})::int],
       exp(7 + random() * 9)::bigint,
       CASE WHEN random() < 0.97 THEN 'success' ELSE 'failed' END,
       timestamptz '2025-01-01 00:00:00+00' + random() * interval '365 days'
FROM generate_series(1, :n)
"""
# Rows go in in time order, as live writes leave them (a rollup row is created when its hour,
# day or month first sees traffic), not in a hash aggregate's arbitrary order.
PG_ROLLUPS = [
    """INSERT INTO daily_usage SELECT (uploaded_at AT TIME ZONE 'UTC')::date, api_key_id, provider,
       file_type, count(*), sum(file_size), count(*) FILTER (WHERE upload_status = 'success'),
       count(*) FILTER (WHERE upload_status <> 'success') FROM file_uploads GROUP BY 1, 2, 3, 4
       ORDER BY 1, 2, 3, 4""",
    """INSERT INTO hourly_usage SELECT date_trunc('hour', uploaded_at), api_key_id, provider,
       file_type, count(*), sum(file_size), count(*) FILTER (WHERE upload_status = 'success'),
       count(*) FILTER (WHERE upload_status <> 'success') FROM file_uploads GROUP BY 1, 2, 3, 4
       ORDER BY 1, 2, 3, 4""",
    """INSERT INTO quarter_usage SELECT date_bin('15 minutes', uploaded_at, timestamptz
       '2000-01-01 00:00+00'), api_key_id, provider, file_type, count(*), sum(file_size),
       count(*) FILTER (WHERE upload_status = 'success'),
       count(*) FILTER (WHERE upload_status <> 'success') FROM file_uploads GROUP BY 1, 2, 3, 4
       ORDER BY 1, 2, 3, 4""",
]


def build_postgres(conn: Connection, rows: int) -> None:
    """The uploads and their rollups, in SQL (the requests are written by the writer)."""
    keys = [str(k) for k in KEYS]
    conn.execute(text("SELECT setseed(0.42)"))
    chunk = 1_000_000
    conn.execute(text("DROP INDEX idx_file_uploads_key_time, idx_file_uploads_time"))
    conn.execute(text("ALTER TABLE file_uploads DROP CONSTRAINT file_uploads_pkey"))
    for done in range(0, rows, chunk):
        n = min(chunk, rows - done)
        conn.execute(text(PG_UPLOADS).bindparams(keys=keys, n=n))
        conn.commit()
        print(f"  file_uploads: {done + n:,} rows", flush=True)
    print("  indexes and rollups ...", flush=True)
    conn.execute(text("ALTER TABLE file_uploads ADD PRIMARY KEY (id, uploaded_at)"))
    conn.execute(text("CREATE INDEX idx_file_uploads_key_time ON file_uploads (api_key_id, uploaded_at)"))  # noqa: E501
    conn.execute(text("CREATE INDEX idx_file_uploads_time ON file_uploads (uploaded_at)"))
    # the raw baseline's best case: an index-only scan of (key, time) with the grouped columns
    conn.execute(text(
        "CREATE INDEX bench_uploads_covering ON file_uploads (api_key_id, uploaded_at) "
        "INCLUDE (provider, file_type, file_size, upload_status)"
    ))
    for statement in PG_ROLLUPS:
        conn.execute(text(statement))
    conn.commit()


def build_postgres_requests(store: UsageStore, requests: int) -> None:
    """The requests through the writer, then the raw baseline's covering index and statistics."""
    spent = query_requests.write_requests(store, requests, KEYS)
    print(f"  {requests:,} requests written by store.write in {spent:.0f} s "
          f"({requests / spent:,.0f} rows/s)", flush=True)  # fmt: skip
    with store.engine.connect() as conn:
        conn.execute(text(query_requests.COVERING_INDEX))
        conn.commit()
        # VACUUM cannot run inside a transaction; it also makes index-only scans possible
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("VACUUM ANALYZE"))


SQLITE_UPLOADS = f"""
WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < :n),
r AS (SELECT abs(random()) / 9223372036854775807.0 AS a, abs(random()) / 9223372036854775807.0 AS b,
             abs(random()) % {len(PROVIDERS)} AS p, abs(random()) % {len(TYPES)} AS t,
             abs(random()) / 9223372036854775807.0 AS c, abs(random()) / 9223372036854775807.0 AS d
      FROM s)
INSERT INTO file_uploads (id, api_key_id, provider, file_type, file_size, upload_status,
                          uploaded_at)
SELECT lower(hex(randomblob(16))), (SELECT hex FROM bench_keys WHERE idx = CAST(50 * a * a AS INT)),
       (SELECT name FROM bench_providers WHERE idx = p), (SELECT name FROM bench_types WHERE idx = t),
       CAST(exp(7 + b * 9) AS INT), CASE WHEN c < 0.97 THEN 'success' ELSE 'failed' END,
       strftime('%Y-%m-%d %H:%M:%S', 1735689600 + CAST(d * 31536000 AS INT), 'unixepoch')
         || '.000000'
FROM r
"""  # noqa: E501
SQLITE_REQUESTS = """
WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < :n),
r AS (SELECT abs(random()) / 9223372036854775807.0 AS a, abs(random()) / 9223372036854775807.0 AS b,
             abs(random()) / 9223372036854775807.0 AS c, abs(random()) / 9223372036854775807.0 AS d
      FROM s)
INSERT INTO api_requests (id, api_key_id, method, path, status_code, response_time_ms,
                          request_size, response_size, requested_at)
SELECT lower(hex(randomblob(16))), (SELECT hex FROM bench_keys WHERE idx = CAST(50 * a * a AS INT)),
       'POST', '/files', CASE WHEN c < 0.95 THEN 200 ELSE 500 END,
       round(exp(b * 7), 3), 1000, 200,
       strftime('%Y-%m-%d %H:%M:%S', 1735689600 + CAST(d * 31536000 AS INT), 'unixepoch')
         || '.000000'
FROM r
"""
SQLITE_QUARTER = _quarter("uploaded_at").replace(":", r"\:")  # text(): a colon is no parameter
SQLITE_ROLLUPS = [
    """INSERT INTO daily_usage SELECT substr(uploaded_at, 1, 10), api_key_id, provider, file_type,
       count(*), sum(file_size), sum(upload_status = 'success'), sum(upload_status <> 'success')
       FROM file_uploads GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4""",
    """INSERT INTO hourly_usage SELECT substr(uploaded_at, 1, 13) || ':00:00.000000', api_key_id,
       provider, file_type, count(*), sum(file_size), sum(upload_status = 'success'),
       sum(upload_status <> 'success') FROM file_uploads GROUP BY 1, 2, 3, 4
       ORDER BY 1, 2, 3, 4""",
    f"""INSERT INTO quarter_usage SELECT {SQLITE_QUARTER}, api_key_id,
       provider, file_type, count(*), sum(file_size), sum(upload_status = 'success'),
       sum(upload_status <> 'success') FROM file_uploads GROUP BY 1, 2, 3, 4
       ORDER BY 1, 2, 3, 4""",
]


def build_sqlite(conn: Connection, rows: int) -> None:
    conn.execute(text("CREATE TEMP TABLE bench_keys (idx INTEGER PRIMARY KEY, hex TEXT)"))
    conn.execute(text("CREATE TEMP TABLE bench_providers (idx INTEGER PRIMARY KEY, name TEXT)"))
    conn.execute(text("CREATE TEMP TABLE bench_types (idx INTEGER PRIMARY KEY, name TEXT)"))
    conn.execute(text("INSERT INTO bench_keys VALUES (:i, :h)"),
                 [{"i": i, "h": k.hex} for i, k in enumerate(KEYS)])
    conn.execute(text("INSERT INTO bench_providers VALUES (:i, :h)"),
                 [{"i": i, "h": v} for i, v in enumerate(PROVIDERS)])
    conn.execute(text("INSERT INTO bench_types VALUES (:i, :h)"),
                 [{"i": i, "h": v} for i, v in enumerate(TYPES)])
    conn.execute(text(SQLITE_UPLOADS).bindparams(n=rows))
    conn.execute(text(SQLITE_REQUESTS).bindparams(n=rows // 5))
    for statement in SQLITE_ROLLUPS:
        conn.execute(text(statement))
    # request rollups need latency_bucket(): computed here by the package's own function
    acc: dict[tuple[Any, ...], list[int]] = defaultdict(lambda: [0, 0, 0, 0, 0])
    for key, at, ms, status, size, rsize in conn.execute(text(
        "SELECT api_key_id, requested_at, response_time_ms, status_code, request_size, "
        "response_size FROM api_requests"
    )):
        lb = latency_bucket(ms)
        for table, when in (("monthly_request_usage", at[:7] + "-01"),
                            ("daily_request_usage", at[:10]),
                            ("hourly_request_usage", at[:13] + ":00:00.000000"),
                            ("quarter_request_usage",
                             f"{at[:14]}{int(at[14:16]) // 15 * 15:02d}:00.000000")):
            a = acc[(table, key, when, lb)]
            a[0] += 1
            a[1] += status >= 400
            a[2] += round(ms * 1000)
            a[3] += size
            a[4] += rsize
    for table, col in (("monthly_request_usage", "usage_month"),
                       ("daily_request_usage", "usage_date"),
                       ("hourly_request_usage", "usage_hour"),
                       ("quarter_request_usage", "usage_quarter")):
        conn.execute(
            text(f"INSERT INTO {table} (api_key_id, {col}, latency_bucket, total_requests, "
                 "error_requests, total_response_us, total_request_bytes, total_response_bytes) "
                 "VALUES (:k, :w, :b, :n, :e, :us, :rq, :rs)"),
            [{"k": k, "w": w, "b": b, "n": v[0], "e": v[1], "us": v[2], "rq": v[3], "rs": v[4]}
             for (t, k, w, b), v in sorted(acc.items(), key=lambda kv: (kv[0][2], str(kv[0][1])))
             if t == table],
        )
    conn.execute(text(
        "CREATE INDEX bench_uploads_covering ON file_uploads "
        "(api_key_id, uploaded_at, provider, file_type, file_size, upload_status)"
    ))
    conn.execute(text(
        "CREATE INDEX bench_requests_covering ON api_requests "
        "(api_key_id, requested_at, response_time_ms, status_code)"
    ))
    conn.commit()
    conn.execute(text("ANALYZE"))
    conn.commit()


def verify_rollups(store: UsageStore, key: uuid.UUID) -> None:
    """One key's rollup rows for one UTC day equal the store's aggregation rules applied to the
    raw rows (uploads by status; requests by latency_bucket() of the Python package)."""
    day = date(2025, 6, 17)
    lo, hi = datetime(2025, 6, 17, tzinfo=UTC), datetime(2025, 6, 18, tzinfo=UTC)
    from sqlalchemy import select

    from usage_middleware._schema import (
        api_requests,
        daily_request_usage,
        daily_usage,
        file_uploads,
        hourly_usage,
    )

    with store.engine.connect() as conn:
        want: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0, 0])
        want_hours: dict[tuple[Any, ...], int] = defaultdict(int)
        fu = file_uploads.c
        for provider, ft, size, status, at in conn.execute(
            select(fu.provider, fu.file_type, fu.file_size, fu.upload_status, fu.uploaded_at)
            .where(fu.api_key_id == key, fu.uploaded_at >= lo, fu.uploaded_at < hi)
        ):
            a = want[(provider, ft)]
            a[0] += 1
            a[1] += size
            a[2] += status == "success"
            a[3] += status != "success"
            want_hours[(at.replace(minute=0, second=0, microsecond=0), provider, ft)] += 1
        du = daily_usage.c
        got = {
            (p, t): [n, s, ok, bad]
            for p, t, n, s, ok, bad in conn.execute(
                select(du.provider, du.file_type, du.total_uploads, du.total_file_size,
                       du.successful_requests, du.failed_requests)
                .where(du.api_key_id == key, du.usage_date == day)
            )
        }
        hu = hourly_usage.c
        got_hours = {
            (h, p, t): n
            for h, p, t, n in conn.execute(
                select(hu.usage_hour, hu.provider, hu.file_type, hu.total_uploads)
                .where(hu.api_key_id == key, hu.usage_hour >= lo, hu.usage_hour < hi)
            )
        }
        ar, dr = api_requests.c, daily_request_usage.c
        want_req: dict[int, list[int]] = defaultdict(lambda: [0, 0, 0])
        for ms, status in conn.execute(
            select(ar.response_time_ms, ar.status_code)
            .where(ar.api_key_id == key, ar.requested_at >= lo, ar.requested_at < hi)
        ):
            a = want_req[latency_bucket(ms)]
            a[0] += 1
            a[1] += status >= 400
            a[2] += round(ms * 1000)
        got_req = {
            b: [n, e, us]
            for b, n, e, us in conn.execute(
                select(dr.latency_bucket, dr.total_requests, dr.error_requests,
                       dr.total_response_us).where(dr.api_key_id == key, dr.usage_date == day)
            )
        }
    assert got == dict(want), "daily_usage differs from the raw rows"
    assert got_hours == dict(want_hours), "hourly_usage differs from the raw rows"
    assert got_req == dict(want_req), "daily_request_usage differs from the raw rows"
    print(f"  rollups verified on a sample: {sum(v[0] for v in want.values())} uploads, "
          f"{sum(v[0] for v in want_req.values())} requests of one key-day")


# --- the raw-scan baseline ---------------------------------------------------------------------


def local_range(start: date, end: date, tz: str) -> tuple[datetime, datetime]:
    z = ZoneInfo(tz)
    lo = datetime(start.year, start.month, start.day, tzinfo=z).astimezone(UTC)
    e = end + timedelta(days=1)
    return lo, datetime(e.year, e.month, e.day, tzinfo=z).astimezone(UTC)


def period_of(local: datetime, start: date, granularity: str) -> str:
    day = local.date()
    if granularity == "hour":
        return local.isoformat()
    if granularity == "day":
        return day.isoformat()
    if granularity == "week":
        return max(start, day - timedelta(days=day.weekday())).isoformat()
    return max(start, day.replace(day=1)).isoformat()


def raw_answer(
    conn: Connection, dialect: str, key: uuid.UUID, start: date, end: date, tz: str,
    granularity: str,
) -> dict[str, Any]:
    """The /granular numbers from raw rows only (the scan rollups are there to avoid)."""
    lo, hi = local_range(start, end, tz)
    series: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    types: dict[str, int] = defaultdict(int)
    providers: dict[str, int] = defaultdict(int)
    totals = [0, 0, 0, 0]
    if dialect == "postgresql":
        trunc = {"hour": "hour", "day": "day", "week": "week", "month": "month"}[granularity]
        rows = conn.execute(text(
            f"SELECT date_trunc('{trunc}', uploaded_at AT TIME ZONE :tz), provider, file_type, "
            "count(*), sum(file_size), count(*) FILTER (WHERE upload_status = 'success') "
            "FROM file_uploads WHERE api_key_id = :k AND uploaded_at >= :lo AND uploaded_at < :hi "
            "GROUP BY 1, 2, 3"
        ), {"tz": tz, "k": key, "lo": lo, "hi": hi})
        z = ZoneInfo(tz)
        for local, provider, ft, n, size, ok in rows:
            label = (period_of(local.replace(tzinfo=z), start, granularity)
                     if granularity != "hour" else local.isoformat())
            _add(series, types, providers, totals, label, provider, ft, n, int(size), ok)
        req = conn.execute(text(
            "SELECT count(*), count(*) FILTER (WHERE status_code >= 400), avg(response_time_ms), "
            "percentile_disc(0.95) WITHIN GROUP (ORDER BY response_time_ms) FROM api_requests "
            "WHERE api_key_id = :k AND requested_at >= :lo AND requested_at < :hi"
        ), {"k": key, "lo": lo, "hi": hi}).one()
    else:
        z = ZoneInfo(tz)
        rows = conn.execute(text(
            "SELECT substr(uploaded_at, 1, 13), provider, file_type, count(*), sum(file_size), "
            "sum(upload_status = 'success') FROM file_uploads WHERE api_key_id = :k AND "
            "uploaded_at >= :lo AND uploaded_at < :hi GROUP BY 1, 2, 3"
        ), {"k": key.hex, "lo": _sqlite_ts(lo), "hi": _sqlite_ts(hi)})
        for hour, provider, ft, n, size, ok in rows:
            at = datetime.fromisoformat(hour + ":00:00+00:00").astimezone(z)
            label = (period_of(at, start, granularity) if granularity != "hour"
                     else at.replace(tzinfo=None).isoformat())
            _add(series, types, providers, totals, label, provider, ft, n, size, ok)
        args = {"k": key.hex, "lo": _sqlite_ts(lo), "hi": _sqlite_ts(hi)}
        n, errors, avg = conn.execute(text(
            "SELECT count(*), sum(status_code >= 400), avg(response_time_ms) FROM api_requests "
            "WHERE api_key_id = :k AND requested_at >= :lo AND requested_at < :hi"), args).one()
        p95 = conn.execute(text(
            "SELECT response_time_ms FROM api_requests WHERE api_key_id = :k AND requested_at "
            ">= :lo AND requested_at < :hi ORDER BY response_time_ms LIMIT 1 OFFSET :o"
        ), {**args, "o": max(0, -(-95 * n // 100) - 1)}).scalar()
        req = (n, errors or 0, avg, p95)
    return {"series": series, "types": types, "providers": providers, "totals": totals,
            "requests": req}


def _sqlite_ts(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


def _add(series: Any, types: Any, providers: Any, totals: list[int], label: str, provider: str,
         ft: str, n: int, size: int, ok: int) -> None:
    series[label][0] += n
    series[label][1] += size
    types[ft] += n
    providers[provider] += n
    totals[0] += n
    totals[1] += size
    totals[2] += ok
    totals[3] += n - ok


def check_same(body: dict[str, Any], raw: dict[str, Any], granularity: str) -> None:
    t = body["totals"]
    assert [t["uploads"], t["bytes"], t["successful"], t["failed"]] == raw["totals"], "totals"
    assert {f["file_type"]: f["uploads"] for f in body["file_types"]} == dict(raw["types"])
    assert {p["provider"]: p["uploads"] for p in body["providers"]} == dict(raw["providers"])
    if granularity != "hour":
        got = {e["period"]: [e["uploads"], e["bytes"]] for e in body["series"] if e["uploads"]}
        assert got == dict(raw["series"]), "series"
    n, errors, avg, p95 = raw["requests"]
    r = body["requests"]
    assert (r["total"], r["errors"]) == (n, errors), "requests"
    if n:
        assert abs(r["avg_response_ms"] - float(avg)) < 1e-3, "mean response time"
        assert abs(r["p95_response_ms"] - p95) <= 0.02 * p95 + 1e-6, "p95"


# --- timing ------------------------------------------------------------------------------------


def median_ms(fn: Callable[[], Any], runs: int) -> tuple[float, Any]:
    result = fn()  # warm-up (and the value to check)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times), result


Timer = Callable[[str, dict[str, str], int], tuple[httpx.Response, list[float]]]


def _timer(store: UsageStore) -> Timer:
    """Times a ``GET`` of a mounted all-keys router, in process."""
    router = UsageRouter(store, authorize=lambda request: ALL_KEYS)
    app = Starlette(routes=[Mount("/usage", router)])

    async def timed(
        path: str, params: dict[str, str], n: int
    ) -> tuple[httpx.Response, list[float]]:
        """A warm-up request, then ``n`` timed ones on the same client and event loop."""
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
            first = await client.get(path, params=params)
            assert first.status_code == 200, first.text
            times = []
            for _ in range(n):
                t0 = time.perf_counter()
                await client.get(path, params=params)
                times.append((time.perf_counter() - t0) * 1000)
        return first, times

    return lambda path, params, n: anyio.run(timed, path, params, n)


def run(
    store: UsageStore, label: str, runs: int, zones: list[str]
) -> dict[tuple[str, str], tuple[dict[str, Any], float]]:
    """Each query and zone through the router and as a raw scan; the router's answers and
    median milliseconds by (range name, zone)."""
    key = KEYS[0]  # the busiest key (keys are drawn with a squared-uniform skew)
    timed = _timer(store)
    answers: dict[tuple[str, str], tuple[dict[str, Any], float]] = {}

    with store.engine.connect() as conn:
        uploads = conn.execute(text(
            "SELECT count(*) FROM file_uploads WHERE api_key_id = :k"
        ), {"k": key if store.dialect == "postgresql" else key.hex}).scalar()
    print(f"\n{label}: key {key} has {uploads:,} uploads in 12 months; median of {runs} runs")
    print(f"{'range':<10} {'tz':<17} {'gran.':<6} {'/granular ms':>13} {'raw scan ms':>12} "
          f"{'raw/rollup':>11}")
    for name, start, end in QUERIES:
        for tz in zones:
            params = {"start": start.isoformat(), "end": end.isoformat(), "tz": tz,
                      "api_key_id": str(key)}
            first, times = timed("/usage/granular", params, runs)
            assert first.status_code == 200, first.text
            body = first.json()
            granularity = body["range"]["granularity"]
            api_ms = statistics.median(times)
            with store.engine.connect() as conn:
                if store.dialect == "postgresql":
                    conn.exec_driver_sql("SET jit = off")  # as the router's queries run
                raw_ms, raw = median_ms(
                    lambda conn=conn, start=start, end=end, tz=tz, g=granularity: raw_answer(
                        conn, store.dialect, key, start, end, tz, g), max(3, runs // 3))
            check_same(body, raw, granularity)
            print(f"{name:<10} {tz:<17} {granularity:<6} {api_ms:>13.1f} {raw_ms:>12.1f} "
                  f"{raw_ms / api_ms:>10.0f}x", flush=True)
            answers[name, tz] = (body, api_ms)
    return answers


def run_pruned(
    store: UsageStore,
    days: int,
    runs: int,
    zones: list[str],
    before: dict[tuple[str, str], tuple[dict[str, Any], float]],
    request_answers: dict[str, Any],
) -> None:
    """Delete the raw rows older than ``days`` before the data's end (what retention does;
    rollups kept), then time the same answers again and check each is unchanged."""
    cutoff = DATA_END - timedelta(days=days)
    with store.engine.begin() as conn:
        for table, column in (("file_uploads", "uploaded_at"), ("api_requests", "requested_at")):
            conn.execute(text(f"DELETE FROM {table} WHERE {column} < :c"), {"c": cutoff})
    with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("VACUUM ANALYZE file_uploads, api_requests")
        kept = conn.exec_driver_sql("SELECT count(*) FROM file_uploads").scalar()
    timed = _timer(store)
    print(f"\nraw rows older than {cutoff.date()} deleted ({kept:,} uploads kept); "
          f"the same answers, median of {runs} runs:")
    print(f"{'range':<10} {'tz':<17} {'before ms':>10} {'after ms':>9} {'x UTC':>6}  answer")
    for name, start, end in QUERIES:
        utc_ms = None
        for tz in zones:
            params = {"start": start.isoformat(), "end": end.isoformat(), "tz": tz,
                      "api_key_id": str(KEYS[0])}
            first, times = timed("/usage/granular", params, runs)
            assert first.status_code == 200, first.text
            body, before_ms = before[name, tz]
            same = first.json() == body
            assert same, f"{name} {tz}: the answer changed after raw rows were deleted"
            ms = statistics.median(times)
            utc_ms = ms if tz == "UTC" else utc_ms
            print(f"{name:<10} {tz:<17} {before_ms:>10.1f} {ms:>9.1f} "
                  f"{ms / (utc_ms or ms):>5.2f}x  unchanged", flush=True)
    query_requests.same_after_pruning(timed, KEYS[0], request_answers, ZONES)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=10_000_000, help="PostgreSQL file_uploads rows")
    parser.add_argument("--requests", type=int, default=10_000_000,
                        help="PostgreSQL api_requests rows, written through store.write")
    parser.add_argument("--sqlite-rows", type=int, default=1_000_000)
    parser.add_argument("--pg", default=os.environ.get(
        "USAGE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"))
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--skip-postgres", action="store_true")
    parser.add_argument("--skip-sqlite", action="store_true")
    parser.add_argument("--keep", metavar="NAME", help="PostgreSQL: build into database NAME "
                        "and keep it; a later run with the same NAME reuses it")
    parser.add_argument("--prune-days", type=int, default=30, metavar="N",
                        help="PostgreSQL: afterwards delete raw rows older than N days before "
                        "the data's end and check every answer is unchanged (0: skip; not with "
                        "--keep, which must stay whole)")
    args = parser.parse_args()

    if not args.skip_postgres:
        admin = create_engine(args.pg, isolation_level="AUTOCOMMIT")
        name = args.keep or f"um_bench_query_{uuid.uuid4().hex[:8]}"
        with admin.connect() as conn:
            exists = conn.execute(
                text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}
            ).scalar()
            if not exists:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
        url = make_url(args.pg).set(database=name)
        store = UsageStore(url)
        try:
            store.create_schema()  # idempotent: a kept database is upgraded in place
            with store.engine.connect() as conn:
                built = conn.execute(text("SELECT count(*) FROM file_uploads")).scalar()
            if built != args.rows:
                if built:
                    raise SystemExit(f"database {name} holds {built:,} rows, not {args.rows:,}")
                t0 = time.perf_counter()
                print(f"PostgreSQL: building {args.rows:,} uploads + {args.requests:,} requests")
                with store.engine.connect() as conn:
                    build_postgres(conn, args.rows)
                build_postgres_requests(store, args.requests)
                print(f"  built in {time.perf_counter() - t0:.0f} s")
            else:
                print(f"PostgreSQL: reusing database {name} ({built:,} uploads)")
            verify_rollups(store, KEYS[0])
            answers = run(
                store, f"PostgreSQL, {args.rows:,} file_uploads rows", args.runs, PG_ZONES
            )
            with store.engine.connect() as conn:
                requests = conn.execute(text("SELECT count(*) FROM api_requests")).scalar()
                print(f"\nPostgreSQL, {requests:,} api_requests rows; median of {args.runs} runs")
                query_requests.rollup_rows_of_a_busy_day(conn, KEYS[0])
            request_answers = query_requests.run_requests(
                store, _timer(store), KEYS[0], args.runs, ZONES
            )
            if args.prune_days and not args.keep:
                run_pruned(
                    store, args.prune_days, args.runs, PG_ZONES, answers, request_answers
                )
        finally:
            store.dispose()
            if not args.keep:
                with admin.connect() as conn:
                    conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            admin.dispose()

    if not args.skip_sqlite:
        with tempfile.TemporaryDirectory() as tmp:
            store = UsageStore(f"sqlite:///{tmp}/bench.db")
            try:
                store.create_schema()
                t0 = time.perf_counter()
                print(f"\nSQLite: building {args.sqlite_rows:,} uploads")
                with store.engine.connect() as conn:
                    build_sqlite(conn, args.sqlite_rows)
                print(f"  built in {time.perf_counter() - t0:.0f} s")
                verify_rollups(store, KEYS[0])
                run(store, f"SQLite, {args.sqlite_rows:,} file_uploads rows", args.runs, ZONES)
            finally:
                store.dispose()


if __name__ == "__main__":
    main()
