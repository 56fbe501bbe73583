"""Client-side bounds on database work, kept by one thread per process.

PostgreSQL: a peer that stops answering (a frozen proxy or pooler, a partition) leaves the
client waiting forever: a proxy that still acknowledges packets defeats TCP keepalives and
``tcp_user_timeout``, and a statement the server never received never hits its
``statement_timeout``. :func:`watched` shuts the connection's socket down when the operation
outlives its bound, which wakes the blocked call with a disconnect error.

SQLite: :func:`interrupted` interrupts the connection's statement when it outlives its bound
(``sqlite3_interrupt``, safe from another thread). A progress handler would do it from the
statement's own thread, but it is a Python function called every so many instructions, and each
call takes the GIL: beside a busy event loop each take waits for it (a read of 100,000 raw rows,
0.2 s alone, took 1.4-2.8 s beside a thread spinning in Python with a handler, 0.3-0.6 s
without one, in one run).
"""

from __future__ import annotations

import heapq
import itertools
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from typing import Any

__all__ = ["interrupted", "watched"]


# Seconds between interrupts of an SQLite statement past its bound, until it stops.
_AGAIN = 0.01


class _Interrupt:
    """One bounded SQLite read: its connection interrupted on expiry, and again every
    ``_AGAIN`` seconds until the read stops. SQLite forgets an interrupt that comes while none
    of the connection's statements runs (it clears it when the next one starts): so one that
    came before the read's statement started, or between two of its statements, is not lost,
    and none lingers to cut a later statement short."""

    __slots__ = ("_conn", "_lock", "done")

    def __init__(self, dbapi_connection: Any) -> None:
        self._lock = threading.Lock()
        self._conn = dbapi_connection
        self.done = False

    def fire(self) -> float | None:
        with self._lock:
            if self.done:
                return None
            with suppress(Exception):  # closed meanwhile: nothing to interrupt
                self._conn.interrupt()
            return _AGAIN

    def stop(self) -> None:
        with self._lock:
            self.done = True


class _Guard:
    """One bounded operation: a duplicate of its connection's socket, shut down on expiry.

    Holding a duplicate descriptor means the watchdog can only ever shut down this
    connection's socket, even after the driver closed its own descriptor (whose number the
    process may already have reused).
    """

    __slots__ = ("_lock", "_sock", "done")

    def __init__(self, dbapi_connection: Any) -> None:
        self._lock = threading.Lock()
        self._sock = socket.socket(fileno=os.dup(dbapi_connection.fileno()))
        self.done = False

    def fire(self) -> float | None:
        with self._lock:
            if self.done:
                return None
            self.done = True
            # OSError: the peer closed it already, and the blocked call has woken anyway.
            with suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
            return None

    def stop(self) -> None:
        with self._lock:
            if not self.done:
                self.done = True
                self._sock.close()


class _Watchdog:
    """Shuts a PostgreSQL connection's socket down when an operation on it outlives its bound.

    A peer that stops answering (a frozen proxy or pooler, a partition) leaves the client
    waiting forever: a proxy that still acknowledges packets defeats TCP keepalives and
    ``tcp_user_timeout``, and a statement the server never received never hits its
    ``statement_timeout``. Shutting the socket down wakes the blocked call with a disconnect
    error, so SQLAlchemy invalidates the connection and the store reports the database
    unavailable. One thread per process keeps the deadlines, so arming costs microseconds, not
    a thread; finished operations leave their entry until its deadline passes.
    """

    def __init__(self) -> None:
        self._reset()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._heap: list[tuple[float, int, _Guard | _Interrupt]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None

    def watch(self, dbapi_connection: Any, timeout: float) -> AbstractContextManager[None]:
        """Run the block with ``dbapi_connection`` (psycopg) cut off after ``timeout`` seconds."""
        return self._bound(_Guard(dbapi_connection), timeout)

    def interrupt(self, dbapi_connection: Any, timeout: float) -> AbstractContextManager[None]:
        """Run the block with ``dbapi_connection``'s (sqlite3) statement interrupted after
        ``timeout`` seconds."""
        return self._bound(_Interrupt(dbapi_connection), timeout)

    @contextmanager
    def _bound(self, guard: _Guard | _Interrupt, timeout: float) -> Iterator[None]:
        entry = (time.monotonic() + timeout, next(self._seq), guard)
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="usage-middleware-watchdog", daemon=True
                )
                self._thread.start()
            heapq.heappush(self._heap, entry)
            if self._heap[0] is entry:
                self._cond.notify()
        try:
            yield
        finally:
            guard.stop()

    def _run(self) -> None:
        heap = self._heap
        with self._cond:
            while True:
                now = time.monotonic()
                while heap and (heap[0][2].done or heap[0][0] <= now):
                    guard = heapq.heappop(heap)[2]
                    again = guard.fire()  # seconds until it fires again, or None
                    if again is not None:
                        heapq.heappush(heap, (now + again, next(self._seq), guard))
                self._cond.wait(heap[0][0] - now if heap else None)


_watchdog = _Watchdog()
watched = _watchdog.watch
interrupted = _watchdog.interrupt
