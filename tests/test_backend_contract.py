"""One contract, every storage backend: what the recorder and the read path rely on.

The same tests run on the in-memory backend, SQLite, chdb (embedded ClickHouse) and PostgreSQL;
the read answers of each are also compared with an independent aggregation in test_queries.py.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

import pytest
from support.pg import drop_pg_database, make_pg_database

from usage_middleware import ConfigurationError, RequestRecord, UploadRecord, UsageStore
from usage_middleware._storage.base import Backend, Scope
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
        dataclasses.asdict(r) for r in store.backend.requests()  # type: ignore[attr-defined]
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
