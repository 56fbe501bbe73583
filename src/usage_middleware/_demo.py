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

A history written on one day would stop there; ``top_up_demo_data`` writes what came after the
last stored demo record up to now, each day from its own seeded stream, so the dashboard of a
demo started again weeks later still reaches today.
"""

from __future__ import annotations

import itertools
import math
import random
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone

from sqlalchemy import func, select

from ._records import RequestRecord, UploadRecord
from ._schema import api_requests, file_uploads
from ._storage.base import Scope
from ._store import UsageStore

__all__ = [
    "DEMO_KEY_IDS",
    "DemoSummary",
    "demo_key_id",
    "first_demo_day",
    "generate_demo_records",
    "generate_top_up_records",
    "has_uploads",
    "last_demo_record_at",
    "top_up_demo_data",
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


def _key_weights(seed: int, keys: int) -> tuple[tuple[uuid.UUID, ...], list[float]]:
    """The demo keys and their traffic shares: the first draws of the seed's stream."""
    if not 1 <= keys <= MAX_DEMO_KEYS:
        raise ValueError(f"keys must be in 1..{MAX_DEMO_KEYS}, got {keys}")
    rng = random.Random(seed)
    key_ids = DEMO_KEY_IDS[:keys]
    return key_ids, [rng.uniform(0.4, 1.6) for _ in key_ids]


def _day_records(
    rng: random.Random,
    day: date,
    key_ids: tuple[uuid.UUID, ...],
    key_weight: list[float],
    growth: float,
    names: Iterator[str],
) -> Iterator[tuple[datetime, list[UploadRecord | RequestRecord]]]:
    """One day's traffic of every key, as (time, records of one request) pairs."""
    for key_id, weight in zip(key_ids, key_weight, strict=True):
        mean = 9.0 * weight * growth * _WEEKDAY[day.weekday()]
        for _ in range(_poisson(rng, mean)):
            at = _pick_time(rng, day)
            yield at, list(_upload_request(rng, key_id, at, next(names)))
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
            yield at, [request]


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
    key_ids, key_weight = _key_weights(seed, keys)
    now = now or datetime.now(UTC)
    end = end or now.astimezone(UTC).date()
    start = first_demo_day(days, end)
    rng = random.Random(seed)
    for _ in key_ids:  # the key weights' draws: the stream goes on after them
        rng.random()
    names = map("{:06d}".format, itertools.count(1))
    for offset in range(days):
        day = start + timedelta(days=offset)
        growth = 0.5 + 0.5 * (offset + 1) / days
        # Records are always generated, then dropped when after ``now``: the random stream
        # (hence every id) does not depend on the time of day the command runs.
        for at, records in _day_records(rng, day, key_ids, key_weight, growth, names):
            if at < now:
                yield from records


def generate_top_up_records(
    *,
    after: datetime,
    keys: int = DEFAULT_KEYS,
    seed: int = 0,
    now: datetime | None = None,
) -> Iterator[UploadRecord | RequestRecord]:
    """Yield synthetic records dated after ``after`` and before ``now``: the days since a
    history was written.

    Each UTC day comes from its own stream seeded by ``seed`` and the date, at the traffic a
    history reaches on its last day, so topping up twice, or once a week later, writes the
    same records for the same hours, and the hours already written are never written again.
    """
    key_ids, key_weight = _key_weights(seed, keys)
    now = now or datetime.now(UTC)
    day, last = after.astimezone(UTC).date(), now.astimezone(UTC).date()
    while day <= last:
        rng = random.Random(f"usage-middleware demo {seed} {day.isoformat()}")
        names = map(day.strftime("%Y%m%d-{:03d}").format, itertools.count(1))
        for at, records in _day_records(rng, day, key_ids, key_weight, 1.0, names):
            if after < at < now:
                yield from records
        day += timedelta(days=1)


def _poisson(rng: random.Random, mean: float) -> int:
    """Knuth's method; means here are small (a few dozen at most)."""
    limit, k, p = math.exp(-mean), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


def _upload_request(
    rng: random.Random, key_id: uuid.UUID, at: datetime, serial: str
) -> Iterator[UploadRecord | RequestRecord]:
    """One ``POST /api/upload`` carrying 1 to 4 files to one provider, and its files."""
    n_files = rng.choices((1, 2, 3, 4), weights=(70, 15, 10, 5))[0]
    files = []
    for i in range(n_files):
        kind = rng.choices(_KINDS, weights=[k.weight for k in _KINDS])[0]
        size = max(1, int(rng.lognormvariate(math.log(kind.median_bytes), kind.spread)))
        files.append((kind, size, f"demo-{serial}-{i + 1}.{kind.ext}"))
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


def last_demo_record_at(store: UsageStore) -> datetime | None:
    """The time of the latest stored upload or request of a demo key (None: there is none)."""
    store.ensure_schema()
    demo = list(DEMO_KEY_IDS)
    with store.engine.connect() as conn:
        found = [
            conn.execute(select(func.max(column)).where(table.c.api_key_id.in_(demo))).scalar()
            for table, column in (
                (file_uploads, file_uploads.c.uploaded_at),
                (api_requests, api_requests.c.requested_at),
            )
        ]
    times = [t for t in found if t is not None]
    return max(times) if times else None


def _write(
    store: UsageStore, records: Iterable[UploadRecord | RequestRecord], batch_size: int
) -> tuple[int, int, int]:
    """Uploads, requests and new rows, written ``batch_size`` records at a time."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    uploads = requests = written = 0
    batch: list[UploadRecord | RequestRecord] = []
    for record in records:
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
    store.seal()  # history loaded at once is folded into the request rollups at once
    return uploads, requests, written


def top_up_demo_data(
    store: UsageStore,
    *,
    keys: int = DEFAULT_KEYS,
    seed: int = 0,
    now: datetime | None = None,
    batch_size: int = DEFAULT_BATCH,
) -> DemoSummary | None:
    """Write the demo records dated after the last stored one, up to ``now``.

    None when the store holds no demo record (nothing to continue). Idempotent: a second call
    finds the records the first wrote and adds only what is dated after them.
    """
    after = last_demo_record_at(store)
    if after is None:
        return None
    now = now or datetime.now(UTC)
    records = generate_top_up_records(after=after, keys=keys, seed=seed, now=now)
    uploads, requests, written = _write(store, records, batch_size)
    return DemoSummary(
        uploads=uploads,
        requests=requests,
        written=written,
        start=after.astimezone(UTC).date(),
        end=now.astimezone(UTC).date(),
        keys=keys,
    )


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
    records = generate_demo_records(days=days, keys=keys, seed=seed, end=end, now=now)
    uploads, requests, written = _write(store, records, batch_size)
    return DemoSummary(
        uploads=uploads,
        requests=requests,
        written=written,
        start=start,
        end=end,
        keys=keys,
    )
