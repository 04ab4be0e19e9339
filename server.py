"""The HTTP service: accept mail requests, store them in RabbitMQ, answer at once.

``python server.py`` serves on HOST:PORT with Hypercorn; ``hypercorn server:app`` works
too (``app`` builds itself from the environment on first use). Routes:

* ``GET /?talktome``            append the local time to TALKTOME_LOG
* ``GET /?sendmail=<address>``  queue the fixed test mail (``mailto:`` accepted)
* ``POST /api/messages``        queue a mail described by JSON
* ``POST /api/messages/batch``  queue up to 500 of them (batch.py)
* ``GET /api/messages[/<id>]``  what became of messages
* ``GET /api/dead-letters``     what could not be sent, and why
* ``GET /logs``                 the last lines of the talktome log
* ``GET /healthz``, ``GET /readyz``, ``GET /openapi.json``

Sending and reading need a token or a direct loopback client (see guard.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import re
import signal
import sys
from typing import Any

import uvloop
from hypercorn.config import Config as HypercornConfig
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope
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
from werkzeug.exceptions import HTTPException

import batch
from broker import Broker
from config import Settings, configure_logging
from deadletters import DeadLetterListings, DeadLettersBusy
from errors import BrokerUnavailable, ConfigError, InvalidJSON, InvalidMessage, PublishUnconfirmed
from graceful import serve
from guard import Denied, Guard, bearer_token, identify
from messages import (
    InputLimits,
    MailJob,
    addr_spec,
    legacy_job,
    parse_json,
    request_job,
    strict_query,
)
from schemas import (
    DeadLetterList,
    Error,
    IdempotencyHeaders,
    LegacyQuery,
    ListQuery,
    LogLines,
    LogsQuery,
    MessageList,
    MessageRequest,
    MessageView,
    Queued,
)
from store import IdempotencyConflict, Store, StoreUnavailable
from talklog import TalkLog

log = logging.getLogger(__name__)

USAGE = """Mailroom: asynchronous mail dispatch.

  GET  /?talktome                 log the current time
  GET  /?sendmail=<address>       queue a test mail to <address> (mailto: accepted)
  POST /api/messages              queue a mail: {"to", "subject", "text", "html"?, "reply_to"?}
  POST /api/messages/batch        queue up to 500 mails: a JSON array of those objects
  GET  /api/messages[/<id>]       what became of messages (?status=, ?limit=)
  GET  /api/dead-letters          what could not be sent, and why
  GET  /logs?lines=N              the last lines of the talktome log
  GET  /healthz, /readyz          liveness, readiness
  GET  /openapi.json              the API description

Sending and reading need 'Authorization: Bearer <API_TOKEN>' unless you are on this machine.
"""


RETRY = {"Retry-After": "5"}
MESSAGE_ID = re.compile(r"[0-9a-f]{32}")


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
    app.config["MAILROOM_SETTINGS"] = settings
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    QuartSchema(
        app,
        info=Info(title="Mailroom", version="1.0"),
        swagger_ui_path=None,
        redoc_ui_path=None,
        scalar_ui_path=None,
        security_schemes={"token": {"type": "http", "scheme": "bearer"}},
    )
    app.json = StrictJSON(app, app.json)
    broker = Broker(settings, "mailroom-server")
    talklog = TalkLog(settings.talktome_log)
    guard = Guard(settings)
    limits = InputLimits(
        max_recipients=settings.max_recipients,
        max_subject_chars=settings.max_subject_chars,
        max_body_chars=settings.max_body_chars,
    )
    app.extensions["mailroom_broker"] = broker
    dead_letter_listings = DeadLetterListings(settings)
    stores: list[Store] = []

    def store() -> Store:
        return stores[0]

    housekeeping: list[asyncio.Task[None]] = []
    # Lists take turns, one at a time in this process: a list is the costliest read (up
    # to 500 records decoded and encoded again on the event loop), and clients listing in
    # a loop must not take the process from the accepts. Reads by id do not wait.
    listing = asyncio.Semaphore(1)

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
            tokens = args.getlist("token")
            if len(tokens) > 1:
                return text("Give at most one token.\n", 400)
            g.token = g.token or (tokens[0] if tokens else None)
            guard.authorize(client, g.token)
            await guard.check_send(client)
        elif path.startswith("/api/") or path == "/logs":
            guard.authorize(client, g.token)
            if request.method == "POST" and path in ("/api/messages", "/api/messages/batch"):
                await guard.check_send(client)
                if request.mimetype != "application/json":
                    return json_error("send JSON with Content-Type: application/json", 415)
        elif path == "/" and "talktome" in args:
            await guard.limit_talktome(client)
        return None

    @app.errorhandler(Denied)
    async def denied(exc: Denied) -> Response:
        if exc.status == 429:
            log.warning("rate limited %s on %s: %s", g.client.address, request.path, exc.message)
        return error_response(exc.message, exc.status, exc.headers)

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
        return error_response(message, code, dict(exc.get_headers()) if code == 405 else None)

    # -- sending -------------------------------------------------------------------------

    async def record(job: MailJob) -> None:
        """The record is best effort: the message is safe in RabbitMQ once confirmed, and
        a worker creates a missing record."""
        try:
            await store().insert_queued(job)
        except StoreUnavailable as exc:
            log.warning("message %s: queued, but its record waits for the worker: %s", job.id, exc)

    async def enqueue(job: MailJob, key: str | None = None, client: str = "") -> None:
        """Publish (confirmed), then record."""
        try:
            await broker.publish(job.to_bytes(), job.id)
        except PublishUnconfirmed as exc:
            watch_late(job, exc, key, client)
            raise
        await record(job)
        log.info(
            "message %s: queued for %d recipient(s) from %s", job.id, len(job.to), g.client.address
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

    @app.get("/")
    @document_querystring(LegacyQuery)
    async def index() -> Response:
        """The legacy API: ?talktome logs the time, ?sendmail=<address> queues a test mail."""
        args = request.args
        if "sendmail" in args:
            values = args.getlist("sendmail")
            if len(values) != 1:
                return text("Give exactly one sendmail address.\n", 400)
            try:
                job = legacy_job(values[0])
            except InvalidMessage as exc:
                return text(f"Invalid address: {exc.reason}\n", 400)
            await guard.spend_send(g.client, [addr_spec(a) for a in job.to])
            try:
                await enqueue(job)
            except BrokerUnavailable as exc:
                return text(f"{unavailable(exc, job)}\n", 503, RETRY)
            return text(f"Email to {job.to[0]} queued (id {job.id})\n")
        if "talktome" in args:
            stamp = await talklog.append(f"talktome from {g.client.address}")
            return text(f"Logged the current time: {stamp}\n")
        return text(USAGE)

    @app.post("/api/messages")
    @validate_request(MessageRequest)
    @validate_headers(IdempotencyHeaders)
    @document_response(Queued, 202)
    @document_response(Error, 400)
    @security_scheme([{"token": []}])
    async def create_message(
        data: MessageRequest, headers: IdempotencyHeaders
    ) -> ResponseReturnValue:
        """Queue a mail; 202 only after RabbitMQ confirmed it is stored."""
        try:
            job = request_job(data, limits)
        except InvalidMessage as exc:
            return json_error(exc.reason, 400, field=exc.field)
        key = headers.idempotency_key
        if key is not None and not key.isprintable():
            return json_error("Idempotency-Key must be printable characters", 400)
        await guard.spend_send(g.client, [addr_spec(a) for a in job.to])
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
                if await store().get(earlier) is None:
                    return json_error("a request with this Idempotency-Key is in progress", 409)
                replay = {"Idempotent-Replayed": "true", "Location": f"/api/messages/{earlier}"}
                return jsonify(id=earlier, status="queued"), 202, replay
        try:
            await enqueue(job, key, client)
        except BrokerUnavailable as exc:
            # Unconfirmed: the key stays until settle_late knows whether it was stored.
            if key is not None and not isinstance(exc, PublishUnconfirmed):
                try:
                    await store().release_idempotency_key(client, key)
                except StoreUnavailable as release_error:
                    log.error("message %s: key not released: %s", job.id, release_error)
            return json_error(unavailable(exc, job), 503, RETRY)
        return jsonify(id=job.id, status="queued"), 202, {"Location": f"/api/messages/{job.id}"}

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

    # -- reading -------------------------------------------------------------------------

    @app.get("/api/messages/<message_id>")
    @document_response(MessageView)
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

    @app.get("/api/messages")
    @validate_querystring(ListQuery)
    @document_response(MessageList)
    @security_scheme([{"token": []}])
    async def list_messages(query_args: ListQuery) -> ResponseReturnValue:
        """Messages, newest first, optionally of one status."""
        async with listing:
            try:
                records = await store().list(query_args.status, query_args.limit)
            except StoreUnavailable as exc:
                log.error("listing messages: store unavailable: %s", exc)
                return json_error("the message store is unavailable; try again", 503, RETRY)
            return jsonify(messages=[r.to_json() for r in records])

    @app.get("/api/dead-letters")
    @document_response(DeadLetterList)
    @document_response(Error, 503)
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

    @app.get("/logs")
    @validate_querystring(LogsQuery)
    @document_response(LogLines)
    @security_scheme([{"token": []}])
    async def logs(query_args: LogsQuery) -> ResponseReturnValue:
        """The last lines of the ?talktome log."""
        return jsonify(lines=await talklog.tail(query_args.lines))

    @app.get("/healthz")
    async def healthz() -> Response:
        """The process is up."""
        return text("ok\n")

    @app.get("/readyz")
    async def readyz() -> Response:
        """200 while the RabbitMQ connection is open and the database usable."""
        if not broker.is_ready:
            return text("not ready: no connection to RabbitMQ\n", 503)
        if problem := await store().check():
            return text(f"not ready: {problem}\n", 503)
        return text("ready\n")

    return app


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


def error_response(message: str, status: int, headers: dict[str, str] | None = None) -> Response:
    """JSON for the JSON API, plain text for the legacy GET and everything else."""
    if request.path.startswith("/api/"):
        return json_error(message, status, headers)
    return text(f"{message}\n", status, headers)


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


def main() -> int:
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
    quart_app = create_app(settings)
    config = HypercornConfig()
    config.bind = [f"{settings.host}:{settings.port}"]
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

    uvloop.run(run())
    return 0


if __name__ == "__main__":
    # Run the module under its own name, so its loggers say "server", not "__main__".
    import server

    sys.exit(server.main())
