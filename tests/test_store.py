"""UsageStore.write on real SQLite and PostgreSQL: idempotency, exact rollups, hostile input."""

from __future__ import annotations

import random
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import select
from support.rollups import (
    assert_rollups_exact,
    random_request,
    random_upload,
    raw_counts,
    stored_rollups,
)

from usage_middleware import (
    ConfigurationError,
    DatabaseUnavailableError,
    RequestRecord,
    SchemaMissingError,
    UploadRecord,
    UsageStore,
)
from usage_middleware._schema import api_requests, file_uploads

UTC = timezone.utc


def test_replayed_batch_changes_nothing(store: UsageStore) -> None:
    """Writing the same batch again stores no row and changes no rollup."""
    rng = random.Random(1)
    batch = [random_upload(rng) for _ in range(300)] + [random_request(rng) for _ in range(200)]
    assert store.write(batch) == 500
    before = stored_rollups(store)
    assert store.write(batch) == 0
    assert store.write(list(reversed(batch))) == 0
    assert stored_rollups(store) == before
    assert raw_counts(store) == (300, 200)
    assert_rollups_exact(store)


def test_overlapping_batch_counts_only_new_rows(store: UsageStore) -> None:
    """A batch that half overlaps an earlier one adds exactly its new half to the rollups."""
    rng = random.Random(2)
    first = [random_upload(rng) for _ in range(200)]
    second = first[100:] + [random_upload(rng) for _ in range(150)]
    assert store.write(first) == 200
    assert store.write(second) == 150
    assert raw_counts(store) == (350, 0)
    assert_rollups_exact(store)


def test_duplicates_inside_one_batch_count_once(store: UsageStore) -> None:
    """An id repeated inside one batch is stored and counted once."""
    rng = random.Random(3)
    upload = random_upload(rng)
    request = random_request(rng)
    assert store.write([upload, upload, request, upload, request]) == 2
    totals = stored_rollups(store)["daily_usage"]
    assert sum(v[0] for v in totals.values()) == 1
    assert_rollups_exact(store)


def test_rollups_match_raw_rows_across_days_hours_and_keys(store: UsageStore) -> None:
    """Daily and hourly rollups of uploads and requests equal GROUP BY over the raw rows."""
    rng = random.Random(4)
    batch = [random_upload(rng, spread_hours=60) for _ in range(500)]
    batch += [random_request(rng, spread_hours=60) for _ in range(300)]
    batch.append(UploadRecord(file_size=7, uploaded_at=datetime(2025, 1, 1, tzinfo=UTC)))
    batch.append(
        UploadRecord(
            file_size=9,
            uploaded_at=datetime(2025, 1, 1, 0, 30, tzinfo=timezone(timedelta(hours=2))),
        )
    )
    store.write(batch)
    assert_rollups_exact(store)
    daily = stored_rollups(store)["daily_usage"]
    # 00:30 at UTC+2 is 22:30 UTC the day before.
    assert daily[(None, datetime(2024, 12, 31).date(), "unknown", "application/octet-stream")] == (
        1,
        9,
        1,
        0,
    )


def test_write_returns_zero_for_nothing(store: UsageStore) -> None:
    """An empty batch writes nothing and returns 0."""
    assert store.write([]) == 0
    assert raw_counts(store) == (0, 0)


HOSTILE = [
    "'; DROP TABLE file_uploads; --",
    "Robert'); DELETE FROM daily_usage WHERE ('1'='1",
    'quote " double \\ backslash \t tab \n newline \r return',
    "nul\x00inside",
    "emoji 📦🚀 and RTL \u202e and combining e\u0301",
    "$1 %s %(x)s {0} ? :name",
    "x" * 100_000,
]


@pytest.mark.parametrize("hostile", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_strings_are_stored_as_data(store: UsageStore, hostile: str) -> None:
    """Every text field stores quotes, SQL, NUL, emoji and huge strings as plain data."""
    upload = UploadRecord(
        provider=hostile,
        file_type=hostile,
        declared_type="text/" + hostile,
        file_name=hostile,
        error_message=hostile,
        upload_status="failed",
        file_size=1,
    )
    request = RequestRecord(method=hostile, path=hostile, error_message=hostile, status_code=500)
    assert store.write([upload, request]) == 2
    with store.engine.connect() as conn:
        row = conn.execute(select(file_uploads)).mappings().one()
        req = conn.execute(select(api_requests)).mappings().one()
    for field in ("provider", "file_type", "declared_type", "file_name", "error_message"):
        assert row[field] == getattr(upload, field), field
    for field in ("method", "path", "error_message"):
        assert req[field] == getattr(request, field), field
    # What the record normalised is still recognisably the input (NUL becomes U+FFFD).
    assert row["file_name"][:50] == hostile.replace("\x00", "\ufffd")[:50]
    assert_rollups_exact(store)


def test_bad_record_in_batch_writes_nothing(store: UsageStore) -> None:
    """A batch with one invalid record raises ValueError naming the field and stores nothing."""
    rng = random.Random(5)
    good = [random_upload(rng) for _ in range(10)]
    bad = random_upload(rng)
    bad.file_size = -5
    with pytest.raises(ValueError, match="file_size"):
        store.write([*good, bad])
    bad = random_upload(rng)
    bad.upload_status = "maybe"  # type: ignore[assignment]
    with pytest.raises(ValueError, match="upload_status"):
        store.write([*good, bad])
    bad = random_upload(rng)
    bad.uploaded_at = datetime(2025, 1, 1)
    with pytest.raises(ValueError, match="uploaded_at"):
        store.write([*good, bad])
    assert raw_counts(store) == (0, 0)
    assert stored_rollups(store)["daily_usage"] == {}


def test_write_rejects_other_objects(store: UsageStore) -> None:
    """Anything but UploadRecord/RequestRecord raises TypeError before writing."""
    with pytest.raises(TypeError, match="dict"):
        store.write([UploadRecord(), {"provider": "s3"}])  # type: ignore[list-item]
    assert raw_counts(store) == (0, 0)


@pytest.mark.parametrize("url", ["mysql://u@h/db", "mongodb://h/db", "not a url"])
def test_unknown_url_scheme_names_the_supported_ones(url: str) -> None:
    """An unsupported URL raises ConfigurationError that says which URLs work."""
    with pytest.raises(ConfigurationError, match="sqlite:///"):
        UsageStore(url)


def test_unreachable_postgres_raises_database_unavailable() -> None:
    """A PostgreSQL server that does not answer raises DatabaseUnavailableError on write."""
    store = UsageStore("postgresql://nobody@127.0.0.1:1/none", connect_timeout=1)
    with pytest.raises(DatabaseUnavailableError, match="cannot reach"):
        store.write([UploadRecord()])


def test_unopenable_sqlite_file_raises_database_unavailable(tmp_path: object) -> None:
    """A SQLite file in a directory that does not exist raises DatabaseUnavailableError."""
    store = UsageStore(f"sqlite:///{tmp_path}/missing-dir/usage.db")
    with pytest.raises(DatabaseUnavailableError):
        store.write([UploadRecord()])


def test_missing_schema_with_auto_create_off(db_url: str) -> None:
    """With auto-creation off, a missing schema raises SchemaMissingError saying what to do."""
    store = UsageStore(db_url, auto_create_schema=False)
    try:
        assert not store.has_schema()
        with pytest.raises(SchemaMissingError, match="create_schema"):
            store.write([UploadRecord()])
        store.create_schema()
        assert store.write([UploadRecord()]) == 1
    finally:
        store.dispose()


def test_records_survive_round_trip(store: UsageStore) -> None:
    """Every column reads back as written: UUIDs, sizes, aware UTC timestamps, floats."""
    at = datetime(2025, 3, 30, 1, 59, 59, 999999, tzinfo=UTC)
    upload = UploadRecord(
        api_key_id=uuid.uuid4(),
        request_id=uuid.uuid4(),
        provider="s3",
        file_type="image/png",
        declared_type="image/jpeg",
        file_size=2**50,  # the largest size a record may state
        file_name="a.png",
        uploaded_at=at,
    )
    request = RequestRecord(
        api_key_id=upload.api_key_id,
        method="post",
        path="/files",
        status_code=201,
        response_time_ms=12.345678,
        request_size=10,
        response_size=20,
        requested_at=at,
    )
    store.write([upload, request])
    with store.engine.connect() as conn:
        row = conn.execute(select(file_uploads)).mappings().one()
        req = conn.execute(select(api_requests)).mappings().one()
    assert {k: row[k] for k in row} == {
        c.name: getattr(upload, c.name) for c in file_uploads.columns
    }
    assert {k: req[k] for k in req} == {
        c.name: getattr(request, c.name) for c in api_requests.columns
    }
    assert req["method"] == "POST"


@pytest.mark.postgres
def test_write_survives_discard_all(pg_url: str) -> None:
    """Staging tables dropped under the store (as a pooler's DISCARD ALL does) are recreated."""
    store = UsageStore(pg_url)
    try:
        rng = random.Random(6)
        assert store.write([random_upload(rng), random_request(rng)]) == 2
        with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("DISCARD ALL")
        assert store.write([random_upload(rng), random_request(rng)]) == 2
        assert_rollups_exact(store)
    finally:
        store.dispose()


@pytest.mark.postgres
@pytest.mark.parametrize("prepare_threshold", [0, None])
def test_writes_and_replays_with_statements_prepared_at_once_or_never(
    pg_url: str, prepare_threshold: int | None
) -> None:
    """Behind a transaction-mode pooler users set psycopg's ``prepare_threshold`` (0: every
    statement prepared at its first run, None: never). The schema file, the staging tables and
    the uploads' insert (a savepoint in the same message) are several statements in one, which a
    prepared statement cannot hold: the schema is made, new, replayed and half-replayed batches
    are written, sealed and maintained under both settings."""
    store = UsageStore(
        pg_url, engine_options={"connect_args": {"prepare_threshold": prepare_threshold}}
    )
    try:
        rng = random.Random(7)
        first = [random_upload(rng) for _ in range(40)] + [random_request(rng)]
        second = first[20:] + [random_upload(rng) for _ in range(30)]
        for run in range(3):  # the same statements again: prepared ones are run as prepared
            assert store.write(first) == (len(first) if run == 0 else 0)
        assert store.write(second) == 30
        assert store.write([random_upload(rng)]) == 1
        assert raw_counts(store) == (71, 1)
        store.seal()
        store.maintain()  # partitions, seals, the retention bookkeeping
        assert_rollups_exact(store)
    finally:
        store.dispose()


@pytest.mark.postgres
def test_postgres_sessions_are_utc_without_jit_and_caller_options_still_apply(
    pg_url: str,
) -> None:
    """The store's sessions run in UTC with JIT off (it costs the read path's small indexed
    statements more than they take); options the caller passes are added and win."""
    options = "-c statement_timeout=5000 -c timezone=UTC"
    store = UsageStore(pg_url, engine_options={"connect_args": {"options": options}})
    try:
        with store.engine.connect() as conn:
            settings = {
                name: conn.exec_driver_sql(f"SHOW {name}").scalar()
                for name in ("jit", "timezone", "statement_timeout")
            }
        assert settings == {"jit": "off", "timezone": "UTC", "statement_timeout": "5s"}
    finally:
        store.dispose()
