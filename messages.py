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
from datetime import UTC, datetime
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
@functools.lru_cache(maxsize=512)
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
_PLAIN = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}"
)


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
    parsed = getaddresses([value])
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
    """``Name <a@b>`` -> ``a@b`` (for the SMTP envelope)."""
    return getaddresses([address])[0][1]


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

    def to_bytes(self) -> bytes:
        body = {
            "id": self.id,
            "to": list(self.to),
            "subject": self.subject,
            "text": self.text,
            "html": self.html,
            "reply_to": self.reply_to,
            "created_at": self.created_at,
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
            queued=True,
        )


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
    queued: bool = False,
) -> MailJob:
    """Validate a message request and give it an id. Raises :class:`InvalidMessage`.

    ``limits`` applies the size limits for client requests (not to queued messages);
    ``queued`` says the addresses come from the queue, normalised by this function before.
    """
    address = _queued_address if queued else parse_address
    if isinstance(to, str):
        to = [to]
    if not isinstance(to, list) or not to:
        raise InvalidMessage("to must be an address or a non-empty list of addresses", "to")
    if limits and len(to) > limits.max_recipients:
        raise InvalidMessage(f"to has more than {limits.max_recipients} recipients", "to")
    recipients = tuple(address(item, "to") for item in to)
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
        reply_to = address(reply_to, "reply_to")
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
    )


def request_job(data: Any, limits: InputLimits) -> MailJob:
    """The job of one validated message request (``POST /api/messages``, a batch item)."""
    return new_job(
        to=data.to,
        subject=data.subject,
        text=data.text,
        html=data.html,
        reply_to=data.reply_to,
        limits=limits,
    )


def legacy_job(address: str) -> MailJob:
    """The fixed test message of ``GET /?sendmail=<address>``."""
    return new_job(to=strip_mailto(address), subject=LEGACY_SUBJECT, text=LEGACY_TEXT)
