"""SQLite writes step a statement per chunk of rows, not per row.

The sqlite3 driver releases the GIL around every step of a statement; a background thread that
does so while the event loop runs Python waits the interpreter's switch interval (5 ms) to get
it back. So the recorder's writes must not step once per row, as ``executemany`` does
(``usage_middleware._sqlitebulk``). Counted with SQLite's own trace callback, which reports
each statement execution, ``executemany`` rows included.
"""

from __future__ import annotations

import random
import sqlite3
from typing import Any

import pytest
from sqlalchemy import event
from support.rollups import random_request, random_upload

from usage_middleware import UsageStore
from usage_middleware._sqlitebulk import CHUNK_ROWS, insert_rows


def _traced(url: str) -> tuple[UsageStore, list[str]]:
    store = UsageStore(url)
    executed: list[str] = []

    @event.listens_for(store.engine, "connect")
    def _trace(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.set_trace_callback(executed.append)

    store.create_schema()
    return store, executed


def test_a_batch_steps_per_chunk_of_rows_not_per_row(sqlite_url: str) -> None:
    rng = random.Random(8)
    store, executed = _traced(sqlite_url)
    live = [random_request(rng) for _ in range(2_000)]  # before any seal: raw rows only
    uploads = [random_upload(rng) for _ in range(2_000)]
    executed.clear()
    assert store.write(live + uploads) == 4_000
    inserts = [s for s in executed if s.lstrip().upper().startswith("INSERT")]
    # staging of the uploads and the live requests: a statement per CHUNK_ROWS rows each;
    # then a handful of set-based statements (raw copy, rollups)
    assert len(inserts) <= 2 * (-(-2_000 // CHUNK_ROWS)) + 10, len(inserts)
    assert len(executed) < 60, len(executed)

    store.seal()  # the requests, late now that the instant has passed them, are staged too
    late = [random_request(rng) for _ in range(2_000)]
    executed.clear()
    assert store.write(late) == 2_000
    assert len(executed) < 40, len(executed)
    store.dispose()


def test_the_spool_steps_per_chunk_of_records_not_per_record(tmp_path: Any) -> None:
    """Putting, claiming and removing a thousand spooled records runs a handful of statements,
    not one per record (the spiller and the replayer are background threads too)."""
    from usage_middleware._recording.spool import Spool

    rng = random.Random(9)
    spool = Spool(tmp_path / "spool.sqlite3", max_records=10_000)
    executed: list[str] = []
    spool._connect().set_trace_callback(executed.append)
    records = [random_request(rng) for _ in range(1_000)]
    assert spool.put(records) == (1_000, 1_000)
    claimed = spool.claim(1_000)
    assert len(claimed) == 1_000
    spool.release([key for key, _ in claimed[:500]])
    spool.remove([key for key, _ in claimed])
    assert spool.refresh() == 0
    assert len(executed) < 60, len(executed)
    spool.close()


def test_placeholders_that_do_not_bind_each_value_once_are_refused(tmp_path: Any) -> None:
    conn = sqlite3.connect(tmp_path / "marks.db")
    conn.execute("CREATE TABLE t (a, b)")
    with pytest.raises(ValueError, match="does not bind 2 values"):
        insert_rows(conn.cursor(), "INSERT INTO t", [(1, 2)], "", "(?, NULLIF(?, 0), ?)")
    assert insert_rows(conn.cursor(), "INSERT INTO t", [(1, 0), (2, "0")], "", "(?, NULLIF(?, 0))")
    assert conn.execute("SELECT a, b FROM t ORDER BY a").fetchall() == [(1, None), (2, "0")]
    conn.close()
