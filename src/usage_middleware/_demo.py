"""Synthetic usage history for examples and screenshots: the ``demo-data`` command.

Everything written here is recognisably fake, so it can never be mistaken for (or mixed
silently into) real usage:

- uploads and requests belong to dedicated demo API key ids (``DEMO_KEY_IDS``, all of the form
  ``00000000-de30-4000-8000-0000000000NN``);
- every file name starts with ``demo-``.

The output is deterministic for a given ``seed`` and ``end`` date, ids included, so running the
command twice with the same arguments writes nothing the second time (``store.write`` is
idempotent by id). Rows go through ``store.write`` in batches, rollups included, exactly like
the recorder's.
"""

from __future__ import annotations

import math
import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone

from ._records import RequestRecord, UploadRecord
from ._storage.base import Scope
from ._store import UsageStore

__all__ = [
    "DEMO_KEY_IDS",
    "DemoSummary",
    "demo_key_id",
    "first_demo_day",
    "generate_demo_records",
    "has_uploads",
    "write_demo_data",
]

UTC = timezone.utc
MAX_DEMO_KEYS = 99
DEFAULT_DAYS = 365
DEFAULT_KEYS = 3
DEFAULT_BATCH = 5000


def demo_key_id(n: int) -> uuid.UUID:
    """The id of demo API key ``n`` (1-based): ``00000000-de30-4000-8000-0000000000NN``."""
    if not 1 <= n <= MAX_DEMO_KEYS:
        raise ValueError(f"demo key number must be in 1..{MAX_DEMO_KEYS}, got {n}")
    return uuid.UUID(f"00000000-de30-4000-8000-{n:012d}")


DEMO_KEY_IDS = tuple(demo_key_id(n) for n in range(1, MAX_DEMO_KEYS + 1))
# Record ids are UUIDv7, milliseconds since the Unix epoch: no demo day before it.
FIRST_DAY = date(1970, 1, 1)


def first_demo_day(days: int, end: date) -> date:
    """The first of ``days`` days ending on ``end``; ValueError when that is before 1970-01-01."""
    if days < 1:
        raise ValueError(f"days must be >= 1, got {days}")
    if end < FIRST_DAY:
        raise ValueError(f"the last day {end} is before {FIRST_DAY}, where record ids start")
    most = end.toordinal() - FIRST_DAY.toordinal() + 1
    if days > most:
        raise ValueError(
            f"{days} days ending on {end} would start before {FIRST_DAY}, where record ids "
            f"start: at most {most} days"
        )
    return end - timedelta(days=days - 1)


@dataclass(frozen=True)
class _FileKind:
    mime: str
    ext: str
    weight: float
    median_bytes: float  # of a log-normal size distribution
    spread: float


_KINDS = (
    _FileKind("image/jpeg", "jpg", 30, 900_000, 0.8),
    _FileKind("image/png", "png", 18, 350_000, 1.0),
    _FileKind("image/webp", "webp", 9, 180_000, 0.7),
    _FileKind("image/gif", "gif", 3, 1_200_000, 0.9),
    _FileKind("image/svg+xml", "svg", 2, 12_000, 0.8),
    _FileKind("application/pdf", "pdf", 12, 600_000, 1.1),
    _FileKind(
        "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        "docx",
        4,
        90_000,
        0.9,
    ),
    _FileKind("application/zip", "zip", 3, 8_000_000, 1.2),
    _FileKind("text/csv", "csv", 5, 40_000, 1.3),
    _FileKind("video/mp4", "mp4", 6, 25_000_000, 1.0),
    _FileKind("audio/mpeg", "mp3", 3, 4_000_000, 0.6),
)

# Each provider's share of traffic, its upload size limit, and the types it takes.
_PROVIDERS: tuple[tuple[str, float, int], ...] = (
    ("vercel", 45, 4_500_000),
    ("s3", 35, 5_000_000_000),
    ("cloudinary", 20, 10_000_000),
)

# Relative traffic per UTC hour: a working-day curve, quiet at night.
_HOURLY = tuple(0.25 + math.exp(-(((h - 14) / 4.0) ** 2)) for h in range(24))
_WEEKDAY = (1.0, 1.05, 1.05, 1.0, 0.9, 0.45, 0.4)

_OTHER_ENDPOINTS = (
    ("GET", "/api/files", 200, 18.0),
    ("GET", "/api/files/{file_id}", 200, 9.0),
    ("DELETE", "/api/files/{file_id}", 204, 14.0),
    ("GET", "/api/files/{file_id}", 404, 4.0),
)


@dataclass(frozen=True)
class DemoSummary:
    """What ``write_demo_data`` wrote (or would have written)."""

    uploads: int
    requests: int
    written: int
    start: date
    end: date
    keys: int


def _uuid7(rng: random.Random, at: datetime) -> uuid.UUID:
    """A version-7 UUID for ``at`` whose random bits come from ``rng`` (so reruns match)."""
    ms = int(at.timestamp() * 1000)
    rand_a = rng.getrandbits(12)
    rand_b = rng.getrandbits(62)
    value = (ms & (2**48 - 1)) << 80 | 0x7 << 76 | rand_a << 64 | 0b10 << 62 | rand_b
    return uuid.UUID(int=value)


def _pick_time(rng: random.Random, day: date) -> datetime:
    hour = rng.choices(range(24), weights=_HOURLY)[0]
    return datetime.combine(day, time(hour), UTC) + timedelta(seconds=rng.uniform(0, 3600))


def generate_demo_records(
    *,
    days: int = DEFAULT_DAYS,
    keys: int = DEFAULT_KEYS,
    seed: int = 0,
    end: date | None = None,
    now: datetime | None = None,
) -> Iterator[UploadRecord | RequestRecord]:
    """Yield ``days`` days of synthetic uploads and requests ending on ``end`` (UTC dates).

    Traffic grows over the period, follows a weekly and daily rhythm, differs per demo key,
    and includes failures (files over a provider's size limit, server errors). Nothing is
    dated after ``now`` (default: the current time).
    """
    if not 1 <= keys <= MAX_DEMO_KEYS:
        raise ValueError(f"keys must be in 1..{MAX_DEMO_KEYS}, got {keys}")
    now = now or datetime.now(UTC)
    end = end or now.astimezone(UTC).date()
    start = first_demo_day(days, end)
    rng = random.Random(seed)
    key_ids = DEMO_KEY_IDS[:keys]
    key_weight = [rng.uniform(0.4, 1.6) for _ in key_ids]
    serial = 0
    for offset in range(days):
        day = start + timedelta(days=offset)
        growth = 0.5 + 0.5 * (offset + 1) / days
        for key_id, weight in zip(key_ids, key_weight, strict=True):
            mean = 9.0 * weight * growth * _WEEKDAY[day.weekday()]
            # Records are always generated, then dropped when after ``now``: the random stream
            # (hence every id) does not depend on the time of day the command runs.
            for _ in range(_poisson(rng, mean)):
                at = _pick_time(rng, day)
                serial += 1
                records = list(_upload_request(rng, key_id, at, serial))
                if at < now:
                    yield from records
            for _ in range(_poisson(rng, mean * 1.5)):
                at = _pick_time(rng, day)
                method, path, status, ms = rng.choices(_OTHER_ENDPOINTS, weights=(60, 25, 8, 7))[0]
                request = RequestRecord(
                    id=_uuid7(rng, at),
                    api_key_id=key_id,
                    method=method,
                    path=path,
                    status_code=status,
                    response_time_ms=round(rng.lognormvariate(math.log(ms), 0.5), 3),
                    request_size=0,
                    response_size=0 if status == 204 else rng.randint(200, 20_000),
                    requested_at=at,
                )
                if at < now:
                    yield request


def _poisson(rng: random.Random, mean: float) -> int:
    """Knuth's method; means here are small (a few dozen at most)."""
    limit, k, p = math.exp(-mean), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


def _upload_request(
    rng: random.Random, key_id: uuid.UUID, at: datetime, serial: int
) -> Iterator[UploadRecord | RequestRecord]:
    """One ``POST /api/upload`` carrying 1 to 4 files to one provider, and its files."""
    n_files = rng.choices((1, 2, 3, 4), weights=(70, 15, 10, 5))[0]
    files = []
    for i in range(n_files):
        kind = rng.choices(_KINDS, weights=[k.weight for k in _KINDS])[0]
        size = max(1, int(rng.lognormvariate(math.log(kind.median_bytes), kind.spread)))
        files.append((kind, size, f"demo-{serial:06d}-{i + 1}.{kind.ext}"))
    total = sum(size for _, size, _ in files)
    # Clients mostly send large files to S3; the rest now and then hit a provider's limit.
    if total > 4_000_000 and rng.random() < 0.85:
        provider, limit = "s3", _PROVIDERS[1][2]
    else:
        provider, _, limit = rng.choices(_PROVIDERS, weights=[p[1] for p in _PROVIDERS])[0]
    too_big = [name for _, size, name in files if size > limit]
    server_error = not too_big and rng.random() < 0.01
    if too_big:
        status, error = 413, f"{too_big[0]} exceeds the {provider} limit of {limit:,} bytes"
    elif server_error:
        status, error = 502, f"{provider} storage backend unavailable"
    else:
        status, error = 201, None
    ms = 40 + total / 20_000 * rng.uniform(0.5, 1.5)  # about 20 MB/s
    request_id = _uuid7(rng, at)
    yield RequestRecord(
        id=request_id,
        api_key_id=key_id,
        method="POST",
        path="/api/upload",
        status_code=status,
        response_time_ms=round(ms, 3),
        request_size=total + 200 * n_files,
        response_size=rng.randint(150, 400) * n_files,
        requested_at=at,
    )
    for kind, size, name in files:
        yield UploadRecord(
            id=_uuid7(rng, at),
            api_key_id=key_id,
            request_id=request_id,
            provider=provider,
            file_type=kind.mime,
            file_size=size,
            file_name=name,
            upload_status="failed" if error else "success",
            error_message=error,
            uploaded_at=at,
        )


def has_uploads(store: UsageStore) -> bool:
    """Whether the store counts any upload, ever (the schema is created if missing)."""
    store.ensure_schema()
    ever = [datetime(1970, 1, 1, tzinfo=UTC), datetime(2200, 1, 1, tzinfo=UTC)]
    return any(row[3] for row in store.backend.upload_rows(Scope(), ever))


def write_demo_data(
    store: UsageStore,
    *,
    days: int = DEFAULT_DAYS,
    keys: int = DEFAULT_KEYS,
    seed: int = 0,
    end: date | None = None,
    now: datetime | None = None,
    batch_size: int = DEFAULT_BATCH,
) -> DemoSummary:
    """Write synthetic history into ``store`` through ``store.write``, ``batch_size`` at a time."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    now = now or datetime.now(UTC)
    end = end or now.astimezone(UTC).date()
    start = first_demo_day(days, end)
    uploads = requests = written = 0
    batch: list[UploadRecord | RequestRecord] = []
    for record in generate_demo_records(days=days, keys=keys, seed=seed, end=end, now=now):
        if isinstance(record, UploadRecord):
            uploads += 1
        else:
            requests += 1
        batch.append(record)
        if len(batch) >= batch_size:
            written += store.write(batch)
            batch = []
    if batch:
        written += store.write(batch)
    return DemoSummary(
        uploads=uploads,
        requests=requests,
        written=written,
        start=start,
        end=end,
        keys=keys,
    )
