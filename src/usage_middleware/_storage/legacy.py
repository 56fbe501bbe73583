"""Legacy migration: old per-provider running totals into ``daily_usage`` and the finer rollups.

The rules are those of ``sql/migrate_existing_usage_data.sql`` (read its header): every legacy
total lands on the UTC date of its date column with ``file_type = 'unknown'``, counted as
successful uploads, in ``daily_usage`` and at 00:00 UTC of that date in ``hourly_usage`` and
``quarter_usage``; rows with the same provider, key and date are summed, empty rows skipped, an
empty provider becomes ``'unknown'``, a NULL date becomes today (UTC). A marker row in
``usage_legacy_migrations`` per source table, written in the same transaction, makes a second run
do nothing.

On PostgreSQL :func:`migrate_postgres` runs that very SQL file, passing the table and column
names as ``usage_migrate.*`` settings local to the transaction; on SQLite :func:`migrate_sqlite`
does the same in Python. Each runs inside the write transaction its backend opened
(``SQLBackend.migrate_legacy``), which also maps driver errors (:func:`misfit`).
"""

from __future__ import annotations

import re
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, time, timezone
from typing import Any, TypeVar

from sqlalchemy import Connection, func, literal_column, text
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from .._errors import ConfigurationError
from .._schema import daily_usage, hourly_usage, quarter_usage

__all__ = ["LegacySource", "MigrationResult", "migrate_postgres", "migrate_sqlite", "misfit"]

UTC = timezone.utc
MARKER_TABLE = "usage_legacy_migrations"
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*$")
T = TypeVar("T")


@dataclass(frozen=True)
class LegacySource:
    """Where the old running totals live. ``api_key_column=None``: the table has no key column."""

    table: str = "provider_usage"
    provider_column: str = "provider"
    uploads_column: str = "total_uploads"
    bytes_column: str = "total_size"
    date_column: str = "updated_at"
    api_key_column: str | None = "api_key_id"

    def __post_init__(self) -> None:
        parts = self.table.split(".")
        if len(parts) > 2 or not all(_IDENTIFIER.match(p) for p in parts):
            raise ConfigurationError(
                f"legacy table must be 'name' or 'schema.name', got {self.table!r:.80}"
            )
        for name in ("provider_column", "uploads_column", "bytes_column", "date_column"):
            value = getattr(self, name)
            if not _IDENTIFIER.match(value):
                raise ConfigurationError(f"{name} must be a plain column name, got {value!r:.80}")
        if self.api_key_column is not None and not _IDENTIFIER.match(self.api_key_column):
            raise ConfigurationError(
                f"api_key_column must be a plain column name or None, "
                f"got {self.api_key_column!r:.80}"
            )


@dataclass(frozen=True)
class MigrationResult:
    """What the marker row says: the totals moved (now, or by an earlier run)."""

    source: str
    already_migrated: bool
    legacy_rows: int
    total_uploads: int
    total_file_size: int
    migrated_at: datetime


def misfit(message: str) -> ConfigurationError:
    """The legacy table is not what the names say (missing, or a column of another type)."""
    first = (message.strip().splitlines() or [""])[0]  # PostgreSQL adds statement and context
    return ConfigurationError(
        f"cannot read the legacy totals: {first}. Point the migration at the right table and "
        "columns (LegacySource / usage-middleware migrate --table ...)"
    )


def _marker(conn: Connection, name: str) -> Any:
    return conn.execute(
        text(
            "SELECT migrated_at, legacy_rows, total_uploads, total_file_size "
            f"FROM {MARKER_TABLE} WHERE source = :source"
        ),
        {"source": name},
    ).one_or_none()


def _result(name: str, row: Any, already: bool) -> MigrationResult:
    migrated_at = row[0]
    if isinstance(migrated_at, str):
        migrated_at = datetime.fromisoformat(migrated_at)
    if migrated_at.tzinfo is None:
        migrated_at = migrated_at.replace(tzinfo=UTC)
    return MigrationResult(
        source=name,
        already_migrated=already,
        legacy_rows=int(row[1]),
        total_uploads=int(row[2]),
        total_file_size=int(row[3]),
        migrated_at=migrated_at,
    )


def migrate_postgres(conn: Connection, source: LegacySource) -> MigrationResult:
    settings = {
        "legacy_table": source.table,
        "provider_column": source.provider_column,
        "uploads_column": source.uploads_column,
        "bytes_column": source.bytes_column,
        "date_column": source.date_column,
        "api_key_column": source.api_key_column or "none",
    }
    for key, value in settings.items():
        conn.execute(
            text("SELECT set_config(:k, :v, true)"), {"k": f"usage_migrate.{key}", "v": value}
        )
    name = conn.execute(text("SELECT to_regclass(:t)::text"), {"t": source.table}).scalar()
    if name is None:
        raise ConfigurationError(
            f"legacy usage table {source.table!r} does not exist: pass the right name "
            "(LegacySource(table=...) / usage-middleware migrate --table ...)"
        )
    before = conn.execute(text(f"SELECT to_regclass('public.{MARKER_TABLE}')")).scalar()
    already = before is not None and _marker(conn, name) is not None
    import psycopg  # the PostgreSQL driver, present since this connection uses it

    from .postgres import sql_text

    with conn.connection.dbapi_connection.cursor() as cursor:  # type: ignore[union-attr]
        try:
            cursor.execute(sql_text("migrate_existing_usage_data.sql"))
        except (psycopg.DataError, psycopg.ProgrammingError) as exc:
            raise misfit(str(exc)) from exc
    return _result(name, _marker(conn, name), already)


def _as_uuid(value: Any) -> uuid.UUID | None:
    if value is None or isinstance(value, uuid.UUID):
        return value
    if isinstance(value, bytes) and len(value) == 16:
        return uuid.UUID(bytes=value)
    return uuid.UUID(str(value))


def _as_utc_date(value: Any, today: date) -> date:
    if value is None:
        return today
    if isinstance(value, str):
        value = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    if isinstance(value, datetime):
        moment: datetime = value.astimezone(UTC) if value.tzinfo is not None else value
        return moment.date()
    if isinstance(value, date):
        return value
    raise ConfigurationError(f"legacy date column holds {type(value).__name__}, not a date")


def _read(convert: Callable[[Any], T], value: Any, column: str, number: int) -> T:
    """``convert(value)``; a value that does not convert means the column is the wrong one."""
    try:
        return convert(value)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(
            f"cannot read the legacy totals: row {number} has {value!r:.60} in column "
            f"{column!r}. Point the migration at the right columns "
            "(LegacySource / usage-middleware migrate --uploads-column ...)"
        ) from exc


def migrate_sqlite(conn: Connection, source: LegacySource) -> MigrationResult:
    name = source.table.split(".")[-1]
    conn.execute(
        text(
            f"CREATE TABLE IF NOT EXISTS {MARKER_TABLE} (source TEXT PRIMARY KEY, "
            "migrated_at TEXT NOT NULL, legacy_rows INTEGER NOT NULL, "
            "total_uploads INTEGER NOT NULL, total_file_size INTEGER NOT NULL)"
        )
    )
    done = _marker(conn, name)
    if done is not None:
        return _result(name, done, True)
    key = f'l."{source.api_key_column}"' if source.api_key_column else "NULL"
    rows = conn.execute(
        text(
            f'SELECT {key}, l."{source.provider_column}", l."{source.date_column}", '
            f'l."{source.uploads_column}", l."{source.bytes_column}" FROM "{name}" AS l'
        )
    ).all()
    now = datetime.now(UTC)
    grouped: dict[tuple[Any, ...], list[int]] = defaultdict(lambda: [0, 0, 0])
    today = now.date()
    for number, (api_key, provider, when, uploads, size) in enumerate(rows, 1):
        uploads = _read(int, uploads or 0, source.uploads_column, number)
        size = _read(int, size or 0, source.bytes_column, number)
        if uploads == 0 and size == 0:
            continue
        provider = (str(provider).strip() if provider is not None else "") or "unknown"
        key_id = _read(_as_uuid, api_key, source.api_key_column or "", number)
        day = _read(lambda v: _as_utc_date(v, today), when, source.date_column, number)
        acc = grouped[(key_id, day, provider)]
        acc[0] += uploads
        acc[1] += size
        acc[2] += 1
    ordered = sorted(
        grouped.items(), key=lambda kv: ("" if kv[0][0] is None else kv[0][0].hex, *kv[0][1:])
    )
    for table, when_column in (
        (daily_usage, "usage_date"),
        (hourly_usage, "usage_hour"),
        (quarter_usage, "usage_quarter"),
    ):
        if not ordered:
            break
        values = [
            {
                "api_key_id": api_key,
                when_column: (
                    day if when_column == "usage_date" else datetime.combine(day, time(), UTC)
                ),
                "provider": provider,
                "file_type": "unknown",
                "total_uploads": uploads,
                "total_file_size": size,
                "successful_requests": uploads,
                "failed_requests": 0,
            }
            for (api_key, day, provider), (uploads, size, _n) in ordered
        ]
        stmt = sqlite_insert(table)
        stmt = stmt.on_conflict_do_update(
            index_elements=[
                func.ifnull(table.c.api_key_id, literal_column("''")),
                table.c[when_column],
                table.c.provider,
                table.c.file_type,
            ],
            set_={
                c: table.c[c] + stmt.excluded[c]
                for c in ("total_uploads", "total_file_size", "successful_requests")
            },
        )
        conn.execute(stmt, values)
    conn.execute(
        text(
            f"INSERT INTO {MARKER_TABLE} (source, migrated_at, legacy_rows, total_uploads, "
            "total_file_size) VALUES (:source, :at, :n, :uploads, :size)"
        ),
        {
            "source": name,
            "at": now.isoformat(),
            "n": sum(v[2] for _, v in ordered),
            "uploads": sum(v[0] for _, v in ordered),
            "size": sum(v[1] for _, v in ordered),
        },
    )
    return _result(name, _marker(conn, name), False)
