"""The browser tests' own aggregation of the raw rows they wrote, independent of the package.

Plain Python over the ``UploadRecord``/``RequestRecord`` lists of ``conftest``: a row belongs to
a local range when its time, converted to the zone, falls on one of the range's days.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from uuid import UUID
from zoneinfo import ZoneInfo

from usage_middleware import RequestRecord, UploadRecord


@dataclass(frozen=True)
class View:
    """What the page shows: a local range, a zone and the filters."""

    start: date
    end: date
    tz: str = "UTC"
    file_types: Sequence[str] = ()
    providers: Sequence[str] = ()
    keys: Sequence[str] = ()  # api_key_id values; empty = every key (an all-keys caller)
    methods: Sequence[str] = ()
    routes: Sequence[str] = ()
    statuses: Sequence[str] = field(default=())

    @property
    def query(self) -> str:
        parts = [f"start={self.start}", f"end={self.end}", f"tz={self.tz}"]
        parts += [f"file_type={t}" for t in self.file_types]
        parts += [f"provider={p}" for p in self.providers]
        parts += [f"api_key_id={k}" for k in self.keys]
        return "&".join(parts).replace("+", "%2B")

    def previous(self) -> View:
        days = (self.end - self.start).days + 1
        return View(
            self.start - timedelta(days=days),
            self.start - timedelta(days=1),
            self.tz,
            self.file_types,
            self.providers,
            self.keys,
        )

    def local_day(self, at: datetime) -> date:
        return at.astimezone(ZoneInfo(self.tz)).date()

    def _key_ok(self, key: UUID | None) -> bool:
        return not self.keys or (key is not None and str(key) in self.keys)

    def uploads(self, rows: Iterable[UploadRecord]) -> list[UploadRecord]:
        """Rows in the range, of the types (exact or family), providers and keys."""

        def type_ok(t: str) -> bool:
            return not self.file_types or any(
                t == f or (f.endswith("/*") and t.startswith(f[:-1])) for f in self.file_types
            )

        return [
            r
            for r in rows
            if self.start <= self.local_day(r.uploaded_at) <= self.end
            and type_ok(r.file_type)
            and (not self.providers or r.provider in self.providers)
            and self._key_ok(r.api_key_id)
        ]

    def requests(self, rows: Iterable[RequestRecord]) -> list[RequestRecord]:
        """Rows in the range and keys (type and provider filters do not apply), and of the
        endpoint and status filters."""

        def status_ok(code: int) -> bool:
            return not self.statuses or any(
                str(code) == s or (s.endswith("xx") and str(code)[0] == s[0]) for s in self.statuses
            )

        return [
            r
            for r in rows
            if self.start <= self.local_day(r.requested_at) <= self.end
            and self._key_ok(r.api_key_id)
            and (not self.methods or r.method in self.methods)
            and (not self.routes or r.path in self.routes)
            and status_ok(r.status_code)
        ]


def totals(rows: Sequence[UploadRecord]) -> dict[str, int]:
    failed = sum(r.upload_status == "failed" for r in rows)
    return {
        "uploads": len(rows),
        "bytes": sum(r.file_size for r in rows),
        "successful": len(rows) - failed,
        "failed": failed,
    }


def nearest_rank(values: Sequence[float], q: float) -> float:
    """The exact nearest-rank ``q`` quantile."""
    ordered = sorted(values)
    return ordered[max(1, math.ceil(len(ordered) * q)) - 1]
