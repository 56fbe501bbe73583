"""Recorder: moves records from the request path to the store in the background.

``submit()`` is what the middleware calls per request: it appends to a bounded deque and
returns (never blocks, never raises). A worker thread wakes on a timer, or early when a batch
is full, and hands batches to ``store.write``. ``shutdown()`` flushes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterable
from typing import Any

from ._records import RequestRecord, UploadRecord
from ._store import UsageStore

__all__ = ["Recorder"]

logger = logging.getLogger(__name__)

Record = UploadRecord | RequestRecord

_DEFAULT_BATCH_SIZE = 2000
_DEFAULT_FLUSH_INTERVAL = 0.5
_DEFAULT_MAX_QUEUE_SIZE = 100_000


class Recorder:
    """Batches records into ``store.write`` from a background thread."""

    def __init__(
        self,
        store: UsageStore,
        *,
        batch_size: int = _DEFAULT_BATCH_SIZE,
        flush_interval: float = _DEFAULT_FLUSH_INTERVAL,
        max_queue_size: int = _DEFAULT_MAX_QUEUE_SIZE,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if flush_interval <= 0:
            raise ValueError(f"flush_interval must be > 0, got {flush_interval}")
        if max_queue_size < batch_size:
            raise ValueError("max_queue_size must be >= batch_size")
        self.store = store
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.max_queue_size = max_queue_size
        self._queue: deque[Record] = deque()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._written = 0
        self._dropped = 0
        self._errors = 0
        self._last_error: str | None = None
        store.attach_recorder(self)

    def start(self) -> None:
        """Start the worker thread (idempotent). Call after fork, e.g. on lifespan startup."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stopping = False
            self._thread = threading.Thread(
                target=self._run, name="usage-middleware-recorder", daemon=True
            )
            self._thread.start()

    def submit(self, record: Record) -> None:
        """Queue one record. Never blocks, never raises; counts a drop when the queue is full."""
        if len(self._queue) >= self.max_queue_size:
            self._dropped += 1
            return
        self._queue.append(record)
        if len(self._queue) >= self.batch_size:
            self._wake.set()

    def submit_many(self, records: Iterable[Record]) -> None:
        for record in records:
            self.submit(record)

    def _run(self) -> None:
        while True:
            self._wake.wait(self.flush_interval)
            self._wake.clear()
            self._drain()
            if self._stopping:
                return

    def _drain(self) -> None:
        while self._queue:
            batch: list[Record] = []
            while self._queue and len(batch) < self.batch_size:
                batch.append(self._queue.popleft())
            try:
                self.store.write(batch)
                self._written += len(batch)
            except Exception as exc:
                self._errors += 1
                self._last_error = f"{type(exc).__name__}: {exc}"[:300]
                logger.warning("usage recorder: write of %d records failed: %s", len(batch), exc)
                self._queue.extendleft(reversed(batch))
                return

    def force_flush(self, timeout: float | None = None) -> bool:
        """Write everything queued so far; True when the queue emptied within ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._queue:
            if self._thread is None or not self._thread.is_alive():
                self._drain()
                return not self._queue
            self._wake.set()
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def shutdown(self, timeout: float = 10.0) -> None:
        """Flush and stop the worker (idempotent)."""
        self._stopping = True
        self._wake.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        self._drain()
        self._thread = None

    def stats(self) -> dict[str, Any]:
        return {
            "queued": len(self._queue),
            "written": self._written,
            "dropped": self._dropped,
            "errors": self._errors,
            "last_error": self._last_error,
        }
