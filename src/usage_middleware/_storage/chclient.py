"""The one seam between the ClickHouse backend and its two ways in.

* :class:`HTTPClient` — a ClickHouse server over HTTP(S) through ``clickhouse-connect``.
* :class:`EmbeddedClient` — ClickHouse in this process through ``chdb`` (a directory on disk).

Both take the same SQL with server-side ``{name:Type}`` parameters, so the backend's statements
are written once. Parameters are Python ints, strings, dates, UUIDs and lists of them; instants
are passed as integer microseconds (``fromUnixTimestamp64Micro``), never as ``datetime``, so no
client can drop their fraction or shift them by a session time zone. Reads return plain rows of
ints and strings. Failures that a retry can cure become :class:`DatabaseUnavailableError`.

Rows to insert travel by column (:data:`Columns`: a name and a :data:`Kind` per column, then one
list of Python values per column), so each client converts a whole column at once: chdb hands
them to the engine as an Arrow table it reads in place, clickhouse-connect sends them in its
native format.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from collections.abc import Mapping, Sequence
from datetime import date, datetime, timezone
from typing import Any, Literal, Protocol

from .._errors import ConfigurationError, DatabaseUnavailableError

__all__ = ["Client", "Columns", "EmbeddedClient", "HTTPClient", "Kind", "missing_extra", "token"]

Row = tuple[Any, ...]
#: How a column's Python values are typed: ``uuid`` (a UUID as its 128-bit ``int``: what the
#: recorder's queue holds, and no object per value; ``uuid?`` may be None), ``time`` (an aware
#: ``datetime``), ``date``, ``int``, ``float``, ``bool``, ``str`` (``str?``: or None).
Kind = Literal["uuid", "uuid?", "time", "date", "int", "float", "bool", "str", "str?"]
#: Columns to insert: ``(name, kind)`` pairs.
Columns = Sequence[tuple[str, Kind]]
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def token(kind: str, ids: Sequence[int]) -> str:
    """An insert deduplication token for the rows of ``ids``: the same set gives the same token
    whatever the order, so a retried INSERT of the same rows is recognised by the server."""
    import hashlib

    return hashlib.sha256(
        kind.encode() + b"".join(sorted(i.to_bytes(16, "big") for i in ids))
    ).hexdigest()


def _uuid_objects(columns: Columns, data: Sequence[list[Any]]) -> list[list[Any]]:
    """``data`` with its UUID columns as ``uuid.UUID`` objects (what clickhouse-connect sends)."""
    return [
        [None if v is None else uuid.UUID(int=v) for v in values]
        if kind in ("uuid", "uuid?")
        else values
        for (_, kind), values in zip(columns, data, strict=True)
    ]


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

    def insert(self, table: str, columns: Columns, data: Sequence[list[Any]], token: str) -> None:
        """One INSERT of the rows of ``data`` (a list of values per column); ``token`` is its
        ``insert_deduplication_token`` (empty: none)."""

    def insert_new(
        self,
        table: str,
        columns: Columns,
        data: Sequence[list[Any]],
        stored: str,
        params: Mapping[str, Any],
    ) -> int:
        """Insert the rows of ``data`` whose ``id`` (the first column) is not among the ids
        ``SELECT id FROM table WHERE <stored>`` finds (with ``params``): one INSERT. Returns how
        many rows it inserted."""

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

    def insert(self, table: str, columns: Columns, data: Sequence[list[Any]], token: str) -> None:
        self._call(
            self._get().insert,
            table,
            _uuid_objects(columns, data),
            column_names=[name for name, _ in columns],
            column_oriented=True,
            settings={"insert_deduplication_token": token} if token else {},
        )

    def insert_new(
        self,
        table: str,
        columns: Columns,
        data: Sequence[list[Any]],
        stored: str,
        params: Mapping[str, Any],
    ) -> int:
        """Asks which ids are stored, then inserts the others with a deduplication token
        hashed from them (a retried INSERT whose first attempt committed is dropped)."""
        ids = data[0]
        found = self.query(
            f"SELECT DISTINCT toString(id) FROM {table} WHERE {stored} "
            "AND id IN {candidate_ids:Array(UUID)}",
            {**params, "candidate_ids": [uuid.UUID(int=i) for i in ids]},
        )
        stored_ids = {uuid.UUID(r[0]).int for r in found}
        keep = [i for i, v in enumerate(ids) if v not in stored_ids]
        if not keep:
            return 0
        if len(keep) < len(ids):
            data = [[column[i] for i in keep] for column in data]
        self.insert(table, columns, data, token(table, data[0]))
        return len(keep)

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()

    def forked(self) -> None:
        # The parent's pooled sockets: drop them unclosed, a new client is made on first use.
        self._client = None
        self._lock = threading.Lock()


def _micros(values: list[datetime]) -> list[int]:
    """Aware instants as integer microseconds since the epoch (exact; faster than Arrow's own
    conversion of aware datetimes)."""
    out = []
    for t in values:
        d = t - _EPOCH
        out.append(d.days * 86_400_000_000 + d.seconds * 1_000_000 + d.microseconds)
    return out


def _arrow_column(kind: Kind, values: list[Any]) -> tuple[Any, str]:
    """A column as an Arrow array plus the SQL that turns it into the table's type: UUIDs travel
    as their 16 bytes (cheaper than text on both sides), instants as microseconds."""
    import pyarrow as pa

    if kind == "uuid":
        array = pa.array([v.to_bytes(16, "big") for v in values], pa.binary(16))
        return array, "toUUID(UUIDNumToString({}))"
    if kind == "uuid?":
        array = pa.array(
            [None if v is None else v.to_bytes(16, "big") for v in values], pa.binary(16)
        )
        return array, "toUUIDOrNull(UUIDNumToString({}))"
    if kind == "time":
        return pa.array(_micros(values), pa.int64()), "fromUnixTimestamp64Micro({}, 'UTC')"
    arrow_type = {
        "int": pa.int64(), "float": pa.float64(), "bool": pa.bool_(), "date": pa.date32()
    }.get(kind, pa.string())
    return pa.array(values, arrow_type), "{}"


def _bind(value: Any) -> str:
    """A parameter as ClickHouse text; lists of ints and dates are formatted here (the generic
    formatter costs microseconds per element, and reads pass thousands)."""
    from clickhouse_connect.driver.binding import format_bind_value

    if isinstance(value, list) and value:
        first = value[0]
        if type(first) is int:
            return "[" + ",".join(map(str, value)) + "]"
        if type(first) is date:
            return "[" + ",".join(f"'{d.isoformat()}'" for d in value) + "]"
    return str(format_bind_value(value))


class EmbeddedClient:
    """ClickHouse inside this process through ``chdb``.

    chdb runs one embedded server per process, on one directory, and that server does not
    survive ``fork``: a forked child cannot use it (it would hang), so after a fork every call
    raises :class:`ConfigurationError` instead.

    Any number of connections to that server may run statements at the same time, and chdb
    runs them in parallel. Writes (``command``, ``insert``, ``insert_new``) run one at a time
    on one connection, so no other write comes between the check and the insert of
    :meth:`insert_new`; reads run on up to ``readers`` connections of their own, beside each
    other and beside the writes, as they would on a server: a statement's planning (several
    milliseconds) and the waits of a write no longer hold up the other reads of an answer.
    """

    def __init__(self, path: str | None, readers: int = 4) -> None:
        try:
            from chdb import session  # noqa: F401
            from clickhouse_connect.driver.binding import format_bind_value  # noqa: F401
        except ImportError as exc:
            raise missing_extra(exc) from exc
        self.path = os.path.abspath(path) if path else None
        self.where = f"chdb://{self.path or ''}"
        self._session: Any = None
        self._lock = threading.Lock()  # the writes, one at a time
        self._pool = threading.Lock()  # the reading connections' lists
        self._readers = max(1, readers)
        self._idle: list[Any] = []  # reading connections not in use
        self._free = threading.Semaphore(self._readers)
        self._pid = os.getpid()

    def _check_process(self) -> None:
        if os.getpid() != self._pid:
            raise ConfigurationError(
                "a chdb store cannot be used in a forked process (chdb's embedded server does "
                "not survive fork): open the store after forking in a single process, or store "
                "to a ClickHouse server with clickhouse://"
            )

    def _open(self) -> Any:
        """A new connection to the store's directory (the first one starts the server)."""
        from chdb import session

        try:
            if self.path is not None:
                os.makedirs(self.path, exist_ok=True)
            connection: Any = session.Session(self.path)  # type: ignore[no-untyped-call]
            # 64-bit integers as JSON numbers (Python's json reads any size exactly)
            connection.query("SET output_format_json_quote_64bit_integers = 0")
        except Exception as exc:
            raise ConfigurationError(
                f"cannot open {self.where}: {exc} (chdb runs one embedded database "
                "directory per process: close the other chdb store first)"
            ) from exc
        return connection

    def _get(self) -> Any:
        """The writing connection (call with ``_lock`` held)."""
        self._check_process()
        if self._session is None:
            self._session = self._open()
        return self._session

    @staticmethod
    def _params(params: Mapping[str, Any] | None) -> dict[str, str] | None:
        if not params:
            return None
        return {k: _bind(v) for k, v in params.items()}

    def _write(self, sql: str, params: Mapping[str, Any] | None) -> Any:
        with self._lock:
            return self._get().query(sql, "JSONCompact", params=self._params(params))

    def _read(self, sql: str, params: Mapping[str, Any] | None) -> bytes:
        self._check_process()
        if self.path is None:  # in memory: one connection; another would see a database of its own
            return bytes(self._write(sql, params).bytes())
        bound = self._params(params)
        if self._session is None:
            with self._lock:
                self._get()  # the writing connection first: it starts the server
        with self._free:
            with self._pool:
                connection = self._idle.pop() if self._idle else self._open()
            try:
                return bytes(connection.query(sql, "JSONCompact", params=bound).bytes())
            finally:
                with self._pool:
                    self._idle.append(connection)

    def command(self, sql: str, params: Mapping[str, Any] | None = None) -> None:
        self._write(sql, params)

    def query(self, sql: str, params: Mapping[str, Any] | None = None) -> list[Row]:
        raw = self._read(sql, params)
        if not raw:
            return []
        return [tuple(r) for r in json.loads(raw)["data"]]

    def _insert(
        self,
        table: str,
        columns: Columns,
        data: Sequence[list[Any]],
        where: str,
        params: Mapping[str, Any] | None,
        settings: str,
    ) -> int:
        """One INSERT … SELECT from an Arrow table of the columns (chdb's ``Python()`` table
        function reads it in place: several times faster than any text format)."""
        import pyarrow as pa

        arrays, exprs = {}, []
        for (name, kind), values in zip(columns, data, strict=True):
            arrays[name], expr = _arrow_column(kind, values)
            exprs.append(expr.format(name))
        usage_rows = pa.table(arrays)  # noqa: F841 - read by name by chdb
        names = ", ".join(name for name, _ in columns)
        statement = (
            f"INSERT INTO {table} ({names}) SELECT {', '.join(exprs)} FROM Python(usage_rows)"
            f"{where.replace('@ID@', exprs[0])}{settings}"
        )
        return int(self._write(statement, params).rows_written())

    def insert(self, table: str, columns: Columns, data: Sequence[list[Any]], token: str) -> None:
        settings = f" SETTINGS insert_deduplication_token = '{token}'" if token else ""
        self._insert(table, columns, data, "", None, settings)

    def insert_new(
        self,
        table: str,
        columns: Columns,
        data: Sequence[list[Any]],
        stored: str,
        params: Mapping[str, Any],
    ) -> int:
        """The check and the insert in one statement: writes run one at a time here, so no
        other write can come between them, and no token is needed."""
        where = f" WHERE @ID@ NOT IN (SELECT id FROM {table} WHERE {stored})"
        return self._insert(table, columns, data, where, params, "")

    def close(self) -> None:
        if os.getpid() != self._pid:
            return  # a forked child keeps the parent's connections untouched (see forked())
        for _ in range(self._readers):  # the reads under way end first: all are idle then
            self._free.acquire()
        try:
            with self._lock, self._pool:
                readers, self._idle = self._idle, []
                writer, self._session = self._session, None
                for connection in readers:  # the writing one last: it stops the server
                    connection.close()
                if writer is not None:
                    writer.close()
        finally:
            for _ in range(self._readers):
                self._free.release()

    def forked(self) -> None:
        # The parent's connections are unusable here and every call refuses by pid. They are
        # kept referenced on purpose: closing them, even by garbage collection, would hang the
        # child.
        self._lock = threading.Lock()
        self._pool = threading.Lock()
        self._free = threading.Semaphore(self._readers)
