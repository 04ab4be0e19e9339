"""The message that travels from server to worker, and the rules for what is acceptable.

A :class:`MailJob` is built only through :func:`new_job` (which validates everything that
will reach an SMTP header) or :meth:`MailJob.from_bytes` (which re-validates what came
off the queue), so the worker never sees a header it cannot trust.
"""

from __future__ import annotations

import functools
import json
import re
import urllib.parse
import uuid
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


def strict_query(raw: bytes) -> bool:
    """Whether a raw query string is valid UTF-8, percent-decoded too. (Werkzeug would
    keep ``%ff`` as the literal text ``%FF``; we refuse it instead.)"""
    try:
        urllib.parse.parse_qsl(raw.decode(), keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        return False
    return True


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
@functools.lru_cache(maxsize=4096)
def _parse_address(value: str, field: str) -> str:
    value = check_header_text(value, field).strip()
    if not value:
        raise InvalidMessage(f"{field} must not be empty", field)
    parsed = getaddresses([value])
    if len(parsed) != 1 or not parsed[0][1]:
        raise InvalidMessage(f"{field} is not one email address: {value!r}", field)
    name, addr = parsed[0]
    if len(name) > MAX_NAME_CHARS:
        raise InvalidMessage(
            f"{field}: a display name is longer than {MAX_NAME_CHARS} characters", field
        )
    try:
        normalized = check_email(addr).normalized
    except EmailNotValidError as exc:
        raise InvalidMessage(f"{field} is not a valid email address: {exc}", field) from None
    if name:
        return f"{_quote_name(name)} <{normalized}>"
    return normalized


def _quote_name(name: str) -> str:
    if any(c in name for c in '()<>[]:;@\\,."'):
        escaped = name.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    return name


@functools.lru_cache(maxsize=4096)
def addr_spec(address: str) -> str:
    """``Name <a@b>`` -> ``a@b`` (for the SMTP envelope)."""
    return getaddresses([address])[0][1]


@functools.lru_cache(maxsize=4096)
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
    # When to send it (UTC, ISO 8601), if later than accepted: see :func:`parse_send_at`.
    send_at: str | None = None

    def to_bytes(self) -> bytes:
        body = {
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
            send_at=body.get("send_at"),
        )

    def due_at(self) -> datetime | None:
        """When a scheduled message is due (None: at once)."""
        if self.send_at is None:
            return None
        return datetime.fromisoformat(self.send_at)


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
    send_at: Any = None,
) -> MailJob:
    """Validate a message request and give it an id. Raises :class:`InvalidMessage`.

    ``limits`` applies the size limits for client requests (not to queued messages).
    """
    if isinstance(to, str):
        to = [to]
    if not isinstance(to, list) or not to:
        raise InvalidMessage("to must be an address or a non-empty list of addresses", "to")
    if limits and len(to) > limits.max_recipients:
        raise InvalidMessage(f"to has more than {limits.max_recipients} recipients", "to")
    recipients = tuple(parse_address(item, "to") for item in to)
    if len({addr_spec(r).lower() for r in recipients}) != len(recipients):
        raise InvalidMessage("to names the same address twice", "to")
    if not isinstance(subject, str):
        raise InvalidMessage("subject must be a string", "subject")
    check_header_text(subject, "subject")
    if limits and len(subject) > limits.max_subject_chars:
        raise InvalidMessage(
            f"subject is longer than {limits.max_subject_chars} characters", "subject"
        )
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
        reply_to = parse_address(reply_to, "reply_to")
    if send_at is not None and not _is_utc_time(send_at):
        raise InvalidMessage("send_at must be a UTC time (ISO 8601)", "send_at")
    return MailJob(
        id=job_id or uuid.uuid4().hex,
        to=recipients,
        subject=subject,
        text=text,
        html=html,
        reply_to=reply_to,
        created_at=created_at
        if isinstance(created_at, str)
        else datetime.now(UTC).isoformat(timespec="milliseconds"),
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
        send_at=(
            parse_send_at(send_at, limits.max_schedule_days)
            if isinstance(send_at := getattr(data, "send_at", None), str)
            else None
        ),
    )


def legacy_job(address: str) -> MailJob:
    """The fixed test message of ``GET /?sendmail=<address>``."""
    return new_job(to=strip_mailto(address), subject=LEGACY_SUBJECT, text=LEGACY_TEXT)
