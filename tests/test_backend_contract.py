"""One contract, every storage backend: what the recorder and the read path rely on.

The same tests run on the in-memory backend, SQLite, chdb (embedded ClickHouse) and PostgreSQL;
the read answers of each are also compared with an independent aggregation in test_queries.py.
"""

from __future__ import annotations

import dataclasses
import os
import random
import uuid
from collections.abc import Iterator, Sequence
from datetime import date, datetime, timedelta, timezone
from typing import Any

import pytest
from support.pg import drop_pg_database, make_pg_database
from support.rollups import SEALED

from usage_middleware import ConfigurationError, RequestRecord, UploadRecord, UsageStore
from usage_middleware._schema import ROUTES_PER_KEY_DAY
from usage_middleware._storage.base import Backend, RequestFilter, Scope
from usage_middleware._timerange import QuerySpec, periods
from usage_middleware.testing import MemoryBackend

UTC = timezone.utc
T0 = datetime(2025, 6, 1, 12, tzinfo=UTC)
KEY = uuid.UUID("22222222-2222-4222-8222-222222222222")


@pytest.fixture(
    params=["memory", "sqlite", "chdb", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def any_store(request: pytest.FixtureRequest, tmp_path: os.PathLike[str]) -> Iterator[UsageStore]:
    """A store with its schema, once per backend."""
    url = None
    if request.param == "memory":
        s = UsageStore("memory://")
    elif request.param == "chdb":
        pytest.importorskip("chdb")
        s = UsageStore(
            f"chdb:///{os.path.join(tmp_path, 'ch')}", engine_options={"visibility_margin": 0}
        )
    elif request.param == "sqlite":
        s = UsageStore(f"sqlite:///{os.path.join(tmp_path, 'usage.db')}")
    else:
        url = make_pg_database()
        s = UsageStore(url)
    try:
        s.create_schema()
        yield s
    finally:
        s.dispose()
        if url is not None:
            drop_pg_database(url)


def upload(**fields: object) -> UploadRecord:
    values: dict[str, object] = {
        "api_key_id": KEY, "provider": "s3", "file_type": "image/png", "file_size": 10,
        "uploaded_at": T0,
    }  # fmt: skip
    values.update(fields)
    return UploadRecord(**values)  # type: ignore[arg-type]


def request(**fields: object) -> RequestRecord:
    values: dict[str, object] = {
        "api_key_id": KEY, "method": "POST", "path": "/upload", "status_code": 200,
        "response_time_ms": 12.5, "request_size": 100, "response_size": 20, "requested_at": T0,
    }  # fmt: skip
    values.update(fields)
    return RequestRecord(**values)  # type: ignore[arg-type]


def totals(store: UsageStore, scope: Scope | None = None) -> list[int]:
    rows = store.backend.upload_rows(scope or Scope(), [T0 - timedelta(days=1), T0 + timedelta(1)])
    out = [0, 0, 0, 0]
    for p, _, _, *counts in rows:
        if p is not None:
            out = [a + b for a, b in zip(out, counts, strict=True)]
    return out


def test_the_backend_implements_the_protocol(any_store: UsageStore) -> None:
    """Every engine is a Backend: writer and reader sides, health and fork hooks."""
    assert isinstance(any_store.backend, Backend)
    assert any_store.has_schema()
    any_store.ping()


def test_writes_are_idempotent_by_id(any_store: UsageStore) -> None:
    """A batch counts its new rows once; the same batch again, or regrouped, adds nothing."""
    batch = [upload(), upload(file_size=5, upload_status="failed"), request(), request()]
    assert any_store.write(batch) == 4
    assert any_store.write(batch) == 0
    assert any_store.write([batch[1], batch[3], upload(file_size=1)]) == 1
    assert totals(any_store) == [3, 16, 2, 1]


def test_stored_rows_do_not_follow_later_mutation(any_store: UsageStore) -> None:
    """A record changed after it was written does not change what is stored."""
    record = upload(file_size=7)
    any_store.write([record])
    record.file_size = 1000
    assert totals(any_store)[:2] == [1, 7]


def test_scope_filters_keys_providers_and_type_families(any_store: UsageStore) -> None:
    """Keys, providers and exact or family types filter alike on every backend."""
    other = uuid.uuid4()
    any_store.write([
        upload(), upload(api_key_id=other), upload(api_key_id=None), upload(provider="vercel"),
        upload(file_type="image/jpeg"), upload(file_type="application/pdf"),
        upload(file_type="imagex/png"),
    ])  # fmt: skip
    assert totals(any_store)[0] == 7
    assert totals(any_store, Scope(keys=(KEY,)))[0] == 5
    assert totals(any_store, Scope(keys=()))[0] == 0
    assert totals(any_store, Scope(providers=("vercel",)))[0] == 1
    assert totals(any_store, Scope(file_types=("image/*",)))[0] == 5
    assert totals(any_store, Scope(file_types=("application/pdf", "imagex/*")))[0] == 2


def test_request_histogram_counts_errors_and_exact_sums(any_store: UsageStore) -> None:
    """Requests give exact counts and microsecond sums, bucketed by latency."""
    any_store.write([
        request(), request(status_code=404, response_time_ms=3.25),
        request(status_code=500, api_key_id=None),
        request(requested_at=T0 + timedelta(days=3)),
    ])  # fmt: skip
    h = any_store.backend.request_histogram(Scope(), T0 - timedelta(hours=1), T0 + timedelta(1))
    assert (h.requests, h.errors, h.response_us) == (3, 2, 12500 + 3250 + 12500)
    assert sum(h.buckets.values()) == 3
    keyed = any_store.backend.request_histogram(Scope(keys=(KEY,)), T0, T0 + timedelta(1))
    assert (keyed.requests, keyed.errors) == (2, 1)


def test_a_forked_child_writes_through_its_own_connections(any_store: UsageStore) -> None:
    """After the fork hooks a child process writes and reads without the parent's connections."""
    if any_store.dialect == "chdb":
        pytest.skip("chdb's embedded server does not survive fork (test_clickhouse: it refuses)")
    any_store.write([upload()])
    any_store.backend.before_fork()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            any_store.backend.after_fork()
            any_store.write([upload(file_size=1)])
            code = 0 if totals(any_store)[0] == 2 else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_memory_urls_build_the_in_memory_backend() -> None:
    """``memory://`` is the shipped double; SQL engine options do not apply to it."""
    assert isinstance(UsageStore("memory://").backend, MemoryBackend)
    with pytest.raises(ConfigurationError, match="engine_options"):
        UsageStore("memory://", engine_options={"pool_size": 1})
    with pytest.raises(AttributeError, match="no SQLAlchemy engine"):
        _ = UsageStore("memory://").engine


def test_memory_backend_lists_what_it_holds() -> None:
    """The double shows its rows, oldest first, as copies."""
    store = UsageStore("memory://")
    later, sooner = upload(uploaded_at=T0 + timedelta(1)), upload()
    store.write([later, sooner, request()])
    backend = store.backend
    assert isinstance(backend, MemoryBackend)
    assert [u.id for u in backend.uploads()] == [sooner.id, later.id]
    assert [dataclasses.asdict(r) for r in backend.requests()] == [
        dataclasses.asdict(r)
        for r in store.backend.requests()  # type: ignore[attr-defined]
    ]


def test_failure_export_and_mismatch_primitives_agree(any_store: UsageStore) -> None:
    """failure_rows pages newest first strictly after a position; export_rows gives text ids
    and times oldest first after a (time, id); mismatch_rows counts differing declared types."""
    other = uuid.uuid4()
    records: list[UploadRecord | RequestRecord] = [
        UploadRecord(api_key_id=KEY, provider="s3", file_type="image/png", file_size=1,
                     upload_status="failed", declared_type="image/gif", uploaded_at=T0),
        UploadRecord(api_key_id=KEY, provider="r2", file_type="image/png", file_size=2,
                     declared_type="image/gif", uploaded_at=T0 + timedelta(minutes=1)),
        UploadRecord(api_key_id=other, provider="s3", file_type="image/png", file_size=3,
                     upload_status="failed", uploaded_at=T0),
        RequestRecord(api_key_id=KEY, method="GET", path="/a", status_code=200,
                      response_time_ms=1.0, request_size=0, response_size=0,
                      error_message="boom", requested_at=T0),
        RequestRecord(api_key_id=KEY, method="GET", path="/b", status_code=200,
                      response_time_ms=1.0, request_size=0, response_size=0, requested_at=T0),
    ]  # fmt: skip
    any_store.write(records)
    b = any_store.backend
    scope = Scope(keys=(KEY,))
    lo, hi = T0 - timedelta(hours=1), T0 + timedelta(hours=1)
    both = ("upload", "request")
    page = b.failure_rows(scope, lo, hi, both, None, 10)
    assert [(f.kind, f.route, f.provider) for f in page] == [
        ("upload", None, "s3"), ("request", "/a", None)
    ]  # fmt: skip
    assert b.failure_rows(scope, lo, hi, both, page[0].key, 10) == page[1:]
    assert b.failure_rows(Scope(keys=(KEY,), providers=("r2",)), lo, hi, ("upload",), None, 9) == []
    rows = b.export_rows("uploads", scope, lo, hi, None, 1)
    assert rows[0][0] == str(records[0].id) and rows[0][-1] == "2025-06-01T12:00:00.000000+00:00"
    after = (T0, records[0].id)
    assert [r[3] for r in b.export_rows("uploads", scope, lo, hi, after, 5)] == ["r2"]
    mismatches: dict[tuple[str, str], int] = {}
    for file_type, declared, n in b.mismatch_rows(scope, lo, hi):  # rows of a pair add
        mismatches[file_type, declared] = mismatches.get((file_type, declared), 0) + n
    assert mismatches == {("image/png", "image/gif"): 2}


# --- request analytics and consumers: every backend answers as the in-memory reference ----------

OTHER_KEY = uuid.UUID("33333333-3333-4333-8333-333333333333")
# DST both ways (New York, Lord Howe's half hour, Chatham's +12:45/+13:45, St John's -03:30),
# :30 and :45 offsets (Kolkata, Kathmandu), +14:00 (Kiritimati)
ZONES = [
    "UTC", "America/New_York", "Asia/Kolkata", "Asia/Kathmandu", "Australia/Lord_Howe",
    "Pacific/Kiritimati", "Pacific/Chatham", "America/St_Johns",
]  # fmt: skip
RANGES = [
    (date(2025, 2, 26), date(2025, 4, 8), "week"),
    (date(2025, 3, 1), date(2025, 5, 31), "month"),  # whole months read from the monthly tiers
    (date(2025, 3, 8), date(2025, 3, 10), "hour"),  # New York springs forward
    (date(2025, 4, 5), date(2025, 4, 6), "hour"),  # Lord Howe and Chatham fall back
    (date(2025, 3, 28), date(2025, 4, 2), "day"),
    (date(1900, 1, 1), date(1900, 1, 2), "hour"),  # local mean times: edges off the quarter grid
]
FILTERS = [
    RequestFilter(),
    RequestFilter(methods=("GET",)),
    RequestFilter(methods=("OTHER", "DELETE")),
    RequestFilter(routes=("/files/{id}",)),
    RequestFilter(routes=("(unmatched)", "(other)")),
    RequestFilter(statuses=((400, 499),)),
    RequestFilter(statuses=((201, 201), (500, 599))),
    RequestFilter(statuses=((600, 700),)),  # no stored code: nothing
    RequestFilter(statuses=((450, 599), (300, 200), (400, 460))),  # overlapping, one empty
    RequestFilter(
        methods=("POST",), routes=("/upload", "/r007"), statuses=((200, 299), (413, 413))
    ),
]
SCOPES = [Scope(), Scope(keys=(KEY,)), Scope(keys=(KEY, OTHER_KEY)), Scope(keys=())]
# every scope unfiltered, every filter in one of the scopes
COMBINATIONS = [
    *((scope, FILTERS[0]) for scope in SCOPES[1:]),
    *((SCOPES[i % 3], f) for i, f in enumerate(FILTERS)),
]


def cases() -> Iterator[tuple[str, str, list[datetime], Scope, RequestFilter]]:
    """(zone, granularity, period bounds, scope, filter): each range in each zone with four of
    the combinations, taken in turn, so that every combination meets many zones and ranges."""
    turn = 0
    for start, end, granularity in RANGES:
        for tz in ZONES:
            spec = QuerySpec(start, end, tz, granularity)  # type: ignore[arg-type]
            bounds = [p.start for p in periods(spec)] + [spec.end_utc]
            for _ in range(4):
                scope, f = COMBINATIONS[turn % len(COMBINATIONS)]
                turn += 1
                yield tz, granularity, bounds, scope, f


def request_batches() -> list[list[UploadRecord | RequestRecord]]:
    """The same batches go to each backend and to the reference (the route cap depends on
    them): requests with standard and other methods, matched and unmatched paths, statuses
    and latencies of every kind, uploads, rows without a key, rows on local midnights of the
    zones above, in 1900 (local mean time), and one key-day with more routes than the cap."""
    rng = random.Random(13)
    keys = [KEY, OTHER_KEY, None]
    instants = [
        datetime(2025, 2, 24, tzinfo=UTC) + timedelta(seconds=rng.random() * 100 * 86400)
        for _ in range(500)
    ]
    instants += [datetime(1899, 12, 31, tzinfo=UTC) + timedelta(seconds=rng.random() * 4 * 86400)
                 for _ in range(60)]  # fmt: skip
    # the first instant of every period (days for the short ranges) and of the range's end,
    # and the instant just before each
    for start, end, granularity in RANGES:
        for tz in ZONES:
            spec = QuerySpec(start, end, tz, "day" if granularity == "hour" else granularity)  # type: ignore[arg-type]
            for at in [*(p.start for p in periods(spec)), spec.end_utc]:
                instants += [at, at - timedelta(microseconds=1)]
    records: list[UploadRecord | RequestRecord] = []
    for at in instants:
        records.append(
            request(
                api_key_id=rng.choice(keys),
                method=rng.choice(["GET", "GET", "POST", "DELETE", "BREW", "get"]),
                path=rng.choice(["/upload", "/files/{id}", "/files/{id}", "/wp-admin.php"]),
                route_matched=rng.random() < 0.85,
                status_code=rng.choice([200, 200, 201, 204, 302, 400, 404, 413, 500, 503]),
                response_time_ms=rng.choice([0.0, 0.001, 0.4, 3.25, rng.expovariate(0.02)]),
                request_size=rng.randrange(10**6),
                response_size=rng.randrange(10**4),
                requested_at=at,
            )
        )
        if rng.random() < 0.5:
            records.append(
                upload(
                    api_key_id=rng.choice(keys),
                    provider=rng.choice(["s3", "vercel"]),
                    file_type=rng.choice(["image/png", "image/jpeg", "application/pdf"]),
                    file_size=rng.randrange(10**7),
                    upload_status=rng.choice(["success", "success", "failed"]),
                    uploaded_at=at + timedelta(seconds=rng.random() * 600),
                )
            )
    rng.shuffle(records)
    busy = datetime(2025, 3, 20, 9, tzinfo=UTC)
    over_cap = [
        request(path=f"/r{i:03d}", requested_at=busy + timedelta(seconds=i),
                status_code=200 + i % 2 * 300)
        for i in range(ROUTES_PER_KEY_DAY + 20)
    ]  # fmt: skip
    third = len(records) // 3
    return [records[:third], over_cap[:150], records[third:], over_cap[100:]]


def _summed(rows: Sequence[Sequence[Any]], width: int) -> dict[tuple[Any, ...], list[int]]:
    """Rows added up by their first ``width`` columns, groups that add up to nothing dropped."""
    acc: dict[tuple[Any, ...], list[int]] = {}
    for row in rows:
        key, counts = tuple(row[:width]), list(row[width:])
        acc[key] = [a + b for a, b in zip(acc.get(key, [0] * len(counts)), counts, strict=True)]
    return {k: v for k, v in acc.items() if any(v)}


@pytest.fixture
def loaded(any_store: UsageStore) -> tuple[UsageStore, UsageStore]:
    """(the backend under test, the in-memory reference), holding the same batches."""
    reference = UsageStore("memory://")
    for batch in request_batches():
        reference.write(batch)
        any_store.write(batch)
        if any_store.dialect in SEALED:
            # each batch sealed as it comes: its routes are admitted under the cap as one
            # group, as the reference admits them (tests/test_seal.py covers live reads)
            any_store.seal(datetime(2100, 1, 1, tzinfo=timezone.utc))
    return any_store, reference


def test_endpoint_rows_agree_with_the_reference(loaded: tuple[UsageStore, UsageStore]) -> None:
    """Requests by endpoint, status and latency bucket equal the reference's in every zone
    and range, for every key scope and filter."""
    store, reference = loaded
    for tz, _, bounds, scope, f in cases():
        args = (scope, bounds[0], bounds[-1], f)
        want = _summed(reference.backend.endpoint_rows(*args), 4)
        assert _summed(store.backend.endpoint_rows(*args), 4) == want, (tz, bounds[0], scope, f)


def test_request_series_agree_with_the_reference(loaded: tuple[UsageStore, UsageStore]) -> None:
    """Requests per local period and latency bucket equal the reference's in every zone and
    granularity, for every key scope and filter (unfiltered and filtered reads take different
    tiers)."""
    store, reference = loaded
    for tz, granularity, bounds, scope, f in cases():
        want = _summed(reference.backend.request_series(scope, bounds, f), 2)
        got = _summed(store.backend.request_series(scope, bounds, f), 2)
        assert got == want, (tz, bounds[0], granularity, scope, f)


def test_consumer_rows_agree_with_the_reference(loaded: tuple[UsageStore, UsageStore]) -> None:
    """Usage per key — uploads inside the provider and type filters, requests, errors and
    the newest activity — equals the reference's in every zone and scope."""
    store, reference = loaded
    scopes = [
        *SCOPES, Scope(providers=("vercel",)), Scope(keys=(KEY,), file_types=("image/*",)),
        Scope(file_types=("application/pdf",), providers=("s3",)),
    ]  # fmt: skip
    for turn, (tz, _, bounds, _, _) in enumerate(cases()):
        scope = scopes[turn % len(scopes)]
        args = (scope, bounds[0], bounds[-1])
        want = sorted(reference.backend.consumer_rows(*args), key=str)
        assert sorted(store.backend.consumer_rows(*args), key=str) == want, (tz, bounds[0], scope)
