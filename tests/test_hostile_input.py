"""Hostile input: each a clear 4xx with nothing queued, nothing logged, no quota spent.

Lone surrogates and absurd nesting in JSON, HEAD on routes with side effects, forwarding
headers with nothing in them, header lines over RFC 5322's 998 characters, rate limits
spent by refused requests, duplicate JSON keys, undecodable query strings, and requests
with both Content-Length and Transfer-Encoding (against ``python server.py``).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import re
from collections.abc import Callable
from datetime import UTC, datetime
from email.quoprimime import header_decode
from email.utils import format_datetime, getaddresses, parsedate_to_datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiosmtplib.email import flatten_message, quote_address
from email_validator import EmailNotValidError
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from werkzeug.datastructures import Headers

from broker import Names
from config import Secret, Settings
from errors import InvalidMessage
from guard import identify
from mailer import _date_of_second, build_mime, is_plain_envelope_address, render
from messages import (
    MAX_NAME_CHARS,
    InputLimits,
    MailJob,
    _plain_address,
    addr_spec,
    check_email,
    new_job,
    parse_addresses,
    suppression_key,
)
from tests.conftest import running_app, running_worker, wait_ready
from tests.support import (
    Proc,
    SmtpServer,
    child_env,
    free_port,
    queue_depth,
    spawn,
    wait_http,
)

TOKEN = "tok-" + "h" * 28
BEARER = {"Authorization": f"Bearer {TOKEN}"}
JSON = {"Content-Type": "application/json"}
BODY = {"to": "a@example.com", "subject": "s", "text": "t"}


def remote(ip: str = "203.0.113.7") -> dict[str, Any]:
    return {"scope_base": {"client": (ip, 5555)}}


async def depth(settings: Settings) -> int:
    return await queue_depth(Names.of(settings).send_queue)


def raw_body(**fields: str) -> str:
    """BODY with ``fields`` spliced in as raw JSON text (so "\\ud800" stays an escape)."""
    parts = [f'"{k}": {json.dumps(v)}' for k, v in BODY.items() if k not in fields]
    parts += [f'"{k}": "{v}"' for k, v in fields.items()]
    return "{" + ", ".join(parts) + "}"


# -- 7: lone surrogates, deep nesting ---------------------------------------------------

SURROGATES: list[tuple[str, str | None]] = [
    (raw_body(subject="\\ud800"), "subject"),
    (raw_body(subject="ok \\udfff"), "subject"),
    (raw_body(text="\\ud800"), "text"),
    (raw_body(html="<p>\\udbff</p>"), "html"),
    (raw_body(reply_to="\\ud800 <r@example.com>"), "reply_to"),
    (raw_body(to="\\ud800 <b@example.com>"), "to"),
    ('{"to": ["b@example.com", "Ann\\udc00 <c@example.com>"], "subject": "s", "text": "t"}', "to"),
    ('{"to": "a@example.com", "subject": "s", "text": "t", "\\ud800": 1}', None),
]
DEEP: list[tuple[str, str | None]] = [
    ("[" * 100_000, None),
    ('{"a":' * 100_000, None),
    ("[" * 900 + "]" * 900, None),  # deep, but within what the parser manages
    ('{"to": ' + "[" * 100_000 + "}", None),
]


@pytest.mark.parametrize(("raw", "field"), SURROGATES + DEEP, ids=range(len(SURROGATES + DEEP)))
async def test_surrogates_and_deep_nesting_are_a_clear_400(
    raw: str, field: str | None, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings()
    async with running_app(settings) as (app, client):
        await wait_ready(app)
        response = await client.post("/api/messages", data=raw, headers=JSON)
        assert response.status_code == 400
        answer = await response.get_json()
        assert set(answer) <= {"error", "field"} and answer["error"]
        assert answer.get("field") == field
        answer_text = await response.get_data(as_text=True)
        assert "Traceback" not in answer_text and "\\ud" not in answer_text.lower()
        assert await depth(settings) == 0


# -- 8: HEAD (and every method but GET) never sends, never logs -------------------------


@pytest.mark.parametrize("method", ["HEAD", "OPTIONS", "POST", "PUT"])
@pytest.mark.parametrize(
    "query", ["sendmail=x@example.com", "talktome", "talktome&sendmail=x@ex.com"]
)
async def test_only_get_sends_or_logs(
    method: str, query: str, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(rate_limit_exempt_loopback=False, rate_limit_send="1/hour")
    async with running_app(settings) as (app, client):
        await wait_ready(app)
        no_body: dict[str, Any] = {}
        response = await client.open(f"/?{query}", method=method, **no_body)
        assert response.status_code == 405
        assert response.headers["Allow"] == "GET"
        assert await depth(settings) == 0
        assert not settings.talktome_log.exists() or settings.talktome_log.read_text() == ""
        # Nothing was spent either: the one send of the hour still goes through.
        assert (await client.get("/?sendmail=x@example.com")).status_code == 200
        assert await depth(settings) == 1
        # HEAD on routes without side effects answers like GET.
        assert (await client.head("/")).status_code == 200
        assert (await client.head("/api/messages")).status_code == 200


# -- 9: a forwarding header makes a request proxied, whatever it holds -----------------

FORWARDING = [
    [("X-Forwarded-For", ",")],
    [("X-Forwarded-For", "")],
    [("X-Forwarded-For", " , \t, ")],
    [("x-forwarded-for", ",,")],
    [("X-Forwarded-For", ""), ("X-FORWARDED-FOR", ",")],
    [("Forwarded", "")],
    [("forwarded", ",")],
]


@pytest.mark.parametrize("headers", FORWARDING, ids=range(len(FORWARDING)))
async def test_any_forwarding_header_means_proxied(
    headers: list[tuple[str, str]], make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings()  # no API_TOKEN: only direct loopback clients may send
    async with running_app(settings) as (app, client):
        await wait_ready(app)
        sendmail = await client.get("/?sendmail=a@example.com", headers=Headers(headers))
        assert sendmail.status_code == 401
        posted = await client.post("/api/messages", json=BODY, headers=Headers(headers))
        assert posted.status_code == 401
        assert await depth(settings) == 0
    for lines in ([""], [",", " ,"], [" "]):
        assert identify("127.0.0.1", lines, False, 0).proxied
        assert identify("127.0.0.1", lines, False, 1).address == "127.0.0.1"
    assert not identify("127.0.0.1", [], False, 0).proxied


# -- 10: header lines within RFC 5322's 998 characters ---------------------------------


def header_lines(data: bytes) -> list[bytes]:
    head = data.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0]
    return head.split(b"\n")


NAME_ASCII = "n" * MAX_NAME_CHARS
NAME_QUOTES = '\\"' * MAX_NAME_CHARS  # each " escaped: the quoted name doubles
NAME_EMOJI = "\U0001f600" * MAX_NAME_CHARS  # 4 UTF-8 octets each
NAME_WORDS = ("Ann Marie " * MAX_NAME_CHARS)[: MAX_NAME_CHARS - 10].strip()
LOCAL = "l" * 64
UTF8_LOCAL = "\u00fc" * 32
AT_LIMITS: dict[str, dict[str, Any]] = {
    "ascii subject 998": {"subject": "a" * 998},
    "ascii subject 100k": {"subject": "a" * 100_000},
    "subject of words": {"subject": ("word " * 200)[:998]},
    "non-ascii subject": {"subject": "\u20ac" * 998},
    "emoji subject": {"subject": "\U0001f600" * 998},
    "ascii name": {"to": f"{NAME_ASCII} <{LOCAL}@example.com>"},
    "quoted name": {"to": f'"{NAME_QUOTES}" <{LOCAL}@example.com>'},
    "emoji name": {"to": f"{NAME_EMOJI} <{LOCAL}@example.com>"},
    "50 recipients": {
        "to": [f"{n} {NAME_WORDS} <r{n}-{LOCAL[:50]}@example.com>" for n in range(50)],
        "reply_to": f"{NAME_EMOJI} <reply@example.com>",
    },
    "50 emoji recipients": {"to": [f"{NAME_EMOJI} <r{n}@example.com>" for n in range(50)]},
    # A UTF-8 local part: the SMTPUTF8 (modern email API) builder.
    "utf8: subject 998": {"to": "j\u00fcrgen@example.com", "subject": "a" * 998},
    "utf8: emoji subject": {"to": "j\u00fcrgen@example.com", "subject": "\U0001f600" * 998},
    "utf8: emoji name": {"to": f"{NAME_EMOJI} <{UTF8_LOCAL}@example.com>"},
    "utf8: quoted name": {"to": f'"{NAME_QUOTES}" <\u00fc@example.com>'},
    "utf8: 50 recipients": {
        "to": [f"{NAME_EMOJI} <\u00fc{n}@example.com>" for n in range(50)],
        "reply_to": f'"{NAME_QUOTES}" <r@example.com>',
    },
}
# Where whitespace or encoded words allow folding, lines stay within 78 characters.
FOLDED_TO_78 = {"ascii subject 998", "ascii subject 100k", "subject of words"}
FOLDED_TO_78 |= {"non-ascii subject", "emoji subject", "utf8: subject 998"}
FOLDED_TO_78 |= {"utf8: emoji subject"}


@pytest.mark.parametrize("case", list(AT_LIMITS))
def test_every_header_line_within_998(case: str) -> None:
    fields = {**BODY, **AT_LIMITS[case]}
    job = new_job(**fields, limits=InputLimits(max_subject_chars=100_000))
    message = build_mime(job, "Mailroom <mailroom@example.com>")
    utf8 = "utf8:" in case
    # What as_bytes writes, and what aiosmtplib sends.
    for data in (message.as_bytes(), flatten_message(message, utf8=utf8)):
        lines = header_lines(data)
        assert max(len(line) for line in lines) <= 998, case
        if case in FOLDED_TO_78:
            assert max(len(line) for line in lines) <= 78, case
        # Folding changed nothing: the same subject, names and number of addresses.
        headers = raw_headers(data)
        assert unfold(headers["Subject"]) == job.subject
        if utf8:
            # Python's modern email API writes these; it drops the quotes of a long quoted
            # display name when it folds one (CPython 3.11), so only lengths are checked.
            continue
        for header, sent in (("To", job.to), ("Reply-To", (job.reply_to or "",))):
            if header in headers:
                raw = re.sub(r"\r?\n(?=[ \t])", "", headers[header])
                names = [unfold(name) for name, _ in getaddresses([raw])]
                assert names == [name for name, _ in getaddresses(list(sent))], header


RENDER_CASES: dict[str, dict[str, Any]] = {
    **{case: fields for case, fields in AT_LIMITS.items() if not case.startswith("utf8:")},
    "plain": {},
    "html": {"html": "<p>caf\u00e9 \U0001f600</p>", "reply_to": "R <r@example.com>"},
    "idn": {"to": ["Z\u00fcrich <a@z\u00fcrich.example>", "b@example.com"]},
    "long text": {"text": "line of text\n" * 2000, "html": "<b>x</b>" * 3000},
    "dot lines": {"text": ".\n..\nfrom here\r\n.end"},
    "cc and bcc": {
        "cc": ["C\u00e9cile <c@example.com>", *(f"cc{i}@example.com" for i in range(12))],
        "bcc": ["hidden@example.com"],
        "html": "<p>only html</p>",
        "text": None,
    },
}


@pytest.mark.parametrize("case", list(RENDER_CASES))
def test_rendered_bytes_are_what_the_email_package_writes(case: str) -> None:
    """render() skips the generator for speed: byte for byte what it would have written
    (the multipart boundary is random either way)."""
    fields = {**BODY, **RENDER_CASES[case]}
    job = new_job(**fields, limits=InputLimits(max_subject_chars=100_000))
    fast = render(job, "Mailroom <mailroom@example.com>")
    again = render(job, "Mailroom <mailroom@example.com>")  # the content may be cached now
    slow = flatten_message(build_mime(job, "Mailroom <mailroom@example.com>"))
    assert fast is not None and again is not None
    assert same_boundary(fast) == same_boundary(slow) == same_boundary(again)


@pytest.mark.parametrize(
    "created_at",
    [
        "2026-12-07T06:30:01.000+00:00",  # what the server writes
        "2026-12-07T06:30:01.999+00:00",  # the same second, so the same Date
        "2026-12-07T06:30:02.001+00:00",
        "2026-06-30T23:59:59.500+00:00",  # summer, where the host's zone has one
        "2026-12-07T06:30:01+00:00",  # other forms, from an older queue or a re-queue
        "2026-12-07T07:30:01.250+01:00",
        "2026-12-07T06:30:01.123456Z",
    ],
)
def test_the_date_header_is_when_the_message_was_accepted(created_at: str) -> None:
    """The Date header (made once per second of acceptance, in this host's time zone) is
    the job's created_at, as the email package formats it, in both ways of building."""
    job = new_job(to="a@example.com", subject="s", text="t")
    job = dataclasses.replace(job, created_at=created_at)
    expected = format_datetime(datetime.fromisoformat(created_at).astimezone())
    fast = render(job, "Mailroom <mailroom@example.com>")
    assert fast is not None
    assert raw_headers(fast)["Date"] == expected
    assert build_mime(job, "m@example.com")["Date"] == expected


@pytest.mark.parametrize(
    "created_at",
    [
        "2016-12-31T23:59:60.000+00:00",  # a leap second: no time to Python
        "XXXXXXXXXXXXXXXXXXX.123+00:00",
        "2026-12-07T06:30:01.abc+00:00",
    ],
)
def test_a_created_at_that_is_no_time_dates_the_mail_now(created_at: str) -> None:
    """Shaped like the server's form but no time: the Date is the time of sending, as for
    any created_at that cannot be read, and no such Date is kept for later mails."""
    job = new_job(to="a@example.com", subject="s", text="t")
    job = dataclasses.replace(job, created_at=created_at)
    _date_of_second.cache_clear()
    fast = render(job, "Mailroom <mailroom@example.com>")
    assert fast is not None
    dated = parsedate_to_datetime(raw_headers(fast)["Date"])
    assert abs((dated - datetime.now(UTC)).total_seconds()) < 5
    assert _date_of_second.cache_info().currsize == 0


def same_boundary(data: bytes) -> bytes:
    for found in set(re.findall(rb'boundary="([^"]+)"', data)):
        data = data.replace(found, b"BOUNDARY")
    return data


_ADDRESS_CHARS = "aZ09.-_+!#$%&'*/=?^`{|}~@\"() ,:;<>[]\\\u00e9\u00fc\u0394"
_PARTS = st.text(alphabet=_ADDRESS_CHARS, min_size=0, max_size=12)
_LABELS = st.lists(st.from_regex(r"[A-Za-z0-9-]{1,12}", fullmatch=True), min_size=1, max_size=4)


@hypothesis_settings(max_examples=2000, deadline=None)
@given(
    local=_PARTS | st.from_regex(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,70}", fullmatch=True),
    labels=_LABELS,
    tld=st.from_regex(r"[A-Za-z0-9-]{0,4}", fullmatch=True),
)
def test_the_everyday_address_shortcut_agrees_with_email_validator(
    local: str, labels: list[str], tld: str
) -> None:
    """messages._plain_address answers only where email-validator accepts, with the very
    same normalised form; everything else goes to email-validator."""
    addr = f"{local}@{'.'.join([*labels, tld] if tld else labels)}"
    fast = _plain_address(addr)
    if fast is None:
        return
    assert check_email(addr).normalized == fast


# Mostly addresses, some of them everyday ones, and odd strings of address characters.
_ADDRESS_LIKE = st.from_regex(
    r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,20}@[A-Za-z0-9.-]{1,20}\.[A-Za-z]{2,5}", fullmatch=True
) | st.text(alphabet=_ADDRESS_CHARS, max_size=30)


@hypothesis_settings(max_examples=2000, deadline=None)
@given(value=_ADDRESS_LIKE)
def test_the_everyday_address_shortcut_agrees_with_the_parser(value: str) -> None:
    """messages.parse_addresses answers what email.utils.getaddresses does."""
    assert parse_addresses(value) == getaddresses([value])


@hypothesis_settings(max_examples=2000, deadline=None)
@given(
    value=_ADDRESS_LIKE
    | st.from_regex(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,20}@[A-Za-z0-9.-]{1,20}", fullmatch=True)
    | st.sampled_from(["mailroom@localhost", "a@b", "a.b@c-d.e", "a..b@c", "a@-c", "a@c."])
)
def test_the_everyday_envelope_address_is_what_aiosmtplib_would_send(value: str) -> None:
    """mailer.sendmail writes ``<address>`` itself for an everyday address: exactly what
    aiosmtplib's MAIL and RCPT would write (and accept without raising)."""
    if is_plain_envelope_address(value):
        assert quote_address(value) == f"<{value}>"


@pytest.mark.parametrize(
    "addr",
    [
        "Ann.Lee+x@Example.COM",
        "a@b.co",
        "x@xn--bcher-kva.example",
        "a..b@example.com",
        "-a@example.com",
        "a@-example.com",
        "a@example-.com",
        "a@example.c0m",
        "a" * 65 + "@e.com",
        "a@" + "b" * 64 + ".com",
        "a@localhost",
        "user@mailroom.test",
        "a@b.invalid",
    ],
)
def test_the_everyday_address_shortcut_on_edges(addr: str) -> None:
    fast = _plain_address(addr)
    try:
        expected = check_email(addr).normalized
    except EmailNotValidError:
        assert fast is None
    else:
        assert fast in (None, expected)


@pytest.mark.parametrize("value", ["", " ", "\t", ",", "<>"])
def test_no_address_at_all_is_an_invalid_address_not_a_crash(value: str) -> None:
    """Found by the schemathesis run: DELETE /api/suppressions/%09 answered 500."""
    assert addr_spec(value) == "" or "@" not in addr_spec(value)
    with pytest.raises(InvalidMessage):
        suppression_key(value)


def test_the_queued_form_carries_every_field_of_a_job() -> None:
    job = new_job(to=["A <a@example.com>", "b@example.com"], subject="s", text="t", html="h")
    body = json.loads(job.to_bytes())
    assert set(body) == {f.name for f in dataclasses.fields(job)} | {"v"}
    assert MailJob.from_bytes(job.to_bytes()) == job


@pytest.mark.parametrize(
    "to",
    ["a@example.com\r\nBcc: x@example.net", "a@example.com, b@example.com", "nobody", "", 7],
)
def test_a_queued_message_with_a_bad_address_is_refused(to: Any) -> None:
    """The worker checks a queued address again for what keeps headers safe (its syntax
    was checked at the door): a message not written by the server is undecodable."""
    body = json.loads(new_job(to="a@example.com", subject="s", text="t").to_bytes())
    body["to"] = [to]
    with pytest.raises(InvalidMessage):
        MailJob.from_bytes(json.dumps(body).encode())


@pytest.mark.parametrize(
    "extra",
    [
        {"sender": "other@example.com"},
        {"headers": {"X-Campaign": "c"}},
        {"attachments": [{"filename": "a.txt", "content": "eA=="}]},
    ],
)
def test_rendering_leaves_from_headers_and_attachments_to_the_email_package(
    extra: dict[str, Any],
) -> None:
    job = new_job(**{**BODY, **extra})
    assert render(job, "Mailroom <mailroom@example.com>") is None
    assert b"hidden" not in flatten_message(build_mime(job, "m@example.com"))


def test_rendering_leaves_utf8_addresses_to_the_email_package() -> None:
    job = new_job(to="j\u00fcrgen@example.com", subject="s", text="t")
    assert render(job, "Mailroom <mailroom@example.com>") is None


def raw_headers(data: bytes) -> dict[str, str]:
    """Header name -> raw value (still folded), from the bytes as sent."""
    head = data.decode().replace("\r\n", "\n").split("\n\n", 1)[0]
    fields = re.split(r"\n(?![ \t])", head)
    pairs = (field.split(":", 1) for field in fields)
    return {name: value.removeprefix(" ") for name, value in pairs}


ENCODED_WORD = re.compile(r"=\?utf-8\?([bq])\?([^?]*)\?=", re.IGNORECASE)


def unfold(raw: str) -> str:
    """A raw header value unfolded, its encoded words decoded, the space between two of
    them dropped (RFC 2047 6.2; Python's modern parser keeps it in display names)."""
    value = re.sub(r"\r?\n(?=[ \t])", "", raw)
    value = re.sub(r"(\?=)[ \t]+(?==\?)", r"\1", value)

    def decode(word: re.Match[str]) -> str:
        if word[1].lower() == "b":
            return base64.b64decode(word[2]).decode()
        return header_decode(word[2]).encode("latin-1").decode()

    return ENCODED_WORD.sub(decode, value)


@pytest.mark.parametrize("field", ["to", "reply_to"])
async def test_display_name_longer_than_the_limit_is_a_400(
    field: str, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings()
    async with running_app(settings) as (app, client):
        await wait_ready(app)
        long_name = f"{'n' * (MAX_NAME_CHARS + 1)} <b@example.com>"
        for value in (long_name, [long_name] if field == "to" else long_name):
            response = await client.post("/api/messages", json={**BODY, field: value})
            assert response.status_code == 400
            answer = await response.get_json()
            assert answer["field"] == field and str(MAX_NAME_CHARS) in answer["error"]
        fifty = [f"{'x' * 90_000} <r{n}@example.com>" for n in range(50)]
        response = await client.post("/api/messages", json={**BODY, "to": fifty})
        assert response.status_code == 400
        legacy = await client.get(f"/?sendmail={'n' * 5000}%20%3Cb@example.com%3E")
        assert legacy.status_code == 400
        assert await depth(settings) == 0


async def test_sent_lines_within_998_end_to_end(
    make_settings: Callable[..., Settings], smtp: SmtpServer
) -> None:
    settings = make_settings(**smtp.settings_overrides(None, False))
    cases = [
        {"subject": "a" * 998},
        {"to": f"{'n' * MAX_NAME_CHARS} <{LOCAL}@example.com>", "subject": "\u20ac" * 998},
        AT_LIMITS["50 recipients"],
        AT_LIMITS["utf8: 50 recipients"],
    ]
    async with running_app(settings) as (app, client), running_worker(settings):
        await wait_ready(app)
        for case in cases:
            response = await client.post("/api/messages", json={**BODY, **case})
            assert response.status_code == 202, await response.get_data(as_text=True)
        mails = await smtp.recorder.wait_for(len(cases))
    assert len(mails) == len(cases)
    for mail in mails:
        lines = mail.data.replace(b"\r\n", b"\n").split(b"\n")
        assert max(len(line) for line in lines) <= 998
    subjects = {str(m.message["Subject"]) for m in mails}
    assert {"a" * 998, "\u20ac" * 998} <= subjects


# -- 11: a refused request spends nothing ---------------------------------------------


async def test_refused_request_spends_no_quota(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(
        api_tokens=(Secret(TOKEN),), rate_limit_send="2/hour", rate_limit_recipient="1/hour"
    )
    async with running_app(settings) as (app, client):
        await wait_ready(app)

        async def post(body: Any) -> int:
            response = await client.post("/api/messages", json=body, headers=BEARER, **remote())
            return response.status_code

        first = await client.get("/?sendmail=victim@example.com", headers=BEARER, **remote())
        assert first.status_code == 200  # send quota: 1 of 2; victim: 1 of 1
        # victim is used up: 429, and neither other@ nor the send quota is spent.
        assert await post({**BODY, "to": ["other@example.com", "victim@example.com"]}) == 429
        # Invalid bodies are refused without spending the send quota.
        for bad in ({**BODY, "subject": "a\nb"}, {**BODY, "to": "nobody"}, [1]):
            assert await post(bad) == 400
        assert (
            await client.get("/?sendmail=nobody", headers=BEARER, **remote())
        ).status_code == 400
        assert await post({**BODY, "to": "other@example.com"}) == 202  # send quota: 2 of 2
        # The quota is real: the next send is refused before its body is looked at.
        assert await post({**BODY, "to": "third@example.com"}) == 429
        assert await post({**BODY, "subject": "a\nb"}) == 429
        assert await depth(settings) == 2


# -- 12: duplicate keys, undecodable query strings -------------------------------------


async def test_duplicate_json_keys_are_refused(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    async with running_app(settings) as (app, client):
        await wait_ready(app)
        for raw, field in (
            ('{"to": "a@example.com", "subject": "s", "text": "t", "subject": "x"}', "subject"),
            ('{"to": "a@example.com", "to": "b@example.com", "subject": "s", "text": "t"}', "to"),
        ):
            response = await client.post("/api/messages", data=raw, headers=JSON)
            assert response.status_code == 400
            answer = await response.get_json()
            assert answer == {"error": f"duplicate key {field!r}", "field": field}
        broken = await client.post("/api/messages", data='{"to": ', headers=JSON)
        assert broken.status_code == 400
        assert "not valid JSON" in (await broken.get_json())["error"]
        assert await depth(settings) == 0


@pytest.mark.parametrize(
    "query",
    [
        "sendmail=%ff@example.com",
        "sendmail=%ED%A0%80@example.com",  # a surrogate, UTF-8-encoded: not valid UTF-8
        "sendmail=a@example.com&x=%C3",
        "sendmail=a@example.com&%FF=1",
        "talktome=%ff",
    ],
)
async def test_query_that_is_not_utf8_is_a_400(
    query: str, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings()
    async with running_app(settings) as (app, client):
        await wait_ready(app)
        response = await client.get(f"/?{query}")
        assert response.status_code == 400
        assert "UTF-8" in await response.get_data(as_text=True)
        assert (await client.get(f"/api/messages?{query}")).status_code == 400
        assert await depth(settings) == 0
        assert not settings.talktome_log.exists() or settings.talktome_log.read_text() == ""
        # Valid percent-encoded UTF-8 is fine.
        ok = await client.get("/?sendmail=j%C3%BCrgen@b%C3%BCcher.example")
        assert ok.status_code == 200
        assert await depth(settings) == 1


# -- against python server.py: HEAD, empty forwarding headers, CL + TE ------------------


async def exchange(port: int, request: bytes, timeout: float = 5) -> bytes:
    """Send raw bytes; read until the server closes (or the timeout)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        data = b""
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(65536):
                data += chunk
        return data
    finally:
        writer.close()


async def test_through_hypercorn(
    prefix: str, tmp_path: Path, stop_later: list[Proc], make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings()
    port = free_port()
    log_path = tmp_path / "talk.log"
    env = child_env(
        prefix,
        PORT=port,
        TALKTOME_LOG=log_path,
        DATABASE_URL=settings.database_url.get(),
        RETRY_DELAYS=",".join(str(d) for d in settings.retry_delays),
    )
    proc = await spawn("server.py", tmp_path, env)
    stop_later.append(proc)
    await wait_http(f"http://127.0.0.1:{port}/readyz", proc)
    base = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=base, timeout=10) as http:
        head = await http.head("/?sendmail=x@example.com")
        assert head.status_code == 405 and head.headers["Allow"] == "GET"
        assert (await http.head("/?talktome")).status_code == 405
        empty_xff = await http.get("/?sendmail=x@example.com", headers={"X-Forwarded-For": ","})
        assert empty_xff.status_code == 401
        assert (await http.get("/?sendmail=%ff@example.com")).status_code == 400
    # An empty X-Forwarded-For value, raw.
    answer = await exchange(
        port,
        b"GET /?sendmail=x@example.com HTTP/1.1\r\nHost: t\r\nX-Forwarded-For:\r\n"
        b"Connection: close\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    # Content-Length and Transfer-Encoding together: refused, and the connection closed
    # (h11 alone would frame the body by Transfer-Encoding, as RFC 9112 says, and go on).
    body = json.dumps(BODY).encode()
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    answer = await exchange(
        port,
        b"POST /api/messages HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        + chunked
        # a second, pipelined request that must not be answered
        + b"GET /?talktome HTTP/1.1\r\nHost: t\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 400"), answer[:300]
    assert answer.count(b"HTTP/1.1 ") == 1
    assert b"not both" in answer
    assert await depth(settings) == 0
    assert not log_path.exists() or log_path.read_text() == ""
