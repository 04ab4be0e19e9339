"""The HTTP service: accept mail requests, store them in RabbitMQ, answer at once.

``python server.py`` serves on HOST:PORT with Hypercorn; ``hypercorn server:app`` works
too (``app`` builds itself from the environment on first use). Routes:

* ``GET /?talktome``            append the local time to TALKTOME_LOG
* ``GET /?sendmail=<address>``  queue the fixed test mail (``mailto:`` accepted)
* ``POST /api/messages``        queue a mail described by JSON
* ``POST /api/messages/batch``  queue up to 500 of them (batch.py)
* ``GET /api/messages[/<id>]``  what became of messages; ``DELETE`` one to cancel it
* ``GET /api/suppressions``, ``PUT``/``DELETE /api/suppressions/<address>``
* ``GET /api/dead-letters``     what could not be sent, and why
* ``GET /logs``                 the last lines of the talktome log
* ``GET /api/stats``            queue depths and records by status
* ``GET /healthz``, ``GET /readyz``, ``GET /openapi.json``
* ``GET /metrics``              Prometheus metrics (metrics.py)
* ``GET /`` from a browser, ``/ui/...``, ``/api/outbox...``, ``POST /api/dead-letters/requeue``:
  the web page and what it needs (web.py)

Sending and reading need a token or a direct loopback client (see guard.py).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import dataclasses
import hashlib
import logging
import re
import signal
import sys
import time
from datetime import UTC, datetime
from typing import Any, cast, get_args

import uvloop
from hypercorn.config import Config as HypercornConfig
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope
from pydantic import TypeAdapter, ValidationError
from quart import Quart, Response, g, jsonify, request
from quart.json.provider import JSONProvider
from quart_schema import (
    Info,
    QuartSchema,
    RequestSchemaValidationError,
    ResponseReturnValue,
    document_querystring,
    document_response,
    security_scheme,
    validate_headers,
    validate_querystring,
    validate_request,
)
from werkzeug.exceptions import HTTPException, InternalServerError

import acceptloop
import apidoc
import batch
import legacyroute
import mailtemplates
import metrics
import web
from apidoc import answers
from asgihttp import InlineHTTPConnection
from broker import Broker, Names
from config import LISTEN_BACKLOG, Settings, configure_gc, configure_logging, flush_logging
from deadletters import DeadLetterListings, DeadLettersBusy
from errors import BrokerUnavailable, ConfigError, InvalidJSON, InvalidMessage, PublishUnconfirmed
from graceful import serve
from guard import Client, Denied, Guard, bearer_token, identify
from messages import (
    AttachmentTooLarge,
    InputLimits,
    MailJob,
    addr_spec,
    legacy_job,
    parse_json,
    request_job,
    strict_query,
    strip_mailto,
    suppression_key,
)
from pacing import ListPacer
from schemas import (
    TEMPLATE_NAME,
    Cancelled,
    DeadLetterList,
    IdempotencyHeaders,
    LegacyQuery,
    ListQuery,
    LogLines,
    LogsQuery,
    MessageList,
    MessageRequest,
    MessageStatus,
    MessageView,
    Queued,
    Stats,
    Suppression,
    SuppressionList,
    SuppressionQuery,
    SuppressionRequest,
    TemplateRequest,
    TemplateView,
    Unsuppressed,
)
from store import IdempotencyConflict, Store, StoredTemplate, StoreUnavailable, now_utc
from talklog import TalkLog
from webhooks import event_body, publish_event

log = logging.getLogger(__name__)

USAGE = """Mailroom: asynchronous mail dispatch.

  GET  /?talktome                 log the current time
  GET  /?sendmail=<address>       queue a test mail to <address> (mailto: accepted)
  POST /api/messages              queue a mail: {"to", "subject", "text", "html"?, "reply_to"?}
  POST /api/messages/batch        queue up to 500 mails: a JSON array of those objects
  GET  /api/messages[/<id>]       what became of messages (?status=, ?recipient=, ?since=,
                                  ?until=, ?limit=, ?cursor=)
  DELETE /api/messages/<id>       cancel a queued, scheduled or retrying message
  GET  /api/suppressions          the suppression list; PUT/DELETE /api/suppressions/<address>
  GET  /api/dead-letters          what could not be sent, and why
  GET  /api/stats                 queue depths and records by status
  GET  /logs?lines=N              the last lines of the talktome log
  GET  /healthz, /readyz          liveness, readiness
  GET  /metrics                   Prometheus metrics
  GET  /openapi.json              the API description

Sending and reading need 'Authorization: Bearer <API_TOKEN>' unless you are on this machine.
"""


RETRY = {"Retry-After": "5"}
STORE_DOWN = "The message database is unavailable; try again after Retry-After."
MESSAGE_ID = re.compile(r"[0-9a-f]{32}")
TEMPLATE_NAME_RE = re.compile(TEMPLATE_NAME)
SEND_PATHS = ("/api/messages", "/api/messages/batch")
STATUSES: tuple[str, ...] = get_args(MessageStatus)
NO_ROUTE = "No such route: the address is empty or holds a '/'."


def client_identity() -> str:
    """Who is asking, for idempotency keys: the token if any, else the client address."""
    if g.token:
        return "token:" + hashlib.sha256(g.token.encode()).hexdigest()[:40]
    return f"addr:{g.client.address}"[:64]


class StrictJSON(JSONProvider):
    """quart-schema's JSON provider, but request bodies are parsed by
    :func:`messages.parse_json` (duplicate keys, nesting depth: a 400 with a reason)."""

    def __init__(self, app: Quart, inner: JSONProvider) -> None:
        super().__init__(app)
        self.inner = inner

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        return self.inner.dumps(obj, **kwargs)

    def response(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.response(*args, **kwargs)

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        return parse_json(s.decode() if isinstance(s, bytes) else s)


def text(body: str, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(body, status=status, mimetype="text/plain", headers=headers)


def create_app(settings: Settings) -> Quart:
    """Build the app. Connections are opened when serving starts, closed when it stops."""
    app = Quart(__name__)
    app.asgi_http_class = InlineHTTPConnection
    app.config["MAILROOM_SETTINGS"] = settings
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    QuartSchema(
        app,
        info=Info(title="Mailroom", version="1.0"),
        swagger_ui_path=None,
        redoc_ui_path=None,
        scalar_ui_path=None,
        security_schemes={"token": {"type": "http", "scheme": "bearer"}},
        openapi_provider_class=apidoc.Provider,
    )
    app.json = StrictJSON(app, app.json)
    broker = Broker(settings, "mailroom-server")
    talklog = TalkLog(settings.talktome_log)
    guard = Guard(settings)
    limits = InputLimits(
        max_recipients=settings.max_recipients,
        max_subject_chars=settings.max_subject_chars,
        max_body_chars=settings.max_body_chars,
        allowed_senders=settings.senders,
        max_attachment_bytes=settings.max_attachment_bytes,
        max_schedule_days=settings.max_schedule_days,
    )
    app.extensions["mailroom_broker"] = broker
    names = Names.of(settings)
    dead_letter_listings = DeadLetterListings(settings)
    depths = metrics.QueueDepths(Names.of(settings), lambda: broker.connection)
    stores: list[Store] = []

    def store() -> Store:
        return stores[0]

    housekeeping: list[asyncio.Task[None]] = []
    # Lists take turns, one at a time in this process, and while it accepts mail they take
    # at most half of its time (pacing.py): clients listing in a loop must not take the
    # process from the accepts. Reads by id do not wait.
    listing = ListPacer()

    async def purge_hourly() -> None:
        while True:
            try:
                await store().purge_idempotency_keys()
            except StoreUnavailable as exc:
                log.warning("could not purge old idempotency keys: %s", exc)
            await asyncio.sleep(3600)

    async def expire_hourly() -> None:
        """Retention: once at start, then every hour, in small batches (store.prune)."""
        days = settings.message_retention_days
        while True:
            try:
                removed = await store().expire(days)
            except StoreUnavailable as exc:
                log.warning("could not delete expired message records: %s", exc)
            else:
                if removed:
                    log.info(
                        "deleted %d message records older than %d days (MESSAGE_RETENTION_DAYS)",
                        removed,
                        days,
                    )
            await asyncio.sleep(3600)

    @app.before_serving
    async def startup() -> None:
        await talklog.open()
        stores.append(await Store.open(settings))
        await broker.start()
        housekeeping.append(asyncio.create_task(purge_hourly(), name="purge-idempotency-keys"))
        if settings.message_retention_days:
            housekeeping.append(asyncio.create_task(expire_hourly(), name="message-retention"))

    @app.after_serving
    async def shutdown() -> None:
        for task in list(housekeeping):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await broker.close()
        for opened in stores:
            await opened.close()
        await guard.close()
        await talklog.close()

    # -- who may do what, before any route runs ------------------------------------------

    @app.before_request
    async def gate() -> Response | None:
        client = identify(
            request.remote_addr,
            request.headers.getlist("X-Forwarded-For"),
            "Forwarded" in request.headers,
            settings.trusted_proxy_hops,
        )
        g.client = client
        g.token = bearer_token(request.headers.get("Authorization"))
        g.send_started = None
        if "Content-Length" in request.headers and "Transfer-Encoding" in request.headers:
            # RFC 9112 6.1: h11 would frame by Transfer-Encoding; we refuse, and close.
            message = "Send Content-Length or Transfer-Encoding, not both."
            return error_response(message, 400, {"Connection": "close"})
        if not strict_query(request.query_string):
            return error_response("The query string is not valid UTF-8 percent-encoding.", 400)
        path, args = request.path, request.args
        if path == "/" and ("sendmail" in args or "talktome" in args) and request.method != "GET":
            # HEAD (which Quart routes to GET handlers) and the rest must change nothing.
            return text(f"{request.method} does not send or log; use GET.\n", 405, {"Allow": "GET"})
        if path == "/" and "sendmail" in args:
            g.send_started = time.perf_counter()
            tokens = args.getlist("token")
            if len(tokens) > 1:
                return text("Give at most one token.\n", 400)
            g.token = g.token or (tokens[0] if tokens else None)
            # send_legacy authorizes and checks the limits, as in the fast path.
        elif path.startswith("/api/") or path == "/logs":
            if request.method == "POST" and path in SEND_PATHS:
                g.send_started = time.perf_counter()
            guard.authorize(client, g.token)
            if g.send_started is not None:
                await guard.check_send(client)
                if request.mimetype == "multipart/form-data" and path == "/api/messages":
                    answer: Any = await create_from_form()
                    return cast(Response, await app.make_response(answer))
                if request.mimetype != "application/json":
                    return json_error("send JSON with Content-Type: application/json", 415)
        elif path == "/" and "talktome" in args:
            await guard.limit_talktome(client)
        elif path == "/metrics" and not settings.metrics_public:
            guard.authorize(client, g.token)
        return None

    def count_send(started: float, status: int) -> None:
        """A send request answered: its accept latency if 2xx, else a refusal if 4xx/5xx."""
        if status < 300:
            metrics.ACCEPT_SECONDS.observe(time.perf_counter() - started)
            listing.sent()
        elif status >= 400:
            metrics.refused(status)

    @app.after_request
    async def count_sends(response: Response) -> Response:
        started = g.get("send_started")
        if started is not None:
            count_send(started, response.status_code)
        return response

    @app.errorhandler(Denied)
    async def denied(exc: Denied) -> Response:
        return refusal(exc, g.client, request.path)

    @app.errorhandler(RequestSchemaValidationError)
    async def invalid_request(exc: RequestSchemaValidationError) -> Response:
        field, reason = describe_validation(exc.validation_error)
        return json_error(reason, 400, field=field)

    @app.errorhandler(InvalidJSON)
    async def invalid_json(exc: InvalidJSON) -> Response:
        return json_error(exc.reason, 400, field=exc.field)

    @app.errorhandler(UnicodeDecodeError)
    async def not_utf8(exc: UnicodeDecodeError) -> Response:
        return error_response("The request is not valid UTF-8.", 400)

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        reasons = {
            413: f"The request body is larger than {settings.max_request_bytes} bytes.",
            405: f"{request.method} is not allowed here.",
        }
        code = exc.code or 500
        message = reasons.get(code) or exc.description or exc.name
        # Only Allow from werkzeug's headers: its Content-Type (text/html) is not ours.
        allow = {name: value for name, value in exc.get_headers() if name == "Allow"}
        return error_response(message, code, allow)

    # -- sending -------------------------------------------------------------------------

    async def record(job: MailJob) -> None:
        """The record is best effort: the message is safe in RabbitMQ once confirmed, and
        a worker creates a missing record."""
        metrics.ACCEPTED.inc()
        try:
            await store().insert_queued(job)
        except StoreUnavailable as exc:
            log.warning("message %s: queued, but its record waits for the worker: %s", job.id, exc)

    async def enqueue(job: MailJob, sender: str, key: str | None = None, client: str = "") -> None:
        """Publish (confirmed), then record. A scheduled message goes straight to the
        schedule tier it waits in first (see broker.SCHEDULE_DELAYS). ``sender``: the
        client's address, for the log."""
        started = time.perf_counter()
        try:
            if (due := job.due_at()) is not None:
                routing_key, expiration = names.schedule_hop((due - now_utc()).total_seconds())
                await broker.publish(job.to_bytes(), job.id, routing_key, expiration=expiration)
            else:
                await broker.publish(job.to_bytes(), job.id)
        except PublishUnconfirmed as exc:
            watch_late(job, exc, key, client)
            raise
        confirmed = time.perf_counter()
        metrics.CONFIRM_WAIT.observe(confirmed - started)
        await record(job)
        metrics.RECORD_WAIT.observe(time.perf_counter() - confirmed)
        log.info(
            "message %s: queued for %d recipient(s) from %s", job.id, len(job.recipients), sender
        )

    def watch_late(
        job: MailJob, exc: PublishUnconfirmed, key: str | None = None, client: str = ""
    ) -> None:
        late = asyncio.ensure_future(settle_late(job, key, client, exc.outcome))
        housekeeping.append(late)
        late.add_done_callback(housekeeping.remove)

    async def settle_late(
        job: MailJob, key: str | None, client: str, outcome: asyncio.Future[bool]
    ) -> None:
        """A publish that RabbitMQ confirmed too late: record it if it was stored after
        all (a retry with the same Idempotency-Key then gets its id); else free the key."""
        if await outcome:
            await record(job)
        elif key is not None:
            try:
                await store().release_idempotency_key(client, key)
            except StoreUnavailable as exc:
                log.error("message %s: key not released: %s", job.id, exc)

    def unavailable(exc: BrokerUnavailable, job: MailJob) -> str:
        log.error("message %s: not queued: %s", job.id, exc)
        if isinstance(exc, PublishUnconfirmed):
            return (
                f"RabbitMQ did not confirm message {job.id} in time; it may still be stored. "
                "A retry with the same Idempotency-Key answers with its id if it was."
            )
        return "the mail queue is unavailable; nothing was queued, try again shortly"

    async def send_legacy(client: Client, token: str | None, addresses: list[str]) -> Response:
        """``GET /?sendmail=<address>`` once the gate let it through (it refuses a second
        token): who may send, the send limits, the one address, then queued. A refusal
        raises :class:`Denied`. The Quart route and the fast path (legacyroute.py) both
        answer with this."""
        guard.authorize(client, token)
        await guard.check_send(client)
        if len(addresses) != 1:
            return text("Give exactly one sendmail address.\n", 400)
        try:
            job = legacy_job(addresses[0])
        except InvalidMessage as exc:
            return text(f"Invalid address: {exc.reason}\n", 400)
        await guard.spend_send(client, [addr_spec(a) for a in job.to])
        try:
            await enqueue(job, client.address)
        except BrokerUnavailable as exc:
            return text(f"{unavailable(exc, job)}\n", 503, RETRY)
        return text(f"Email to {job.to[0]} queued (id {job.id})\n")

    quart_asgi = app.asgi_app

    async def legacy_fast_path(
        scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        """``GET /?sendmail=`` without Quart's request cycle (legacyroute.py); every other
        request goes to Quart. No client disconnect cancels a send here: like the JSON
        API's accept (shielded), it runs to the end."""
        legacy = legacyroute.match(scope)
        if legacy is None:
            await quart_asgi(scope, receive, send)
            return
        started = time.perf_counter()
        client = identify(
            legacy.peer, legacy.x_forwarded_for, legacy.forwarded, settings.trusted_proxy_hops
        )
        token = bearer_token(legacy.authorization) or legacy.query_token
        try:
            response = await send_legacy(client, token, legacy.addresses)
        except Denied as exc:
            response = refusal(exc, client, "/")
        except Exception:
            # What Quart does with an error in a route (outside debug and testing, where
            # it re-raises): log it and answer 500, in the words of the route's http_error.
            log.exception("Exception on request GET / (?sendmail from %s)", client.address)
            response = error_response(InternalServerError.description, 500, path="/")
        count_send(started, response.status_code)
        await legacyroute.send_response(send, response)

    app.asgi_app = legacy_fast_path  # type: ignore[method-assign]

    @app.get("/")
    @document_querystring(LegacyQuery)
    @answers(
        (
            200,
            "?talktome: 'Logged the current time: <time>'; ?sendmail=<address>: 'Email to "
            "<address> queued (id <message id>)' once RabbitMQ confirmed it; else the usage.",
        ),
        (
            400,
            "An invalid address, more than one sendmail or token parameter, or a query "
            "string that is not valid UTF-8.",
        ),
        (401, "?sendmail without a valid token (in the header or &token=)."),
        (
            429,
            "A rate limit was hit: sends per client or in all, per recipient, or "
            "?talktome per client; Retry-After says when to try again.",
        ),
        (503, "RabbitMQ is unavailable or did not confirm in time: nothing was queued."),
        media="text",
    )
    async def index() -> Response:
        """The legacy API: ?talktome logs the time, ?sendmail=<address> queues a test mail."""
        args = request.args
        if "sendmail" in args:
            return await send_legacy(g.client, g.token, args.getlist("sendmail"))
        if "talktome" in args:
            stamp = await talklog.append(f"talktome from {g.client.address}")
            return text(f"Logged the current time: {stamp}\n")
        return text(USAGE)

    @app.post("/api/messages")
    @validate_request(MessageRequest)
    @validate_headers(IdempotencyHeaders)
    @document_response(Queued, 202)
    @answers(
        (
            202,
            "Queued: RabbitMQ confirmed it is stored (or, with Idempotent-Replayed: true, "
            "the first answer to the same Idempotency-Key and body).",
        ),
        400,
        401,
        409,
        (
            413,
            "The body is larger than MAX_REQUEST_BYTES, or its attachments than "
            "MAX_ATTACHMENT_BYTES (named in the answer).",
        ),
        (415, "The body is neither JSON (Content-Type: application/json) nor multipart/form-data."),
        422,
        429,
        503,
    )
    @security_scheme([{"token": []}])
    async def create_message(
        data: MessageRequest, headers: IdempotencyHeaders
    ) -> ResponseReturnValue:
        """Queue a mail; 202 only after RabbitMQ confirmed it is stored. Also takes the same
        fields as multipart/form-data (curl -F), files as 'attachment'."""
        return await submit(data, headers)

    async def create_from_form() -> ResponseReturnValue:
        """``POST /api/messages`` as multipart/form-data: the fields of the JSON body
        (to, cc, bcc, tag repeated; metadata.<key>, header.<name>, variable.<name>), and
        each file of an ``attachment`` field attached."""
        try:
            body = await form_body()
            data = _MESSAGE.validate_python(body)
            headers = IdempotencyHeaders(idempotency_key=request.headers.get("Idempotency-Key"))
        except ValidationError as exc:
            field, reason = describe_validation(exc)
            return json_error(reason, 400, field=field)
        except InvalidMessage as exc:
            return json_error(exc.reason, 400, field=exc.field)
        return await submit(data, headers)

    async def submit(data: MessageRequest, headers: IdempotencyHeaders) -> ResponseReturnValue:
        try:
            composed = await mailtemplates.apply(
                data, store().get_template, settings.max_body_chars
            )
            job = request_job(composed, limits)
        except InvalidMessage as exc:
            return json_error(exc.reason, refusal_code(exc), field=exc.field)
        except StoreUnavailable as exc:
            return store_down(f"template {data.template}", exc)
        key = headers.idempotency_key
        if key is not None and not key.isprintable():
            return json_error("Idempotency-Key must be printable characters", 400)
        await guard.spend_send(g.client, [addr_spec(a) for a in job.recipients])
        # Shielded: a client that hangs up must not leave a key claimed for a message that
        # was never queued (every retry would then answer 409 for a day).
        return await asyncio.shield(accept(job, data, key, client_identity()))

    async def accept(
        job: MailJob, data: MessageRequest, key: str | None, client: str
    ) -> ResponseReturnValue:
        if key is not None:
            digest = hashlib.sha256(data.model_dump_json().encode()).hexdigest()
            try:
                earlier = await store().claim_idempotency_key(client, key, digest, job.id)
            except IdempotencyConflict as exc:
                return json_error(str(exc), 422)
            except StoreUnavailable as exc:
                log.error("message %s: idempotency store unavailable: %s", job.id, exc)
                return json_error("the message store is unavailable; try again", 503, RETRY)
            if earlier is not None:
                if (first := await store().get(earlier)) is None:
                    return json_error("a request with this Idempotency-Key is in progress", 409)
                replay = {"Idempotent-Replayed": "true", "Location": f"/api/messages/{earlier}"}
                scheduled = bool(first.history) and first.history[0].get("status") == "scheduled"
                status = "scheduled" if scheduled else "queued"
                return jsonify(id=earlier, status=status), 202, replay
        try:
            await enqueue(job, g.client.address, key, client)
        except BrokerUnavailable as exc:
            # Unconfirmed: the key stays until settle_late knows whether it was stored.
            if key is not None and not isinstance(exc, PublishUnconfirmed):
                try:
                    await store().release_idempotency_key(client, key)
                except StoreUnavailable as release_error:
                    log.error("message %s: key not released: %s", job.id, release_error)
            return json_error(unavailable(exc, job), 503, RETRY)
        status = "scheduled" if job.send_at is not None else "queued"
        return jsonify(id=job.id, status=status), 202, {"Location": f"/api/messages/{job.id}"}

    batch.register(
        app,
        batch.Accepting(
            broker=broker,
            guard=guard,
            limits=limits,
            store=store,
            record=record,
            watch_late=watch_late,
            client_identity=client_identity,
            describe_validation=describe_validation,
        ),
    )

    # -- templates (issue 12) ------------------------------------------------------------

    def bad_template_name(name: str) -> Response | None:
        if TEMPLATE_NAME_RE.fullmatch(name):
            return None
        return json_error(
            "a template name is 1 to 64 letters, digits, '_', '.' or '-' (starting with a "
            "letter or digit)",
            400,
            field="name",
        )

    @app.put("/api/templates/<name>")
    @validate_request(TemplateRequest)
    @document_response(TemplateView, 200)
    @document_response(TemplateView, 201)
    @answers(
        (200, "Replaced."),
        (201, "Created."),
        (400, "A malformed name, or a part that is not a valid template (named, with the line)."),
        401,
        413,
        (503, STORE_DOWN),
    )
    @security_scheme([{"token": []}])
    async def put_template(name: str, data: TemplateRequest) -> ResponseReturnValue:
        """Store a template (Jinja2, sandboxed) for POST /api/messages' template field."""
        if (refused := bad_template_name(name)) is not None:
            return refused
        template = StoredTemplate(name, data.subject, data.text, data.html)
        try:
            mailtemplates.check(template)
            created = await store().put_template(template)
            stored = await store().get_template(name)
        except InvalidMessage as exc:
            return json_error(exc.reason, 400, field=exc.field)
        except StoreUnavailable as exc:
            return store_down(f"template {name}", exc)
        log.info(
            "template %s: %s by %s", name, "created" if created else "replaced", g.client.address
        )
        view = dataclasses.asdict(stored or template)
        return jsonify(view), 201 if created else 200

    @app.get("/api/templates/<name>")
    @document_response(TemplateView)
    @answers((200, "The template."), 400, 401, (404, "No such template."), (503, STORE_DOWN))
    @security_scheme([{"token": []}])
    async def get_template(name: str) -> Response:
        """A stored template."""
        if (refused := bad_template_name(name)) is not None:
            return refused
        try:
            template = await store().get_template(name)
        except StoreUnavailable as exc:
            return store_down(f"template {name}", exc)
        if template is None:
            return json_error("no such template", 404)
        return jsonify(dataclasses.asdict(template))

    @app.delete("/api/templates/<name>")
    @answers((204, "Deleted."), 400, 401, (404, "No such template."), (503, STORE_DOWN))
    @security_scheme([{"token": []}])
    async def delete_template(name: str) -> Response:
        """Forget a template (messages already accepted keep what it rendered)."""
        if (refused := bad_template_name(name)) is not None:
            return refused
        try:
            deleted = await store().delete_template(name)
        except StoreUnavailable as exc:
            return store_down(f"template {name}", exc)
        if not deleted:
            return json_error("no such template", 404)
        log.info("template %s: deleted by %s", name, g.client.address)
        return Response(status=204)

    # -- reading -------------------------------------------------------------------------

    @app.get("/api/messages/<message_id>")
    @document_response(MessageView)
    @answers((200, "The message's record."), 400, 401, 404, (503, STORE_DOWN))
    @security_scheme([{"token": []}])
    async def get_message(message_id: str) -> Response:
        """What became of one message."""
        if not MESSAGE_ID.fullmatch(message_id):
            return json_error("no such message", 404)
        try:
            record = await store().get(message_id)
        except StoreUnavailable as exc:
            log.error("message %s: store unavailable: %s", message_id, exc)
            return json_error("the message store is unavailable; try again", 503, RETRY)
        if record is None:
            return json_error("no such message", 404)
        return jsonify(record.to_json())

    @app.delete("/api/messages/<message_id>")
    @document_response(Cancelled)
    @answers(
        (200, "Cancelled (now, or before: idempotent); it will never be sent."),
        400,
        401,
        404,
        (
            409,
            "Too late: the message is being sent or is final (sent, partial, failed); the "
            "answer's status says which.",
        ),
        (503, STORE_DOWN),
    )
    @security_scheme([{"token": []}])
    async def cancel_message(message_id: str) -> Response:
        """Take back a queued, scheduled or retrying message: it becomes cancelled."""
        if not MESSAGE_ID.fullmatch(message_id):
            return json_error("no such message", 404)
        try:
            outcome, record = await store().cancel(message_id)
        except StoreUnavailable as exc:
            log.error("message %s: store unavailable: %s", message_id, exc)
            return json_error("the message store is unavailable; try again", 503, RETRY)
        if record is None:
            return json_error("no such message", 404)
        if outcome == "conflict":
            answer = jsonify(
                error=f"the message is {record.status}: too late to cancel",
                id=message_id,
                status=record.status,
            )
            answer.status_code = 409
            return answer
        if outcome == "cancelled":
            log.info("message %s: cancelled by %s", message_id, g.client.address)
            if settings.webhook_urls:
                body = event_body(
                    "cancelled", message_id, "cancelled", record.results, len(record.history)
                )
                await publish_event(broker, settings, message_id, body)
        return jsonify(id=message_id, status="cancelled")

    @app.get("/api/messages")
    @validate_querystring(ListQuery)
    @document_response(MessageList)
    @answers(
        (200, "The records, newest first, and next_cursor for the next page."),
        400,
        401,
        (503, STORE_DOWN),
    )
    @security_scheme([{"token": []}])
    async def list_messages(query_args: ListQuery) -> ResponseReturnValue:
        """Messages, newest first: of one status, to one recipient, accepted in a time
        range; a page at a time (?cursor= is the next_cursor of the page before)."""
        try:
            before = decode_cursor(query_args.cursor) if query_args.cursor else None
            since = parse_time(query_args.since, "since") if query_args.since else None
            until = parse_time(query_args.until, "until") if query_args.until else None
            recipient = suppression_address(query_args.recipient) if query_args.recipient else None
            meta = None
            if query_args.metadata is not None:
                key, _, value = query_args.metadata.partition(":")
                meta = (key, value)
        except InvalidMessage as exc:
            return json_error(exc.reason, 400, field=exc.field)
        async with listing.turn():
            try:
                records = await store().list(
                    query_args.status,
                    query_args.limit,
                    query_args.tag,
                    meta,
                    before=before,
                    recipient=recipient,
                    since=since,
                    until=until,
                )
            except StoreUnavailable as exc:
                log.error("listing messages: store unavailable: %s", exc)
                return json_error("the message store is unavailable; try again", 503, RETRY)
            cursor = None
            if len(records) == query_args.limit:
                cursor = encode_cursor(records[-1].created_at, records[-1].id)
            return jsonify(messages=[r.to_json() for r in records], next_cursor=cursor)

    # -- the suppression list --------------------------------------------------------

    @app.get("/api/suppressions")
    @validate_querystring(SuppressionQuery)
    @document_response(SuppressionList)
    @answers((200, "The suppressed addresses, in address order."), 400, 401, (503, STORE_DOWN))
    @security_scheme([{"token": []}])
    async def list_suppressions(query_args: SuppressionQuery) -> ResponseReturnValue:
        """The addresses never sent to: refused as unknown (5.1.x), or added here."""
        try:
            found = await store().suppressions(query_args.limit, query_args.cursor)
        except StoreUnavailable as exc:
            log.error("listing suppressions: store unavailable: %s", exc)
            return json_error("the message store is unavailable; try again", 503, RETRY)
        cursor = found[-1]["address"] if len(found) == query_args.limit else None
        return jsonify(suppressions=found, next_cursor=cursor)

    @app.put("/api/suppressions/<address>")
    @validate_request(SuppressionRequest)
    @document_response(Suppression)
    @answers(
        (200, "On the list (added, or its reason replaced)."),
        400,
        401,
        (404, NO_ROUTE),
        413,
        415,
        (503, STORE_DOWN),
    )
    @security_scheme([{"token": []}])
    async def put_suppression(address: str, data: SuppressionRequest) -> ResponseReturnValue:
        """Suppress an address: later messages are not sent to it (result 'suppressed').
        A worker sees it within SUPPRESSION_REFRESH seconds."""
        try:
            key = suppression_address(address)
        except InvalidMessage as exc:
            return json_error(exc.reason, 400, field="address")
        reason = data.reason or "added by an operator"
        if "\0" in reason:
            return json_error("reason must not contain NUL", 400, field="reason")
        try:
            await store().suppress({key: reason}, "operator")
            entry = await store().suppressions(1, None, only=key)
        except StoreUnavailable as exc:
            log.error("suppressing %s: store unavailable: %s", key, exc)
            return json_error("the message store is unavailable; try again", 503, RETRY)
        log.info("suppressed %s (by %s)", key, g.client.address)
        return jsonify(entry[0])

    @app.delete("/api/suppressions/<address>")
    @document_response(Unsuppressed)
    @answers(
        (200, "Off the list: {address, removed} (removed: false when it was not on it)."),
        400,
        401,
        (404, NO_ROUTE),
        (503, STORE_DOWN),
    )
    @security_scheme([{"token": []}])
    async def delete_suppression(address: str) -> Response:
        """Send to an address again (workers notice within SUPPRESSION_REFRESH seconds)."""
        try:
            key = suppression_address(address)
        except InvalidMessage as exc:
            return json_error(exc.reason, 400, field="address")
        try:
            removed = await store().unsuppress(key)
        except StoreUnavailable as exc:
            log.error("unsuppressing %s: store unavailable: %s", key, exc)
            return json_error("the message store is unavailable; try again", 503, RETRY)
        if removed:
            log.info("unsuppressed %s (by %s)", key, g.client.address)
        return jsonify(address=key, removed=removed)

    @app.get("/api/dead-letters")
    @document_response(DeadLetterList)
    @answers(
        (200, "Every letter in the dead-letter queue, in queue order, and why."),
        400,
        401,
        (
            503,
            "RabbitMQ is unavailable, or another listing or re-queue held the dead-letter "
            "queue for 10 s.",
        ),
    )
    @security_scheme([{"token": []}])
    async def list_dead_letters() -> Response:
        """Every letter in the dead-letter queue, in queue order, and why (python admin.py
        re-queues). 503 when RabbitMQ is unreachable or another listing or re-queue held
        the queue for 10 s."""
        try:
            seen = await dead_letter_listings.read()
        except DeadLettersBusy as exc:
            log.warning("listing dead letters: %s", exc)
            return json_error(f"{exc}; try again", 503, RETRY)
        except BrokerUnavailable as exc:
            log.error("listing dead letters: %s", exc)
            return json_error("the mail queue is unavailable; try again", 503, RETRY)
        return jsonify(dead_letters=[dataclasses.asdict(s) for s in seen])

    @app.get("/api/stats")
    @document_response(Stats)
    @answers((200, "Queue depths and records by status."), 400, 401, (503, STORE_DOWN))
    @security_scheme([{"token": []}])
    async def stats() -> Response:
        """Messages ready in each queue, and message records by status."""
        try:
            counts = await store().count_by_status()
        except StoreUnavailable as exc:
            log.error("counting messages: store unavailable: %s", exc)
            return json_error("the message store is unavailable; try again", 503, RETRY)
        queues = await depths.read()
        return jsonify(
            queues=queues, messages={status: counts.get(status, 0) for status in STATUSES}
        )

    @app.get("/metrics")
    @answers(
        (200, "Prometheus metrics (text exposition format)."),
        400,
        (401, "Without a token, unless METRICS_PUBLIC=true or a direct loopback client."),
        media="text",
    )
    @security_scheme([{"token": []}])
    async def prometheus_metrics() -> Response:
        """Prometheus metrics: this server's (or all server processes') counts, and the
        queue depths."""
        body = metrics.render(settings.prometheus_multiproc_dir, await depths.families())
        return Response(body, status=200, content_type=metrics.CONTENT_TYPE)

    @app.get("/logs")
    @validate_querystring(LogsQuery)
    @document_response(LogLines)
    @answers((200, "The last lines of the talktome log, oldest first."), 400, 401)
    @security_scheme([{"token": []}])
    async def logs(query_args: LogsQuery) -> ResponseReturnValue:
        """The last lines of the ?talktome log."""
        return jsonify(lines=await talklog.tail(query_args.lines))

    @app.get("/healthz")
    @answers((200, "ok: the process is up."), 400, media="text")
    async def healthz() -> Response:
        """The process is up."""
        return text("ok\n")

    @app.get("/readyz")
    @answers(
        (200, "ready: connected to RabbitMQ, and the database is usable."),
        400,
        (503, "not ready: <why> (no connection to RabbitMQ, or the database is unusable)."),
        media="text",
    )
    async def readyz() -> Response:
        """200 while the RabbitMQ connection is open and the database usable."""
        if not broker.is_ready:
            return text("not ready: no connection to RabbitMQ\n", 503)
        if problem := await store().check():
            return text(f"not ready: {problem}\n", 503)
        return text("ready\n")

    # The web page and its endpoints (after the gate, which guards them as any other).
    web.register(
        app, web.Context(settings=settings, store=store, describe_validation=describe_validation)
    )
    return app


_MESSAGE = TypeAdapter(MessageRequest)
_FORM_LISTS = {"to": "to", "cc": "cc", "bcc": "bcc", "tag": "tags", "tags": "tags"}
_FORM_MAPS = {"metadata.": "metadata", "header.": "headers", "variable.": "variables"}


async def form_body() -> dict[str, Any]:
    """A multipart/form-data message request as the JSON body it stands for."""
    form = await request.form
    files = await request.files
    body: dict[str, Any] = {}
    for name in form:
        values = form.getlist(name)
        prefix = next((p for p in _FORM_MAPS if name.startswith(p)), None)
        if name in _FORM_LISTS:
            body.setdefault(_FORM_LISTS[name], []).extend(values)
        elif prefix is not None:
            body.setdefault(_FORM_MAPS[prefix], {})[name[len(prefix) :]] = values[-1]
        elif len(values) > 1:
            raise InvalidMessage(f"{name} is given more than once", name)
        else:
            body[name] = values[0]
    for name in files:
        if name != "attachment":
            raise InvalidMessage(f"unknown file field {name!r}: send files as 'attachment'", name)
        body["attachments"] = [
            {
                "filename": upload.filename or "",
                "content_type": upload.mimetype or None,
                "content": base64.b64encode(upload.read()).decode("ascii"),
            }
            for upload in files.getlist(name)
        ]
    return body


def store_down(what: str, exc: StoreUnavailable) -> Response:
    """The 503 of a route whose database read or write failed."""
    log.error("%s: store unavailable: %s", what, exc)
    return json_error("the message store is unavailable; try again", 503, RETRY)


def refusal_code(exc: InvalidMessage) -> int:
    """413 for attachments over MAX_ATTACHMENT_BYTES, 400 for any other invalid message."""
    return 413 if isinstance(exc, AttachmentTooLarge) else 400


def encode_cursor(created_at: datetime, message_id: str) -> str:
    """A page's position: the (created_at, id) of its last record, opaque to clients."""
    raw = f"{created_at.isoformat()}|{message_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        at_text, _, message_id = raw.partition("|")
        at = datetime.fromisoformat(at_text)
    except (ValueError, UnicodeDecodeError, binascii.Error):
        raise InvalidMessage("cursor is not a cursor this API gave", "cursor") from None
    if not MESSAGE_ID.fullmatch(message_id) or at.tzinfo is None:
        raise InvalidMessage("cursor is not a cursor this API gave", "cursor")
    return at, message_id


def parse_time(value: str, field: str) -> datetime:
    """An RFC 3339 time with an offset (a query filter), in UTC."""
    try:
        at = datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
    except ValueError:
        at = None
    if at is None or at.tzinfo is None:
        raise InvalidMessage(f"{field} must be an RFC 3339 time with an offset", field)
    return at.astimezone(UTC)


def suppression_address(value: str) -> str:
    """An address from a URL or query, normalised as the suppression list compares it."""
    return suppression_key(strip_mailto(value))


def describe_validation(error: Any) -> tuple[str | None, str]:
    """The first problem of a pydantic ValidationError: (field, plain reason)."""
    errors = error.errors() if hasattr(error, "errors") else []
    if not errors:
        return None, "the request body is not valid JSON for this endpoint"
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if not isinstance(part, int)]
    field = loc[0] if loc else None
    if first.get("type") == "extra_forbidden":
        return field, f"unknown field {field!r}"
    if first.get("type") == "missing":
        return field, f"{field} is required"
    message = str(first.get("msg", "is not valid"))
    return field, f"{field}: {message}" if field else message


def json_error(
    message: str, status: int, headers: dict[str, str] | None = None, field: str | None = None
) -> Response:
    body: dict[str, Any] = {"error": message}
    if field is not None:
        body["field"] = field
    response = jsonify(body)
    response.status_code = status
    response.headers.update(headers or {})
    return response


def error_response(
    message: str, status: int, headers: dict[str, str] | None = None, path: str | None = None
) -> Response:
    """JSON for the JSON API (``/api/...`` and ``/logs``), plain text for the legacy GET
    and everything else. ``path``: the request's (default: Quart's request)."""
    path = request.path if path is None else path
    if path.startswith("/api/") or path == "/logs":
        return json_error(message, status, headers)
    return text(f"{message}\n", status, headers)


def refusal(exc: Denied, client: Client, path: str) -> Response:
    """The answer to a :class:`Denied` (401, 429), logged if it is a rate limit."""
    if exc.status == 429:
        log.warning("rate limited %s on %s: %s", client.address, path, exc.message)
    return error_response(exc.message, exc.status, exc.headers, path)


class _LazyApp:
    """``hypercorn server:app``: build the real app from the environment on first use."""

    def __init__(self) -> None:
        self._app: Quart | None = None

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if self._app is None:
            settings = Settings.from_env()
            configure_logging(settings)
            self._app = create_app(settings)
        await self._app(scope, receive, send)


app = _LazyApp()


async def _open_and_close(settings: Settings) -> None:
    store = await Store.open(settings)
    await store.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Mailroom's HTTP server (HOST:PORT).")
    parser.add_argument(
        "--listen-fd",
        type=int,
        help="serve on this inherited listening socket instead of HOST:PORT (launcher.py)",
    )
    parser.add_argument(
        "--probe-port",
        type=int,
        help="also serve on 127.0.0.1:PORT, this process alone (the launcher's probes)",
    )
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"server: configuration error: {exc}", file=sys.stderr)
        return 2
    try:
        TalkLog(settings.talktome_log).check()
    except ConfigError as exc:
        print(f"server: configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings)
    try:
        # Opened once before serving, so that a database that cannot be used (a missing
        # PostgreSQL database the user may not create, say) is one line, not a traceback.
        uvloop.run(_open_and_close(settings))
    except StoreUnavailable as exc:
        flush_logging()  # what led to it first
        print(f"server: {exc} (DATABASE_URL)", file=sys.stderr)
        return 1
    quart_app = create_app(settings)
    config = HypercornConfig()
    if args.listen_fd is not None:
        config.bind = [f"fd://{args.listen_fd}"]
    else:
        config.bind = [f"{settings.host}:{settings.port}"]
    if args.probe_port is not None:
        config.bind.append(f"127.0.0.1:{args.probe_port}")
    # Every socket: Hypercorn calls listen() again with this on the launcher's shared
    # socket too (fd://), whose own backlog it would otherwise cut to its default, 100.
    config.backlog = LISTEN_BACKLOG
    config.accesslog = None
    config.errorlog = None  # our own logging (configured above) reports what matters
    # Time for the requests in flight at shutdown to finish (a publish waits at most
    # PUBLISH_TIMEOUT) before after_serving closes the broker and the store.
    config.graceful_timeout = max(10.0, settings.publish_timeout + 5)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        log.info("serving on http://%s:%d", settings.host, settings.port)
        await serve(quart_app, config, stop)

    configure_gc()
    uvloop.run(run(), loop_factory=acceptloop.Loop)
    return 0


if __name__ == "__main__":
    # Run the module under its own name, so its loggers say "server", not "__main__".
    import server

    sys.exit(server.main())
