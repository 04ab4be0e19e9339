"""AMQP topology and publishing, shared by server and worker so they cannot disagree.

Topology (``P`` is ``QUEUE_PREFIX``, default ``mailroom``), all durable:

* exchange ``P`` (direct)
* queue ``P.send`` <- routing key ``send``: the work queue the worker consumes
* queue ``P.dead`` <- routing key ``dead``: messages that will not be sent, with the
  reason in their headers. The work queue also dead-letters rejected messages here.

:class:`Broker` owns one robust connection and one channel with publisher confirms.
:meth:`Broker.publish` returns only once RabbitMQ has confirmed the message and raises
:class:`BrokerUnavailable` otherwise, always within ``PUBLISH_TIMEOUT`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import aio_pika
import aiormq
import yarl
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractQueue,
    AbstractRobustConnection,
)
from pamqp.commands import Basic
from prometheus_client import Counter

from config import Settings, redact_url
from errors import BrokerRefused, BrokerUnavailable, PublishUnconfirmed

log = logging.getLogger(__name__)

SEND_KEY = "send"
RECONNECT_INTERVAL = 1.0  # seconds between attempts of a robust connection to come back
# The first connection: attempts wait FIRST_RETRY seconds, doubling up to LAST_RETRY.
FIRST_RETRY = 0.5
LAST_RETRY = 15.0
RENEW_INTERVAL = 1.0  # seconds between fresh publishing channels while publishes are refused
# Frames aiormq queues for a connection's writer task (its FRAME_BUFFER_SIZE, 10 by
# default). A publish that finds the queue full waits for the writer while it holds its
# channel's lock, and the publishes behind it then go one per turn of the event loop: the
# requests waiting for their confirm queue up behind each other. Deep enough for every
# publish in flight (each waits for its confirm at most PUBLISH_TIMEOUT), it costs memory
# only for frames that are written out in the same turn anyway. Measured with
# bench/bench.py (two alternating runs each, together with publish_unwaited): keep-alive
# clients 1043-1059 -> 1284-1335 mails/s, accept p99 96-101 -> 71-73 ms; the batch
# endpoint 1836-1921 -> 2305-2309 mails/s; a new connection per request the same.
WRITE_QUEUE_FRAMES = 1024
aiormq.Connection.FRAME_BUFFER_SIZE = WRITE_QUEUE_FRAMES  # read by each new connection
DEAD_KEY = "dead"
# Which copy of a message a queue message is: 0 (or absent) for the accepted one, then +1
# for each retry copy and operator re-queue. The record keeps the newest (see store.py).
COPY_HEADER = "x-mailroom-copy"

# What aio-pika / aiormq raise when the broker is gone, refuses, or the channel died.
# ChannelInvalidStateError (a RuntimeError) is what a publish, ack, nack or reject on a
# channel that has just died raises.
AMQP_ERRORS: tuple[type[BaseException], ...] = (
    aio_pika.exceptions.AMQPException,
    aiormq.exceptions.AMQPError,
    aiormq.exceptions.ChannelInvalidStateError,
    ConnectionError,
    OSError,
    asyncio.TimeoutError,
)
# Connecting can also fail on a URL the client library cannot use (ValueError).
CONNECT_ERRORS: tuple[type[BaseException], ...] = (*AMQP_ERRORS, ValueError)

PUBLISHED = Counter(
    "mailroom_messages_published",
    "Messages RabbitMQ confirmed, by where they went (send, retry, dead).",
    ["queue"],
)
_PUBLISHED_SEND = PUBLISHED.labels("send")
_PUBLISHED_DEAD = PUBLISHED.labels(DEAD_KEY)
_PUBLISHED_RETRY = PUBLISHED.labels("retry")


@dataclass(frozen=True)
class RetryTier:
    delay: float  # seconds a message waits in this tier before it returns to the work queue
    queue: str
    routing_key: str


# Scheduled messages (``send_at``) wait in these tiers, a timer wheel: each is a queue whose
# own TTL (never a per-message one, which RabbitMQ expires only at a queue's head) returns
# a message to the work queue; the worker hands a message that is not yet due on to the
# longest tier that does not overshoot. Powers of 8 seconds, up to 24 days: a message due
# in 30 days makes about 20 hops, and a late-due message never holds up an early one.
SCHEDULE_DELAYS: tuple[float, ...] = (1, 8, 64, 512, 4096, 32768, 262144, 2097152)
SCHEDULE_DUE = 0.01  # seconds: closer to send_at than this is due
# Delivery webhooks (webhooks.py): their own queue, retry tiers and dead-letter queue, so
# that a receiver that is down or slow never holds up mail.
WEBHOOK_KEY = "webhook"
WEBHOOK_DEAD_KEY = "webhook.dead"


@dataclass(frozen=True)
class Names:
    exchange: str
    send_queue: str
    dead_queue: str
    retry_tiers: tuple[RetryTier, ...] = ()
    schedule_tiers: tuple[RetryTier, ...] = ()
    webhook_queue: str = ""
    webhook_dead_queue: str = ""
    webhook_tiers: tuple[RetryTier, ...] = ()

    @classmethod
    def for_prefix(
        cls, prefix: str, retry_delays: tuple[float, ...] = (), webhooks: bool = True
    ) -> Names:
        """Every name under ``prefix``; the webhook queues' too unless ``webhooks`` is
        False (they exist only with WEBHOOK_URLS)."""
        tiers = tuple(
            RetryTier(delay, f"{prefix}.retry.{ms}ms", f"retry.{ms}")
            for delay in retry_delays
            for ms in [round(delay * 1000)]
        )
        schedule = tuple(
            RetryTier(delay, f"{prefix}.schedule.{round(delay)}s", f"schedule.{round(delay)}")
            for delay in SCHEDULE_DELAYS
        )
        hooks = tuple(
            RetryTier(delay, f"{prefix}.webhook.retry.{ms}ms", f"webhook.retry.{ms}")
            for delay in retry_delays
            for ms in [round(delay * 1000)]
        )
        if not webhooks:
            return cls(prefix, f"{prefix}.send", f"{prefix}.dead", tiers, schedule)
        return cls(
            prefix,
            f"{prefix}.send",
            f"{prefix}.dead",
            tiers,
            schedule,
            f"{prefix}.webhooks",
            f"{prefix}.webhooks.dead",
            hooks,
        )

    def schedule_hop(self, remaining: float) -> tuple[str, float | None]:
        """Where a message due in ``remaining`` seconds waits next: (routing key, a
        per-message expiration or None). The longest tier not longer than ``remaining``;
        under the shortest (1 s), that one with the remaining time as the expiration
        (a head-of-line wait of under a second at most)."""
        fitting = [t for t in self.schedule_tiers if t.delay <= remaining]
        if fitting:
            return fitting[-1].routing_key, None
        return self.schedule_tiers[0].routing_key, max(remaining, SCHEDULE_DUE)

    @classmethod
    def of(cls, settings: Settings) -> Names:
        return cls.for_prefix(
            settings.queue_prefix, settings.retry_delays, bool(settings.webhook_urls)
        )

    def all_queues(self) -> tuple[str, ...]:
        return (
            self.send_queue,
            self.dead_queue,
            *(t.queue for t in self.retry_tiers),
            *(t.queue for t in self.schedule_tiers),
            *(q for q in (self.webhook_queue, self.webhook_dead_queue) if q),
            *(t.queue for t in self.webhook_tiers),
        )


@dataclass(frozen=True)
class Topology:
    exchange: AbstractExchange
    send_queue: AbstractQueue
    dead_queue: AbstractQueue


def _queue_arguments(settings: Settings, **arguments: Any) -> dict[str, Any]:
    if settings.queue_type == "quorum":
        arguments["x-queue-type"] = "quorum"
    return arguments


async def declare_topology(channel: AbstractChannel, settings: Settings) -> Topology:
    """Declare (idempotently) everything both processes rely on.

    Classic durable queues by default; with ``QUEUE_TYPE=quorum`` every queue is a quorum
    queue (replicated across a cluster), the work queue has a delivery limit, and the
    retry tiers dead-letter back at-least-once.
    """
    names = Names.of(settings)
    exchange = await channel.declare_exchange(
        names.exchange, aio_pika.ExchangeType.DIRECT, durable=True
    )
    dead = await channel.declare_queue(
        names.dead_queue, durable=True, arguments=_queue_arguments(settings)
    )
    await dead.bind(exchange, DEAD_KEY)
    send_args = _queue_arguments(
        settings,
        **{"x-dead-letter-exchange": names.exchange, "x-dead-letter-routing-key": DEAD_KEY},
    )
    if settings.queue_type == "quorum":
        send_args["x-delivery-limit"] = settings.delivery_limit
    send = await channel.declare_queue(names.send_queue, durable=True, arguments=send_args)
    await send.bind(exchange, SEND_KEY)
    for tier in (*names.retry_tiers, *names.schedule_tiers):
        await _declare_tier(channel, settings, exchange, tier, SEND_KEY)
    if settings.webhook_urls:
        await _declare_webhook_queues(channel, settings, names, exchange)
    return Topology(exchange=exchange, send_queue=send, dead_queue=dead)


class FailoverConnection(aio_pika.RobustConnection):
    """A robust connection that, when it cannot (re)connect to one broker of
    ``AMQP_URL``'s list, tries the next one next time (round robin); channels,
    queues and consumers are restored on whichever node answers."""

    def __init__(self, url: Any, *, urls: Sequence[str] = (), **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self.urls = [yarl.URL(u) for u in urls] or [self.url]
        self._current = next((n for n, u in enumerate(self.urls) if u == self.url), 0)

    def _next_broker(self) -> None:
        if len(self.urls) > 1:
            self._current = (self._current + 1) % len(self.urls)
            self.url = self.urls[self._current]

    async def _on_connection_close(self, closing: asyncio.Future[Any]) -> None:
        # The broker went away: its neighbour is the likelier to answer first.
        if not self._close_called:
            self._next_broker()
        await super()._on_connection_close(closing)

    # aio-pika 9/10 call this (a name-mangled private method) for every reconnection
    # attempt; a failed attempt moves on to the next broker.
    async def _RobustConnection__connect_transport(self) -> None:
        try:
            await super()._RobustConnection__connect_transport()  # type: ignore[misc]
        except BaseException:
            self._next_broker()
            raise


async def _declare_webhook_queues(
    channel: AbstractChannel, settings: Settings, names: Names, exchange: AbstractExchange
) -> None:
    """Only when WEBHOOK_URLS is set: the events' queue, its retry tiers (dead-lettering
    back to it) and its dead-letter queue."""
    dead = await channel.declare_queue(
        names.webhook_dead_queue, durable=True, arguments=_queue_arguments(settings)
    )
    await dead.bind(exchange, WEBHOOK_DEAD_KEY)
    queue = await channel.declare_queue(
        names.webhook_queue, durable=True, arguments=_queue_arguments(settings)
    )
    await queue.bind(exchange, WEBHOOK_KEY)
    for tier in names.webhook_tiers:
        await _declare_tier(channel, settings, exchange, tier, WEBHOOK_KEY)


async def _declare_tier(
    channel: AbstractChannel,
    settings: Settings,
    exchange: AbstractExchange,
    tier: RetryTier,
    back_to: str,
) -> None:
    """A delay queue: what waits in it ``tier.delay`` seconds dead-letters back to
    ``exchange`` under the routing key ``back_to`` (with quorum queues at-least-once)."""
    tier_args = _queue_arguments(
        settings,
        **{
            "x-message-ttl": round(tier.delay * 1000),
            "x-dead-letter-exchange": exchange.name,
            "x-dead-letter-routing-key": back_to,
        },
    )
    if settings.queue_type == "quorum":
        tier_args["x-dead-letter-strategy"] = "at-least-once"
        tier_args["x-overflow"] = "reject-publish"
    queue = await channel.declare_queue(tier.queue, durable=True, arguments=tier_args)
    await queue.bind(exchange, tier.routing_key)


async def connect(settings: Settings, name: str) -> AbstractRobustConnection:
    """Open a robust connection to the first broker of ``AMQP_URL`` that answers (each
    attempt bounded by ``CONNECT_TIMEOUT``); it fails over to the others later on."""
    urls = settings.amqp_urls
    failures: list[str] = []
    for url in urls:
        try:
            connection = FailoverConnection(
                yarl.URL(url),
                urls=urls,
                reconnect_interval=RECONNECT_INTERVAL,
                client_properties={"connection_name": name},
            )
            await asyncio.wait_for(
                connection.connect(timeout=settings.connect_timeout),
                timeout=settings.connect_timeout + 1,
            )
            return connection
        except CONNECT_ERRORS as exc:
            await _close_quietly(connection)
            if refused := _refusal(exc, settings):
                raise BrokerRefused(refused) from exc
            failures.append(f"{redact_url(url)}: {type(exc).__name__}: {exc}")
    raise BrokerUnavailable(f"cannot connect to RabbitMQ at {'; '.join(failures)}")


def _refusal(exc: BaseException, settings: Settings) -> str | None:
    """What RabbitMQ refused, when the failure is a settings fault rather than an outage."""
    where = settings.amqp_url_redacted
    if isinstance(
        exc, aiormq.exceptions.ProbableAuthenticationError | aiormq.exceptions.AuthenticationError
    ):
        return (
            f"RABBITMQ LOGIN REFUSED by {where}: the user name or password in AMQP_URL is "
            f"wrong (a settings fault, not an outage; RabbitMQ said: {exc})"
        )
    if isinstance(exc, aiormq.exceptions.ConnectionNotAllowed) or (
        # aiormq reports a refused Connection.Open (an unknown virtual host, or one the
        # user may not use) as an unexpected frame.
        isinstance(exc, aiormq.exceptions.InvalidFrameError) and "Connection.Close" in str(exc)
    ):
        return (
            f"RabbitMQ at {where} refused the virtual host in AMQP_URL: it does not exist, "
            "or the user may not use it (a settings fault, not an outage)"
        )
    return None


def message_properties(
    message_id: str,
    headers: Mapping[str, Any] | None = None,
    expiration: float | None = None,
) -> Basic.Properties:
    """The properties of a queue message: JSON, persistent, ``expiration`` in seconds.

    The same as ``aio_pika.Message(..., content_type="application/json",
    delivery_mode=PERSISTENT, ...).properties`` gives, made directly: aio-pika's message
    object (its checked attributes, then the properties built from them, pamqp's included)
    was 3.5% of the server's GIL samples with a new connection per request."""
    return Basic.Properties(
        content_type="application/json",
        headers=dict(headers or {}),
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT.value,
        priority=0,
        expiration=None if expiration is None else str(int(expiration * 1000)),
        message_id=message_id,
    )


async def publish_unwaited(
    channel: AbstractChannel,
    exchange: str,
    body: bytes,
    properties: Basic.Properties,
    routing_key: str,
) -> Any:
    """What aio-pika's ``Exchange.publish(message, routing_key, mandatory=True)`` does on
    ``channel``, to the exchange named ``exchange``
    (its confirm, a ``DeliveryError`` on a nack, the message when it comes back
    unroutable), except that the channel's lock is not held until the connection's
    writer task has written the frame (aiormq's ``wait``): only while the frame is queued.
    Held until written, it lets one publish through per three turns of the event loop
    (the lock passed on, the frame written, its writer's wake-up), so concurrent requests
    queued behind it for their confirm; the confirm is what each waits for anyway (see
    also WRITE_QUEUE_FRAMES)."""
    if channel.is_closed:
        raise aiormq.exceptions.ChannelInvalidStateError(f"{channel!r} closed")
    underlay = cast(aiormq.Channel, await channel.get_underlay_channel())  # ABC lacks `wait`
    return await underlay.basic_publish(
        body,
        exchange=exchange,
        routing_key=routing_key,
        properties=properties,
        mandatory=True,
        wait=False,
    )


class Broker:
    """A confirmed publisher over one robust connection.

    :meth:`start` returns at once; the connection is made in the background and retried
    until it succeeds, so a process can start before RabbitMQ does. :meth:`publish` waits
    for the first attempt (within ``PUBLISH_TIMEOUT``); whenever there is no connection
    after that, it raises :class:`BrokerUnavailable` at once.
    """

    def __init__(
        self, settings: Settings, name: str, max_unconfirmed: int = WRITE_QUEUE_FRAMES
    ) -> None:
        """``max_unconfirmed``: publishes written and not yet confirmed, at most; one
        more waits (within PUBLISH_TIMEOUT) for one of them to end. Nothing waits for the
        socket's write buffer (:func:`publish_unwaited`), so this bounds what it can hold
        while RabbitMQ does not read (a memory or disk alarm blocks publishers)."""
        self.settings = settings
        self.name = name
        self._unconfirmed = asyncio.Semaphore(max_unconfirmed)
        self.max_unconfirmed = max_unconfirmed
        self.connection: AbstractRobustConnection | None = None
        self.channel: AbstractChannel | None = None
        self.topology: Topology | None = None
        self._connected = asyncio.Event()
        self._first_attempt = asyncio.Event()  # set once the first attempt ended, either way
        self._closing = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._renewal: asyncio.Task[None] | None = None
        self._renewed_at = -RENEW_INTERVAL
        self._retiring: set[asyncio.Task[None]] = set()

    @property
    def is_ready(self) -> bool:
        return (
            self.connection is not None
            and not self.connection.is_closed
            and self.channel is not None
            and not self.channel.is_closed
        )

    @property
    def starting(self) -> bool:
        """Started, and the first attempt to connect is still under way. (After it, a
        connection that is down means RabbitMQ is away: publishing does not wait then.)"""
        return (
            self._task is not None
            and not self._first_attempt.is_set()
            and not self._closing.is_set()
        )

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._connect_forever(), name=f"{self.name}-connect")

    async def wait_connected(self) -> None:
        """Return once the first connection is up (bound it with a timeout if needed)."""
        await self._connected.wait()

    async def _connect_forever(self) -> None:
        delay = FIRST_RETRY
        while not self._closing.is_set():
            try:
                await self._connect_once()
            except BrokerUnavailable as exc:
                self._first_attempt.set()
                # One line per attempt (configure_logging() drops aiormq's own).
                level = logging.ERROR if isinstance(exc, BrokerRefused) else logging.WARNING
                log.log(level, "%s; retrying in %.1fs", exc, delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closing.wait(), delay)
                delay = min(delay * 2, LAST_RETRY)
            else:
                log.info("connected to %s", self.settings.amqp_url_redacted)
                self._connected.set()
                self._first_attempt.set()
                return

    async def _connect_once(self) -> None:
        connection = await connect(self.settings, self.name)
        try:
            channel, topology = await self._open_publishing(connection)
        except AMQP_ERRORS as exc:
            await _close_quietly(connection)
            raise BrokerUnavailable(f"cannot set up the channel: {type(exc).__name__}") from exc
        self.connection, self.channel, self.topology = connection, channel, topology

    async def _open_publishing(
        self, connection: AbstractRobustConnection
    ) -> tuple[AbstractChannel, Topology]:
        """A channel with publisher confirms (a returned publish raises) on ``connection``,
        and the topology declared on it; each step bounded by CONNECT_TIMEOUT."""
        channel = await asyncio.wait_for(
            connection.channel(publisher_confirms=True, on_return_raises=True),
            self.settings.connect_timeout,
        )
        try:
            topology = await asyncio.wait_for(
                declare_topology(channel, self.settings), self.settings.connect_timeout
            )
        except AMQP_ERRORS:
            await _close_quietly(channel)
            raise
        return channel, topology

    async def publish(
        self,
        body: bytes,
        message_id: str,
        routing_key: str = SEND_KEY,
        headers: Mapping[str, Any] | None = None,
        expiration: float | None = None,
    ) -> None:
        """Publish a persistent message; return only after RabbitMQ confirmed it.

        While the first attempt to connect is under way (the process just started), wait
        for it: the whole, waiting included, takes at most ``PUBLISH_TIMEOUT``."""
        timeout = self.settings.publish_timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if not self.is_ready and self.starting:
            log.info("message %s: waiting up to %gs for RabbitMQ", message_id, timeout)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._first_attempt.wait(), timeout)
        if self.topology is None or not self.is_ready or loop.time() >= deadline:
            raise BrokerUnavailable("not connected to RabbitMQ")
        if self._unconfirmed.locked():
            try:
                await asyncio.wait_for(self._unconfirmed.acquire(), deadline - loop.time())
            except TimeoutError:
                raise BrokerUnavailable(
                    f"{self.max_unconfirmed} publishes are waiting for RabbitMQ's confirm"
                ) from None
        else:
            await self._unconfirmed.acquire()  # free: taken at once
        channel, topology = self.channel, self.topology
        if channel is None or topology is None or not self.is_ready or loop.time() >= deadline:
            self._unconfirmed.release()
            raise BrokerUnavailable("not connected to RabbitMQ")
        properties = message_properties(message_id, headers, expiration)
        publish = asyncio.ensure_future(
            publish_unwaited(channel, topology.exchange.name, body, properties, routing_key)
        )
        publish.add_done_callback(lambda _: self._unconfirmed.release())
        try:
            # Shielded: on a timeout the publish goes on, and its late outcome is reported.
            confirm = await asyncio.wait_for(asyncio.shield(publish), deadline - loop.time())
        except asyncio.CancelledError:
            # The channel closed under the publish and aio-pika cancelled it: that is a
            # broker failure, unless this request itself is being cancelled.
            task = asyncio.current_task()
            if publish.cancelled() and task is not None and not task.cancelling():
                raise BrokerUnavailable("publish cancelled: the channel closed") from None
            raise
        except TimeoutError:
            raise PublishUnconfirmed(
                f"RabbitMQ did not confirm within {timeout:g}s",
                _late_outcome(publish, message_id, LATE_CONFIRM_WAIT),
            ) from None
        except aio_pika.exceptions.DeliveryError as exc:
            self._renew_channel()
            raise BrokerUnavailable(f"RabbitMQ refused the message: {exc}") from exc
        except AMQP_ERRORS as exc:
            raise BrokerUnavailable(f"publish failed: {type(exc).__name__}: {exc}") from exc
        if not isinstance(confirm, Basic.Ack):
            raise BrokerUnavailable(f"RabbitMQ did not acknowledge the message: {confirm!r}")
        if routing_key == SEND_KEY:
            _PUBLISHED_SEND.inc()
        elif routing_key == DEAD_KEY:
            _PUBLISHED_DEAD.inc()
        else:
            _PUBLISHED_RETRY.inc()

    def _renew_channel(self) -> None:
        """Move publishing to a fresh channel, at most once every RENEW_INTERVAL.

        RabbitMQ keeps, per channel, the state of each quorum queue the channel publishes
        to. A channel opened while a queue was electing a new leader (the node that led it
        was killed) can go on being refused every publish to it although the queue has a
        leader again: seen with RabbitMQ 3.10, every publish nacked for minutes on a
        three-node cluster. A new channel starts from the queue's current leader. It also
        declares the topology again, in case a queue was deleted (a returned publish)."""
        loop = asyncio.get_running_loop()
        if (
            (self._renewal is not None and not self._renewal.done())
            or loop.time() - self._renewed_at < RENEW_INTERVAL
            or self._closing.is_set()
        ):
            return
        self._renewed_at = loop.time()
        self._renewal = asyncio.create_task(self._renew(), name=f"{self.name}-renew-channel")

    async def _renew(self) -> None:
        connection, old = self.connection, self.channel
        if connection is None or connection.is_closed:
            return
        try:
            channel, topology = await self._open_publishing(connection)
        except AMQP_ERRORS as exc:
            log.warning("RabbitMQ refuses publishes; a fresh channel failed too: %r", exc)
            return
        self.channel, self.topology = channel, topology
        log.warning("RabbitMQ refused publishes: publishing on a fresh channel from now on")
        if old is not None:
            retire = asyncio.create_task(self._retire(old), name=f"{self.name}-retire-channel")
            self._retiring.add(retire)
            retire.add_done_callback(self._retiring.discard)

    async def _retire(self, channel: AbstractChannel) -> None:
        """Close a replaced channel once the publishes still waiting on it had their
        PUBLISH_TIMEOUT to hear back (at once when the broker closes)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), self.settings.publish_timeout)
        await _close_quietly(channel)

    async def publish_many(
        self, messages: Sequence[tuple[bytes, str]]
    ) -> list[BrokerUnavailable | None]:
        """Publish ``(body, message_id)`` pairs at once, their confirms pipelined on the one
        channel; for each, in order, None once RabbitMQ confirmed it, else the
        :class:`BrokerUnavailable` (or :class:`PublishUnconfirmed`) :meth:`publish` raised.

        All the publishes start together and each is bounded by ``PUBLISH_TIMEOUT``, so the
        whole is too."""
        outcomes = await asyncio.gather(
            *(self.publish(body, message_id) for body, message_id in messages),
            return_exceptions=True,
        )
        results: list[BrokerUnavailable | None] = []
        for outcome in outcomes:
            if isinstance(outcome, BaseException) and not isinstance(outcome, BrokerUnavailable):
                raise outcome
            results.append(outcome)
        return results

    async def close(self) -> None:
        self._closing.set()
        # Let a fresh channel or a connection attempt under way finish (each step bounded
        # by CONNECT_TIMEOUT): cancelling aio-pika halfway through leaves its internal
        # tasks behind. A replaced channel being retired closes at once now.
        for task in (self._renewal, *self._retiring, self._task):
            if task is None:
                continue
            await asyncio.wait({task}, timeout=self.settings.connect_timeout + 2)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._task = None
        if self.connection is not None:
            await _close_quietly(self.connection)
            self.connection = None
        self._connected.clear()


LATE_CONFIRM_WAIT = 60.0  # seconds to keep waiting for a confirm that came too late


def _late_outcome(
    publish: asyncio.Future[Any], message_id: str, wait: float
) -> asyncio.Future[bool]:
    """Whether a publish that timed out was stored after all (bounded by ``wait``)."""

    async def outcome() -> bool:
        try:
            confirm = await asyncio.wait_for(publish, wait)
        except TimeoutError:
            log.error("message %s: no confirm from RabbitMQ after %gs either", message_id, wait)
            return False
        except CONNECT_ERRORS as exc:  # DeliveryError is an AMQPException too
            log.warning("message %s: not stored after all: %s", message_id, exc)
            return False
        stored = isinstance(confirm, Basic.Ack)
        verdict = "stored" if stored else "refused"
        log.warning("message %s: RabbitMQ %s it late", message_id, verdict)
        return stored

    return asyncio.ensure_future(outcome())


async def _close_quietly(closable: AbstractChannel | AbstractRobustConnection) -> None:
    """Close a connection or a channel within 5 s, whatever state it is in."""
    try:
        await asyncio.wait_for(closable.close(), 5)
    except AMQP_ERRORS as exc:
        log.debug("error while closing: %s", exc)
