"""Operator commands: dead-lettered messages, moving the message database, the records.

    python admin.py dead list                 # what is in <QUEUE_PREFIX>.dead, and why
    python admin.py dead requeue --all        # send every dead letter again
    python admin.py dead requeue ID [ID ...]  # send these again
    python admin.py db copy --from URL        # copy records from URL into DATABASE_URL
    python admin.py records stats             # JSON: total, by status, the oldest record
    python admin.py records prune             # apply MESSAGE_RETENTION_DAYS now
    python admin.py records seed --count N --days D   # synthetic records: not in production

A re-queued message gets a fresh retry budget; recipients that refused it are tried
again, recipients that already accepted it are not. ``db copy`` (for instance from
``sqlite:///var/mailroom.db`` to a new PostgreSQL ``DATABASE_URL``) copies message records,
idempotency keys and batch answers, skipping what the target has already, so it can run
again. Uses the same settings (environment and ``.env``) as the server and worker.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time

from broker import Names
from config import Settings, quiet_amqp_libraries, redact_url
from dbcopy import copy_records, describe
from deadletters import dead_letters
from errors import BrokerUnavailable, ConfigError
from seeding import seed
from store import Store, StoreUnavailable


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="admin.py", description="Mailroom operator commands")
    sub = parser.add_subparsers(dest="area", required=True)
    dead = sub.add_parser("dead", help="dead-lettered messages")
    actions = dead.add_subparsers(dest="action", required=True)
    actions.add_parser("list", help="list dead letters with their reasons")
    requeue = actions.add_parser("requeue", help="send dead letters again")
    requeue.add_argument("ids", nargs="*", help="message ids to re-queue")
    requeue.add_argument("--all", action="store_true", help="re-queue every dead letter")
    db = sub.add_parser("db", help="the message database (DATABASE_URL)")
    db_actions = db.add_subparsers(dest="action", required=True)
    copy = db_actions.add_parser(
        "copy", help="copy records from another database into DATABASE_URL (idempotent)"
    )
    copy.add_argument(
        "--from",
        dest="source",
        required=True,
        metavar="URL",
        help="the database to copy from, e.g. sqlite:///var/mailroom.db",
    )
    records = sub.add_parser("records", help="message records in the database")
    chores = records.add_subparsers(dest="action", required=True)
    chores.add_parser("stats", help="JSON: how many records, by status, and the oldest one")
    chores.add_parser("prune", help="delete the records MESSAGE_RETENTION_DAYS expires, now")
    seeder = chores.add_parser(
        "seed", help="write synthetic records for capacity tests (never in production)"
    )
    seeder.add_argument("--count", type=int, required=True, help="records to write")
    seeder.add_argument(
        "--days", type=float, default=30.0, help="spread over the last this many days (30)"
    )
    args = parser.parse_args(argv)
    if args.area == "dead" and args.action == "requeue" and not args.ids and not args.all:
        parser.error("give message ids or --all")
    if args.area == "records" and args.action == "seed" and (args.count < 0 or args.days <= 0):
        parser.error("--count must be at least 0 and --days more than 0")
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"admin: configuration error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    quiet_amqp_libraries()
    if args.area == "db":
        return copy_database(args.source, settings)
    if args.area == "records":
        try:
            print(asyncio.run(records_command(settings, args)))
        except StoreUnavailable as exc:
            print(f"admin: {exc}", file=sys.stderr)
            return 1
        return 0
    return dead_command(settings, args)


async def records_command(settings: Settings, args: argparse.Namespace) -> str:
    """What ``records stats | prune | seed`` prints."""
    store = await Store.open(settings)
    try:
        if args.action == "stats":
            return json.dumps((await store.stats()).to_json(), indent=2)
        if args.action == "prune":
            days = settings.message_retention_days
            if days == 0:
                return "MESSAGE_RETENTION_DAYS is 0: records are kept forever; none removed"
            removed = await store.expire(days)
            return f"removed {removed} record(s) older than {days} days"
        started = time.monotonic()
        written = await seed(store, args.count, args.days)
        took = time.monotonic() - started
        rate = f", {written / took:.0f}/s" if written and took > 0 else ""
        return f"seeded {written} record(s) over {args.days:g} days in {took:.1f}s{rate}"
    finally:
        await store.close()


def dead_command(settings: Settings, args: argparse.Namespace) -> int:
    selected = set(args.ids) if args.action == "requeue" else None
    try:
        seen = asyncio.run(dead_letters(settings, selected, args.action == "requeue" and args.all))
    except (BrokerUnavailable, StoreUnavailable) as exc:
        print(f"admin: {exc}", file=sys.stderr)
        return 1
    if args.action == "list":
        for letter in seen:
            code = f" [{letter.smtp_code}]" if letter.smtp_code else ""
            print(f"{letter.id}  {letter.failed_at}{code}  {letter.error}")
        print(f"{len(seen)} dead letter(s) in {Names.of(settings).dead_queue}")
        return 0
    done = [s.id for s in seen if s.requeued]
    kept = [s.id for s in seen if not s.requeued and (args.all or s.id in (selected or set()))]
    missing = sorted((selected or set()) - {s.id for s in seen})
    print(f"re-queued {len(done)} message(s)")
    if kept:
        print(f"kept (record not updatable): {', '.join(kept)}", file=sys.stderr)
    if missing:
        print(f"not in the dead-letter queue: {', '.join(missing)}", file=sys.stderr)
    if kept or missing:
        return 1
    return 0


def copy_database(source: str, settings: Settings) -> int:
    try:
        copied = asyncio.run(copy_records(source, settings))
    except StoreUnavailable as exc:
        print(f"admin: {exc}", file=sys.stderr)
        return 1
    for line in describe(copied):
        print(line)
    print(f"into {redact_url(settings.database_url.get())}")
    return 0


if __name__ == "__main__":
    # Run the module under its own name, so its loggers say "admin", not "__main__".
    import admin

    sys.exit(admin.main())
