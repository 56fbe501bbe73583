"""The recorder's batches stay packed until the store needs records.

A ``PackedBatch`` reads as the records it holds; writing one stores exactly what writing those
records stores. On SQLite, PostgreSQL and ClickHouse the middleware's requests and uploads
(their values already normal) go from the queue's tuples to rows with no record made;
everything else is unpacked and validated as ever.
"""

from __future__ import annotations

import copy
import gc
import json
import random
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import asdict, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import select, text
from support.checks import wait_for
from support.endpoints import stored_request_rows
from support.pg import drop_pg_database, make_pg_database
from support.rollups import FAR, assert_rollups_exact, random_request, random_upload, stored_rollups

from usage_middleware import Recorder, RequestRecord, UploadRecord, UsageStore
from usage_middleware._recording import spoolformat
from usage_middleware._recording.compact import (
    PackedBatch,
    new_request_item,
    pack,
    packed_id,
    packed_kind,
    unpack,
)
from usage_middleware._recording.spool import Spool
from usage_middleware._recording.spoolformat import (
    decode,
    decode_item,
    encode,
    spool_key,
    spool_row,
)
from usage_middleware._records import new_id
from usage_middleware._schema import api_requests, file_uploads
from usage_middleware._sqlitewrite import utc_text
from usage_middleware._storage.base import PackedRows

UTC = timezone.utc
START = datetime(2025, 5, 1, tzinfo=UTC)

Record = RequestRecord | UploadRecord


def _unchecked_request(rng: random.Random, **values: Any) -> RequestRecord:
    """A request as the middleware builds it (not validated), with ``values`` put in."""
    record = RequestRecord._unchecked(
        "GET", "/files/{id}", 200, 1.5, 10, 20, None, None,
        START + timedelta(seconds=rng.random() * 36_000), True,
    )  # fmt: skip
    return _mending(record, **values)


def _unchecked_upload(rng: random.Random, **values: Any) -> UploadRecord:
    """An upload as the middleware builds it, with ``values`` put in (not validated)."""
    record = UploadRecord._unchecked(
        "s3", "image/png", "image/jpeg", rng.randrange(10**7), "success", None,
        uuid.UUID(int=rng.getrandbits(128), version=4), new_id(), "cat.png",
        START + timedelta(seconds=rng.random() * 36_000),
    )  # fmt: skip
    return _mending(record, **values)


_Record = TypeVar("_Record", RequestRecord, UploadRecord)


def _mending(record: _Record, **values: Any) -> _Record:
    """A copy of ``record`` with ``values`` put in, not validated."""
    twin = copy.copy(record)
    for name, value in values.items():
        setattr(twin, name, value)
    return twin


def _batch(rng: random.Random) -> list[Record]:
    """Normal requests (standard methods and not) and uploads, ones whose values validation
    mends, repeats of some of them, and twins that share a record's id but need mending (one
    stays a tuple, the other becomes a record), in a shuffled order."""
    records: list[Record] = []
    for _ in range(400):
        r = random_request(rng)
        records.append(replace(r, requested_at=START + timedelta(seconds=rng.random() * 36_000)))
    records += [
        _unchecked_request(rng, method="post"),
        _unchecked_request(rng, path="/f\x00iles"),
        _unchecked_request(rng, path="/" + "p" * 700, route_matched=False),
        _unchecked_request(rng, response_time_ms=3),
        _unchecked_request(rng, error_message="e" * 900, status_code=500),
        _unchecked_request(rng, requested_at=START.astimezone(timezone(timedelta(hours=5)))),
    ]
    twins = [r for r in records if isinstance(r, RequestRecord) and r.method == "GET"][:6]
    records += [_mending(r, method="get") for r in twins]
    records += [random_upload(rng) for _ in range(50)]
    records += [
        _unchecked_upload(rng, error_message=rng.choice([None, "timeout"])) for _ in range(40)
    ]
    records += [
        _unchecked_upload(rng, provider=" s3 "),
        _unchecked_upload(rng, file_type="Image/PNG"),
        _unchecked_upload(rng, declared_type="image/png"),  # the file type: stored as None
        _unchecked_upload(rng, file_name="c\x00t.png"),
        _unchecked_upload(rng, uploaded_at=START.astimezone(timezone(timedelta(hours=-3)))),
    ]
    upload_twins = [r for r in records if isinstance(r, UploadRecord) and r.provider == "s3"]
    records += [_mending(r, provider=" s3 ") for r in upload_twins[:4]]
    records += records[:30]
    rng.shuffle(records)
    return records


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def stores(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[UsageStore, UsageStore]]:
    """Two empty stores on one engine: one written packed batches, one their records."""
    if request.param == "sqlite":
        urls = [f"sqlite:///{tmp_path / name}.db" for name in ("packed", "records")]
    else:
        urls = [make_pg_database(), make_pg_database()]
    pair = [UsageStore(url) for url in urls]
    try:
        for store in pair:
            store.create_schema()
        yield pair[0], pair[1]
    finally:
        for store in pair:
            store.dispose()
        if request.param == "postgres":
            for url in urls:
                drop_pg_database(url)


def _uploads(store: UsageStore) -> list[dict[str, Any]]:
    with store.engine.connect() as conn:
        rows = conn.execute(select(file_uploads).order_by(file_uploads.c.id)).mappings()
        return [dict(r) for r in rows]


def _requests(store: UsageStore) -> list[dict[str, Any]]:
    return sorted(stored_request_rows(store), key=lambda r: r["id"])


def _seal_rows(store: UsageStore) -> list[tuple[Any, ...]]:
    with store.engine.connect() as conn:
        rows = conn.execute(text("SELECT * FROM rollup_seals ORDER BY dataset"))
        return [tuple(r) for r in rows]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_writing_a_packed_batch_stores_what_writing_its_records_stores(
    stores: tuple[UsageStore, UsageStore], seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Live and late requests (before the seal instant), uploads, mended values and repeats:
    the same rows, rollups and counts either way, and nothing stored twice on a replay."""
    packed_store, records_store = stores
    rng = random.Random(seed)
    history = [random_request(rng) for _ in range(200)]
    for store in stores:
        store.write(copy.deepcopy(history))
        store.seal(START + timedelta(hours=5))  # the batch's first five hours are late
    batch = _batch(rng)
    items = [pack(copy.copy(r)) for r in batch]
    plain, plain_uploads, rest = PackedBatch(items).split()
    # both paths are taken, for requests and for uploads
    assert len(plain) > 300 and len(plain_uploads) > 60 and len(rest) > 60
    assert any(isinstance(r, UploadRecord) for r in rest)

    def no_record_write(*args: Any) -> int:
        raise AssertionError("the packed batch went through backend.write")

    monkeypatch.setattr(packed_store.backend, "write", no_record_write)
    written = packed_store.write(PackedBatch(items))
    assert written == records_store.write(copy.deepcopy(batch))
    assert written == len({r.id for r in batch})
    assert packed_store.write(PackedBatch(items)) == 0
    for store in stores:
        assert_rollups_exact(store)
    assert _requests(packed_store) == _requests(records_store)
    assert _uploads(packed_store) == _uploads(records_store)
    assert stored_rollups(packed_store) == stored_rollups(records_store)
    assert _seal_rows(packed_store) == _seal_rows(records_store)
    for store in stores:
        store.seal(FAR)
    assert stored_rollups(packed_store) == stored_rollups(records_store)


@pytest.mark.parametrize("seed", [0, 1])
def test_chdb_stores_a_packed_batch_as_its_records(
    tmp_path: Path, seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ClickHouse writes the packed rows and the records of a batch as one set of columns: the
    same raw rows (route labels included) as writing the batch's records, nothing twice on a
    replay. (chdb runs one directory at a time in a process: the two stores one after the
    other.)"""
    pytest.importorskip("chdb")
    batch = _batch(random.Random(seed))
    items = [pack(copy.copy(r)) for r in batch]
    outcomes = []
    for way in ("packed", "records"):
        store = UsageStore(f"chdb:///{tmp_path / way}", engine_options={"maintain_interval": 0})
        try:
            store.create_schema()
            if way == "packed":
                monkeypatch.setattr(store.backend, "write", None)  # a record write would fail
                counts = [store.write(PackedBatch(items)), store.write(PackedBatch(items))]
            else:
                counts = [store.write(copy.deepcopy(batch)), store.write(copy.deepcopy(batch))]
            client: Any = store.backend.client  # type: ignore[attr-defined]
            rows = [
                client.query(f"SELECT * EXCEPT (inserted_at, first_seen) FROM {table} ORDER BY id")
                for table in ("file_uploads", "api_requests")
            ]
            outcomes.append((counts, rows))
        finally:
            store.dispose()
    assert outcomes[0] == outcomes[1]
    counts, (uploads, requests) = outcomes[0]
    assert counts == [len({r.id for r in batch}), 0]
    assert len(uploads) + len(requests) == counts[0]


def test_a_packed_batch_reads_as_the_records_it_holds() -> None:
    """Indexing, slicing and iterating unpack; ``split`` keeps the normal requests as tuples
    and gives everything else back as the records (or objects) that were queued."""
    rng = random.Random(5)
    normal = random_request(rng)
    unusual = _unchecked_request(rng, method="get")
    upload = random_upload(rng)
    custom = replace(random_request(rng), method="PROPFIND")
    records: list[Record] = [normal, unusual, upload, custom]
    odd_upload = _unchecked_upload(rng, file_type="IMAGE/png")
    records.append(odd_upload)
    batch = PackedBatch([pack(r) for r in records])
    assert len(batch) == 5
    assert [asdict(r) for r in batch] == [asdict(r) for r in records]
    assert asdict(batch[2]) == asdict(upload)
    assert isinstance(batch[1:3], PackedBatch)
    assert [asdict(r) for r in batch[1:3]] == [asdict(unusual), asdict(upload)]
    plain, plain_uploads, rest = batch.split()
    # the tables' columns in order, the ids as integers
    columns = [getattr(normal, c.name) for c in api_requests.columns]
    columns[:2] = [c if c is None else c.int for c in columns[:2]]
    assert plain == [tuple(columns)]
    upload_columns = [getattr(upload, c.name) for c in file_uploads.columns]
    upload_columns[:3] = [c if c is None else c.int for c in upload_columns[:3]]
    assert plain_uploads == [tuple(upload_columns)]
    assert [asdict(r) for r in rest] == [asdict(unusual), asdict(custom), asdict(odd_upload)]
    assert not PackedBatch([])


def test_the_recorders_batches_reach_the_store_packed(
    stores: tuple[UsageStore, UsageStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the middleware submits is written through ``write_packed`` as values, every
    request and upload once."""
    store = stores[0]
    rng = random.Random(9)
    calls: list[tuple[int, int]] = []
    write_packed = store.backend.write_packed  # type: ignore[attr-defined]

    def counting(uploads: Any, requests: Any, packed: PackedRows) -> int:
        assert not uploads and not requests
        calls.append((len(packed.requests), len(packed.uploads)))
        return int(write_packed(uploads, requests, packed))

    monkeypatch.setattr(store.backend, "write_packed", counting)
    monkeypatch.setattr(store.backend, "write", None)  # any record write would fail
    recorder = Recorder(store, batch_size=50, spool_path=":memory:")
    try:
        for _ in range(120):
            recorder.submit(_unchecked_request(rng))
            recorder.submit(_unchecked_upload(rng))
        assert recorder.force_flush(30)
    finally:
        recorder.shutdown(30)
    assert [sum(c) for c in zip(*calls, strict=True)] == [120, 120]
    assert recorder.stats()["written"] == 240
    assert len(stored_request_rows(store)) == 120 and len(_uploads(store)) == 120


@pytest.mark.parametrize("source", ["queue", "spool"])
def test_a_batch_being_written_adds_nothing_for_the_garbage_collector_to_walk(
    stores: tuple[UsageStore, UsageStore],
    source: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A batch is alive for as long as the database takes to write it (seconds, when it is
    slow): long enough for its objects to reach the collector's oldest generation, which every
    full collection walks, the event loop stopped meanwhile. Taken off the queue, or replayed
    from the spool, the middleware's requests and uploads stay values the collector does not
    track."""
    store = stores[0]
    rng = random.Random(11)
    n = 3_000
    records: list[Record] = [_unchecked_request(rng) for _ in range(n // 2)]
    records += [_unchecked_upload(rng) for _ in range(n // 2)]
    spool_path = tmp_path / "spool.sqlite3"
    if source == "spool":
        spool = Spool(spool_path, max_records=10 * n)
        spool.open()
        assert spool.put(records) == (n, n)
        spool.close()
    del records
    tracked: list[int] = []
    write_packed = store.backend.write_packed  # type: ignore[attr-defined]

    def counting(uploads: Any, requests: Any, packed: PackedRows) -> int:
        gc.collect()
        tracked.append(len(gc.get_objects()) - before)
        return int(write_packed(uploads, requests, packed))

    monkeypatch.setattr(store.backend, "write_packed", counting)
    gc.collect()
    before = len(gc.get_objects())
    recorder = Recorder(store, batch_size=n, flush_interval=0.5, spool_path=spool_path)
    try:
        if source == "queue":
            for _ in range(n // 2):
                recorder.submit(_unchecked_request(rng))
                recorder.submit(_unchecked_upload(rng))
        else:
            recorder.start()
        assert wait_for(lambda: recorder.stats()["written"] == n)
    finally:
        recorder.shutdown(30)
    assert len(stored_request_rows(store)) == len(_uploads(store)) == n // 2
    assert tracked and max(tracked) < n // 10, f"{tracked} more objects tracked"


def test_a_store_without_packed_writes_gets_the_batch_as_records() -> None:
    """A backend with no ``write_packed`` (the memory store) is handed records: the
    batch unpacks as it is read, and every request is validated and written once."""
    store = UsageStore("memory://")
    store.create_schema()
    assert not hasattr(store.backend, "write_packed")
    rng = random.Random(13)
    batch = _batch(rng)
    items = [pack(copy.copy(r)) for r in batch]
    assert store.write(PackedBatch(items)) == len({r.id for r in batch})
    assert store.write(PackedBatch(items)) == 0
    store.dispose()


_ODD_TEXT = ["", "x" * 3000, "a\x00b", " s3 ", "IMAGE/PNG", "image/png; q=1", "é"]
_request_records = st.builds(
    RequestRecord._unchecked,
    st.sampled_from(["GET", "POST", "get", "PROPFIND", "", "X" * 40]),
    st.sampled_from(["/files/{id}", "/", *_ODD_TEXT]),
    st.sampled_from([200, 404, 599, 99, 600, True]),
    st.sampled_from([0.0, 1.5, 12.0, -1.0, 1e300, 3]),
    st.sampled_from([0, 10, -1, 2**62]),
    st.sampled_from([0, 20, 2**53]),
    st.one_of(st.none(), st.uuids()),
    st.one_of(st.none(), st.sampled_from(["boom", *_ODD_TEXT])),
    st.datetimes(timezones=st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30))])),
    st.sampled_from([True, False, 1]),
)
_upload_records = st.builds(
    UploadRecord._unchecked,
    st.sampled_from(["s3", *_ODD_TEXT]),
    st.sampled_from(["image/png", "application/octet-stream", *_ODD_TEXT]),
    st.one_of(st.none(), st.sampled_from(["image/png", "image/jpeg", *_ODD_TEXT])),
    st.sampled_from([0, 7, -1, 2**62]),
    st.sampled_from(["success", "failed", "lost"]),
    st.one_of(st.none(), st.sampled_from(["boom", *_ODD_TEXT])),
    st.one_of(st.none(), st.uuids()),
    st.one_of(st.none(), st.uuids()),
    st.one_of(st.none(), st.sampled_from(["cat.png", *_ODD_TEXT])),
    st.datetimes(timezones=st.sampled_from([UTC, timezone(timedelta(hours=-3))])),
)
# Ways a row may differ from what encode() writes (another writer, damage): every one must be
# read exactly as the long way reads it.
_EDITS = [
    lambda row: row,
    lambda row: [*row, 0],
    lambda row: [*row[:-1], row[-1] + 0.5],
    lambda row: [*row[:-1], True],
    lambda row: [row[0], row[1], row[2].upper(), *row[3:]],
    lambda row: [row[0], row[1], str(uuid.UUID(hex=row[2])), *row[3:]],
    lambda row: [row[0], row[1], row[2][:-1], *row[3:]],
    lambda row: [row[0], row[1], row[2], "+" + "0" * 31, *row[4:]],
    lambda row: [2, *row[1:]],
    lambda row: [row[0], "x", *row[2:]],
    lambda row: row[:-1],
    lambda row: {"row": row},
]


def _outcome(read: Any, payload: str) -> Any:
    """What reading ``payload`` gives: the record (as its fields) or the error's type."""
    try:
        return asdict(unpack(read(payload)))
    except Exception as exc:
        return type(exc)


@settings(max_examples=300, deadline=None)
@given(record=st.one_of(_request_records, _upload_records), edit=st.sampled_from(_EDITS))
def test_the_spool_writes_and_reads_queue_items_as_it_writes_and_reads_records(
    record: Record, edit: Any
) -> None:
    """The spiller spools the queue's tuples and a replay reads rows back into them, with no
    record made when validation would keep the values: the same row as the record's, and the
    same item (or error) as decoding the record and packing it, whatever a row holds."""
    item = pack(record)
    assert spool_row(item) == (spool_key(record), encode(record))
    payload = json.dumps(edit(json.loads(encode(record))))
    assert _outcome(decode_item, payload) == _outcome(lambda p: pack(decode(p)), payload)


def test_a_replay_reads_the_middlewares_rows_with_no_record_made(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Rows of records whose values validation keeps are read straight into the queue's
    tuples (the long way, a record validated and packed, is never taken); the others still
    are read the long way."""
    rng = random.Random(3)
    normal = [_unchecked_request(rng), _unchecked_upload(rng)]
    odd = [_unchecked_request(rng, method="get"), _unchecked_upload(rng, provider=" s3 ")]
    payloads = [encode(r) for r in normal + odd]
    expected = [pack(decode(p)) for p in payloads]
    calls: list[str] = []

    def counted(payload: str) -> Any:
        calls.append(payload)
        return decode(payload)

    monkeypatch.setattr(spoolformat, "decode", counted)
    assert [decode_item(p) for p in payloads] == expected
    assert calls == payloads[2:]
    assert [packed_kind(i) for i in expected] == ["r", "u", "r", "u"]


class _KeySubclass(uuid.UUID):
    """A key a hook may hand over: not exactly a UUID, so not packed."""


@settings(max_examples=200, deadline=None)
@given(
    request=_request_records,
    key=st.one_of(st.none(), st.uuids(), st.uuids().map(lambda u: _KeySubclass(int=u.int))),
)
def test_a_request_built_as_the_queues_tuple_is_the_packed_record(
    request: RequestRecord, key: uuid.UUID | None
) -> None:
    """The middleware's requests are built as the tuple the queue would hold for their record
    (a new version 7 id drawn), and a key that is not exactly a UUID still makes a record."""
    values = [getattr(request, name) for name in _REQUEST_ORDER]
    values[6] = key
    item = new_request_item(*values)
    expected = pack(RequestRecord._unchecked(*values))
    if packed_kind(expected) is None:
        assert type(item) is RequestRecord
        assert {**asdict(item), "id": None} == {**asdict(unpack(expected)), "id": None}
        return
    assert packed_kind(item) == "r"
    assert type(packed_id(item)) is int and uuid.UUID(int=packed_id(item)).version == 7
    assert {**asdict(unpack(item)), "id": None} == {**asdict(unpack(expected)), "id": None}


_REQUEST_ORDER = (
    "method", "path", "status_code", "response_time_ms", "request_size", "response_size",
    "api_key_id", "error_message", "requested_at", "route_matched",
)  # fmt: skip


_SECONDS = st.datetimes(
    min_value=datetime(1971, 1, 1), max_value=datetime(2200, 12, 31, 23, 59, 59)
).map(lambda t: t.replace(microsecond=0, tzinfo=UTC))


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(_SECONDS, st.lists(st.integers(0, 999_999), min_size=1, max_size=4)),
        min_size=1,
        max_size=12,
    )
)
def test_times_of_a_batch_sharing_seconds_are_stored_exactly(
    seconds: list[tuple[datetime, list[int]]],
) -> None:
    """A batch's requests and uploads, several in one second (where the store reuses the text
    of the second), some at a whole second, the same second in another minute, day, month or
    year: each reads back at its own time, to the microsecond."""
    times = [second.replace(microsecond=us) for second, micros in seconds for us in micros]
    times += [t.replace(year=t.year + 1, day=min(t.day, 28)) for t in times[:3]]  # another year
    times += [t.replace(month=t.month % 12 + 1, day=1) for t in times[:3]]
    rng = random.Random(len(times))
    requests = [replace(random_request(rng), requested_at=t) for t in times]
    uploads = [replace(random_upload(rng), uploaded_at=t) for t in times]
    with tempfile.TemporaryDirectory() as tmp:
        store = UsageStore(f"sqlite:///{tmp}/times.db")
        try:
            store.create_schema()
            store.write(PackedBatch([pack(r) for r in [*requests, *uploads]]))
            stored = {r["id"]: r["requested_at"] for r in stored_request_rows(store)}
            assert stored == {r.id: r.requested_at for r in requests}
            assert {r["id"]: r["uploaded_at"] for r in _uploads(store)} == {
                u.id: u.uploaded_at for u in uploads
            }
        finally:
            store.dispose()


@pytest.mark.parametrize("late", [False, True], ids=["live", "late"])
def test_null_and_zero_like_values_are_stored_as_they_are(tmp_path: Path, late: bool) -> None:
    """Written from the queue's tuples, a NULL column is stored as NULL (not as a stand-in), a
    text that reads "0" as that text, and whether a route matched as the integer SQLite keeps a
    boolean as; requests written live and late (staged and rolled up) alike."""
    store = UsageStore(f"sqlite:///{tmp_path / 'nulls.db'}")
    try:
        store.create_schema()
        if late:
            store.seal(FAR)  # every request below is before the seal instant: staged, rolled up
        rng = random.Random(3)
        request = replace(
            random_request(rng), method="GET", response_time_ms=1.5, api_key_id=uuid.UUID(int=7)
        )
        requests = [
            replace(request, id=new_id(), api_key_id=None, error_message=None, route_matched=True),
            replace(request, id=new_id(), error_message="0", route_matched=False, path="/0"),
            replace(request, id=new_id(), api_key_id=uuid.UUID(int=0), error_message="None"),
        ]
        uploads = [
            replace(
                random_upload(rng), api_key_id=None, request_id=None, declared_type=None,
                file_name=None, error_message=None,
            ),
            replace(
                random_upload(rng), request_id=uuid.UUID(int=0), file_name="0",
                error_message="0", upload_status="failed",
            ),
        ]  # fmt: skip
        batch = PackedBatch([pack(r) for r in [*requests, *uploads]])
        assert len(batch.split()[0]) == 3 and len(batch.split()[1]) == 2  # all from the tuples
        assert store.write(batch) == 5
        instant = dict(_seal_rows(store))["requests"]
        assert all((utc_text(r.requested_at) < instant) == late for r in requests)
        assert_rollups_exact(store)
        assert _requests(store) == sorted(
            ({c.name: getattr(r, c.name) for c in api_requests.columns} for r in requests),
            key=lambda r: r["id"],
        )
        assert _uploads(store) == sorted(
            ({c.name: getattr(u, c.name) for c in file_uploads.columns} for u in uploads),
            key=lambda u: u["id"],
        )
        with store.engine.connect() as conn:
            kinds = conn.execute(
                text(
                    "SELECT typeof(api_key_id), typeof(error_message), typeof(route_matched), "
                    "route_matched FROM api_requests ORDER BY path"
                )
            ).all()
        assert sorted(kinds) == sorted(
            [
                ("null", "null", "integer", 1),
                ("text", "text", "integer", 0),
                ("text", "text", "integer", 1),
            ]
        )
    finally:
        store.dispose()
