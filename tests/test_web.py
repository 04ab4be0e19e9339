"""The web page's server side: who gets the page and who keeps the text answers, the
page's headers and files, the outbox API and the dead-letter re-queue API.

What the page does in a browser is tested in tests/test_browser.py."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from email.message import EmailMessage
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from quart import Quart
from quart.typing import TestClientProtocol as Client

from broker import Names
from config import Settings
from server import USAGE
from tests.conftest import ROOT, running_app, wait_ready
from tests.support import get_messages
from tests.test_dead_letters import make_dead_letters
from web import PAGE_CSP

AppClient = tuple[Quart, Client]
BROWSER = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,*/*;q=0.8"
WEB = ROOT / "web"


# -- the page or the text ------------------------------------------------------------------


@pytest.mark.parametrize("accept", [None, "*/*", "text/plain", "text/*", "application/json"])
async def test_curl_keeps_the_usage_text(accept: str | None, app_client: AppClient) -> None:
    _, client = app_client
    headers = {"Accept": accept} if accept else {}
    response = await client.get("/", headers=headers)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert await response.get_data() == USAGE.encode()
    assert "Content-Security-Policy" not in response.headers


@pytest.mark.parametrize("accept", [BROWSER, "text/html", "text/html, text/plain;q=0.5"])
async def test_a_browser_gets_the_page(accept: str, app_client: AppClient) -> None:
    _, client = app_client
    response = await client.get("/", headers={"Accept": accept})
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/html; charset=utf-8"
    assert await response.get_data() == (WEB / "index.html").read_bytes()
    assert response.headers["Content-Security-Policy"] == PAGE_CSP
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Vary"] == "Accept"
    head = await client.head("/", headers={"Accept": accept})
    assert head.status_code == 200
    assert head.headers["Content-Type"] == "text/html; charset=utf-8"


async def test_legacy_queries_answer_text_even_to_a_browser(app_client: AppClient) -> None:
    _, client = app_client
    talk = await client.get("/?talktome", headers={"Accept": BROWSER})
    assert talk.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert (await talk.get_data(as_text=True)).startswith("Logged the current time: ")
    send = await client.get("/?sendmail=a@example.com", headers={"Accept": BROWSER})
    assert send.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert re.fullmatch(
        r"Email to a@example\.com queued \(id [0-9a-f]{32}\)\n", await send.get_data(as_text=True)
    )


def test_the_policy_allows_no_inline_code() -> None:
    directives = dict(
        (part.split()[0], part.split()[1:]) for part in PAGE_CSP.split("; ") if part.strip()
    )
    assert directives["default-src"] == ["'none'"]
    assert directives["script-src"] == ["'self'"]
    assert directives["style-src"] == ["'self'"]
    assert directives["frame-src"] == ["'none'"]
    assert directives["frame-ancestors"] == ["'none'"]
    assert directives["require-trusted-types-for"] == ["'script'"]
    assert "unsafe" not in PAGE_CSP


class _Markup(HTMLParser):
    """What index.html holds that a strict policy would refuse."""

    def __init__(self) -> None:
        super().__init__()
        self.problems: list[str] = []
        self.labels: set[str] = set()
        self.controls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = dict(attrs)
        if tag == "script" and not names.get("src"):
            self.problems.append("an inline <script>")
        if tag == "style":
            self.problems.append("a <style> element")
        for name, _ in attrs:
            if name == "style" or name.startswith("on"):
                self.problems.append(f"<{tag} {name}=...>")
        if tag == "label" and names.get("for"):
            self.labels.add(str(names["for"]))
        if tag in ("input", "textarea", "select") and names.get("type") != "hidden":
            self.controls.append(str(names.get("id")))
        if tag in ("link", "script", "img") and any(
            str(names.get(k, "")).startswith(("http:", "https:", "//")) for k in ("src", "href")
        ):
            self.problems.append(f"<{tag}> from another site")


def test_the_page_has_no_inline_code_and_labels_every_control() -> None:
    markup = _Markup()
    markup.feed((WEB / "index.html").read_text())
    assert markup.problems == []
    assert markup.controls and set(markup.controls) <= markup.labels
    script = (WEB / "app.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script, sink
    assert "srcdoc" in script  # the one place markup goes: the sandboxed preview
    assert re.search(r'<iframe id="mail-preview" sandbox=""', (WEB / "index.html").read_text())


async def test_the_page_files(app_client: AppClient) -> None:
    _, client = app_client
    for name, mimetype in (
        ("app.js", "text/javascript"),
        ("app.css", "text/css"),
        ("favicon.svg", "image/svg+xml"),
    ):
        response = await client.get(f"/ui/{name}")
        assert response.status_code == 200, name
        assert response.mimetype == mimetype
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert await response.get_data() == (WEB / name).read_bytes()
    for missing in ("/ui/nothing.js", "/ui/../server.py", "/ui/%2e%2e/server.py"):
        assert (await client.get(missing)).status_code == 404, missing


# -- the outbox ----------------------------------------------------------------------------


def captured(outbox: Path, name: str, subject: str, **parts: Any) -> Path:
    """A mail as devsmtp stores it (with the envelope headers first)."""
    mail = EmailMessage()
    mail["From"] = "mailroom@localhost"
    mail["To"] = "Ann <ann@example.com>"
    mail["Subject"] = subject
    mail["Date"] = "Fri, 04 Dec 2026 12:00:00 +0000"
    if parts.get("mailroom_id"):
        mail["X-Mailroom-Id"] = parts["mailroom_id"]
    mail.set_content(parts.get("text", "Hello Ann"))
    if parts.get("html"):
        mail.add_alternative(parts["html"], subtype="html")
    if parts.get("attachment"):
        mail.add_attachment(
            parts["attachment"].encode(), maintype="text", subtype="csv", filename="a.csv"
        )
    envelope = b"X-Envelope-From: mailroom@localhost\r\nX-Envelope-To: ann@example.com\r\n"
    outbox.mkdir(parents=True, exist_ok=True)
    path = outbox / name
    path.write_bytes(envelope + mail.as_bytes().replace(b"\n", b"\r\n"))
    return path


async def test_outbox_lists_newest_first_and_opens_a_mail(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings()
    outbox = settings.outbox_dir
    old = captured(outbox, "20261204-120000-000001-1.eml", "Old one")
    new = captured(
        outbox,
        "20261204-120001-000001-2.eml",
        "Grüße <b>bold</b>",
        html="<p>Hello <script>alert(1)</script></p>",
        attachment="a,b\n",
        mailroom_id="f" * 32,
    )
    os.utime(old, (1_700_000_000, 1_700_000_000))
    (outbox / "notes.txt").write_text("not a mail")
    (outbox / ".20261204-120002-000001-3.eml.tmp").write_text("half written")
    os.symlink("/etc/passwd", outbox / "passwd.eml")
    async with running_app(settings) as (_, client):
        listing = await (await client.get("/api/outbox")).get_json()
        assert listing["enabled"] is True
        assert listing["directory"] == str(outbox.resolve())
        assert listing["total"] == 2
        assert [m["name"] for m in listing["mails"]] == [new.name, old.name]
        first = listing["mails"][0]
        assert first["subject"] == "Grüße <b>bold</b>"
        assert first["to"] == "ann@example.com"  # the envelope
        assert first["message_id"] == "f" * 32
        one = await (await client.get("/api/outbox?limit=1")).get_json()
        assert [m["name"] for m in one["mails"]] == [new.name]
        found = await (await client.get(f"/api/outbox?message_id={'f' * 32}")).get_json()
        assert [m["name"] for m in found["mails"]] == [new.name]

        mail = await (await client.get(f"/api/outbox/{new.name}")).get_json()
        assert mail["text"].rstrip() == "Hello Ann"
        assert mail["html"].rstrip() == "<p>Hello <script>alert(1)</script></p>"
        assert mail["attachments"] == [{"filename": "a.csv", "content_type": "text/csv", "size": 4}]
        assert {"name": "Subject", "value": "Grüße <b>bold</b>"} in mail["headers"]

        raw = await client.get(f"/api/outbox/{new.name}/raw")
        assert raw.status_code == 200
        assert raw.mimetype == "message/rfc822"
        assert raw.headers["Content-Disposition"] == f'attachment; filename="{new.name}"'
        assert await raw.get_data() == new.read_bytes()

        hidden = ".20261204-120002-000001-3.eml.tmp"
        for bad in ("passwd.eml", "notes.txt", hidden, "..", "nope.eml"):
            for suffix in ("", "/raw"):
                response = await client.get(f"/api/outbox/{bad}{suffix}")
                assert response.status_code in (404, 422), (bad, suffix)
                assert "root:" not in await response.get_data(as_text=True)


async def test_outbox_without_a_directory_is_empty(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    async with running_app(make_settings(outbox_dir=tmp_path / "none")) as (_, client):
        listing = await (await client.get("/api/outbox")).get_json()
    assert listing == {
        "enabled": True,
        "reason": None,
        "directory": str((tmp_path / "none").resolve()),
        "total": 0,
        "mails": [],
    }


async def test_outbox_is_off_with_a_real_smtp_server(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(smtp_host="smtp.example.com", smtp_port=465)
    captured(settings.outbox_dir, "20261204-120000-000001-1.eml", "Not shown")
    async with running_app(settings) as (_, client):
        listing = await (await client.get("/api/outbox")).get_json()
        assert listing["enabled"] is False
        assert listing["mails"] == [] and listing["total"] == 0
        assert "smtp.example.com:465" in listing["reason"]
        assert "SMTP_HOST" in listing["reason"]
        opened = await client.get("/api/outbox/20261204-120000-000001-1.eml")
        assert opened.status_code == 404
        assert "the outbox is off" in (await opened.get_json())["error"]


# -- re-queueing dead letters ----------------------------------------------------------------


async def test_requeue_one_then_all(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    ids = await make_dead_letters(settings, 3)
    names = Names.of(settings)
    async with running_app(settings) as (app, client):
        await wait_ready(app)
        first = await client.post("/api/dead-letters/requeue", json={"ids": [ids[1], "0" * 32]})
        assert first.status_code == 200
        answer = await first.get_json()
        assert answer["requeued"] == [ids[1]]
        assert answer["missing"] == ["0" * 32]
        assert answer["kept"] == []
        assert [(d["id"], d["requeued"]) for d in answer["dead_letters"]] == [
            (ids[0], False),
            (ids[1], True),
            (ids[2], False),
        ]
        listed = await (await client.get("/api/dead-letters")).get_json()
        assert [d["id"] for d in listed["dead_letters"]] == [ids[0], ids[2]]
        everything = await (
            await client.post("/api/dead-letters/requeue", json={"all": True})
        ).get_json()
        assert everything["requeued"] == [ids[0], ids[2]]
    assert await get_messages(names.dead_queue) == []
    assert [m.message_id for m in await get_messages(names.send_queue)] == [ids[1], ids[0], ids[2]]


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({}, 400),
        ({"ids": []}, 400),
        ({"all": True, "ids": ["a" * 32]}, 400),
        ({"all": False}, 400),
        ({"ids": "a" * 32}, 400),
        ({"ids": ["a" * 32], "extra": 1}, 400),
        ([], 400),
        ("not json", 415),
    ],
)
async def test_requeue_refuses_unclear_requests(
    body: Any, status: int, app_client: AppClient
) -> None:
    _, client = app_client
    if isinstance(body, str):
        response = await client.post("/api/dead-letters/requeue", data=body)
    else:
        response = await client.post("/api/dead-letters/requeue", json=body)
    assert response.status_code == status
    assert "error" in await response.get_json()
