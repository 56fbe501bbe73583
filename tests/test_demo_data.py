"""The demo-data command: a deterministic, clearly synthetic year, never written by accident."""

from __future__ import annotations

from collections import Counter
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import func, inspect, select

from usage_middleware import RequestRecord, UploadRecord, UsageStore
from usage_middleware._cli import main
from usage_middleware._demo import (
    DEMO_KEY_IDS,
    generate_demo_records,
    generate_top_up_records,
    last_demo_record_at,
    top_up_demo_data,
    write_demo_data,
)
from usage_middleware._schema import api_requests, daily_usage, file_uploads

UTC = timezone.utc
END = date(2025, 6, 30)
NOW = datetime(2025, 6, 30, 12, 0, tzinfo=UTC)


def test_same_seed_same_records_other_seed_other_records() -> None:
    """Records, ids included, depend only on the seed and the dates."""
    first = list(generate_demo_records(days=20, keys=2, seed=7, end=END, now=NOW))
    again = list(generate_demo_records(days=20, keys=2, seed=7, end=END, now=NOW))
    other = list(generate_demo_records(days=20, keys=2, seed=8, end=END, now=NOW))
    assert first == again
    assert {r.id for r in first}.isdisjoint({r.id for r in other})


def test_the_time_of_day_does_not_change_earlier_records() -> None:
    """Running later on the same day only adds the records dated in between."""
    morning = list(generate_demo_records(days=3, seed=1, end=END, now=NOW - timedelta(hours=6)))
    evening = list(generate_demo_records(days=3, seed=1, end=END, now=NOW + timedelta(hours=6)))
    assert set(map(id_of, morning)) < set(map(id_of, evening))


def id_of(record: UploadRecord | RequestRecord) -> str:
    return str(record.id)


def test_records_are_recognisably_synthetic_and_in_range() -> None:
    """Demo key ids, ``demo-`` file names, dates inside the range and none after now."""
    records = list(generate_demo_records(days=30, keys=3, seed=0, end=END, now=NOW))
    uploads = [r for r in records if isinstance(r, UploadRecord)]
    requests = [r for r in records if isinstance(r, RequestRecord)]
    assert uploads and requests
    assert {r.api_key_id for r in records} == set(DEMO_KEY_IDS[:3])
    assert all(str(r.api_key_id).startswith("00000000-de30-") for r in records)
    assert all(r.file_name and r.file_name.startswith("demo-") for r in uploads)
    stamps = [r.uploaded_at for r in uploads] + [r.requested_at for r in requests]
    assert min(stamps).date() >= END - timedelta(days=29)
    assert max(stamps) < NOW
    # Every upload belongs to a POST /api/upload request of the same key and status.
    posts = {r.id: r for r in requests if r.path == "/api/upload"}
    for upload in uploads:
        post = posts[upload.request_id]
        assert post.api_key_id == upload.api_key_id
        assert (post.status_code < 400) == (upload.upload_status == "success")
    assert {r.provider for r in uploads} == {"vercel", "s3", "cloudinary"}
    assert Counter(r.upload_status for r in uploads)["failed"] > 0


def test_cli_writes_once_and_rollups_match(tmp_path: Path) -> None:
    """The command writes through store.write (rollups exact); a rerun writes nothing new."""
    url = f"sqlite:///{tmp_path}/demo.db"
    args = ["demo-data", url, "--days", "60", "--keys", "2", "--seed", "3", "--end", "2025-06-30"]
    assert main(args) == 0
    store = UsageStore(url)
    with store.engine.connect() as conn:
        uploads, size = conn.execute(select(func.count(), func.sum(file_uploads.c.file_size))).one()
        rolled = conn.execute(
            select(func.sum(daily_usage.c.total_uploads), func.sum(daily_usage.c.total_file_size))
        ).one()
        requests = conn.execute(select(func.count()).select_from(api_requests)).scalar_one()
        first_day = conn.execute(select(func.min(daily_usage.c.usage_date))).scalar_one()
    assert uploads > 100 and requests > uploads / 4
    assert tuple(rolled) == (uploads, size)
    assert str(first_day) >= "2025-05-02"
    assert main(args) == 0
    with store.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(file_uploads)).scalar_one() == uploads
    store.dispose()


def test_cli_if_empty_leaves_existing_data_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--if-empty`` writes nothing into a database with uploads."""
    url = f"sqlite:///{tmp_path}/app.db"
    store = UsageStore(url)
    store.write([UploadRecord(provider="s3", file_type="image/png", file_size=5)])
    assert main(["demo-data", url, "--if-empty", "--days", "5"]) == 0
    assert "no demo data written" in capsys.readouterr().out
    with store.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(file_uploads)).scalar_one() == 1
    store.dispose()


@pytest.mark.postgres
def test_cli_refuses_postgresql_without_confirmation(
    pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A PostgreSQL URL is refused (nothing created) unless the flag says it is not production."""
    with pytest.raises(SystemExit) as refused:
        main(["demo-data", pg_url, "--days", "3"])
    assert refused.value.code == 2
    assert "--yes-this-is-not-production" in capsys.readouterr().err
    store = UsageStore(pg_url)
    assert not inspect(store.engine).has_table("file_uploads")
    args = ["demo-data", pg_url, "--days", "3", "--yes-this-is-not-production"]
    assert main(args) == 0
    with store.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(file_uploads)).scalar_one() > 0
    store.dispose()


def test_cli_rejects_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Nonsense sizes or dates are refused with a message, before any file is created."""
    for extra in (["--days", "0"], ["--keys", "100"], ["--end", "30/06/2025"]):
        with pytest.raises(SystemExit) as refused:
            main(["demo-data", f"sqlite:///{tmp_path}/x.db", *extra])
        assert refused.value.code == 2
        assert capsys.readouterr().err.startswith(
            f"usage-middleware demo-data: error: argument {extra[0]}"
        )
    assert not (tmp_path / "x.db").exists()


def test_days_before_the_unix_epoch_are_refused() -> None:
    """Record ids are UUIDv7 (milliseconds since 1970), so no history reaches before 1970."""
    with pytest.raises(ValueError, match="1970-01-01"):
        next(generate_demo_records(days=2, end=date(1970, 1, 1), now=NOW))
    with pytest.raises(ValueError, match="1970-01-01"):
        next(generate_demo_records(days=1, end=date(1, 1, 1), now=NOW))
    first = min(r.id for r in generate_demo_records(days=1, end=date(1970, 1, 1), now=NOW))
    assert first.version == 7 and first.int >> 80 < 86_400_000  # ms on 1970-01-01


def stored_ids(store: UsageStore) -> set[str]:
    with store.engine.connect() as conn:
        return {str(i) for i in conn.execute(select(file_uploads.c.id)).scalars()} | {
            str(i) for i in conn.execute(select(api_requests.c.id)).scalars()
        }


def test_top_up_continues_an_old_history_up_to_now(tmp_path: Path) -> None:
    """A history written weeks ago gets the days since, once, the same however often run."""
    first = UsageStore(f"sqlite:///{tmp_path}/a.db")
    write_demo_data(first, days=30, seed=4, end=END, now=NOW)
    before = stored_ids(first)
    last = last_demo_record_at(first)
    assert last is not None and last.date() == END and last < NOW
    later = NOW + timedelta(days=10, hours=-3)  # 2025-07-10 09:00

    summary = top_up_demo_data(first, seed=4, now=later)
    assert summary is not None and summary.written > 0
    assert (summary.start, summary.end) == (END, later.date())
    with first.engine.connect() as conn:
        days = set(conn.execute(select(daily_usage.c.usage_date)).scalars())
        dated = [r.uploaded_at for r in conn.execute(select(file_uploads)).all()]
        rolled = conn.execute(select(func.sum(daily_usage.c.total_uploads))).scalar_one()
    # Every day since the history's end has traffic; nothing is dated after now.
    stored_days = {date.fromisoformat(str(d)) for d in days}
    assert {END + timedelta(days=n) for n in range(11)} <= stored_days
    assert max(dated) < later and rolled == len(dated)
    after = stored_ids(first)
    assert before < after
    # Run again: nothing new. Topped up in two steps or in one: the same records.
    again = top_up_demo_data(first, seed=4, now=later)
    assert again is not None and again.written == 0
    assert stored_ids(first) == after

    second = UsageStore(f"sqlite:///{tmp_path}/b.db")
    write_demo_data(second, days=30, seed=4, end=END, now=NOW)
    top_up_demo_data(second, seed=4, now=NOW + timedelta(days=4, hours=5))
    top_up_demo_data(second, seed=4, now=later)
    assert stored_ids(second) == after
    first.dispose()
    second.dispose()


def test_top_up_records_are_synthetic_and_after_the_last_one() -> None:
    """Top-up records belong to demo keys, carry ``demo-`` names and lie strictly in between."""
    after = datetime(2025, 6, 30, 9, 30, tzinfo=UTC)
    now = datetime(2025, 7, 3, 8, 0, tzinfo=UTC)
    records = list(generate_top_up_records(after=after, keys=2, seed=1, now=now))
    uploads = [r for r in records if isinstance(r, UploadRecord)]
    assert uploads and {r.api_key_id for r in records} == set(DEMO_KEY_IDS[:2])
    assert all(r.file_name and r.file_name.startswith("demo-2025") for r in uploads)
    stamps = [r.uploaded_at for r in uploads] + [
        r.requested_at for r in records if isinstance(r, RequestRecord)
    ]
    assert after < min(stamps) and max(stamps) < now
    assert len({r.id for r in records}) == len(records)


def test_cli_top_up_brings_an_old_demo_database_to_today(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``make demo``'s command: a demo database written 20 days ago reaches today; rerun: 0 new."""
    url = f"sqlite:///{tmp_path}/demo.db"
    today = datetime.now(UTC).date()
    old_end = (today - timedelta(days=20)).isoformat()
    assert main(["demo-data", url, "--days", "10", "--end", old_end]) == 0
    assert main(["demo-data", url, "--top-up"]) == 0
    assert f"demo data {old_end}..{today}" in capsys.readouterr().out
    store = UsageStore(url)
    with store.engine.connect() as conn:
        newest = conn.execute(select(func.max(daily_usage.c.usage_date))).scalar_one()
    assert date.fromisoformat(str(newest)) >= today - timedelta(days=1)
    assert main(["demo-data", url, "--top-up"]) == 0
    assert capsys.readouterr().out.rstrip().endswith(" 0 rows new")
    store.dispose()


def test_cli_top_up_of_an_empty_database_writes_the_history(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No uploads yet: ``--top-up`` writes the ``--days`` history ending today."""
    url = f"sqlite:///{tmp_path}/new.db"
    assert main(["demo-data", url, "--top-up", "--days", "5"]) == 0
    today = datetime.now(UTC).date()
    assert f"demo data {today - timedelta(days=4)}..{today}" in capsys.readouterr().out


def test_cli_top_up_leaves_real_usage_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A database with uploads but no demo data gets none, and the flags it cannot mix refused."""
    url = f"sqlite:///{tmp_path}/app.db"
    store = UsageStore(url)
    store.write([UploadRecord(provider="s3", file_type="image/png", file_size=5)])
    assert main(["demo-data", url, "--top-up"]) == 0
    assert "no demo data written" in capsys.readouterr().out
    with store.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(file_uploads)).scalar_one() == 1
    store.dispose()
    for extra in (["--if-empty"], ["--end", "2025-01-01"]):
        with pytest.raises(SystemExit) as refused:
            main(["demo-data", url, "--top-up", *extra])
        assert refused.value.code == 2
        assert "--top-up" in capsys.readouterr().err
