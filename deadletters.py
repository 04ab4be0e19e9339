"""The dead-letter queue: what is in it and why, and sending messages from it again.

Used by the operator command (``python admin.py dead ...``) and the server's
``GET /api/dead-letters`` view. A re-queued message gets a fresh retry budget; recipients
that refused it are tried again, recipients that already accepted it are not.

Reading holds every letter unacked until the channel closes, which puts them back in
their places (classic queues put each at its old position; quorum queues put returned
letters first, in the order they are returned, so a single reader keeps the order). Two
readers at once would each hold part of the queue and see only that part, and on a quorum
queue their returns would interleave. So one reader at a time, across all processes: a
reader first declares the exclusive queue ``<QUEUE_PREFIX>.dead.lock``, which RabbitMQ
grants to one connection and drops when that connection closes (also when its process
dies). Another reader waits for it up to ``LOCK_WAIT`` seconds, then gives up with
:class:`DeadLettersBusy`. Within one server process, :class:`DeadLetterListings` lets
concurrent requests share one read.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage

from broker import AMQP_ERRORS, COPY_HEADER, SEND_KEY, Names, declare_topology
from config import Settings
from errors import BrokerUnavailable
from store import RecipientResult, Store, StoreUnavailable

log = logging.getLogger(__name__)

LOCK_WAIT = 10.0  # seconds a reader waits for another one to finish


class DeadLettersBusy(BrokerUnavailable):
    """Another listing or re-queue held the dead-letter queue for ``LOCK_WAIT`` seconds."""


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
    settings: Settings, requeue: set[str] | None, requeue_all: bool, store: Store | None = None
) -> list[DeadLetter]:
    """List the dead-letter queue; re-queue the selected messages. Returns what was seen.

    A re-queue updates the records through ``store`` (the server's), or through a store
    opened for the purpose (``admin.py``)."""
    names = Names.of(settings)
    try:
        connection = await asyncio.wait_for(
            aio_pika.connect(settings.amqp_url.get(), timeout=settings.connect_timeout),
            settings.connect_timeout + 1,
        )
    except AMQP_ERRORS as exc:
        raise BrokerUnavailable(f"cannot connect to {settings.amqp_url_redacted}: {exc}") from exc
    seen: list[DeadLetter] = []
    own_store: Store | None = None
    try:
        async with connection:
            if (requeue or requeue_all) and store is None:
                store = own_store = await Store.open(settings)
            channel = await connection.channel(publisher_confirms=True)
            topology = await declare_topology(channel, settings)
            await _take_lock(connection, f"{names.dead_queue}.lock")
            queue = await channel.get_queue(names.dead_queue)
            # Everything is fetched unacked first, so each message is looked at once;
            # whatever is not re-queued goes back, one by one in queue order (a quorum
            # queue keeps the order of returns, not of a closing channel's letters).
            held: list[AbstractIncomingMessage] = []
            while (message := await queue.get(no_ack=False, fail=False, timeout=10)) is not None:
                held.append(message)
            for message in held:
                letter = describe(message)
                if requeue_all or (requeue is not None and letter.id in requeue):
                    done = await _requeue(topology.exchange, message, store)
                    letter = dataclasses.replace(letter, requeued=done)
                seen.append(letter)
            for message in held:
                if not message.processed:
                    await message.nack(requeue=True)
    finally:
        if own_store is not None:
            await own_store.close()
    return seen


async def _take_lock(connection: AbstractConnection, name: str) -> None:
    """Hold the exclusive queue ``name`` for as long as ``connection`` is open."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + LOCK_WAIT
    pause = 0.02
    while True:
        channel = await connection.channel()
        try:
            await channel.declare_queue(name, exclusive=True, auto_delete=True)
            return
        except aiormq.exceptions.ChannelLockedResource:
            pass  # another reader holds it; RabbitMQ closed this channel
        if loop.time() + pause > deadline:
            raise DeadLettersBusy(
                f"another listing or re-queue has held the dead-letter queue for {LOCK_WAIT:g} s"
            )
        await asyncio.sleep(pause)
        pause = min(pause * 2, 0.5)


class DeadLetterListings:
    """Concurrent listings in one process share one read of the dead-letter queue."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._read: asyncio.Future[list[DeadLetter]] | None = None

    async def read(self) -> list[DeadLetter]:
        """What is in the dead-letter queue (a read that is under way when this is called
        counts); raises :class:`BrokerUnavailable`."""
        if self._read is None:
            self._read = asyncio.ensure_future(dead_letters(self._settings, None, False))
            self._read.add_done_callback(self._done)
        # Shielded: one caller going away does not cancel the read the others wait for.
        return await asyncio.shield(self._read)

    def _done(self, read: asyncio.Future[list[DeadLetter]]) -> None:
        self._read = None
        if not read.cancelled():
            read.exception()  # retrieved here too, in case every caller went away


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
