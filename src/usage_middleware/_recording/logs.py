"""Warnings that a failing database could repeat thousands of times a second, rate-limited."""

from __future__ import annotations

import logging
import time
from typing import Any

__all__ = ["RateLimitedLog"]

logger = logging.getLogger("usage_middleware._recording.recorder")
_LOG_INTERVAL = 10.0


class RateLimitedLog:
    """Logs one WARNING per interval per kind and says how many were suppressed meanwhile."""

    def __init__(self, interval: float = _LOG_INTERVAL) -> None:
        self._interval = interval
        self._next = 0.0
        self._suppressed = 0

    def warning(self, msg: str, *args: Any) -> None:
        now = time.monotonic()
        if now < self._next:
            self._suppressed += 1
            return
        self._next = now + self._interval
        if self._suppressed:
            msg += " (%d similar warnings suppressed)"
            args = (*args, self._suppressed)
            self._suppressed = 0
        logger.warning(msg, *args)
