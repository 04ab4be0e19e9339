"""The HTTP service: accept mail requests, store them in RabbitMQ, answer at once.

``python server.py`` serves on HOST:PORT with Hypercorn; ``hypercorn server:app`` works
too (``app`` builds itself from the environment on first use). Routes:

* ``GET /?talktome``            append the local time to TALKTOME_LOG
* ``GET /?sendmail=<address>``  queue the fixed test mail (``mailto:`` accepted)
* ``POST /api/messages``        queue a mail described by JSON
* ``GET /healthz``, ``GET /readyz``
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import signal
import sys
from typing import Any

from hypercorn.asyncio import serve
from hypercorn.config import Config as HypercornConfig
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope
from quart import Quart, Response, jsonify, request

from broker import Broker
from config import Settings
from errors import BrokerUnavailable, ConfigError, InvalidMessage
from messages import MailJob, legacy_job, new_job
from store import STATUSES, IdempotencyConflict, Store, StoreUnavailable
from talklog import TalkLog

log = logging.getLogger(__name__)

USAGE = """Mailroom: asynchronous mail dispatch.

  GET  /?talktome                 log the current time
  GET  /?sendmail=<address>       queue a test mail to <address> (mailto: accepted)
  POST /api/messages              queue a mail: {"to", "subject", "text", "html"?, "reply_to"?}
  GET  /healthz, /readyz          liveness, readiness
"""


RETRY = {"Retry-After": "5"}
MESSAGE_ID = re.compile(r"[0-9a-f]{32}")


def client_identity() -> str:
    """Who is asking, for idempotency keys: the credential if any, else the address."""
    credential = request.headers.get("Authorization")
    if credential:
        return "auth:" + hashlib.sha256(credential.encode()).hexdigest()[:40]
    return f"addr:{request.remote_addr}"[:64]


def text(body: str, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(body, status=status, mimetype="text/plain", headers=headers)


def create_app(settings: Settings) -> Quart:
    """Build the app. Connections are opened when serving starts, closed when it stops."""
    app = Quart(__name__)
    app.config["MAILROOM_SETTINGS"] = settings
    broker = Broker(settings, "mailroom-server")
    talklog = TalkLog(settings.talktome_log)
    app.extensions["mailroom_broker"] = broker
    stores: list[Store] = []

    def store() -> Store:
        return stores[0]

    @app.before_serving
    async def startup() -> None:
        await talklog.open()
        stores.append(await Store.open(settings))
        await broker.start()

    @app.after_serving
    async def shutdown() -> None:
        await broker.close()
        for opened in stores:
            await opened.close()
        await talklog.close()

    async def enqueue(job: MailJob) -> None:
        """Publish (confirmed), then record. The record is best effort: the message is
        safe in RabbitMQ once confirmed, and a worker creates a missing record."""
        await broker.publish(job.to_bytes(), job.id)
        try:
            await store().insert_queued(job)
        except StoreUnavailable as exc:
            log.warning("message %s: queued, but its record waits for the worker: %s", job.id, exc)
        log.info("message %s: queued for %s", job.id, ", ".join(job.to))

    def unavailable(exc: BrokerUnavailable, job: MailJob) -> str:
        log.error("message %s: not queued: %s", job.id, exc)
        return "the mail queue is unavailable; nothing was queued, try again shortly"

    @app.get("/")
    async def index() -> Response:
        args = request.args
        if "sendmail" in args:
            values = args.getlist("sendmail")
            if len(values) != 1:
                return text("Give exactly one sendmail address.\n", 400)
            try:
                job = legacy_job(values[0])
            except InvalidMessage as exc:
                return text(f"Invalid address: {exc.reason}\n", 400)
            try:
                await enqueue(job)
            except BrokerUnavailable as exc:
                return text(f"{unavailable(exc, job)}\n", 503, RETRY)
            return text(f"Email to {job.to[0]} queued (id {job.id})\n")
        if "talktome" in args:
            stamp = await talklog.append(f"talktome from {request.remote_addr}")
            return text(f"Logged the current time: {stamp}\n")
        return text(USAGE)

    @app.post("/api/messages")
    async def create_message() -> tuple[Response, int] | tuple[Response, int, dict[str, str]]:
        if not request.is_json:
            return jsonify(error="send JSON with Content-Type: application/json"), 415
        body: Any = await request.get_json(silent=True)
        if not isinstance(body, dict):
            return jsonify(error="the body must be a JSON object"), 400
        unknown = sorted(set(body) - {"to", "subject", "text", "html", "reply_to"})
        if unknown:
            return jsonify(error=f"unknown field {unknown[0]!r}", field=unknown[0]), 400
        for required in ("to", "subject", "text"):
            if required not in body:
                return jsonify(error=f"{required} is required", field=required), 400
        try:
            job = new_job(
                to=body["to"],
                subject=body["subject"],
                text=body["text"],
                html=body.get("html"),
                reply_to=body.get("reply_to"),
            )
        except InvalidMessage as exc:
            return jsonify(error=exc.reason, field=exc.field), 400
        key = request.headers.get("Idempotency-Key")
        if key is not None:
            if not 1 <= len(key) <= 255 or not key.isprintable():
                return jsonify(error="Idempotency-Key must be 1-255 printable characters"), 400
            client = client_identity()
            digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
            try:
                earlier = await store().claim_idempotency_key(client, key, digest, job.id)
            except IdempotencyConflict as exc:
                return jsonify(error=str(exc)), 422
            except StoreUnavailable as exc:
                log.error("message %s: idempotency store unavailable: %s", job.id, exc)
                return jsonify(error="the message store is unavailable; try again"), 503, RETRY
            if earlier is not None:
                if await store().get(earlier) is None:
                    return jsonify(error="a request with this Idempotency-Key is in progress"), 409
                replay = {"Idempotent-Replayed": "true"}
                return jsonify(id=earlier, status="queued"), 202, replay
        try:
            await enqueue(job)
        except BrokerUnavailable as exc:
            if key is not None:
                with contextlib.suppress(StoreUnavailable):
                    await store().release_idempotency_key(client_identity(), key)
            return jsonify(error=unavailable(exc, job)), 503, RETRY
        return jsonify(id=job.id, status="queued"), 202, {"Location": f"/api/messages/{job.id}"}

    @app.get("/api/messages/<message_id>")
    async def get_message(message_id: str) -> tuple[Response, int] | Response:
        if not MESSAGE_ID.fullmatch(message_id):
            return jsonify(error="no such message"), 404
        try:
            record = await store().get(message_id)
        except StoreUnavailable as exc:
            log.error("message %s: store unavailable: %s", message_id, exc)
            return jsonify(error="the message store is unavailable; try again"), 503
        if record is None:
            return jsonify(error="no such message"), 404
        return jsonify(record.to_json())

    @app.get("/api/messages")
    async def list_messages() -> tuple[Response, int] | Response:
        status = request.args.get("status")
        if status is not None and status not in STATUSES:
            return jsonify(error=f"status must be one of {', '.join(STATUSES)}"), 400
        try:
            limit = int(request.args.get("limit", "50"))
        except ValueError:
            limit = 0
        if not 1 <= limit <= 500:
            return jsonify(error="limit must be a whole number from 1 to 500"), 400
        try:
            records = await store().list(status, limit)
        except StoreUnavailable as exc:
            log.error("listing messages: store unavailable: %s", exc)
            return jsonify(error="the message store is unavailable; try again"), 503
        return jsonify(messages=[r.to_json() for r in records])

    @app.get("/healthz")
    async def healthz() -> Response:
        return text("ok\n")

    @app.get("/readyz")
    async def readyz() -> Response:
        if broker.is_ready:
            return text("ready\n")
        return text("not ready: no connection to RabbitMQ\n", 503)

    return app


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("aiormq").setLevel(logging.WARNING)
    logging.getLogger("aio_pika").setLevel(logging.WARNING)


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
    config.graceful_timeout = 10

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        log.info("serving on http://%s:%d", settings.host, settings.port)
        await serve(quart_app, config, shutdown_trigger=stop.wait)

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
