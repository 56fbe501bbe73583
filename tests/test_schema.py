"""The schema: identical tables and columns on SQLite and PostgreSQL, idempotent creation."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import inspect
from sqlalchemy.engine import make_url
from support.rollups import SEALED

from usage_middleware import UsageStore
from usage_middleware._schema import ALL_TABLES
from usage_middleware._storage.base import Scope
from usage_middleware._store import sql_text

SQL_FILES = ("usage_tracking_schema.sql", "supabase_rls.sql", "migrate_existing_usage_data.sql")


# PostgreSQL's monthly, default and legacy partitions of the raw tables are tables too.
_PARTITION = re.compile(r"^(file_uploads|api_requests)_(p\d{4}_\d{2}|default|legacy)$")


def _columns(store: UsageStore) -> dict[str, dict[str, bool]]:
    with store.engine.connect() as conn:
        insp = inspect(conn)
        return {
            table: {c["name"]: bool(c["nullable"]) for c in insp.get_columns(table)}
            for table in insp.get_table_names()
            if not _PARTITION.match(table)
        }


def _older_install(store: UsageStore, conn: Any) -> None:
    """Make ``store``'s database what an install from before sealed request rollups holds:
    every stored request rolled up, and no ``rollup_seals``."""
    if store.dialect in SEALED:
        store.seal(datetime(2200, 1, 1, tzinfo=timezone.utc))
        conn.exec_driver_sql("DROP TABLE rollup_seals")


@pytest.mark.postgres
def test_sqlite_and_postgres_schemas_have_the_same_tables_and_columns(
    sqlite_url: str, pg_url: str
) -> None:
    """Both dialects get the same seven tables with the same columns and nullability."""
    stores = [UsageStore(sqlite_url), UsageStore(pg_url)]
    try:
        for s in stores:
            s.create_schema()
        lite, pg = (_columns(s) for s in stores)
    finally:
        for s in stores:
            s.dispose()
    assert set(lite) == set(pg) == {*ALL_TABLES, "usage_retention", "rollup_seals"}
    assert lite == pg


def test_create_schema_is_idempotent(db_url: str) -> None:
    """create_schema() can run any number of times, and has_schema() sees the result."""
    store = UsageStore(db_url)
    try:
        assert not store.has_schema()
        store.create_schema()
        store.create_schema()
        assert store.has_schema()
        assert UsageStore(db_url).write([]) == 0
    finally:
        store.dispose()


@pytest.mark.postgres
def test_schema_file_runs_twice_on_plain_postgres(pg_url: str) -> None:
    """The shipped schema file runs twice as plain SQL, as a user would paste it."""
    dsn = make_url(pg_url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql_text("usage_tracking_schema.sql"))
        conn.execute(sql_text("usage_tracking_schema.sql"))
        rows = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        names = {r[0] for r in rows}
    assert set(ALL_TABLES) <= names


@pytest.mark.postgres
def test_rerun_gives_an_older_install_the_covering_constraints(pg_url: str) -> None:
    """Re-running the schema file rebuilds a rollup's plain unique constraint with its INCLUDE
    columns, keeps its rows and upserts, and leaves it alone on the next run."""
    dsn = make_url(pg_url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql_text("usage_tracking_schema.sql"))
        conn.execute(
            "ALTER TABLE daily_usage DROP CONSTRAINT uq_daily_usage, ADD CONSTRAINT uq_daily_usage"
            " UNIQUE NULLS NOT DISTINCT (api_key_id, usage_date, provider, file_type)"
        )
        conn.execute(
            "INSERT INTO daily_usage (usage_date, provider, file_type, total_uploads) "
            "VALUES ('2025-01-01', 's3', 'image/png', 2)"
        )
        conn.execute(sql_text("usage_tracking_schema.sql"))
        definition = (
            "SELECT pg_get_constraintdef(oid), conindid FROM pg_constraint WHERE conname = %s"
        )
        row = conn.execute(definition, ("uq_daily_usage",)).fetchone()
        assert row is not None
        rebuilt, index = row
        assert rebuilt.endswith(
            "INCLUDE (total_uploads, total_file_size, successful_requests, failed_requests)"
        )
        conn.execute(
            "INSERT INTO daily_usage AS t (usage_date, provider, file_type, total_uploads) "
            "VALUES ('2025-01-01', 's3', 'image/png', 3) ON CONFLICT ON CONSTRAINT uq_daily_usage "
            "DO UPDATE SET total_uploads = t.total_uploads + EXCLUDED.total_uploads"
        )
        assert conn.execute("SELECT total_uploads FROM daily_usage").fetchall() == [(5,)]
        conn.execute(sql_text("usage_tracking_schema.sql"))
        assert conn.execute(definition, ("uq_daily_usage",)).fetchone() == (rebuilt, index)


def test_sql_files_ship_inside_the_package() -> None:
    """The sql/ files are package data and match the repository's sql/ directory."""
    repo_sql = Path(__file__).resolve().parent.parent / "sql"
    for name in SQL_FILES:
        shipped = sql_text(name)
        assert "public." in shipped
        assert shipped == (repo_sql / name).read_text("utf-8")


def test_rerun_adds_and_fills_the_monthly_request_rollup_of_an_older_install(db_url: str) -> None:
    """An install from before ``monthly_request_usage`` gets the table on the next
    ``create_schema()``, filled from ``daily_request_usage``, so every rollup stays exact."""
    import random

    from support.rollups import assert_rollups_exact, random_request, random_upload

    rng = random.Random(11)
    store = UsageStore(db_url)
    store.create_schema()
    store.write(
        [random_request(rng, spread_hours=2000) for _ in range(300)]
        + [random_upload(rng) for _ in range(20)]
    )
    with store.engine.begin() as conn:
        _older_install(store, conn)
        conn.exec_driver_sql("DROP TABLE monthly_request_usage")
    store.dispose()

    upgraded = UsageStore(db_url)
    upgraded.create_schema()
    upgraded.write([random_request(rng, spread_hours=2000) for _ in range(100)])
    with upgraded.engine.connect() as conn:
        months = conn.exec_driver_sql(
            "SELECT count(DISTINCT usage_month) FROM monthly_request_usage"
        )
        assert months.scalar() >= 3
    assert_rollups_exact(upgraded)
    upgraded.create_schema()  # a second run leaves the filled table alone
    assert_rollups_exact(upgraded)
    upgraded.dispose()


def test_rerun_adds_and_fills_the_quarter_hour_rollups_of_an_older_install(db_url: str) -> None:
    """An install from before the quarter-hour rollups gets them on the next ``create_schema()``,
    filled from the raw rows and the hourly rollups (a migrated total without raw rows lands on
    its hour's first quarter), so every rollup stays exact and later writes add to them."""
    import random
    import uuid
    from datetime import datetime, timezone

    from sqlalchemy import insert
    from support.rollups import (
        assert_rollups_exact,
        expected_rollups,
        random_request,
        random_upload,
        stored_rollups,
    )

    from usage_middleware._schema import daily_usage, hourly_usage

    rng = random.Random(12)
    store = UsageStore(db_url)
    store.create_schema()
    store.write(
        [random_request(rng, spread_hours=300) for _ in range(300)]
        + [random_upload(rng, spread_hours=300) for _ in range(300)]
    )
    store.seal(datetime(2200, 1, 1, tzinfo=timezone.utc))  # PostgreSQL: every request rolled up
    expected = expected_rollups(store)
    legacy_key = uuid.UUID(int=99, version=4)
    at = datetime(2025, 9, 3, tzinfo=timezone.utc)
    legacy = {"api_key_id": legacy_key, "provider": "s3", "file_type": "unknown"}
    counts = {"total_uploads": 7, "total_file_size": 70, "successful_requests": 7}
    with store.engine.begin() as conn:
        _older_install(store, conn)
        conn.execute(insert(daily_usage), [{**legacy, **counts, "usage_date": at.date()}])
        conn.execute(insert(hourly_usage), [{**legacy, **counts, "usage_hour": at}])
        conn.exec_driver_sql("DROP TABLE quarter_usage")
        conn.exec_driver_sql("DROP TABLE quarter_request_usage")
    store.dispose()

    upgraded = UsageStore(db_url)
    upgraded.create_schema()
    stored = stored_rollups(upgraded)
    assert stored["quarter_usage"].pop((legacy_key, at, "s3", "unknown")) == (7, 70, 7, 0)
    assert len(expected["quarter_usage"]) > 250
    assert {k[1].minute for k in expected["quarter_request_usage"]} == {0, 15, 30, 45}
    for name in ("quarter_usage", "quarter_request_usage"):
        assert stored[name] == expected[name]
    with upgraded.engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM daily_usage WHERE file_type = 'unknown'")
        conn.exec_driver_sql("DELETE FROM hourly_usage WHERE file_type = 'unknown'")
        conn.exec_driver_sql("DELETE FROM quarter_usage WHERE file_type = 'unknown'")
    upgraded.write(
        [random_request(rng, spread_hours=300) for _ in range(100)]
        + [random_upload(rng, spread_hours=300) for _ in range(100)]
    )
    assert_rollups_exact(upgraded)
    upgraded.create_schema()  # a second run leaves the filled tables alone
    assert_rollups_exact(upgraded)
    upgraded.dispose()


@pytest.mark.postgres
def test_rerun_replaces_the_hourly_time_indexes(pg_url: str) -> None:
    """Older installs had time indexes on the hourly rollups' plain hour (BRIN, before that
    btree); a re-run drops them for btrees on the UTC hour that only all-keys reads use."""
    store = UsageStore(pg_url)
    store.create_schema()
    with store.engine.begin() as conn:
        conn.exec_driver_sql("DROP INDEX idx_hourly_usage_utc_hour")
        conn.exec_driver_sql(
            "CREATE INDEX idx_hourly_usage_usage_hour ON hourly_usage USING brin (usage_hour)"
        )
        conn.exec_driver_sql(
            "CREATE INDEX idx_hourly_request_usage_usage_hour ON hourly_request_usage (usage_hour)"
        )
    store.create_schema()
    with store.engine.connect() as conn:
        kinds = dict(
            conn.exec_driver_sql(
                "SELECT c.relname, a.amname || ' ' || pg_get_indexdef(c.oid, 1, true)"
                "  FROM pg_class c JOIN pg_am a ON a.oid = c.relam JOIN pg_index i"
                "    ON i.indexrelid = c.oid"
                " WHERE i.indrelid IN ('hourly_usage'::regclass, 'hourly_request_usage'::regclass)"
                "   AND NOT i.indisunique"
            ).all()
        )
    assert kinds == {
        "idx_hourly_usage_utc_hour": "btree ((usage_hour AT TIME ZONE 'UTC'::text))",
        "idx_hourly_request_usage_utc_hour": "btree ((usage_hour AT TIME ZONE 'UTC'::text))",
    }
    store.dispose()


def _request_indexes(store: UsageStore) -> dict[str, list[str]]:
    """``api_requests``' indexes on SQLite and their columns, partial ones left out."""
    with store.engine.connect() as conn:
        return {
            i["name"]: list(i["column_names"])
            for i in inspect(conn).get_indexes("api_requests")
            if "failed" not in i["name"]
        }


def test_sqlite_requests_have_one_time_first_index_and_an_older_file_gets_it(
    sqlite_url: str,
) -> None:
    """SQLite's ``api_requests`` has one secondary index besides the failures' partial ones,
    ``(requested_at, api_key_id)``; a file from an older release, with ``(api_key_id,
    requested_at)`` and ``(requested_at)``, gets it in their place on the next
    ``create_schema()``, and reads answer as before."""
    import random

    from support.rollups import random_request

    store = UsageStore(sqlite_url)
    store.create_schema()
    assert _request_indexes(store) == {"idx_api_requests_time_key": ["requested_at", "api_key_id"]}
    rng = random.Random(5)
    store.write([random_request(rng, spread_hours=30) for _ in range(200)])
    start = datetime(2000, 1, 1, tzinfo=timezone.utc)
    end = datetime(2100, 1, 1, tzinfo=timezone.utc)
    before = sorted(store.backend.consumer_rows(Scope(), start, end), key=str)
    with store.engine.begin() as conn:
        conn.exec_driver_sql("DROP INDEX idx_api_requests_time_key")
        conn.exec_driver_sql(
            "CREATE INDEX idx_api_requests_key_time ON api_requests (api_key_id, requested_at)"
        )
        conn.exec_driver_sql("CREATE INDEX idx_api_requests_time ON api_requests (requested_at)")
    store.dispose()

    upgraded = UsageStore(sqlite_url)
    upgraded.create_schema()
    assert _request_indexes(upgraded) == {
        "idx_api_requests_time_key": ["requested_at", "api_key_id"]
    }
    assert sorted(upgraded.backend.consumer_rows(Scope(), start, end), key=str) == before
    upgraded.dispose()


def test_rerun_adds_and_fills_the_endpoint_rollups_of_an_older_install(db_url: str) -> None:
    """An install from before the endpoint rollups (no ``route_matched`` column, no endpoint
    tables; on PostgreSQL some rows in the default partition) gets them on the next
    ``create_schema()``: every stored request counts as a matched route, the tables equal a
    rebuild from the raw rows (the cap applied per key-day in route order), and later writes
    add to them by the rule."""
    import random
    from datetime import datetime, timedelta, timezone

    from support.endpoints import EndpointReference, rebuilt_endpoints, stored_endpoints
    from support.rollups import assert_rollups_exact, random_request

    from usage_middleware import RequestRecord
    from usage_middleware._schema import ROUTES_PER_KEY_DAY, api_requests

    rng = random.Random(14)
    day = datetime(2025, 9, 2, 9, tzinfo=timezone.utc)
    crowded = [
        RequestRecord(path=f"/r/{i}", api_key_id=None, requested_at=day + timedelta(seconds=i))
        for i in range(ROUTES_PER_KEY_DAY + 40)
    ]
    far = [RequestRecord(path="/later", requested_at=datetime(2150, 1, 1, tzinfo=timezone.utc))]
    store = UsageStore(db_url)
    store.create_schema()
    store.write([random_request(rng, spread_hours=900) for _ in range(400)] + crowded + far)
    with store.engine.begin() as conn:
        _older_install(store, conn)
        for table in (
            "endpoint_routes",
            "monthly_endpoint_usage",
            "daily_endpoint_usage",
            "quarter_endpoint_usage",
        ):
            conn.exec_driver_sql(f"DROP TABLE {table}")
        conn.exec_driver_sql("ALTER TABLE api_requests DROP COLUMN route_matched")
        if store.dialect == "postgresql":
            assert conn.exec_driver_sql("SELECT count(*) FROM api_requests_default").scalar()
    store.dispose()  # fmt: skip

    upgraded = UsageStore(db_url)
    upgraded.create_schema()
    # PostgreSQL: the upgrade leaves the coarse tiers holding the requests before the UTC
    # midnight before the newest one (its hour instant); a seal past it rolls that day in too
    assert_rollups_exact(upgraded)
    upgraded.seal(datetime(2200, 1, 1, tzinfo=timezone.utc))
    with upgraded.engine.connect() as conn:
        raw = [dict(r) for r in conn.execute(api_requests.select()).mappings()]
        if upgraded.dialect == "postgresql":  # the parent and every partition have the column
            columns = conn.exec_driver_sql(
                "SELECT count(*), bool_and(a.attnotnull), "
                "bool_and(pg_get_expr(d.adbin, d.adrelid) = 'true') "
                "FROM pg_attribute a JOIN pg_attrdef d ON (d.adrelid, d.adnum) = (a.attrelid, "
                "a.attnum) WHERE a.attname = 'route_matched' AND a.attrelid IN ("
                "SELECT 'api_requests'::regclass UNION ALL SELECT inhrelid FROM pg_inherits "
                "WHERE inhparent = 'api_requests'::regclass)"
            ).one()
            partitions = conn.exec_driver_sql(
                "SELECT count(*) FROM pg_inherits WHERE inhparent = 'api_requests'::regclass"
            ).scalar()
            assert tuple(columns) == (partitions + 1, True, True)
    assert len(raw) == 400 + len(crowded) + 1 and all(r["route_matched"] for r in raw)
    rebuilt = rebuilt_endpoints(raw)
    assert stored_endpoints(upgraded) == rebuilt
    assert sum(1 for k in rebuilt["endpoint_routes"] if k[0] is None) >= ROUTES_PER_KEY_DAY
    assert_rollups_exact(upgraded)

    reference = EndpointReference()
    reference.write(raw, stored=True)
    more = [random_request(rng, spread_hours=900) for _ in range(200)]
    more += [RequestRecord(path=f"/s/{i}", api_key_id=None, requested_at=day) for i in range(30)]
    upgraded.write(more)
    reference.write(more)
    assert stored_endpoints(upgraded) == reference.rollups()
    upgraded.create_schema()  # a second run leaves the filled tables alone
    assert stored_endpoints(upgraded) == reference.rollups()
    upgraded.dispose()


@pytest.mark.postgres
def test_a_0_1_0_install_gets_endpoint_rollups_equal_to_a_rebuild(pg_url: str) -> None:
    """An install made with the 0.1.0 schema file, holding requests (with methods outside the
    standard set, latencies around the bucket edges, more routes on one key-day than the cap),
    is upgraded by create_schema(): its endpoint rollups equal the rebuild from its raw rows,
    computed here in Python with the writer's own label and bucket functions."""
    import random
    import uuid
    from datetime import datetime, timedelta, timezone

    from support.endpoints import rebuilt_endpoints, stored_endpoints, stored_request_rows

    from usage_middleware._schema import ROUTES_PER_KEY_DAY, STANDARD_METHODS

    old = Path(__file__).parent / "support" / "schema_0_1_0.sql"
    rng = random.Random(21)
    start = datetime(2025, 1, 30, 22, tzinfo=timezone.utc)
    keys = [None, uuid.UUID(int=5, version=4)]
    rows = [
        (
            uuid.UUID(int=rng.getrandbits(128), version=4),
            rng.choice(keys),
            rng.choice([*sorted(STANDARD_METHODS), "MKCOL", "get"]),
            f"/r/{rng.randrange(ROUTES_PER_KEY_DAY + 60)}",
            rng.choice([200, 302, 404, 503]),
            rng.choice([0.0, 0.001, 0.0011, 1.0, 12.5, rng.lognormvariate(2, 2)]),
            rng.randrange(10_000),
            rng.randrange(10_000),
            start + timedelta(seconds=rng.random() * 3 * 86_400),
        )
        for _ in range(3_000)
    ]
    with psycopg.connect(
        make_url(pg_url).set(drivername="postgresql").render_as_string(hide_password=False),
        autocommit=True,
    ) as conn:
        conn.execute(old.read_text("utf-8"))
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO api_requests (id, api_key_id, method, path, status_code, "
                "response_time_ms, request_size, response_size, requested_at) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                rows,
            )
    store = UsageStore(pg_url)
    try:
        store.create_schema()
        # the coarse tiers are cut back to the midnight before the newest request (the hour
        # instant); a seal past it rolls that day in too
        store.seal(datetime(2200, 1, 1, tzinfo=timezone.utc))
        raw = stored_request_rows(store)
        assert len(raw) == len(rows) and all(r["route_matched"] for r in raw)
        rebuilt = rebuilt_endpoints(raw)
        assert stored_endpoints(store) == rebuilt
        daily = rebuilt["daily_endpoint_usage"]
        assert "(other)" in {route for (_, _, _, route, *_) in daily}
        assert {method for (_, _, method, *_) in daily} == {*STANDARD_METHODS, "OTHER"}
    finally:
        store.dispose()
