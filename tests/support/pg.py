"""Throwaway PostgreSQL databases for tests.

Tests connect to ``USAGE_TEST_PG_URL`` (default: the local server, user ``postgres``) and create
a fresh database per use. Without a server they are skipped — except under ``CI=true``, where an
unreachable server fails the run.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from usage_middleware import UsageStore

PG_ADMIN_URL = os.environ.get(
    "USAGE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

_pg_checked: list[str | None] = []


def _pg_problem() -> str | None:
    """None when the PostgreSQL server answers, else why not (checked once per session)."""
    if not _pg_checked:
        try:
            engine = create_engine(PG_ADMIN_URL, connect_args={"connect_timeout": 3})
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            engine.dispose()
            _pg_checked.append(None)
        except Exception as exc:
            _pg_checked.append(f"PostgreSQL at {PG_ADMIN_URL} unreachable: {exc}")
    return _pg_checked[0]


def require_postgres() -> None:
    problem = _pg_problem()
    if problem:
        if IN_CI:
            pytest.fail(f"{problem} (CI=true: PostgreSQL tests are required)")
        pytest.skip(problem)


def create_database(admin_url: str, prefix: str) -> str:
    """Create an empty database named ``prefix`` + a random suffix on the server of
    ``admin_url``; return its URL (benchmarks call this too)."""
    name = f"{prefix}{uuid.uuid4().hex[:12]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)


def drop_database(admin_url: str, url: str) -> None:
    """Drop the database of ``url``, closing its sessions."""
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)'))
    admin.dispose()


def make_pg_database() -> str:
    """Create an empty database and return its URL; drop it with :func:`drop_pg_database`."""
    require_postgres()
    return create_database(PG_ADMIN_URL, "um_test_")


def drop_pg_database(url: str) -> None:
    drop_database(PG_ADMIN_URL, url)


@contextmanager
def with_postgres(stores: dict[str, UsageStore]) -> Iterator[dict[str, UsageStore]]:
    """``stores`` plus, when a server answers, one store on a fresh PostgreSQL database under
    ``"postgres"``; every schema created; all disposed (and the database dropped) afterwards.
    For module-scoped fixtures shared by many examples."""
    pg = None
    try:
        try:
            pg = make_pg_database()
        except pytest.skip.Exception:
            pg = None
        if pg is not None:
            stores["postgres"] = UsageStore(pg)
        for store in stores.values():
            store.create_schema()
        yield stores
    finally:
        for store in stores.values():
            store.dispose()
        if pg is not None:
            drop_pg_database(pg)
