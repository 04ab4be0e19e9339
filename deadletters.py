"""The dead-letter queue: what is in it and why, and sending messages from it again.

Used by the operator command (``python admin.py dead ...``) and the server's
``GET /api/dead-letters`` view. A re-queued message gets a fresh retry budget; recipients
that refused it are tried again, recipients that already accepted it are not.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from broker import AMQP_ERRORS, COPY_HEADER, SEND_KEY, Names, declare_topology
from config import Settings
from errors import BrokerUnavailable
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
    requeued: bool = False


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
    seen: list[DeadLetter] = []
    store: Store | None = None
    try:
        async with connection:
            if requeue or requeue_all:
                store = await Store.open(settings)
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
                if requeue_all or (requeue is not None and letter.id in requeue):
                    done = await _requeue(topology.exchange, message, store)
                    letter = dataclasses.replace(letter, requeued=done)
                seen.append(letter)
    finally:
        if store is not None:
            await store.close()
    return seen


async def _requeue(
    exchange: aio_pika.abc.AbstractExchange, message: AbstractIncomingMessage, store: Store | None
) -> bool:
    headers: dict[str, Any] = {
        k: v for k, v in (message.headers or {}).items() if k not in _RESET_HEADERS
    }
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
                copy_number = await store.requeue(message_id, retry, "re-queued by an operator")
                if copy_number is not None:
                    # The newest copy: any older one still around is dropped by the worker.
                    headers[COPY_HEADER] = copy_number
        except StoreUnavailable as exc:
            # Its record would still say failed, and the worker would drop it: keep it here.
            log.error(
                "message %s: not re-queued, its record cannot be updated: %s", message_id, exc
            )
            return False
    again = aio_pika.Message(
        message.body,
        message_id=message.message_id,
        content_type=message.content_type,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        headers=headers,
    )
    await exchange.publish(again, SEND_KEY, mandatory=True)
    await message.ack()
    log.info("message %s: re-queued", message_id)
    return True
