"""Recorder: moves records from the request path to the store in the background.

Path of a record::

    submit() ──► bounded in-memory queue ──► writer thread ──► store.write(batch)
                        │                         │ database down / slow
                        ▼ (above high water,      ▼
                          or while backing off) on-disk spool (SQLite, per store URL)
                                                  │ database back / next start
                                                  └──► replayed, exactly once (ids)

``submit()`` is what the middleware calls per record on the event loop: it appends to a deque
and returns (constant time, never blocks, never raises); the record is queued as a tuple the
garbage collector does not walk (:mod:`.compact`). The writer thread wakes on a timer
(``flush_interval``) or early when a batch is full, and never runs on the event loop. When the
store is unreachable the writer backs off exponentially, with jitter, while a second thread
(the spiller) moves queued records into the spool; the spiller also relieves the queue when a
slow database lets it pass its high-water mark. Records are dropped only when the queue is full
*and* nothing more can be spooled (the spool is full, or failing: disk full, file size limit):
drops are counted, logged at a rate-limited WARNING and exported as an OpenTelemetry metric.
A chunk the spool fails to take goes back to the queue, so every record submitted is written,
spooled, queued, rejected or dropped. Records the store can never accept (``ValueError``/
``TypeError``, which includes values the database refuses, such as a rollup sum out of range)
are isolated by bisecting the batch, counted as rejected and logged, never retried forever;
spooled rows that cannot be read back are quarantined in the spool file, never replayed.

Fork safety: ``os.register_at_fork`` resets every recorder in a forked child (no inherited
thread, queue, spool connection or pooled database connection; see :mod:`.lifecycle`); the
child's recorder starts on ``start()`` or on its first ``submit()``.

The module is longer than most because the writer and the spiller share one queue, one set of
counters and one backoff, and their hand-offs (a batch in flight, records put back at the head
of the queue) are easiest to check in one place; what stands alone lives beside it (backoff,
spool, compact, metrics, logs, lifecycle).
"""

from __future__ import annotations

import itertools
import logging
import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from opentelemetry import metrics

from .._records import RequestRecord, UploadRecord
from .._store import UsageStore
from . import lifecycle
from .backoff import Backoff, State
from .compact import PackedBatch, pack, packed_id, unpack
from .logs import RateLimitedLog
from .metrics import register_metrics
from .spool import Spool, SpoolKey, default_spool_path
from .spoolformat import decode_item

__all__ = ["Recorder"]

logger = logging.getLogger(__name__)

Record = UploadRecord | RequestRecord

_DEFAULT_BATCH_SIZE = 2000
_DEFAULT_FLUSH_INTERVAL = 0.5
_DEFAULT_MAX_QUEUE_SIZE = 100_000
_DEFAULT_MAX_SPOOL_RECORDS = 1_000_000
_DEFAULT_BACKOFF_INITIAL = 0.25
_DEFAULT_BACKOFF_MAX = 30.0
_DEFAULT_SHUTDOWN_TIMEOUT = 10.0
_SPOOL_REFRESH = 5.0
_SPOOL_RETRY = 1.0  # after the spool failed, the spiller waits this long before trying again
# Spooling holds the GIL (encoding, binding rows). An event loop that needs the GIL meanwhile
# waits until it is released, up to the interpreter's switch interval (5 ms) each time: records
# are spooled in steps of _SPOOL_STEP (well under a millisecond), with a sleep of _SPOOL_PAUSE
# between steps that hands the GIL to whichever thread waits for it (see _pause()).
_SPOOL_STEP = 100
_SPOOL_PAUSE = 0.0002
# A replay reads its rows back in steps of _REPLAY_STEP (about a millisecond), with the same
# pause between them (a sleep of 0 lets go of the GIL but often takes it straight back).
_REPLAY_STEP = 300
_FORK_WAIT = 5.0

_serial = itertools.count(1)


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, timezone.utc).isoformat()


class Recorder:
    """Batches records into ``store.write`` from a background thread, spooling what must wait.

    Options (keyword only):

    - ``batch_size`` (2000): records per transaction; a full batch wakes the writer early.
    - ``flush_interval`` (0.5 s): the longest a record waits in memory while the database is up.
    - ``max_queue_size`` (100,000): bound of the in-memory queue; above half of it the spiller
      moves records to the spool.
    - ``spool_path``: the spool file; default from ``USAGE_MIDDLEWARE_SPOOL_DIR``, else the
      user's state directory (see :func:`default_spool_path`), one file per store URL.
      ``":memory:"`` keeps the spool in memory (bounded, but lost with the process).
    - ``max_spool_records`` (1,000,000): bound of the spool.
    - ``backoff_initial`` (0.25 s) / ``backoff_max`` (30 s): retry delays while the database is
      unreachable, doubled per failure, with jitter.
    - ``meter_provider``: OpenTelemetry meter provider for the metrics (default: the global one).
    """

    def __init__(
        self,
        store: UsageStore,
        *,
        batch_size: int = _DEFAULT_BATCH_SIZE,
        flush_interval: float = _DEFAULT_FLUSH_INTERVAL,
        max_queue_size: int = _DEFAULT_MAX_QUEUE_SIZE,
        spool_path: str | os.PathLike[str] | None = None,
        max_spool_records: int = _DEFAULT_MAX_SPOOL_RECORDS,
        backoff_initial: float = _DEFAULT_BACKOFF_INITIAL,
        backoff_max: float = _DEFAULT_BACKOFF_MAX,
        meter_provider: metrics.MeterProvider | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not flush_interval > 0:
            raise ValueError(f"flush_interval must be > 0, got {flush_interval}")
        if max_queue_size < batch_size:
            raise ValueError(
                f"max_queue_size must be >= batch_size, got {max_queue_size} < {batch_size}"
            )
        if max_spool_records < 0:
            raise ValueError(f"max_spool_records must be >= 0, got {max_spool_records}")
        if not (backoff_initial > 0 and backoff_max > 0):
            raise ValueError(
                f"backoff_initial and backoff_max must be > 0, got {backoff_initial}, {backoff_max}"
            )
        self.store = store
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.max_queue_size = max_queue_size
        self.max_spool_records = max_spool_records
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.spool_path = str(
            spool_path if spool_path is not None else default_spool_path(store.url)
        )
        if self.spool_path != ":memory:":
            Path(self.spool_path).parent.mkdir(parents=True, exist_ok=True)
        self._high_water = max(max_queue_size // 2, batch_size)
        self._hurry = max_queue_size - max_queue_size // 4  # spool without pauses from here
        self._low_water = max(self._high_water // 2, 1)
        self._label = store.display_url
        self._serial = next(_serial)
        self._init_state()
        lifecycle.track(self)
        store.attach_recorder(self)
        register_metrics(self, meter_provider)

    def _init_state(self) -> None:
        """Everything that belongs to one process (re-made in a forked child)."""
        self._pid = os.getpid()
        self._queue: deque[object] = deque()  # records as pack() made them
        self._wake = threading.Event()
        self._spill_wake = threading.Event()
        self._lock = threading.Lock()
        self._drop_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._fork_held: tuple[bool, bool] = (False, False)
        self._spool = Spool(self.spool_path, max_records=self.max_spool_records)
        self._spool_opened = False
        self._writer: threading.Thread | None = None
        self._spiller: threading.Thread | None = None
        self._started = False
        self._stopping = False
        self._deadline = float("inf")
        self._inflight: Sequence[Record] | None = None
        self._backoff = Backoff(self.backoff_initial, self.backoff_max)
        self._next_refresh = 0.0
        self._spool_retry_at = 0.0
        self._autostart = True
        self._count_lock = threading.Lock()
        self._written = 0
        self._replayed = 0
        self._spooled = 0
        self._dropped = 0
        self._rejected = 0
        self._quarantined = 0
        self._spool_errors = 0
        self._failed_writes = 0
        self._retried = 0
        self._last_error: str | None = None
        self._last_error_at: float | None = None
        self._last_write_at: float | None = None
        self._drop_log = RateLimitedLog()
        self._error_log = RateLimitedLog()
        self._reject_log = RateLimitedLog()
        self._spool_log = RateLimitedLog()

    def __repr__(self) -> str:
        return f"Recorder({self._label!r}, queued={len(self._queue)})"

    # --- request path ------------------------------------------------------------------------

    def submit(self, record: Record) -> None:
        """Queue one record: constant time, never blocks, never raises.

        Only when the queue is full (the spool is full too, or the spiller could not keep up)
        is the record dropped, and counted.
        """
        self.submit_item(pack(record))

    def submit_item(self, item: object) -> None:
        """:meth:`submit` of a record already as the queue holds it (``compact.pack``; the
        middleware builds its requests so)."""
        try:
            queue = self._queue
            n = len(queue)
            if n >= self.max_queue_size:
                self._drop(1)
                return
            queue.append(item)
            if self._autostart:
                self.start()
            elif n + 1 >= self._high_water:
                if not self._spill_wake.is_set():  # is_set() is a read, set() takes a lock
                    self._spill_wake.set()
            elif (n + 1) % self.batch_size == 0:
                self._wake.set()
        except Exception:  # never let recording break a request
            logger.exception("usage recorder: submit failed")

    def submit_many(self, records: Iterable[Record]) -> None:
        """Queue several records (each as :meth:`submit`)."""
        for record in records:
            self.submit(record)

    def _drop(self, n: int) -> None:
        with self._drop_lock:
            self._dropped += n
            total = self._dropped
        self._drop_log.warning(
            "usage recorder: queue full and nothing more can be spooled, dropped %d record(s) "
            "(%d dropped in total for %s); the database is down or too slow",
            n,
            total,
            self._label,
        )

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the writer and spiller threads (idempotent); call in each worker, after fork."""
        with self._lock:
            if self._started and self._writer is not None and self._writer.is_alive():
                return
            self._stopping = False
            self._deadline = float("inf")
            self._writer = threading.Thread(
                target=self._run_writer, name="usage-middleware-recorder", daemon=True
            )
            self._spiller = threading.Thread(
                target=self._run_spiller, name="usage-middleware-spiller", daemon=True
            )
            self._started = True
            self._autostart = False
            self._writer.start()
            self._spiller.start()

    def force_flush(self, timeout: float | None = None) -> bool:
        """Write everything queued so far; True when it is in the store within ``timeout``.

        False when the database is unreachable (the records are kept, in memory or spooled).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._started or self._writer is None or not self._writer.is_alive():
            self._drain(deadline, whole=True)
            return not self._queue
        while self._queue or self._inflight is not None:
            if self._backoff.active:
                return False
            self._wake.set()
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.002)
        return True

    def shutdown(self, timeout: float = _DEFAULT_SHUTDOWN_TIMEOUT) -> None:
        """Flush and stop (idempotent). What is not written within ``timeout`` is spooled."""
        with self._lock:
            self._autostart = False
            if not self._started:
                if self._queue and self._pid == os.getpid():
                    self._stopping = True
                    self._spill_rest()
                return
            self._started = False
            self._stopping = True
            self._deadline = time.monotonic() + max(timeout, 0.0)
            writer, spiller = self._writer, self._spiller
        self._wake.set()
        self._spill_wake.set()
        for thread in (spiller, writer):
            if thread is not None:
                thread.join(max(self._deadline - time.monotonic(), 0.0))
        self._spill_rest(include_inflight=writer is not None and writer.is_alive())
        if writer is None or not writer.is_alive():
            self._spool.close()
            self._spool_opened = False

    def _spill_rest(self, include_inflight: bool = False) -> None:
        """Spool whatever is left at shutdown; drop (and count) only what the spool refuses.
        Queued items are spooled as they are queued, as the spiller spools them."""
        rest: list[object] = list(self._inflight or ()) if include_inflight else []
        while True:
            try:
                rest.append(self._queue.popleft())
            except IndexError:
                break
        if not rest:
            return
        taken = self._spool_put(rest)
        if taken < len(rest):
            self._drop(len(rest) - taken)
        if taken:
            logger.info(
                "usage recorder: %d records spooled at shutdown to %s; they are written on the "
                "next start",
                taken,
                self.spool_path,
            )

    # --- writer ------------------------------------------------------------------------------

    def _open_spool(self) -> None:
        if self._spool_opened:
            return
        try:
            pending = self._spool.open()
        except Exception as exc:
            self._note_error(exc, spool=True)
            logger.error(
                "usage recorder: cannot open spool %s (%s); spooling in memory instead",
                self.spool_path,
                exc,
            )
            self._spool = Spool(":memory:", max_records=self.max_spool_records)
            pending = self._spool.open()
        self._spool_opened = True
        if pending:
            logger.info(
                "usage recorder: %d spooled records to replay from %s", pending, self.spool_path
            )

    def _run_writer(self) -> None:
        try:
            self._open_spool()
        except Exception:
            logger.exception("usage recorder: no spool available")
        while True:
            if not self._stopping:
                timeout = self.flush_interval
                if self._backoff.active:
                    timeout = min(timeout, self._backoff.remaining(time.monotonic()))
                self._wake.wait(timeout)
                self._wake.clear()
            try:
                if self._backoff.active:
                    if self._stopping:
                        return
                    if self._backoff.due(time.monotonic()):
                        self._retry()
                    continue
                self._drain(self._deadline if self._stopping else None, whole=self._stopping)
                if self._stopping:
                    return
                if (
                    not self._backoff.active
                    and len(self._queue) < self.batch_size
                    and self._replay_one() == "written"
                ):
                    self._wake.set()
            except Exception as exc:  # a bug must not kill the worker: log it and keep going
                self._note_error(exc)
                logger.exception("usage recorder: unexpected error in the writer")
                time.sleep(self.flush_interval)

    def _take(self) -> PackedBatch:
        """The next batch off the queue, still packed: the store unpacks what it must."""
        items: list[object] = []
        batch = self._inflight = PackedBatch(items)
        queue = self._queue
        for _ in range(self.batch_size):
            try:
                items.append(queue.popleft())
            except IndexError:
                break
        return batch

    def _drain(self, deadline: float | None, whole: bool = False) -> None:
        """Write the queue batch by batch; on a database failure spool the batch and back off.

        After the first batch only full batches follow, unless ``whole`` (shutting down, a
        flush without the thread): under load a writer that chased the queue would write many
        small batches, each paying a transaction's round trips; what is left waits for the
        next wake (a full batch queued, ``flush_interval``, or ``force_flush``).
        """
        first = True
        while self._queue and not self._backoff.active:
            if deadline is not None and time.monotonic() > deadline:
                return
            if not (first or whole) and len(self._queue) < self.batch_size:
                return
            first = False
            batch = self._take()
            try:
                pending = self._write(batch)
                if pending:
                    self._enter_outage()
                    self._park(pending)
            finally:
                self._inflight = None

    def _write(self, batch: Sequence[Record]) -> list[Record]:
        """Write a batch; return what could not be written for now (empty when all is done).

        A batch the store refuses as invalid is bisected so that only the bad records are
        rejected; any other error means "try again later".
        """
        if not batch:
            return []
        try:
            with self._write_lock:
                self.store.write(batch)
        except (ValueError, TypeError) as exc:
            if len(batch) == 1:
                self._reject(batch[0], exc)
                return []
            mid = len(batch) // 2
            pending = self._write(batch[:mid])
            if pending:
                return [*pending, *batch[mid:]]
            return self._write(batch[mid:])
        except Exception as exc:
            self._failed_writes += 1
            self._note_error(exc)
            self._error_log.warning(
                "usage recorder: writing %d records to %s failed, will retry: %s",
                len(batch),
                self._label,
                exc,
            )
            return list(batch)
        self._written += len(batch)
        self._last_write_at = time.time()
        return []

    def _park(self, records: list[Record]) -> None:
        """Put records that must wait into the spool, or back at the head of the queue."""
        taken = 0
        while taken < len(records):
            if taken:
                self._pause()
            step = records[taken : taken + _SPOOL_STEP]
            n = self._spool_put(step)
            taken += n
            if n < len(step):
                break
        if taken < len(records):
            self._queue.extendleft(reversed(records[taken:]))

    def _pause(self) -> None:
        """Between two spooling steps: a short sleep, so that a thread waiting for the GIL (the
        event loop) takes it now rather than after the switch interval. Skipped once the queue
        is three quarters full: then keeping up comes first (where sleeps are coarse, a pause
        could otherwise slow the spiller down to dropping records)."""
        if len(self._queue) < self._hurry:
            time.sleep(_SPOOL_PAUSE)

    def _spool_put(self, records: Sequence[object]) -> int:
        """Spool records (or queue items), oldest first; how many from the head are settled.
        Never raises.

        Settled means spooled, or rejected when a record cannot be encoded (found by bisecting,
        as in :meth:`_write`). A failing spool (disk full, file size limit) takes none: the
        failure is counted and logged, and the caller keeps the records or counts them dropped.
        """
        if not records:
            return 0
        try:
            taken, added = self._spool.put(records)
        except (sqlite3.Error, OSError) as exc:
            self._spool_failed(exc, f"writing {len(records)} record(s) to")
            return 0
        except Exception as exc:  # a record that cannot be encoded, such as a non-record
            if len(records) == 1:
                self._reject(unpack(records[0]), exc)
                return 1
            mid = len(records) // 2
            head = self._spool_put(records[:mid])
            if head < mid:
                return head
            return mid + self._spool_put(records[mid:])
        # Counted once per record: the batch in flight at a shutdown's deadline is spooled by
        # the shutdown and, when its write then fails, by the writer again.
        with self._count_lock:
            self._spooled += added
        return taken

    def _spool_failed(self, exc: Exception, what: str) -> None:
        """Count and log a failed spool operation; the spiller pauses before trying again."""
        self._spool_retry_at = time.monotonic() + _SPOOL_RETRY
        self._note_error(exc, spool=True)
        self._spool_log.warning(
            "usage recorder: spool error: %s %s failed: %s", what, self.spool_path, exc
        )

    def _reject(self, record: object, exc: Exception) -> None:
        with self._count_lock:
            self._rejected += 1
        self._reject_log.warning(
            "usage recorder: rejected a record the store cannot accept: %s (%s)",
            exc,
            getattr(record, "id", type(record).__name__),
        )

    def _note_error(self, exc: BaseException, *, spool: bool = False) -> None:
        """Make a failure visible in stats(): ``last_error``, and ``spool_errors`` for the spool."""
        if spool:
            with self._count_lock:
                self._spool_errors += 1
        self._last_error = f"{type(exc).__name__}: {exc}"[:300]
        self._last_error_at = time.time()

    def _enter_outage(self) -> None:
        self._backoff.fail(time.monotonic())
        self._spill_wake.set()  # the spiller moves the queue to the spool meanwhile

    def _leave_outage(self) -> None:
        failures = self._backoff.reset()
        if failures:
            logger.info(
                "usage recorder: %s reachable again after %d failed attempts; replaying the spool",
                self._label,
                failures,
            )
        self._wake.set()

    def _retry(self) -> None:
        """One attempt while backing off: a spooled batch if any, else a queued one.

        With nothing to try (spool empty or claimed by other processes, queue empty) the
        outage ends: the next batch finds out whether the database is back.
        """
        self._retried += 1
        outcome = self._replay_one()
        if outcome == "failed":
            return
        if outcome == "empty":
            batch = self._take()
            try:
                pending = self._write(batch)
                if pending:
                    self._enter_outage()
                    self._park(pending)
                    return
            finally:
                self._inflight = None
        self._leave_outage()

    def _replay_one(self) -> str:
        """Replay one spooled batch: ``"written"`` (or rejected), ``"failed"`` or ``"empty"``.

        A spool that cannot be read counts as empty (the failure counted and logged), so that
        queued records are still tried.
        """
        if not self._spool_opened:
            return "empty"
        try:
            rows = self._claim()
        except (sqlite3.Error, OSError) as exc:
            self._spool_failed(exc, "claiming rows from")
            return "empty"
        if not rows:
            return "empty"
        # Packed as the queue packs records: a replay writes a batch for as long as the
        # database takes, and records alive that long would reach the collector's oldest
        # generation (see compact); the store unpacks only what it must.
        items: list[object] = []
        # the rows' keys, as stored, by their record's id (as an integer: no UUID objects)
        keys: list[tuple[int, SpoolKey]] = []
        unreadable: list[tuple[SpoolKey, str]] = []
        for n, (key, payload) in enumerate(rows, 1):
            try:
                item = decode_item(payload)
            except Exception as exc:  # whatever a damaged row makes it raise: set it aside
                unreadable.append((key, str(exc)[:300]))
                continue
            items.append(item)
            keys.append((packed_id(item), key))
            if not n % _REPLAY_STEP:
                time.sleep(_SPOOL_PAUSE)  # the GIL to a thread waiting for it (the event loop)
        self._quarantine(unreadable)
        written = self._written
        batch = self._inflight = PackedBatch(items)
        try:
            pending = self._write(batch)
        finally:
            self._inflight = None
        self._replayed += self._written - written
        # A row waits if a record of its id does (copies of one record share their fate)
        pending_ids = {r.id.int for r in pending}
        waiting = [key for rid, key in keys if rid in pending_ids]
        try:
            # Rows not removed stay leased and are replayed again later: harmless, idempotent.
            self._spool.remove([key for rid, key in keys if rid not in pending_ids])
            self._spool.release(waiting)
        except (sqlite3.Error, OSError) as exc:
            self._spool_failed(exc, "removing replayed rows from")
        if pending:
            self._enter_outage()
            return "failed"
        return "written"

    def _claim(self) -> list[tuple[SpoolKey, str]]:
        now = time.monotonic()
        if self._spool.pending <= 0 and now >= self._next_refresh:
            self._next_refresh = now + _SPOOL_REFRESH
            self._spool.refresh()  # other processes may have spooled records
        if self._spool.pending <= 0:
            return []
        return self._spool.claim(self.batch_size)

    def _quarantine(self, rows: list[tuple[SpoolKey, str]]) -> None:
        """Set unreadable spooled rows aside (counted, logged), so they are never replayed."""
        if not rows:
            return
        try:
            self._spool.quarantine(rows)
        except (sqlite3.Error, OSError) as exc:  # they stay leased, and are tried again later
            self._spool_failed(exc, "quarantining rows in")
            return
        self._quarantined += len(rows)
        self._reject_log.warning(
            "usage recorder: %d spooled record(s) cannot be read back, moved to table "
            "spool_quarantine of %s (%d in total): %s",
            len(rows),
            self.spool_path,
            self._quarantined,
            rows[0][1],
        )

    # --- spiller -----------------------------------------------------------------------------

    def _run_spiller(self) -> None:
        while not self._stopping:
            self._spill_wake.wait(self.flush_interval)
            self._spill_wake.clear()
            if self._stopping:
                return
            try:
                if self._backoff.active:
                    self._spill(0)
                elif len(self._queue) > self._high_water:
                    self._spill(self._low_water)
            except Exception as exc:  # a bug must not kill the spiller: log it and keep going
                self._note_error(exc)
                logger.exception("usage recorder: unexpected error in the spiller")
                time.sleep(self.flush_interval)

    def _spill(self, keep: int) -> None:
        """Move records from the queue's head to the spool until ``keep`` remain.

        In steps of ``_SPOOL_STEP`` records with a pause between them, so that the event loop
        never waits long for the GIL. What the spool does not take goes back to the head of the
        queue; after a spool failure the spiller waits ``_SPOOL_RETRY`` before it tries again.
        """
        if time.monotonic() < self._spool_retry_at:
            return
        queue = self._queue
        first = True
        while len(queue) > keep and not self._stopping:
            if not first:
                self._pause()
            first = False
            chunk: list[object] = []
            # no larger than a batch: records out of the queue while they are spooled let
            # submit() take as many more, and any the spool refuses go back to the queue; the
            # spool encodes them as they are queued (no record is made)
            for _ in range(min(len(queue) - keep, _SPOOL_STEP, self.batch_size)):
                try:
                    chunk.append(queue.popleft())
                except IndexError:
                    break
            if not chunk:
                return
            taken = self._spool_put(chunk)
            if taken < len(chunk):
                queue.extendleft(reversed(chunk[taken:]))
                return

    # --- introspection -----------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters for this process, JSON-serialisable (also exported as OTel metrics).

        ``written`` records delivered to the store, ``replayed`` those of them that came from
        the spool, ``spooled`` records this process put in the spool, ``spool_pending`` rows in
        the spool file now (all processes), ``failed_writes`` failed write attempts,
        ``retried`` attempts made while backing off, ``rejected`` records the store can never
        accept, ``quarantined`` spooled rows that could not be read back (kept aside in the
        spool file), ``spool_errors`` failed spool operations (disk full, file size limit),
        ``dropped`` records lost because the queue was full and nothing more could be spooled.
        ``last_error`` is the latest failure of any kind.
        """
        backoff = self._backoff
        if not self._started:
            state = State.STOPPED if self._stopping else State.NOT_STARTED
        else:
            state = State.BACKING_OFF if backoff.active else State.RUNNING
        return {
            "store": self._label,
            "pid": self._pid,
            "state": state.value,
            "queued": len(self._queue),
            "written": self._written,
            "replayed": self._replayed,
            "spooled": self._spooled,
            "spool_pending": self._spool.pending,
            "dropped": self._dropped,
            "rejected": self._rejected,
            "quarantined": self._quarantined,
            "spool_errors": self._spool_errors,
            "failed_writes": self._failed_writes,
            "retried": self._retried,
            "backoff_seconds": round(backoff.delay, 3) if backoff.active else 0.0,
            "last_error": self._last_error,
            "last_error_at": _iso(self._last_error_at),
            "last_write_at": _iso(self._last_write_at),
            "spool_path": self.spool_path,
        }

    # --- fork --------------------------------------------------------------------------------

    def _before_fork(self) -> None:
        """Quiesce: no write in progress and no SQLite connection open while the process forks."""
        if self._pid != os.getpid():
            return
        wrote = self._write_lock.acquire(timeout=_FORK_WAIT)
        spool = self._spool.suspend(timeout=_FORK_WAIT)
        self._fork_held = (wrote, spool)
        if wrote:
            self.store.backend.before_fork()

    def _after_fork_in_parent(self) -> None:
        wrote, spool = self._fork_held
        self._fork_held = (False, False)
        if spool:
            self._spool.resume()
        if wrote:
            self._write_lock.release()

    def _after_fork_in_child(self) -> None:
        lifecycle.keep_inherited(self._spool.abandon())
        self._init_state()
        self.store.backend.after_fork()
