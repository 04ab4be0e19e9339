"""The worker: consume the work queue, send each mail over SMTP, ack only after delivery.

``python worker.py`` runs it until SIGTERM or SIGINT, then stops taking messages,
finishes those in flight within ``SHUTDOWN_GRACE`` seconds and exits 0. A message the
worker cannot send is published to the dead-letter queue with the reason in its headers
(and only then acked); one it had no time to finish goes back to the queue, so an
accepted message is never lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from datetime import UTC, datetime

from aio_pika.abc import AbstractIncomingMessage, AbstractQueue

from broker import AMQP_ERRORS, DEAD_KEY, Broker, Names
from config import Settings
from errors import BrokerUnavailable, ConfigError, DeliveryError, InvalidMessage
from mailer import SmtpPool
from messages import MailJob

log = logging.getLogger(__name__)


class Worker:
    def __init__(self, settings: Settings) -> None:
        if settings.smtp_host is None:
            raise ConfigError(
                "SMTP_HOST", "not set; the worker needs an SMTP server to send through"
            )
        self.settings = settings
        self.broker = Broker(settings, "mailroom-worker")
        self.pool = SmtpPool(settings, settings.worker_concurrency)
        self.ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._inflight: set[asyncio.Task[None]] = set()

    def stop(self) -> None:
        """Ask :meth:`run` to drain and return (safe to call from a signal handler)."""
        self._stop.set()

    async def run(self) -> None:
        """Consume until :meth:`stop`; then drain in-flight sends and close everything."""
        await self.broker.start()
        try:
            if not await self._wait_connected():
                return
            queue = await self._consume_queue()
            tag = await queue.consume(self._on_message, no_ack=False)
            log.info(
                "worker: consuming %s (concurrency %d, SMTP %s:%d %s)",
                queue.name,
                self.settings.worker_concurrency,
                self.settings.smtp_host,
                self.settings.smtp_port,
                self.settings.smtp_security,
            )
            self.ready.set()
            await self._stop.wait()
            log.info("worker: stopping; %d message(s) in flight", len(self._inflight))
            with contextlib.suppress(*AMQP_ERRORS):
                await asyncio.wait_for(queue.cancel(tag), 5)
            await self._drain()
        finally:
            await self.pool.close()
            await self.broker.close()
            log.info("worker: stopped")

    async def _wait_connected(self) -> bool:
        connected = asyncio.ensure_future(self.broker.wait_connected())
        stopped = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait({connected, stopped}, return_when=asyncio.FIRST_COMPLETED)
        for fut in (connected, stopped):
            fut.cancel()
        return self.broker.is_ready

    async def _consume_queue(self) -> AbstractQueue:
        connection = self.broker.connection
        assert connection is not None
        channel = await asyncio.wait_for(
            connection.channel(publisher_confirms=False), self.settings.connect_timeout
        )
        await channel.set_qos(prefetch_count=self.settings.worker_concurrency)
        names = Names.for_prefix(self.settings.queue_prefix)
        return await channel.get_queue(names.send_queue, ensure=True)

    async def _drain(self) -> None:
        if not self._inflight:
            return
        grace = self.settings.shutdown_grace
        _, pending = await asyncio.wait(set(self._inflight), timeout=grace)
        if pending:
            log.warning(
                "worker: %d send(s) not finished after %gs; they return to the queue",
                len(pending),
                grace,
            )
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=5)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._inflight.add(task)
        try:
            await self._handle(message)
        finally:
            self._inflight.discard(task)

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        try:
            job = MailJob.from_bytes(message.body)
        except InvalidMessage as exc:
            log.error("message %s: cannot be decoded: %s", message.message_id, exc)
            await self._dead_letter(message, f"undecodable: {exc}", None)
            return
        log.info("message %s: sending to %d recipient(s)", job.id, len(job.to))
        try:
            result = await self.pool.send(job)
        except DeliveryError as exc:
            log.warning("message %s: delivery failed: %s", job.id, exc)
            await self._dead_letter(message, str(exc), exc.code)
            return
        if result.refused:
            log.warning(
                "message %s: sent to %d, refused for %s",
                job.id,
                len(result.accepted),
                ", ".join(f"{r} ({c} {t})" for r, (c, t) in result.refused.items()),
            )
        else:
            log.info("message %s: sent", job.id)
        await self._ack(message, job.id)

    async def _ack(self, message: AbstractIncomingMessage, job_id: str | None) -> None:
        try:
            await asyncio.wait_for(message.ack(), self.settings.publish_timeout)
        except AMQP_ERRORS as exc:
            log.warning(
                "message %s: ack failed (%s); RabbitMQ will deliver it again",
                job_id or message.message_id,
                type(exc).__name__,
            )

    async def _dead_letter(
        self, message: AbstractIncomingMessage, reason: str, code: int | None
    ) -> None:
        """Publish a copy to the dead-letter queue with the reason, then ack the original."""
        headers = dict(message.headers or {})
        headers["x-mailroom-error"] = reason[:1000]
        headers["x-mailroom-failed-at"] = datetime.now(UTC).isoformat(timespec="seconds")
        if code is not None:
            headers["x-mailroom-smtp-code"] = code
        message_id = message.message_id or ""
        try:
            await self.broker.publish(message.body, message_id, DEAD_KEY, headers)
        except BrokerUnavailable as exc:
            log.error("message %s: could not dead-letter (%s); rejecting it", message_id, exc)
            with contextlib.suppress(*AMQP_ERRORS):
                # The work queue dead-letters rejected messages to the same place.
                await asyncio.wait_for(message.reject(requeue=False), 5)
            return
        log.info("message %s: dead-lettered: %s", message_id, reason)
        await self._ack(message, message_id)


def main() -> int:
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"worker: configuration error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("aiormq").setLevel(logging.WARNING)
    logging.getLogger("aio_pika").setLevel(logging.WARNING)
    try:
        worker = Worker(settings)
    except ConfigError as exc:
        print(f"worker: configuration error: {exc}", file=sys.stderr)
        return 2

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.stop)
        await worker.run()

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
