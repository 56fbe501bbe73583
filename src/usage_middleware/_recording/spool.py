"""The recorder's on-disk spool: records that could not be written yet, kept across crashes.

A spool is one SQLite file (WAL) per store URL, shared by every worker process of the host.
Each record is one row keyed by its kind and ``id``, so spooling the same record twice keeps one
copy and replaying it into the store (idempotent by ``id``) can never count it twice. A process
*claims* a batch with a short lease before replaying it, so several processes do not replay the
same rows at once; a crashed process's claims expire (or are released at the next start when its
pid is gone), and the worst case of an expired lease is a duplicate, harmless, idempotent write.

Rows hold a compact, versioned JSON array per record (:mod:`.spoolformat`). A row that cannot
be read back (damaged, or written by something else) is moved to the ``spool_quarantine`` table
with the reason, never replayed, so it cannot hold back the rows claimed with it.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy.engine import URL

from .._sqlitebulk import for_ids, insert_rows
from .spoolformat import spool_row

__all__ = ["Spool", "SpoolKey", "default_spool_path"]

# A row's key as stored: the bytes of spool_key(), unless something else wrote the row.
SpoolKey = bytes | str | int | float

_LEASE_SECONDS = 15.0
SPOOL_DIR_ENV = "USAGE_MIDDLEWARE_SPOOL_DIR"


def _bound(keys: Sequence[SpoolKey]) -> list[Any]:
    """Keys as they are bound: the driver binds a ``bytearray`` directly, but sends ``bytes``
    through its adaptation lookup first, which fails at several times the cost of the bind
    (the same BLOB either way)."""
    return [bytearray(k) if type(k) is bytes else k for k in keys]


# The rows a claim takes, oldest first (bound to the time and the limit).
_CLAIMABLE_WHERE = "FROM spool WHERE lease_until < ? ORDER BY id LIMIT ?"
_CLAIMABLE = f"SELECT id, payload {_CLAIMABLE_WHERE}"
# The same rows as one value: fetching rows steps the statement once a row, and the driver lets
# go of the GIL around every step, so beside a busy event loop each row waited up to the
# interpreter's switch interval to get it back (2,000 rows: 4 ms alone, 0.7-1.5 s beside a
# thread spinning in Python). The keys' hex and the payloads are joined, the payloads by a
# character JSON text never holds unescaped; rows written by something else (a key that is not
# a BLOB, a payload that is not text or holds the separator) are read one by one after all.
_SEPARATOR = "\x1e"  # char(30), the record separator
_CLAIMABLE_PACKED = (
    "SELECT count(*), sum(typeof(id) <> 'blob' OR typeof(payload) <> 'text'), "
    f"group_concat(hex(id)), group_concat(payload, char(30)) FROM ({_CLAIMABLE})"
)


def _claimable(conn: sqlite3.Connection, now: float, limit: int) -> list[tuple[Any, Any]]:
    """Up to ``limit`` rows not leased at ``now``, oldest first, keys and payloads as stored."""
    count, odd, keys, payloads = conn.execute(_CLAIMABLE_PACKED, (now, limit)).fetchone()
    if not count:
        return []
    if not odd:
        split = payloads.split(_SEPARATOR)
        if len(split) == count:  # no payload held the separator
            # both aggregates take the rows in the subquery's order
            return list(zip(map(bytes.fromhex, keys.split(",")), split, strict=True))
    return conn.execute(_CLAIMABLE, (now, limit)).fetchall()


_SCHEMA = """
CREATE TABLE IF NOT EXISTS spool (
    id BLOB PRIMARY KEY,
    payload TEXT NOT NULL,
    lease_until REAL NOT NULL DEFAULT 0,
    lease_pid INTEGER
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS spool_size (
    one INTEGER PRIMARY KEY CHECK (one = 1),
    n INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS spool_quarantine (
    id, payload, reason TEXT NOT NULL, quarantined_at REAL NOT NULL
);
INSERT OR IGNORE INTO spool_size (one, n) SELECT 1, count(*) FROM spool;
"""


def _store_key(url: URL) -> str:
    """What identifies a database: the URL without password; SQLite paths made absolute."""
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        url = url.set(database=os.path.abspath(url.database or ""))
    return url.render_as_string(hide_password=True)


def default_spool_path(url: URL) -> Path:
    """Where a store's spool lives unless the host says otherwise.

    ``$USAGE_MIDDLEWARE_SPOOL_DIR``, else ``$XDG_STATE_HOME/usage-middleware``, else
    ``~/.local/state/usage-middleware``; when none is writable, a per-user directory under the
    system temporary directory. The file name is a hash of the store URL, so every process of
    one host writing to one database shares one spool, and different databases never mix.
    """
    name = f"spool-{hashlib.sha256(_store_key(url).encode()).hexdigest()[:16]}.sqlite3"
    candidates: list[Path] = []
    if os.environ.get(SPOOL_DIR_ENV):
        candidates.append(Path(os.environ[SPOOL_DIR_ENV]))
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state"
    )
    candidates.append(Path(state) / "usage-middleware")
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    candidates.append(Path(tempfile.gettempdir()) / f"usage-middleware-{uid}")
    for directory in candidates:
        try:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError:
            continue
        if os.access(directory, os.W_OK):
            return directory / name
    return candidates[-1] / name


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


class Spool:
    """A bounded, crash-safe set of records in a SQLite file, safe across threads and processes.

    One connection per instance, guarded by a lock (every call is a short local transaction).
    ``path=":memory:"`` gives a spool that is bounded but does not survive the process.
    """

    def __init__(self, path: str | os.PathLike[str], *, max_records: int) -> None:
        self.path = str(path)
        self.max_records = max_records
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self.pending = 0

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(
                self.path, timeout=30.0, isolation_level=None, check_same_thread=False
            )
            if self.path != ":memory:":
                conn.execute("PRAGMA journal_mode=WAL")
                # A SIGKILLed process loses nothing with NORMAL in WAL mode; only power loss can.
                conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(_SCHEMA)
            self._conn = conn
        return self._conn

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction under the lock; ``pending`` is updated once it commits.

        When it fails (disk full, file size limit) it is rolled back, unless SQLite already did;
        a connection that cannot even roll back is closed, to be reopened by the next operation.
        """
        with self._lock:
            conn = self._connect()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                size = self._size(conn)
                conn.execute("COMMIT")
                self.pending = size
            except BaseException:
                try:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                except sqlite3.Error:
                    self._conn = None
                    conn.close()
                raise

    def _size(self, conn: sqlite3.Connection) -> int:
        row = conn.execute("SELECT n FROM spool_size WHERE one = 1").fetchone()
        return int(row[0]) if row else 0

    def _add_size(self, conn: sqlite3.Connection, delta: int) -> None:
        if delta:
            conn.execute("UPDATE spool_size SET n = max(n + ?, 0) WHERE one = 1", (delta,))

    def open(self) -> int:
        """Open the file, release claims of processes that are gone; return the pending count.

        The count is taken afresh, so rows added by anything else are seen (and replayed).
        """
        with self._transaction() as conn:
            owners = [
                r[0]
                for r in conn.execute(
                    "SELECT DISTINCT lease_pid FROM spool WHERE lease_pid IS NOT NULL"
                )
            ]
            me = os.getpid()
            dead = [p for p in owners if p == me or not _pid_alive(p)]
            conn.executemany(
                "UPDATE spool SET lease_until = 0, lease_pid = NULL WHERE lease_pid = ?",
                [(p,) for p in dead],
            )
            conn.execute("UPDATE spool_size SET n = (SELECT count(*) FROM spool) WHERE one = 1")
        return self.pending

    def put(self, records: Sequence[object]) -> tuple[int, int]:
        """Store as many records as the bound allows, oldest first; return how many were taken
        and how many of those were new to the spool.

        ``records``: records, or queue items (packed records, encoded with none made). Records
        already in the spool are taken without being stored twice.
        """
        if not records:
            return 0, 0
        rows = [spool_row(r) for r in records]
        with self._transaction() as conn:
            room = max(self.max_records - self._size(conn), 0)
            taken = rows[:room]
            added = insert_rows(
                conn.cursor(),
                "INSERT OR IGNORE INTO spool (id, payload)",
                [(bytearray(key), payload) for key, payload in taken],
            )
            added = max(added, 0)
            self._add_size(conn, added)
        return len(taken), added

    def claim(self, limit: int) -> list[tuple[SpoolKey, str]]:
        """Lease up to ``limit`` unclaimed rows, oldest first, to this process.

        Keys come back as stored, so that rows written by something else can still be removed.
        """
        now = time.time()
        with self._transaction() as conn:
            rows = _claimable(conn, now, limit)
            if rows:  # the same rows: this transaction is the file's only writer
                conn.execute(
                    "UPDATE spool SET lease_until = ?, lease_pid = ? "
                    f"WHERE id IN (SELECT id {_CLAIMABLE_WHERE})",
                    (now + _LEASE_SECONDS, os.getpid(), now, limit),
                )
        return [(r[0], r[1] if isinstance(r[1], str) else repr(r[1])) for r in rows]

    def remove(self, ids: Sequence[SpoolKey]) -> None:
        """Forget rows that are now in the store (or can never be)."""
        if not ids:
            return
        with self._transaction() as conn:
            removed = for_ids(conn.cursor(), "DELETE FROM spool WHERE id IN ({ids})", _bound(ids))
            self._add_size(conn, -max(removed, 0))

    def quarantine(self, rows: Sequence[tuple[SpoolKey, str]]) -> None:
        """Move rows that cannot be read back, with why, to ``spool_quarantine``: kept for a
        person to look at, never replayed."""
        if not rows:
            return
        now = time.time()
        with self._transaction() as conn:
            conn.executemany(
                "INSERT INTO spool_quarantine (id, payload, reason, quarantined_at) "
                "SELECT id, payload, ?, ? FROM spool WHERE id = ?",
                [(reason, now, key) for key, reason in rows],
            )
            cur = conn.executemany("DELETE FROM spool WHERE id = ?", [(k,) for k, _ in rows])
            self._add_size(conn, -max(cur.rowcount, 0))

    def release(self, ids: Sequence[SpoolKey]) -> None:
        """Give claimed rows back so they are replayed later (by anyone)."""
        if not ids:
            return
        with self._lock:
            conn = self._connect()
            for_ids(
                conn.cursor(),
                "UPDATE spool SET lease_until = 0, lease_pid = NULL WHERE id IN ({ids})",
                _bound(ids),
            )

    def refresh(self) -> int:
        """Re-read the pending count (other processes add and remove rows too)."""
        with self._lock:
            self.pending = self._size(self._connect())
            return self.pending

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def suspend(self, timeout: float) -> bool:
        """Before fork: wait for the current operation, close the connection, hold the lock.

        SQLite connections (and the library's per-file lock state) must not cross a fork.
        """
        if not self._lock.acquire(timeout=timeout):
            return False
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        return True

    def resume(self) -> None:
        """After fork, in the parent: let operations (which reconnect lazily) go on."""
        self._lock.release()

    def abandon(self) -> Any:
        """Drop the connection without closing it (after fork it belongs to the parent)."""
        conn, self._conn = self._conn, None
        self._lock = threading.Lock()
        return conn
