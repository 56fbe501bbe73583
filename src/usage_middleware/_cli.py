"""The ``usage-middleware`` command: schema, legacy migration and demo data from a shell."""

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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="usage-middleware", description="Manage the usage-middleware tables."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("create-schema", help="create the tables (idempotent)")
    p.add_argument("url", help="database URL, e.g. sqlite:///usage.db")
    p.set_defaults(func=_create_schema)

    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
