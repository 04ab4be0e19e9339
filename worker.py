"""The worker: consume the work queue, send each mail over SMTP, ack only after delivery.

``python worker.py`` runs until SIGTERM or SIGINT, then stops taking messages, finishes
those in flight within ``SHUTDOWN_GRACE`` seconds and exits 0.

For each message: a record that already says ``sent`` is acked without sending again;
otherwise the attempt is recorded, the mail is sent to the recipients that have not
accepted it yet, the outcome is recorded, and only then is the message acked, after

* a transient failure: a copy goes to the next retry tier (a queue whose TTL returns it
  to the work queue after ``RETRY_DELAYS[n]`` seconds, less up to 10% jitter); after the
  last tier the message is ``failed`` and dead-lettered;
* a permanent failure or an undecodable message: a copy goes to the dead-letter queue
  with the reason in its headers;
* a refused SMTP login (a configuration fault): a retry that does not count against the
  message, so a wrong password never burns messages to ``failed``.

A message the worker had no time to finish goes back to the queue, so nothing accepted
is lost; see the README on the at-least-once window.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import random
import re
import signal
import socket
import sys
import time
import uuid
from collections.abc import Coroutine
from datetime import datetime, timedelta
from typing import Any, Literal

import uvloop
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

import metrics
from acks import Acks
from broker import AMQP_ERRORS, COPY_HEADER, DEAD_KEY, SCHEDULE_DUE, Broker, Names
from config import Settings, configure_gc, configure_logging, flush_logging
from errors import (
    BrokerUnavailable,
    ConfigError,
    DeliveryError,
    InvalidMessage,
    PermanentDeliveryError,
    SmtpAuthError,
    SmtpConfigError,
)
from guard import token_matches
from mailer import SendResult, SmtpPool
from messages import MailJob, suppression_key
from store import FINAL, Attempt, Claim, RecipientResult, Store, StoreUnavailable, now_utc
from webhooks import Event, WebhookSender, event_body, publish_event

log = logging.getLogger(__name__)

RETRIES_HEADER = "x-mailroom-retries"  # transient failures so far
SENT_HEADER = "x-mailroom-sent"  # recipients that accepted it already (comma-separated)
CONFIG_FAULTS_HEADER = "x-mailroom-config-faults"  # refused logins so far (never fatal)
# Final, but not sent to everyone: dead-lettered, and put there again if a copy comes back.
DEAD_LETTERED = frozenset({"failed", "partial"})
JITTER = 0.1
CONFIG_FAULT_MAX_WAIT = 600.0  # seconds: the longest retry tier used for settings faults
LEASE_POLL = 0.5  # seconds between looks at a record whose attempt another worker holds
# Seconds its writer waits for more claims and outcomes (Store.open). 15 ms rather than 5:
# the worker's CPU per mail 12-13% lower with a new connection per request (fewer mails
# come per second, so each commit had fewer), 5-8% with keep-alive clients (bench A/B).
WRITE_LINGER = 0.015


class Worker:
    def __init__(self, settings: Settings) -> None:
        if settings.smtp_host is None and not settings.sandbox:
            raise ConfigError(
                "SMTP_HOST", "not set; the worker needs an SMTP server to send through"
            )
        self.settings = settings
        self.names = Names.of(settings)
        self.broker = Broker(settings, "mailroom-worker")
        # In the sandbox the pool is never used (nothing is handed to SMTP).
        pool_settings = settings
        if settings.smtp_host is None:
            pool_settings = dataclasses.replace(settings, smtp_host="sandbox.invalid")
        self.pool = SmtpPool(pool_settings, settings.worker_concurrency)
        # The suppression list, read every SUPPRESSION_REFRESH seconds (never per mail).
        self._suppressed: frozenset[str] = frozenset()
        self.webhooks = WebhookSender(settings, self.broker) if settings.webhook_urls else None
        self.store: Store | None = None
        self.ready = asyncio.Event()
        # Who holds an attempt: this process, told apart from any other on any host.
        self._host = socket.gethostname()
        self.owner = f"{self._host}/{os.getpid()}/{uuid.uuid4().hex[:8]}"
        self._stop = asyncio.Event()
        self._inflight: set[asyncio.Task[Any]] = set()
        # The attempts running here, by message id: a redelivered copy waits for them.
        self._running: dict[str, asyncio.Task[Any]] = {}
        self._attempts: dict[str, Attempt] = {}
        self._consuming: AbstractChannel | None = None
        self.acks = Acks()  # coalesced: one basic.ack for the deliveries settled together
        self.endpoint: metrics.WorkerEndpoint | None = None
        if settings.worker_metrics_port is not None:
            tokens = [t.get().encode() for t in settings.api_tokens]
            self.endpoint = metrics.WorkerEndpoint(
                settings.worker_metrics_host,
                settings.worker_metrics_port,
                self.health_problem,
                metrics.loopback_or_token(
                    settings.metrics_public,
                    settings.allow_loopback,
                    lambda token: token_matches(tokens, token),
                ),
            )
        metrics.SMTP_CONNECTIONS.set_function(lambda: self.pool.connections_open)
        metrics.IN_FLIGHT.set_function(lambda: self.in_flight)

    @property
    def in_flight(self) -> int:
        """Messages this worker holds now (taken from RabbitMQ, not yet settled)."""
        return len(self._inflight)

    def health_problem(self) -> str | None:
        """Why this worker cannot consume now, or None (what ``GET /healthz`` reports)."""
        if self.store is not None and self.store.lost is not None:
            return self.store.lost
        if self._stop.is_set():
            return "stopping"
        if not self.ready.is_set():
            return "starting"
        if not self.broker.is_ready or self._consuming is None or self._consuming.is_closed:
            return "no connection to RabbitMQ"
        return None

    def stop(self) -> None:
        """Ask :meth:`run` to drain and return (safe to call from a signal handler)."""
        self._stop.set()

    async def run(self) -> None:
        """Consume until :meth:`stop`; then drain in-flight sends and close everything."""
        helo_name = await self.pool.helo_name()
        if "." not in helo_name:
            log.warning(
                "the SMTP EHLO name %r has no dot: many SMTP servers refuse such a name; "
                "set SMTP_HELO_NAME to this host's fully qualified name",
                helo_name,
            )
        self.store = await Store.open(self.settings, linger=WRITE_LINGER)
        if self.endpoint is not None:
            await self.endpoint.start()
        await self.broker.start()
        renewer = asyncio.create_task(self._renew_leases(), name="renew-leases")
        refresher = asyncio.create_task(self._refresh_suppressions(), name="suppressions")
        try:
            if not await self._wait_connected():
                return
            if self.webhooks is not None:
                assert self.broker.connection is not None
                await self.webhooks.start(self.broker.connection)
            queue = await self._consume_queue()
            # A consumer priority other than 0 only when set: RabbitMQ then hands this
            # worker messages only while every worker of a higher priority is full.
            priority = self.settings.worker_priority
            arguments: dict[str, Any] | None = {"x-priority": priority} if priority else None
            tag = await queue.consume(self._on_message, no_ack=False, arguments=arguments)
            log.info(
                "consuming %s (concurrency %d, prefetch %d, priority %d, SMTP %s:%d %s, EHLO %s)",
                queue.name,
                self.settings.worker_concurrency,
                self.settings.worker_prefetch,
                priority,
                self.settings.smtp_host,
                self.settings.smtp_port,
                self.settings.smtp_security,
                helo_name,
            )
            self.ready.set()
            lost = await self._wait_stop_or_database_lost()
            # (Database lost: the claimed messages still waiting for a connection go back
            # to the queue too; their outcomes could not be recorded.)
            self._stop.set()
            log.info("stopping; %d message(s) in flight", len(self._inflight))
            with contextlib.suppress(*AMQP_ERRORS):
                await asyncio.wait_for(queue.cancel(tag), 5)
            await self._drain()
            if lost is not None:
                # Loudly (exit 1): a process manager restarting us finds out why at once.
                raise StoreUnavailable(f"{lost}; stopped taking messages")
        finally:
            for task in (renewer, refresher):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await self.pool.close()
            if self.webhooks is not None:
                await self.webhooks.close()
            await self.broker.close()
            await self.store.close()
            if self.endpoint is not None:
                await self.endpoint.close()
            log.info("stopped")

    async def _wait_stop_or_database_lost(self) -> str | None:
        """Until :meth:`stop`, or until the SQLite file was removed or replaced (then why)."""
        assert self.store is not None
        await _first_of(self._stop.wait(), self.store.wait_lost())
        return self.store.lost

    async def _wait_connected(self) -> bool:
        await _first_of(self.broker.wait_connected(), self._stop.wait())
        return self.broker.is_ready

    async def _consume_queue(self) -> AbstractQueue:
        connection = self.broker.connection
        assert connection is not None
        channel = await asyncio.wait_for(
            connection.channel(publisher_confirms=False), self.settings.connect_timeout
        )
        await channel.set_qos(prefetch_count=self.settings.worker_prefetch)
        self._consuming = channel
        return await channel.get_queue(self.names.send_queue, ensure=True)

    async def _drain(self) -> None:
        if not self._inflight:
            return
        grace = self.settings.shutdown_grace
        _, pending = await asyncio.wait(set(self._inflight), timeout=grace)
        if pending:
            log.warning(
                "%d send(s) not finished after %gs; they return to the queue",
                len(pending),
                grace,
            )
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=5)

    async def _renew_leases(self) -> None:
        """Keep the leases of long attempts alive, in one write for all of them."""
        lease = self.settings.attempt_lease
        while True:
            await asyncio.sleep(lease / 3)
            assert self.store is not None
            try:
                await self.store.renew(list(self._attempts.values()), lease)
            except StoreUnavailable as exc:
                log.error(
                    "could not renew the leases of %d attempt(s): %s", len(self._attempts), exc
                )

    async def _refresh_suppressions(self) -> None:
        """Keep the cached suppression list at most SUPPRESSION_REFRESH seconds old."""
        assert self.store is not None
        while True:
            try:
                self._suppressed = await self.store.suppressed_addresses()
            except StoreUnavailable as exc:
                log.error("could not read the suppression list: %s", exc)
            await asyncio.sleep(self.settings.suppression_refresh)

    def _owner_alive(self, owner: str) -> bool:
        """False only when ``owner`` is known dead: a process of this host that is gone."""
        host, _, rest = owner.partition("/")
        pid_text = rest.partition("/")[0]
        if host != self._host or not pid_text.isdigit() or owner == self.owner:
            return True
        try:
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        # aio-pika cancels its consumer callbacks when the channel dies. A send the SMTP
        # server already accepted must still be recorded, or the redelivery would send it
        # again: so the work runs in a task of our own, shielded from that cancellation.
        self.acks.delivered(message)
        task = asyncio.create_task(self._handle_safely(message))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)
        await asyncio.shield(task)

    # -- one message ---------------------------------------------------------------------

    async def _handle_safely(self, message: AbstractIncomingMessage) -> None:
        """The edge: a bug must not leave a message unacked (holding a prefetch slot)
        forever, nor crash the consumer; the message goes to the dead-letter queue with the
        error, for an operator to look at and re-queue."""
        try:
            await self._handle(message)
        except Exception as exc:  # the edge: reported and dead-lettered, never swallowed
            log.exception("message %s: internal error", message.message_id)
            metrics.FAILED.labels("internal").inc()
            await self._dead_letter(message, f"internal error: {type(exc).__name__}: {exc}", None)

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        try:
            job = MailJob.from_bytes(message.body)
        except InvalidMessage as exc:
            log.error("message %s: cannot be decoded: %s", message.message_id, exc)
            metrics.FAILED.labels("undecodable").inc()
            await self._dead_letter(message, f"undecodable: {exc}", None)
            return
        # A copy redelivered while an attempt at it still runs here (the channel died
        # under it) waits for that attempt's outcome instead of sending alongside it.
        while (running := self._running.get(job.id)) is not None:
            log.info("message %s: an attempt is still running here; waiting for it", job.id)
            await asyncio.wait({running})
        self._running[job.id] = asyncio.current_task()  # type: ignore[assignment]
        try:
            await self._handle_job(message, job)
        finally:
            self._running.pop(job.id, None)
            self._attempts.pop(job.id, None)

    async def _claim(
        self, message: AbstractIncomingMessage, job: MailJob, copy: int
    ) -> Claim | None:
        """Claim the next attempt for queue copy ``copy``; wait while another live worker
        holds one. The claim does not wait for an SMTP connection (:meth:`_send` does): the
        claims of all the messages the worker holds go into the same few commits. None
        when the message went back: to a retry tier (the database is unavailable) or,
        when the worker is stopping, to the queue unsent."""
        assert self.store is not None
        while True:
            if self._stop.is_set():
                log.info("message %s: stopping before its send; back to the queue", job.id)
                await self._settle_delivery(message, job.id, "nack")
                return None
            try:
                claim = await self.store.claim(
                    job, self.owner, copy, self.settings.attempt_lease, self._owner_alive
                )
            except StoreUnavailable as exc:
                log.error("message %s: database unavailable (%s); retrying later", job.id, exc)
                await self._to_retry_tier(message, job, 0, dict(message.headers or {}))
                return None
            if claim.kind != "busy":
                return claim
            until = claim.record.lease_until
            wait = (until - now_utc()).total_seconds() if until else 0.0
            log.info(
                "message %s: attempt %d is held by %s; waiting for its outcome",
                job.id,
                claim.record.attempts,
                claim.record.owner,
            )
            await asyncio.sleep(min(max(wait, 0.05), LEASE_POLL))

    async def _handle_job(self, message: AbstractIncomingMessage, job: MailJob) -> None:
        if job.send_at is not None:
            due = job.due_at()
            assert due is not None
            remaining = (due - now_utc()).total_seconds()
            if remaining > SCHEDULE_DUE:
                await self._wait_more(message, job, remaining)
                return
        await self._attempt(message, job, _int_header(message.headers or {}, COPY_HEADER))

    async def _attempt(self, message: AbstractIncomingMessage, job: MailJob, copy: int) -> None:
        claim = await self._claim(message, job, copy)
        if claim is None:
            return
        record = claim.record
        if claim.kind == "stale":
            log.info(
                "message %s: copy %d is superseded by copy %d; dropping it",
                job.id,
                copy,
                record.copy,
            )
            await self._ack(message, job.id)
            return
        if record.status in DEAD_LETTERED:
            # Failed (or partly sent), but it may not have reached the dead-letter queue
            # (the connection died in between): put it there (again) rather than drop it.
            log.info("message %s: already %s; dead-lettering it", job.id, record.status)
            sent = {a for a, r in record.results.items() if r.status == "sent"}
            reason = record.last_error or record.status
            await self._dead_letter(message, reason, record.last_error_code, sent)
            return
        if claim.kind == "final":
            log.info("message %s: already %s; acking without sending", job.id, record.status)
            await self._ack(message, job.id)
            return
        assert claim.attempt is not None
        attempt = claim.attempt
        self._attempts[job.id] = attempt
        unfinished = record.unfinished_attempts()
        if message.redelivered and unfinished > self.settings.delivery_limit:
            # Started again and again without an outcome: something (a crash, an OOM kill)
            # stops the worker on this message. Classic queues have no delivery limit.
            reason = f"{unfinished} attempts without an outcome; the worker may crash on it"
            await self._fail(message, attempt, reason, None, {}, "delivery_limit")
            return
        # Recipients that accepted it, carried on the retry copy in case the record could
        # not say so (the database failed then): never sent to twice.
        sent_before = set(_list_header(message.headers or {}, SENT_HEADER))
        pending = [a for a in record.pending() if a not in sent_before]
        if not pending:
            # Nothing left to send (every recipient accepted or refused it already).
            log.info("message %s: no recipient left to send to", job.id)
            await self._settle(message, attempt, SendResult(()), record.results, sent_before)
            return
        # Suppressed and simulator recipients, and everyone in the sandbox: never SMTP.
        # (O(1) checks per recipient, no database: the suppression set is a cache.)
        if (
            self._suppressed
            or self.settings.sandbox
            or any(a.endswith(SIMULATOR_SUFFIX) for a in pending)
        ):
            skipped = {
                a: RecipientResult("suppressed", None, "on the suppression list")
                for a in pending
                if _suppression_key(a) in self._suppressed
            }
            simulated = [a for a in pending if a not in skipped and a.endswith(SIMULATOR_SUFFIX)]
            real = [a for a in pending if a not in skipped and not a.endswith(SIMULATOR_SUFFIX)]
            await self._settle(
                message,
                attempt,
                _simulate(simulated, real if self.settings.sandbox else []),
                record.results,
                sent_before,
                skipped,
                detail="sandbox: not handed to SMTP" if self.settings.sandbox else None,
                then=None if self.settings.sandbox or not real else (job, real),
            )
            return
        log.debug(
            "message %s: attempt %d, sending to %d recipient(s)",
            job.id,
            record.attempts,
            len(pending),
        )
        result = await self._send(message, attempt, job, pending)
        if result is None:
            return
        await self._settle(message, attempt, result, record.results, sent_before)

    async def _send(
        self,
        message: AbstractIncomingMessage,
        attempt: Attempt,
        job: MailJob,
        recipients: list[str],
    ) -> SendResult | None:
        """Send over SMTP once one of the pool's turns is free (given back once the SMTP
        server answered); None when it failed, the failure already recorded (a settings
        fault, failed, or a retry), or when the worker stopped before its turn came: the
        claim is then handed back and the message goes back to the queue unsent."""
        turn = self.pool.turn()
        if not await turn.acquire(unless=self._stop):
            await self._hand_back(message, attempt)
            return None
        started = time.perf_counter()
        try:
            try:
                return await self.pool.send(job, recipients, turn)
            finally:
                metrics.SMTP_SECONDS.observe(time.perf_counter() - started)
        except SmtpConfigError as exc:
            await self._config_fault(message, attempt, exc)
        except PermanentDeliveryError as exc:
            await self._fail(message, attempt, exc.reason, exc.code, {})
        except DeliveryError as exc:
            await self._retry_or_fail(message, attempt, exc.reason, exc.code, {})
        return None

    async def _hand_back(self, message: AbstractIncomingMessage, attempt: Attempt) -> None:
        """Nothing was sent: the record as before the claim, the message back to the queue."""
        assert self.store is not None
        job_id = attempt.message_id
        try:
            await self.store.hand_back(attempt)
        except StoreUnavailable as exc:
            # Its lease runs out instead (or, on this host, the next delivery sees that
            # this process is gone) and the next delivery takes the message over.
            log.error("message %s: could not hand attempt %d back: %s", job_id, attempt.number, exc)
        log.info("message %s: stopping before its send; claim handed back, to the queue", job_id)
        await self._settle_delivery(message, job_id, "nack")

    async def _settle(
        self,
        message: AbstractIncomingMessage,
        attempt: Attempt,
        result: SendResult,
        before: dict[str, RecipientResult],
        sent_before: set[str],
        skipped: dict[str, RecipientResult] | None = None,
        detail: str | None = None,
        then: tuple[MailJob, list[str]] | None = None,
    ) -> None:
        """Record per-recipient results; then sent, retry (4xx refusals), or partial or
        failed (5xx refusals: see :meth:`_fail`). ``skipped``: results decided without
        SMTP (suppressed); ``then``: a job and recipients still to send to over SMTP,
        whose outcome joins ``result``."""
        assert self.store is not None
        job_id = attempt.message_id
        if then is not None:
            sent = await self._send(message, attempt, *then)
            if sent is None:
                return
            result = SendResult((*result.accepted, *sent.accepted), result.refused | sent.refused)
        results = {a: RecipientResult("sent") for a in (*result.accepted, *sent_before)}
        for address, (smtp_code, text) in result.refused.items():
            kind: Literal["pending", "refused"] = "pending" if 400 <= smtp_code < 500 else "refused"
            results[address] = RecipientResult(kind, smtp_code, text)
        results.update(skipped or {})
        if skipped:
            await self._emit("suppressed", attempt, "sending", results, step=0)
        if result.refused:
            await self._suppress_unknown_users(job_id, result.refused)
        # This attempt's answers over the earlier ones: who is still deferred (4xx), who
        # was refused for good (5xx, in this attempt or before).
        merged = {**before, **results}
        if not any(r.status in ("pending", "refused", "sent") for r in merged.values()):
            # Every recipient is suppressed: nothing to send, nothing to re-queue.
            await self._finish_unsent(message, attempt, results)
            return
        reason, code = _undelivered(merged)
        if any(r.status == "pending" for r in merged.values()):
            await self._retry_or_fail(message, attempt, reason, code, results)
            return
        if any(r.status == "refused" for r in merged.values()):
            if not any(r.status == "sent" for r in merged.values()):
                reason = f"every recipient refused: {reason}"
            await self._fail(message, attempt, reason, code, results, "refused")
            return
        metrics.SENT.inc()
        if attempt.record is not None:
            accepted_at = attempt.record.created_at.timestamp()
            metrics.DELIVERY_SECONDS.observe(max(time.time() - accepted_at, 0.0))
        try:
            applied = await self.store.finish(attempt, "sent", results, detail=detail)
        except StoreUnavailable as exc:
            # The mail went out; if the ack below also lands, nothing is lost or repeated.
            log.error("message %s: sent, but could not record it: %s", job_id, exc)
            await self._ack(message, job_id)
            return
        if not applied:
            log.warning(
                "message %s: sent, but attempt %d had lost its claim", job_id, attempt.number
            )
        else:
            log.info("message %s: sent (attempt %d)", job_id, attempt.number)
            await self._emit("sent", attempt, "sent", results)
        await self._ack(message, job_id)

    async def _emit(
        self,
        event: Event,
        attempt: Attempt,
        status: str,
        results: dict[str, RecipientResult],
        error: str | None = None,
        step: int = 1,
    ) -> None:
        """A webhook event about ``attempt``'s message (nothing without WEBHOOK_URLS).
        Its sequence is the record's history length once the outcome is written (``step``
        1), or while the attempt runs (0: the suppressed recipients, before the outcome)."""
        if self.webhooks is None:
            return
        before = attempt.record.results if attempt.record is not None else {}
        sequence = len(attempt.record.history) + step if attempt.record is not None else 0
        body = event_body(event, attempt.message_id, status, {**before, **results}, sequence, error)
        await publish_event(self.broker, self.settings, attempt.message_id, body)

    async def _finish_unsent(
        self,
        message: AbstractIncomingMessage,
        attempt: Attempt,
        results: dict[str, RecipientResult],
    ) -> None:
        """``failed`` without a dead letter: every recipient is on the suppression list."""
        assert self.store is not None
        reason = "every recipient is on the suppression list"
        try:
            await self.store.finish(attempt, "failed", results, reason)
        except StoreUnavailable as exc:
            log.error(
                "message %s: could not record the outcome (failed): %s", attempt.message_id, exc
            )
        log.warning("message %s: failed: %s", attempt.message_id, reason)
        await self._emit("failed", attempt, "failed", results, reason)
        await self._ack(message, attempt.message_id)

    async def _suppress_unknown_users(
        self, job_id: str, refused: dict[str, tuple[int, str]]
    ) -> None:
        """Recipients refused as unknown (a 5xx with a 5.1.x status) join the suppression
        list (simulated bounces do not: applications test with them again and again)."""
        assert self.store is not None
        found = {
            _suppression_key(a): f"{code} {text}"[:1000]
            for a, (code, text) in refused.items()
            if code >= 500 and _UNKNOWN_USER.match(text) and not a.endswith(SIMULATOR_SUFFIX)
        }
        if not found:
            return
        try:
            await self.store.suppress(found, "bounce")
        except StoreUnavailable as exc:
            log.error("message %s: could not add %d suppression(s): %s", job_id, len(found), exc)
            return
        self._suppressed = self._suppressed | found.keys()
        log.info("message %s: suppressed from now on: %s", job_id, ", ".join(sorted(found)))

    async def _retry_or_fail(
        self,
        message: AbstractIncomingMessage,
        attempt: Attempt,
        reason: str,
        code: int | None,
        results: dict[str, RecipientResult],
    ) -> None:
        metrics.DEFERRED.inc()
        headers = dict(message.headers or {})
        retries = _int_header(headers, RETRIES_HEADER)
        if retries >= len(self.names.retry_tiers):
            reason = f"gave up after {retries + 1} attempts: {reason}"
            await self._fail(message, attempt, reason, code, results, "retries_exhausted")
            return
        headers[RETRIES_HEADER] = retries + 1
        accepted = {a for a, r in results.items() if r.status == "sent"}
        accepted |= set(_list_header(headers, SENT_HEADER))
        if accepted:
            headers[SENT_HEADER] = ",".join(sorted(accepted))
        delay = self.names.retry_tiers[retries].delay * (1 - JITTER * random.random())
        log.warning(
            "message %s: attempt %d failed (%s); retry %d in %.1fs",
            attempt.message_id,
            attempt.number,
            reason,
            retries + 1,
            delay,
        )
        await self._hand_over(
            message,
            attempt,
            retries,
            headers,
            delay,
            results=results,
            error=reason,
            code=code,
        )

    async def _config_fault(
        self, message: AbstractIncomingMessage, attempt: Attempt, exc: SmtpConfigError
    ) -> None:
        """A refused login (or a similar settings fault) is the operator's to fix: retry
        with backoff, never fail."""
        headers = dict(message.headers or {})
        faults = _int_header(headers, CONFIG_FAULTS_HEADER)
        headers[CONFIG_FAULTS_HEADER] = faults + 1
        # Back off, but not past ten minutes: once the settings are fixed, mail should flow.
        short = [
            n for n, t in enumerate(self.names.retry_tiers) if t.delay <= CONFIG_FAULT_MAX_WAIT
        ]
        tier = min(faults, short[-1]) if short else 0
        delay = self.names.retry_tiers[tier].delay
        what = "SMTP LOGIN REFUSED" if isinstance(exc, SmtpAuthError) else "SMTP SETTINGS FAULT"
        log.error(
            "message %s: %s by %s:%d (%s): check %s; the message is kept and retried in %.1fs",
            attempt.message_id,
            what,
            self.settings.smtp_host,
            self.settings.smtp_port,
            exc,
            " and ".join(", ".join(exc.settings).rsplit(", ", 1)),
            delay,
        )
        await self._hand_over(
            message,
            attempt,
            tier,
            headers,
            delay,
            error=exc.reason,
            code=exc.code,
            detail=f"configuration fault: {what.lower()}",
        )

    async def _fail(
        self,
        message: AbstractIncomingMessage,
        attempt: Attempt,
        reason: str,
        code: int | None,
        results: dict[str, RecipientResult],
        kind: str = "permanent",
    ) -> None:
        """The end without sending to everyone: ``partial`` when some recipient has the mail
        (accepted in this attempt or an earlier one), else ``failed``; dead-lettered either
        way, so that an operator can send it again to the others."""
        assert self.store is not None
        job_id = attempt.message_id
        headers = message.headers or {}
        before = attempt.record.results if attempt.record is not None else {}
        sent = {a for a, r in {**before, **results}.items() if r.status == "sent"}
        sent.update(_list_header(headers, SENT_HEADER))
        status: Literal["partial", "failed"] = "partial" if sent else "failed"
        metrics.FAILED.labels(kind).inc()
        try:
            applied = await self.store.finish(attempt, status, results, reason, code)
        except StoreUnavailable as exc:
            log.error("message %s: could not record the outcome (%s): %s", job_id, status, exc)
        else:
            if not applied:
                # Another attempt took over (its outcome stands): this copy is done.
                log.warning(
                    "message %s: attempt %d ended %s (%s) after losing its claim; not applied",
                    job_id,
                    attempt.number,
                    status,
                    reason,
                )
                await self._ack(message, job_id)
                return
        if sent:
            log.error(
                "message %s: partial: sent to %d of %d recipient(s); %s",
                job_id,
                len(sent),
                len(attempt.record.results) if attempt.record is not None else len(sent),
                reason,
            )
        else:
            log.error("message %s: failed: %s", job_id, reason)
        await self._emit("failed", attempt, status, results, reason)
        await self._dead_letter(message, reason, code, sent)

    async def _hand_over(
        self,
        message: AbstractIncomingMessage,
        attempt: Attempt,
        tier: int,
        headers: dict[str, Any],
        delay: float,
        results: dict[str, RecipientResult] | None = None,
        error: str | None = None,
        code: int | None = None,
        detail: str | None = None,
    ) -> None:
        """Pass the message on to a retry tier as a new copy, record ``retrying``, ack.

        The copy is published (and confirmed) first: only then may the record name it as
        the newest, so that this copy, should it come back, is dropped as superseded.
        """
        assert self.store is not None
        job_id = attempt.message_id
        copy = _int_header(headers, COPY_HEADER) + 1
        headers[COPY_HEADER] = copy
        if not await self._publish_retry(message, job_id, tier, headers, delay):
            with contextlib.suppress(StoreUnavailable):
                await self.store.release(attempt)
            return
        metrics.RETRIED.inc()
        try:
            applied = await self.store.finish(
                attempt,
                "retrying",
                results,
                error,
                code,
                now_utc() + timedelta(seconds=delay),
                detail=detail,
                copy=copy,
            )
        except StoreUnavailable as exc:
            log.error("message %s: could not record the retry: %s", job_id, exc)
        else:
            if not applied:
                log.warning(
                    "message %s: attempt %d had lost its claim; its retry copy will find "
                    "the record's outcome",
                    job_id,
                    attempt.number,
                )
            else:
                await self._emit("deferred", attempt, "retrying", results or {}, error)
        await self._ack(message, job_id)

    async def _wait_more(
        self, message: AbstractIncomingMessage, job: MailJob, remaining: float
    ) -> None:
        """A scheduled message that is not due yet goes on to the next schedule tier (see
        broker.SCHEDULE_DELAYS), unless its record says it is over (cancelled)."""
        assert self.store is not None
        try:
            record = await self.store.get(job.id)
        except StoreUnavailable as exc:
            log.warning("message %s: could not read its record (%s); still waiting", job.id, exc)
            record = None
        if record is not None and record.status in FINAL:
            log.info("message %s: %s before it was due; dropping it", job.id, record.status)
            await self._ack(message, job.id)
            return
        routing_key, expiration = self.names.schedule_hop(remaining)
        try:
            await self.broker.publish(
                message.body, job.id, routing_key, dict(message.headers or {}), expiration
            )
        except BrokerUnavailable as exc:
            log.error("message %s: could not put it back to wait (%s)", job.id, exc)
            await asyncio.sleep(1)
            await self._settle_delivery(message, job.id, "nack")
            return
        await self._ack(message, job.id)

    async def _to_retry_tier(
        self,
        message: AbstractIncomingMessage,
        job: MailJob,
        tier: int,
        headers: dict[str, Any],
    ) -> None:
        """The database is unavailable: the same copy waits in a retry tier (no attempt)."""
        if await self._publish_retry(message, job.id, tier, headers, None):
            await self._ack(message, job.id)

    async def _publish_retry(
        self,
        message: AbstractIncomingMessage,
        job_id: str,
        tier: int,
        headers: dict[str, Any],
        delay: float | None,
    ) -> bool:
        """Publish to retry tier ``tier``; False (and the message handed back) if that fails."""
        retry = self.names.retry_tiers[tier]
        try:
            await self.broker.publish(
                message.body,
                job_id,
                retry.routing_key,
                headers,
                expiration=delay if delay is not None and delay < retry.delay else None,
            )
        except BrokerUnavailable as exc:
            # Not acked: RabbitMQ delivers it again once the channel is back.
            log.error("message %s: could not schedule the retry (%s)", job_id, exc)
            await asyncio.sleep(1)  # no tight redelivery loop while RabbitMQ is in trouble
            await self._settle_delivery(message, job_id, "nack")
            return False
        return True

    async def _ack(self, message: AbstractIncomingMessage, job_id: str | None) -> None:
        await self._settle_delivery(message, job_id or message.message_id or "", "ack")

    async def _settle_delivery(
        self,
        message: AbstractIncomingMessage,
        job_id: str,
        how: Literal["ack", "nack", "reject"],
    ) -> None:
        """Ack, nack (requeue) or reject (dead-letter) one delivery, within a bound.

        On a channel that died meanwhile none of them can land; RabbitMQ has then put the
        message back already and delivers it again, which the record makes safe.
        """
        if how == "ack":
            action = self.acks.ack(message)
        else:
            action = self.acks.refuse(message, requeue=how == "nack")
        try:
            # asyncio.timeout, not wait_for: no task of its own per mail.
            async with asyncio.timeout(self.settings.publish_timeout):
                await action
        except AMQP_ERRORS as exc:
            log.warning(
                "message %s: %s failed (%s); RabbitMQ will deliver it again",
                job_id,
                how,
                type(exc).__name__,
            )

    async def _dead_letter(
        self,
        message: AbstractIncomingMessage,
        reason: str,
        code: int | None,
        sent: set[str] | None = None,
    ) -> None:
        """Publish a copy to the dead-letter queue with the reason (and the recipients that
        have it already, never sent to again on a re-queue), then ack the original."""
        headers = dict(message.headers or {})
        if sent:
            headers[SENT_HEADER] = ",".join(sorted(sent))
        headers["x-mailroom-error"] = reason[:1000]
        headers["x-mailroom-failed-at"] = datetime.now().astimezone().isoformat(timespec="seconds")
        if code is not None:
            headers["x-mailroom-smtp-code"] = code
        message_id = message.message_id or ""
        try:
            await self.broker.publish(message.body, message_id, DEAD_KEY, headers)
        except BrokerUnavailable as exc:
            log.error("message %s: could not dead-letter (%s); rejecting it", message_id, exc)
            # The work queue dead-letters rejected messages to the same place.
            await self._settle_delivery(message, message_id, "reject")
            metrics.DEAD_LETTERED.inc()
            return
        metrics.DEAD_LETTERED.inc()
        log.info("message %s: dead-lettered: %s", message_id, reason)
        await self._ack(message, message_id)


# Simulator recipients (in any mode): bounce@, defer@ and delivered@ this domain (a +tag
# after the name is allowed) get the outcome they name, without a network connection.
SIMULATOR_SUFFIX = "@simulator.mailroom.invalid"
_SIMULATED: dict[str, tuple[int, str] | None] = {
    "delivered": None,
    "bounce": (550, "5.1.1 simulated bounce: no such user (Mailroom simulator)"),
    "defer": (451, "4.3.0 simulated deferral: try again later (Mailroom simulator)"),
}
# An enhanced status code 5.1.x (RFC 3463: bad destination mailbox address), as the text of
# a 5xx refusal starts.
_UNKNOWN_USER = re.compile(r"\s*5\.1\.\d{1,3}\b")


def _simulate(simulated: list[str], sandboxed: list[str]) -> SendResult:
    """The outcome of simulator recipients (by the name before ``+`` or ``@``; an unknown
    name is delivered) and of sandboxed ones (delivered)."""
    accepted = list(sandboxed)
    refused: dict[str, tuple[int, str]] = {}
    for address in simulated:
        name = address[: -len(SIMULATOR_SUFFIX)].split("+", 1)[0].lower()
        outcome = _SIMULATED.get(name)
        if outcome is None:
            accepted.append(address)
        else:
            refused[address] = outcome
    return SendResult(tuple(accepted), refused)


@functools.lru_cache(maxsize=4096)
def _suppression_key(address: str) -> str:
    try:
        return suppression_key(address)
    except InvalidMessage:
        return address.lower()


def _undelivered(results: dict[str, RecipientResult]) -> tuple[str, int | None]:
    """Who has not got the mail, deferred (4xx, tried again) apart from refused (5xx, for
    good), and the SMTP code to report: the first deferral's, else the first refusal's."""
    deferred = {a: r for a, r in results.items() if r.status == "pending"}
    refused = {a: r for a, r in results.items() if r.status == "refused"}
    parts = [
        f"recipients {what}: "
        + "; ".join(f"{a}: {r.code} {r.message}" if r.code else a for a, r in group.items())
        for what, group in (("deferred", deferred), ("refused", refused))
        if group
    ]
    codes = [r.code for r in (*deferred.values(), *refused.values()) if r.code]
    return " / ".join(parts), codes[0] if codes else None


async def _first_of(*waits: Coroutine[Any, Any, Any]) -> None:
    """Return once the first of ``waits`` is done; the others are cancelled."""
    futures = [asyncio.ensure_future(wait) for wait in waits]
    await asyncio.wait(futures, return_when=asyncio.FIRST_COMPLETED)
    for future in futures:
        future.cancel()


def _list_header(headers: Any, name: str) -> list[str]:
    value = headers.get(name)
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    return [part for part in value.split(",") if part] if isinstance(value, str) else []


def _int_header(headers: dict[str, Any], name: str) -> int:
    value = headers.get(name, 0)
    return value if isinstance(value, int) and value >= 0 else 0


def main() -> int:
    try:
        settings = Settings.from_env()
        worker = Worker(settings)
    except ConfigError as exc:
        print(f"worker: configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.stop)
        await worker.run()

    configure_gc()
    try:
        uvloop.run(serve())
    except StoreUnavailable as exc:
        flush_logging()  # what led to it first
        print(f"worker: {exc} (DATABASE_URL)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # Run the module under its own name, so its loggers say "worker", not "__main__".
    import worker

    sys.exit(worker.main())
