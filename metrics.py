"""Prometheus metrics of the server and the worker, and the worker's small HTTP endpoint.

Every metric is a module-level object of the default registry, so that counting is one
``inc()`` or ``observe()`` (no lookup, no await). The server exposes them at
``GET /metrics``; each worker on ``WORKER_METRICS_HOST:WORKER_METRICS_PORT`` (with
``/healthz``). When several server processes share a port (``launcher.py --servers N``)
each writes its values to ``PROMETHEUS_MULTIPROC_DIR`` (prometheus-client's multiprocess
mode) and any of them answers with the sum.

Queue depths are not counted: :class:`QueueDepths` asks RabbitMQ (a passive declare of
each queue, on a channel of the server's connection) at most once per ``DEPTH_CACHE``
seconds, only when someone asks (a scrape, ``GET /api/stats``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

from aio_pika.abc import AbstractRobustConnection
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from broker import AMQP_ERRORS, Names
from guard import bearer_token, is_loopback

log = logging.getLogger(__name__)

CONTENT_TYPE = CONTENT_TYPE_LATEST
DEPTH_CACHE = 5.0  # seconds a reading of the queue depths is reused
DEPTH_TIMEOUT = 3.0  # seconds to read them

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_DELIVERY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600, 14400)

# -- the server ------------------------------------------------------------------------

ACCEPTED = Counter("mailroom_messages_accepted", "Messages accepted (RabbitMQ confirmed them).")
REFUSED = Counter(
    "mailroom_messages_refused",
    "Send requests refused, by reason.",
    ["reason"],
)
ACCEPT_SECONDS = Histogram(
    "mailroom_accept_seconds",
    "Time to answer a send request that was accepted.",
    buckets=_LATENCY_BUCKETS,
)
# Where an accepted request's time goes: its wait for RabbitMQ's confirm, then for the
# commit of its record (a batch request: once each for all its items).
ACCEPT_WAIT_SECONDS = Histogram(
    "mailroom_accept_wait_seconds",
    "Time an accepted send request waited, by step: confirm (RabbitMQ) or record (database).",
    ["step"],
    buckets=_LATENCY_BUCKETS,
)
CONFIRM_WAIT = ACCEPT_WAIT_SECONDS.labels(step="confirm")
RECORD_WAIT = ACCEPT_WAIT_SECONDS.labels(step="record")
# Refusal reasons by HTTP status (a send request answered with it).
REFUSAL_REASONS = {
    400: "invalid",
    401: "unauthorized",
    409: "idempotency_conflict",
    413: "too_large",
    415: "not_json",
    422: "idempotency_conflict",
    429: "rate_limited",
    503: "unavailable",
}
_REFUSED = {status: REFUSED.labels(reason) for status, reason in REFUSAL_REASONS.items()}
_REFUSED_OTHER = REFUSED.labels("other")

# mailroom_messages_published{queue} is counted in broker.py (Broker.publish).

# -- the worker ------------------------------------------------------------------------

SENT = Counter("mailroom_messages_sent", "Messages every recipient accepted.")
DEFERRED = Counter(
    "mailroom_messages_deferred",
    "Attempts that ended in a temporary failure (4xx, connection trouble).",
)
RETRIED = Counter("mailroom_messages_retried", "Messages handed to a retry tier.")
FAILED = Counter(
    "mailroom_messages_failed",
    "Messages that ended failed or partial, by reason class.",
    ["reason"],
)
DEAD_LETTERED = Counter("mailroom_messages_dead_lettered", "Messages put in the dead-letter queue.")
SMTP_SECONDS = Histogram(
    "mailroom_smtp_transaction_seconds",
    "Time to send one message over SMTP (connection from the pool included).",
    buckets=_LATENCY_BUCKETS,
)
DELIVERY_SECONDS = Histogram(
    "mailroom_accept_to_sent_seconds",
    "Time from a message's acceptance to its last recipient's acceptance.",
    buckets=_DELIVERY_BUCKETS,
)
SMTP_CONNECTIONS = Gauge(
    "mailroom_smtp_connections_open",
    "SMTP connections this worker has open (in use or idle).",
    multiprocess_mode="livesum",
)
IN_FLIGHT = Gauge(
    "mailroom_messages_in_flight",
    "Messages this worker is handling now.",
    multiprocess_mode="livesum",
)


# Why a message ended failed or partial (the worker counts each under one of these).
FAIL_REASONS = (
    "permanent",  # a 5xx answer to the whole message
    "refused",  # 5xx for recipients, none or only some accepted it
    "retries_exhausted",  # still deferred after the last retry tier
    "delivery_limit",  # attempts without an outcome (the worker crashed on it)
    "undecodable",  # not a message Mailroom can read
    "internal",  # a bug: see the worker's log
)
for _reason in FAIL_REASONS:
    FAILED.labels(_reason)


def refused(status: int) -> None:
    _REFUSED.get(status, _REFUSED_OTHER).inc()


# -- exposition ------------------------------------------------------------------------


class _Fixed(Collector):
    """Metric families computed before the scrape (the queue depths)."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self.families


def render(multiproc_dir: Path | None, extra: Iterable[Metric] = ()) -> bytes:
    """The text exposition of this process (or, with ``multiproc_dir``, of every process
    counting there), plus ``extra``."""
    if multiproc_dir is not None:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, str(multiproc_dir))  # type: ignore[no-untyped-call]
        body = generate_latest(registry)
    else:
        body = generate_latest(REGISTRY)
    families = list(extra)
    if families:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Fixed(families))
        body += generate_latest(registry)
    return body


class QueueDepths:
    """Messages ready in the work, retry and dead-letter queues, read at most once per
    ``DEPTH_CACHE`` seconds (concurrent callers share one reading)."""

    def __init__(self, names: Names, connection: Callable[[], AbstractRobustConnection | None]):
        self.names = names
        self._connection = connection
        self._reading: asyncio.Future[dict[str, int]] | None = None
        self._at = -DEPTH_CACHE
        self._last: dict[str, int] = {}

    def kinds(self) -> dict[str, str]:
        """Queue name -> kind (send, retry, dead)."""
        kinds = {self.names.send_queue: "send", self.names.dead_queue: "dead"}
        kinds.update({t.queue: "retry" for t in self.names.retry_tiers})
        return kinds

    async def read(self) -> dict[str, int]:
        """Queue name -> ready messages; {} when RabbitMQ cannot be asked."""
        loop = asyncio.get_running_loop()
        if loop.time() - self._at < DEPTH_CACHE:
            return self._last
        if self._reading is None:
            self._reading = asyncio.ensure_future(self._read())
        reading = self._reading
        try:
            return await asyncio.shield(reading)
        finally:
            if reading.done() and self._reading is reading:
                self._reading = None

    async def _read(self) -> dict[str, int]:
        connection = self._connection()
        depths: dict[str, int] = {}
        if connection is None or connection.is_closed:
            return depths
        try:
            async with asyncio.timeout(DEPTH_TIMEOUT):
                channel = await connection.channel(publisher_confirms=False)
                try:
                    for queue in self.kinds():
                        declared = await channel.declare_queue(queue, passive=True)
                        count = declared.declaration_result.message_count
                        depths[queue] = count or 0
                finally:
                    with contextlib.suppress(*AMQP_ERRORS):
                        await channel.close()
        except AMQP_ERRORS as exc:
            log.warning("could not read the queue depths: %s", type(exc).__name__)
            return depths
        self._last, self._at = depths, asyncio.get_running_loop().time()
        return depths

    async def families(self) -> list[Metric]:
        depths = await self.read()
        family = GaugeMetricFamily(
            "mailroom_queue_messages",
            "Messages ready in a queue (read from RabbitMQ at most every 5 s).",
            labels=["queue", "kind"],
        )
        kinds = self.kinds()
        for queue, count in depths.items():
            family.add_metric([queue, kinds[queue]], count)
        return [family]


# -- the worker's endpoint -------------------------------------------------------------

MAX_HEAD = 8192


class WorkerEndpoint:
    """``GET /metrics`` and ``GET /healthz`` of one worker, on a port of its own.

    ``/healthz`` answers 200 while ``healthy()`` holds (the worker consumes), else 503:
    what a process manager or a load balancer probes. ``/metrics`` needs a token of
    ``API_TOKEN`` (or a direct loopback client with ``ALLOW_LOOPBACK``) unless ``public``.
    """

    def __init__(
        self,
        host: str,
        port: int,
        healthy: Callable[[], str | None],
        authorized: Callable[[str, str | None], bool],
    ) -> None:
        self.host, self.port = host, port
        self.healthy = healthy
        self.authorized = authorized
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._client, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("metrics and health on http://%s:%d/metrics, /healthz", self.host, self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 5)
            self._server = None

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                head = await reader.readuntil(b"\r\n\r\n")
            status, ctype, body = await self._answer(head, writer)
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _answer(self, head: bytes, writer: asyncio.StreamWriter) -> tuple[str, str, bytes]:
        lines = head.decode("latin-1").split("\r\n")
        method, _, rest = lines[0].partition(" ")
        path = rest.partition(" ")[0].partition("?")[0]
        headers = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(":") for line in lines[1:] if line)
        }
        text = "text/plain; charset=utf-8"
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", text, b"GET only\n"
        if path == "/healthz":
            problem = self.healthy()
            if problem is None:
                return "200 OK", text, b"ok\n"
            return "503 Service Unavailable", text, f"unhealthy: {problem}\n".encode()
        if path == "/metrics":
            peer = writer.get_extra_info("peername")
            address = peer[0] if isinstance(peer, tuple) else ""
            token = bearer_token(headers.get("authorization"))
            if not self.authorized(address, token):
                return "401 Unauthorized", text, b"A token is required.\n"
            return "200 OK", CONTENT_TYPE, render(None)
        return "404 Not Found", text, b"/metrics or /healthz\n"


def loopback_or_token(
    public: bool, allow_loopback: bool, token_ok: Callable[[str | None], bool]
) -> Callable[[str, str | None], bool]:
    """Who may read a worker's metrics: anyone when ``public``, else a token holder, or a
    direct loopback client when ``allow_loopback``."""

    def authorized(address: str, token: str | None) -> bool:
        return public or token_ok(token) or (allow_loopback and is_loopback(address))

    return authorized
