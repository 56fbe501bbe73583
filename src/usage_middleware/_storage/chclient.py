"""The one seam between the ClickHouse backend and its two ways in.

* :class:`HTTPClient` — a ClickHouse server over HTTP(S) through ``clickhouse-connect``.
* :class:`EmbeddedClient` — ClickHouse in this process through ``chdb`` (a directory on disk).

Both take the same SQL with server-side ``{name:Type}`` parameters, so the backend's statements
are written once. Parameters are Python ints, strings, dates, UUIDs and lists of them; instants
are passed as integer microseconds (``fromUnixTimestamp64Micro``), never as ``datetime``, so no
client can drop their fraction or shift them by a session time zone. Reads return plain rows of
ints and strings. Failures that a retry can cure become :class:`DatabaseUnavailableError`.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol

from .._errors import ConfigurationError, DatabaseUnavailableError

__all__ = ["Client", "EmbeddedClient", "HTTPClient", "missing_extra"]

Row = tuple[Any, ...]


def missing_extra(exc: ImportError) -> ConfigurationError:
    return ConfigurationError(
        f"ClickHouse support is not installed ({exc.name or exc}): "
        "pip install 'usage-middleware[clickhouse]'"
    )


class Client(Protocol):
    """What the backend needs from a ClickHouse connection."""

    #: A name for errors and logs (no password).
    where: str

    def command(self, sql: str, params: Mapping[str, Any] | None = None) -> None: ...

    def query(self, sql: str, params: Mapping[str, Any] | None = None) -> list[Row]: ...

    def insert(
        self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], token: str
    ) -> None:
        """One INSERT of ``rows``; ``token`` is its ``insert_deduplication_token``."""

    def close(self) -> None: ...

    def forked(self) -> None:
        """Called in a forked child: forget what belongs to the parent."""


class HTTPClient:
    """A ClickHouse server through ``clickhouse-connect`` (HTTP, pooled, thread-safe: no session
    id, so concurrent statements from the reader pool and the recorder do not collide)."""

    def __init__(
        self,
        *,
        host: str,
        port: int | None,
        username: str | None,
        password: str | None,
        database: str,
        secure: bool,
        connect_timeout: float,
        read_timeout: float | None,
        settings: Mapping[str, Any],
    ) -> None:
        try:
            import clickhouse_connect  # noqa: F401
        except ImportError as exc:
            raise missing_extra(exc) from exc
        self.where = f"clickhouse://{host}:{port or (8443 if secure else 8123)}/{database}"
        self._options: dict[str, Any] = {
            "host": host,
            "port": port or (8443 if secure else 8123),
            "username": username or "default",
            "password": password or "",
            "database": database,
            "secure": secure,
            "connect_timeout": connect_timeout,
            "send_receive_timeout": read_timeout or 300,
            "autogenerate_session_id": False,
            "settings": dict(settings),
        }
        self._client: Any = None
        self._lock = threading.Lock()

    def _get(self) -> Any:
        client = self._client
        if client is None:
            with self._lock:
                if self._client is None:
                    import clickhouse_connect

                    self._client = self._call(clickhouse_connect.get_client, **self._options)
                client = self._client
        return client

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        from clickhouse_connect.driver.exceptions import OperationalError

        try:
            return fn(*args, **kwargs)
        except OperationalError as exc:
            raise DatabaseUnavailableError(
                f"cannot reach {self.where}: {exc} (check that the server is running and the "
                "URL and credentials are right; the recorder keeps retrying)"
            ) from exc

    def command(self, sql: str, params: Mapping[str, Any] | None = None) -> None:
        self._call(self._get().command, sql, parameters=dict(params or {}))

    def query(self, sql: str, params: Mapping[str, Any] | None = None) -> list[Row]:
        result = self._call(self._get().query, sql, parameters=dict(params or {}))
        return [tuple(r) for r in result.result_rows]

    def insert(
        self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], token: str
    ) -> None:
        self._call(
            self._get().insert,
            table,
            list(rows),
            column_names=list(columns),
            settings={"insert_deduplication_token": token},
        )

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()

    def forked(self) -> None:
        # The parent's pooled sockets: drop them unclosed, a new client is made on first use.
        self._client = None
        self._lock = threading.Lock()


def _arrow_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Any:
    """Rows as an Arrow table: UUIDs as text (ClickHouse casts them), instants as UTC
    microsecond timestamps, everything else as Arrow infers it."""
    import pyarrow as pa

    data: dict[str, Any] = {}
    for i, name in enumerate(columns):
        values = [r[i] for r in rows]
        sample = next((v for v in values if v is not None), None)
        if isinstance(sample, uuid.UUID):
            data[name] = pa.array([None if v is None else str(v) for v in values], pa.string())
        elif isinstance(sample, datetime):
            data[name] = pa.array(values, pa.timestamp("us", tz="UTC"))
        elif sample is None:
            data[name] = pa.array(values, pa.string())
        else:
            data[name] = pa.array(values)
    return pa.table(data)


class EmbeddedClient:
    """ClickHouse inside this process through ``chdb``.

    chdb runs one embedded server per process, on one directory, and that server does not
    survive ``fork``: a forked child cannot use it (it would hang), so after a fork every call
    raises :class:`ConfigurationError` instead. Statements are serialised by a lock: the session
    is one in-process engine, which parallelises each statement itself.
    """

    def __init__(self, path: str | None) -> None:
        try:
            from chdb import session  # noqa: F401
            from clickhouse_connect.driver.binding import format_bind_value  # noqa: F401
        except ImportError as exc:
            raise missing_extra(exc) from exc
        self.path = os.path.abspath(path) if path else None
        self.where = f"chdb://{self.path or ''}"
        self._session: Any = None
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def _get(self) -> Any:
        if os.getpid() != self._pid:
            raise ConfigurationError(
                "a chdb store cannot be used in a forked process (chdb's embedded server does "
                "not survive fork): open the store after forking in a single process, or store "
                "to a ClickHouse server with clickhouse://"
            )
        if self._session is None:
            from chdb import session

            try:
                if self.path is not None:
                    os.makedirs(self.path, exist_ok=True)
                self._session = session.Session(self.path)  # type: ignore[no-untyped-call]
            except Exception as exc:
                raise ConfigurationError(
                    f"cannot open {self.where}: {exc} (chdb runs one embedded database "
                    "directory per process: close the other chdb store first)"
                ) from exc
        return self._session

    @staticmethod
    def _params(params: Mapping[str, Any] | None) -> dict[str, str] | None:
        if not params:
            return None
        from clickhouse_connect.driver.binding import format_bind_value

        return {k: format_bind_value(v) for k, v in params.items()}

    def _run(self, sql: str, params: Mapping[str, Any] | None) -> bytes:
        with self._lock:
            result = self._get().query(sql, "JSONCompact", params=self._params(params))
        return bytes(result.bytes())

    def command(self, sql: str, params: Mapping[str, Any] | None = None) -> None:
        self._run(sql, params)

    def query(self, sql: str, params: Mapping[str, Any] | None = None) -> list[Row]:
        raw = self._run(sql, params)
        if not raw:
            return []
        return [tuple(r) for r in json.loads(raw)["data"]]

    def insert(
        self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], token: str
    ) -> None:
        """One INSERT … SELECT from an Arrow table of the rows (chdb's ``Python()`` table
        function reads it in place: several times faster than any text format)."""
        usage_rows = _arrow_table(columns, rows)  # noqa: F841 - read by name by chdb
        names = ", ".join(columns)
        statement = (
            f"INSERT INTO {table} ({names}) SELECT {names} FROM Python(usage_rows) "
            f"SETTINGS insert_deduplication_token = '{token}'"
        )
        with self._lock:
            self._get().query(statement, "JSONCompact")

    def close(self) -> None:
        if os.getpid() != self._pid:
            return  # a forked child keeps the parent's session untouched (see forked())
        with self._lock:
            s, self._session = self._session, None
            if s is not None:
                s.close()

    def forked(self) -> None:
        # The parent's session is unusable here and _get() refuses by pid. It is kept referenced
        # on purpose: closing it, even by garbage collection, would hang the child.
        self._lock = threading.Lock()
