"""Test doubles for hosts of usage-middleware: no database, no background thread.

* :class:`CollectingRecorder` — hand it to the middleware instead of a store and read back the
  rows your app produced, to test your ``annotate()`` calls and hooks::

      recorder = CollectingRecorder()
      app.add_middleware(UsageMiddleware, recorder=recorder)
      client.post("/upload", files={"file": ("a.png", png, "image/png")})
      assert recorder.uploads[0].provider == "s3"

* :class:`MemoryBackend` — a storage backend that keeps rows in memory and answers every read
  by aggregating them; ``UsageStore("memory://")`` uses one, so the router and dashboard work
  in tests without SQLite or PostgreSQL. It passes the same contract tests as the database
  backends.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from ._records import RequestRecord, UploadRecord
from ._storage.memory import MemoryBackend

__all__ = ["CollectingRecorder", "MemoryBackend"]

Record = UploadRecord | RequestRecord


class CollectingRecorder:
    """A recorder that keeps every submitted record in a list, in submission order.

    It has the methods the middleware calls (``start``, ``submit``, ``submit_many``,
    ``force_flush``, ``shutdown``, ``stats``); records are kept exactly as the middleware built
    them. ``started`` and ``shutdowns`` count the calls (the middleware makes one of each per
    lifespan). ``clear()`` forgets the records between tests.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: list[Record] = []
        self.started = 0
        self.shutdowns = 0

    def __repr__(self) -> str:
        return f"CollectingRecorder(records={len(self._records)})"

    def start(self) -> None:
        self.started += 1

    def submit(self, record: Record) -> None:
        with self._lock:
            self._records.append(record)

    def submit_many(self, records: Iterable[Record]) -> None:
        with self._lock:
            self._records.extend(records)

    def force_flush(self, timeout: float | None = None) -> bool:
        return True

    def shutdown(self, timeout: float = 0.0) -> None:
        self.shutdowns += 1

    def stats(self) -> dict[str, object]:
        with self._lock:
            n = len(self._records)
        state = "stopped" if self.shutdowns else "running" if self.started else "not_started"
        return {"state": state, "queued": 0, "written": n}

    def clear(self) -> None:
        with self._lock:
            self._records.clear()

    @property
    def records(self) -> list[Record]:
        """Every record so far (a copy of the list)."""
        with self._lock:
            return list(self._records)

    @property
    def uploads(self) -> list[UploadRecord]:
        """The ``file_uploads`` rows so far."""
        return [r for r in self.records if isinstance(r, UploadRecord)]

    @property
    def requests(self) -> list[RequestRecord]:
        """The ``api_requests`` rows so far."""
        return [r for r in self.records if isinstance(r, RequestRecord)]
