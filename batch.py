"""``POST /api/messages/batch``: queue up to MAX_BATCH messages with one request.

Each item is what ``POST /api/messages`` takes and is judged on its own, as that endpoint
would judge it (validation, then the rate limits of its recipients, in request order). The
answer is ``200`` with one result per item, in request order: ``{"code": 202, "id",
"status": "queued"}``, or ``{"code": 400|429|503, "error", "field"?}``. The whole request
is refused only when it is not a batch (``400``: not an array, empty, more than MAX_BATCH
items) or when RabbitMQ took none of it (``503``: nothing was queued, retry it whole).

The valid items are published at once (:meth:`broker.Broker.publish_many`: their confirms
are pipelined), then the confirmed ones are recorded together (the store group-commits).
An item is reported queued exactly when RabbitMQ confirmed it; an item whose confirm did
not come within PUBLISH_TIMEOUT says so, with its id (it may still be stored: the status
API shows it once it is).

One ``Idempotency-Key`` covers the batch: the key maps to a batch id, and the batch id to
the first answer (``Store.save_batch_answer``), which a replay gets again.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pydantic import TypeAdapter, ValidationError
from quart import Quart, Response, g, jsonify, request
from quart_schema import (
    ResponseReturnValue,
    document_request,
    document_response,
    security_scheme,
    validate_headers,
)

import mailtemplates
import metrics
from apidoc import answers
from broker import Broker
from errors import InvalidMessage, PublishUnconfirmed
from guard import Denied, Guard
from messages import AttachmentTooLarge, InputLimits, MailJob, addr_spec, new_id, request_job
from schemas import (
    MAX_BATCH,
    BatchAnswer,
    BatchRequest,
    IdempotencyHeaders,
    MessageRequest,
)
from store import IdempotencyConflict, Store, StoredTemplate, StoreUnavailable

log = logging.getLogger(__name__)

RETRY = {"Retry-After": "5"}
NOT_QUEUED = "the mail queue is unavailable; nothing was queued, try again shortly"
_ITEM = TypeAdapter(MessageRequest)

Result = dict[str, Any]


@dataclass(frozen=True)
class Accepting:
    """What the batch route shares with the single one in server.py."""

    broker: Broker
    guard: Guard
    limits: InputLimits
    store: Callable[[], Store]
    record: Callable[[MailJob], Awaitable[None]]  # best effort, as for a single message
    watch_late: Callable[[MailJob, PublishUnconfirmed], None]  # record it if stored late
    client_identity: Callable[[], str]
    describe_validation: Callable[[Any], tuple[str | None, str]]


def failed(code: int, message: str, field: str | None = None) -> Result:
    result: Result = {"code": code, "error": message}
    if field is not None:
        result["field"] = field
    return result


def refuse(message: str, code: int, headers: dict[str, str] | None = None) -> Response:
    response = jsonify(error=message)
    response.status_code = code
    response.headers.update(headers or {})
    return response


def request_digest(body: list[Any]) -> str:
    """The same batch gives the same digest, and no single message's digest."""
    canonical = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(b"batch:" + canonical.encode()).hexdigest()


def register(app: Quart, accepting: Accepting) -> None:
    """Add ``POST /api/messages/batch`` to ``app``."""
    a = accepting

    @app.post("/api/messages/batch")
    @document_request(BatchRequest)
    @validate_headers(IdempotencyHeaders)
    @document_response(BatchAnswer, 200)
    @answers(
        (
            200,
            "One result per item, in request order (the whole batch with "
            "Idempotent-Replayed: true when it repeats an Idempotency-Key and body).",
        ),
        (
            400,
            "The body is not a JSON array of 1 to 500 items, not JSON, or a header is "
            "malformed; invalid items are reported in their results instead.",
        ),
        401,
        409,
        413,
        415,
        422,
        429,
        (503, "RabbitMQ took none of it: nothing was queued; try again after Retry-After."),
    )
    @security_scheme([{"token": []}])
    async def create_batch(headers: IdempotencyHeaders) -> ResponseReturnValue:
        """Queue up to 500 mails, each what POST /api/messages takes and judged on its own:
        200 with one result per item, in request order (202 queued with its id, or the
        error that endpoint would have given it). 400 when the body is not an array of 1 to
        500 items; 503 when RabbitMQ took none of it (nothing was queued)."""
        body = await request.get_json()
        if not isinstance(body, list):
            return refuse("send a JSON array of messages", 400)
        if not body:
            return refuse("the batch is empty: send 1 to 500 messages", 400)
        if len(body) > MAX_BATCH:
            return refuse(f"a batch holds at most {MAX_BATCH} messages, not {len(body)}", 400)
        key = headers.idempotency_key
        if key is not None and not key.isprintable():
            return refuse("Idempotency-Key must be printable characters", 400)
        results: list[Result] = [{}] * len(body)
        jobs: list[tuple[int, MailJob]] = []
        fetched: dict[str, StoredTemplate | None] = {}

        async def template(name: str) -> StoredTemplate | None:
            """Each template of the batch read once."""
            if name not in fetched:
                fetched[name] = await a.store().get_template(name)
            return fetched[name]

        for index, item in enumerate(body):
            try:
                data = _ITEM.validate_python(item)
                data = await mailtemplates.apply(data, template, a.limits.max_body_chars)
                job = request_job(data, a.limits)
            except StoreUnavailable as exc:
                log.error("batch item %d: template store unavailable: %s", index, exc)
                results[index] = failed(503, "the message store is unavailable; try again")
            except ValidationError as exc:
                field, reason = a.describe_validation(exc)
                results[index] = failed(400, reason, field)
            except InvalidMessage as exc:
                code = 413 if isinstance(exc, AttachmentTooLarge) else 400
                results[index] = failed(code, exc.reason, exc.field)
            else:
                jobs.append((index, job))
        # Shielded, as the single endpoint: a client that hangs up must not leave the key
        # claimed for a batch that never ran, nor a batch half recorded.
        return await asyncio.shield(accept(body, results, jobs, key, a.client_identity()))

    async def accept(
        body: list[Any],
        results: list[Result],
        jobs: list[tuple[int, MailJob]],
        key: str | None,
        client: str,
    ) -> ResponseReturnValue:
        batch_id = new_id()
        if key is not None:
            try:
                earlier = await a.store().claim_idempotency_key(
                    client, key, request_digest(body), batch_id
                )
                answer = None if earlier is None else await a.store().batch_answer(earlier)
            except IdempotencyConflict as exc:
                return refuse(str(exc), 422)
            except StoreUnavailable as exc:
                log.error("batch %s: idempotency store unavailable: %s", batch_id, exc)
                return refuse("the message store is unavailable; try again", 503, RETRY)
            if earlier is not None:
                if answer is None:
                    return refuse("a request with this Idempotency-Key is in progress", 409)
                replayed = Response(answer, 200, mimetype="application/json")
                replayed.headers["Idempotent-Replayed"] = "true"
                return replayed
        if not a.broker.is_ready:
            return await nothing_queued(batch_id, key, client, "not connected to RabbitMQ")
        allowed = await spend(results, jobs)
        started = time.perf_counter()
        outcomes = await a.broker.publish_many([(job.to_bytes(), job.id) for _, job in allowed])
        confirmed = time.perf_counter()
        queued: list[MailJob] = []
        uncertain = 0
        for (index, job), failure in zip(allowed, outcomes, strict=True):
            if failure is None:
                status = "scheduled" if job.send_at is not None else "queued"
                results[index] = {"code": 202, "id": job.id, "status": status}
                queued.append(job)
            elif isinstance(failure, PublishUnconfirmed):
                a.watch_late(job, failure)
                uncertain += 1
                results[index] = failed(
                    503,
                    f"RabbitMQ did not confirm message {job.id} in time; it may still be "
                    f"stored: GET /api/messages/{job.id} shows it once it is.",
                )
            else:
                results[index] = failed(503, NOT_QUEUED)
        lost = len(allowed) - len(queued) - uncertain
        if lost and not queued and not uncertain:
            return await nothing_queued(batch_id, key, client, str(outcomes[0]))
        await asyncio.gather(*(a.record(job) for job in queued))
        if queued:
            metrics.CONFIRM_WAIT.observe(confirmed - started)
            metrics.RECORD_WAIT.observe(time.perf_counter() - confirmed)
        log.info(
            "batch %s: %d of %d queued (%d unconfirmed, %d not queued) from %s",
            batch_id,
            len(queued),
            len(results),
            uncertain,
            lost,
            g.client.address,
        )
        answer = json.dumps({"queued": len(queued), "results": results}, ensure_ascii=False)
        if key is not None:
            try:
                await a.store().save_batch_answer(batch_id, answer)
            except StoreUnavailable as exc:
                # Its key stays claimed: a retry answers 409, never queues the batch twice.
                log.error("batch %s: answer not kept for its Idempotency-Key: %s", batch_id, exc)
        return Response(answer, 200, mimetype="application/json")

    async def spend(
        results: list[Result], jobs: list[tuple[int, MailJob]]
    ) -> list[tuple[int, MailJob]]:
        """Count each item against the rate limits, in request order, as the single
        endpoint would: a refused item spends nothing and says which limit refused it."""
        allowed = []
        refused = 0
        for index, job in jobs:
            try:
                await a.guard.spend_send(g.client, [addr_spec(r) for r in job.recipients])
            except Denied as exc:
                results[index] = failed(exc.status, exc.message)
                refused += 1
            else:
                allowed.append((index, job))
        if refused:
            log.warning("rate limited %s: %d of a batch's items", g.client.address, refused)
        return allowed

    async def nothing_queued(batch_id: str, key: str | None, client: str, why: str) -> Response:
        log.error("batch %s: nothing queued: %s", batch_id, why)
        if key is not None:
            try:
                await a.store().release_idempotency_key(client, key)
            except StoreUnavailable as exc:
                log.error("batch %s: key not released: %s", batch_id, exc)
        return refuse(NOT_QUEUED, 503, RETRY)
