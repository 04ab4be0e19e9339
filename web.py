"""The web page, and the API endpoints only it needed.

* ``GET /`` for a browser (``Accept`` prefers ``text/html`` to ``text/plain``): the page,
  ``web/index.html``. Anything else that asks for ``/`` (curl, scripts), and every
  ``?talktome`` / ``?sendmail=`` request, still gets the text answers of server.py.
* ``GET /ui/<file>``: the page's script, style sheet and icon (``web/``).
* ``GET /api/outbox[?limit=&message_id=]``, ``GET /api/outbox/<name>``,
  ``GET /api/outbox/<name>/raw``: the mails the local capture SMTP server wrote to
  ``OUTBOX_DIR`` (outbox.py); off, saying why, when ``SMTP_HOST`` is set.
* ``POST /api/dead-letters/requeue``: what ``admin.py dead requeue`` does.

The page holds no data and needs no token. Everything it shows comes from the JSON API
under ``/api/``, behind the same guard as any other client (server.py's ``gate``): a
direct loopback client needs no token; anyone else gets 401, and the page then asks for
the token and sends it as ``Authorization: Bearer``. The page is served with a strict
Content-Security-Policy: scripts, styles and images from this origin only, nothing
inline, no frames but the mail preview, and Trusted Types, so that markup can only be
written into the sandboxed preview frame.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from pydantic import TypeAdapter, ValidationError
from quart import Blueprint, Quart, Response, g, jsonify, request
from quart_schema import (
    ResponseReturnValue,
    document_request,
    document_response,
    security_scheme,
    validate_querystring,
)

from apidoc import answers
from config import Settings
from deadletters import DeadLettersBusy, dead_letters
from errors import BrokerUnavailable
from outbox import NAME, Outbox, OutboxError
from schemas import (
    OutboxList,
    OutboxMail,
    OutboxQuery,
    RequeueAnswer,
    RequeueRequest,
)
from store import Store, StoreUnavailable

log = logging.getLogger(__name__)
_T = TypeVar("_T")

WEB_DIR = Path(__file__).resolve().parent / "web"
RETRY = {"Retry-After": "5"}

# The page: its own files only; no inline script or style; fetch() to this origin only;
# no frame may load anything (the mail preview is an about:srcdoc frame, which
# inherits this policy and adds its own); and markup only through the one Trusted Types
# policy that fills the preview.
PAGE_CSP = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "frame-src 'none'",
        "child-src 'none'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
        "require-trusted-types-for 'script'",
        "trusted-types mailroom-preview",
    ]
)
SECURITY_HEADERS = {
    "Content-Security-Policy": PAGE_CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    # The page changes with the program: always ask (a 304 when it did not change).
    "Cache-Control": "no-cache",
}

_REQUEUE = TypeAdapter(RequeueRequest)


@dataclass(frozen=True)
class Context:
    """What the web endpoints use of the server."""

    settings: Settings
    store: Callable[[], Store]
    describe_validation: Callable[..., tuple[str | None, str]]


def wants_page() -> bool:
    """A browser asking for ``/``: it prefers text/html to text/plain (curl's ``*/*``
    does not). The legacy queries never get the page."""
    if request.path != "/" or request.method not in ("GET", "HEAD"):
        return False
    if "sendmail" in request.args or "talktome" in request.args:
        return False
    accept = request.accept_mimetypes
    return accept.quality("text/html") > accept.quality("text/plain")


def outbox_off_reason(settings: Settings) -> str | None:
    """Why there is no outbox to show, or None in local capture mode."""
    if settings.smtp_host is None:
        return None
    return (
        f"Mail goes out through {settings.smtp_host}:{settings.smtp_port} (SMTP_HOST is set), "
        "so nothing is captured here. The outbox shows the mails of local capture mode: "
        f"without SMTP_HOST, ./scripts/run.sh delivers every mail to a local capture SMTP "
        f"server that writes it to {settings.outbox_dir}/."
    )


def json_error(message: str, status: int, headers: dict[str, str] | None = None) -> Response:
    response = jsonify(error=message)
    response.status_code = status
    response.headers.update(headers or {})
    return response


NO_MAIL = "No such mail in the outbox, or the outbox is off (SMTP_HOST is set)."
UNREADABLE = "The stored file cannot be read as a mail."


def register(app: Quart, context: Context) -> None:
    """Add the page and its endpoints to ``app`` (after server.py's gate is registered, so
    that the gate runs first)."""
    c = context
    blueprint = Blueprint("web", __name__, static_folder=str(WEB_DIR), static_url_path="/ui")
    outbox = Outbox(c.settings.outbox_dir)
    off_reason = outbox_off_reason(c.settings)
    page: list[bytes] = []

    @blueprint.before_app_request
    async def serve_page() -> Response | None:
        if not wants_page():
            return None
        if not page:
            page.append(await asyncio.to_thread((WEB_DIR / "index.html").read_bytes))
        response = Response(page[0], mimetype="text/html", headers=SECURITY_HEADERS)
        response.headers["Vary"] = "Accept"
        return response

    @blueprint.after_request
    async def static_headers(response: Response) -> Response:
        response.headers.update(SECURITY_HEADERS)
        response.headers.pop("Expires", None)  # "no-cache" it is: revalidate (ETag)
        return response

    app.register_blueprint(blueprint)

    # -- the outbox ----------------------------------------------------------------------

    async def captured(
        name: str, load: Callable[[str], Awaitable[_T | None]], doing: str
    ) -> _T | Response:
        """The captured mail ``name`` as ``load`` reads it, or the error to answer: 404
        when the outbox is off or has no such mail, 422 when it is unreadable ("cannot
        {doing} this mail")."""
        if off_reason is not None:
            return json_error(f"the outbox is off: {off_reason}", 404)
        if not NAME.fullmatch(name):
            return json_error("no such mail in the outbox", 404)
        try:
            found = await load(name)
        except OutboxError as exc:
            return json_error(f"cannot {doing} this mail: {exc}", 422)
        if found is None:
            return json_error("no such mail in the outbox", 404)
        return found

    @app.get("/api/outbox")
    @validate_querystring(OutboxQuery)
    @document_response(OutboxList)
    @answers(
        (200, "The newest captured mails (or, with SMTP_HOST set, why there are none)."), 400, 401
    )
    @security_scheme([{"token": []}])
    async def list_outbox(query_args: OutboxQuery) -> ResponseReturnValue:
        """The mails the local capture SMTP server stored, newest first (off, saying why,
        when SMTP_HOST is set)."""
        if off_reason is not None:
            return jsonify(enabled=False, reason=off_reason, directory=None, total=0, mails=[])
        total, mails = await outbox.newest(query_args.limit, query_args.message_id)
        return jsonify(
            enabled=True,
            reason=None,
            directory=str(c.settings.outbox_dir.resolve()),
            total=total,
            mails=[m.to_json() for m in mails],
        )

    @app.get("/api/outbox/<name>")
    @document_response(OutboxMail)
    @answers((200, "One captured mail."), 400, 401, (404, NO_MAIL), (422, UNREADABLE))
    @security_scheme([{"token": []}])
    async def read_outbox(name: str) -> Response:
        """One captured mail: its headers, text, HTML and attachments. Show its HTML only in
        a sandboxed frame that may not run scripts or load anything."""
        mail = await captured(name, outbox.read, "show")
        if isinstance(mail, Response):
            return mail
        return jsonify(mail.to_json())

    @app.get("/api/outbox/<name>/raw")
    @answers(400, 401, (404, NO_MAIL), (422, UNREADABLE))
    @answers(
        (200, "The captured mail as received (message/rfc822), to save as .eml."), media="text"
    )
    @security_scheme([{"token": []}])
    async def download_outbox(name: str) -> Response:
        """The captured mail as it was received (message/rfc822), to save as .eml."""
        data = await captured(name, outbox.raw, "download")
        if isinstance(data, Response):
            return data
        return Response(
            data,
            mimetype="message/rfc822",
            headers={
                "Content-Disposition": f'attachment; filename="{name}"',
                "X-Content-Type-Options": "nosniff",
            },
        )

    # -- dead letters --------------------------------------------------------------------

    @app.post("/api/dead-letters/requeue")
    @document_request(RequeueRequest)
    @document_response(RequeueAnswer)
    @answers(
        (200, "What was re-queued, kept and missing, and what the queue held."),
        400,
        401,
        413,
        415,
        (
            503,
            "RabbitMQ or the database is unavailable, or another listing or re-queue held "
            "the dead-letter queue for 10 s; try again after Retry-After.",
        ),
    )
    @security_scheme([{"token": []}])
    async def requeue_dead_letters() -> Response:
        """Send dead letters again (what python admin.py dead requeue does): {"ids": [...]}
        or {"all": true}. A re-queued message starts over with a fresh retry budget. 503
        when RabbitMQ or the database is unavailable, or another listing or re-queue held
        the dead-letter queue for 10 s."""
        if request.mimetype != "application/json":
            return json_error("send JSON with Content-Type: application/json", 415)
        try:
            asked = _REQUEUE.validate_python(await request.get_json())
        except ValidationError as exc:
            field, reason = c.describe_validation(exc)
            response = jsonify(error=reason, field=field)
            response.status_code = 400
            return response
        if asked.all == bool(asked.ids):
            return json_error('give either "ids" (a non-empty list) or "all": true', 400)
        wanted = set(asked.ids or ())
        try:
            # Shielded: a client that hangs up must not cut a re-queue in half.
            seen = await asyncio.shield(dead_letters(c.settings, wanted, asked.all, c.store()))
        except DeadLettersBusy as exc:
            log.warning("re-queueing dead letters: %s", exc)
            return json_error(f"{exc}; try again", 503, RETRY)
        except (BrokerUnavailable, StoreUnavailable) as exc:
            log.error("re-queueing dead letters: %s", exc)
            return json_error(
                "the mail queue or the database is unavailable; try again", 503, RETRY
            )
        requeued = [s.id for s in seen if s.requeued]
        kept = [s.id for s in seen if not s.requeued and (asked.all or s.id in wanted)]
        missing = sorted(wanted - {s.id for s in seen})
        log.info(
            "dead letters: %d re-queued, %d kept, %d not found, asked by %s",
            len(requeued),
            len(kept),
            len(missing),
            g.client.address,
        )
        return jsonify(
            requeued=requeued,
            kept=kept,
            missing=missing,
            dead_letters=[dataclasses.asdict(s) for s in seen],
        )
