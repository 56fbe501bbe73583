"""The ClickHouse backend on chdb (embedded ClickHouse): exactness under replays and racing
copies, sealing, late rows, raw retention, the router, the cluster DDL and the client seam.

Every answer is compared with the in-memory backend holding the same records (exact by
construction), in zones whose offsets are on :30 and :45. chdb runs one database directory per
process, so each test opens its own store and closes it before the next.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from datetime import date, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from usage_middleware import (
    ConfigurationError,
    DatabaseUnavailableError,
    RequestRecord,
    UploadRecord,
    UsageStore,
)
from usage_middleware._queries import granular
from usage_middleware._requests import requests_answer
from usage_middleware._schema import OTHER_ROUTE, ROUTES_PER_KEY_DAY, endpoint_route
from usage_middleware._storage import chwrite
from usage_middleware._storage.base import RequestFilter
from usage_middleware._storage.chclient import HTTPClient, token
from usage_middleware._storage.chread import FINAL_SETTINGS, build
from usage_middleware._storage.chschema import lag_index_statements
from usage_middleware._storage.chseal import midnight
from usage_middleware._storage.chwrite import (
    REQUEST_KINDS,
    UPLOAD_KINDS,
    request_columns,
    request_data,
    upload_data,
)
from usage_middleware._storage.clickhouse import ClickHouseBackend, schema_statements
from usage_middleware._timerange import QuerySpec

pytest.importorskip("chdb")

UTC = timezone.utc
ZONES = ["UTC", "Asia/Kolkata", "Asia/Kathmandu", "Pacific/Chatham", "America/St_Johns",
         "Australia/Lord_Howe"]  # fmt: skip
DAY0 = date(2025, 3, 28)  # a week around Lord Howe's and Chatham's April DST changes
PROVIDERS = ["s3", "r2"]
TYPES = ["image/png", "image/jpeg", "application/pdf"]


@pytest.fixture
def ch(tmp_path: os.PathLike[str]) -> Iterator[UsageStore]:
    """A chdb store that seals only when told (``maintain``), with no visibility margin."""
    store = UsageStore(
        f"chdb:///{os.path.join(tmp_path, 'ch')}",
        engine_options={"visibility_margin": 0, "maintain_interval": 0},
    )
    store.create_schema()
    try:
        yield store
    finally:
        store.dispose()


def backend(store: UsageStore) -> ClickHouseBackend:
    b = store.backend
    assert isinstance(b, ClickHouseBackend)
    return b


def answers(store: UsageStore, keys: list[uuid.UUID], tz: str) -> list[dict[str, Any]]:
    """/granular answers over the data's week in ``tz``: hourly for two days, daily, monthly."""
    specs = [
        QuerySpec(DAY0 + timedelta(days=2), DAY0 + timedelta(days=3), tz, "hour"),
        QuerySpec(DAY0 - timedelta(days=1), DAY0 + timedelta(days=8), tz, "day"),
        QuerySpec(DAY0 - timedelta(days=1), DAY0 + timedelta(days=8), tz, "month",
                  providers=("s3",), file_types=("image/*",)),
    ]  # fmt: skip
    return [granular(store, spec, keys) for spec in specs]


def reference(records: list[Any], keys: list[uuid.UUID], tz: str) -> list[dict[str, Any]]:
    memory = UsageStore("memory://")
    memory.write(records)
    return answers(memory, keys, tz)


instants = st.integers(0, 8 * 86400 * 1000).map(
    lambda ms: datetime(DAY0.year, DAY0.month, DAY0.day, tzinfo=UTC) + timedelta(milliseconds=ms)
)


def records(keys: list[uuid.UUID]) -> st.SearchStrategy[list[Any]]:
    upload = st.builds(
        lambda at, k, p, t, size, ok: UploadRecord(
            api_key_id=k, provider=p, file_type=t, file_size=size,
            upload_status="success" if ok else "failed", uploaded_at=at,
        ),
        instants, st.sampled_from(keys), st.sampled_from(PROVIDERS), st.sampled_from(TYPES),
        st.integers(0, 10**9), st.booleans(),
    )  # fmt: skip
    request = st.builds(
        lambda at, k, ms, status: RequestRecord(
            api_key_id=k, status_code=status, response_time_ms=ms, requested_at=at
        ),
        instants, st.sampled_from(keys), st.floats(0.05, 5000), st.sampled_from([200, 404, 500]),
    )  # fmt: skip
    return st.lists(st.one_of(upload, request), max_size=30)


def race(store: UsageStore, batch: list[Any]) -> None:
    """Insert copies of ``batch`` as a racing writer would: past the write's id check."""
    ups = [r for r in batch if isinstance(r, UploadRecord)]
    reqs = [r for r in batch if isinstance(r, RequestRecord)]
    client = backend(store).client
    tag = uuid.uuid4().hex
    if ups:
        client.insert("file_uploads", UPLOAD_KINDS, upload_data(ups), tag)
    if reqs:
        labels = [endpoint_route(r.path, r.route_matched) for r in reqs]
        data = request_data(request_columns(reqs), labels)
        client.insert("api_requests", REQUEST_KINDS, data, tag)


def drop_raw_before(store: UsageStore, cutoff: datetime) -> None:
    """What the raw TTL does, now: delete raw rows older than ``cutoff``."""
    ts = cutoff.strftime("%Y-%m-%d %H:%M:%S")
    client = backend(store).client
    client.command(f"ALTER TABLE file_uploads DELETE WHERE uploaded_at < '{ts}'")
    client.command(f"ALTER TABLE api_requests DELETE WHERE requested_at < '{ts}'")


@pytest.mark.slow
@settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data(), tz=st.sampled_from(ZONES))
def test_answers_stay_exact_through_late_rows_races_reseals_and_raw_retention(
    ch: UsageStore, data: st.DataObject, tz: str
) -> None:
    """Sealed days, late rows for sealed days, racing copies that straddle a seal's watermark,
    a re-seal and dropping the sealed raw rows: every answer equals the raw aggregation."""
    keys = [uuid.uuid4(), uuid.uuid4()]
    first = data.draw(records(keys))
    late = data.draw(records(keys))
    b = backend(ch)
    ch.write(first)
    b.seal()  # seals the week (and every day up to the horizon)
    assert answers(ch, keys, tz) == reference(first, keys, tz)
    # a replay regrouping sealed records with new ones for the same (sealed) days
    replay = data.draw(st.lists(st.sampled_from(first), unique_by=id)) if first else []
    assert ch.write([*late, *replay]) == len(late)
    race(ch, [*first, *late])  # copies inserted after the seal, of sealed and late ids
    want = reference([*first, *late], keys, tz)
    assert answers(ch, keys, tz) == want
    b.seal()  # folds the late rows into a new seal
    assert answers(ch, keys, tz) == want
    drop_raw_before(ch, datetime(DAY0.year, DAY0.month, DAY0.day, tzinfo=UTC) + timedelta(9))
    assert answers(ch, keys, tz) == want


def test_retried_and_regrouped_batches_count_each_id_once(ch: UsageStore) -> None:
    """Retries and regrouped replays add nothing; racing copies stored twice count once."""
    key = uuid.uuid4()
    at = datetime(2025, 6, 1, 12, tzinfo=UTC)
    batch = [UploadRecord(api_key_id=key, file_size=i, uploaded_at=at) for i in range(1, 6)]
    assert ch.write(batch) == 5
    assert ch.write(batch) == 0
    assert ch.write([batch[4], batch[0], UploadRecord(api_key_id=key, uploaded_at=at)]) == 1
    race(ch, batch)
    race(ch, batch[:2])
    ((stored,),) = backend(ch).client.query("SELECT count() FROM file_uploads")
    assert int(stored) == 6 + 5 + 2  # the copies are really there, not merged yet
    spec = QuerySpec(date(2025, 6, 1), date(2025, 6, 1), "Asia/Kolkata", "hour")
    assert granular(ch, spec, [key])["totals"] == {
        "uploads": 6, "bytes": 15, "successful": 6, "failed": 0,
    }  # fmt: skip


def test_concurrent_writers_keep_answers_exact(ch: UsageStore) -> None:
    """Writers racing on overlapping batches: the stored answers count each id once."""
    key = uuid.uuid4()
    base = datetime(2025, 6, 1, tzinfo=UTC)
    records = [
        UploadRecord(api_key_id=key, file_size=1, uploaded_at=base + timedelta(minutes=i))
        for i in range(200)
    ]

    def writer(offset: int) -> None:
        for i in range(0, 200, 20):
            ch.write(records[(i + offset) % 200 : (i + offset) % 200 + 40])

    threads = [threading.Thread(target=writer, args=(n * 7,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    spec = QuerySpec(date(2025, 6, 1), date(2025, 6, 1), "UTC", "hour")
    assert granular(ch, spec, [key])["totals"]["uploads"] == 200


def test_the_raw_ttl_drops_only_sealed_rows_and_answers_do_not_change(
    tmp_path: os.PathLike[str],
) -> None:
    """With raw_retention_days the raw tables carry a TTL on greatest(time, inserted_at). Rows
    are sealed by maintain; then the TTL is let expire them (its interval shortened, as if the
    days had passed) and ClickHouse drops them: the answers do not change."""
    store = UsageStore(
        f"chdb:///{os.path.join(tmp_path, 'ch')}",
        engine_options={"raw_retention_days": 5, "settle_days": 2, "visibility_margin": 0},
    )
    try:
        store.create_schema()
        client = backend(store).client
        for table, t in (("file_uploads", "uploaded_at"), ("api_requests", "requested_at")):
            ((ddl,),) = client.query(
                "SELECT create_table_query FROM system.tables "
                "WHERE database = 'default' AND name = {t:String}", {"t": table}
            )
            assert f"TTL toDateTime(greatest({t}, inserted_at)) + toIntervalDay(5)" in ddl
        key = uuid.uuid4()
        at = datetime(2025, 3, 30, 18, 40, tzinfo=UTC)  # 00:25 on the 31st in Kathmandu
        store.write([
            *(UploadRecord(api_key_id=key, file_size=3, uploaded_at=at + timedelta(hours=h))
              for h in range(48)),
            *(RequestRecord(api_key_id=key, response_time_ms=h,
                            requested_at=at + timedelta(hours=h)) for h in range(1, 4)),
        ])  # fmt: skip
        specs = [
            QuerySpec(date(2025, 3, 30), date(2025, 4, 2), tz, "hour")
            for tz in ("Asia/Kathmandu", "Asia/Kolkata", "America/St_Johns")
        ]
        before = [granular(store, spec, [key]) for spec in specs]
        assert before[0]["totals"]["uploads"] == 48
        assert before[0]["requests"]["total"] == 3
        backend(store).seal()
        for table, t in (("file_uploads", "uploaded_at"), ("api_requests", "requested_at")):
            client.command(f"ALTER TABLE {table} MODIFY TTL toDateTime({t}) + INTERVAL 5 DAY")
            client.command(f"OPTIMIZE TABLE {table} FINAL")
            ((left,),) = client.query(f"SELECT count() FROM {table}")
            assert int(left) == 0
        assert [granular(store, spec, [key]) for spec in specs] == before
    finally:
        store.dispose()


def test_retention_must_outlast_the_settle_window() -> None:
    """A raw TTL shorter than settle_days + 2 could drop rows before they are sealed."""
    with pytest.raises(ConfigurationError, match="settle_days"):
        UsageStore("chdb://", engine_options={"raw_retention_days": 3, "settle_days": 2})
    with pytest.raises(ConfigurationError, match="do not apply"):
        UsageStore("chdb://", engine_options={"pool_size": 3})


def test_the_router_serves_granular_from_chdb(ch: UsageStore) -> None:
    """GET /granular through a mounted UsageRouter answers from the chdb store."""
    import anyio
    import httpx
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.routing import Mount

    from usage_middleware import UsageRouter

    key = uuid.uuid4()
    at = datetime(2025, 5, 4, 10, tzinfo=UTC)
    ch.write([
        UploadRecord(api_key_id=key, provider="s3", file_type="image/png", file_size=100,
                     uploaded_at=at),
        UploadRecord(api_key_id=key, provider="r2", file_type="application/pdf", file_size=50,
                     upload_status="failed", uploaded_at=at + timedelta(hours=1)),
        RequestRecord(api_key_id=key, status_code=500, response_time_ms=40, requested_at=at),
    ])  # fmt: skip

    def authorize(request: Request) -> list[str]:
        return [str(key)]

    app = Starlette(routes=[Mount("/usage", UsageRouter(ch, authorize=authorize))])

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            params = {"start": "2025-05-04", "end": "2025-05-04", "tz": "Asia/Kolkata"}
            return await client.get("/usage/granular", params=params)

    response = anyio.run(go)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["totals"] == {"uploads": 2, "bytes": 150, "successful": 1, "failed": 1}
    assert [(p["provider"], p["uploads"]) for p in body["providers"]] == [("r2", 1), ("s3", 1)]
    assert body["requests"]["total"] == 1 and body["requests"]["errors"] == 1
    assert [e["period"] for e in body["series"] if e["uploads"]] == [
        "2025-05-04T15:00:00+05:30", "2025-05-04T16:00:00+05:30",
    ]  # fmt: skip


def test_a_forked_child_is_refused_instead_of_hanging(ch: UsageStore) -> None:
    """chdb's embedded server does not survive fork: the child gets a ConfigurationError."""
    ch.write([UploadRecord(uploaded_at=datetime(2025, 1, 1, tzinfo=UTC))])
    ch.backend.before_fork()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            ch.backend.after_fork()
            try:
                ch.write([UploadRecord()])
            except ConfigurationError as exc:
                code = 0 if "forked" in str(exc) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert ch.write([UploadRecord(uploaded_at=datetime(2025, 1, 1, tzinfo=UTC))]) == 1


def test_a_read_runs_beside_a_write(ch: UsageStore) -> None:
    """chdb runs statements of different connections in parallel: reads have connections of
    their own, so a read (here a statement that sleeps one second in the engine) does not wait
    for a write (one that sleeps three) to end; writes still run one at a time."""
    client: Any = backend(ch).client
    assert backend(ch).parallel_reads
    started, done = threading.Event(), threading.Event()

    def slow_write() -> None:
        started.set()
        client.command("SELECT sleep(3) FORMAT Null")
        done.set()

    writer = threading.Thread(target=slow_write)
    writer.start()
    try:
        assert started.wait(10)
        assert client.query("SELECT sleep(1), 7") == [(0, 7)]
        assert not done.is_set()  # the read did not queue behind the write
    finally:
        writer.join(30)
    assert done.is_set()
    ch.write([UploadRecord(uploaded_at=datetime(2025, 1, 1, tzinfo=UTC))])
    assert client.query("SELECT count() FROM file_uploads") == [(1,)]


def test_an_embedded_store_holds_the_route_cap_without_reading_it_back(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An embedded store is its directory's only writer: two stores on one directory in this
    process share one cap and decide new routes without reading ``endpoint_routes`` back (one
    look at its newest day); reopened, and with its memory starting over at every batch, it
    reads what it needs and the cap stays exact. Expected routes: each batch's new ones
    admitted in route order while the day has room."""
    url = f"chdb:///{os.path.join(tmp_path, 'ch')}"
    options = {"maintain_interval": 0}
    key = uuid.uuid4()
    day = datetime(2025, 3, 20, 9, tzinfo=UTC)
    rng = random.Random(5)
    routes = [f"/r{i:03d}" for i in range(ROUTES_PER_KEY_DAY + 40)]
    # days 0 and 1 by turns; day 2 from another process; then days 0 to 3 by turns (3: newer
    # than any stored when reopened)
    half = 6
    days = [i % 2 for i in range(half)] + [2] + [i % 4 for i in range(12)]
    batches = [
        [
            RequestRecord(
                api_key_id=key, path=route, requested_at=day + timedelta(days=d, seconds=i)
            )
            for i, route in enumerate(rng.sample(routes, 190 if n == half else 120))
        ]
        for n, d in enumerate(days)
    ]
    named: dict[date, set[str]] = {}
    for batch in batches:
        room = named.setdefault(batch[0].requested_at.date(), set())
        for route in sorted({r.path for r in batch} - room):
            if len(room) < ROUTES_PER_KEY_DAY:
                room.add(route)
    assert [len(r) for r in named.values()] == [ROUTES_PER_KEY_DAY] * 4  # every day fills up

    reads: list[str] = []
    first, second = UsageStore(url, engine_options=options), UsageStore(url, engine_options=options)
    first.create_schema()
    for store in (first, second):
        client: Any = backend(store).client
        query = client.query
        monkeypatch.setattr(
            client, "query", lambda sql, *a, q=query: (reads.append(sql), q(sql, *a))[1]
        )
    try:
        for i, batch in enumerate(batches[:half]):
            (first if i % 2 else second).write(batch)
        assert sum("endpoint_routes" in sql for sql in reads) == 1, reads
    finally:
        first.dispose()
        second.dispose()
    # the directory is free: another process writes to it (this one must not trust its memory)
    other = batches[half]
    script = (
        "import sys, uuid\nfrom datetime import datetime\n"
        "from usage_middleware import RequestRecord, UsageStore\n"
        "store = UsageStore(sys.argv[1], engine_options={'maintain_interval': 0})\n"
        "store.write([RequestRecord(api_key_id=uuid.UUID(sys.argv[2]), path=p, "
        "requested_at=datetime.fromisoformat(sys.argv[3])) for p in sys.argv[4:]])\n"
        "store.dispose()\n"
    )
    subprocess.run(
        [sys.executable, "-c", script, url, str(key), other[0].requested_at.isoformat(),
         *(r.path for r in other)],
        check=True, timeout=300,
    )  # fmt: skip
    monkeypatch.setattr(chwrite, "_CACHE_LIMIT", 0)  # starts over at every batch
    reopened = UsageStore(url, engine_options=options)
    try:
        for batch in batches[half + 1 :]:
            reopened.write(batch)
        client = backend(reopened).client
        stored = client.query("SELECT DISTINCT toString(day), route FROM endpoint_routes")
        assert {(date.fromisoformat(d), r) for d, r in stored} == {
            (d, r) for d, rs in named.items() for r in rs
        }
        labels = client.query(
            "SELECT toString(toDate(requested_at)), path, route_label FROM api_requests"
        )
        assert len(labels) == sum(map(len, batches))
        for d, path, label in labels:
            assert label == (path if path in named[date.fromisoformat(d)] else OTHER_ROUTE)
    finally:
        reopened.dispose()


def test_routes_whose_insert_failed_are_stored_by_the_retry(
    ch: UsageStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The recorder retries a batch whose write failed; the routes it admitted on the failed
    attempt were not stored, so the retry stores them (it must not take them as known)."""
    client: Any = backend(ch).client
    insert = client.insert

    def failing(table: str, *args: Any) -> None:
        if table == "endpoint_routes":
            raise DatabaseUnavailableError("gone")
        insert(table, *args)

    at = datetime(2025, 3, 20, 9, tzinfo=UTC)
    batch = [RequestRecord(path=f"/r{i}", requested_at=at) for i in range(3)]
    monkeypatch.setattr(client, "insert", failing)
    with pytest.raises(DatabaseUnavailableError):
        ch.write(batch)
    monkeypatch.setattr(client, "insert", insert)
    assert ch.write(batch) == 3
    assert client.query("SELECT route FROM endpoint_routes ORDER BY route") == [
        ("/r0",), ("/r1",), ("/r2",)
    ]  # fmt: skip


def test_cluster_ddl_parses_and_its_local_tables_build(ch: UsageStore) -> None:
    """ON CLUSTER statements: replicated local tables plus Distributed tables sharded by key.
    No Keeper or cluster here: each statement is parsed by the engine, and the local tables are
    created with their replication and ON CLUSTER taken out."""
    statements = schema_statements("usage", cluster="prod", raw_retention_days=30)
    client = backend(ch).client
    for statement in statements:
        (formatted,) = client.query("SELECT formatQuery({q:String})", {"q": statement})[0]
        assert "ON CLUSTER prod" in formatted
    distributed = [s for s in statements if "ENGINE = Distributed" in s]
    assert len(distributed) == 6
    assert all("cityHash64(api_key_id)" in s for s in distributed)
    client.command("CREATE DATABASE IF NOT EXISTS usage")
    for statement in statements:
        if "ENGINE = Distributed" in statement:
            continue
        local = statement.replace(" ON CLUSTER `prod`", "")
        head, rest = local.split("ENGINE = Replicated", 1)
        engine, tail = rest.split("(", 1)
        args, tail = tail.split(")", 1)
        version = args.split("'{replica}'")[1].strip(", ")
        client.command(f"{head}ENGINE = {engine}({version}){tail}")
    tables = {r[0] for r in client.query("SELECT name FROM system.tables WHERE database='usage'")}
    assert tables == {"file_uploads_local", "api_requests_local", "upload_rollup_local",
                      "request_rollup_local", "endpoint_rollup_local", "endpoint_routes_local",
                      "rollup_seals"}  # fmt: skip
    # the upgrade that gives older raw tables the lag index: on the local tables, ON CLUSTER
    for table in ("file_uploads", "api_requests"):
        for statement in lag_index_statements("usage", table, cluster="prod"):
            (formatted,) = client.query("SELECT formatQuery({q:String})", {"q": statement})[0]
            assert f"usage.{table}_local ON CLUSTER prod" in formatted
            client.command(statement.replace(" ON CLUSTER `prod`", ""))
    indexes = "SELECT table, name FROM system.data_skipping_indices WHERE database = 'usage'"
    assert sorted(client.query(indexes)) == [("api_requests_local", "lag"),
                                             ("file_uploads_local", "lag")]  # fmt: skip


def test_cluster_is_refused_where_it_does_not_apply(ch: UsageStore, tmp_path: Any) -> None:
    """Only a ClickHouse server store takes create_schema(cluster=...)."""
    with pytest.raises(ConfigurationError, match="cluster"):
        ch.create_schema(cluster="prod")
    sqlite = UsageStore(f"sqlite:///{os.path.join(tmp_path, 'u.db')}")
    with pytest.raises(ConfigurationError, match="cluster"):
        sqlite.create_schema(cluster="prod")
    sqlite.dispose()


def test_a_server_url_connects_lazily_and_an_unreachable_one_is_unavailable() -> None:
    """clickhouse:// builds without connecting; a closed port is DatabaseUnavailableError."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = UsageStore(f"clickhouse://u:secret@127.0.0.1:{port}/usage", connect_timeout=1)
    assert store.dialect == "clickhouse"
    assert "secret" not in repr(store)
    with pytest.raises(DatabaseUnavailableError, match="cannot reach"):
        store.ping()
    store.dispose()


def test_the_server_client_sends_uuid_objects_and_skips_stored_ids() -> None:
    """Rows travel with their UUIDs as integers; clickhouse-connect is handed ``uuid.UUID``
    objects, asked which candidates are stored, and sent the others with a token of their ids.
    (A recording double stands in for clickhouse-connect's client: no server runs here.)"""

    class Recording:
        def __init__(self) -> None:
            self.calls: list[tuple[str, Any, dict[str, Any]]] = []

        def query(self, sql: str, parameters: dict[str, Any]) -> Any:
            self.calls.append(("query", sql, parameters))
            stored = parameters["candidate_ids"][:1]
            return type("Result", (), {"result_rows": [[str(u)] for u in stored]})()

        def insert(self, table: str, data: list[list[Any]], **options: Any) -> None:
            self.calls.append(("insert", data, options))

    client = HTTPClient(
        host="127.0.0.1", port=1, username=None, password=None, database="usage",
        secure=False, connect_timeout=1, read_timeout=None, settings={},
    )  # fmt: skip
    recording = Recording()
    client._client = recording
    ids = [uuid.uuid4() for _ in range(3)]
    key = uuid.uuid4()
    columns = (("id", "uuid"), ("api_key_id", "uuid"), ("request_id", "uuid?"), ("n", "int"))
    data = [[i.int for i in ids], [key.int] * 3, [None, key.int, None], [1, 2, 3]]
    assert client.insert_new("t", columns, data, "true", {"keys": [key]}) == 2
    (_, _, asked), (_, sent, options) = recording.calls
    assert asked["candidate_ids"] == ids
    assert sent == [ids[1:], [key, key], [key, None], [2, 3]]
    assert options["column_names"] == ["id", "api_key_id", "request_id", "n"]
    assert options["settings"]["insert_deduplication_token"] == token("t", [i.int for i in ids[1:]])


def test_a_missing_extra_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without chdb / clickhouse-connect the store says which extra to install."""
    monkeypatch.setitem(sys.modules, "chdb", None)
    with pytest.raises(ConfigurationError, match=r"pip install 'usage-middleware\[clickhouse\]'"):
        UsageStore("chdb://")
    monkeypatch.setitem(sys.modules, "clickhouse_connect", None)
    with pytest.raises(ConfigurationError, match=r"usage-middleware\[clickhouse\]"):
        UsageStore("clickhouse://localhost/db")


def test_days_resealed_one_by_one_read_the_same(ch: UsageStore) -> None:
    """Every other day re-sealed under a newer version: each day is read from its own newest
    seal."""
    key = uuid.uuid4()
    start = datetime(DAY0.year, DAY0.month, DAY0.day, 7, 45, tzinfo=UTC)
    first = [UploadRecord(api_key_id=key, file_size=d, uploaded_at=start + timedelta(days=d))
             for d in range(8)]  # fmt: skip
    ch.write(first)
    backend(ch).seal()
    late = [UploadRecord(api_key_id=key, file_size=100, uploaded_at=start + timedelta(days=d))
            for d in range(0, 8, 2)]  # fmt: skip
    ch.write(late)
    backend(ch).seal()  # every other day now has a newer seal version
    for tz in ("Asia/Kathmandu", "Pacific/Chatham"):
        assert answers(ch, [key], tz) == reference([*first, *late], [key], tz)


def raw_part_estimate(store: UsageStore, start: datetime, end: datetime) -> int:
    """Rows the raw part of an upload read of ``[start, end)`` (rows no seal holds) would read:
    ``EXPLAIN ESTIMATE`` of its ``FINAL`` scan, after the primary key and skip indexes."""
    b = backend(store)
    seals = b._seals([start, end])
    read = build("upload_rollup", "uploads", "1", "uploaded_at", seals, [start, end])
    rows = b.client.query(
        f"EXPLAIN ESTIMATE SELECT count() FROM file_uploads FINAL WHERE {read.raw_where} "
        f"SETTINGS {FINAL_SETTINGS}",
        read.params,
    )
    return sum(int(r[3]) for r in rows)


def test_reads_skip_rows_stored_on_time_on_days_sealed_at_different_times(
    ch: UsageStore,
) -> None:
    """In a live deployment each day is sealed on its own, ``settle_days`` after it ends, so a
    year's days have a year of different watermarks, while its rows were stored seconds after
    their time. The raw part of a read (late rows and unsealed days) must still skip all of
    them; a late row is found and counted."""
    b = backend(ch)
    key = uuid.uuid4()
    days = [DAY0 + timedelta(days=i) for i in range(8)]
    live = [
        UploadRecord(api_key_id=key, file_size=1 + h, uploaded_at=midnight(d) + timedelta(hours=h))
        for d in days
        for h in range(0, 24, 5)
    ]
    # stored as live traffic is: a second after its time
    data = upload_data(live)
    data.append([u.uploaded_at + timedelta(seconds=1) for u in live])
    b.client.insert("file_uploads", (*UPLOAD_KINDS, ("inserted_at", "time")), data, "")
    now = datetime.now(UTC)
    for d in days:
        # the seal a writer runs on day d + 3: the clock moved back by settle days and margin
        at = midnight(d) + timedelta(days=3)
        b.settle_days = (now.date() - at.date()).days + 2
        b.visibility_margin = (now - at).total_seconds()
        assert b.seal() >= 1
    start, end = midnight(days[0]), midnight(days[-1]) + timedelta(days=1)
    assert raw_part_estimate(ch, start, end) == 0
    for tz in ("UTC", "Asia/Kathmandu"):
        assert answers(ch, [key], tz) == reference(live, [key], tz)

    late = UploadRecord(api_key_id=key, file_size=7, uploaded_at=midnight(days[3]))
    ch.write([late])
    assert raw_part_estimate(ch, start, end) > 0
    for tz in ("UTC", "America/St_Johns"):
        assert answers(ch, [key], tz) == reference([*live, late], [key], tz)


def test_an_older_raw_table_gets_the_lag_index(tmp_path: Any) -> None:
    """A raw table created with the ``tail`` index (time and ``inserted_at``) is given the
    ``lag`` index, built for the rows it holds, by ``create_schema()``; answers stay the same."""
    path = os.path.join(tmp_path, "ch")
    store = UsageStore(f"chdb:///{path}", engine_options={"visibility_margin": 0,
                                                          "maintain_interval": 0})  # fmt: skip
    try:
        b = backend(store)
        for statement in schema_statements("default"):
            b.client.command(statement.replace(
                "INDEX lag (uploaded_at, inserted_at, (toUnixTimestamp64Micro(inserted_at) - "
                "toUnixTimestamp64Micro(uploaded_at)))", "INDEX tail (uploaded_at, inserted_at)"
            ))  # fmt: skip
        indexes = "SELECT name FROM system.data_skipping_indices WHERE table = 'file_uploads'"
        assert b.client.query(indexes) == [("tail",)]
        key = uuid.uuid4()
        rows = [UploadRecord(api_key_id=key, file_size=5, uploaded_at=midnight(DAY0))]
        store.write(rows)
        store.create_schema()
        assert b.client.query(indexes) == [("lag",)]
        built = (
            "SELECT sum(secondary_indices_uncompressed_bytes) FROM system.parts "
            "WHERE table = 'file_uploads' AND active"
        )
        assert int(b.client.query(built)[0][0]) > 0
        assert answers(store, [key], "UTC") == reference(rows, [key], "UTC")
    finally:
        store.dispose()


def test_granular_reads_the_previous_range_and_mismatches_with_the_range(
    ch: UsageStore,
) -> None:
    """``/granular`` on ClickHouse reads the range, the previous range and the declared-type
    mismatches in two statements; the answer equals the reference's, whether the days are
    raw, sealed or sealed with late rows beside them, and with provider and type filters."""
    key = uuid.uuid4()
    start = midnight(DAY0 - timedelta(days=8)) + timedelta(hours=5, minutes=15)
    records = [
        UploadRecord(
            api_key_id=key, provider=PROVIDERS[i % 2], file_type=TYPES[i % 3],
            declared_type=[None, "image/png", "application/zip"][i % 3 if i % 4 else 0],
            file_size=10 + i, upload_status="failed" if i % 5 == 0 else "success",
            uploaded_at=start + timedelta(hours=7 * i),
        )
        for i in range(40)
    ]  # fmt: skip
    ch.write(records[:30])
    specs = [
        QuerySpec(DAY0 - timedelta(days=1), DAY0 + timedelta(days=3), "Asia/Kathmandu", "day"),
        QuerySpec(DAY0, DAY0 + timedelta(days=2), "America/St_Johns", "hour",
                  providers=("s3",), file_types=("image/*",)),
        QuerySpec(DAY0 + timedelta(days=1), DAY0 + timedelta(days=1), "UTC", "hour"),
    ]  # fmt: skip
    memory = UsageStore("memory://")
    memory.write(records[:30])

    def same() -> None:
        for spec in specs:
            got = granular(ch, spec, [key])
            assert got == granular(memory, spec, [key])
            assert got["type_mismatches"] or got["totals"]["uploads"] == 0 or spec.file_types

    same()
    backend(ch).seal()
    same()
    ch.write(records[30:])  # late rows beside the seals
    memory.write(records[30:])
    same()
    backend(ch).parallel_reads = True  # as on a server: the two statements run at once
    same()
    memory.dispose()


def test_requests_reads_endpoints_and_series_in_one_statement(ch: UsageStore) -> None:
    """``/requests`` on ClickHouse reads its endpoint rows and its series as two grouping sets
    of one statement; answers equal the reference's with and without method, route and
    status filters, raw, sealed and with late rows."""
    key = uuid.uuid4()
    start = midnight(DAY0 - timedelta(days=1)) + timedelta(hours=3, minutes=45)
    routes = [("GET", "/files"), ("POST", "/files"), ("GET", "/files/{id}"), ("PROPFIND", "/x")]
    records = [
        RequestRecord(
            api_key_id=key, method=routes[i % 4][0], path=routes[i % 4][1],
            status_code=[200, 201, 404, 500, 503][i % 5], response_time_ms=0.5 + 37 * (i % 11),
            request_size=i, response_size=2 * i, requested_at=start + timedelta(hours=5 * i),
        )
        for i in range(36)
    ]  # fmt: skip
    memory = UsageStore("memory://")
    filters = [
        RequestFilter(),
        RequestFilter(methods=("GET",), statuses=((400, 599),)),
        RequestFilter(routes=("/files",)),
    ]
    specs = [
        QuerySpec(DAY0, DAY0 + timedelta(days=4), "Asia/Kathmandu", "day"),
        QuerySpec(DAY0 + timedelta(days=1), DAY0 + timedelta(days=2), "America/St_Johns", "hour"),
    ]

    def same() -> None:
        for spec in specs:
            for f in filters:
                got = requests_answer(ch, spec, [key], f)
                assert got == requests_answer(memory, spec, [key], f)
        assert requests_answer(ch, specs[0], [key], filters[0])["totals"]["requests"] > 0

    for part in (records[:24], records[24:]):
        ch.write(part)
        memory.write(part)
        same()
        backend(ch).seal()
        same()
    memory.dispose()


def test_answers_over_sealed_days_are_remembered_by_seal_version(ch: UsageStore) -> None:
    """A read's sealed part is a statement of its own, remembered by the seal versions it
    names: asking again runs only the raw parts, a late row still counts at once, and a new
    seal of a day is read anew."""
    key = uuid.uuid4()
    start = midnight(DAY0) + timedelta(hours=2)
    records = [
        UploadRecord(api_key_id=key, file_size=1 + i, uploaded_at=start + timedelta(hours=5 * i))
        for i in range(20)
    ]
    ch.write(records)
    backend(ch).seal()
    spec = QuerySpec(DAY0, DAY0 + timedelta(days=3), "Asia/Kolkata", "day")
    memory = UsageStore("memory://")
    memory.write(records)
    statements: list[str] = []
    client = backend(ch).client
    query = client.query

    def counting(sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        statements.append(sql)
        return query(sql, params)

    client.query = counting  # type: ignore[method-assign]
    first = granular(ch, spec, [key])
    assert first == granular(memory, spec, [key])
    assert sum("FROM upload_rollup" in s or "FROM request_rollup" in s for s in statements) == 2
    statements.clear()
    assert granular(ch, spec, [key]) == first
    assert len(statements) == 2  # the raw parts of the uploads and of the requests
    assert all("FROM upload_rollup" not in s and "FROM request_rollup" not in s
               for s in statements)  # fmt: skip

    late = UploadRecord(api_key_id=key, file_size=1000, uploaded_at=start + timedelta(hours=1))
    ch.write([late])
    memory.write([late])
    assert granular(ch, spec, [key]) == granular(memory, spec, [key]) != first
    backend(ch).seal()  # the late row's day gets a new seal version: read from rollups anew
    statements.clear()
    assert granular(ch, spec, [key]) == granular(memory, spec, [key])
    assert any("FROM upload_rollup" in s for s in statements)
    memory.dispose()


def test_remembered_sealed_answers_stay_within_their_row_budget(ch: UsageStore) -> None:
    """The remembered answers hold at most the budget's rows: the least recently used go, and
    an answer larger than an eighth of the budget is not kept. Answers stay exact."""
    backend(ch).answers.budget = 40
    key = uuid.uuid4()
    records = [UploadRecord(api_key_id=key, provider=PROVIDERS[i % 2], file_type=TYPES[i % 3],
                            file_size=i, uploaded_at=midnight(DAY0) + timedelta(hours=3 * i))
               for i in range(40)]  # fmt: skip
    ch.write(records)
    backend(ch).seal()
    memory = UsageStore("memory://")
    memory.write(records)
    for days in range(1, 5):
        for tz in ("UTC", "Asia/Kathmandu"):
            spec = QuerySpec(DAY0, DAY0 + timedelta(days=days), tz, "hour")
            assert granular(ch, spec, [key]) == granular(memory, spec, [key])
            answers = backend(ch).answers
            assert answers.rows <= 40 and answers.largest() <= 5
    assert len(backend(ch).answers) > 1
    memory.dispose()
