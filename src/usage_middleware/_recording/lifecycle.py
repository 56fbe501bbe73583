"""Recorders across fork and interpreter exit.

``os.register_at_fork`` quiesces every live recorder before a fork (no write in progress, no
SQLite handle open), resumes it in the parent and resets it in the child (no inherited thread,
queue, spool connection or pooled database connection). At exit, running recorders, and
recorders holding records submitted after their shutdown, write or spool what they hold.
"""

from __future__ import annotations

import atexit
import logging
import os
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .recorder import Recorder

__all__ = ["keep_inherited", "track"]

logger = logging.getLogger("usage_middleware._recording.recorder")

_live: weakref.WeakSet[Recorder] = weakref.WeakSet()
# Connections a forked child inherited: kept referenced so they are never closed from the child.
_inherited: list[Any] = []


def track(recorder: Recorder) -> None:
    """Include ``recorder`` in the fork and exit hooks for as long as it lives."""
    _live.add(recorder)


def keep_inherited(connection: Any) -> None:
    """Keep a connection inherited from the parent referenced, so the child never closes it."""
    _inherited.append(connection)


def _for_each_live(method: str) -> Callable[[], None]:
    def hook() -> None:
        for recorder in list(_live):
            try:
                getattr(recorder, method)()
            except Exception:
                logger.exception("usage recorder: %s failed", method)

    return hook


def _shutdown_at_exit() -> None:
    for recorder in list(_live):
        # Running, or holding records submitted after shutdown: write or spool them now.
        if recorder._pid == os.getpid() and (recorder._started or recorder._queue):
            recorder.shutdown(timeout=5.0)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_for_each_live("_before_fork"),
        after_in_parent=_for_each_live("_after_fork_in_parent"),
        after_in_child=_for_each_live("_after_fork_in_child"),
    )
atexit.register(_shutdown_at_exit)
