"""Helpers for storage tests: random records, and the rollups recomputed from the raw rows."""

from __future__ import annotations

import random
import uuid
from collections import defaultdict
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import select
from support.endpoints import ENDPOINT_COUNTERS, ENDPOINT_LABELS, Rollups, rebuilt_endpoints

from usage_middleware import RequestRecord, UploadRecord, UsageStore
from usage_middleware._schema import (
    api_requests,
    daily_endpoint_usage,
    daily_request_usage,
    daily_usage,
    endpoint_routes,
    file_uploads,
    hourly_request_usage,
    hourly_usage,
    latency_bucket,
    monthly_endpoint_usage,
    monthly_request_usage,
    quarter_endpoint_usage,
    quarter_mismatch_usage,
    quarter_request_usage,
    quarter_usage,
)

UTC = timezone.utc
KEYS = [uuid.UUID(int=i + 1, version=4) for i in range(4)]
PROVIDERS = ["vercel", "s3", "cloudinary"]
TYPES = ["image/jpeg", "image/png", "application/pdf", "video/mp4"]
BASE = datetime(2025, 9, 1, 22, 30, tzinfo=UTC)
# Matched route templates, and raw paths that matched none (labelled "(unmatched)").
ROUTES = ["/files/{id}", "/upload", "/files", "/health"]
RAW_PATHS = ["/wp-login.php", "/.env", "/files/42/x"]
# Every standard method is its own label; the rest share "OTHER".
METHODS = ["GET", "GET", "POST", "PUT", "DELETE", "HEAD", "PROPFIND", "BREW"]


def random_upload(rng: random.Random, spread_hours: float = 6.0) -> UploadRecord:
    """An upload with a small key space (so batches share rollup keys) around ``BASE``."""
    return UploadRecord(
        id=uuid.UUID(int=rng.getrandbits(128), version=4),
        api_key_id=rng.choice([*KEYS, None]),
        provider=rng.choice(PROVIDERS),
        file_type=rng.choice(TYPES),
        file_size=rng.randrange(0, 10_000_000),
        upload_status=rng.choice(["success", "success", "failed"]),
        uploaded_at=BASE + timedelta(seconds=rng.random() * spread_hours * 3600),
        declared_type=rng.choice([None, None, "image/png", "application/pdf"]),
    )


def random_request(rng: random.Random, spread_hours: float = 6.0) -> RequestRecord:
    """A request over a few routes, raw unmatched paths and methods (standard and not)."""
    matched = rng.random() < 0.85
    return RequestRecord(
        id=uuid.UUID(int=rng.getrandbits(128), version=4),
        api_key_id=rng.choice([*KEYS, None]),
        method=rng.choice(METHODS),
        path=rng.choice(ROUTES if matched else RAW_PATHS),
        route_matched=matched,
        status_code=rng.choice([200, 201, 404, 500]),
        response_time_ms=rng.choice([0.0, 0.5, 3.25, 120.0, rng.random() * 1000]),
        request_size=rng.randrange(0, 100_000),
        response_size=rng.randrange(0, 100_000),
        requested_at=BASE + timedelta(seconds=rng.random() * spread_hours * 3600),
    )


def _hour(at: datetime) -> datetime:
    return at.replace(minute=0, second=0, microsecond=0)


def _quarter(at: datetime) -> datetime:
    return at.replace(minute=at.minute - at.minute % 15, second=0, microsecond=0)


#: The engines whose request rollups are sealed behind the writes (``rollup_seals``).
SEALED = ("postgresql", "sqlite")

#: Past every request of the tests: ``store.seal(FAR)`` folds every stored request into the
#: rollups (PostgreSQL, SQLite) and makes every later one late (written with its rollups).
FAR = datetime(2100, 1, 1, tzinfo=timezone.utc)


def _instant(store: UsageStore, dataset: str) -> datetime | None:
    if store.dialect not in SEALED:
        return None
    from sqlalchemy import text

    if store.dialect == "sqlite" and dataset == "request_hours":
        dataset = "requests"  # SQLite's hourly and daily rollups follow the seal instant
    with store.engine.connect() as conn:
        value = conn.execute(
            text("SELECT sealed_before FROM rollup_seals WHERE dataset = :d"), {"d": dataset}
        ).scalar_one_or_none()
    if value is None:  # a schema from before this instant: its tiers follow the next finer one
        return _instant(store, {"request_days": "request_hours"}.get(dataset, "requests"))
    if isinstance(value, str):  # SQLite keeps UTC text
        return datetime.fromisoformat(value).replace(tzinfo=UTC)
    assert isinstance(value, datetime)
    return value


def sealed_instant(store: UsageStore) -> datetime | None:
    """PostgreSQL and SQLite: the instant before which the fine request rollups (quarter
    hours, routes) hold every raw row and after which none (``rollup_seals``); elsewhere None
    (every row is rolled up as it is written)."""
    return _instant(store, "requests")


def sealed_hours(store: UsageStore) -> datetime | None:
    """The same for the coarse request rollups (hours, days): PostgreSQL's hour instant,
    SQLite's seal instant; elsewhere None."""
    return _instant(store, "request_hours")


def sealed_days(store: UsageStore) -> datetime | None:
    """The same for the monthly request rollups: the month instant (PostgreSQL, SQLite);
    elsewhere None."""
    return _instant(store, "request_days")


#: The request rollups that the hour instant bounds on PostgreSQL.
COARSE = frozenset(
    ("daily_request_usage", "hourly_request_usage", "daily_endpoint_usage")
)  # fmt: skip
#: The request rollups that the month instant bounds (PostgreSQL, SQLite); the others, the seal
#: instant.
MONTHLY = frozenset(("monthly_request_usage", "monthly_endpoint_usage"))


def _instant_of(store: UsageStore, table: str) -> datetime | None:
    """The instant before which request rollup ``table`` holds every stored request."""
    if table in MONTHLY:
        return sealed_days(store)
    return (sealed_hours if table in COARSE else sealed_instant)(store)


def sealed_requests(store: UsageStore, table: str) -> list[dict[str, Any]]:
    """The stored requests that request rollup ``table`` holds: on PostgreSQL and SQLite those
    before its instant, elsewhere all."""
    from support.endpoints import stored_request_rows

    instant = _instant_of(store, table)
    return [r for r in stored_request_rows(store) if instant is None or r["requested_at"] < instant]


def expected_rollups(store: UsageStore) -> Rollups:
    """Every rollup as GROUP BY over the raw rows, computed here in Python (the endpoint
    rollups as :func:`rebuilt_endpoints`: exact while no key-day has more named routes than
    the cap, or when every request arrived in one batch). On PostgreSQL and SQLite a request
    rollup holds the requests before its instant (:func:`sealed_instant`, :func:`sealed_hours`,
    :func:`sealed_days`), and only those."""
    out: dict[str, dict[tuple[Any, ...], list[int]]] = {
        name: defaultdict(lambda: [0, 0, 0, 0, 0])
        for name in (
            "daily_usage",
            "hourly_usage",
            "monthly_request_usage",
            "daily_request_usage",
            "hourly_request_usage",
            "quarter_usage",
            "quarter_request_usage",
            "quarter_mismatch_usage",
        )
    }
    instants = {name: _instant_of(store, name) for name in (*COARSE, *MONTHLY, "quarter")}
    with store.engine.connect() as conn:
        requests = [dict(r) for r in conn.execute(select(api_requests)).mappings()]
        for r in conn.execute(select(file_uploads)).mappings():
            at = r["uploaded_at"]
            ok = r["upload_status"] == "success"
            for name, when in (
                ("daily_usage", at.date()),
                ("hourly_usage", _hour(at)),
                ("quarter_usage", _quarter(at)),
            ):
                acc = out[name][(r["api_key_id"], when, r["provider"], r["file_type"])]
                for i, v in enumerate((1, r["file_size"], ok, not ok)):
                    acc[i] += v
            declared = r["declared_type"]
            if declared is not None and declared != r["file_type"]:
                key = (r["api_key_id"], _quarter(at), r["provider"], r["file_type"], declared)
                out["quarter_mismatch_usage"][key][0] += 1
        for r in requests:
            at = r["requested_at"]
            ms = r["response_time_ms"]
            values = (
                1,
                r["status_code"] >= 400,
                round(ms * 1000),
                r["request_size"],
                r["response_size"],
            )
            for name, when in (
                ("monthly_request_usage", at.date().replace(day=1)),
                ("daily_request_usage", at.date()),
                ("hourly_request_usage", _hour(at)),
                ("quarter_request_usage", _quarter(at)),
            ):
                instant = instants.get(name, instants["quarter"])
                if instant is not None and at >= instant:
                    continue
                acc = out[name][(r["api_key_id"], when, latency_bucket(ms))]
                for i, v in enumerate(values):
                    acc[i] += v
    sizes = {"daily_usage": 4, "hourly_usage": 4, "quarter_usage": 4, "quarter_mismatch_usage": 1}
    return {
        **{
            name: {k: tuple(v[: sizes.get(name, 5)]) for k, v in rows.items()}
            for name, rows in out.items()
        },
        **{
            name: rows
            for instant in set(instants.values())
            for name, rows in rebuilt_endpoints(
                [r for r in requests if instant is None or r["requested_at"] < instant]
            ).items()
            if instants.get(name, instants["quarter"]) == instant
        },
    }


def stored_rollups(store: UsageStore) -> Rollups:
    """Every rollup table as stored (``endpoint_routes`` with no counters)."""
    upload_counters = ("total_uploads", "total_file_size", "successful_requests", "failed_requests")
    request_counters = (
        "total_requests",
        "error_requests",
        "total_response_us",
        "total_request_bytes",
        "total_response_bytes",
    )
    spec = [
        (daily_usage, ("api_key_id", "usage_date", "provider", "file_type"), upload_counters),
        (hourly_usage, ("api_key_id", "usage_hour", "provider", "file_type"), upload_counters),
        (monthly_request_usage, ("api_key_id", "usage_month", "latency_bucket"), request_counters),
        (daily_request_usage, ("api_key_id", "usage_date", "latency_bucket"), request_counters),
        (hourly_request_usage, ("api_key_id", "usage_hour", "latency_bucket"), request_counters),
        (quarter_usage, ("api_key_id", "usage_quarter", "provider", "file_type"), upload_counters),
        (
            quarter_request_usage,
            ("api_key_id", "usage_quarter", "latency_bucket"),
            request_counters,
        ),
        (
            quarter_mismatch_usage,
            ("api_key_id", "usage_quarter", "provider", "file_type", "declared_type"),
            ("total_uploads",),
        ),
        *(
            (table, ("api_key_id", when, *ENDPOINT_LABELS), ENDPOINT_COUNTERS)
            for table, when in (
                (monthly_endpoint_usage, "usage_month"),
                (daily_endpoint_usage, "usage_date"),
                (quarter_endpoint_usage, "usage_quarter"),
            )
        ),
        (endpoint_routes, ("api_key_id", "usage_date", "route"), ()),
    ]
    out: dict[str, dict[tuple[Any, ...], tuple[int, ...]]] = {}
    with store.engine.connect() as conn:
        for table, keys, counters in spec:
            rows: dict[tuple[Any, ...], tuple[int, ...]] = {}
            for r in conn.execute(select(table)).mappings():
                key = tuple(r[k] for k in keys)
                assert key not in rows, f"duplicate rollup key in {table.name}: {key}"
                rows[key] = tuple(int(r[c]) for c in counters)
            out[table.name] = rows
    return out


def assert_rollups_exact(store: UsageStore) -> None:
    """Every rollup equals GROUP BY over the raw rows."""
    expected = expected_rollups(store)
    stored = stored_rollups(store)
    for name in expected:
        assert stored[name] == expected[name], f"{name} differs from the raw rows"


def raw_counts(store: UsageStore) -> tuple[int, int]:
    from sqlalchemy import func

    with store.engine.connect() as conn:
        uploads = conn.execute(select(func.count()).select_from(file_uploads)).scalar_one()
        requests = conn.execute(select(func.count()).select_from(api_requests)).scalar_one()
    return uploads, requests
