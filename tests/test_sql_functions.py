"""The SQL functions of sql/usage_tracking_schema.sql against a computation from the records."""

from __future__ import annotations

import random
import uuid
from collections import defaultdict
from collections.abc import Iterator
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import text

from usage_middleware import UploadRecord, UsageStore

pytestmark = pytest.mark.postgres

UTC = timezone.utc
KEYS = [uuid.UUID(int=i, version=4) for i in (1, 2, 3)]
PROVIDERS = ["vercel", "s3", "cloudinary"]
TYPES = ["image/jpeg", "image/png", "application/pdf", "video/mp4"]
START = date(2025, 8, 25)


@pytest.fixture(scope="module")
def loaded() -> Iterator[tuple[UsageStore, list[UploadRecord]]]:
    """One PostgreSQL database with ~3,000 uploads over 20 days, shared by this module."""
    from support.pg import drop_pg_database, make_pg_database

    url = make_pg_database()
    store = UsageStore(url)
    rng = random.Random(11)
    records = [
        UploadRecord(
            api_key_id=rng.choice([*KEYS, None]),
            provider=rng.choice(PROVIDERS),
            file_type=rng.choice(TYPES),
            file_size=rng.randrange(1, 5_000_000),
            upload_status=rng.choice(["success", "success", "success", "failed"]),
            uploaded_at=datetime.combine(START, datetime.min.time(), UTC)
            + timedelta(seconds=rng.random() * 20 * 86400),
        )
        for _ in range(3000)
    ]
    # Edges: the first and last instant of a day belong to that UTC day.
    records.append(
        UploadRecord(
            provider="s3",
            file_type="image/png",
            file_size=5,
            uploaded_at=datetime(2025, 9, 1, tzinfo=UTC),
        )
    )
    records.append(
        UploadRecord(
            provider="s3",
            file_type="image/png",
            file_size=7,
            uploaded_at=datetime(2025, 9, 1, 23, 59, 59, 999999, tzinfo=UTC),
        )
    )
    store.write(records)
    try:
        yield store, records
    finally:
        store.dispose()
        drop_pg_database(url)


def _matches(
    r: UploadRecord,
    start: date,
    end: date,
    provider: str | None,
    file_type: str | None,
    key: uuid.UUID | None,
) -> bool:
    if not start <= r.uploaded_at.date() <= end:
        return False
    if provider is not None and r.provider != provider:
        return False
    if key is not None and r.api_key_id != key:
        return False
    if file_type is not None:
        if file_type.endswith("/*"):
            return r.file_type.startswith(file_type[:-1])
        return r.file_type == file_type
    return True


def _call(store: UsageStore, sql: str, **params: Any) -> list[tuple[Any, ...]]:
    with store.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text(sql), params)]


CASES = [
    (date(2025, 9, 1), date(2025, 9, 1), None, None, None),
    (date(2025, 8, 25), date(2025, 9, 13), None, None, None),
    (date(2025, 8, 28), date(2025, 9, 3), "s3", None, None),
    (date(2025, 8, 28), date(2025, 9, 3), None, "image/*", None),
    (date(2025, 8, 28), date(2025, 9, 3), None, "application/pdf", KEYS[0]),
    (date(2025, 8, 20), date(2025, 9, 30), "vercel", "image/png", KEYS[1]),
    (date(2024, 1, 1), date(2024, 1, 31), None, None, None),
]


@pytest.mark.parametrize(("start", "end", "provider", "file_type", "key"), CASES)
def test_get_usage_by_date_range_matches_records(
    loaded: tuple[UsageStore, list[UploadRecord]],
    start: date,
    end: date,
    provider: str | None,
    file_type: str | None,
    key: uuid.UUID | None,
) -> None:
    """Per-day rows equal the records' totals for the inclusive UTC range and the filters."""
    store, records = loaded
    expected: dict[tuple[Any, ...], list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for r in records:
        if _matches(r, start, end, provider, file_type, key):
            acc = expected[(r.uploaded_at.date(), r.provider, r.file_type)]
            ok = r.upload_status == "success"
            for i, v in enumerate((1, r.file_size, ok, not ok)):
                acc[i] += v
    rows = _call(
        store,
        "SELECT * FROM public.get_usage_by_date_range(:s, :e, :p, :t, :k)",
        s=start,
        e=end,
        p=provider,
        t=file_type,
        k=key,
    )
    assert {row[:3]: list(row[3:]) for row in rows} == dict(expected)
    assert [row[:3] for row in rows] == sorted(row[:3] for row in rows)


def _breakdown(records: list[UploadRecord], field: str, **filters: Any) -> dict[str, list[int]]:
    out: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for r in records:
        if _matches(r, **filters):
            out[getattr(r, field)][0] += 1
            out[getattr(r, field)][1] += r.file_size
    return dict(out)


def _check_breakdown(rows: list[tuple[Any, ...]], expected: dict[str, list[int]]) -> None:
    assert {row[0]: [row[1], row[2]] for row in rows} == expected
    total = sum(v[0] for v in expected.values())
    for name, count, _size, pct in rows:
        assert isinstance(pct, Decimal)
        assert pct == round(Decimal(100 * count) / Decimal(total), 2), name
    if rows:
        assert abs(sum(row[3] for row in rows) - 100) <= Decimal("0.01") * len(rows)
    assert [row[1] for row in rows] == sorted((row[1] for row in rows), reverse=True)


@pytest.mark.parametrize(("start", "end", "provider", "file_type", "key"), CASES)
def test_breakdowns_match_records(
    loaded: tuple[UsageStore, list[UploadRecord]],
    start: date,
    end: date,
    provider: str | None,
    file_type: str | None,
    key: uuid.UUID | None,
) -> None:
    """File type and provider breakdowns: counts, sizes, 2-place percentages summing to 100."""
    store, records = loaded
    by_type = _call(
        store,
        "SELECT * FROM public.get_file_type_breakdown(:s, :e, :k, :p)",
        s=start,
        e=end,
        k=key,
        p=provider,
    )
    _check_breakdown(
        by_type,
        _breakdown(
            records, "file_type", start=start, end=end, provider=provider, file_type=None, key=key
        ),
    )
    by_provider = _call(
        store,
        "SELECT * FROM public.get_provider_breakdown(:s, :e, :k, :t)",
        s=start,
        e=end,
        k=key,
        t=file_type,
    )
    _check_breakdown(
        by_provider,
        _breakdown(
            records, "provider", start=start, end=end, provider=None, file_type=file_type, key=key
        ),
    )


def test_defaults_mean_no_filter(loaded: tuple[UsageStore, list[UploadRecord]]) -> None:
    """Called with dates only, the functions cover every key, provider and type."""
    store, records = loaded
    rows = _call(
        store,
        "SELECT sum(total_uploads) FROM public.get_usage_by_date_range('2025-01-01', '2025-12-31')",
    )
    assert rows[0][0] == len(records)
    rows = _call(
        store,
        "SELECT sum(upload_count) FROM public.get_provider_breakdown('2025-01-01', '2025-12-31')",
    )
    assert rows[0][0] == len(records)


def test_functions_are_invoker_with_pinned_search_path(
    loaded: tuple[UsageStore, list[UploadRecord]],
) -> None:
    """Each function is SECURITY INVOKER, has search_path='' and is not executable by PUBLIC."""
    store, _ = loaded
    rows = _call(
        store,
        "SELECT proname, prosecdef, proconfig, proacl::text[] FROM pg_proc "
        "WHERE pronamespace = 'public'::regnamespace AND proname LIKE 'get\\_%'",
    )
    assert {r[0] for r in rows} == {
        "get_usage_by_date_range",
        "get_file_type_breakdown",
        "get_provider_breakdown",
        "get_request_breakdown",
    }
    for name, secdef, config, acl in rows:
        assert secdef is False, name
        assert config == ['search_path=""'], name
        assert acl is not None and not any(item.startswith("=") for item in acl), name
