"""Retention benchmark (PostgreSQL): dropping a month partition of N raw rows vs DELETE of the
same rows, ``maintain`` on an up-to-date database, and the lock converting an unpartitioned
install of N rows takes.

    .venv/bin/python benchmarks/retention.py [--rows 1000000] [--pg postgresql+psycopg://postgres@127.0.0.1:5432/postgres]

Raw rows are generated inside the server (``INSERT .. SELECT .. generate_series``) into a past
month's partition. The DELETE runs in a transaction that is then rolled back, so the DROP that
follows removes the very same rows; the DELETE's figure leaves out the VACUUM its dead rows
would need later, which a DROP never does. Everything runs in throwaway databases.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from support.pg import create_database, drop_database  # noqa: E402

from usage_middleware import UploadRecord, UsageStore  # noqa: E402
from usage_middleware._maintain import maintain  # noqa: E402
from usage_middleware._storage.maintenance import prepare_pg_upgrade  # noqa: E402
from usage_middleware._store import sql_text  # noqa: E402

UTC = timezone.utc
OLD_SCHEMA = ROOT / "tests" / "support" / "schema_0_1_0.sql"

FILL = """
INSERT INTO public.file_uploads (id, api_key_id, provider, file_type, file_size, upload_status,
                                 uploaded_at)
SELECT gen_random_uuid(), NULL, 's3', 'image/png', i, 'success',
       %(start)s::timestamptz + (i * %(step)s::float8) * interval '1 second'
  FROM generate_series(0, %(rows)s - 1) AS i
"""


def _dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _seconds(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def drop_vs_delete(url: str, rows: int) -> tuple[float, float, float]:
    """Seconds to fill, to DELETE a month of ``rows`` rows (rolled back), to DROP its partition."""
    store = UsageStore(url)
    now = datetime.now(UTC)
    month = datetime(now.year - 1, now.month, 1, tzinfo=UTC)
    # One row gives the month its partition (maintain moves it out of the default partition).
    store.write([UploadRecord(provider="s3", file_size=1, uploaded_at=month)])
    maintain(store)
    store.dispose()
    part = f"file_uploads_p{month:%Y_%m}"
    step = 27 * 86400 / rows
    with psycopg.connect(_dsn(url), autocommit=True) as conn:
        fill = _seconds(lambda: conn.execute(FILL, {"start": month, "step": step, "rows": rows}))
        conn.execute(f"VACUUM ANALYZE {part}")
        with conn.transaction(force_rollback=True):
            delete = _seconds(
                lambda: conn.execute(
                    "DELETE FROM public.file_uploads WHERE uploaded_at >= %s AND uploaded_at < %s",
                    (month, month + timedelta(days=28)),
                )
            )
        count = conn.execute(f"SELECT count(*) FROM {part}").fetchone()
        assert count is not None and count[0] == rows + 1
        drop = _seconds(lambda: conn.execute(f"DROP TABLE public.{part}"))
    return fill, delete, drop


def maintain_up_to_date(url: str) -> tuple[float, float]:
    """Median seconds of maintain() on an up-to-date database, in a running process and from a
    fresh store (what ``usage-middleware maintain URL`` does: create_schema() first)."""
    store = UsageStore(url)
    store.create_schema()
    warm = [_seconds(lambda: maintain(store, raw_retention_days=365)) for _ in range(7)]
    store.dispose()
    cold = []
    for _ in range(3):
        fresh = UsageStore(url)
        cold.append(_seconds(lambda: maintain(fresh, raw_retention_days=365)))  # noqa: B023
        fresh.dispose()
    return statistics.median(warm), statistics.median(cold)


def conversion(url: str, rows: int) -> tuple[float, float]:
    """Seconds of the concurrent index build (writers unblocked) and of the converting
    transaction (writers wait) for an unpartitioned install of ``rows`` uploads."""
    with psycopg.connect(_dsn(url), autocommit=True) as conn:
        conn.execute(OLD_SCHEMA.read_text("utf-8"))
        start = datetime.now(UTC) - timedelta(days=300)
        conn.execute(FILL, {"start": start, "step": 299 * 86400 / rows, "rows": rows})
        conn.execute("VACUUM ANALYZE public.file_uploads")
    store = UsageStore(url)
    prepare = _seconds(lambda: prepare_pg_upgrade(store.engine))
    with psycopg.connect(_dsn(url)) as conn:
        locked = _seconds(
            lambda: (
                conn.execute("SELECT pg_advisory_xact_lock(7215120301)"),
                conn.execute(sql_text("usage_tracking_schema.sql")),
                conn.commit(),
            )
        )
        kind = conn.execute("SELECT relkind FROM pg_class WHERE relname = 'file_uploads'")
        row = kind.fetchone()
        assert row is not None and row[0] == "p"
    store.dispose()
    return prepare, locked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--pg", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args()

    url = create_database(args.pg, "um_bench_")
    try:
        fill, delete, drop = drop_vs_delete(url, args.rows)
        warm, cold = maintain_up_to_date(url)
    finally:
        drop_database(args.pg, url)
    url = create_database(args.pg, "um_bench_")
    try:
        prepare, locked = conversion(url, args.rows)
    finally:
        drop_database(args.pg, url)

    print(f"PostgreSQL, one month of {args.rows:,} file_uploads rows (filled in {fill:.1f} s)")
    print("| operation | seconds |")
    print("|---|---|")
    print(f"| DELETE of the month's rows (one statement) | {delete:.3f} |")
    print(f"| DROP of the month's partition | {drop:.4f} |")
    print(f"| ratio DELETE / DROP | {delete / drop:,.1f}x |")
    print(f"| maintain(), up to date, running store (median of 7) | {warm:.4f} |")
    print(f"| maintain() from a fresh store, create_schema() included (median of 3) | {cold:.3f} |")
    print(f"| conversion of {args.rows:,} rows: concurrent index build (no lock) | {prepare:.2f} |")
    print(f"| conversion of {args.rows:,} rows: schema transaction (writers wait) | {locked:.3f} |")


if __name__ == "__main__":
    main()
