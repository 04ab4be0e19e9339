"""Build MIME messages and send them over a small pool of reused SMTP connections.

Every SMTP failure leaves this module as a :class:`TransientDeliveryError` (try again
later), :class:`PermanentDeliveryError` (give up) or :class:`SmtpAuthError` (fix the
configuration), so callers never see aiosmtplib's own exception classes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import logging
import re
import ssl
import time
from dataclasses import dataclass, field
from datetime import datetime
from email.charset import QP, Charset
from email.generator import BytesGenerator
from email.header import Header
from email.headerregistry import Address
from email.message import EmailMessage, Message
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.policy import SMTPUTF8, compat32
from email.utils import format_datetime, getaddresses, quote

import aiosmtplib
from email_validator import EmailNotValidError, validate_email

from config import Settings
from errors import (
    DeliveryError,
    PermanentDeliveryError,
    SmtpAuthError,
    SmtpConfigError,
    TransientDeliveryError,
)
from messages import MailJob, addr_spec

log = logging.getLogger(__name__)

# UTF-8 bodies as quoted-printable: readable in the raw message, safe on any transport.
_UTF8 = Charset("utf-8")
_UTF8.body_encoding = QP

# Bodies longer than this (characters) are encoded in a worker thread.
LARGE_BODY_CHARS = 100_000
# The encoded content of bodies up to this long (characters) is kept for the next mail
# with the same text (LRU, 64 of them).
CACHED_CONTENT_CHARS = 20_000
# A pooled connection idle longer than this is checked with NOOP before it is reused.
IDLE_CHECK_SECONDS = 5.0
# A pooled connection idle longer than this is closed instead of reused.
IDLE_CLOSE_SECONDS = 60.0
# RFC 5322 2.1.1: a line MUST NOT be longer than 998 characters, SHOULD be at most 78.
MAX_LINE = 998
# What makes a display name a quoted string (RFC 5322 specials, as email.utils has them).
_SPECIALS = re.compile(r'[][\\()<>@,:;".]')


@dataclass(frozen=True)
class SendResult:
    """What the SMTP server said: who it accepted, and who it refused (code, text)."""

    accepted: tuple[str, ...]
    refused: dict[str, tuple[int, str]] = field(default_factory=dict)


@functools.lru_cache(maxsize=4096)  # pure, and asked for several times per mail
def envelope_address(address: str) -> str:
    """The SMTP envelope form of an address: an IDN domain in ASCII (punycode).

    A UTF-8 local part stays as it is; sending it needs a server that offers SMTPUTF8.
    """
    spec = addr_spec(address)
    if spec.isascii():
        return spec
    try:
        valid = validate_email(spec, check_deliverability=False)
    except EmailNotValidError:
        return spec
    return valid.ascii_email or f"{valid.local_part}@{valid.ascii_domain}"


def _header_address(address: str) -> Address:
    name, spec = getaddresses([address])[0]
    spec = envelope_address(spec)
    username, _, domain = spec.rpartition("@")
    return Address(display_name=name, username=username, domain=domain)


def build_mime(job: MailJob, mail_from: str) -> Message:
    """The MIME message for ``job``: every header ASCII, RFC 2047-encoded where needed.

    Built with the classic (compat32) email classes, several times faster than the
    header-parsing EmailMessage API; CR, LF and NUL never get this far (messages.py
    refuses them). An address with a UTF-8 local part needs SMTPUTF8 and a UTF-8
    header, which only the modern API writes: :func:`_build_utf8` does those.

    Header lines are folded to 78 characters where whitespace allows and never exceed
    998: non-ASCII text and words too long to fold become RFC 2047 encoded words (which
    can be split anywhere), and messages.py limits display names (MAX_NAME_CHARS).
    """
    addresses = [mail_from, *job.to, *([job.reply_to] if job.reply_to else [])]
    if not all(envelope_address(a).isascii() for a in addresses):
        return _build_utf8(job, mail_from)
    msg = _content_part(job.text, job.html)
    msg["From"] = _format_address(mail_from)
    msg["To"] = ", ".join(_format_address(a) for a in job.to)
    # compat32 folds a Header itself (the stubs only know str values).
    msg["Subject"] = _unstructured("Subject", job.subject)  # type: ignore[assignment]
    msg["Date"] = format_datetime(_created(job))
    msg["Message-ID"] = _message_id(job, mail_from)
    if job.reply_to:
        msg["Reply-To"] = _format_address(job.reply_to)
    msg["X-Mailroom-Id"] = job.id
    return msg


def render(job: MailJob, mail_from: str) -> bytes | None:
    """The bytes :func:`build_mime` would flatten to (as aiosmtplib flattens it), made
    without the email package's generator for every mail; None when an address needs
    SMTPUTF8 (then :func:`build_mime` and ``send_message`` do it).

    The content (MIME headers and encoded body) is flattened once per distinct text and
    HTML and reused; a header line that fits in 78 characters as it is, is written as it
    is (what compat32's folding does with it); any other goes through the same folding.
    """
    addresses = [mail_from, *job.to, *([job.reply_to] if job.reply_to else [])]
    if not all(envelope_address(a).isascii() for a in addresses):
        return None
    if len(job.text) + len(job.html or "") <= CACHED_CONTENT_CHARS:
        head, body = _content(job.text, job.html)
    else:
        head, body = _flattened_content(job.text, job.html)
    lines = [
        head,
        _from_line(mail_from),
        _header("To", ", ".join(_format_address(a) for a in job.to)),
        _subject_line(job.subject),
        _header("Date", format_datetime(_created(job))),
        _header("Message-ID", _message_id(job, mail_from)),
    ]
    if job.reply_to:
        lines.append(_header("Reply-To", _format_address(job.reply_to)))
    lines += [_header("X-Mailroom-Id", job.id), b"\n", body]
    return b"".join(lines)


def _content_part(text: str, html: str | None) -> Message:
    if html is None:
        return _text_part(text, "plain")
    msg = MIMEMultipart("alternative")
    msg.attach(_text_part(text, "plain"))
    msg.attach(_text_part(html, "html"))
    return msg


def _flattened_content(text: str, html: str | None) -> tuple[bytes, bytes]:
    """The content's MIME header lines, and its body, as compat32 flattens them."""
    out = io.BytesIO()
    BytesGenerator(out, policy=compat32).flatten(_content_part(text, html))
    head, _, body = out.getvalue().partition(b"\n\n")
    return head + b"\n", body


_content = functools.lru_cache(maxsize=64)(_flattened_content)


def _header(name: str, value: str) -> bytes:
    if len(name) + 2 + len(value) <= 78 and value.isascii() and value.isprintable():
        return f"{name}: {value}\n".encode()
    return compat32.fold_binary(name, value)


@functools.lru_cache(maxsize=64)
def _from_line(mail_from: str) -> bytes:
    return _header("From", _format_address(mail_from))


@functools.lru_cache(maxsize=1024)
def _subject_line(subject: str) -> bytes:
    # compat32 folds a Header itself (the stubs only know str values).
    return compat32.fold_binary("Subject", _unstructured("Subject", subject))  # type: ignore[arg-type]


def _text_part(body: str, subtype: str) -> MIMEText:
    # MIMEText takes a Charset object as well as a name (the stubs only know the name).
    return MIMEText(body, subtype, _UTF8)  # type: ignore[arg-type]


def _unstructured(name: str, value: str) -> Header:
    """Plain text folded at whitespace; encoded words if it is not ASCII, or if a word is
    too long for a 998-character line."""
    if value.isascii():
        plain = Header(value, "us-ascii", header_name=name)
        lines = f"{name}: {plain.encode()}".split("\n")
        if max(len(line) for line in lines) <= MAX_LINE:
            return plain
    return Header(value, "utf-8", header_name=name)


@functools.lru_cache(maxsize=4096)
def _format_address(address: str) -> str:
    name, spec = getaddresses([address])[0]
    spec = envelope_address(spec)  # may keep a UTF-8 local part (the SMTPUTF8 builder)
    if not name:
        return spec
    if name.isascii():
        shown = f'"{quote(name)}"' if _SPECIALS.search(name) else name
        if max(len(word) for word in shown.split(" ")) <= 70:
            return f"{shown} <{spec}>"
    # Not ASCII, or a word too long to fold: encoded words. (formataddr would make one
    # of any length, RFC 2047 allows 75 characters; Header splits the name into several,
    # separated by spaces to fold at.)
    return f"{Header(name, 'utf-8').encode(linesep='')} <{spec}>"


def _message_id(job: MailJob, mail_from: str) -> str:
    domain = envelope_address(mail_from).rpartition("@")[2] or "localhost"
    return f"<{job.id}@{domain}>"


def _build_utf8(job: MailJob, mail_from: str) -> EmailMessage:
    msg = EmailMessage(policy=SMTPUTF8)
    msg["From"] = _header_address(mail_from)
    msg["To"] = [_header_address(a) for a in job.to]
    msg["Subject"] = job.subject
    msg["Date"] = format_datetime(_created(job))
    msg["Message-ID"] = _message_id(job, mail_from)
    if job.reply_to:
        msg["Reply-To"] = _header_address(job.reply_to)
    msg["X-Mailroom-Id"] = job.id
    msg.set_content(job.text)
    if job.html is not None:
        msg.add_alternative(job.html, subtype="html")
    return msg


def _created(job: MailJob) -> datetime:
    try:
        created = datetime.fromisoformat(job.created_at)
    except ValueError:
        return datetime.now().astimezone()
    return created.astimezone()


def classify(exc: BaseException) -> DeliveryError:
    """Map an aiosmtplib / network error to our hierarchy."""
    if isinstance(exc, DeliveryError):
        return exc
    if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
        return SmtpAuthError(f"SMTP login refused: {exc.message}", exc.code)
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        codes = [r.code for r in exc.recipients]
        text = "; ".join(f"{r.recipient}: {r.code} {r.message}" for r in exc.recipients)
        reason = f"every recipient refused: {text}"
        code = codes[0] if codes else None
        if any(400 <= c < 500 for c in codes):
            return TransientDeliveryError(reason, code)
        return PermanentDeliveryError(reason, code)
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        if 400 <= exc.code < 500:
            return TransientDeliveryError(exc.message, exc.code)
        if 500 <= exc.code < 600:
            return PermanentDeliveryError(exc.message, exc.code)
        return TransientDeliveryError(f"unexpected reply: {exc.message}", exc.code)
    if isinstance(exc, aiosmtplib.SMTPNotSupported):
        if "SMTPUTF8" in str(exc):
            return PermanentDeliveryError(
                "the SMTP server does not offer SMTPUTF8, which an address with non-ASCII "
                "characters before the @ needs"
            )
        return SmtpConfigError(f"the SMTP server lacks a feature our settings need: {exc}")
    if isinstance(exc, aiosmtplib.SMTPException) and "AUTH extension" in str(exc):
        return SmtpConfigError(f"the SMTP server offers no login (AUTH): {exc}")
    if isinstance(exc, aiosmtplib.SMTPException) and "STARTTLS extension" in str(exc):
        return SmtpConfigError(f"the SMTP server offers no STARTTLS (SMTP_SECURITY): {exc}")
    if isinstance(exc, ssl.SSLError):
        return TransientDeliveryError(f"TLS error: {exc}")
    if isinstance(exc, aiosmtplib.SMTPException | OSError | TimeoutError):
        return TransientDeliveryError(f"{type(exc).__name__}: {exc}")
    raise TypeError(f"not a delivery error: {exc!r}") from exc


_SMTP_ERRORS = (aiosmtplib.SMTPException, OSError, TimeoutError, ssl.SSLError)


class SmtpPool:
    """Up to ``size`` SMTP connections, reused across messages.

    ``send`` takes an idle connection (or opens one), sends, and puts it back. A
    connection that failed is closed, never reused.
    """

    def __init__(self, settings: Settings, size: int) -> None:
        if settings.smtp_host is None:
            raise ValueError("SMTP_HOST is not set")
        self.settings = settings
        self._slots = asyncio.Semaphore(size)
        self._idle: list[tuple[aiosmtplib.SMTP, float]] = []
        self._tls_context: ssl.SSLContext | None = None
        if settings.smtp_security != "none":
            self._tls_context = ssl.create_default_context(
                cafile=str(settings.smtp_ca_file) if settings.smtp_ca_file else None
            )

    def _new_client(self) -> aiosmtplib.SMTP:
        s = self.settings
        return aiosmtplib.SMTP(
            hostname=s.smtp_host,
            port=s.smtp_port,
            username=s.smtp_username,
            password=s.smtp_password.get() if s.smtp_password else None,
            use_tls=s.smtp_security == "ssl",
            start_tls=s.smtp_security == "starttls",
            tls_context=self._tls_context,
            timeout=s.smtp_timeout,
        )

    async def _checkout(self) -> tuple[aiosmtplib.SMTP, bool]:
        """An open connection, and whether it was reused from the pool."""
        now = time.monotonic()
        while self._idle:
            client, since = self._idle.pop()
            idle = now - since
            if not client.is_connected or idle > IDLE_CLOSE_SECONDS:
                await self._discard(client)
                continue
            if idle > IDLE_CHECK_SECONDS:
                try:
                    await client.noop()
                except _SMTP_ERRORS:
                    await self._discard(client)
                    continue
            return client, True
        client = self._new_client()
        await client.connect()
        return client, False

    async def send(self, job: MailJob, recipients: list[str] | None = None) -> SendResult:
        """Send ``job`` to ``recipients`` (default: all of ``job.to``, envelope form).

        Refused recipients come back in :attr:`SendResult.refused` (even when every one
        was refused); anything else that goes wrong raises a :class:`DeliveryError`.
        """
        mail_from = self.settings.mail_from
        try:
            message: bytes | Message | None
            if len(job.text) + len(job.html or "") > LARGE_BODY_CHARS:
                # Encoding megabytes takes a while: not on the event loop.
                message = await asyncio.to_thread(render, job, mail_from)
                if message is None:
                    message = await asyncio.to_thread(build_mime, job, mail_from)
            else:
                message = render(job, mail_from) or build_mime(job, mail_from)
        except (ValueError, TypeError) as exc:
            raise PermanentDeliveryError(f"cannot build the message: {exc}") from exc
        sender = envelope_address(self.settings.mail_from)
        if recipients is None:
            recipients = [addr_spec(a) for a in job.to]
        envelope = {envelope_address(r): r for r in recipients}
        async with self._slots:
            for attempt in (1, 2):
                client: aiosmtplib.SMTP | None = None
                reused = False
                try:
                    client, reused = await self._checkout()
                    if isinstance(message, bytes):
                        refused, _ = await client.sendmail(sender, list(envelope), message)
                    else:
                        refused, _ = await client.send_message(
                            message, sender=sender, recipients=list(envelope)
                        )
                except aiosmtplib.SMTPRecipientsRefused as exc:
                    assert client is not None
                    await self._reset_or_discard(client)
                    return SendResult(
                        accepted=(),
                        refused={
                            envelope.get(r.recipient, r.recipient): (r.code, r.message)
                            for r in exc.recipients
                        },
                    )
                except aiosmtplib.SMTPServerDisconnected as exc:
                    if client is not None:
                        await self._discard(client)
                    if reused and attempt == 1:
                        log.debug("smtp: pooled connection was closed, opening a new one")
                        continue
                    raise classify(exc) from exc
                except _SMTP_ERRORS as exc:
                    if client is not None:
                        await self._discard(client)
                    raise classify(exc) from exc
                except BaseException:
                    # Anything else (a cancelled send at shutdown, a flattening error): the
                    # connection is in an unknown state; close it, never back to the pool.
                    if client is not None:
                        client.close()
                    raise
                self._idle.append((client, time.monotonic()))
                return SendResult(
                    accepted=tuple(orig for env, orig in envelope.items() if env not in refused),
                    refused={
                        envelope.get(r, r): (resp.code, resp.message) for r, resp in refused.items()
                    },
                )
        raise AssertionError("unreachable")  # pragma: no cover

    async def _reset_or_discard(self, client: aiosmtplib.SMTP) -> None:
        """After a refused transaction: RSET and keep the connection, or drop it."""
        try:
            await client.rset()
        except _SMTP_ERRORS:
            await self._discard(client)
        else:
            self._idle.append((client, time.monotonic()))

    async def _discard(self, client: aiosmtplib.SMTP) -> None:
        if client.is_connected:
            with contextlib.suppress(*_SMTP_ERRORS):
                await asyncio.wait_for(client.quit(), 5)
            client.close()

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        await asyncio.gather(*(self._discard(c) for c, _ in idle))
