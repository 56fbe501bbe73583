"""The baselines the benchmarks compare with are what their docstrings say they are.

A ratio is only as honest as its baseline: ``benchmarks/ingest.py`` compares ``store.write``
with a binary COPY into a table "partitioned like the raw table, with the same partitions and
indexes". A partitioned table's index definitions read ``ON ONLY public.<table>``, which once
made the script copy none of them, so its COPY ran into an unindexed table.
"""

from __future__ import annotations

import importlib.util
import sys
import time
import uuid
from pathlib import Path
from types import ModuleType, SimpleNamespace

import psycopg
import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url

from usage_middleware import Recorder, RequestRecord, UsageStore

pytestmark = pytest.mark.postgres

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"

INDEXES = """
SELECT count(*) FROM pg_index AS i JOIN pg_class AS c ON c.oid = i.indrelid
 WHERE c.relname = %s
"""


def _ingest() -> ModuleType:
    return _benchmark("ingest")


def _benchmark(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_the_ingest_baseline_has_the_raw_tables_partitions_and_indexes(pg_url: str) -> None:
    """Each baseline partition has as many indexes as the raw table's partition it copies (the
    primary key and the four secondary indexes), for both data sets."""
    ingest = _ingest()
    store = UsageStore(pg_url)
    store.create_schema()
    store.dispose()
    dsn = make_url(pg_url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn) as conn:
        for data in (ingest.UPLOADS, ingest.REQUESTS):
            raw = ingest.pg_baseline_table(conn, data)
            partitions = conn.execute(ingest.PARTITIONS, (f"public.{data.table}",)).fetchall()
            names = [name for name, _ in partitions]
            assert names
            for name in names:
                (want,) = conn.execute(INDEXES, (name,)).fetchone() or (0,)
                (got,) = conn.execute(INDEXES, (f"raw_{name}",)).fetchone() or (0,)
                assert want == 5 and got == want, (raw, name)


def test_the_overload_benchmark_slows_every_write_of_the_recorder(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both of the backend's writes (records, and the recorder's packed batches) take n / rate
    seconds for n rows: a write the slowing missed would leave the database fast and the
    benchmark measuring no overload."""
    overload = _benchmark("overload")
    store = UsageStore(pg_url)
    store.create_schema()
    slept: list[float] = []
    clock = SimpleNamespace(monotonic=time.monotonic, sleep=slept.append)
    monkeypatch.setattr(overload, "time", clock)  # the benchmark's sleeps only
    overload.slow_down(store, rows_per_second=10.0)
    recorder = Recorder(store, batch_size=40, spool_path=":memory:")
    try:
        for i in range(40):
            recorder.submit(RequestRecord(path=f"/{i}"))
        assert recorder.force_flush(30)
    finally:
        recorder.shutdown(30)
    store.write([RequestRecord(), RequestRecord()])
    store.dispose()
    # 40 rows through the recorder's packed batches, then 2 records: 4 s and 0.2 s at 10 rows/s
    assert sum(slept[:-1]) > 3.0 and slept[-1] > 0.1


def test_the_clickhouse_benchmark_copies_postgresqls_requests_into_chdb(
    pg_url: str, tmp_path: Path
) -> None:
    """The reads of ``benchmarks/clickhouse.py`` compare the engines on the same rows: its copy
    of PostgreSQL's requests goes through chdb's own column conversion, whose id columns are
    integers (a copy that handed it UUID objects failed before any read was timed)."""
    clickhouse = _benchmark("clickhouse")
    pg = UsageStore(pg_url)
    pg.create_schema()
    requests = [RequestRecord(path=f"/{i}", api_key_id=uuid.uuid4()) for i in range(30)]
    pg.write(requests)
    pg.dispose()
    ch = UsageStore(f"chdb:///{tmp_path / 'ch'}", engine_options={"maintain_interval": 0})
    try:
        ch.create_schema()
        clickhouse.copy_requests(make_url(pg_url), ch)
        rows = clickhouse.backend(ch).client.query(
            "SELECT toString(id), toString(api_key_id), path FROM api_requests"
        )
    finally:
        ch.dispose()
    assert sorted(rows) == sorted((str(r.id), str(r.api_key_id), r.path) for r in requests)


def test_the_clickhouse_benchmarks_ingest_part_runs(
    pg_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``benchmarks/clickhouse.py``'s ingest comparison runs on a few batches: PostgreSQL's
    ``store.write`` in a database of its own, chdb's, and the plain INSERT it is set against."""
    clickhouse = _benchmark("clickhouse")
    admin = create_engine(pg_url, isolation_level="AUTOCOMMIT")
    ch = UsageStore(f"chdb:///{tmp_path / 'ch'}", engine_options={"maintain_interval": 0})
    try:
        ch.create_schema()
        clickhouse.ingest(admin, pg_url, ch, 1_000, 250, "recorder")
    finally:
        ch.dispose()
        admin.dispose()
    out = capsys.readouterr().out
    assert "requests: chdb store.write is" in out and "x of the plain INSERT" in out
