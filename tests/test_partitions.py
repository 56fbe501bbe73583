"""Monthly raw partitions on PostgreSQL, raw-row retention on both dialects, and the conversion
of an install whose raw tables are not partitioned (made with the 0.1.0 schema file)."""

from __future__ import annotations

import random
import threading
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import event, select, text
from sqlalchemy.engine import make_url
from support.checks import scalar
from support.rollups import FAR, assert_rollups_exact, raw_counts, stored_rollups

from usage_middleware import (
    ConfigurationError,
    Recorder,
    RequestRecord,
    UploadRecord,
    UsageStore,
)
from usage_middleware._cli import main
from usage_middleware._maintain import maintain, retention_start
from usage_middleware._schema import api_requests, file_uploads
from usage_middleware._store import sql_text

UTC = timezone.utc
OLD_SCHEMA = Path(__file__).parent / "support" / "schema_0_1_0.sql"


def _quarter_tables_sql() -> str:
    """The schema file's blocks that add (and fill) the tables and the column added after the
    raw tables were partitioned: the quarter-hour rollups, the declared-type mismatch rollup,
    ``api_requests.route_matched`` and the endpoint rollups. An install of 0.1.0 with them is one
    this release's writer can write to before the conversion of its raw tables."""
    text_ = sql_text("usage_tracking_schema.sql")
    blocks = []
    for tag in ("$quarter$", "$mismatch$", "$route_matched$", "$endpoint$"):
        start = text_.index(f"DO {tag}")
        end = text_.index(f"{tag};", start + len(f"DO {tag}")) + len(f"{tag};")
        blocks.append(text_[start:end])
    return "\n".join(blocks)


def _upload(at: datetime, rng: random.Random) -> UploadRecord:
    return UploadRecord(
        id=uuid.UUID(int=rng.getrandbits(128), version=4),
        api_key_id=rng.choice([None, uuid.UUID(int=1, version=4)]),
        provider=rng.choice(["s3", "vercel"]),
        file_type="image/png",
        file_size=rng.randrange(1, 10_000),
        upload_status=rng.choice(["success", "failed"]),
        uploaded_at=at,
    )


def _request(at: datetime, rng: random.Random) -> RequestRecord:
    return RequestRecord(
        id=uuid.UUID(int=rng.getrandbits(128), version=4),
        api_key_id=rng.choice([None, uuid.UUID(int=1, version=4)]),
        method="POST",
        path="/upload",
        status_code=rng.choice([200, 500]),
        response_time_ms=rng.random() * 100,
        request_size=rng.randrange(0, 1000),
        response_size=rng.randrange(0, 1000),
        requested_at=at,
    )


def _pair(at: datetime, rng: random.Random) -> list[UploadRecord | RequestRecord]:
    return [_upload(at, rng), _request(at, rng)]


def _month(at: datetime, add: int = 0) -> datetime:
    """First instant of ``at``'s UTC month, ``add`` months later."""
    index = at.year * 12 + at.month - 1 + add
    return datetime(index // 12, index % 12 + 1, 1, tzinfo=UTC)


def _partitions(store: UsageStore, table: str) -> dict[str, tuple[Any, Any]]:
    with store.engine.connect() as conn:
        rows = conn.execute(
            text("SELECT * FROM public.usage_raw_partitions(:t)"), {"t": table}
        ).all()
    return {r.partition_name: (r.range_from, r.range_to) for r in rows}


def _times(store: UsageStore, table: str, column: str) -> set[datetime]:
    """The stored rows' times, as aware UTC datetimes on both dialects."""
    t = {"file_uploads": file_uploads, "api_requests": api_requests}[table]
    with store.engine.connect() as conn:
        return set(conn.execute(select(t.c[column])).scalars())


def _where(store: UsageStore, table: str, column: str) -> dict[datetime, str]:
    """For each stored row's time, the partition holding it."""
    with store.engine.connect() as conn:
        rows = conn.execute(text(f"SELECT {column}, tableoid::regclass::text FROM {table}")).all()
    return {r[0]: r[1] for r in rows}


def _names(store: UsageStore, sql: str) -> set[str]:
    with store.engine.connect() as conn:
        return {r[0] for r in conn.execute(text(sql))}


def _dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


# --- partitions -------------------------------------------------------------------------------


@pytest.mark.postgres
def test_partitions_exist_for_this_month_and_three_ahead(pg_url: str) -> None:
    """create_schema() leaves both raw tables partitioned by UTC month, this month and the next
    three ready, a default partition, and row level security on every partition."""
    store = UsageStore(pg_url)
    try:
        store.create_schema()
        now = datetime.now(UTC)
        for table in ("file_uploads", "api_requests"):
            parts = _partitions(store, table)
            for add in range(4):
                lo = _month(now, add)
                assert parts[f"{table}_p{lo:%Y_%m}"] == (lo, _month(now, add + 1))
            assert (
                scalar(
                    store,
                    "SELECT count(*) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                    f"WHERE i.inhparent = '{table}'::regclass AND NOT c.relrowsecurity",
                )
                == 0
            )
            assert scalar(store, f"SELECT count(*) FROM pg_class WHERE relname = '{table}_default'")
            assert (
                scalar(
                    store,
                    "SELECT count(*) FROM pg_constraint WHERE contype = 'p' AND conrelid = "
                    f"'{table}'::regclass AND array_length(conkey, 1) = 2",
                )
                == 1
            )
    finally:
        store.dispose()


@pytest.mark.postgres
def test_rows_far_in_the_future_and_past_land_and_maintain_moves_them(pg_url: str) -> None:
    """Rows dated 2199 and 1971 have no partition: the default partition takes them, and
    maintain gives each its month's partition, moving the rows there. A second run changes
    nothing; every rollup still equals GROUP BY over the raw rows."""
    store = UsageStore(pg_url)
    rng = random.Random(7)
    future = datetime(2199, 3, 14, 15, 9, tzinfo=UTC)
    past = datetime(1971, 2, 3, 4, 5, tzinfo=UTC)
    now = datetime.now(UTC)
    try:
        assert store.write([*_pair(future, rng), *_pair(past, rng), *_pair(now, rng)]) == 6
        assert _where(store, "file_uploads", "uploaded_at")[future] == "file_uploads_default"
        assert _where(store, "api_requests", "requested_at")[past] == "api_requests_default"

        first = maintain(store)
        assert first.partitions_created == 4  # 2199-03 and 1971-02, for both tables
        for table, column in (("file_uploads", "uploaded_at"), ("api_requests", "requested_at")):
            where = _where(store, table, column)
            assert where[future] == f"{table}_p2199_03"
            assert where[past] == f"{table}_p1971_02"
            assert where[now] == f"{table}_p{now:%Y_%m}"
            assert scalar(store, f"SELECT count(*) FROM {table}_default") == 0
        assert raw_counts(store) == (3, 3)

        before = _partitions(store, "file_uploads")
        again = maintain(store)
        assert (again.partitions_created, again.partitions_dropped, again.rows_deleted) == (0, 0, 0)
        assert _partitions(store, "file_uploads") == before
        assert raw_counts(store) == (3, 3)
        assert_rollups_exact(store)
    finally:
        store.dispose()


@pytest.mark.postgres
def test_maintain_while_a_recorder_writes_into_the_default_partition(
    pg_url: str, tmp_path: Path
) -> None:
    """maintain runs again and again while a recorder writes rows of months that have no
    partition yet (they land in the default partition and are moved out as their months get
    partitions): no write fails, every row is stored once, every rollup is exact."""
    store = UsageStore(pg_url)
    store.create_schema()
    recorder = Recorder(store, spool_path=tmp_path / "spool.db", batch_size=20, flush_interval=0.01)
    recorder.start()
    stop = threading.Event()
    sent = [0]

    def feed() -> None:
        feed_rng = random.Random(29)
        while not stop.is_set():
            at = datetime(2199 + feed_rng.randrange(3), feed_rng.randrange(1, 13), 5, tzinfo=UTC)
            recorder.submit_many(_pair(at, feed_rng))
            sent[0] += 1
            stop.wait(0.001)

    feeder = threading.Thread(target=feed)
    feeder.start()
    try:
        created = 0
        for _ in range(6):
            created += maintain(store).partitions_created
            stop.wait(0.1)
        stop.set()
        feeder.join()
        assert recorder.force_flush(30)
        created += maintain(store).partitions_created
        stats = recorder.stats()
        assert (stats["failed_writes"], stats["dropped"], stats["rejected"]) == (0, 0, 0)
        assert raw_counts(store) == (sent[0], sent[0])
        assert scalar(store, "SELECT count(*) FROM file_uploads_default") == 0
        months = scalar(
            store,
            "SELECT count(DISTINCT date_trunc('month', uploaded_at AT TIME ZONE 'UTC')) "
            "FROM file_uploads",
        )
        assert created >= 2 * months  # each month got its partitions while writes went on
        assert_rollups_exact(store)
    finally:
        stop.set()
        feeder.join()
        recorder.shutdown()
        store.dispose()


def test_replayed_batches_across_partitions_count_once(db_url: str) -> None:
    """A batch spread over many months (one in the default partition) written twice, then again
    after maintain moved rows between partitions, is stored and counted once."""
    store = UsageStore(db_url)
    rng = random.Random(11)
    now = datetime.now(UTC)
    times = [now - timedelta(days=40 * i) for i in range(6)] + [datetime(2150, 1, 1, tzinfo=UTC)]
    batch = [record for at in times for record in _pair(at, rng)]
    try:
        assert store.write(batch) == len(batch)
        assert store.write(batch) == 0
        store.seal(FAR)  # PostgreSQL: maintain seals first; here everything but 2150 already is
        expected = stored_rollups(store)
        maintain(store)
        assert store.write(list(reversed(batch))) == 0
        assert raw_counts(store) == (len(times), len(times))
        assert stored_rollups(store) == expected
        assert_rollups_exact(store)
    finally:
        store.dispose()


# --- retention --------------------------------------------------------------------------------


def test_retention_removes_exactly_the_old_raw_rows_and_never_the_rollups(db_url: str) -> None:
    """With 90 days of raw retention, rows of months wholly older than the cutoff go (on SQLite
    every row older than the cutoff); newer rows and every rollup row stay. retention_start()
    says from when raw rows are complete, and a second run removes nothing more."""
    store = UsageStore(db_url)
    rng = random.Random(3)
    now = datetime.now(UTC)
    cutoff = now - timedelta(days=90)
    cutoff_month = _month(cutoff)
    # In the cutoff's month but before the cutoff: PostgreSQL keeps it (whole months only).
    in_cutoff_month = cutoff - min(timedelta(hours=1), (cutoff - cutoff_month) / 2)
    old = [now - timedelta(days=400), now - timedelta(days=200), _month(cutoff, -1)]
    kept = [cutoff + timedelta(hours=1), now - timedelta(days=1), now]
    try:
        store.write([r for at in [*old, in_cutoff_month, *kept] for r in _pair(at, rng)])
        maintain(store)  # partitions for every month, as a daily cron run would have made
        rollups = stored_rollups(store)
        assert retention_start(store) is None

        result = maintain(store, raw_retention_days=90)

        remaining = _times(store, "file_uploads", "uploaded_at")
        assert remaining == _times(store, "api_requests", "requested_at")
        if store.dialect == "postgresql":
            assert remaining == {in_cutoff_month, *kept}
            assert result.partitions_dropped == 2 * 3  # three old months, two tables
            assert retention_start(store) == cutoff_month
        else:
            assert remaining == set(kept)
            assert result.rows_deleted == 2 * 4
            start = retention_start(store)
            assert start is not None and abs(start - cutoff) < timedelta(minutes=5)
        assert stored_rollups(store) == rollups
        again = maintain(store, raw_retention_days=90)
        assert (again.partitions_dropped, again.rows_deleted) == (0, 0)
        assert _times(store, "file_uploads", "uploaded_at") == remaining
    finally:
        store.dispose()


def test_store_option_prunes_at_create_schema(db_url: str) -> None:
    """UsageStore(raw_retention_days=N) prunes at create_schema(); raw rows within N stay."""
    writer = UsageStore(db_url)
    rng = random.Random(5)
    now = datetime.now(UTC)
    try:
        writer.write([*_pair(now - timedelta(days=800), rng), *_pair(now, rng)])
        maintain(writer)
    finally:
        writer.dispose()
    store = UsageStore(db_url, raw_retention_days=30)
    try:
        store.create_schema()
        assert raw_counts(store) == (1, 1)
        assert scalar(store, "SELECT sum(total_uploads) FROM daily_usage") == 2
        assert retention_start(store) is not None
    finally:
        store.dispose()


def test_retention_on_an_install_older_than_the_retention_table(sqlite_url: str) -> None:
    """A SQLite install made before usage_retention existed, used without auto-creation: nothing
    was pruned (retention_start None), and maintain prunes and starts recording."""
    setup = UsageStore(sqlite_url)
    now = datetime.now(UTC)
    setup.write(
        [*_pair(now - timedelta(days=100), random.Random(2)), *_pair(now, random.Random(4))]
    )
    with setup.engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE usage_retention")
    setup.dispose()
    store = UsageStore(sqlite_url, auto_create_schema=False)
    try:
        assert retention_start(store) is None
        assert maintain(store, raw_retention_days=10).rows_deleted == 2
        start = retention_start(store)
        assert start is not None and start > now - timedelta(days=11)
        assert raw_counts(store) == (1, 1)
    finally:
        store.dispose()


def test_sqlite_retention_deletes_in_short_batches(sqlite_url: str) -> None:
    """12,001 old uploads go in batches of at most 5,000 rows, each its own transaction, so a
    concurrent writer waits for one batch, not for the whole prune."""
    store = UsageStore(sqlite_url)
    rng = random.Random(9)
    old = datetime.now(UTC) - timedelta(days=100)
    try:
        store.write([_upload(old + timedelta(seconds=i), rng) for i in range(12_001)])
        deletes: list[int] = []
        commits: list[int] = []

        @event.listens_for(store.engine, "after_cursor_execute")
        def _count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            if statement.startswith("DELETE FROM file_uploads"):
                deletes.append(cursor.rowcount)

        @event.listens_for(store.engine, "commit")
        def _commit(conn: Any) -> None:
            commits.append(len(deletes))

        result = maintain(store, raw_retention_days=30)
        assert result.rows_deleted == 12_001
        assert deletes == [5_000, 5_000, 2_001]
        # Each batch is committed before the next one starts.
        assert [c for c in commits if c][:3] == [1, 2, 3]
        assert raw_counts(store) == (0, 0)
        assert scalar(store, "SELECT sum(total_uploads) FROM daily_usage") == 12_001
    finally:
        store.dispose()


# --- converting an install made before partitioning --------------------------------------------


@pytest.mark.postgres
def test_upgrade_converts_a_populated_install_while_a_recorder_writes(
    pg_url: str, tmp_path: Path
) -> None:
    """An install made with the 0.1.0 schema file, holding rows (one dated 2199), is converted
    by create_schema() while a Recorder keeps writing: no row lost or counted twice, no write
    failed, the old rows form one partition, its indexes are reused, and a re-run changes
    nothing."""
    with psycopg.connect(_dsn(pg_url), autocommit=True) as conn:
        conn.execute(OLD_SCHEMA.read_text("utf-8"))
        conn.execute(_quarter_tables_sql())
    rng = random.Random(13)
    now = datetime.now(UTC)
    old = UsageStore(pg_url, auto_create_schema=False)
    history = [now - timedelta(minutes=37 * i) for i in range(3_000)]
    history.append(datetime(2199, 1, 2, tzinfo=UTC))
    old.write([r for at in history for r in _pair(at, rng)])
    old_indexes = _names(
        old,
        "SELECT indexrelid::regclass::text FROM pg_index "
        "WHERE indrelid = 'file_uploads'::regclass AND NOT indisprimary",
    )
    assert old_indexes == {"idx_file_uploads_key_time", "idx_file_uploads_time"}

    recorder = Recorder(old, spool_path=tmp_path / "spool.db", batch_size=50, flush_interval=0.02)
    recorder.start()
    submitted = threading.Event()
    stop = threading.Event()
    sent: list[int] = [0]

    def feed() -> None:
        feed_rng = random.Random(17)
        while not stop.is_set():
            recorder.submit_many(_pair(datetime.now(UTC), feed_rng))
            sent[0] += 1
            if sent[0] == 200:
                submitted.set()
            stop.wait(0.002)

    feeder = threading.Thread(target=feed)
    feeder.start()
    new = UsageStore(pg_url)
    try:
        assert submitted.wait(30)
        new.create_schema()
        converted_at = sent[0]
        stop.wait(0.5)
        stop.set()
        feeder.join()
        assert recorder.force_flush(30)
        assert sent[0] > converted_at  # writes went on after the conversion
        stats = recorder.stats()
        assert (stats["failed_writes"], stats["dropped"], stats["rejected"]) == (0, 0, 0)

        total = len(history) + sent[0]
        assert raw_counts(new) == (total, total)
        assert_rollups_exact(new)
        parts = _partitions(new, "file_uploads")
        assert parts["file_uploads_legacy"] == (None, _month(now, 1))
        assert _where(new, "file_uploads", "uploaded_at")[history[-1]] == "file_uploads_p2199_01"
        # The old secondary indexes became the legacy partition's, attached, not rebuilt.
        attached = _names(
            new,
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent IN ('idx_file_uploads_key_time'::regclass, "
            "'idx_file_uploads_time'::regclass)",
        )
        assert {"idx_file_uploads_key_time_legacy", "idx_file_uploads_time_legacy"} <= attached

        new.create_schema()
        assert _partitions(new, "file_uploads") == parts
        assert raw_counts(new) == (total, total)
        assert new.write(_pair(history[0], random.Random(13))) == 0  # replay into legacy
        assert_rollups_exact(new)
    finally:
        stop.set()
        feeder.join()
        recorder.shutdown()
        old.dispose()
        new.dispose()


@pytest.mark.postgres
def test_retention_empties_the_legacy_partition_in_batches_then_drops_it(pg_url: str) -> None:
    """A converted install's old rows are deleted in batches once past the retention age, and
    the emptied legacy partition is dropped, its months going back to monthly partitions."""
    with psycopg.connect(_dsn(pg_url), autocommit=True) as conn:
        conn.execute(OLD_SCHEMA.read_text("utf-8"))
        conn.execute(_quarter_tables_sql())
    rng = random.Random(19)
    now = datetime.now(UTC)
    store = UsageStore(pg_url, auto_create_schema=False)
    old_times = [now - timedelta(days=200, minutes=i) for i in range(120)]
    store.write([r for at in old_times for r in _pair(at, rng)])
    store.auto_create_schema = True
    try:
        store.create_schema()
        assert "file_uploads_legacy" in _partitions(store, "file_uploads")
        store.seal()  # what maintain() does first: the last day of requests rolls up
        rollups = stored_rollups(store)
        with store.engine.begin() as conn:  # one call deletes one batch, and says there is more
            row = conn.execute(text("SELECT * FROM public.usage_maintain(3, 30, 50)")).one()
        assert (row.rows_deleted, row.more) == (100, True)
        assert raw_counts(store) == (70, 70)

        result = maintain(store, raw_retention_days=30)
        assert result.rows_deleted == 140
        assert raw_counts(store) == (0, 0)
        assert "file_uploads_legacy" not in _partitions(store, "file_uploads")
        assert f"file_uploads_p{now:%Y_%m}" in _partitions(store, "file_uploads")
        assert stored_rollups(store) == rollups
        start = retention_start(store)
        assert start is not None and abs(start - (now - timedelta(days=30))) < timedelta(minutes=5)
        later = now - timedelta(days=10)
        assert store.write(_pair(later, rng)) == 2
        assert _where(store, "file_uploads", "uploaded_at")[later] == (
            f"file_uploads_p{later:%Y_%m}" if later >= _month(now) else "file_uploads_default"
        )
    finally:
        store.dispose()


# --- the command ------------------------------------------------------------------------------


def test_cli_maintain(sqlite_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`maintain` prints one line and exits 0; bad arguments give one line on stderr, exit 2."""
    store = UsageStore(sqlite_url)
    store.write(_pair(datetime.now(UTC) - timedelta(days=50), random.Random(1)))
    store.dispose()
    assert main(["maintain", sqlite_url, "--raw-retention-days", "20", "--months-ahead", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "2 raw rows deleted" in out
    for bad in (
        ["--raw-retention-days", "0"],
        ["--raw-retention-days", "ten"],
        ["--months-ahead", "-1"],
        ["--months-ahead", "121"],
    ):
        with pytest.raises(SystemExit) as exit_:
            main(["maintain", sqlite_url, *bad])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and bad[0] in err
    with pytest.raises(SystemExit) as exit_:
        main(["maintain", "mysql://localhost/x"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_bad_retention_options_are_refused(sqlite_url: str) -> None:
    """Retention ages and months ahead out of range raise ConfigurationError up front."""
    for days in (0, -5, 1.5, True, 40_000):
        with pytest.raises(ConfigurationError, match="raw_retention_days"):
            UsageStore(sqlite_url, raw_retention_days=days)  # type: ignore[arg-type]
    store = UsageStore(sqlite_url)
    try:
        with pytest.raises(ConfigurationError, match="months_ahead"):
            maintain(store, months_ahead=121)
        with pytest.raises(ConfigurationError, match="raw_retention_days"):
            maintain(store, raw_retention_days=0)
        with pytest.raises(ConfigurationError, match="table"):
            retention_start(store, "daily_usage")
    finally:
        store.dispose()


def test_cli_maintain_unreachable_database_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """An unreachable server is one line on stderr and exit 2, like every other failure."""
    with pytest.raises(SystemExit) as exit_:
        main(["maintain", "postgresql://nobody@127.0.0.1:9/x"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot reach" in err


# --- row level security -------------------------------------------------------------------------

ROLES = """
DO $$ BEGIN CREATE ROLE anon NOLOGIN;
EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$;
DO $$ BEGIN CREATE ROLE authenticated NOLOGIN;
EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$;
"""


def _count_as(conn: psycopg.Connection[Any], role: str, table: str) -> int:
    with conn.transaction():
        conn.execute(f"SET LOCAL ROLE {role}")
        row = conn.execute(f"SELECT count(*) FROM public.{table}").fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.postgres
def test_conversion_keeps_row_level_security_and_partitions_expose_nothing(pg_url: str) -> None:
    """A converted table keeps its grants, RLS and policies (now on the parent), and partitions
    read directly (as PostgREST would, with Supabase's blanket grants) show no row."""
    key = uuid.UUID(int=0xA1, version=4)
    with psycopg.connect(_dsn(pg_url), autocommit=True) as conn:
        conn.execute(ROLES)
        conn.execute(OLD_SCHEMA.read_text("utf-8"))
        conn.execute(_quarter_tables_sql())
        conn.execute("GRANT USAGE ON SCHEMA public TO anon, authenticated")
        conn.execute("GRANT SELECT ON public.file_uploads TO authenticated")
        conn.execute("ALTER TABLE public.file_uploads ENABLE ROW LEVEL SECURITY")
        conn.execute(
            "CREATE POLICY mine ON public.file_uploads FOR SELECT TO authenticated "
            f"USING (api_key_id = '{key}')"
        )
        store = UsageStore(pg_url)
        try:
            rng = random.Random(23)
            uploads = [_upload(datetime.now(UTC), rng) for _ in range(20)]
            uploads[0].api_key_id = key
            uploads[1:] = [u for u in uploads[1:] if u.api_key_id != key]
            store.write(uploads)
            assert _count_as(conn, "authenticated", "file_uploads") == 1
            store.create_schema()
            assert "file_uploads_legacy" in _partitions(store, "file_uploads")
            store.write([_upload(datetime(2199, 1, 1, tzinfo=UTC), rng)])
        finally:
            store.dispose()
        assert _count_as(conn, "authenticated", "file_uploads") == 1
        conn.execute("GRANT SELECT ON ALL TABLES IN SCHEMA public TO anon, authenticated")
        for part in ("file_uploads_legacy", "file_uploads_default", "usage_retention"):
            for role in ("anon", "authenticated"):
                assert _count_as(conn, role, part) == 0, (part, role)
        (legacy_rows,) = conn.execute("SELECT count(*) FROM file_uploads_legacy").fetchone() or (0,)
        assert legacy_rows == len(uploads)
