"""A client-side bound on PostgreSQL work: a frozen peer becomes a failed operation.

A peer that stops answering (a frozen proxy or pooler, a partition) leaves the client waiting
forever: a proxy that still acknowledges packets defeats TCP keepalives and
``tcp_user_timeout``, and a statement the server never received never hits its
``statement_timeout``. :func:`watched` shuts the connection's socket down when the operation
outlives its bound, which wakes the blocked call with a disconnect error.
"""

from __future__ import annotations

import heapq
import itertools
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

__all__ = ["watched"]


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

    def fire(self) -> None:
        with self._lock:
            if self.done:
                return
            self.done = True
            # OSError: the peer closed it already, and the blocked call has woken anyway.
            with suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()

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
        self._heap: list[tuple[float, int, _Guard]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None

    @contextmanager
    def watch(self, dbapi_connection: Any, timeout: float) -> Iterator[None]:
        """Run the block with ``dbapi_connection`` cut off after ``timeout`` seconds."""
        guard = _Guard(dbapi_connection)
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
                    heapq.heappop(heap)[2].fire()
                self._cond.wait(heap[0][0] - now if heap else None)


_watchdog = _Watchdog()
watched = _watchdog.watch
