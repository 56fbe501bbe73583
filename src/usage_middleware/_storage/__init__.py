"""Storage backends: one module per engine behind the protocols of :mod:`.base`.

:func:`open_backend` picks the engine from the URL's scheme:

* ``sqlite:///path/usage.db`` — :mod:`.sqlite` (embedded, the default choice)
* ``postgresql+psycopg://user@host/db`` (also ``postgresql://``, ``postgres://``) — :mod:`.postgres`
* ``memory://`` — :mod:`.memory`, the in-memory test double
* ``clickhouse://user:pw@host:8123/db`` (a server over HTTP) and ``chdb:///path/to/dir``
  (embedded in this process) — :mod:`.clickhouse`, with the ``clickhouse`` extra

Engines are imported only when used, so a missing optional driver matters only to its users.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from .._errors import ConfigurationError
from .base import Backend, Histogram, Reader, Scope, UploadRow, Writer

if TYPE_CHECKING:
    from .postgres import PostgresBackend
    from .sqlite import SQLiteBackend

__all__ = [
    "Backend",
    "Histogram",
    "Reader",
    "Scope",
    "UploadRow",
    "Writer",
    "normalize_url",
    "open_backend",
]

_SUPPORTED = (
    "'sqlite:///path/usage.db', 'postgresql+psycopg://user@host/dbname', "
    "'clickhouse://user:pw@host:8123/db', 'chdb:///path/to/dir' or 'memory://'"
)


def normalize_url(url: str | URL) -> URL:
    """The URL with its driver settled, or :class:`ConfigurationError` saying what works."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise ConfigurationError(
            f"cannot parse database URL {str(url)!r:.80}: use {_SUPPORTED}"
        ) from exc
    backend = parsed.get_backend_name()
    if backend in ("postgresql", "postgres"):
        if parsed.drivername in ("postgresql", "postgres", "postgresql+psycopg2"):
            parsed = parsed.set(drivername="postgresql+psycopg")
        if parsed.drivername != "postgresql+psycopg":
            raise ConfigurationError(
                f"unsupported PostgreSQL driver {parsed.drivername!r}: use 'postgresql+psycopg://'"
            )
    elif backend == "sqlite":
        if parsed.drivername != "sqlite":
            raise ConfigurationError(
                f"unsupported SQLite driver {parsed.drivername!r}: use 'sqlite:///path/usage.db'"
            )
    elif parsed.drivername not in ("memory", "clickhouse", "chdb"):
        raise ConfigurationError(
            f"unsupported database URL scheme {parsed.drivername!r}: usage-middleware stores "
            f"to {_SUPPORTED}"
        )
    return parsed


def open_backend(
    url: URL,
    *,
    connect_timeout: float,
    read_timeout: float | None,
    write_timeout: float,
    raw_retention_days: int | None = None,
    engine_options: dict[str, Any],
) -> Backend:
    """The backend for a URL returned by :func:`normalize_url` (it does not connect yet)."""
    if url.drivername == "memory":
        from .memory import MemoryBackend

        if engine_options:
            raise ConfigurationError("engine_options do not apply to the in-memory backend")
        return MemoryBackend()
    if url.drivername in ("clickhouse", "chdb"):
        from .clickhouse import ClickHouseBackend

        # ClickHouse keeps retention as a table TTL, so it needs the age at schema creation;
        # the SQL engines prune on maintain() instead.
        return ClickHouseBackend(
            url,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            raw_retention_days=raw_retention_days,
            engine_options=engine_options,
        )
    try:
        if url.get_backend_name() == "sqlite":
            from .sqlite import SQLiteBackend

            engine: type[SQLiteBackend | PostgresBackend] = SQLiteBackend
        else:
            from .postgres import PostgresBackend

            engine = PostgresBackend
        return engine(
            url,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            write_timeout=write_timeout,
            engine_options=engine_options,
        )
    except (NoSuchModuleError, ImportError) as exc:
        raise ConfigurationError(
            f"the driver for {url.drivername!r} is not installed: "
            "pip install 'usage-middleware[postgres]'"
        ) from exc
