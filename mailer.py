"""Build MIME messages and send them over a small pool of reused SMTP connections.

Every SMTP failure leaves this module as a :class:`TransientDeliveryError` (try again
later), :class:`PermanentDeliveryError` (give up) or :class:`SmtpConfigError` (fix the
settings it names: a refused login, an untrusted certificate, a SMTP_SECURITY that does
not fit the port ...), so callers never see aiosmtplib's own exception classes.

Each new connection logs in at most once, with one mechanism (see ``SmtpPool._login``),
and every session that is still open ends with QUIT.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import logging
import re
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from email.charset import QP, Charset
from email.encoders import encode_base64
from email.generator import BytesGenerator
from email.header import Header
from email.headerregistry import Address
from email.message import EmailMessage, Message
from email.mime.base import MIMEBase
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.policy import SMTPUTF8, compat32
from email.utils import format_datetime, quote

import aiosmtplib
from aiosmtplib.email import flatten_message
from aiosmtplib.protocol import normalize_message_line_endings
from email_validator import EmailNotValidError

import smtppipe
from config import Settings
from errors import (
    ConfigError,
    DeliveryError,
    PermanentDeliveryError,
    SmtpAuthError,
    SmtpConfigError,
    TransientDeliveryError,
)
from messages import DOT_ATOM, Attachment, MailJob, addr_spec, check_email, parse_addresses

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


@functools.lru_cache(maxsize=512)  # pure, and asked for several times per mail
def envelope_address(address: str) -> str:
    """The SMTP envelope form of an address: an IDN domain in ASCII (punycode).

    A UTF-8 local part stays as it is; sending it needs a server that offers SMTPUTF8.
    """
    spec = addr_spec(address)
    if spec.isascii():
        return spec
    try:
        valid = check_email(spec)
    except EmailNotValidError:
        return spec
    return valid.ascii_email or f"{valid.local_part}@{valid.ascii_domain}"


def _header_address(address: str) -> Address:
    name, spec = parse_addresses(address)[0]
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
    mail_from = job.sender or mail_from
    addresses = [mail_from, *job.to, *job.cc, *([job.reply_to] if job.reply_to else [])]
    if not all(envelope_address(a).isascii() for a in addresses):
        return _build_utf8(job, mail_from)
    msg = _with_attachments(_content_part(job.text, job.html), job)
    msg["From"] = _format_address(mail_from)
    msg["To"] = ", ".join(_format_address(a) for a in job.to)
    if job.cc:
        msg["Cc"] = ", ".join(_format_address(a) for a in job.cc)
    # compat32 folds a Header itself (the stubs only know str values).
    msg["Subject"] = _unstructured("Subject", job.subject)  # type: ignore[assignment]
    msg["Date"] = _date(job)
    msg["Message-ID"] = _message_id(job, mail_from)
    if job.reply_to:
        msg["Reply-To"] = _format_address(job.reply_to)
    msg["X-Mailroom-Id"] = job.id
    for name, value in job.headers:
        msg[name] = _unstructured(name, value)  # type: ignore[assignment]
    return msg


def render(job: MailJob, mail_from: str) -> bytes | None:
    """The bytes :func:`build_mime` would flatten to (as aiosmtplib flattens it), made
    without the email package's generator for every mail; None when an address needs
    SMTPUTF8 (then :func:`build_mime` and aiosmtplib's flattening do it).

    The content (MIME headers and encoded body) is flattened once per distinct text and
    HTML and reused; a header line that fits in 78 characters as it is, is written as it
    is (what compat32's folding does with it); any other goes through the same folding.
    """
    if not job.plain:  # a per-message From, custom headers, attachments: build_mime
        return None
    addresses = [mail_from, *job.to, *job.cc, *([job.reply_to] if job.reply_to else [])]
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
        *([_header("Cc", ", ".join(_format_address(a) for a in job.cc))] if job.cc else []),
        _subject_line(job.subject),
        _header("Date", _date(job)),
        _header("Message-ID", _message_id(job, mail_from)),
    ]
    if job.reply_to:
        lines.append(_header("Reply-To", _format_address(job.reply_to)))
    lines += [_header("X-Mailroom-Id", job.id), b"\n", body]
    return b"".join(lines)


def _size(job: MailJob) -> int:
    """About how much there is to encode (characters and attachment bytes)."""
    size = len(job.text) + len(job.html or "")
    return size + sum(len(a.content) for a in job.attachments) if job.attachments else size


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


@functools.lru_cache(maxsize=512)
def _format_address(address: str) -> str:
    name, spec = parse_addresses(address)[0]
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
    if job.cc:
        msg["Cc"] = [_header_address(a) for a in job.cc]
    msg["Subject"] = job.subject
    msg["Date"] = _date(job)
    msg["Message-ID"] = _message_id(job, mail_from)
    if job.reply_to:
        msg["Reply-To"] = _header_address(job.reply_to)
    msg["X-Mailroom-Id"] = job.id
    for name, value in job.headers:
        msg[name] = value
    msg.set_content(job.text)
    if job.html is not None:
        msg.add_alternative(job.html, subtype="html")
    for item in job.attachments:
        maintype, _, subtype = item.content_type.partition("/")
        if item.content_id is not None and job.html is not None:
            html_part = msg.get_body(("html",))
            assert html_part is not None
            html_part.add_related(
                item.content,
                maintype,
                subtype,
                cid=f"<{item.content_id}>",
                filename=item.filename,
                disposition="inline",
            )
    for item in job.attachments:
        if item.content_id is None or job.html is None:
            maintype, _, subtype = item.content_type.partition("/")
            msg.add_attachment(item.content, maintype, subtype, filename=item.filename)
    return msg


def _with_attachments(content: Message, job: MailJob) -> Message:
    """multipart/related around the content and its inline images (``content_id``, when
    there is HTML to show them), then multipart/mixed around that and the other files."""
    if not job.attachments:
        return content
    inline = [a for a in job.attachments if a.content_id is not None and job.html is not None]
    files = [a for a in job.attachments if a not in inline]
    if inline:
        related = MIMEMultipart("related", type=content.get_content_type())
        related.attach(content)
        for item in inline:
            related.attach(_attachment_part(item, "inline"))
        content = related
    if not files:
        return content
    mixed = MIMEMultipart("mixed")
    mixed.attach(content)
    for item in files:
        mixed.attach(_attachment_part(item, "attachment"))
    return mixed


def _attachment_part(item: Attachment, disposition: str) -> Message:
    maintype, _, subtype = item.content_type.partition("/")
    part = MIMEBase(maintype, subtype)
    part.set_payload(item.content)
    encode_base64(part)
    # RFC 2231 (filename*=utf-8''...) for a name that is not ASCII.
    filename: str | tuple[str, str, str] = (
        item.filename if item.filename.isascii() else ("utf-8", "", item.filename)
    )
    part.set_param("name", item.filename, charset=None if item.filename.isascii() else "utf-8")
    part.add_header("Content-Disposition", disposition, filename=filename)
    if item.content_id is not None:
        part["Content-ID"] = f"<{item.content_id}>"
    return part


def _date(job: MailJob) -> str:
    """The Date header: when ``job`` was accepted, in this host's time zone. The same for
    every mail accepted within one second, so that second's is made once: a mail's own
    (parsing, the zone's offset, formatting) cost 3-4% of the worker's CPU per mail."""
    created = job.created_at
    # What the server writes: "2026-12-07T06:30:01.123+00:00" (milliseconds, UTC).
    if (
        len(created) == 29
        and created[19] == "."
        and created[20:23].isdigit()
        and created.endswith("+00:00")
    ):
        with contextlib.suppress(ValueError):  # not a time after all: as any other form
            return _date_of_second(created[:19])
    try:
        return format_datetime(datetime.fromisoformat(created).astimezone())
    except ValueError:
        return format_datetime(datetime.now().astimezone())


@functools.lru_cache(maxsize=16)
def _date_of_second(second: str) -> str:
    """A second's Date (ValueError, never cached, for what is no time). The host's zone
    is read as the process found it: a zone changed while it runs is not seen here."""
    return format_datetime(datetime.fromisoformat(second + "+00:00").astimezone())


def classify(exc: BaseException) -> DeliveryError:
    """Map an aiosmtplib / network error to our hierarchy."""
    if isinstance(exc, DeliveryError):
        return exc
    if isinstance(exc, aiosmtplib.SMTPHeloError) and 500 <= exc.code < 600:
        return SmtpConfigError(
            f"the SMTP server refused our EHLO (HELO) name: {exc.message}",
            exc.code,
            settings=("SMTP_HELO_NAME",),
        )
    if isinstance(exc, aiosmtplib.SMTPResponseException) and exc.code == 530:
        # RFC 4954: 530 5.7.0 Authentication required (to MAIL, without a login).
        return SmtpConfigError(
            f"the SMTP server requires a login: {exc.message}",
            exc.code,
            settings=("SMTP_USERNAME", "SMTP_PASSWORD"),
        )
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
    if isinstance(exc, ssl.SSLError):
        return TransientDeliveryError(f"TLS error: {exc}")
    if isinstance(exc, aiosmtplib.SMTPException | OSError | TimeoutError):
        return TransientDeliveryError(f"{type(exc).__name__}: {exc}")
    raise TypeError(f"not a delivery error: {exc!r}") from exc


_SMTP_ERRORS = (aiosmtplib.SMTPException, OSError, TimeoutError, ssl.SSLError)

# The AUTH mechanisms we use, best first. Over TLS: PLAIN (one round trip; TLS protects
# the password), then LOGIN. Without TLS: CRAM-MD5 first, which never sends the password.
_MECHANISMS_TLS = ("plain", "login", "cram-md5")
_MECHANISMS_CLEAR = ("cram-md5", "plain", "login")
# OpenSSL's reasons when the answer to our TLS hello is not TLS at all (a plain greeting).
_NOT_TLS = frozenset(
    {"WRONG_VERSION_NUMBER", "UNKNOWN_PROTOCOL", "PACKET_LENGTH_TOO_LONG", "HTTP_REQUEST"}
)
_HOSTNAME_MISMATCH = 62  # X509_V_ERR_HOSTNAME_MISMATCH


def _ssl_cause(exc: BaseException) -> ssl.SSLError | None:
    """The TLS error behind ``exc`` (aiosmtplib wraps it in its own errors), if any."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _auth_failure(mechanism: str, exc: aiosmtplib.SMTPAuthenticationError) -> DeliveryError:
    """What a failed AUTH means: refused (5xx), try later (4xx), or not an answer to AUTH."""
    name = f"AUTH {mechanism.upper()}"
    if 500 <= exc.code < 600:
        settings: tuple[str, ...] = SmtpAuthError.SETTINGS
        if exc.code == 538:  # 5.7.11 encryption required for this mechanism
            settings = (*settings, "SMTP_SECURITY")
        return SmtpAuthError(f"SMTP login refused ({name}): {exc.message}", exc.code, settings)
    if 400 <= exc.code < 500:
        return TransientDeliveryError(
            f"SMTP login failed for now ({name}): {exc.message}", exc.code
        )
    return SmtpConfigError(
        f"the SMTP server answered {name} with '{exc.code} {exc.message}', which is neither "
        "a login nor a refusal: is it a mail server that takes logins?",
        settings=("SMTP_HOST", "SMTP_PORT", "SMTP_USERNAME"),
    )


class DkimSigner:
    """Signs each mail's final bytes (DKIM_DOMAIN, DKIM_SELECTOR, DKIM_PRIVATE_KEY_FILE):
    dkimpy, RSA-SHA256, relaxed/relaxed, dkimpy's default header set (From, To, Cc,
    Subject, Date, Message-ID, Reply-To, MIME-Version, Content-*, ... as present). The key
    never reaches a log line or a repr."""

    __slots__ = ("_key", "domain", "selector")

    def __init__(self, domain: str, selector: str, key: bytes) -> None:
        self.domain = domain
        self.selector = selector
        self._key = key

    def __repr__(self) -> str:
        return f"DkimSigner(domain={self.domain!r}, selector={self.selector!r})"

    @classmethod
    def from_settings(cls, settings: Settings) -> DkimSigner | None:
        """None without DKIM settings; else a signer whose key was tried on a test mail
        (at start: a key that cannot sign is a :class:`ConfigError` naming the variable)."""
        if settings.dkim_domain is None or settings.dkim_selector is None:
            return None
        path = settings.dkim_private_key_file
        assert path is not None
        try:
            key = path.read_bytes()  # once, at start (not in a request or a send)
        except OSError as exc:
            raise ConfigError("DKIM_PRIVATE_KEY_FILE", f"cannot read {path}: {exc}") from None
        signer = cls(settings.dkim_domain, settings.dkim_selector, key)
        import dkim  # only where DKIM is set up (its RSA code is a few MB)

        try:
            signer.sign(b"From: a@example.org\nSubject: key check\n\nkey check\n")
        except dkim.DKIMException as exc:
            raise ConfigError(
                "DKIM_PRIVATE_KEY_FILE",
                f"{path} is not a usable RSA private key in PEM form ({type(exc).__name__})",
            ) from None
        return signer

    def sign(self, data: bytes) -> bytes:
        """``data`` with its DKIM-Signature header line in front."""
        import dkim

        signature: bytes = dkim.sign(
            data,
            self.selector.encode(),
            self.domain.encode(),
            self._key,
            canonicalize=(b"relaxed", b"relaxed"),
            linesep=b"\n",
        )
        return signature + data


# An envelope address aiosmtplib would write as it is, in brackets: ASCII, a dot-atom local
# part, a domain of letter-digit-hyphen labels ("localhost" too: MAIL_FROM's default).
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_PLAIN_ENVELOPE = re.compile(DOT_ATOM + "@" + _LABEL + r"(?:\." + _LABEL + ")*")


def is_plain_envelope_address(address: str) -> bool:
    """Whether ``address`` goes into MAIL or RCPT as ``<address>`` with nothing to quote
    or parse (a property test holds this against aiosmtplib's ``quote_address``)."""
    return _PLAIN_ENVELOPE.fullmatch(address) is not None


async def ehlo_or_helo(client: aiosmtplib.SMTP) -> None:
    """EHLO once per connection, HELO when EHLO is refused (as aiosmtplib's commands do)."""
    if client.is_ehlo_or_helo_needed:
        try:
            await client.ehlo()
        except aiosmtplib.SMTPHeloError:
            if not client.is_connected:
                raise
            await client.helo()


async def sendmail(
    client: aiosmtplib.SMTP,
    sender: str,
    recipients: list[str],
    message: bytes,
    mail_options: Sequence[str] = (),
) -> dict[str, aiosmtplib.SMTPResponse]:
    """``client.sendmail(sender, recipients, message, mail_options=mail_options)``'s
    refused recipients, with the same commands, answers and errors. For everyday
    addresses (those that
    :func:`is_plain_envelope_address` accepts)
    the commands are written here: aiosmtplib parses each address twice with
    email.utils (8 us a time, about 5% of the worker's CPU per mail); its ``<address>``
    for such an address is the address in brackets (a property test holds the two
    together). When the server offers PIPELINING the transaction is pipelined
    (:mod:`smtppipe`). Any other address goes through aiosmtplib's own ``sendmail``."""
    if not all(map(is_plain_envelope_address, (sender, *recipients))):
        answered, _ = await client.sendmail(
            sender, recipients, message, mail_options=list(mail_options)
        )
        return answered
    await ehlo_or_helo(client)
    options = [option.encode("ascii") for option in mail_options]
    normalized = normalize_message_line_endings(message)
    if client.supports_extension("size"):  # RFC 1870: the octets as sent, CRLFs included
        options.insert(0, b"size=%d" % len(normalized))
    refused: dict[str, aiosmtplib.SMTPResponse] = {}
    try:
        if smtppipe.offered(client):
            return await smtppipe.transaction(client, sender, options, recipients, normalized)
        answer = await client.execute_command(b"MAIL", b"FROM:<%s>" % sender.encode(), *options)
        if answer.code != aiosmtplib.SMTPStatus.completed:
            raise aiosmtplib.SMTPSenderRefused(answer.code, answer.message, sender)
        for recipient in recipients:
            answer = await client.execute_command(b"RCPT", b"TO:<%s>" % recipient.encode())
            if answer.code not in smtppipe.ACCEPTED:
                refused[recipient] = answer
        if len(refused) == len(recipients):
            raise smtppipe.recipients_refused(refused)
        await client.data(normalized)
    except (aiosmtplib.SMTPResponseException, aiosmtplib.SMTPRecipientsRefused):
        with contextlib.suppress(ConnectionError, aiosmtplib.SMTPResponseException):
            await client.rset()  # as aiosmtplib's sendmail: reset the envelope, then raise
        raise
    return refused


class Turn:
    """One of a pool's ``size`` send turns, taken before a send and given back once (by
    :meth:`SmtpPool.send`, when it is handed one, or by its taker; a second
    :meth:`release` does nothing). The worker takes it once it holds a message's claim,
    and gives the claim back if it stops before its turn comes (see
    ``Worker._send``)."""

    __slots__ = ("_pool", "held")

    def __init__(self, pool: SmtpPool) -> None:
        self._pool = pool
        self.held = False

    async def acquire(self, unless: asyncio.Event | None = None) -> bool:
        """Wait for a free turn and take it; True once held. With ``unless``: False,
        holding nothing, if that event is set before the turn is had."""
        assert not self.held
        turns = self._pool._turns
        if not await turns.take(unless):
            return False
        if unless is not None and unless.is_set():
            turns.give()
            return False
        self.held = True
        self._pool.turns_in_use += 1
        return True

    def release(self) -> None:
        if self.held:
            self.held = False
            self._pool.turns_in_use -= 1
            self._pool._turns.give()


class Turns:
    """``size`` turns handed out in the order they were asked for, like a semaphore, and
    given up by a waiter once the event it names is set (the worker's stop).

    A waiter is one future, and one task per event watches all of them: asyncio's
    semaphore plus a task per waiter to watch the event (and ``asyncio.wait`` over the
    two) cost 3% of the worker's CPU per mail while messages wait for a turn, which is
    whenever a backlog is being sent."""

    def __init__(self, size: int) -> None:
        self._free = size
        self._waiting: deque[tuple[asyncio.Future[bool], asyncio.Event | None]] = deque()
        self._watchers: dict[asyncio.Event, asyncio.Task[None]] = {}

    async def take(self, unless: asyncio.Event | None = None) -> bool:
        """A turn: True once it is the caller's; False (none taken) when ``unless`` is
        set first. A waiter cancelled after its turn came passes the turn on."""
        if unless is not None and unless.is_set():
            return False
        if self._free and not self._waiting:
            self._free -= 1
            return True
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiting.append((waiter, unless))
        if unless is not None and unless not in self._watchers:
            self._watchers[unless] = asyncio.create_task(self._give_up_at(unless))
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.result():
                self.give()
            else:
                with contextlib.suppress(ValueError):
                    self._waiting.remove((waiter, unless))
            raise

    def give(self) -> None:
        """A turn back: to the longest waiter, else free."""
        while self._waiting:
            waiter, _ = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(True)
                return
        self._free += 1

    async def _give_up_at(self, event: asyncio.Event) -> None:
        try:
            await event.wait()
        finally:
            self._watchers.pop(event, None)
        self._give_up(lambda unless: unless is event)

    def _give_up(self, which: Callable[[asyncio.Event | None], bool]) -> None:
        """The waiters whose event ``which`` names get False (no turn)."""
        for waiter, unless in self._waiting:
            if which(unless) and not waiter.done():
                waiter.set_result(False)
        self._waiting = deque(w for w in self._waiting if not w[0].done())

    async def close(self) -> None:
        """Stop watching: the waiters that named an event give up now (nothing would
        tell them of it any more); those that named none wait on for a turn."""
        watchers = list(self._watchers.values())
        self._watchers.clear()
        for task in watchers:
            task.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
        self._give_up(lambda unless: unless is not None)


class SmtpPool:
    """Up to ``size`` SMTP connections, reused across messages.

    ``send`` takes an idle connection (or opens one), sends, and puts it back. A
    connection that failed is closed, never reused. At most ``size`` sends run at once:
    each holds a :class:`Turn` (see :meth:`turn`).
    """

    def __init__(self, settings: Settings, size: int) -> None:
        if settings.smtp_host is None:
            raise ValueError("SMTP_HOST is not set")
        self.settings = settings
        self._turns = Turns(size)
        self.turns_in_use = 0  # taken and not given back (each send holds one)
        self._idle: list[tuple[aiosmtplib.SMTP, float]] = []
        self._busy = 0  # sends under way (each holds one connection, or is opening one)
        self._helo_name = settings.smtp_helo_name
        self.signer = DkimSigner.from_settings(settings)
        self._tls_context: ssl.SSLContext | None = None
        if settings.smtp_security != "none":
            self._tls_context = ssl.create_default_context(
                cafile=str(settings.smtp_ca_file) if settings.smtp_ca_file else None
            )

    async def helo_name(self) -> str:
        """The name we give in EHLO: SMTP_HELO_NAME, else this machine's fully qualified
        name (looked up once)."""
        if self._helo_name is None:
            # socket.getfqdn may ask DNS: not on the event loop.
            self._helo_name = await asyncio.to_thread(socket.getfqdn)
        return self._helo_name

    def _new_client(self, helo_name: str) -> aiosmtplib.SMTP:
        s = self.settings
        # No username: aiosmtplib's login would try each mechanism in turn with the same
        # password. STARTTLS and the login are ours (see _open).
        return aiosmtplib.SMTP(
            hostname=s.smtp_host,
            port=s.smtp_port,
            local_hostname=helo_name,
            use_tls=s.smtp_security == "ssl",
            start_tls=False,
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
        return await self._open(), False

    async def _open(self) -> aiosmtplib.SMTP:
        """A new session: the greeting (over TLS for ``ssl``), STARTTLS for ``starttls``,
        then one login when SMTP_USERNAME is set.

        Failures come out as :class:`DeliveryError`; a session that got past the greeting
        is ended with QUIT (but not after a failed TLS handshake: nothing more can be said
        on such a connection).
        """
        client = self._new_client(await self.helo_name())
        try:
            await client.connect()
        except aiosmtplib.SMTPConnectTimeoutError as exc:
            raise await self._timeout_fault(exc) from exc
        except _SMTP_ERRORS as exc:
            raise (self._tls_fault(exc) or classify(exc)) from exc
        try:
            if self.settings.smtp_security == "starttls":
                await self._starttls(client)
            if self.settings.smtp_username is not None:
                await self._login(client)
        except _SMTP_ERRORS as exc:
            fault = self._tls_fault(exc)
            if fault is not None:
                client.close()
                raise fault from exc
            await self._discard(client)
            raise classify(exc) from exc
        except DeliveryError:
            await self._discard(client)
            raise
        except BaseException:  # cancelled (shutdown): no time for a QUIT
            client.close()
            raise
        return client

    async def _starttls(self, client: aiosmtplib.SMTP) -> None:
        await client.ehlo()
        if not client.supports_extension("starttls"):
            s = self.settings
            raise SmtpConfigError(
                f"SMTP_SECURITY is starttls, but the SMTP server offers no STARTTLS on port "
                f"{s.smtp_port}: set SMTP_SECURITY=ssl if that is its implicit-TLS port "
                "(465), or SMTP_PORT to its STARTTLS port (587)",
                settings=("SMTP_SECURITY", "SMTP_PORT"),
            )
        await client.starttls()

    async def _login(self, client: aiosmtplib.SMTP) -> None:
        """One AUTH, with the best mechanism both sides have: a refusal ends the attempt
        (every refused AUTH counts toward locking the account at many providers)."""
        s = self.settings
        assert s.smtp_username is not None
        if client.is_ehlo_or_helo_needed:
            await client.ehlo()
        over_tls = client.get_transport_info("sslcontext") is not None
        if not client.supports_extension("auth"):
            hint = ""
            settings: tuple[str, ...] = ("SMTP_USERNAME", "SMTP_PASSWORD")
            if not over_tls:
                hint = " on this connection without TLS (SMTP_SECURITY=starttls may get one)"
                settings = (*settings, "SMTP_SECURITY")
            raise SmtpConfigError(
                f"SMTP_USERNAME is set, but the SMTP server offers no login (no AUTH in its "
                f"EHLO answer){hint}; for a server that takes no login, unset SMTP_USERNAME "
                "and SMTP_PASSWORD",
                settings=settings,
            )
        offered = client.server_auth_methods
        preferred = _MECHANISMS_TLS if over_tls else _MECHANISMS_CLEAR
        mechanism = next((m for m in preferred if m in offered), None)
        if mechanism is None:
            raise SmtpConfigError(
                f"the SMTP server offers only AUTH {' '.join(offered).upper()}; Mailroom logs "
                "in with PLAIN, LOGIN or CRAM-MD5",
                settings=("SMTP_HOST",),
            )
        auth = {
            "plain": client.auth_plain,
            "login": client.auth_login,
            "cram-md5": client.auth_crammd5,
        }[mechanism]
        password = s.smtp_password.get() if s.smtp_password else ""
        try:
            await auth(s.smtp_username, password)
        except aiosmtplib.SMTPAuthenticationError as exc:
            raise _auth_failure(mechanism, exc) from exc

    def _tls_fault(self, exc: BaseException) -> SmtpConfigError | None:
        """A TLS failure that our settings cause (an untrusted certificate, TLS to a plain
        port), as the settings fault it is; None for anything else."""
        s = self.settings
        cause = _ssl_cause(exc)
        if isinstance(cause, ssl.SSLCertVerificationError):
            detail = cause.verify_message or cause.reason or str(cause)
            if cause.verify_code == _HOSTNAME_MISMATCH:
                return SmtpConfigError(
                    f"the SMTP server's TLS certificate is not for {s.smtp_host} ({detail}): "
                    "set SMTP_HOST to a name the certificate is for",
                    settings=("SMTP_HOST",),
                )
            trusted = f"the CAs in {s.smtp_ca_file}" if s.smtp_ca_file else "the system's CAs"
            return SmtpConfigError(
                f"the SMTP server's TLS certificate is not trusted by {trusted} ({detail}): "
                "set SMTP_CA_FILE to the CA certificate (PEM) that signed it",
                settings=("SMTP_CA_FILE",),
            )
        if cause is not None and cause.reason in _NOT_TLS and s.smtp_security == "ssl":
            return SmtpConfigError(
                f"SMTP_SECURITY is ssl, but the SMTP server does not speak TLS on port "
                f"{s.smtp_port} ({cause.reason}): set SMTP_SECURITY=starttls (or none) for "
                "that port, or SMTP_PORT to its implicit-TLS port (465)",
                settings=("SMTP_SECURITY", "SMTP_PORT"),
            )
        return None

    async def _timeout_fault(self, exc: aiosmtplib.SMTPConnectTimeoutError) -> DeliveryError:
        """No greeting in time. An implicit-TLS port waits for our TLS hello and never
        greets a plain client: when the port answers a TLS handshake, that is the fault."""
        s = self.settings
        if s.smtp_security != "ssl" and await self._speaks_tls():
            return SmtpConfigError(
                f"SMTP_SECURITY is {s.smtp_security}, but port {s.smtp_port} of the SMTP "
                "server expects TLS from the start (no greeting without it): set "
                "SMTP_SECURITY=ssl for that port, or SMTP_PORT to its "
                f"{'STARTTLS port (587)' if s.smtp_security == 'starttls' else 'plain port'}",
                settings=("SMTP_SECURITY", "SMTP_PORT"),
            )
        return classify(exc)

    async def _speaks_tls(self) -> bool:
        """Whether the server completes a TLS handshake on connect. Nothing is sent over
        it, so its certificate need not be trusted for this question."""
        s = self.settings
        probe = ssl.create_default_context()
        probe.check_hostname = False
        probe.verify_mode = ssl.CERT_NONE
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(s.smtp_host, s.smtp_port, ssl=probe), s.smtp_timeout
            )
        except (OSError, TimeoutError):
            return False
        writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), 5)
        return True

    def turn(self) -> Turn:
        """A send turn, not yet taken (:meth:`Turn.acquire`)."""
        return Turn(self)

    async def send(
        self, job: MailJob, recipients: list[str] | None = None, turn: Turn | None = None
    ) -> SendResult:
        """Send ``job`` to ``recipients`` (default: all of ``job.to``, envelope form), in
        ``turn`` when it is held (given back here, sent or not), else in a turn of its own.

        Refused recipients come back in :attr:`SendResult.refused` (even when every one
        was refused); anything else that goes wrong raises a :class:`DeliveryError`.
        """
        if turn is None or not turn.held:
            turn = self.turn()
            await turn.acquire()
        try:
            return await self._send_in_turn(job, recipients)
        finally:
            turn.release()

    async def _send_in_turn(self, job: MailJob, recipients: list[str] | None) -> SendResult:
        mail_from = self.settings.mail_from
        try:
            message: bytes | Message | None
            if _size(job) > LARGE_BODY_CHARS:
                # Encoding megabytes takes a while: not on the event loop.
                message = await asyncio.to_thread(render, job, mail_from)
                if message is None:
                    message = await asyncio.to_thread(build_mime, job, mail_from)
            else:
                message = render(job, mail_from) or build_mime(job, mail_from)
            if self.signer is not None and isinstance(message, bytes):
                message = await self._sign(message, job)
        except (ValueError, TypeError) as exc:
            raise PermanentDeliveryError(f"cannot build the message: {exc}") from exc
        sender = envelope_address(job.sender or self.settings.mail_from)
        if recipients is None:
            recipients = [addr_spec(a) for a in job.recipients]
        envelope = {envelope_address(r): r for r in recipients}
        self._busy += 1
        try:
            return await self._send_on_a_connection(message, sender, envelope, job)
        finally:
            self._busy -= 1

    async def _send_on_a_connection(
        self, message: bytes | Message, sender: str, envelope: dict[str, str], job: MailJob
    ) -> SendResult:
        """One send on a pooled connection (a second, new one if the pooled one had closed)."""
        for attempt in (1, 2):
            client: aiosmtplib.SMTP | None = None
            reused = False
            try:
                client, reused = await self._checkout()
                if isinstance(message, bytes):
                    refused = await sendmail(client, sender, list(envelope), message)
                else:
                    # What aiosmtplib's send_message would send, through sendmail above
                    # (pipelined where offered), DKIM-signed when set up.
                    data, options = await self._flatten(client, message, sender, envelope)
                    if self.signer is not None:
                        data = await self._sign(data, job)
                    refused = await sendmail(client, sender, list(envelope), data, options)
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

    @property
    def connections_open(self) -> int:
        """SMTP connections open: idle in the pool, or in use (or being opened)."""
        return len(self._idle) + self._busy

    async def _sign(self, data: bytes, job: MailJob) -> bytes:
        """DKIM-sign the final bytes: a big mail (its body hash) in a worker thread."""
        assert self.signer is not None
        import dkim

        try:
            if _size(job) > LARGE_BODY_CHARS:
                return await asyncio.to_thread(self.signer.sign, data)
            return self.signer.sign(data)
        except dkim.DKIMException as exc:
            raise PermanentDeliveryError(f"cannot DKIM-sign the message: {exc}") from exc

    @staticmethod
    async def _flatten(
        client: aiosmtplib.SMTP, message: Message, sender: str, envelope: dict[str, str]
    ) -> tuple[bytes, list[str]]:
        """What aiosmtplib's ``send_message`` would send, and its MAIL options."""
        await ehlo_or_helo(client)
        options = []
        utf8 = not (sender + "".join(envelope)).isascii()
        if utf8:
            if not client.supports_extension("smtputf8"):
                raise aiosmtplib.SMTPNotSupported(
                    "An address containing non-ASCII characters was provided, but "
                    "SMTPUTF8 is not supported by this server"
                )
            options.append("SMTPUTF8")
        cte_type = "7bit"
        if client.supports_extension("8BITMIME"):
            options.append("BODY=8BITMIME")
            cte_type = "8bit"
        return flatten_message(message, utf8=utf8, cte_type=cte_type), options

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
        await self._turns.close()
        idle, self._idle = self._idle, []
        await asyncio.gather(*(self._discard(c) for c, _ in idle))
