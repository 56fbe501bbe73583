"""Request analytics for ``benchmarks/query.py``: the request data set, written through the real
writer, and ``GET /requests``, ``GET /consumers`` and the first ``GET /failures`` page against
raw scans measured in the same run.

The requests: ``n`` rows over 2025 in time order (as live writes leave them), 50 keys with the
same skew as the uploads, 30 routes of an upload API with their own traffic share, status mix
and log-normal latency (medians from 4 ms to 900 ms), 1 % unmatched scanner paths and a few
non-standard methods. They are written with ``store.write`` in batches of 100,000: binary COPY
into staging, the raw rows and every rollup (request histograms, endpoint tiers) in one
transaction per batch, exactly as the recorder writes them.
"""

from __future__ import annotations

import statistics
import time
import uuid
from collections.abc import Callable
from datetime import date, datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
from sqlalchemy import Connection, text

from usage_middleware import RequestRecord, UsageStore
from usage_middleware._schema import ENDPOINT_RELATIVE_ERROR, STANDARD_METHODS

UTC = timezone.utc
BATCH = 100_000

# (method, route, traffic weight, median ms, 4xx share, 5xx share, request bytes, response bytes)
ROUTES = [
    ("POST", "/api/upload", 18, 180.0, 0.06, 0.010, 2_000_000, 400),
    ("POST", "/api/upload/multipart", 4, 900.0, 0.08, 0.020, 20_000_000, 500),
    ("GET", "/api/files", 12, 25.0, 0.01, 0.002, 200, 8_000),
    ("GET", "/api/files/{id}", 16, 12.0, 0.04, 0.002, 200, 1_200),
    ("GET", "/api/files/{id}/download", 9, 60.0, 0.03, 0.003, 200, 900_000),
    ("DELETE", "/api/files/{id}", 2, 20.0, 0.05, 0.002, 100, 100),
    ("PATCH", "/api/files/{id}", 1, 18.0, 0.07, 0.002, 400, 1_000),
    ("GET", "/api/files/{id}/thumbnail", 8, 35.0, 0.02, 0.004, 200, 40_000),
    ("POST", "/api/files/{id}/transform", 2, 450.0, 0.05, 0.015, 800, 60_000),
    ("GET", "/api/usage", 3, 40.0, 0.01, 0.002, 200, 3_000),
    ("GET", "/api/usage/daily", 1, 55.0, 0.01, 0.002, 200, 6_000),
    ("GET", "/api/keys", 1, 8.0, 0.02, 0.001, 200, 700),
    ("POST", "/api/keys", 0.3, 15.0, 0.10, 0.002, 300, 500),
    ("DELETE", "/api/keys/{id}", 0.1, 10.0, 0.05, 0.001, 100, 100),
    ("POST", "/api/auth/token", 3, 30.0, 0.12, 0.002, 300, 600),
    ("POST", "/api/auth/refresh", 2, 9.0, 0.09, 0.001, 300, 600),
    ("GET", "/api/health", 6, 1.5, 0.0, 0.001, 0, 20),
    ("GET", "/api/folders", 2, 22.0, 0.01, 0.002, 200, 4_000),
    ("POST", "/api/folders", 0.5, 25.0, 0.06, 0.002, 300, 500),
    ("GET", "/api/folders/{id}", 1.5, 18.0, 0.03, 0.002, 200, 3_000),
    ("PUT", "/api/folders/{id}", 0.3, 24.0, 0.06, 0.002, 400, 500),
    ("DELETE", "/api/folders/{id}", 0.2, 30.0, 0.05, 0.002, 100, 100),
    ("POST", "/api/webhooks", 0.2, 20.0, 0.08, 0.002, 500, 300),
    ("GET", "/api/webhooks", 0.4, 12.0, 0.01, 0.001, 200, 1_500),
    ("POST", "/api/webhooks/{id}/test", 0.1, 300.0, 0.10, 0.050, 200, 300),
    ("GET", "/api/search", 3, 120.0, 0.02, 0.004, 300, 12_000),
    ("POST", "/api/share", 1, 28.0, 0.04, 0.002, 300, 400),
    ("GET", "/s/{token}", 4, 14.0, 0.08, 0.002, 200, 300_000),
    ("OPTIONS", "/api/upload", 2, 0.8, 0.0, 0.0, 0, 0),
    ("HEAD", "/api/files/{id}", 1, 6.0, 0.05, 0.001, 0, 0),
]
CLIENT_ERRORS = [400, 401, 403, 404, 404, 409, 413, 422, 429]
SERVER_ERRORS = [500, 500, 502, 503, 504]
SCANNER_PATHS = ["/wp-login.php", "/.env", "/admin", "/phpmyadmin/index.php", "/.git/config"]
UNMATCHED_SHARE = 0.01
ODD_METHOD_SHARE = 0.001


def write_requests(store: UsageStore, n: int, keys: list[uuid.UUID], seed: int = 7) -> float:
    """``n`` requests of 2025 through ``store.write``, in time order; the seconds it took."""
    rng = np.random.default_rng(seed)
    weights = np.array([r[2] for r in ROUTES], dtype=float)
    weights /= weights.sum()
    year_start = datetime(2025, 1, 1, tzinfo=UTC).timestamp()
    year = 365 * 86400.0
    batches = max(1, -(-n // BATCH))
    spent = 0.0
    written = 0
    for b in range(batches):
        size = min(BATCH, n - written)
        at = np.sort(year_start + (b + rng.random(size)) * (year / batches))
        key_idx = (50 * rng.random(size) ** 2).astype(int)
        route_idx = rng.choice(len(ROUTES), size=size, p=weights)
        u = rng.random(size)
        noise = rng.standard_normal(size)
        scanner = rng.random(size) < UNMATCHED_SHARE
        odd = rng.random(size) < ODD_METHOD_SHARE
        picks = rng.integers(0, 1 << 30, size)
        records = []
        for i in range(size):
            method, route, _, median, c4, c5, req, resp = ROUTES[route_idx[i]]
            matched = not scanner[i]
            if not matched:
                method, route, status = "GET", SCANNER_PATHS[picks[i] % 5], 404
                ms = 2.0 * float(np.exp(0.5 * noise[i]))
            else:
                if u[i] < c5:
                    status = SERVER_ERRORS[picks[i] % len(SERVER_ERRORS)]
                    ms = 3 * median * float(np.exp(0.8 * noise[i]))
                elif u[i] < c5 + c4:
                    status = CLIENT_ERRORS[picks[i] % len(CLIENT_ERRORS)]
                    ms = 0.3 * median * float(np.exp(0.5 * noise[i]))
                else:
                    status = 201 if method == "POST" else 204 if method == "DELETE" else 200
                    ms = median * float(np.exp(0.6 * noise[i]))
                if odd[i]:
                    method = "PROPFIND"
            records.append(
                RequestRecord._unchecked(
                    method, route, status, round(ms, 3), int(req * (0.5 + u[i])),
                    int(resp * (1.5 - u[i])) if status < 400 else 120, keys[key_idx[i]],
                    "upstream timed out" if status >= 500 and picks[i] & 1 else None,
                    datetime.fromtimestamp(round(float(at[i]), 6), UTC), matched,
                )
            )  # fmt: skip
        t0 = time.perf_counter()
        store.write(records)
        spent += time.perf_counter() - t0
        written += size
        if (b + 1) % 10 == 0 or written == n:
            print(f"  api_requests: {written:,} rows ({written / spent:,.0f} rows/s in "
                  "store.write)", flush=True)  # fmt: skip
    # PostgreSQL writes live requests as raw rows and seals them into the rollups a quarter
    # hour later; a year loaded at once is sealed at once (counted in the time spent)
    t0 = time.perf_counter()
    sealed = store.seal()
    spent += time.perf_counter() - t0
    print(f"  sealed {sealed:,} requests into the rollups in {time.perf_counter() - t0:.0f} s")
    return spent


COVERING_INDEX = (
    "CREATE INDEX bench_requests_covering ON api_requests (api_key_id, requested_at) "
    "INCLUDE (method, path, route_matched, status_code, response_time_ms, request_size, "
    "response_size)"
)


def rollup_rows_of_a_busy_day(conn: Connection, key: uuid.UUID) -> None:
    """How many rows one busy key-day is in each request table."""
    day = date(2025, 6, 17)
    lo = datetime(2025, 6, 17, tzinfo=UTC)
    counts = {
        "api_requests (raw)": conn.execute(text(
            "SELECT count(*) FROM api_requests WHERE api_key_id = :k AND requested_at >= :lo "
            "AND requested_at < :hi"), {"k": key, "lo": lo, "hi": lo + timedelta(days=1)}),
        "daily_request_usage": conn.execute(text(
            "SELECT count(*) FROM daily_request_usage WHERE api_key_id = :k AND usage_date = :d"),
            {"k": key, "d": day}),
        "daily_endpoint_usage": conn.execute(text(
            "SELECT count(*) FROM daily_endpoint_usage WHERE api_key_id = :k AND usage_date = :d"),
            {"k": key, "d": day}),
        "quarter_endpoint_usage (96 quarters)": conn.execute(text(
            "SELECT count(*) FROM quarter_endpoint_usage WHERE api_key_id = :k AND "
            "usage_quarter >= :lo AND usage_quarter < :hi"),
            {"k": key, "lo": lo, "hi": lo + timedelta(days=1)}),
        "monthly_endpoint_usage (June)": conn.execute(text(
            "SELECT count(*) FROM monthly_endpoint_usage WHERE api_key_id = :k AND "
            "usage_month = :m"), {"k": key, "m": date(2025, 6, 1)}),
    }  # fmt: skip
    print(f"\nrows of the busiest key on {day}:")
    for name, result in counts.items():
        print(f"  {name:<38} {result.scalar():>8,}")


# --- raw scans: the answers computed from api_requests and file_uploads alone -----------------

_LABEL_SQL = (
    "CASE WHEN method IN ({}) THEN method ELSE 'OTHER' END".format(
        ", ".join(f"'{m}'" for m in sorted(STANDARD_METHODS))
    )
)
RAW_REQUESTS = f"""
SELECT m, r, s, local, GROUPING(m, r, s, local) AS g,
       count(*), count(*) FILTER (WHERE s >= 400), sum(round(ms * 1000))::bigint,
       sum(request_size), sum(response_size),
       percentile_disc(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY ms)
  FROM (SELECT {_LABEL_SQL} AS m,
               CASE WHEN route_matched THEN path ELSE '(unmatched)' END AS r,
               status_code AS s, response_time_ms AS ms, request_size, response_size,
               date_trunc(:trunc, requested_at AT TIME ZONE :tz) AS local
          FROM api_requests
         WHERE api_key_id = :k AND requested_at >= :lo AND requested_at < :hi) AS x
 GROUP BY GROUPING SETS ((m, r), (s), (local), ())
"""


def raw_requests(conn: Connection, key: uuid.UUID, lo: datetime, hi: datetime, tz: str,
                 granularity: str, start: date) -> dict[str, Any]:  # fmt: skip
    """The /requests numbers of one key from its raw rows (one scan, exact percentiles)."""
    out: dict[str, Any] = {"endpoints": {}, "statuses": {}, "series": {}, "totals": None}
    z = ZoneInfo(tz)
    rows = conn.execute(text(RAW_REQUESTS), {"trunc": granularity, "tz": tz, "k": key,
                                             "lo": lo, "hi": hi})  # fmt: skip
    for m, r, s, local, g, n, e, us, rq, rs, ps in rows:
        numbers = [n, e, int(us), int(rq), int(rs), *ps]
        if g == 0b0011:
            out["endpoints"][m, r] = numbers
        elif g == 0b1101:
            out["statuses"][s] = n
        elif g == 0b1110:
            label = _period_label(local.replace(tzinfo=z), start, granularity)
            out["series"][label] = numbers
        else:
            out["totals"] = numbers
    return out


def _period_label(local: datetime, start: date, granularity: str) -> str:
    if granularity == "hour":
        return local.isoformat()
    day = local.date()
    return max(start, day).isoformat()


def _near(got: float, exact: float) -> bool:
    return abs(got - exact) <= ENDPOINT_RELATIVE_ERROR * exact + 1e-6


def check_requests(body: dict[str, Any], raw: dict[str, Any]) -> None:
    """The router's /requests answer equals the raw scan: counts and sums exactly, averages to
    the rounding, percentiles within the sketch's error bound."""
    t = body["totals"]
    n, e, us, rq, rs, p50, p95, p99 = raw["totals"]
    assert [t["requests"], t["errors"], t["request_bytes"], t["response_bytes"]] == [n, e, rq, rs]
    assert abs(t["avg_response_ms"] - us / n / 1000) < 1e-3
    for q, exact in (("p50", p50), ("p95", p95), ("p99", p99)):
        assert _near(t[f"{q}_response_ms"], exact), (q, t[f"{q}_response_ms"], exact)
    got = {(x["method"], x["route"]): x for x in body["endpoints"]}
    assert set(got) == set(raw["endpoints"]), "endpoints"
    for k, (n, e, _, rq, rs, p50, _, p99) in raw["endpoints"].items():
        x = got[k]
        assert [x["requests"], x["errors"], x["request_bytes"], x["response_bytes"]] == [
            n, e, rq, rs
        ], k  # fmt: skip
        assert _near(x["p50_response_ms"], p50) and _near(x["p99_response_ms"], p99), k
    assert {x["status_code"]: x["requests"] for x in body["status_codes"]} == raw["statuses"]
    series = {x["period"]: x for x in body["series"] if x["requests"]}
    assert set(series) == set(raw["series"]), "series periods"
    for label, (n, e, _, _, _, _, p95, _) in raw["series"].items():
        assert [series[label]["requests"], series[label]["errors"]] == [n, e], label
        assert _near(series[label]["p95_response_ms"], p95), label


RAW_CONSUMERS = """
SELECT k, sum(u)::bigint, sum(b)::bigint, sum(f)::bigint, sum(n)::bigint, sum(e)::bigint, max(t)
  FROM (SELECT api_key_id AS k, count(*) AS u, sum(file_size) AS b,
               count(*) FILTER (WHERE upload_status <> 'success') AS f, 0 AS n, 0 AS e,
               max(uploaded_at) AS t
          FROM file_uploads WHERE uploaded_at >= :lo AND uploaded_at < :hi GROUP BY 1
        UNION ALL
        SELECT api_key_id, 0, 0, 0, count(*), count(*) FILTER (WHERE status_code >= 400),
               max(requested_at)
          FROM api_requests WHERE requested_at >= :lo AND requested_at < :hi GROUP BY 1) AS x
 GROUP BY k
"""


def check_consumers(body: dict[str, Any], raw: list[Any]) -> None:
    want = {
        str(k): [u, b, f, n, e, t.astimezone(UTC).isoformat()] for k, u, b, f, n, e, t in raw
    }
    got = {
        c["api_key_id"]: [c["uploads"], c["bytes"], c["failed_uploads"], c["requests"],
                          c["errors"], c["last_seen"]]
        for c in body["consumers"]
    }  # fmt: skip
    assert got == want, "consumers"


RAW_FAILURES = """
SELECT at, kind FROM (
    SELECT uploaded_at AS at, 'upload' AS kind, id FROM file_uploads
     WHERE api_key_id = :k AND upload_status = 'failed' AND uploaded_at >= :lo
       AND uploaded_at < :hi
    UNION ALL
    SELECT requested_at, 'request', id FROM api_requests
     WHERE api_key_id = :k AND (status_code >= 400 OR error_message IS NOT NULL)
       AND requested_at >= :lo AND requested_at < :hi) AS x
 ORDER BY at DESC, kind DESC, id DESC
"""


# --- timing ------------------------------------------------------------------------------------

Timer = Callable[[str, dict[str, str], int], tuple[Any, list[float]]]


def median_of(fn: Callable[[], Any], runs: int) -> tuple[float, Any]:
    result = fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times), result


def run_requests(
    store: UsageStore, timed: Timer, key: uuid.UUID, runs: int, zones: list[str]
) -> dict[str, Any]:
    """/requests (busiest key, 12 months), /consumers (every key, 12 months) and the first
    /failures page (busiest key), each against its raw scan; the answers, for the retention
    check."""
    answers: dict[str, Any] = {}
    start, end = date(2025, 1, 1), date(2025, 12, 31)
    print(f"\n{'answer':<34} {'tz':<17} {'router ms':>10} {'raw scan ms':>12} {'raw/router':>11}")
    for tz in zones:
        z = ZoneInfo(tz)
        lo = datetime(2025, 1, 1, tzinfo=z).astimezone(UTC)
        hi = datetime(2026, 1, 1, tzinfo=z).astimezone(UTC)
        params = {"start": str(start), "end": str(end), "tz": tz, "api_key_id": str(key)}
        first, times = timed("/usage/requests", params, runs)
        body = first.json()
        granularity = body["range"]["granularity"]
        with store.engine.connect() as conn:
            conn.exec_driver_sql("SET jit = off")
            scan = (conn, key, lo, hi, tz, granularity, start)
            raw_ms, raw = median_of(lambda scan=scan: raw_requests(*scan), max(3, runs // 5))
        check_requests(body, raw)
        ms = statistics.median(times)
        _row(f"/requests busiest key, {granularity}", tz, ms, raw_ms)
        answers[f"requests {tz}"] = body
    lo, hi = datetime(2025, 1, 1, tzinfo=UTC), datetime(2026, 1, 1, tzinfo=UTC)
    first, times = timed("/usage/consumers", {"start": str(start), "end": str(end)}, runs)
    with store.engine.connect() as conn:
        conn.exec_driver_sql("SET jit = off")
        raw_ms, raw = median_of(
            lambda: conn.execute(text(RAW_CONSUMERS), {"lo": lo, "hi": hi}).all(), 3
        )
    check_consumers(first.json(), raw)
    _row(f"/consumers all {len(raw)} keys", "UTC", statistics.median(times), raw_ms)
    answers["consumers"] = first.json()
    params = {"start": str(start), "end": str(end), "api_key_id": str(key), "limit": "50"}
    first, times = timed("/usage/failures", params, runs)
    with store.engine.connect() as conn:
        conn.exec_driver_sql("SET jit = off")
        raw_ms, raw = median_of(
            lambda: conn.execute(text(RAW_FAILURES), {"k": key, "lo": lo, "hi": hi}).all(), 3
        )
    page = [(x["at"], x["kind"]) for x in first.json()["items"]]
    assert page == [(t.astimezone(UTC).isoformat(), k) for t, k in raw[:50]], "failures"
    _row(f"/failures first page ({len(raw):,} in all)", "UTC", statistics.median(times), raw_ms)
    return answers


def _row(name: str, tz: str, ms: float, raw_ms: float) -> None:
    print(f"{name:<34} {tz:<17} {ms:>10.1f} {raw_ms:>12.1f} {raw_ms / ms:>10.0f}x", flush=True)


def same_after_pruning(timed: Timer, key: uuid.UUID, answers: dict[str, Any],
                       zones: list[str]) -> None:  # fmt: skip
    """After raw rows were pruned, /requests and /consumers answer exactly as before."""
    start, end = "2025-01-01", "2025-12-31"
    for tz in zones:
        params = {"start": start, "end": end, "tz": tz, "api_key_id": str(key)}
        first, times = timed("/usage/requests", params, 5)
        assert first.json() == answers[f"requests {tz}"], f"/requests {tz} changed"
        print(f"/requests {tz:<17} {statistics.median(times):>8.1f} ms  unchanged")
    first, times = timed("/usage/consumers", {"start": start, "end": end}, 5)
    assert first.json() == answers["consumers"], "/consumers changed"
    print(f"/consumers {'UTC':<16} {statistics.median(times):>8.1f} ms  unchanged")

