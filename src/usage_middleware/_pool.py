"""One bounded thread pool for the read path's independent statements, safe across fork.

A ``ThreadPoolExecutor`` whose threads ran before a fork has no threads in the child but still
believes it has, so it never runs a task there: the child gets a fresh pool.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, TypeVar

__all__ = ["submit"]

_T = TypeVar("_T")
# Bounded, so concurrent dashboards queue instead of draining the connection pool.
_MAX_WORKERS = 4
_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def _new_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=_MAX_WORKERS, thread_name_prefix="usage-query")


def settle(futures: Iterable[Future[Any]]) -> None:
    """Wait until ``futures`` are done, whatever they return or raise.

    An answer whose read failed waits for the reads it started beside it before it raises: they
    hold pooled connections, and a read that outlived its answer could hand one back to a pool
    its store has disposed of meanwhile (the connection would then never be closed).
    """
    wait(list(futures))


def submit(fn: Callable[[], _T]) -> Future[_T]:
    """Run ``fn`` on the read pool."""
    global _pool
    pool = _pool
    if pool is None:
        with _lock:
            if _pool is None:
                _pool = _new_pool()
            pool = _pool
    return pool.submit(fn)


def _forget_in_child() -> None:
    global _pool, _lock
    _lock = threading.Lock()
    _pool = None


os.register_at_fork(after_in_child=_forget_in_child)
