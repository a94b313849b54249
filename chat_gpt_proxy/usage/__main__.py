"""python -m chat_gpt_proxy.usage: the spend report from the ledger, without a running server.

    python -m chat_gpt_proxy.usage --since 2026-12-01 [--until 2026-12-31] [--csv] [--database URL]

The database is USAGE_DATABASE unless --database names one. It is only read,
never migrated (an older release's ledger is reported as it is); SQLite is
read while the server writes (WAL mode). Exit 2 with one line for a bad argument
or a database that cannot be read.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import sys

from .ledger import make_store
from .report import to_csv, to_table


def day(text: str) -> datetime.date:
    try:
        return datetime.datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=datetime.UTC).date()
    except ValueError:
        raise argparse.ArgumentTypeError("a date as YYYY-MM-DD, got %r" % text[:40]) from None


def midnight(date: datetime.date) -> float:
    return datetime.datetime.combine(date, datetime.time(), datetime.UTC).timestamp()


async def report(url: str, since: datetime.date, until: datetime.date) -> list[dict]:
    store = make_store(url)
    try:
        await store.open_read_only()
        return await store.report(midnight(since), midnight(until + datetime.timedelta(days=1)))
    finally:
        await store.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chat_gpt_proxy.usage", description=__doc__.split("\n")[0])
    today = datetime.datetime.now(datetime.UTC).date()
    parser.add_argument("--since", type=day, default=today.replace(day=1), help="first day (UTC), YYYY-MM-DD")
    parser.add_argument("--until", type=day, default=today, help="last day (UTC), included")
    parser.add_argument("--csv", action="store_true", help="CSV (as GET /admin/usage?format=csv) instead of a table")
    parser.add_argument("--database", default=os.environ.get("USAGE_DATABASE", ""), help="default: USAGE_DATABASE")
    args = parser.parse_args(argv)
    if not args.database:
        parser.error("no database: set USAGE_DATABASE or give --database")
    if not args.database.startswith(("postgresql://", "postgres://")) and not os.path.isfile(
        args.database.removeprefix("sqlite://")
    ):
        parser.error("no such database file: %r" % args.database)
    try:
        rows = asyncio.run(report(args.database, args.since, args.until))
    except Exception as exc:  # any driver's error: one line, never a traceback
        print("chat_gpt_proxy.usage: cannot read the ledger: %s" % str(exc).replace("\n", " ")[:300], file=sys.stderr)
        return 2
    sys.stdout.write(to_csv(rows) if args.csv else to_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
