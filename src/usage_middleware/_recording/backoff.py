"""The recorder's retry schedule while the store is unreachable, and the recorder's states."""

from __future__ import annotations

import enum
import random

__all__ = ["Backoff", "State"]


class State(str, enum.Enum):
    """What ``Recorder.stats()["state"]`` says."""

    NOT_STARTED = "not_started"
    RUNNING = "running"
    BACKING_OFF = "backing_off"
    STOPPED = "stopped"


class Backoff:
    """Exponential backoff with jitter: after the n-th consecutive failure the next attempt
    waits ``min(maximum, initial * 2**(n-1))`` scaled by a random factor in [0.5, 1], so that
    many workers do not retry in step. Active from the first failure until :meth:`reset`."""

    __slots__ = ("delay", "failures", "initial", "maximum", "next_try")

    def __init__(self, initial: float, maximum: float) -> None:
        self.initial = initial
        self.maximum = maximum
        self.failures = 0
        self.delay = 0.0
        self.next_try = 0.0

    @property
    def active(self) -> bool:
        """True while failures are being retried."""
        return self.failures > 0

    def fail(self, now: float) -> None:
        """Note a failure at monotonic time ``now`` and schedule the next attempt."""
        self.failures += 1
        delay = min(self.maximum, self.initial * 2 ** (self.failures - 1))
        self.delay = delay * random.uniform(0.5, 1.0)
        self.next_try = now + self.delay

    def reset(self) -> int:
        """End the backoff; return how many failures it counted."""
        failures = self.failures
        self.failures = 0
        self.delay = 0.0
        return failures

    def due(self, now: float) -> bool:
        return now >= self.next_try

    def remaining(self, now: float) -> float:
        """Seconds until the next attempt (0 when it is due)."""
        return max(self.next_try - now, 0.0)
