"""The recorder's OpenTelemetry instruments: observable counters and gauges read from
``Recorder.stats()``, one set per meter provider for every recorder attached to it."""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from opentelemetry import metrics

if TYPE_CHECKING:
    from .recorder import Recorder

__all__ = ["register_metrics"]

_metrics_lock = threading.Lock()
_by_provider: dict[int, tuple[Any, weakref.WeakSet[Recorder]]] = {}

_COUNTERS = (
    ("written", "Records delivered to the usage store", "{record}"),
    ("replayed", "Records written from the spool after an outage or a restart", "{record}"),
    ("spooled", "Records moved to the on-disk spool", "{record}"),
    ("dropped", "Records lost because the queue was full and the spool took no more", "{record}"),
    ("rejected", "Records the usage store can never accept", "{record}"),
    ("quarantined", "Spooled records that could not be read back, set aside", "{record}"),
    ("spool_errors", "Failed spool operations (disk full, file size limit)", "{error}"),
    ("failed_writes", "Failed write attempts", "{attempt}"),
)
_GAUGES = (
    ("queued", "Records waiting in memory"),
    ("spool_pending", "Records waiting in the spool"),
)


def _observer(
    recorders: weakref.WeakSet[Recorder], key: str
) -> Callable[[metrics.CallbackOptions], Iterator[metrics.Observation]]:
    def observe(_options: metrics.CallbackOptions) -> Iterator[metrics.Observation]:
        for recorder in list(recorders):
            if recorder._pid != os.getpid():
                continue
            yield metrics.Observation(
                recorder.stats()[key],
                {
                    "usage_middleware.store": recorder._label,
                    "usage_middleware.recorder": recorder._serial,
                },
            )

    return observe


def register_metrics(recorder: Recorder, meter_provider: metrics.MeterProvider | None) -> None:
    """One set of instruments per meter provider, observing every recorder attached to it."""
    provider = meter_provider if meter_provider is not None else metrics.get_meter_provider()
    with _metrics_lock:
        entry = _by_provider.get(id(provider))
        if entry is not None and entry[0] is provider:
            entry[1].add(recorder)
            return
        recorders: weakref.WeakSet[Recorder] = weakref.WeakSet([recorder])
        _by_provider[id(provider)] = (provider, recorders)
    meter = provider.get_meter("usage_middleware")
    for key, description, unit in _COUNTERS:
        meter.create_observable_counter(
            f"usage_middleware.recorder.{key}",
            callbacks=[_observer(recorders, key)],
            unit=unit,
            description=description,
        )
    for key, description in _GAUGES:
        meter.create_observable_gauge(
            f"usage_middleware.recorder.{key}",
            callbacks=[_observer(recorders, key)],
            unit="{record}",
            description=description,
        )
