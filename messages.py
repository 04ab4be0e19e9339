"""The message that travels from server to worker, and the rules for what is acceptable.

A :class:`MailJob` is built only through :func:`new_job` (which validates everything that
will reach an SMTP header) or :meth:`MailJob.from_bytes` (which re-validates what came
off the queue), so the worker never sees a header it cannot trust.
"""

from __future__ import annotations

import base64
import binascii
import collections
import functools
import json
import os
import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import getaddresses
from typing import Any

import email_validator
from email_validator import EmailNotValidError, ValidatedEmail, validate_email

from errors import InvalidJSON, InvalidMessage

FORMAT_VERSION = 1
LEGACY_SUBJECT = "Test email"
LEGACY_TEXT = "This is a test email sent from the messaging system.\n"
# Anything a mail library may take for a line break, or that has no place in a header:
# C0 controls but TAB (CR, LF, NUL, VT, FF, FS, GS, RS ...), DEL, C1 controls, U+2028/9.
_FORBIDDEN = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
# A lone UTF-16 surrogate (JSON allows \ud800) is not a character: it cannot be encoded.
_SURROGATE = re.compile("[\ud800-\udfff]")
# Any syntactically valid address is accepted; whether it can be delivered is the SMTP
# server's decision. So no DNS look-up, a domain without a dot is fine (user@mailhost on
# an intranet relay), and so are the special-use names email-validator refuses by default
# (.test, .local, .localhost, .invalid, .arpa, .onion): RFC 6761 6.2 asks software to
# treat test names like any other, and intranet relays deliver to .local every day.
# Emptying the list is email-validator's documented way to allow them.
email_validator.SPECIAL_USE_DOMAIN_NAMES.clear()


def check_email(spec: str) -> ValidatedEmail:
    """``spec`` (``user@example.com``) checked for syntax only; raises EmailNotValidError."""
    return validate_email(spec, check_deliverability=False, globally_deliverable=False)


# A display name ("Name" in "Name <a@b>") longer than this is refused: together with the
# address it must fit in one header line (RFC 5322: 998 octets) when it cannot be folded.
MAX_NAME_CHARS = 200


def check_unicode(value: str, field: str) -> str:
    """Refuse a lone surrogate, which no UTF-8 mail (or JSON answer) can carry."""
    found = _SURROGATE.search(value)
    if found:
        raise InvalidMessage(
            f"{field} is not valid Unicode: lone surrogate U+{ord(found.group()):04X}", field
        )
    return value


def check_header_text(value: str, field: str) -> str:
    """Refuse CR, LF, NUL and every other control or line-separator character in anything
    that ends up in a mail header."""
    check_unicode(value, field)
    found = _FORBIDDEN.search(value)
    if found:
        raise InvalidMessage(f"{field} must not contain {found.group()!r}", field)
    return value


def query_pairs(raw: bytes) -> list[tuple[str, str]] | None:
    """A raw query string's name/value pairs, or None unless it is valid UTF-8,
    percent-decoded too. Where it is, they are what werkzeug's ``request.args`` holds."""
    try:
        return urllib.parse.parse_qsl(raw.decode(), keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        return None


def strict_query(raw: bytes) -> bool:
    """Whether a raw query string is valid UTF-8, percent-decoded too. (Werkzeug would
    keep ``%ff`` as the literal text ``%FF``; we refuse it instead.)"""
    return query_pairs(raw) is not None


def parse_json(text: str) -> Any:
    """A request body as JSON, stricter than :func:`json.loads`: a key given twice, a key
    that is not valid Unicode and nesting too deep for the parser raise :class:`InvalidJSON`
    (a 400), and so does text that is not JSON at all (saying where: line and column) or
    Python's extras (``NaN``, ``Infinity``)."""

    def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for key, value in pairs:
            if _SURROGATE.search(key):
                raise InvalidJSON("a key is not valid Unicode (lone surrogate)")
            if key in seen:
                raise InvalidJSON(f"duplicate key {key!r}", key)
            seen[key] = value
        return seen

    def no_constant(name: str) -> Any:
        raise InvalidJSON(f"the body is not valid JSON: {name} is not a JSON value")

    if not text.strip():
        raise InvalidJSON("the body is empty: send a JSON object")
    try:
        return json.loads(text, object_pairs_hook=unique_keys, parse_constant=no_constant)
    except RecursionError:
        raise InvalidJSON("the JSON is nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise InvalidJSON(
            f"the body is not valid JSON: {exc.msg[:1].lower()}{exc.msg[1:]} at line {exc.lineno}, "
            f"column {exc.colno}"
        ) from None


def parse_address(value: str, field: str = "to") -> str:
    """Validate one address, ``user@example.com`` or ``Name <user@example.com>``.

    Returns the normalised form (``Name <user@example.com>`` when a name was given).
    Syntax only: no DNS look-up.
    """
    if not isinstance(value, str):
        raise InvalidMessage(f"{field} must be a string", field)
    return _parse_address(value, field)


# Pure functions of their arguments, called several times per mail on the same addresses
# (validation at the door and again on the worker, envelope and header forms): cached.
@functools.lru_cache(maxsize=512)
def _parse_address(value: str, field: str) -> str:
    value = check_header_text(value, field).strip()
    if not value:
        raise InvalidMessage(f"{field} must not be empty", field)
    parsed = parse_addresses(value)
    if len(parsed) != 1 or not parsed[0][1]:
        raise InvalidMessage(f"{field} is not one email address: {value!r}", field)
    name, addr = parsed[0]
    if len(name) > MAX_NAME_CHARS:
        raise InvalidMessage(
            f"{field}: a display name is longer than {MAX_NAME_CHARS} characters", field
        )
    try:
        normalized = _plain_address(addr) or check_email(addr).normalized
    except EmailNotValidError as exc:
        raise InvalidMessage(f"{field} is not a valid email address: {exc}", field) from None
    if name:
        return f"{_quote_name(name)} <{normalized}>"
    return normalized


# The everyday address: ASCII, a dot-atom local part, a domain of letter-digit-hyphen labels
# ending in a letters-only top-level label. email-validator's answer for these is the
# address with its domain in lower case (a property test holds the two together); any
# other address is asked of email-validator.
# An unquoted local part (RFC 5322's dot-atom), as a pattern.
DOT_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
_PLAIN = re.compile(
    DOT_ATOM + r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}"
)


def parse_addresses(value: str) -> list[tuple[str, str]]:
    """``email.utils.getaddresses([value])``: the (name, address) pairs of a header value,
    with the everyday address (``_PLAIN``) answered without the parser, which takes most of
    the time of an address check (it gives ``[("", value)]`` for these; a property test
    holds the two together)."""
    if _PLAIN.fullmatch(value):
        return [("", value)]
    return getaddresses([value])


def _plain_address(addr: str) -> str | None:
    """``addr`` normalised as email-validator would, when it is an everyday address."""
    if len(addr) > 254 or not _PLAIN.fullmatch(addr):
        return None
    local, _, domain = addr.rpartition("@")
    if len(local) > 64 or "--" in domain:  # "xn--" (IDNA) and the like: the library
        return None
    return f"{local}@{domain.lower()}"


def _queued_address(value: Any, field: str) -> str:
    """An address read back from the queue, where :func:`parse_address` wrote it in its
    normalised form: checked again for what keeps the headers and the envelope safe (a
    string, one address, no control characters), not for its syntax once more."""
    if not isinstance(value, str):
        raise InvalidMessage(f"{field} must be a string", field)
    check_header_text(value, field)
    parsed = parse_addresses(value)
    if len(parsed) != 1 or not parsed[0][1] or "@" not in parsed[0][1]:
        raise InvalidMessage(f"{field} is not one email address: {value!r}", field)
    return value


def _quote_name(name: str) -> str:
    if any(c in name for c in '()<>[]:;@\\,."'):
        escaped = name.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    return name


@functools.lru_cache(maxsize=512)
def addr_spec(address: str) -> str:
    """``Name <a@b>`` -> ``a@b`` (for the SMTP envelope); "" when there is none."""
    parsed = parse_addresses(address)
    return parsed[0][1] if parsed else ""


@functools.lru_cache(maxsize=512)
def suppression_key(address: str) -> str:
    """The form the suppression list compares: the envelope address in lower case, its
    domain in ASCII (an IDN domain as punycode). (A local part is case-sensitive in
    principle, never in practice: ``Bob@`` and ``bob@`` are one mailbox.) Raises
    :class:`InvalidMessage` for what is not an address."""
    spec = addr_spec(check_header_text(address, "address").strip()) or address.strip()
    try:
        checked = check_email(spec)
    except EmailNotValidError as exc:
        raise InvalidMessage(f"not a valid email address: {exc}", "address") from None
    return f"{checked.local_part.lower()}@{checked.ascii_domain.lower()}"


def strip_mailto(value: str) -> str:
    """``mailto:a@b`` -> ``a@b``; the legacy API accepts both."""
    if value[:7].lower() == "mailto:":
        return value[7:]
    return value


@dataclass(frozen=True)
class InputLimits:
    """Size limits for what clients may ask for (MAX_RECIPIENTS, MAX_SUBJECT_CHARS, ...)."""

    max_recipients: int = 50
    max_subject_chars: int = 998
    max_body_chars: int = 5_000_000
    # Issue 12: who may be a message's "from" (addresses, "@domain" entries), and the
    # total size of its attachments (decoded bytes).
    allowed_senders: tuple[str, ...] = ()
    max_attachment_bytes: int = 7 * 1024 * 1024
    max_schedule_days: int = 30


# One encoder, built once (json.dumps with options builds one per call).
_compact_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


@dataclass(frozen=True, kw_only=True)
class MailJob:
    """One accepted message. ``id`` is a 32-character hex string."""

    id: str
    to: tuple[str, ...]
    subject: str
    text: str
    html: str | None = None
    reply_to: str | None = None
    created_at: str = ""
    # Issue 12 (all optional; a job without them is queued and sent as before).
    cc: tuple[str, ...] = ()
    bcc: tuple[str, ...] = ()  # envelope only: never in a header
    sender: str | None = None  # the per-message From (one of ALLOWED_SENDERS)
    headers: tuple[tuple[str, str], ...] = ()
    attachments: tuple[Attachment, ...] = ()
    tags: tuple[str, ...] = ()
    metadata: tuple[tuple[str, str], ...] = ()

    @property
    def recipients(self) -> tuple[str, ...]:
        """Every recipient of the envelope: to, cc and bcc."""
        return (*self.to, *self.cc, *self.bcc) if self.cc or self.bcc else self.to

    @property
    def plain(self) -> bool:
        """Whether the job uses none of the features beyond to/subject/text/html/reply_to/cc
        (the ones :func:`mailer.render` writes without the email package)."""
        return not (self.sender or self.headers or self.attachments)

    # When to send it (UTC, ISO 8601), if later than accepted: see :func:`parse_send_at`.
    send_at: str | None = None

    def to_bytes(self) -> bytes:
        body: dict[str, Any] = {
            "id": self.id,
            "to": list(self.to),
            "subject": self.subject,
            "text": self.text,
            "html": self.html,
            "reply_to": self.reply_to,
            "created_at": self.created_at,
            "send_at": self.send_at,
            "v": FORMAT_VERSION,
        }
        body.update(
            cc=list(self.cc),
            bcc=list(self.bcc),
            sender=self.sender,
            headers=dict(self.headers),
            attachments=[a.to_json() for a in self.attachments],
            tags=list(self.tags),
            metadata=dict(self.metadata),
        )
        return _compact_json(body).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> MailJob:
        """Decode and re-validate a queued message; raises :class:`InvalidMessage`."""
        try:
            body = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidMessage(f"message body is not JSON: {exc}") from None
        if not isinstance(body, dict) or body.get("v") != FORMAT_VERSION:
            raise InvalidMessage("message body is not a Mailroom message (format version)")
        job_id = body.get("id")
        if not isinstance(job_id, str) or len(job_id) != 32 or not _is_hex(job_id):
            raise InvalidMessage("message id is missing or malformed", "id")
        return new_job(
            to=body.get("to"),
            subject=body.get("subject"),
            text=body.get("text"),
            html=body.get("html"),
            reply_to=body.get("reply_to"),
            job_id=job_id,
            created_at=body.get("created_at"),
            queued=True,
            cc=body.get("cc"),
            bcc=body.get("bcc"),
            sender=body.get("sender"),
            headers=body.get("headers"),
            attachments=body.get("attachments"),
            tags=body.get("tags"),
            metadata=body.get("metadata"),
            send_at=body.get("send_at"),
        )

    def due_at(self) -> datetime | None:
        """When a scheduled message is due (None: at once)."""
        if self.send_at is None:
            return None
        return datetime.fromisoformat(self.send_at)


# Message ids are random UUIDs (version 4), as uuid.uuid4() makes them, from os.urandom
# read for 256 ids at a time. os.urandom gives up the GIL for its system call, and an
# event loop that gives it up while the store's writer thread runs Python waits for it
# up to the switch interval (5 ms): one call per request stalled the server's loop for
# 6% of its time under load (py-spy, a new connection per request).
_IDS_PER_READ = 256
_UUID4_CLEAR = ~((0xF000 << 64) | (0xC000 << 48))
_UUID4_SET = (0x4000 << 64) | (0x8000 << 48)
_ready_ids: collections.deque[str] = collections.deque()
os.register_at_fork(after_in_child=_ready_ids.clear)  # a child must not repeat them


def new_id() -> str:
    """A new message id: 32 lowercase hex digits of a random version 4 UUID."""
    try:
        return _ready_ids.popleft()
    except IndexError:
        pool = os.urandom(16 * _IDS_PER_READ)
        _ready_ids.extend(
            f"{int.from_bytes(pool[i : i + 16]) & _UUID4_CLEAR | _UUID4_SET:032x}"
            for i in range(0, len(pool), 16)
        )
        return _ready_ids.popleft()


def _is_hex(value: str) -> bool:
    try:
        int(value, 16)
    except ValueError:
        return False
    return True


def new_job(
    *,
    to: Any,
    subject: Any,
    text: Any,
    html: Any = None,
    reply_to: Any = None,
    job_id: str | None = None,
    created_at: Any = None,
    limits: InputLimits | None = None,
    cc: Any = None,
    bcc: Any = None,
    sender: Any = None,
    headers: Any = None,
    attachments: Any = None,
    tags: Any = None,
    metadata: Any = None,
    queued: bool = False,
    send_at: Any = None,
) -> MailJob:
    """Validate a message request and give it an id. Raises :class:`InvalidMessage`.

    ``limits`` applies the size limits for client requests (not to queued messages), and
    the ALLOWED_SENDERS check of ``sender``; ``queued`` says the addresses come from the
    queue, normalised by this function before.
    """
    address = _queued_address if queued else parse_address
    if isinstance(to, str):
        to = [to]
    if not isinstance(to, list) or not to:
        raise InvalidMessage("to must be an address or a non-empty list of addresses", "to")
    if limits and len(to) > limits.max_recipients:
        raise InvalidMessage(f"to has more than {limits.max_recipients} recipients", "to")
    recipients = tuple(address(item, "to") for item in to)
    copies = {
        name: _address_list(value, name, address) for name, value in (("cc", cc), ("bcc", bcc))
    }
    every = (*recipients, *copies["cc"], *copies["bcc"])
    if limits and len(every) > limits.max_recipients:
        field = "bcc" if copies["bcc"] else "cc"
        raise InvalidMessage(
            f"to, cc and bcc have more than {limits.max_recipients} recipients together "
            "(MAX_RECIPIENTS)",
            field,
        )
    if len({addr_spec(r).lower() for r in every}) != len(every):
        field = "bcc" if copies["bcc"] else ("cc" if copies["cc"] else "to")
        if len(every) == len(recipients):
            raise InvalidMessage("to names the same address twice", "to")
        raise InvalidMessage(f"{field}: an address is given twice in to, cc and bcc", field)
    if subject is None:
        raise InvalidMessage("subject is required", "subject")
    if not isinstance(subject, str):
        raise InvalidMessage("subject must be a string", "subject")
    check_header_text(subject, "subject")
    if limits and len(subject) > limits.max_subject_chars:
        raise InvalidMessage(
            f"subject is longer than {limits.max_subject_chars} characters", "subject"
        )
    if text is None and html is None:
        raise InvalidMessage("text or html is required", "text")
    if text is None and isinstance(html, str):
        # The plain-text part of an HTML-only mail (once html is known to be acceptable).
        too_long = limits is not None and len(html) > limits.max_body_chars
        text = "" if too_long or "\0" in html else text_from_html(check_unicode(html, "html"))
    for name, value in (("text", text), ("html", html)):
        if value is None and name == "html":
            continue
        if not isinstance(value, str):
            raise InvalidMessage(f"{name} must be a string", name)
        check_unicode(value, name)
        if "\0" in value:
            raise InvalidMessage(f"{name} must not contain NUL", name)
        if limits and len(value) > limits.max_body_chars:
            raise InvalidMessage(f"{name} is longer than {limits.max_body_chars} characters", name)
    if reply_to is not None:
        reply_to = address(reply_to, "reply_to")
    if sender is not None:
        sender = address(sender, "from")
        if limits is not None:
            check_sender(sender, limits.allowed_senders)
    if send_at is not None and not _is_utc_time(send_at):
        raise InvalidMessage("send_at must be a UTC time (ISO 8601)", "send_at")
    return MailJob(
        id=job_id or new_id(),
        to=recipients,
        subject=subject,
        text=text,
        html=html,
        reply_to=reply_to,
        created_at=created_at
        if isinstance(created_at, str)
        else datetime.now(UTC).isoformat(timespec="milliseconds"),
        cc=copies["cc"],
        bcc=copies["bcc"],
        sender=sender,
        headers=_custom_headers(headers),
        attachments=_attachments(attachments, limits),
        tags=_tags(tags),
        metadata=_metadata(metadata),
        send_at=send_at,
    )


def _is_utc_time(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        at = datetime.fromisoformat(value)
    except ValueError:
        return False
    return at.utcoffset() == timedelta(0)


# RFC 3339 date-time: a date, "T" (or a space, or "t"), a time, and an offset (Z or +hh:mm).
_RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?(?:[Zz]|[+-]\d{2}:\d{2})"
)


def parse_send_at(value: str, max_days: int, now: datetime | None = None) -> str | None:
    """``send_at`` of a request (RFC 3339 with an offset) as the job's UTC time; None when
    it is not in the future (send now). More than ``max_days`` ahead is refused."""
    if not _RFC3339.fullmatch(value):
        raise InvalidMessage(
            "send_at must be an RFC 3339 time with an offset, like 2030-01-02T03:04:05Z",
            "send_at",
        )
    text = value.upper().replace("Z", "+00:00")
    # Python 3.11 reads at most 6 fraction digits: drop the rest (under a microsecond).
    text = re.sub(r"(\.\d{6})\d+", r"\1", text)
    try:
        at = datetime.fromisoformat(text).astimezone(UTC)
    except ValueError as exc:
        raise InvalidMessage(f"send_at is not a valid time: {exc}", "send_at") from None
    now = now or datetime.now(UTC)
    if at <= now:
        return None
    if at - now > timedelta(days=max_days):
        raise InvalidMessage(
            f"send_at is more than {max_days} days ahead (MAX_SCHEDULE_DAYS)", "send_at"
        )
    return at.isoformat(timespec="milliseconds")


def request_job(data: Any, limits: InputLimits) -> MailJob:
    """The job of one validated message request (``POST /api/messages``, a batch item)."""
    return new_job(
        to=data.to,
        subject=data.subject,
        text=data.text,
        html=data.html,
        reply_to=data.reply_to,
        limits=limits,
        cc=data.cc,
        bcc=data.bcc,
        sender=data.from_,
        headers=data.headers,
        attachments=(
            None if data.attachments is None else [a.model_dump() for a in data.attachments]
        ),
        tags=data.tags,
        metadata=data.metadata,
        send_at=(
            parse_send_at(send_at, limits.max_schedule_days)
            if isinstance(send_at := getattr(data, "send_at", None), str)
            else None
        ),
    )


def legacy_job(address: str) -> MailJob:
    """The fixed test message of ``GET /?sendmail=<address>``."""
    return new_job(to=strip_mailto(address), subject=LEGACY_SUBJECT, text=LEGACY_TEXT)


# -- issue 12: cc/bcc, from, custom headers, attachments, tags and metadata --------------

MAX_HEADERS = 50  # custom headers of one message
MAX_HEADER_VALUE_CHARS = 2000
MAX_ATTACHMENTS = 100
MAX_FILENAME_CHARS = 255
MAX_TAGS = 10
MAX_TAG_CHARS = 64
MAX_METADATA = 20
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 500
# RFC 5322 3.6.8: a field name is printable ASCII but the colon.
_FIELD_NAME = re.compile(r"[!-9;-~]{1,76}")
# What Mailroom writes itself: a custom header may not say it again, or say otherwise.
OWNED_HEADERS = frozenset(
    {
        "from",
        "to",
        "cc",
        "bcc",
        "subject",
        "date",
        "message-id",
        "mime-version",
        "reply-to",
        "dkim-signature",
    }
)
OWNED_PREFIXES = ("content-", "x-mailroom-")
# A tag is a short word: letters, digits and a few marks (no quotes, commas or spaces, so a
# tag is found in the stored list by a plain substring match).
_TAG = re.compile(r"[A-Za-z0-9_.:@/+=-]{1,64}")
# A MIME type: type/subtype, RFC 6838 restricted names.
_MIME_NAME = r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
_CONTENT_TYPE = re.compile(f"{_MIME_NAME}/{_MIME_NAME}")
_WHITESPACE = re.compile(r"[ \t\r\n]+")
# A Content-ID (without its angle brackets): an id-left@id-right of safe characters.
_CONTENT_ID = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.@-]{1,200}")


class AttachmentTooLarge(InvalidMessage):
    """The attachments are larger than MAX_ATTACHMENT_BYTES (answered 413)."""


@dataclass(frozen=True)
class Attachment:
    """One attached file; ``content_id`` makes it an inline part (``cid:`` in the HTML)."""

    filename: str
    content_type: str
    content: bytes
    content_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "filename": self.filename,
            "content_type": self.content_type,
            "content": base64.b64encode(self.content).decode("ascii"),
            "content_id": self.content_id,
        }


def _address_list(
    value: Any, field: str, address: Callable[[Any, str], str] = parse_address
) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise InvalidMessage(f"{field} must be an address or a list of addresses", field)
    return tuple(address(item, field) for item in value)


def check_sender(sender: str, allowed: tuple[str, ...]) -> None:
    """Refuse a ``from`` that ALLOWED_SENDERS does not name (an address, or ``@domain``)."""
    spec = addr_spec(sender).lower()
    domain = "@" + spec.rpartition("@")[2]
    if not any(entry.lower() in (spec, domain) for entry in allowed):
        raise InvalidMessage(
            f"from: {spec} is not one of the allowed senders (ALLOWED_SENDERS)", "from"
        )


def text_from_html(html: str) -> str:
    """A readable plain-text version of an HTML body (html2text: paragraphs, lists and
    links kept readable). Made once, at accept: the queued message carries it."""
    import html2text  # imported on first use: most mails carry their own text

    converter = html2text.HTML2Text()
    converter.body_width = 0  # no hard wrapping: quoted-printable keeps lines short
    converter.ignore_images = True
    converter.unicode_snob = True
    converter.ignore_emphasis = True
    text = converter.handle(html).strip()
    return (text + "\n") if text else ""


def _custom_headers(value: Any) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise InvalidMessage("headers must be an object of header names and values", "headers")
    if len(value) > MAX_HEADERS:
        raise InvalidMessage(f"headers: at most {MAX_HEADERS} custom headers", "headers")
    seen: set[str] = set()
    out = []
    for name, text in value.items():
        if not isinstance(name, str) or not _FIELD_NAME.fullmatch(name):
            raise InvalidMessage(
                f"headers: {name!r} is not a header field name (printable ASCII but ':', "
                "1 to 76 characters)",
                "headers",
            )
        lowered = name.lower()
        if lowered in OWNED_HEADERS or lowered.startswith(OWNED_PREFIXES):
            raise InvalidMessage(f"headers: {name} is written by Mailroom itself", "headers")
        if lowered in seen:
            raise InvalidMessage(f"headers: {name} is given twice", "headers")
        seen.add(lowered)
        if not isinstance(text, str):
            raise InvalidMessage(f"headers: the value of {name} must be a string", "headers")
        check_header_text(text, "headers")
        if not text.strip():
            raise InvalidMessage(f"headers: the value of {name} is empty", "headers")
        if len(text) > MAX_HEADER_VALUE_CHARS:
            raise InvalidMessage(
                f"headers: the value of {name} is longer than {MAX_HEADER_VALUE_CHARS} characters",
                "headers",
            )
        out.append((name, text))
    return tuple(out)


def check_filename(name: Any) -> str:
    """An attachment's file name: a plain name, no path, no control character."""
    if not isinstance(name, str) or not name.strip():
        raise InvalidMessage("attachments: a filename is required", "attachments")
    check_unicode(name, "attachments")
    found = _FORBIDDEN.search(name)
    if found:
        raise InvalidMessage(
            f"attachments: filename must not contain {found.group()!r}", "attachments"
        )
    if "/" in name or "\\" in name or name.strip(" .") == "" or name != name.strip():
        raise InvalidMessage(
            f"attachments: {name!r} is not a plain file name (no path, no leading or trailing "
            "spaces)",
            "attachments",
        )
    if len(name) > MAX_FILENAME_CHARS:
        raise InvalidMessage(
            f"attachments: a filename is longer than {MAX_FILENAME_CHARS} characters",
            "attachments",
        )
    return name


def _attachments(value: Any, limits: InputLimits | None) -> tuple[Attachment, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise InvalidMessage("attachments must be a list", "attachments")
    if len(value) > MAX_ATTACHMENTS:
        raise InvalidMessage(f"attachments: at most {MAX_ATTACHMENTS} files", "attachments")
    out = []
    total = 0
    content_ids: set[str] = set()
    for item in value:
        if not isinstance(item, dict):
            raise InvalidMessage("attachments: each one must be an object", "attachments")
        filename = check_filename(item.get("filename"))
        content_type = item.get("content_type") or "application/octet-stream"
        if not isinstance(content_type, str) or not _CONTENT_TYPE.fullmatch(content_type):
            raise InvalidMessage(
                f"attachments: {content_type!r} is not a content type (type/subtype)",
                "attachments",
            )
        content = item.get("content")
        if isinstance(content, str):
            # Line breaks (base64 -w 76) are fine; anything else not of the alphabet, bad
            # padding or trailing bits are not.
            packed = _WHITESPACE.sub("", content)
            try:
                data = base64.b64decode(packed, validate=True)
                if base64.b64encode(data).decode("ascii") != packed:
                    raise ValueError("not canonical")
            except (binascii.Error, ValueError):
                raise InvalidMessage(
                    f"attachments: the content of {filename!r} is not valid base64",
                    "attachments",
                ) from None
        elif isinstance(content, bytes):  # a multipart/form-data upload
            data = content
        else:
            raise InvalidMessage(
                f"attachments: the content of {filename!r} must be a base64 string",
                "attachments",
            )
        total += len(data)
        if limits is not None and total > limits.max_attachment_bytes:
            raise AttachmentTooLarge(
                f"attachments: more than {limits.max_attachment_bytes} bytes in all "
                "(MAX_ATTACHMENT_BYTES)",
                "attachments",
            )
        content_id = item.get("content_id")
        if content_id is not None:
            if not isinstance(content_id, str) or not _CONTENT_ID.fullmatch(content_id):
                raise InvalidMessage(
                    f"attachments: {content_id!r} is not a content id (letters, digits, "
                    "'@', '.', '-', ...)",
                    "attachments",
                )
            if content_id in content_ids:
                raise InvalidMessage(
                    f"attachments: content_id {content_id!r} is given twice", "attachments"
                )
            content_ids.add(content_id)
        out.append(Attachment(filename, content_type.lower(), data, content_id))
    return tuple(out)


def _tags(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_TAGS:
        raise InvalidMessage(f"tags must be a list of at most {MAX_TAGS} tags", "tags")
    for tag in value:
        if not isinstance(tag, str) or not _TAG.fullmatch(tag):
            raise InvalidMessage(
                f"tags: {tag!r} is not a tag (1 to {MAX_TAG_CHARS} letters, digits or "
                "_ . : @ / + = -)",
                "tags",
            )
    if len(set(value)) != len(value):
        raise InvalidMessage("tags: a tag is given twice", "tags")
    return tuple(value)


def _metadata(value: Any) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict) or len(value) > MAX_METADATA:
        raise InvalidMessage(
            f"metadata must be an object of at most {MAX_METADATA} string values", "metadata"
        )
    for key, item in value.items():
        if not isinstance(key, str) or not _TAG.fullmatch(key):
            raise InvalidMessage(
                f"metadata: {key!r} is not a key (1 to {MAX_METADATA_KEY_CHARS} letters, "
                "digits or _ . : @ / + = -)",
                "metadata",
            )
        if not isinstance(item, str) or len(item) > MAX_METADATA_VALUE_CHARS:
            raise InvalidMessage(
                f"metadata: the value of {key} must be a string of at most "
                f"{MAX_METADATA_VALUE_CHARS} characters",
                "metadata",
            )
        check_header_text(item, "metadata")
    return tuple(value.items())
