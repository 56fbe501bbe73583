"""Legacy migration: per-provider totals preserved, nothing invented, idempotent, configurable."""

from __future__ import annotations

import uuid
from collections import defaultdict
from datetime import date, datetime, timezone
from typing import Any

import psycopg
import pytest
from sqlalchemy import select, text
from sqlalchemy.engine import make_url

from usage_middleware import ConfigurationError, UploadRecord, UsageStore
from usage_middleware._cli import main
from usage_middleware._migrate import LegacySource, migrate_legacy_usage
from usage_middleware._schema import daily_usage, hourly_usage, quarter_usage
from usage_middleware._store import sql_text

UTC = timezone.utc
KEY = uuid.UUID("7b552349-b647-4928-b3fb-2b5f1790a415")
LEGACY = [
    # provider, api_key_id, total_uploads, total_size, updated_at
    ("vercel", None, 120, 125_829_120, "2025-09-05 10:30:00+00:00"),
    ("vercel", str(KEY), 15, 15_728_640, "2025-09-05 23:59:00+00:00"),
    ("s3", None, 7, 700, "2025-09-06 01:30:00+02:00"),  # 2025-09-05 23:30 UTC
    ("cloudinary", None, 0, 0, "2025-09-01 00:00:00+00:00"),  # empty: skipped
    ("s3", None, 3, 30, "2025-09-05 12:00:00+00:00"),  # same key as the row above: summed
]


def _create_legacy(store: UsageStore, table: str = "provider_usage", **names: str) -> None:
    cols = {
        "provider": "provider",
        "api_key_id": "api_key_id",
        "total_uploads": "total_uploads",
        "total_size": "total_size",
        "updated_at": "updated_at",
        **names,
    }
    pg = store.dialect == "postgresql"
    types = {
        "provider": "text",
        "api_key_id": "uuid" if pg else "text",
        "total_uploads": "bigint",
        "total_size": "bigint",
        "updated_at": "timestamptz" if pg else "text",
    }
    with store.engine.begin() as conn:
        columns = ", ".join(f"{cols[c]} {types[c]}" for c in types)
        conn.execute(text(f"CREATE TABLE {table} ({columns})"))
        conn.execute(
            text(
                f"INSERT INTO {table} ({', '.join(cols.values())}) "
                "VALUES (:provider, :api_key_id, :total_uploads, :total_size, :updated_at)"
            ),
            [dict(zip(types, row, strict=True)) for row in LEGACY],
        )


def _rollup(store: UsageStore, table: Any) -> dict[tuple[Any, ...], tuple[int, ...]]:
    names = {"daily_usage": "usage_date", "hourly_usage": "usage_hour"}
    when = table.c[names.get(table.name, "usage_quarter")]
    with store.engine.connect() as conn:
        return {
            (r.api_key_id, r._mapping[when], r.provider, r.file_type): (
                r.total_uploads,
                r.total_file_size,
                r.successful_requests,
                r.failed_requests,
            )
            for r in conn.execute(select(table))
        }


def _provider_totals(store: UsageStore) -> dict[str, tuple[int, int]]:
    out: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for (_k, _d, provider, _t), (n, size, _ok, _failed) in _rollup(store, daily_usage).items():
        out[provider][0] += n
        out[provider][1] += size
    return {p: (v[0], v[1]) for p, v in out.items()}


EXPECTED_DAILY = {
    (None, date(2025, 9, 5), "vercel", "unknown"): (120, 125_829_120, 120, 0),
    (KEY, date(2025, 9, 5), "vercel", "unknown"): (15, 15_728_640, 15, 0),
    (None, date(2025, 9, 5), "s3", "unknown"): (10, 730, 10, 0),
}


def test_migration_moves_totals_once(db_url: str) -> None:
    """Legacy totals land on their UTC date as 'unknown' type, in daily, hourly and quarter-hour;
    twice = once."""
    store = UsageStore(db_url)
    try:
        store.create_schema()
        live = UploadRecord(
            provider="vercel",
            file_type="image/png",
            file_size=5,
            uploaded_at=datetime(2025, 9, 7, 8, tzinfo=UTC),
        )
        store.write([live])
        _create_legacy(store)
        first = migrate_legacy_usage(store)
        assert not first.already_migrated
        assert (first.legacy_rows, first.total_uploads, first.total_file_size) == (
            4,
            145,
            141_558_490,
        )
        daily = _rollup(store, daily_usage)
        assert {k: v for k, v in daily.items() if k[3] == "unknown"} == EXPECTED_DAILY
        hourly = _rollup(store, hourly_usage)
        assert {k: v for k, v in hourly.items() if k[3] == "unknown"} == {
            (k[0], datetime.combine(k[1], datetime.min.time(), UTC), k[2], k[3]): v
            for k, v in EXPECTED_DAILY.items()
        }
        quarter = _rollup(store, quarter_usage)
        assert {k: v for k, v in quarter.items() if k[3] == "unknown"} == {
            k: v for k, v in hourly.items() if k[3] == "unknown"
        }
        totals = _provider_totals(store)
        assert totals == {"vercel": (136, 141_557_765), "s3": (10, 730)}

        second = migrate_legacy_usage(store)
        assert second.already_migrated
        assert second.migrated_at == first.migrated_at
        assert _rollup(store, daily_usage) == daily
        assert _rollup(store, hourly_usage) == hourly
        assert _rollup(store, quarter_usage) == quarter
    finally:
        store.dispose()


def test_cli_with_renamed_table_and_columns(
    db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`usage-middleware migrate` reads a differently named legacy table and columns."""
    store = UsageStore(db_url)
    try:
        store.create_schema()
        _create_legacy(
            store,
            "storage_stats",
            provider="storage_provider",
            total_uploads="file_count",
            total_size="bytes_used",
            updated_at="last_upload_at",
            api_key_id="key_id",
        )
        args = [
            "migrate",
            db_url,
            "--table",
            "storage_stats",
            "--provider-column",
            "storage_provider",
            "--uploads-column",
            "file_count",
            "--bytes-column",
            "bytes_used",
            "--date-column",
            "last_upload_at",
            "--api-key-column",
            "key_id",
        ]
        assert main(args) == 0
        assert "storage_stats migrated" in capsys.readouterr().out
        assert _rollup(store, daily_usage) == EXPECTED_DAILY
        assert main(args) == 0
        assert "already migrated" in capsys.readouterr().out
        assert _rollup(store, daily_usage) == EXPECTED_DAILY
    finally:
        store.dispose()


def test_table_without_key_column(db_url: str) -> None:
    """With api_key_column=None every legacy total is stored without an API key."""
    store = UsageStore(db_url)
    try:
        store.create_schema()
        _create_legacy(store)
        migrate_legacy_usage(store, LegacySource(api_key_column=None))
        daily = _rollup(store, daily_usage)
        assert {k[0] for k in daily} == {None}
        assert daily[(None, date(2025, 9, 5), "vercel", "unknown")] == (135, 141_557_760, 135, 0)
    finally:
        store.dispose()


def test_missing_legacy_table_is_a_clear_error(
    db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A legacy table that does not exist raises ConfigurationError naming the option to set."""
    store = UsageStore(db_url)
    try:
        with pytest.raises(ConfigurationError, match="table"):
            migrate_legacy_usage(store, LegacySource(table="no_such_table"))
        with pytest.raises(SystemExit) as refused:
            main(["migrate", db_url, "--table", "no_such_table"])
        assert refused.value.code == 2
        assert "--table" in capsys.readouterr().err
        with pytest.raises(ConfigurationError, match="table"):
            LegacySource(table="x; DROP TABLE daily_usage")
    finally:
        store.dispose()


@pytest.mark.postgres
def test_sql_file_and_python_give_the_same_result(pg_url: str, sqlite_url: str) -> None:
    """The SQL file run by hand, the Python migration, and SQLite's version agree exactly."""
    by_file = UsageStore(pg_url)
    lite = UsageStore(sqlite_url)
    try:
        by_file.create_schema()
        _create_legacy(by_file)
        dsn = make_url(pg_url).set(drivername="postgresql").render_as_string(hide_password=False)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(sql_text("migrate_existing_usage_data.sql"))
            conn.execute(sql_text("migrate_existing_usage_data.sql"))
        assert migrate_legacy_usage(by_file).already_migrated
        lite.create_schema()
        _create_legacy(lite)
        migrate_legacy_usage(lite)
        assert _rollup(by_file, daily_usage) == _rollup(lite, daily_usage) == EXPECTED_DAILY
        assert _rollup(by_file, hourly_usage) == _rollup(lite, hourly_usage)
        assert _rollup(by_file, quarter_usage) == _rollup(lite, quarter_usage)
    finally:
        by_file.dispose()
        lite.dispose()
