"""Shared fixtures: throwaway SQLite files and throwaway PostgreSQL databases.

PostgreSQL tests connect to ``USAGE_TEST_PG_URL`` (default: the local server, user ``postgres``)
and create a fresh database per test, dropped afterwards. Without a server they are skipped —
except under ``CI=true``, where an unreachable server fails the run.

Nothing lands in the user's home: for the whole session (subprocesses inherit the environment)
``USAGE_MIDDLEWARE_SPOOL_DIR``, ``XDG_STATE_HOME``, ``XDG_RUNTIME_DIR`` and ``XDG_CONFIG_HOME``
point into a temporary directory, removed at the end: every recorder without an explicit
``spool_path`` spools there, gunicorn puts its control socket there instead of ``~/.gunicorn``
and Chromium its crash-report settings instead of ``~/.config/chromium``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url
from support.pg import drop_pg_database, make_pg_database
from support.tcpproxy import TcpProxy

from usage_middleware import Recorder, UsageStore


@pytest.fixture(scope="session", autouse=True)
def state_dir() -> Iterator[Path]:
    """The session's stand-in for ``~/.local/state``: default spools go under it."""
    with (
        tempfile.TemporaryDirectory(prefix="usage-middleware-tests-") as tmp,
        pytest.MonkeyPatch.context() as mp,
    ):
        state = Path(tmp)
        runtime = state / "run"
        runtime.mkdir(mode=0o700)
        mp.setenv("XDG_STATE_HOME", str(state))
        mp.setenv("XDG_RUNTIME_DIR", str(runtime))
        mp.setenv("XDG_CONFIG_HOME", str(state / "config"))
        mp.setenv("USAGE_MIDDLEWARE_SPOOL_DIR", str(state / "usage-middleware"))
        yield state


@pytest.fixture
def pg_url() -> Iterator[str]:
    """URL of a fresh, empty PostgreSQL database that is dropped after the test."""
    url = make_pg_database()
    try:
        yield url
    finally:
        drop_pg_database(url)


@pytest.fixture
def sqlite_url(tmp_path: os.PathLike[str]) -> str:
    """URL of a fresh SQLite file in the test's temporary directory."""
    return f"sqlite:///{os.path.join(tmp_path, 'usage.db')}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: os.PathLike[str]) -> Iterator[str]:
    """A fresh database URL, once for SQLite and once for PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{os.path.join(tmp_path, 'usage.db')}"
    else:
        url = make_pg_database()
        try:
            yield url
        finally:
            drop_pg_database(url)


@pytest.fixture
def store(db_url: str) -> Iterator[UsageStore]:
    """A UsageStore with its schema created, on SQLite and on PostgreSQL."""
    s = UsageStore(db_url)
    s.create_schema()
    try:
        yield s
    finally:
        s.dispose()


@pytest.fixture
def recorders() -> Iterator[list[Recorder]]:
    """Recorders made by a test, shut down after it."""
    made: list[Recorder] = []
    yield made
    for recorder in made:
        recorder.shutdown(timeout=5)
    for recorder in made:
        recorder.store.dispose()


@pytest.fixture
def proxied(pg_url: str) -> Iterator[tuple[TcpProxy, str, UsageStore]]:
    """A TCP proxy in front of the test database: (proxy, URL through it, direct store)."""
    url = make_url(pg_url)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    direct = UsageStore(pg_url)
    direct.create_schema()
    try:
        yield proxy, url.set(port=proxy.port).render_as_string(hide_password=False), direct
    finally:
        direct.dispose()
        proxy.close()
