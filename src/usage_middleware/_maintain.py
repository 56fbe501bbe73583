"""Partitions and raw-row retention: what ``usage-middleware maintain`` (or cron) runs.

This module checks the options and asks the store's backend; how an engine keeps partitions and
prunes raw rows is its own (PostgreSQL drops whole monthly partitions, SQLite deletes in short
batches, see :mod:`usage_middleware._storage.maintenance`). The rollups are never pruned, so no
answer changes; :func:`retention_start` tells from which instant raw rows are complete.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

from ._errors import ConfigurationError
from ._storage.base import MaintainResult

if TYPE_CHECKING:
    from ._store import UsageStore

__all__ = ["MaintainResult", "check_retention_days", "maintain", "retention_start"]

RAW_TABLES = ("file_uploads", "api_requests")
MAX_MONTHS_AHEAD = 120
MAX_RETENTION_DAYS = 36_500


def check_retention_days(days: int | None) -> int | None:
    """``days`` if it is a valid raw retention (None: keep raw rows forever)."""
    if days is not None and (
        isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= MAX_RETENTION_DAYS
    ):
        raise ConfigurationError(
            f"raw_retention_days must be an integer in 1..{MAX_RETENTION_DAYS} or None, "
            f"got {days!r}"
        )
    return days


def maintain(
    store: UsageStore,
    *,
    raw_retention_days: int | None = None,
    months_ahead: int = 3,
) -> MaintainResult:
    """Create raw partitions ahead and prune raw rows past the retention age; idempotent.

    ``raw_retention_days`` defaults to the store's own option; None keeps every raw row. On
    PostgreSQL, months wholly older than the cutoff are dropped (the month holding the cutoff
    keeps all its rows); on SQLite, rows older than the cutoff are deleted in batches.
    """
    days = check_retention_days(
        store.raw_retention_days if raw_retention_days is None else raw_retention_days
    )
    if (
        isinstance(months_ahead, bool)
        or not isinstance(months_ahead, int)
        or not (0 <= months_ahead <= MAX_MONTHS_AHEAD)
    ):
        raise ConfigurationError(
            f"months_ahead must be an integer in 0..{MAX_MONTHS_AHEAD}, got {months_ahead!r}"
        )
    store.ensure_schema()
    return store.backend.maintain(days, months_ahead)


def retention_start(store: UsageStore, table: str | None = None) -> datetime | None:
    """The instant from which raw rows are complete: retention removed none at or after it.

    ``table`` is ``"file_uploads"`` or ``"api_requests"``; by default, the later of the two (from
    then on both are complete). None: no raw row was ever pruned, raw rows cover all time.
    """
    names = list(RAW_TABLES)
    if table is not None:
        if table not in names:
            raise ConfigurationError(f"table must be one of {names}, got {table!r}")
        names = [table]
    store.ensure_schema()
    return store.backend.retention_start(names)


