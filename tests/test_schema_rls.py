"""sql/supabase_rls.sql on plain PostgreSQL with a stand-in for Supabase's auth schema.

Supabase provides ``auth.uid()`` (the signed-in user from the request's JWT) and the roles
``anon`` and ``authenticated``, which get every privilege on new tables in ``public``. Here
``auth.uid()`` reads a session setting, the default privileges are set the same way (they live
in the throwaway database), and the two roles are created (NOLOGIN, once per server; roles are
cluster-wide, so they are left in place) when missing.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

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
    "quarter_mismatch_usage",
    "monthly_endpoint_usage",
    "daily_endpoint_usage",
    "quarter_endpoint_usage",
    "endpoint_routes",
)

# What Supabase has before any usage table exists: the API roles, auth.uid(), and default
# privileges that give anon and authenticated every privilege on each new table in public.
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
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON TABLES TO anon, authenticated;
CREATE TABLE public.api_keys (id uuid PRIMARY KEY, user_id uuid NOT NULL);
GRANT SELECT ON public.api_keys TO authenticated;
"""
RLS_BEFORE_MONTHLY = Path(__file__).parent / "support" / "supabase_rls_before_monthly.sql"


def _admin(pg_url: str) -> psycopg.Connection:
    dsn = make_url(pg_url).set(drivername="postgresql").render_as_string(hide_password=False)
    return psycopg.connect(dsn, autocommit=True)


def _install(conn: psycopg.Connection, pg_url: str) -> None:
    """Supabase's stand-in, then the usage schema (UsageStore.create_schema) and usage rows."""
    conn.execute(SUPABASE_STAND_IN)
    conn.execute(
        "INSERT INTO public.api_keys VALUES (%s, %s), (%s, %s)",
        (ALICE_KEY, ALICE, BOB_KEY, BOB),
    )
    store = UsageStore(pg_url)
    try:
        store.create_schema()
        at = datetime(2025, 9, 5, 12, tzinfo=UTC)
        store.write(
            # declared types that differ from the detected one fill quarter_mismatch_usage too
            [
                UploadRecord(
                    api_key_id=ALICE_KEY, provider="s3", file_size=1, uploaded_at=at,
                    declared_type="image/gif",
                )
            ]
            + [
                UploadRecord(
                    api_key_id=BOB_KEY, provider="s3", file_size=2, uploaded_at=at,
                    declared_type="image/gif",
                )
                for _ in range(2)
            ]
            + [
                UploadRecord(
                    provider="s3", file_size=4, uploaded_at=at, declared_type="image/gif"
                )
            ]
            + [
                RequestRecord(api_key_id=ALICE_KEY, requested_at=at),
                RequestRecord(api_key_id=BOB_KEY, requested_at=at),
            ]
        )
        # those requests sealed into the rollups (their day is over: into every tier); two
        # more only raw, as live ones are
        later = at + timedelta(days=1)
        store.seal(later)
        store.write(
            [
                RequestRecord(api_key_id=ALICE_KEY, requested_at=later + timedelta(hours=2)),
                RequestRecord(api_key_id=BOB_KEY, requested_at=later + timedelta(hours=2)),
            ]
        )
    finally:
        store.dispose()


@pytest.fixture
def schema_only(pg_url: str) -> Iterator[psycopg.Connection]:
    """The usage schema with rows on a Supabase stand-in, supabase_rls.sql not run."""
    with _admin(pg_url) as conn:
        _install(conn, pg_url)
        yield conn


@pytest.fixture
def supabase_like(schema_only: psycopg.Connection) -> psycopg.Connection:
    """The same with supabase_rls.sql applied (twice: it is safe to re-run)."""
    schema_only.execute(sql_text("supabase_rls.sql"))
    schema_only.execute(sql_text("supabase_rls.sql"))
    return schema_only


def _as(conn: psycopg.Connection, role: str, user: uuid.UUID | None, sql: str) -> list[tuple]:
    with conn.transaction():
        conn.execute(f"SET LOCAL ROLE {role}")
        if user is not None:
            conn.execute("SELECT set_config('request.jwt.claim.sub', %s, true)", (str(user),))
        rows = conn.execute(sql).fetchall()
    return rows


def _visible(conn: psycopg.Connection, role: str, user: uuid.UUID | None, table: str) -> int:
    """Rows ``role`` reads from ``table``; -1 when it may not read it at all."""
    try:
        return int(_as(conn, role, user, f"SELECT count(*) FROM public.{table}")[0][0])
    except psycopg.errors.InsufficientPrivilege:
        return -1


def _assert_api_roles_cannot_write(conn: psycopg.Connection, table: str) -> None:
    for role in ("anon", "authenticated"):
        for sql in (
            f"INSERT INTO public.{table} SELECT * FROM public.{table} LIMIT 0",
            f"UPDATE public.{table} SET api_key_id = api_key_id",
            f"DELETE FROM public.{table}",
            f"TRUNCATE public.{table}",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                _as(conn, role, ALICE, sql)


def _rls(conn: psycopg.Connection) -> dict[str, tuple[bool, bool]]:
    rows = conn.execute(
        "SELECT relname, relrowsecurity, relforcerowsecurity FROM pg_class "
        "WHERE relnamespace = 'public'::regnamespace AND relname = ANY(%s)",
        (list(TABLES),),
    ).fetchall()
    return {name: (on, forced) for name, on, forced in rows}


def test_schema_alone_exposes_no_table_to_the_api_roles(
    schema_only: psycopg.Connection,
) -> None:
    """Before supabase_rls.sql: RLS is on (not forced) everywhere, anon may not touch the
    tables, a signed-in user reads no row, and neither may write; the owner still reads all."""
    conn = schema_only
    assert _rls(conn) == dict.fromkeys(TABLES, (True, False))
    for table in TABLES:
        (total,) = conn.execute(f"SELECT count(*) FROM public.{table}").fetchone() or (0,)
        assert total > 0, table
        assert _visible(conn, "anon", None, table) == -1, table
        assert _visible(conn, "authenticated", ALICE, table) == 0, table
        _assert_api_roles_cannot_write(conn, table)


def test_upgrade_from_before_the_monthly_rollup_exposes_nothing(pg_url: str) -> None:
    """An install of the release before monthly_request_usage, with that release's RLS file
    run, upgraded by the current schema file: the new table is not readable across tenants
    either, and once supabase_rls.sql is re-run each user reads their own rows in it."""
    with _admin(pg_url) as conn:
        _install(conn, pg_url)
        conn.execute("DROP TABLE public.monthly_request_usage")
        for table in TABLES:
            if table != "monthly_request_usage":
                conn.execute(f"ALTER TABLE public.{table} DISABLE ROW LEVEL SECURITY")
                conn.execute(f"GRANT ALL ON public.{table} TO anon, authenticated")
        conn.execute(RLS_BEFORE_MONTHLY.read_text("utf-8"))
        store = UsageStore(pg_url)
        try:
            store.create_schema()
        finally:
            store.dispose()
        for table in TABLES:
            assert _visible(conn, "anon", None, table) == -1, table
            others = _as(
                conn,
                "authenticated",
                ALICE,
                f"SELECT count(*) FROM public.{table} "
                f"WHERE api_key_id IS DISTINCT FROM '{ALICE_KEY}'",
            )
            assert others == [(0,)], table
            _assert_api_roles_cannot_write(conn, table)
        assert _rls(conn) == dict.fromkeys(TABLES, (True, False))
        conn.execute(sql_text("supabase_rls.sql"))
        keys = _as(
            conn, "authenticated", ALICE, "SELECT DISTINCT api_key_id FROM monthly_request_usage"
        )
        assert keys == [(ALICE_KEY,)]


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


def test_the_seal_instants_are_read_only_to_signed_in_users_and_closed_to_anon(
    supabase_like: psycopg.Connection,
) -> None:
    """rollup_seals holds nothing about any key: signed-in users read its three instants (so
    that get_request_breakdown adds what no roll or seal holds), change none; anon may not
    touch it."""
    conn = supabase_like
    assert _visible(conn, "anon", None, "rollup_seals") == -1
    assert _visible(conn, "authenticated", ALICE, "rollup_seals") == 3
    for sql in (
        "UPDATE public.rollup_seals SET sealed_before = sealed_before",
        "DELETE FROM public.rollup_seals",
        "TRUNCATE public.rollup_seals",
    ):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            _as(conn, "authenticated", ALICE, sql)
