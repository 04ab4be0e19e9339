"""Delivery webhooks: what became of a message, POSTed to ``WEBHOOK_URLS``, signed.

An event (``sent``, ``deferred``, ``failed``, ``suppressed``, ``cancelled``) is published
to the ``P.webhooks`` queue, one copy per receiver URL, by whoever decided it (the worker,
or the server for a cancel). The worker consumes that queue on a channel of its own, with
``WEBHOOK_CONCURRENCY`` deliveries at a time, so a slow or hanging receiver (each POST is
bounded by ``WEBHOOK_TIMEOUT``) never holds up mail. A delivery answered with anything but
2xx is tried again through the webhook retry tiers (``RETRY_DELAYS``), then dead-lettered
to ``P.webhooks.dead`` with the reason.

Each POST carries ``X-Mailroom-Timestamp`` (Unix seconds, when it was sent) and
``X-Mailroom-Signature: v1=<hex>``, the HMAC-SHA256 under ``WEBHOOK_SECRET`` of
``<timestamp>.<body>``; a receiver refuses an old timestamp (a replay). Events of one
message are numbered (``sequence``: the record's history length when it happened). A
worker POSTs the events of one message to one receiver one at a time, and while an earlier
one waits for a retry the later ones wait behind it (in a first-tier round trip each, not
counted as tries); this order holds within one worker process, so with several workers a
receiver orders by ``sequence``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Literal

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection

from broker import AMQP_ERRORS, WEBHOOK_DEAD_KEY, WEBHOOK_KEY, Broker, Names
from config import Settings
from errors import BrokerUnavailable

log = logging.getLogger(__name__)

Event = Literal["sent", "deferred", "failed", "suppressed", "cancelled"]
URL_HEADER = "x-mailroom-webhook"  # which of WEBHOOK_URLS (its index) a copy is for
TRIES_HEADER = "x-mailroom-webhook-retries"
WAITS_HEADER = "x-mailroom-webhook-waits"  # times it waited behind an earlier event
MAX_WAITS = 50  # then it is delivered anyway
TIMESTAMP_HEADER = "X-Mailroom-Timestamp"
SIGNATURE_HEADER = "X-Mailroom-Signature"


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """``v1=`` and the hex HMAC-SHA256 of ``<timestamp>.<body>`` under ``secret``."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "v1=" + mac.hexdigest()


def event_body(
    event: Event,
    message_id: str,
    status: str,
    recipients: Mapping[str, Any],
    sequence: int,
    error: str | None = None,
) -> bytes:
    """The JSON an event is POSTed as. ``recipients``: address -> RecipientResult (or
    its dict)."""
    shown = []
    for address, result in recipients.items():
        fields = result if isinstance(result, dict) else result.__dict__
        shown.append({"address": address, **fields})
    body = {
        "event": event,
        "message_id": message_id,
        "status": status,
        "recipients": shown,
        "error": error,
        "sequence": sequence,
        "occurred_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
    }
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


async def publish_event(broker: Broker, settings: Settings, message_id: str, body: bytes) -> None:
    """Queue ``body`` for each receiver (confirmed); a failure is logged, never raised: the
    mail's own outcome is recorded already and matters more."""
    for index in range(len(settings.webhook_urls)):
        try:
            await broker.publish(body, message_id, WEBHOOK_KEY, {URL_HEADER: index})
        except BrokerUnavailable as exc:
            log.error("message %s: webhook event not queued: %s", message_id, exc)
            return


class WebhookSender:
    """Consumes ``P.webhooks`` on its own channel and POSTs each event to its receiver."""

    def __init__(self, settings: Settings, broker: Broker) -> None:
        assert settings.webhook_secret is not None
        self.settings = settings
        self.broker = broker
        self.names = Names.of(settings)
        self._secret = settings.webhook_secret.get()
        import httpx  # only where webhooks are set up

        self._client = httpx.AsyncClient(
            timeout=settings.webhook_timeout, trust_env=False, follow_redirects=False
        )
        self._channel: AbstractChannel | None = None
        # Per (message id, receiver): a lock that keeps POSTs in order, and whether an
        # earlier event is waiting for a retry (later ones then wait behind it). In this
        # process only: with several workers, receivers order by ``sequence``.
        self._locks: dict[tuple[str, int], asyncio.Lock] = {}
        self._blocked: dict[tuple[str, int], bytes] = {}  # -> the event waiting for a retry

    async def start(self, connection: AbstractRobustConnection) -> None:
        channel = await asyncio.wait_for(
            connection.channel(publisher_confirms=False), self.settings.connect_timeout
        )
        await channel.set_qos(prefetch_count=self.settings.webhook_concurrency)
        queue = await channel.get_queue(self.names.webhook_queue, ensure=True)
        await queue.consume(self._on_message, no_ack=False)
        self._channel = channel

    async def close(self) -> None:
        if self._channel is not None:
            with contextlib.suppress(*AMQP_ERRORS):
                await asyncio.wait_for(self._channel.close(), 5)
        await self._client.aclose()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        headers = dict(message.headers or {})
        message_id = message.message_id or ""
        index = headers.get(URL_HEADER)
        if not isinstance(index, int) or not 0 <= index < len(self.settings.webhook_urls):
            # WEBHOOK_URLS changed since it was queued: that receiver is gone.
            log.warning("message %s: webhook event for an unknown receiver dropped", message_id)
            await self._settle(message, "ack")
            return
        key = (message_id, index)
        lock = self._locks.setdefault(key, asyncio.Lock())
        try:
            async with lock:  # one POST at a time per message and receiver, in order
                await self._deliver(message, headers, key)
        finally:
            if not lock.locked() and self._locks.get(key) is lock:
                del self._locks[key]

    async def _deliver(
        self, message: AbstractIncomingMessage, headers: dict[str, Any], key: tuple[str, int]
    ) -> None:
        message_id, index = key
        waits = headers.get(WAITS_HEADER, 0)
        waits = waits if isinstance(waits, int) and waits >= 0 else 0
        blocker = self._blocked.get(key)
        if blocker not in (None, message.body) and waits < MAX_WAITS and self.names.webhook_tiers:
            # An earlier event of this message waits for a retry to this receiver: this
            # one waits too (without spending its own tries), so they arrive in order.
            headers[WAITS_HEADER] = waits + 1
            await self._forward(message, headers, self.names.webhook_tiers[0].routing_key)
            return
        url = self.settings.webhook_urls[index]
        problem = await self._post(url, message.body)
        if problem is None:
            if blocker == message.body:
                del self._blocked[key]
            await self._settle(message, "ack")
            return
        self._blocked.setdefault(key, message.body)
        tries = headers.get(TRIES_HEADER, 0)
        tries = tries if isinstance(tries, int) and tries >= 0 else 0
        if tries < len(self.names.webhook_tiers):
            headers[TRIES_HEADER] = tries + 1
            routing_key = self.names.webhook_tiers[tries].routing_key
            log.warning(
                "message %s: webhook to receiver %d failed (%s); retry %d",
                message_id,
                index,
                problem,
                tries + 1,
            )
        else:
            headers["x-mailroom-error"] = problem[:1000]
            routing_key = WEBHOOK_DEAD_KEY
            if self._blocked.get(key) == message.body:
                del self._blocked[key]  # given up: the later events need not wait for it
            log.error(
                "message %s: webhook to receiver %d failed %d times (%s); dead-lettered",
                message_id,
                index,
                tries + 1,
                problem,
            )
        await self._forward(message, headers, routing_key)

    async def _forward(
        self, message: AbstractIncomingMessage, headers: dict[str, Any], routing_key: str
    ) -> None:
        """Publish the event on to a retry tier (or the dead letters), then ack it."""
        message_id = message.message_id or ""
        try:
            await self.broker.publish(message.body, message_id, routing_key, headers)
        except BrokerUnavailable as exc:
            log.error("message %s: webhook retry not queued (%s)", message_id, exc)
            await asyncio.sleep(1)
            await self._settle(message, "nack")
            return
        await self._settle(message, "ack")

    async def _post(self, url: str, body: bytes) -> str | None:
        """POST one event; None when the receiver answered 2xx, else what went wrong."""
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "Mailroom-Webhooks/1",
            TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: sign(self._secret, timestamp, body),
        }
        import httpx

        try:
            answer = await self._client.post(url, content=body, headers=headers)
        except httpx.TimeoutException:
            return f"no answer within {self.settings.webhook_timeout:g}s"
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"
        if 200 <= answer.status_code < 300:
            return None
        return f"answered {answer.status_code}"

    async def _settle(self, message: AbstractIncomingMessage, how: Literal["ack", "nack"]) -> None:
        action = message.ack() if how == "ack" else message.nack(requeue=True)
        try:
            await asyncio.wait_for(action, self.settings.publish_timeout)
        except AMQP_ERRORS as exc:
            log.warning("webhook event %s: %s failed (%s)", message.message_id, how, exc)
