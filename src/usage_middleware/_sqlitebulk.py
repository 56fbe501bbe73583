"""Bulk statements on the sqlite3 driver that let go of the GIL once per chunk, not per row.

``executemany`` steps its statement once per row, and the driver releases the GIL around every
step. A thread that releases the GIL while another thread runs Python (a server's event loop
under load) gets it back only when that thread is made to drop it, after the interpreter's
switch interval (5 ms): CPython's "convoy effect". A 5,000-row ``executemany`` in a background
thread beside a busy one took seconds instead of milliseconds; one multi-row ``VALUES``
statement per chunk of rows steps once per chunk, and took a fraction of a second
(``benchmarks/sqlite_steps.py``). The store's SQLite writes and the recorder's
spool (its spiller and replayer are background threads too) write this way.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from itertools import chain
from typing import Any

__all__ = ["for_ids", "insert_rows", "rows_per_statement"]

#: Rows per statement at most: larger statements parse slower than they save.
CHUNK_ROWS = 250
# SQLite before 3.32 allowed 999 bound parameters per statement; later ones 32,766.
_OLD_LIMIT = 999


def rows_per_statement(conn: sqlite3.Connection, width: int) -> int:
    """How many rows of ``width`` values one statement may bind on ``conn``."""
    getlimit = getattr(conn, "getlimit", None)  # Python 3.11+, with the constant
    which = getattr(sqlite3, "SQLITE_LIMIT_VARIABLE_NUMBER", None)
    limit = getlimit(which) if getlimit and which is not None else _OLD_LIMIT
    return max(1, min(CHUNK_ROWS, limit // width))


def insert_rows(
    cur: Any, head: str, rows: Sequence[Sequence[Any]], tail: str = "", mark: str | None = None
) -> int:
    """Run ``{head} VALUES (?, ..), (?, ..) {tail}`` over ``rows`` (all of one width) in
    chunks; returns how many rows the statements changed (``rowcount``). ``mark``: one row's
    placeholders when they are not all plain ``?`` (one ``?`` a value, as ``NULLIF(?, 0)``)."""
    if not rows:
        return 0
    width = len(rows[0])
    per = rows_per_statement(cur.connection, width)
    if mark is None:
        mark = f"({', '.join('?' * width)})"
    elif mark.count("?") != width:
        raise ValueError(f"{mark!r} does not bind {width} values")
    changed = 0
    for i in range(0, len(rows), per):
        part = rows[i : i + per]
        cur.execute(f"{head} VALUES {', '.join([mark] * len(part))} {tail}", [*chain(*part)])
        changed += cur.rowcount
    return changed


def for_ids(cur: Any, sql: str, ids: Sequence[Any], first: Sequence[Any] = ()) -> int:
    """Run ``sql``, whose ``{ids}`` is replaced by ``?, ?, ..``, over ``ids`` in chunks, each
    execution bound to ``first`` then its ids (``UPDATE t SET a = ? WHERE id IN ({ids})``);
    returns how many rows the statements changed."""
    per = rows_per_statement(cur.connection, 1) - len(first)
    changed = 0
    for i in range(0, len(ids), per):
        part = ids[i : i + per]
        cur.execute(sql.format(ids=", ".join("?" * len(part))), [*first, *part])
        changed += cur.rowcount
    return changed
