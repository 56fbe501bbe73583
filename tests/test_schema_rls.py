"""sql/supabase_rls.sql on plain PostgreSQL with a stand-in for Supabase's auth schema.

Supabase provides ``auth.uid()`` (the signed-in user from the request's JWT) and the roles
``anon`` and ``authenticated``. Here ``auth.uid()`` reads a session setting, and the two roles
are created (NOLOGIN, once per server; roles are cluster-wide) when missing.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import datetime, timezone

import psycopg
import pytest
from sqlalchemy.engine import make_url

from usage_middleware import RequestRecord, UploadRecord, UsageStore
from usage_middleware._store import sql_text

pytestmark = pytest.mark.postgres

UTC = timezone.utc
ALICE, BOB = uuid.UUID(int=0xA, version=4), uuid.UUID(int=0xB, version=4)
ALICE_KEY, BOB_KEY = uuid.UUID(int=0xA1, version=4), uuid.UUID(int=0xB1, version=4)
TABLES = (
    "file_uploads",
    "api_requests",
    "daily_usage",
    "hourly_usage",
    "monthly_request_usage",
    "daily_request_usage",
    "hourly_request_usage",
    "quarter_usage",
    "quarter_request_usage",
)

SUPABASE_STAND_IN = """
DO $$ BEGIN CREATE ROLE anon NOLOGIN;
EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$;
DO $$ BEGIN CREATE ROLE authenticated NOLOGIN;
EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$;
CREATE SCHEMA auth;
CREATE FUNCTION auth.uid() RETURNS uuid LANGUAGE sql STABLE
    AS $$ SELECT nullif(current_setting('request.jwt.claim.sub', true), '')::uuid $$;
GRANT USAGE ON SCHEMA auth TO anon, authenticated;
GRANT USAGE ON SCHEMA public TO anon, authenticated;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO anon, authenticated;
CREATE TABLE public.api_keys (id uuid PRIMARY KEY, user_id uuid NOT NULL);
GRANT SELECT ON public.api_keys TO authenticated;
"""


@pytest.fixture
def supabase_like(pg_url: str) -> Iterator[psycopg.Connection]:
    """A database with the usage schema, Supabase's auth stand-in, usage rows and RLS applied."""
    dsn = make_url(pg_url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(SUPABASE_STAND_IN.split("CREATE SCHEMA auth;")[0])
        store = UsageStore(pg_url)
        store.create_schema()  # grants to authenticated now that the role exists
        at = datetime(2025, 9, 5, 12, tzinfo=UTC)
        store.write(
            [UploadRecord(api_key_id=ALICE_KEY, provider="s3", file_size=1, uploaded_at=at)] * 1
            + [
                UploadRecord(api_key_id=BOB_KEY, provider="s3", file_size=2, uploaded_at=at)
                for _ in range(2)
            ]
            + [UploadRecord(provider="s3", file_size=4, uploaded_at=at)]
            + [
                RequestRecord(api_key_id=ALICE_KEY, requested_at=at),
                RequestRecord(api_key_id=BOB_KEY, requested_at=at),
            ]
        )
        store.dispose()
        conn.execute("CREATE SCHEMA auth;" + SUPABASE_STAND_IN.split("CREATE SCHEMA auth;")[1])
        conn.execute(
            "INSERT INTO public.api_keys VALUES (%s, %s), (%s, %s)",
            (ALICE_KEY, ALICE, BOB_KEY, BOB),
        )
        conn.execute(sql_text("supabase_rls.sql"))
        conn.execute(sql_text("supabase_rls.sql"))  # safe to run twice
        yield conn


def _as(conn: psycopg.Connection, role: str, user: uuid.UUID | None, sql: str) -> list[tuple]:
    with conn.transaction():
        conn.execute(f"SET LOCAL ROLE {role}")
        if user is not None:
            conn.execute("SELECT set_config('request.jwt.claim.sub', %s, true)", (str(user),))
        rows = conn.execute(sql).fetchall()
    return rows


def test_signed_in_users_read_only_their_keys(supabase_like: psycopg.Connection) -> None:
    """Through RLS each user counts only rows of their own keys, in every usage table."""
    conn = supabase_like
    for table in TABLES:
        (total,) = conn.execute(f"SELECT count(*) FROM public.{table}").fetchone() or (0,)
        assert total > 0, table
        for user, key in ((ALICE, ALICE_KEY), (BOB, BOB_KEY)):
            keys = _as(conn, "authenticated", user, f"SELECT DISTINCT api_key_id FROM {table}")
            assert keys == [(key,)], table
    uploads = _as(conn, "authenticated", BOB, "SELECT sum(file_size) FROM public.file_uploads")
    assert uploads == [(4,)]


def test_functions_respect_rls_and_refuse_anon(supabase_like: psycopg.Connection) -> None:
    """The dashboard functions return only the caller's rows; anon may not execute them."""
    conn = supabase_like
    call = (
        "SELECT provider, upload_count "
        "FROM public.get_provider_breakdown('2025-09-01', '2025-09-30')"
    )
    assert _as(conn, "authenticated", ALICE, call) == [("s3", 1)]
    assert _as(conn, "authenticated", BOB, call) == [("s3", 2)]
    assert _as(conn, "authenticated", uuid.uuid4(), call) == []
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        _as(conn, "anon", None, call)


def test_anon_reads_nothing(supabase_like: psycopg.Connection) -> None:
    """The anon role has no privilege on the usage tables."""
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        _as(supabase_like, "anon", None, "SELECT count(*) FROM public.daily_usage")
