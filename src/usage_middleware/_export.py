"""``GET /export``: the raw rows of a range as CSV or NDJSON, streamed with flat memory.

Rows are read in keyset pages of :data:`CHUNK_ROWS` (``(time, id) > last`` ordered by
``(time, id)`` with ``LIMIT``: each page is one short statement on a pooled connection, released
before the page is sent), formatted and handed to the response one page at a time. Memory stays
at about one page whatever the range, so there is no row cap: the range limit (``max_range_days``)
bounds an export like any query. Rows written into the range while an export runs appear if
they sort after the page being read.

CSV is RFC 4180 (Python's :mod:`csv`, CRLF line ends, a header row). A text cell that a
spreadsheet would evaluate as a formula — one starting with ``=``, ``+``, ``-``, ``@``, a tab or
a carriage return — gets a leading single quote (``'=cmd()``), the usual neutralisation
(OWASP "CSV injection"); numbers, ids and times never start with those. NDJSON is one JSON object
per line with values unchanged. Times are UTC ISO 8601 with microseconds, ids canonical UUID
text, missing values empty (CSV) or null (NDJSON).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Collection, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

from sqlalchemy import Text

from ._queries import _scope
from ._schema import api_requests, file_uploads
from ._storage.base import EXPORT_COLUMNS, Scope
from ._store import UsageStore
from ._timerange import QueryError, QuerySpec

__all__ = ["CHUNK_ROWS", "DATASETS", "FORMATS", "Export", "parse_export_options"]

DATASETS = ("uploads", "requests")
FORMATS = {"csv": "text/csv; charset=utf-8", "ndjson": "application/x-ndjson"}
CHUNK_ROWS = 5_000
_FORMULA_START = frozenset(("=", "+", "-", "@", "\t", "\r"))
_TABLES = {"uploads": "file_uploads", "requests": "api_requests"}


def _one(params: Mapping[str, Sequence[str]], name: str) -> str | None:
    values = params.get(name) or []
    if len(values) > 1:
        raise QueryError("repeated_parameter", f"{name} may be given only once", name)
    return values[0] if values and values[0] != "" else None


def parse_export_options(params: Mapping[str, Sequence[str]]) -> tuple[str, str]:
    """``dataset`` (uploads, the default, or requests) and ``format`` (csv, the default, or
    ndjson); :class:`QueryError` (400) otherwise."""
    dataset = _one(params, "dataset") or "uploads"
    if dataset not in DATASETS:
        raise QueryError(
            "invalid_dataset",
            f"dataset must be uploads or requests, got {dataset[:20]!r}",
            "dataset",
        )
    fmt = _one(params, "format") or "csv"
    if fmt not in FORMATS:
        raise QueryError(
            "invalid_format", f"format must be csv or ndjson, got {fmt[:20]!r}", "format"
        )
    return dataset, fmt


def _text_columns(dataset: str) -> list[int]:
    """Indexes of the free-text columns (those a CSV cell may need neutralised in)."""
    table = file_uploads if dataset == "uploads" else api_requests
    names = EXPORT_COLUMNS[dataset]
    return [i for i, name in enumerate(names) if isinstance(table.c[name].type, Text)]


def _neutralised(rows: list[tuple[Any, ...]], text_columns: list[int]) -> list[Any]:
    """The page with every text a spreadsheet would evaluate prefixed with a single quote,
    a whole column per comprehension (ids, times and numbers are never touched)."""
    columns: list[Any] = list(zip(*rows, strict=True))
    for i in text_columns:
        columns[i] = [
            "'" + v if v is not None and v[:1] in _FORMULA_START else v for v in columns[i]
        ]
    return list(zip(*columns, strict=True))


class Export:
    """One export: its parameters, the first page (read before the response starts, so an
    unreachable database is still a 503), and the body as an iterator of encoded pages."""

    def __init__(
        self,
        store: UsageStore,
        spec: QuerySpec,
        key_ids: Collection[UUID] | None,
        dataset: str,
        fmt: str,
        chunk_rows: int | None = None,
    ) -> None:
        self.store = store
        self.dataset = dataset
        self.format = fmt
        self.columns = EXPORT_COLUMNS[dataset]
        self.chunk_rows = chunk_rows or CHUNK_ROWS
        self.start, self.end = spec.start_utc, spec.end_utc
        # provider and file type filters select uploads; requests have neither
        self.ignored = [] if dataset == "uploads" else [
            n for n, v in (("provider", spec.providers), ("file_type", spec.file_types)) if v
        ]  # fmt: skip
        self.scope: Scope | None = (
            None if key_ids is not None and not key_ids else _scope(spec, key_ids)
        )
        self.filename = f"usage-{dataset}-{spec.start.isoformat()}_{spec.end.isoformat()}.{fmt}"
        self.media_type = FORMATS[fmt]
        self.retention_start: datetime | None = None
        self._first: list[tuple[Any, ...]] = []

    def prepare(self) -> None:
        """Blocking: the schema, the retention note and the first page."""
        if self.scope is None:
            return
        self.store.ensure_schema()
        since = self.store.retention_start(_TABLES[self.dataset])
        if since is not None and since > self.start:
            self.retention_start = since
        self._first = self._page(None)

    def _page(self, after: tuple[datetime, UUID] | None) -> list[tuple[Any, ...]]:
        assert self.scope is not None
        return self.store.backend.export_rows(
            self.dataset, self.scope, self.start, self.end, after, self.chunk_rows
        )

    def pages(self) -> Iterator[list[tuple[Any, ...]]]:
        """The raw rows, a keyset page at a time (the first one read by :meth:`prepare`)."""
        rows = self._first
        self._first = []
        while rows:
            yield rows
            if len(rows) < self.chunk_rows:
                return
            at, rid = rows[-1][-1], rows[-1][0]  # the keyset, as text
            rows = self._page((datetime.fromisoformat(at), UUID(rid)))

    def body(self) -> Iterator[bytes]:
        """The encoded body, one chunk per page (blocking: iterate in a worker thread)."""
        if self.format == "csv":
            text_columns = _text_columns(self.dataset)
            buffer = io.StringIO()
            writer = csv.writer(buffer)  # RFC 4180: excel dialect, CRLF, minimal quoting
            writer.writerow(self.columns)
            for rows in self.pages():
                writer.writerows(_neutralised(rows, text_columns))  # None is written empty
                yield buffer.getvalue().encode()
                buffer.seek(0)
                buffer.truncate()
            if buffer.tell():  # no rows: the header alone
                yield buffer.getvalue().encode()
            return
        columns = self.columns
        dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
        for rows in self.pages():
            lines = [dumps(dict(zip(columns, row, strict=True))) for row in rows]
            lines.append("")
            yield "\n".join(lines).encode()
