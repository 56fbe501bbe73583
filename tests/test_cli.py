"""The ``usage-middleware`` command refuses every bad argument the argparse way.

One line ``usage-middleware <command>: error: ...`` on stderr and exit status 2, whatever is
wrong: the URL, the database behind it, a name, a number, a date, or the legacy table. Never a
traceback, and nothing written before the arguments are known to be good.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import inspect, text
from sqlalchemy.engine import make_url

from usage_middleware import UsageStore
from usage_middleware._cli import main

COMMANDS = ("create-schema", "migrate", "demo-data")
UNREACHABLE_PG = "postgresql://postgres@127.0.0.1:1/usage"  # nothing listens on port 1
TOMORROW = (datetime.now(timezone.utc) + timedelta(days=1)).date().isoformat()


def refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the command, check it exits 2 with one ``<prog>: error:`` line; return that line."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    prog = "usage-middleware" + (f" {argv[0]}" if argv and argv[0] in COMMANDS else "")
    assert captured.err.endswith("\n") and captured.err.count("\n") == 1, captured.err
    assert captured.err.startswith(f"{prog}: error: "), captured.err
    assert "Traceback" not in captured.err
    assert captured.out == ""
    return captured.err


def sqlite(tmp_path: Path, name: str = "usage.db") -> str:
    return f"sqlite:///{tmp_path / name}"


# (arguments built from the test's tmp_path, a fragment the message must contain)
BAD_ARGUMENTS: list[tuple[Callable[[Path], list[str]], str]] = [
    # create-schema: the URL and what is behind it
    (lambda t: ["create-schema"], "required: url"),
    (lambda t: ["create-schema", "not a url"], "cannot parse database URL"),
    (lambda t: ["create-schema", "mysql://u@localhost/db"], "unsupported database URL scheme"),
    (lambda t: ["create-schema", "postgresql+asyncpg://u@h/db"], "unsupported PostgreSQL driver"),
    (lambda t: ["create-schema", "sqlite://"], "in-memory"),
    (lambda t: ["create-schema", "sqlite:///:memory:"], "in-memory"),
    (lambda t: ["create-schema", UNREACHABLE_PG], "cannot reach"),
    (lambda t: ["create-schema", sqlite(t / "no" / "such" / "dir")], "cannot reach"),
    (lambda t: ["create-schema", f"sqlite:///{t}"], "cannot reach"),  # a directory
    (lambda t: ["create-schema", sqlite(t, "junk.txt")], "file is not a database"),
    # migrate: names, the database, the legacy table and what its columns hold
    (lambda t: ["migrate", sqlite(t), "--table", "a.b.c"], "legacy table"),
    (lambda t: ["migrate", sqlite(t), "--table", "x; DROP TABLE daily_usage"], "legacy table"),
    (lambda t: ["migrate", sqlite(t), "--table", ""], "legacy table"),
    (lambda t: ["migrate", sqlite(t), "--provider-column", "bad col"], "provider_column"),
    (lambda t: ["migrate", sqlite(t), "--uploads-column", "1st"], "uploads_column"),
    (lambda t: ["migrate", sqlite(t), "--bytes-column", 'x"y'], "bytes_column"),
    (lambda t: ["migrate", sqlite(t), "--date-column", ""], "date_column"),
    (lambda t: ["migrate", sqlite(t), "--api-key-column", "a-b"], "api_key_column"),
    (lambda t: ["migrate", "nonsense"], "cannot parse database URL"),
    (lambda t: ["migrate", UNREACHABLE_PG], "cannot reach"),
    (lambda t: ["migrate", sqlite(t, "junk.txt")], "file is not a database"),
    (lambda t: ["migrate", sqlite(t)], "no such table: provider_usage"),
    (lambda t: ["migrate", sqlite(t, "legacy.db"), "--table", "nope"], "no such table: nope"),
    (
        lambda t: ["migrate", sqlite(t, "legacy.db"), "--uploads-column", "uploads"],
        "no such column",
    ),
    (lambda t: ["migrate", sqlite(t, "legacy.db"), "--uploads-column", "provider"], "'provider'"),
    (lambda t: ["migrate", sqlite(t, "legacy.db"), "--bytes-column", "provider"], "'provider'"),
    (lambda t: ["migrate", sqlite(t, "legacy.db"), "--date-column", "provider"], "'provider'"),
    (lambda t: ["migrate", sqlite(t, "legacy.db"), "--date-column", "total_size"], "'total_size'"),
    (lambda t: ["migrate", sqlite(t, "legacy.db"), "--api-key-column", "provider"], "'provider'"),
    # demo-data: numbers, dates, the URL, and PostgreSQL without confirmation
    (lambda t: ["demo-data", sqlite(t), "--end", "0001-01-01"], "before 1970-01-01"),
    (lambda t: ["demo-data", sqlite(t), "--end", "1969-12-31", "--days", "1"], "before 1970"),
    (lambda t: ["demo-data", sqlite(t), "--end", "2020-01-01", "--days", "20000"], "at most 18263"),
    (lambda t: ["demo-data", sqlite(t), "--days", "99999999"], "before 1970-01-01"),
    (lambda t: ["demo-data", sqlite(t), "--end", "9999-12-31"], "after today"),
    (lambda t: ["demo-data", sqlite(t), "--end", TOMORROW], "after today"),
    (lambda t: ["demo-data", sqlite(t), "--end", "30/06/2025"], "argument --end"),
    (lambda t: ["demo-data", sqlite(t), "--end", "2025-02-30"], "argument --end"),
    (lambda t: ["demo-data", sqlite(t), "--end", ""], "argument --end"),
    (lambda t: ["demo-data", sqlite(t), "--days", "0"], "argument --days: must be >= 1"),
    (lambda t: ["demo-data", sqlite(t), "--days", "-3"], "argument --days"),
    (lambda t: ["demo-data", sqlite(t), "--days", "1.5"], "argument --days"),
    (lambda t: ["demo-data", sqlite(t), "--keys", "0"], "argument --keys: must be in 1..99"),
    (lambda t: ["demo-data", sqlite(t), "--keys", "100"], "argument --keys"),
    (lambda t: ["demo-data", sqlite(t), "--seed", "-1"], "argument --seed: must be >= 0"),
    (lambda t: ["demo-data", sqlite(t), "--seed", "x"], "argument --seed"),
    (lambda t: ["demo-data", sqlite(t), "--bogus"], "unrecognized arguments"),
    (lambda t: ["demo-data", "sqlite://"], "in-memory"),
    (lambda t: ["demo-data", sqlite(t, "junk.txt"), "--days", "1"], "file is not a database"),
    (lambda t: ["demo-data", UNREACHABLE_PG], "--yes-this-is-not-production"),
    (lambda t: ["demo-data", UNREACHABLE_PG, "--yes-this-is-not-production"], "cannot reach"),
]


@pytest.fixture
def fixtures_dir(tmp_path: Path) -> Path:
    """A junk file that is no database, and a SQLite legacy table of text and numbers."""
    (tmp_path / "junk.txt").write_text("not a database, just text\n" * 100)
    store = UsageStore(sqlite(tmp_path, "legacy.db"))
    with store.engine.begin() as conn:
        conn.execute(
            text(
                "CREATE TABLE provider_usage (provider TEXT, api_key_id TEXT, "
                "total_uploads INTEGER, total_size INTEGER, updated_at TEXT)"
            )
        )
        conn.execute(
            text(
                "INSERT INTO provider_usage VALUES "
                "('vercel', NULL, 3, 300, '2025-01-02T03:04:05+00:00')"
            )
        )
    store.dispose()
    return tmp_path


@pytest.mark.parametrize(
    ("make_argv", "fragment"),
    BAD_ARGUMENTS,
    ids=[f"{i:02d}-{make(Path('/t'))[0]}" for i, (make, _) in enumerate(BAD_ARGUMENTS)],
)
def test_a_bad_argument_is_one_error_line_and_exit_status_2(
    make_argv: Callable[[Path], list[str]],
    fragment: str,
    fixtures_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Each kind of wrong input ends in ``<prog>: error: <what and why>`` and status 2."""
    before = sorted(p.name for p in fixtures_dir.iterdir())
    argv = make_argv(fixtures_dir)
    line = refused(argv, capsys)
    assert fragment in line
    if argv[0] != "migrate":  # (a migration creates the usage tables before it reads)
        assert sorted(p.name for p in fixtures_dir.iterdir()) == before, "a file was created"


def test_no_command_or_an_unknown_one(capsys: pytest.CaptureFixture[str]) -> None:
    """The top-level parser follows the same one-line rule."""
    for argv, fragment in (([], "required: command"), (["bogus"], "invalid choice: 'bogus'")):
        line = refused(argv, capsys)
        assert line.startswith("usage-middleware: error: ") and fragment in line


def test_a_refused_migration_writes_nothing(fixtures_dir: Path) -> None:
    """A legacy column holding text where a number belongs stops the migration before a write."""
    url = sqlite(fixtures_dir, "legacy.db")
    with pytest.raises(SystemExit):
        main(["migrate", url, "--uploads-column", "provider"])
    store = UsageStore(url)
    try:
        with store.engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM daily_usage")).scalar_one() == 0
            marker = inspect(conn).has_table("usage_legacy_migrations")
            assert (
                not marker
                or not conn.execute(
                    text("SELECT count(*) FROM usage_legacy_migrations")
                ).scalar_one()
            )
    finally:
        store.dispose()


@pytest.mark.parametrize(
    "argv",
    [
        ["demo-data", "{db}", "--end", "0001-01-01"],
        ["demo-data", "{db}", "--days", "100000000"],
        ["migrate", "{db}", "--provider-column", "bad col"],
        ["create-schema", "not a url"],
    ],
    ids=["demo-end-year-1", "demo-days-overflow", "migrate-bad-column", "bad-url"],
)
def test_the_installed_command_prints_no_traceback(argv: list[str], tmp_path: Path) -> None:
    """As a real process: one stderr line, exit status 2 (formerly tracebacks, status 1)."""
    argv = [a.format(db=sqlite(tmp_path)) for a in argv]
    done = subprocess.run(
        [sys.executable, "-m", "usage_middleware._cli", *argv],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"usage-middleware {argv[0]}: error: ")
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert done.stdout == ""


@pytest.mark.postgres
def test_postgresql_legacy_columns_of_the_wrong_type(
    pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """On PostgreSQL too, a column that cannot be read as asked is a one-line error."""
    store = UsageStore(pg_url)
    with store.engine.begin() as conn:
        conn.execute(
            text(
                "CREATE TABLE provider_usage (provider text, api_key_id uuid, "
                "total_uploads bigint, total_size bigint, updated_at timestamptz)"
            )
        )
        conn.execute(
            text("INSERT INTO provider_usage VALUES ('s3', NULL, 3, 300, '2025-01-02 03:04Z')")
        )
    store.dispose()
    for option, column, fragment in (
        ("--uploads-column", "provider", "cannot read the legacy totals"),
        ("--date-column", "provider", "cannot read the legacy totals"),
        ("--api-key-column", "provider", "cannot read the legacy totals"),
        ("--bytes-column", "size", "does not exist"),
    ):
        line = refused(["migrate", pg_url, option, column], capsys)
        assert fragment in line
    name = pg_url.rsplit("/", 1)[1]
    line = refused(["create-schema", pg_url.replace(name, f"{name}_absent")], capsys)
    assert "does not exist" in line


@pytest.mark.postgres
def test_a_role_without_privileges_is_one_line(
    pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The driver's own errors (the SQL files run on psycopg's cursor) are one line as well."""
    role = f"usage_test_nopriv_{uuid.uuid4().hex[:12]}"
    admin = UsageStore(pg_url)
    with admin.engine.begin() as conn:
        conn.execute(text(f"CREATE ROLE {role} LOGIN"))
    try:
        url = make_url(pg_url).set(username=role).render_as_string(hide_password=False)
        for command in (
            ["create-schema", url],
            ["demo-data", url, "--days", "1", "--yes-this-is-not-production"],
            ["migrate", url],
        ):
            assert "permission denied" in refused(command, capsys)
    finally:
        with admin.engine.begin() as conn:
            conn.execute(text(f"DROP ROLE {role}"))
        admin.dispose()
