"""Issue 12: composing real mail (cc/bcc, HTML only, custom headers, from, tags and
metadata, attachments, templates, DKIM), through the real pipeline to an SMTP server."""

from __future__ import annotations

import base64
import email.policy
import email.utils
import io
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from quart import Quart
from quart.typing import TestClientProtocol as Client

from config import Secret, Settings
from messages import MailJob, legacy_job, new_job
from store import SCHEMA_VERSION, Store, StoredTemplate
from tests.conftest import running_app, running_worker, wait_ready
from tests.support import Received, SmtpServer, db_connection, get_messages, queue_depth
from tests.test_json_api import send_queue
from tests.test_status_api import wait_status

AppClient = tuple[Quart, Client]
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


def header_text(mail: Received) -> str:
    return mail.data.split(b"\r\n\r\n", 1)[0].decode().lower()


async def test_cc_bcc_headers_from_tags_and_html_only_arrive(
    make_settings: Callable[..., Settings], smtp: SmtpServer
) -> None:
    settings = make_settings(
        **smtp.settings_overrides(None, login=False),
        mail_from="Mailroom <noreply@example.org>",
        allowed_senders=("noreply@example.org", "@news.example.org"),
    )
    body = {
        "to": "Ann <ann@example.com>",
        "cc": ["Carl <carl@example.com>"],
        "bcc": ["hidden@example.net", "secret@example.net"],
        "from": "Newsletter <letters@news.example.org>",
        "subject": "Weekly",
        "html": "<h1>Hello</h1><p>Read <a href='https://example.com/x'>this</a>.</p>",
        "headers": {"X-Campaign": "spring-24", "List-Unsubscribe": "<mailto:u@example.org>"},
        "tags": ["newsletter", "week:12"],
        "metadata": {"customer": "42", "plan": "gold"},
    }
    async with running_app(settings) as (app, client), running_worker(settings):
        await wait_ready(app)
        response = await client.post("/api/messages", json=body)
        assert response.status_code == 202, await response.get_data(as_text=True)
        job_id = (await response.get_json())["id"]
        (mail,) = await smtp.recorder.wait_for(1, timeout=20)
        record = await wait_status(client, job_id, "sent", timeout=20)
        tagged = await client.get("/api/messages?tag=week:12")
        by_meta = await client.get("/api/messages?metadata=plan:gold")
        other = await client.get("/api/messages?metadata=plan:silver")
        untagged = await client.get("/api/messages?tag=other")
    assert mail.mail_from == "letters@news.example.org"
    assert sorted(mail.rcpt_tos) == sorted(
        ["ann@example.com", "carl@example.com", "hidden@example.net", "secret@example.net"]
    )
    msg = mail.message
    assert msg["From"].addresses[0].addr_spec == "letters@news.example.org"
    assert [a.addr_spec for a in msg["Cc"].addresses] == ["carl@example.com"]
    assert "bcc" not in header_text(mail)
    assert "hidden" not in header_text(mail) and "secret" not in header_text(mail)
    assert msg["X-Campaign"] == "spring-24"
    assert msg["List-Unsubscribe"] == "<mailto:u@example.org>"
    assert msg.get_content_type() == "multipart/alternative"
    plain = msg.get_body(("plain",))
    assert plain is not None
    text = plain.get_content()
    assert "Hello" in text and "this" in text and "<h1>" not in text
    assert {r["address"] for r in record["recipients"]} == set(mail.rcpt_tos)
    assert all(r["status"] == "sent" for r in record["recipients"])
    assert record["tags"] == ["newsletter", "week:12"]
    assert record["metadata"] == {"customer": "42", "plan": "gold"}
    assert [m["id"] for m in (await tagged.get_json())["messages"]] == [job_id]
    assert [m["id"] for m in (await by_meta.get_json())["messages"]] == [job_id]
    assert (await other.get_json())["messages"] == []
    assert (await untagged.get_json())["messages"] == []


async def test_attachments_and_inline_images_arrive_in_their_structure(
    make_settings: Callable[..., Settings], smtp: SmtpServer
) -> None:
    settings = make_settings(**smtp.settings_overrides(None, login=False))
    report = b"%PDF-1.4 not really\n" * 50
    body = {
        "to": "ann@example.com",
        "subject": "Report ✓",
        "text": "See the report.",
        "html": '<p>Logo: <img src="cid:logo@mailroom"></p>',
        "attachments": [
            {
                "filename": "Bericht für März.pdf",
                "content_type": "application/pdf",
                "content": base64.b64encode(report).decode(),
            },
            {
                "filename": "logo.png",
                "content_type": "image/png",
                "content": base64.b64encode(PNG).decode(),
                "content_id": "logo@mailroom",
            },
        ],
    }
    async with running_app(settings) as (app, client), running_worker(settings):
        await wait_ready(app)
        response = await client.post("/api/messages", json=body)
        assert response.status_code == 202, await response.get_data(as_text=True)
        (mail,) = await smtp.recorder.wait_for(1, timeout=20)
    msg = mail.message
    assert msg.get_content_type() == "multipart/mixed"
    related, pdf = msg.iter_parts()
    assert related.get_content_type() == "multipart/related"
    alternative, logo = related.iter_parts()
    assert alternative.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in alternative.iter_parts()] == [
        "text/plain",
        "text/html",
    ]
    assert logo["Content-ID"] == "<logo@mailroom>"
    assert logo.get_content() == PNG
    assert pdf.get_filename() == "Bericht für März.pdf"
    assert b"filename*=utf-8''Bericht%20f%C3%BCr%20M%C3%A4rz.pdf" in mail.data  # RFC 2231
    assert pdf.get_content() == report
    assert pdf.get_content_disposition() == "attachment"


# -- refused at the door: a clear 4xx, nothing queued ----------------------------------

GOOD: dict[str, Any] = {"to": "a@example.com", "subject": "s", "text": "t"}
TINY = base64.b64encode(b"x").decode()
HOSTILE: list[tuple[dict[str, Any], int, str, str]] = [
    ({"headers": {"X-Evil\r\nBcc": "v@example.com"}}, 400, "headers", "field name"),
    ({"headers": {"X-Ok": "a\r\nBcc: v@example.com"}}, 400, "headers", "must not contain"),
    ({"headers": {"Subject": "again"}}, 400, "headers", "written by Mailroom"),
    ({"headers": {"content-type": "text/html"}}, 400, "headers", "written by Mailroom"),
    ({"headers": {"X-Mailroom-Id": "0" * 32}}, 400, "headers", "written by Mailroom"),
    ({"headers": {"DKIM-Signature": "v=1"}}, 400, "headers", "written by Mailroom"),
    ({"headers": {"X Space": "v"}}, 400, "headers", "field name"),
    ({"from": "ceo@bank.example"}, 400, "from", "ALLOWED_SENDERS"),
    ({"from": "a@example.com\r\nBcc: x@y.z"}, 400, "from", "must not contain"),
    ({"cc": "not an address"}, 400, "cc", "cc"),
    ({"bcc": ["a@example.com"]}, 400, "bcc", "twice"),
    ({"cc": [f"c{i}@example.com" for i in range(50)]}, 400, "cc", "MAX_RECIPIENTS"),
    ({"tags": ["has space"]}, 400, "tags", "not a tag"),
    ({"tags": [f"t{i}" for i in range(11)]}, 400, "tags", "at most"),
    ({"metadata": {"k": "a\nb"}}, 400, "metadata", "must not contain"),
    ({"metadata": {"k": 1}}, 400, "metadata", "metadata"),
    (
        {"attachments": [{"filename": "../../etc/passwd", "content": TINY}]},
        400,
        "attachments",
        "plain file name",
    ),
    (
        {"attachments": [{"filename": "a\\b.txt", "content": TINY}]},
        400,
        "attachments",
        "plain file name",
    ),
    (
        {"attachments": [{"filename": "a\r\nb.txt", "content": TINY}]},
        400,
        "attachments",
        "must not contain",
    ),
    (
        {"attachments": [{"filename": "a.txt", "content": "not base64!"}]},
        400,
        "attachments",
        "base64",
    ),
    (
        {"attachments": [{"filename": "a.txt", "content": "QUJD="}]},
        400,
        "attachments",
        "base64",
    ),
    (
        {"attachments": [{"filename": "a.txt", "content_type": "text", "content": TINY}]},
        400,
        "attachments",
        "content type",
    ),
    (
        {"attachments": [{"filename": "a.txt", "content": TINY}] * 10_000},
        400,
        "attachments",
        "100",
    ),
    (
        {
            "attachments": [
                {"filename": "big.bin", "content": base64.b64encode(b"x" * 2049).decode()}
            ]
        },
        413,
        "attachments",
        "MAX_ATTACHMENT_BYTES",
    ),
]


@pytest.mark.parametrize(
    ("change", "code", "field", "words"), HOSTILE, ids=[str(i) for i in range(len(HOSTILE))]
)
async def test_hostile_fields_are_refused_and_nothing_is_queued(
    change: dict[str, Any],
    code: int,
    field: str,
    words: str,
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(max_attachment_bytes=2048)
    async with running_app(settings) as (app, client):
        await wait_ready(app)
        response = await client.post("/api/messages", json={**GOOD, **change})
        answer = await response.get_json()
        assert response.status_code == code, answer
        assert answer["field"] == field
        assert words in answer["error"]
        assert await queue_depth(send_queue(app)) == 0


async def test_the_queued_form_keeps_every_new_field(app_client: AppClient) -> None:
    app, client = app_client
    body = {
        **GOOD,
        "cc": "c@example.com",
        "bcc": ["b@example.com"],
        "from": "mailroom@localhost",
        "headers": {"X-Campaign": "c"},
        "attachments": [{"filename": "a.txt", "content": TINY, "content_type": "text/plain"}],
        "tags": ["t"],
        "metadata": {"k": "v"},
    }
    response = await client.post("/api/messages", json=body)
    assert response.status_code == 202, await response.get_json()
    (message,) = await get_messages(send_queue(app))
    job = MailJob.from_bytes(message.body)
    assert job.cc == ("c@example.com",) and job.bcc == ("b@example.com",)
    assert job.sender == "mailroom@localhost"
    assert job.headers == (("X-Campaign", "c"),)
    assert job.attachments[0].content == b"x"
    assert job.tags == ("t",) and job.metadata == (("k", "v"),)
    assert email.utils.parseaddr(job.recipients[-1])[1] == "b@example.com"


async def test_a_multipart_form_upload_is_the_same_message(app_client: AppClient) -> None:
    """curl -F to=... -F subject=... -F attachment=@report.pdf"""
    from werkzeug.datastructures import FileStorage, MultiDict
    from werkzeug.test import encode_multipart

    app, client = app_client
    form: MultiDict[str, Any] = MultiDict(
        [
            ("to", "a@example.com"),
            ("to", "b@example.com"),
            ("bcc", "c@example.com"),
            ("subject", "Report"),
            ("html", "<p>See <b>the</b> report</p>"),
            ("tag", "reports"),
            ("metadata.customer", "42"),
            ("header.X-Campaign", "q3"),
        ]
    )
    for content, name, kind in (
        (b"%PDF", "Bericht März.pdf", "application/pdf"),
        (PNG, "logo.png", "image/png"),
    ):
        form.add("attachment", FileStorage(io.BytesIO(content), name, "attachment", kind))
    boundary, data = encode_multipart(form)
    response = await client.post(
        "/api/messages",
        data=data,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert response.status_code == 202, await response.get_json()
    (message,) = await get_messages(send_queue(app))
    job = MailJob.from_bytes(message.body)
    assert job.to == ("a@example.com", "b@example.com") and job.bcc == ("c@example.com",)
    assert "See the report" in job.text
    assert job.tags == ("reports",) and job.metadata == (("customer", "42"),)
    assert job.headers == (("X-Campaign", "q3"),)
    assert [(a.filename, a.content_type, a.content) for a in job.attachments] == [
        ("Bericht März.pdf", "application/pdf", b"%PDF"),
        ("logo.png", "image/png", PNG),
    ]
    refused = await client.post(
        "/api/messages",
        form={"to": "a@example.com", "subject": "s", "text": "t"},
        files={"file": FileStorage(io.BytesIO(b"x"), "x.txt", "file", "text/plain")},
    )
    assert refused.status_code == 400
    assert "attachment" in (await refused.get_json())["error"]


# -- templates ----------------------------------------------------------------------

WELCOME = {
    "subject": "Welcome, {{ name }}",
    "text": "Hello {{ name }} & co,\n{% for item in items %}- {{ item }}\n{% endfor %}",
    "html": "<p>Hello <b>{{ name }}</b></p>",
}


async def test_a_template_is_stored_rendered_at_accept_and_sent(
    make_settings: Callable[..., Settings], smtp: SmtpServer
) -> None:
    settings = make_settings(**smtp.settings_overrides(None, login=False))
    async with running_app(settings) as (app, client), running_worker(settings):
        await wait_ready(app)
        created = await client.put("/api/templates/welcome", json=WELCOME)
        assert created.status_code == 201, await created.get_json()
        replaced = await client.put("/api/templates/welcome", json=WELCOME)
        assert replaced.status_code == 200
        shown = await (await client.get("/api/templates/welcome")).get_json()
        assert (shown["name"], shown["subject"]) == ("welcome", WELCOME["subject"])
        response = await client.post(
            "/api/messages",
            json={
                "to": "ann@example.com",
                "template": "welcome",
                "variables": {"name": "<Ann>", "items": ["a", "b"]},
            },
        )
        assert response.status_code == 202, await response.get_json()
        (mail,) = await smtp.recorder.wait_for(1, timeout=20)
        # A template deleted later changes nothing for messages already accepted.
        assert (await client.delete("/api/templates/welcome")).status_code == 204
        assert (await client.get("/api/templates/welcome")).status_code == 404
        assert (await client.delete("/api/templates/welcome")).status_code == 404
    msg = mail.message
    assert msg["Subject"] == "Welcome, <Ann>"
    text, html = (msg.get_body((kind,)) for kind in ("plain", "html"))
    assert text is not None and html is not None
    assert text.get_content() == "Hello <Ann> & co,\n- a\n- b\n"  # not escaped
    assert "<b>&lt;Ann&gt;</b>" in html.get_content()  # escaped


TEMPLATE_REFUSALS: list[tuple[dict[str, Any], str, str]] = [
    ({"template": "welcome", "variables": {"items": []}}, "variables", "'name' is undefined"),
    ({"template": "nope", "variables": {}}, "template", "no template named 'nope'"),
    ({"template": "welcome", "subject": "s", "variables": {}}, "subject", "not both"),
    ({"template": "../etc", "variables": {}}, "template", "template"),
    ({"subject": "s", "text": "t", "variables": {"a": 1}}, "variables", "name one"),
    ({"template": "escape", "variables": {}}, "template", "sandbox"),
    ({"template": "huge", "variables": {}}, "template", "longer than 5000000 characters"),
    ({"template": "welcome", "variables": {"name": "x\r\nBcc: a@b.c", "items": []}}, "subject", ""),
]


async def test_template_refusals_are_4xx_at_accept_and_nothing_is_queued(
    app_client: AppClient,
) -> None:
    app, client = app_client
    assert (await client.put("/api/templates/welcome", json=WELCOME)).status_code == 201
    escape = {"subject": "x", "text": "{{ ''.__class__.__mro__[1].__subclasses__() }}"}
    assert (await client.put("/api/templates/escape", json=escape)).status_code == 201
    huge = {"subject": "x", "text": "{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}"}
    assert (await client.put("/api/templates/huge", json=huge)).status_code == 201
    for change, field, words in TEMPLATE_REFUSALS:
        response = await client.post("/api/messages", json={"to": "a@example.com", **change})
        answer = await response.get_json()
        assert response.status_code == 400, (change, answer)
        assert answer["field"] == field, (change, answer)
        assert words in answer["error"], (change, answer)
    bad = await client.put("/api/templates/broken", json={"subject": "{% if %}", "text": "t"})
    assert bad.status_code == 400
    assert "subject: template syntax error at line 1" in (await bad.get_json())["error"]
    assert (await client.put("/api/templates/bad name", json=WELCOME)).status_code in (400, 404)
    no_body = await client.put("/api/templates/empty", json={"subject": "s"})
    assert no_body.status_code == 400
    assert await queue_depth(send_queue(app)) == 0
    batch = await client.post(
        "/api/messages/batch",
        json=[
            {"to": "a@example.com", "template": "welcome", "variables": {"name": "A", "items": []}},
            {"to": "b@example.com", "template": "welcome", "variables": {}},
        ],
    )
    results = (await batch.get_json())["results"]
    assert [r["code"] for r in results] == [202, 400]
    assert results[1]["field"] == "variables"


# -- DKIM ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dkim_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    """An RSA 2048 key file, and the TXT record that publishes its public key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = tmp_path_factory.mktemp("dkim") / "dkim.pem"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return path, b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)


async def test_every_mail_is_dkim_signed_and_verifies(
    make_settings: Callable[..., Settings], smtp: SmtpServer, dkim_key: tuple[Path, bytes]
) -> None:
    import dkim

    key_file, record = dkim_key
    settings = make_settings(
        **smtp.settings_overrides(None, login=False),
        mail_from="Mailroom <noreply@example.org>",
        dkim_domain="example.org",
        dkim_selector="mr2024",
        dkim_private_key_file=key_file,
    )
    asked: list[bytes] = []

    def dns(name: bytes, timeout: int = 5) -> bytes | None:
        asked.append(name)
        return record if name == b"mr2024._domainkey.example.org." else None

    plain = {"to": "a@example.com", "subject": "plain", "text": "hello\n"}
    rich = {
        "to": "Zoë <zoe@example.com>",
        "cc": "c@example.com",
        "bcc": "b@example.com",
        "subject": "Grüße ✉ with a long subject " * 4,
        "text": "Hallo Zoë,\n.\nline starting with a dot above\n",
        "html": "<p>Hallo <b>Zoë</b> <img src='cid:pic'></p>",
        "headers": {"List-Unsubscribe": "<mailto:u@example.org>"},
        "attachments": [
            {
                "filename": "Bild ä.png",
                "content": base64.b64encode(PNG).decode(),
                "content_id": "pic",
            },
            {"filename": "data.bin", "content": base64.b64encode(bytes(range(256)) * 40).decode()},
        ],
    }
    async with running_app(settings) as (app, client), running_worker(settings):
        await wait_ready(app)
        for body in (plain, rich):
            response = await client.post("/api/messages", json=body)
            assert response.status_code == 202, await response.get_json()
        mails = await smtp.recorder.wait_for(2, timeout=20)
    assert len(mails) == 2
    for mail in mails:
        assert mail.data.startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed;")
        assert dkim.verify(mail.data, dnsfunc=dns), mail.data[:400]
        # Changed in transit: the signature no longer holds.
        assert not dkim.verify(
            mail.data.replace(b"hello", b"HELLO").replace(b"Hallo", b"Hxllo"), dnsfunc=dns
        )
    assert set(asked) == {b"mr2024._domainkey.example.org."}


async def test_a_dkim_key_that_cannot_sign_stops_the_worker_naming_the_variable(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    from errors import ConfigError
    from worker import Worker

    bad = tmp_path / "bad.pem"
    bad.write_text("-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n")
    settings = make_settings(
        smtp_host="127.0.0.1",
        dkim_domain="example.org",
        dkim_selector="s",
        dkim_private_key_file=bad,
    )
    with pytest.raises(ConfigError) as caught:
        Worker(settings)
    assert caught.value.variable == "DKIM_PRIVATE_KEY_FILE"
    assert "bm90IGEga2V5" not in str(caught.value)
    with pytest.raises(ConfigError) as missing:
        Settings.from_env({"DKIM_DOMAIN": "example.org", "DKIM_SELECTOR": "s"}, env_file=None)
    assert missing.value.variable == "DKIM_PRIVATE_KEY_FILE"


async def test_a_schema_2_database_gets_tags_metadata_and_templates(
    database_url: Secret, make_settings: Callable[..., Settings]
) -> None:
    """Schema 4 (this issue's step) on a database of the previous version: the record
    keeps working, and tags, metadata and their filters work on SQLite and PostgreSQL."""
    from sqlalchemy import text

    settings = make_settings(database_url=database_url)
    old = legacy_job("old@example.com")
    store = await Store.open(settings)
    try:
        await store.insert_queued(old)
        async with db_connection(store, begin=True) as conn:  # back to what schema 2 looked like
            for column in ("tags", "meta"):
                await conn.execute(text(f"ALTER TABLE mailroom_messages DROP COLUMN {column}"))
            await conn.execute(text("DROP TABLE mailroom_templates"))
            await conn.execute(text("UPDATE mailroom_schema SET version = 2"))
    finally:
        await store.close()
    store = await Store.open(settings)
    try:
        tagged = new_job(
            to="a@example.com",
            subject="s",
            text="t",
            tags=["x_y", "news"],
            metadata={"plan": "gold", "customer": "4%2"},
        )
        await store.insert_queued(tagged)
        assert await store.put_template(StoredTemplate("t", "s", "t", None))
        assert (await store.get(old.id)).tags == []  # type: ignore[union-attr]
        assert [r.id for r in await store.list(tag="news")] == [tagged.id]
        assert await store.list(tag="x%y") == []  # no LIKE wildcards
        assert [r.id for r in await store.list(meta=("customer", "4%2"))] == [tagged.id]
        assert await store.list(meta=("plan", "silver")) == []
        assert await store.list(meta=("nothing", "gold")) == []
        async with db_connection(store) as conn:
            version = (await conn.execute(text("SELECT version FROM mailroom_schema"))).scalar()
        assert version == SCHEMA_VERSION
    finally:
        await store.close()


def test_allowed_senders_and_dkim_settings_are_checked_naming_the_variable() -> None:
    from errors import ConfigError

    default = Settings.from_env({"MAIL_FROM": "Mailroom <NoReply@Example.org>"}, env_file=None)
    assert default.senders == ("noreply@example.org",)
    listed = Settings.from_env(
        {"ALLOWED_SENDERS": "a@example.org, @news.example.org"}, env_file=None
    )
    assert listed.senders == ("a@example.org", "@news.example.org")
    for bad in ("not-an-address", "@", "a@b c.org", "<a@example.org>"):
        with pytest.raises(ConfigError) as caught:
            Settings.from_env({"ALLOWED_SENDERS": bad}, env_file=None)
        assert caught.value.variable == "ALLOWED_SENDERS"
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"MAX_ATTACHMENT_BYTES": "lots"}, env_file=None)
    assert caught.value.variable == "MAX_ATTACHMENT_BYTES"
    dkim = {"DKIM_DOMAIN": "example.org", "DKIM_SELECTOR": "s", "DKIM_PRIVATE_KEY_FILE": __file__}
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({**dkim, "DKIM_DOMAIN": "exa mple"}, env_file=None)
    assert caught.value.variable == "DKIM_DOMAIN"
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({**dkim, "DKIM_PRIVATE_KEY_FILE": "/no/such"}, env_file=None)
    assert caught.value.variable == "DKIM_PRIVATE_KEY_FILE"


def test_a_smtputf8_mail_keeps_cc_headers_and_attachments() -> None:
    """An address with a UTF-8 local part goes through the email package's UTF-8 builder:
    the same parts there (inline image next to the HTML, files after)."""
    from aiosmtplib.email import flatten_message

    from mailer import build_mime

    job = new_job(
        to="jürgen@example.com",
        cc="Ça <ça@example.com>",
        bcc="hidden@example.com",
        subject="s",
        text="t",
        html="<img src='cid:pic'>",
        headers={"X-Campaign": "ü"},
        attachments=[
            {
                "filename": "Bild ä.png",
                "content_type": "image/png",
                "content": "eA==",
                "content_id": "pic",
            },
            {"filename": "ä.txt", "content": "eA=="},
        ],
    )
    data = flatten_message(build_mime(job, "m@example.com"), utf8=True)
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    assert msg["Cc"] == "Ça <ça@example.com>" and msg["X-Campaign"] == "ü"
    assert b"hidden" not in data
    image = next(p for p in msg.walk() if p.get_content_type() == "image/png")
    assert image["Content-ID"] == "<pic>" and image.get_filename() == "Bild ä.png"
    files = [p.get_filename() for p in msg.iter_attachments()]
    assert files == ["ä.txt"]
