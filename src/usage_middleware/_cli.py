"""The ``usage-middleware`` command: schema, maintenance, legacy migration and demo data.

Every wrong argument (a bad URL, an unreachable database, an invalid name, an out-of-range
number or date, a legacy table that does not fit) ends the command the way argparse ends it for
a malformed option: one line ``usage-middleware <command>: error: ...`` on stderr and exit
status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
from collections.abc import Callable, Sequence
from datetime import date, datetime, timezone
from typing import NoReturn

from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from ._demo import (
    MAX_DEMO_KEYS,
    first_demo_day,
    has_uploads,
    top_up_demo_data,
    write_demo_data,
)
from ._errors import ConfigurationError, UsageError
from ._maintain import MAX_MONTHS_AHEAD, MAX_RETENTION_DAYS, maintain, retention_start
from ._migrate import LegacySource, migrate_legacy_usage
from ._store import UsageStore


class _Parser(argparse.ArgumentParser):
    """argparse's parser with its error on one line: scripts and logs see one line per failure."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


def _open(url: str) -> UsageStore:
    """A store for ``url``; an in-memory SQLite database is refused (it vanishes on exit)."""
    store = UsageStore(url)
    if store.backend.ephemeral:
        store.dispose()
        raise ConfigurationError(
            "an in-memory database would vanish when the command exits: "
            "give a file, e.g. sqlite:///usage.db"
        )
    return store


def _create_schema(args: argparse.Namespace) -> None:
    store = _open(args.url)
    try:
        store.create_schema()
    finally:
        store.dispose()
    print(f"schema ready in {store!r}")


def _migrate(args: argparse.Namespace) -> None:
    source = LegacySource(
        table=args.table,
        provider_column=args.provider_column,
        uploads_column=args.uploads_column,
        bytes_column=args.bytes_column,
        date_column=args.date_column,
        api_key_column=None if args.api_key_column.lower() == "none" else args.api_key_column,
    )
    store = _open(args.url)
    try:
        result = migrate_legacy_usage(store, source)
    finally:
        store.dispose()
    verb = "was already migrated at" if result.already_migrated else "migrated at"
    print(
        f"{result.source} {verb} {result.migrated_at.isoformat()}: {result.legacy_rows} legacy "
        f"rows, {result.total_uploads} uploads, {result.total_file_size} bytes "
        "(file_type 'unknown', dated by the legacy date column)"
    )


def _day(value: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a date YYYY-MM-DD, got {value!r:.40}") from None


def _int_in(low: int, high: int | None, why: str = "") -> Callable[[str], int]:
    """An argparse type: an int in ``low..high`` (no upper bound when ``high`` is None)."""

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {value!r:.40}") from None
        if number < low or (high is not None and number > high):
            bounds = f">= {low}" if high is None else f"in {low}..{high}"
            raise argparse.ArgumentTypeError(f"must be {bounds}{why}, got {number}")
        return number

    return parse


def _demo_data(args: argparse.Namespace) -> None:
    if args.top_up and (args.if_empty or args.end is not None):
        raise ConfigurationError("--top-up writes up to now: it takes neither --if-empty nor --end")
    today = datetime.now(timezone.utc).date()
    end: date = args.end or today
    if end > today:
        raise ConfigurationError(
            f"--end {end} is after today ({today}, UTC): demo data is history and nothing is "
            "dated in the future"
        )
    try:
        first_demo_day(args.days, end)
    except ValueError as exc:
        raise ConfigurationError(f"--days {args.days} with --end {end}: {exc}") from None
    store = _open(args.url)
    try:
        if not store.backend.embedded and not args.yes_this_is_not_production:
            raise ConfigurationError(
                "refusing to write synthetic usage into a database server: demo data would "
                "mix with real usage. Use a throwaway database and pass "
                "--yes-this-is-not-production."
            )
        summary = None
        if args.top_up:
            summary = top_up_demo_data(store, keys=args.keys, seed=args.seed)
        if summary is None and (args.if_empty or args.top_up) and has_uploads(store):
            what = "uploads but no demo data" if args.top_up else "uploads"
            print(f"{store!r} already has {what}; no demo data written")
            return
        if summary is None:
            summary = write_demo_data(
                store, days=args.days, keys=args.keys, seed=args.seed, end=end
            )
    finally:
        store.dispose()
    print(
        f"demo data {summary.start}..{summary.end}: {summary.uploads} uploads and "
        f"{summary.requests} requests for {summary.keys} demo keys, {summary.written} rows new"
    )


def _maintain(args: argparse.Namespace) -> None:
    """Partitions ahead and raw retention, one line on stdout (cron logs want one)."""
    store = _open(args.url)
    try:
        result = maintain(
            store, raw_retention_days=args.raw_retention_days, months_ahead=args.months_ahead
        )
        start = retention_start(store)
    finally:
        store.dispose()
    complete = start.isoformat() if start else "all time"
    print(
        f"{store!r}: {result.partitions_created} partitions created, "
        f"{result.partitions_dropped} dropped, {result.rows_deleted} raw rows deleted, "
        f"{result.skipped} left for the next run (lock busy); raw rows complete from {complete}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; 0 on success, ``SystemExit(2)`` with a one-line message on bad input."""
    parser = _Parser(prog="usage-middleware", description="Manage the usage-middleware tables.")
    sub = parser.add_subparsers(dest="command", required=True)
    commands: dict[str, tuple[argparse.ArgumentParser, Callable[[argparse.Namespace], None]]] = {}

    p = sub.add_parser("create-schema", help="create the tables (idempotent)")
    p.add_argument("url", help="database URL, e.g. sqlite:///usage.db")
    commands["create-schema"] = (p, _create_schema)

    p = sub.add_parser(
        "migrate",
        help="move old per-provider running totals into daily_usage (once; idempotent)",
        description="Run sql/migrate_existing_usage_data.sql (PostgreSQL) or its equivalent "
        "(SQLite): each legacy total lands in daily_usage and hourly_usage with file_type "
        "'unknown' on the UTC date of --date-column. A second run does nothing.",
    )
    p.add_argument("url", help="database URL holding both the legacy table and the usage tables")
    p.add_argument("--table", default="provider_usage", help="legacy table name")
    p.add_argument("--provider-column", default="provider")
    p.add_argument("--uploads-column", default="total_uploads")
    p.add_argument("--bytes-column", default="total_size")
    p.add_argument("--date-column", default="updated_at")
    p.add_argument(
        "--api-key-column", default="api_key_id", help="'none' when the table has no key column"
    )
    commands["migrate"] = (p, _migrate)

    p = sub.add_parser(
        "demo-data",
        help="write a year of clearly synthetic usage (demo key ids, demo-* file names)",
        description="Write synthetic uploads and requests for demo API keys "
        "00000000-de30-4000-8000-0000000000NN. Deterministic for a given --seed and --end; "
        "re-running writes nothing new. Refuses PostgreSQL unless explicitly confirmed.",
    )
    p.add_argument("url", help="database URL, e.g. sqlite:///demo.db")
    p.add_argument(
        "--days", type=_int_in(1, None), default=365, help="days of history (default 365)"
    )
    p.add_argument(
        "--keys",
        type=_int_in(1, MAX_DEMO_KEYS),
        default=3,
        help=f"number of demo API keys, 1..{MAX_DEMO_KEYS} (default 3)",
    )
    p.add_argument(
        "--seed",
        type=_int_in(0, None, " (a negative seed repeats the positive one)"),
        default=0,
        help="random seed, >= 0 (default 0)",
    )
    p.add_argument("--end", type=_day, help="last day, YYYY-MM-DD (default: today, UTC)")
    p.add_argument(
        "--if-empty", action="store_true", help="do nothing when the database has uploads"
    )
    p.add_argument(
        "--top-up",
        action="store_true",
        help="when the database holds demo data, add what is dated after its last demo record "
        "up to now (days of its own, deterministic for --seed); when it has no uploads, write "
        "the --days history; when it has only other uploads, nothing",
    )
    p.add_argument(
        "--yes-this-is-not-production",
        action="store_true",
        help="allow a PostgreSQL URL (the data is synthetic)",
    )
    commands["demo-data"] = (p, _demo_data)

    p = sub.add_parser(
        "maintain",
        help="create raw-table partitions ahead and prune old raw rows (cron-safe, idempotent)",
        description="PostgreSQL: create the monthly partitions of file_uploads and api_requests "
        "for the next --months-ahead months (and for rows the default partition caught), and "
        "with --raw-retention-days drop the months wholly older than that. SQLite: delete raw "
        "rows older than --raw-retention-days in batches. Rollups are never pruned.",
    )
    p.add_argument("url", help="database URL, e.g. sqlite:///usage.db")
    p.add_argument(
        "--raw-retention-days",
        metavar="N",
        type=_int_in(1, MAX_RETENTION_DAYS),
        help="prune raw rows older than N days",
    )
    p.add_argument(
        "--months-ahead",
        metavar="K",
        type=_int_in(0, MAX_MONTHS_AHEAD),
        default=3,
        help="partitions ahead (default 3)",
    )
    commands["maintain"] = (p, _maintain)


    args, extra = parser.parse_known_args(argv)
    command_parser, command = commands[args.command]
    if extra:  # reported by the command's parser, so the line names the command
        command_parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        command(args)
    except UsageError as exc:
        command_parser.error(str(exc))
    except _database_errors() as exc:
        # The database refused the work (not a database file, no permission, ...).
        reason = exc.orig if isinstance(exc, DBAPIError) else exc
        lines = str(reason).strip().splitlines() or [type(reason).__name__]
        command_parser.error(f"database error: {lines[0]}")
    return 0


def _database_errors() -> tuple[type[Exception], ...]:
    """SQLAlchemy's errors and the drivers' own (SQL files run on the raw psycopg cursor)."""
    try:
        import psycopg
    except ImportError:  # a SQLite-only install
        return (SQLAlchemyError, sqlite3.Error)
    return (SQLAlchemyError, sqlite3.Error, psycopg.Error)


if __name__ == "__main__":
    sys.exit(main())
