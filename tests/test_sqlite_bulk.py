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


class _CountingCursor:
    """A cursor that counts the rows fetched through it: each is a step of its statement."""

    def __init__(self, cursor: sqlite3.Cursor, fetched: list[int]) -> None:
        self._cursor = cursor
        self._fetched = fetched

    def fetchone(self) -> Any:
        row = self._cursor.fetchone()
        self._fetched[0] += row is not None
        return row

    def fetchall(self) -> list[Any]:
        rows = self._cursor.fetchall()
        self._fetched[0] += len(rows)
        return rows

    def __iter__(self) -> Any:
        for row in self._cursor:
            self._fetched[0] += 1
            yield row

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cursor, name)


class _CountingConnection:
    """The spool's connection, its ``execute`` results counting the rows fetched."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self.fetched = [0]

    def execute(self, *args: Any) -> _CountingCursor:
        return _CountingCursor(self._conn.execute(*args), self.fetched)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


def test_a_claim_reads_its_records_in_one_step_not_one_per_record(tmp_path: Any) -> None:
    """Fetching a row steps its statement, and the driver lets go of the GIL around each step:
    beside a busy event loop each row waited for the switch interval (2,000 rows took 0.7-1.5 s
    instead of 4 ms). A claim of a thousand records fetches a handful of rows, and gives back
    every record as stored, oldest first; rows written by something else (a key that is not a
    BLOB, a payload that is not text or holds the separator the claim joins payloads with) come
    back as stored too."""
    from usage_middleware._recording.spool import Spool
    from usage_middleware._recording.spoolformat import spool_row

    rng = random.Random(10)
    spool = Spool(tmp_path / "spool.sqlite3", max_records=10_000)
    records = [random_request(rng) for _ in range(1_000)]
    assert spool.put(records) == (1_000, 1_000)
    counting = _CountingConnection(spool._connect())
    spool._conn = counting  # type: ignore[assignment]
    claimed = spool.claim(1_000)
    assert counting.fetched[0] <= 5, counting.fetched[0]
    assert claimed == sorted(spool_row(r) for r in records)
    assert spool.claim(1_000) == []

    spool._conn = counting._conn
    odd = [(b"\x00" * 17, "a\x1eb"), ("text key", "{}"), (b"\x01" * 17, b"\x02\x1e")]
    spool._connect().executemany("INSERT INTO spool (id, payload) VALUES (?, ?)", odd)
    spool.refresh()
    plain = [random_request(rng) for _ in range(3)]
    spool.put(plain)
    got = spool.claim(10)
    want = sorted(
        [*(spool_row(r) for r in plain), *odd],
        key=lambda row: (
            isinstance(row[0], bytes),
            row[0] if isinstance(row[0], bytes) else row[0].encode(),
        ),
    )
    assert [key for key, _ in got] == [key for key, _ in want]
    assert dict(got) == {key: p if isinstance(p, str) else repr(p) for key, p in odd} | dict(
        spool_row(r) for r in plain
    )
    spool.close()
