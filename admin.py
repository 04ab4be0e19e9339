"""Operator commands for dead-lettered messages.

    python admin.py dead list                 # what is in <QUEUE_PREFIX>.dead, and why
    python admin.py dead requeue --all        # send every dead letter again
    python admin.py dead requeue ID [ID ...]  # send these again

A re-queued message gets a fresh retry budget; recipients that refused it are tried
again, recipients that already accepted it are not. Uses the same settings (environment
and ``.env``) as the server and worker.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from broker import AMQP_ERRORS, SEND_KEY, Names, declare_topology
from config import Settings
from errors import BrokerUnavailable, ConfigError
from store import RecipientResult, Store, StoreUnavailable

log = logging.getLogger(__name__)

# Headers that describe a failed life; a re-queued message starts a new one.
_RESET_HEADERS = (
    "x-mailroom-error",
    "x-mailroom-failed-at",
    "x-mailroom-smtp-code",
    "x-mailroom-retries",
    "x-mailroom-config-faults",
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
)


@dataclass(frozen=True)
class DeadLetter:
    id: str
    error: str
    failed_at: str
    smtp_code: int | None


def describe(message: AbstractIncomingMessage) -> DeadLetter:
    headers = message.headers or {}
    code = headers.get("x-mailroom-smtp-code")
    return DeadLetter(
        id=message.message_id or "(no id)",
        error=str(headers.get("x-mailroom-error") or headers.get("x-first-death-reason") or "?"),
        failed_at=str(headers.get("x-mailroom-failed-at") or "?"),
        smtp_code=code if isinstance(code, int) else None,
    )


async def dead_letters(
    settings: Settings, requeue: set[str] | None, requeue_all: bool
) -> list[DeadLetter]:
    """List the dead-letter queue; re-queue the selected messages. Returns what was seen."""
    names = Names.of(settings)
    try:
        connection = await asyncio.wait_for(
            aio_pika.connect(settings.amqp_url.get(), timeout=settings.connect_timeout),
            settings.connect_timeout + 1,
        )
    except AMQP_ERRORS as exc:
        raise BrokerUnavailable(f"cannot connect to {settings.amqp_url_redacted}: {exc}") from exc
    store = await Store.open(settings) if (requeue or requeue_all) else None
    seen: list[DeadLetter] = []
    try:
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            topology = await declare_topology(channel, settings)
            queue = await channel.get_queue(names.dead_queue)
            # Everything is fetched unacked first, so each message is looked at once;
            # whatever is not re-queued goes back when the channel closes.
            held: list[AbstractIncomingMessage] = []
            while (message := await queue.get(no_ack=False, fail=False, timeout=10)) is not None:
                held.append(message)
            for message in held:
                letter = describe(message)
                seen.append(letter)
                if requeue_all or (requeue is not None and letter.id in requeue):
                    await _requeue(topology.exchange, message, store)
    finally:
        if store is not None:
            await store.close()
    return seen


async def _requeue(
    exchange: aio_pika.abc.AbstractExchange, message: AbstractIncomingMessage, store: Store | None
) -> None:
    headers: dict[str, Any] = {
        k: v for k, v in (message.headers or {}).items() if k not in _RESET_HEADERS
    }
    copy = aio_pika.Message(
        message.body,
        message_id=message.message_id,
        content_type=message.content_type,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        headers=headers,
    )
    message_id = message.message_id or ""
    if store is not None and message_id:
        try:
            record = await store.get(message_id)
            if record is not None:
                retry = {
                    a: RecipientResult("pending")
                    for a, r in record.results.items()
                    if r.status == "refused"
                }
                await store.finish(message_id, "queued", retry, detail="re-queued by an operator")
        except StoreUnavailable as exc:
            log.warning("message %s: record not updated: %s", message_id, exc)
    await exchange.publish(copy, SEND_KEY, mandatory=True)
    await message.ack()
    log.info("message %s: re-queued", message_id)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="admin.py", description="Mailroom operator commands")
    sub = parser.add_subparsers(dest="area", required=True)
    dead = sub.add_parser("dead", help="dead-lettered messages")
    actions = dead.add_subparsers(dest="action", required=True)
    actions.add_parser("list", help="list dead letters with their reasons")
    requeue = actions.add_parser("requeue", help="send dead letters again")
    requeue.add_argument("ids", nargs="*", help="message ids to re-queue")
    requeue.add_argument("--all", action="store_true", help="re-queue every dead letter")
    args = parser.parse_args(argv)
    if args.action == "requeue" and not args.ids and not args.all:
        parser.error("give message ids or --all")
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"admin: configuration error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
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
    done = [s.id for s in seen if args.all or s.id in selected]  # type: ignore[operator]
    missing = sorted((selected or set()) - set(done))
    print(f"re-queued {len(done)} message(s)")
    if missing:
        print(f"not in the dead-letter queue: {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
