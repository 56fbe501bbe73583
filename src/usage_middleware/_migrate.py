"""Legacy migration: old per-provider running totals into the rollups, once.

The rules are those of ``sql/migrate_existing_usage_data.sql`` (read its header); how an engine
applies them is its backend's (:mod:`usage_middleware._storage.legacy`).
"""

from __future__ import annotations

from ._storage.legacy import LegacySource, MigrationResult
from ._store import UsageStore

__all__ = ["LegacySource", "MigrationResult", "migrate_legacy_usage"]


def migrate_legacy_usage(store: UsageStore, source: LegacySource | None = None) -> MigrationResult:
    """Move the legacy totals of ``source`` into the rollups once; later calls do nothing."""
    store.ensure_schema()
    return store.backend.migrate_legacy(source or LegacySource())
