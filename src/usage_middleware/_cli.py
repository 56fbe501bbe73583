"""The ``usage-middleware`` command: schema, legacy migration, demo data and maintenance."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _create_schema(args: argparse.Namespace) -> int:
    from ._store import UsageStore

    store = UsageStore(args.url)
    store.create_schema()
    print(f"schema ready in {store!r}")
    return 0


def _migrate(args: argparse.Namespace) -> int:
    from ._errors import UsageError
    from ._migrate import LegacySource, migrate_legacy_usage
    from ._store import UsageStore

    source = LegacySource(
        table=args.table,
        provider_column=args.provider_column,
        uploads_column=args.uploads_column,
        bytes_column=args.bytes_column,
        date_column=args.date_column,
        api_key_column=None if args.api_key_column.lower() == "none" else args.api_key_column,
    )
    store = UsageStore(args.url)
    try:
        result = migrate_legacy_usage(store, source)
    except UsageError as exc:
        print(f"usage-middleware migrate: {exc}", file=sys.stderr)
        return 2
    finally:
        store.dispose()
    verb = "was already migrated at" if result.already_migrated else "migrated at"
    print(
        f"{result.source} {verb} {result.migrated_at.isoformat()}: {result.legacy_rows} legacy "
        f"rows, {result.total_uploads} uploads, {result.total_file_size} bytes "
        "(file_type 'unknown', dated by the legacy date column)"
    )
    return 0


def _demo_data(args: argparse.Namespace) -> int:
    from datetime import date

    from ._demo import MAX_DEMO_KEYS, has_uploads, write_demo_data
    from ._store import UsageStore

    try:
        end = date.fromisoformat(args.end) if args.end else None
    except ValueError:
        print(f"demo-data: --end must be a date YYYY-MM-DD, got {args.end!r}", file=sys.stderr)
        return 2
    if args.days < 1 or not 1 <= args.keys <= MAX_DEMO_KEYS:
        print(f"demo-data: --days must be >= 1 and --keys in 1..{MAX_DEMO_KEYS}", file=sys.stderr)
        return 2
    store = UsageStore(args.url)
    if store.dialect != "sqlite" and not args.yes_this_is_not_production:
        print(
            "refusing to write synthetic usage into a PostgreSQL database: demo data would mix "
            "with real usage. Use a throwaway database and pass --yes-this-is-not-production.",
            file=sys.stderr,
        )
        return 2
    if args.if_empty and has_uploads(store):
        print(f"{store!r} already has uploads; no demo data written")
        return 0
    summary = write_demo_data(store, days=args.days, keys=args.keys, seed=args.seed, end=end)
    print(
        f"demo data {summary.start}..{summary.end}: {summary.uploads} uploads and "
        f"{summary.requests} requests for {summary.keys} demo keys, {summary.written} rows new"
    )
    store.dispose()
    return 0


def _int_option(value: str | None, name: str, low: int, high: int) -> int | None:
    """``value`` as an int in ``low..high`` (None stays None); ValueError naming the option."""
    if value is None:
        return None
    try:
        number = int(value)
    except ValueError:
        number = low - 1
    if not low <= number <= high:
        raise ValueError(f"{name} must be an integer in {low}..{high}, got {value!r}")
    return number


def _maintain(args: argparse.Namespace) -> int:
    """Partitions ahead and raw retention; one line on stdout, or one on stderr and 1/2."""
    from ._errors import ConfigurationError, UsageError
    from ._maintain import MAX_MONTHS_AHEAD, MAX_RETENTION_DAYS, maintain, retention_start
    from ._store import UsageStore

    try:
        days = _int_option(args.raw_retention_days, "--raw-retention-days", 1, MAX_RETENTION_DAYS)
        ahead = _int_option(args.months_ahead, "--months-ahead", 0, MAX_MONTHS_AHEAD)
        store = UsageStore(args.url)
    except ValueError as exc:  # ConfigurationError is a ValueError too
        print(f"usage-middleware maintain: {exc}", file=sys.stderr)
        return 2
    try:
        result = maintain(
            store, raw_retention_days=days, months_ahead=3 if ahead is None else ahead
        )
        start = retention_start(store)
    except UsageError as exc:
        line = " ".join(str(exc).split())  # driver messages span lines; cron logs want one
        print(f"usage-middleware maintain: {line}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigurationError) else 1
    finally:
        store.dispose()
    complete = start.isoformat() if start else "all time"
    print(
        f"{store!r}: {result.partitions_created} partitions created, "
        f"{result.partitions_dropped} dropped, {result.rows_deleted} raw rows deleted, "
        f"{result.skipped} left for the next run (lock busy); raw rows complete from {complete}"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="usage-middleware", description="Manage the usage-middleware tables."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("create-schema", help="create the tables (idempotent)")
    p.add_argument("url", help="database URL, e.g. sqlite:///usage.db")
    p.set_defaults(func=_create_schema)

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
    p.set_defaults(func=_migrate)

    p = sub.add_parser(
        "demo-data",
        help="write a year of clearly synthetic usage (demo key ids, demo-* file names)",
        description="Write synthetic uploads and requests for demo API keys "
        "00000000-de30-4000-8000-0000000000NN. Deterministic for a given --seed and --end; "
        "re-running writes nothing new. Refuses PostgreSQL unless explicitly confirmed.",
    )
    p.add_argument("url", help="database URL, e.g. sqlite:///demo.db")
    p.add_argument("--days", type=int, default=365, help="days of history (default 365)")
    p.add_argument("--keys", type=int, default=3, help="number of demo API keys (default 3)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--end", help="last day, YYYY-MM-DD (default: today, UTC)")
    p.add_argument(
        "--if-empty", action="store_true", help="do nothing when the database has uploads"
    )
    p.add_argument(
        "--yes-this-is-not-production",
        action="store_true",
        help="allow a PostgreSQL URL (the data is synthetic)",
    )
    p.set_defaults(func=_demo_data)

    p = sub.add_parser(
        "maintain",
        help="create raw-table partitions ahead and prune old raw rows (cron-safe, idempotent)",
        description="PostgreSQL: create the monthly partitions of file_uploads and api_requests "
        "for the next --months-ahead months (and for rows the default partition caught), and "
        "with --raw-retention-days drop the months wholly older than that. SQLite: delete raw "
        "rows older than --raw-retention-days in batches. Rollups are never pruned.",
    )
    p.add_argument("url", help="database URL, e.g. sqlite:///usage.db")
    p.add_argument("--raw-retention-days", metavar="N", help="prune raw rows older than N days")
    p.add_argument("--months-ahead", metavar="K", help="partitions ahead, default 3")
    p.set_defaults(func=_maintain)

    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
