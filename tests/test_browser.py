"""The web page in a real browser: Debian's headless chromium, driven by Playwright, against
the real server (Hypercorn), RabbitMQ, worker and the capture SMTP server of devsmtp.py.

One stack and one browser for the module (a context, so a fresh tab storage, per test).
The capture SMTP server stores every mail in the outbox as devsmtp does, but answers some
recipients first with an error: ``later-*@`` gets ``451`` on its first try (retried, then
sent), ``once-*@`` gets ``550 5.7.1`` the first time (a policy refusal, which does not
suppress the address as an unknown user would: failed and dead-lettered; sent once
re-queued). Every test fails if the page opens a dialog (alert, confirm) or throws.
Screenshots go to ``test-artifacts/``.

Without a chromium binary the tests skip; scripts/test.sh installs one (ensure-chromium.sh)
and exports MAILROOM_CHROMIUM, and then, as under CI=true, a missing one is a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import shutil
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from aiosmtpd.smtp import SMTP, Envelope, Session
from playwright.async_api import Browser, Dialog, Page, Request, async_playwright, expect

from broker import Names
from config import Secret, Settings
from devsmtp import OutboxHandler
from tests.conftest import ROOT, delete_topology, running_worker, serving_app, settings_for

ARTIFACTS = ROOT / "test-artifacts"
TOKEN = "tok-" + "w" * 28
RETRY_DELAY = 3.0  # long enough for a once-a-second poll to see "retrying"
WAIT = 20_000  # ms: generous, for a busy machine


def find_chromium() -> str | None:
    """$MAILROOM_CHROMIUM (set by scripts/test.sh), else chromium on PATH or in /usr/bin."""
    configured = os.environ.get("MAILROOM_CHROMIUM")
    if configured:
        return configured
    for candidate in (shutil.which("chromium"), "/usr/bin/chromium"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


CHROMIUM = find_chromium()
# scripts/test.sh found (or installed) chromium, or this is CI: a missing one fails.
REQUIRED = bool(os.environ.get("MAILROOM_CHROMIUM")) or os.environ.get("CI") == "true"

pytestmark = [
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.skipif(
        CHROMIUM is None and not REQUIRED,
        reason="chromium is not installed: run scripts/ensure-chromium.sh "
        "(or: sudo apt-get install -y chromium)",
    ),
]


class Capture(OutboxHandler):
    """devsmtp's handler, with some recipients refused on their first try."""

    def __init__(self, outbox: Path) -> None:
        super().__init__(outbox)
        self.tried: set[str] = set()

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        first = address not in self.tried
        self.tried.add(address)
        if first and address.startswith("later-"):
            return "451 4.3.0 Mailbox busy, try again later"
        if first and address.startswith("once-"):
            return "550 5.7.1 Refused here this once"
        envelope.rcpt_tos.append(address)
        return "250 OK"


@dataclass
class Stack:
    base: str
    settings: Settings
    http: httpx.AsyncClient

    async def send(self, **mail: Any) -> str:
        response = await self.http.post(f"{self.base}/api/messages", json=mail)
        assert response.status_code == 202, response.text
        message_id: str = response.json()["id"]
        return message_id

    async def record(self, message_id: str) -> dict[str, Any]:
        response = await self.http.get(f"{self.base}/api/messages/{message_id}")
        assert response.status_code == 200, response.text
        record: dict[str, Any] = response.json()
        return record

    async def wait_status(self, message_id: str, status: str, timeout: float = 20) -> None:
        async with asyncio.timeout(timeout):
            while (await self.record(message_id))["status"] != status:
                await asyncio.sleep(0.1)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    """Server (capture mode: no SMTP_HOST, so its outbox is on), worker, capture SMTP."""
    tmp = tmp_path_factory.mktemp("browser")
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    settings = settings_for(prefix, tmp, api_tokens=(Secret(TOKEN),), retry_delays=(RETRY_DELAY,))
    handler = Capture(settings.outbox_dir)
    loop = asyncio.get_running_loop()
    smtp = await loop.create_server(
        lambda: SMTP(handler, hostname="mailroom-devsmtp", enable_SMTPUTF8=True), "127.0.0.1", 0
    )
    port = smtp.sockets[0].getsockname()[1]
    sending = dataclasses.replace(
        settings, smtp_host="127.0.0.1", smtp_port=port, smtp_security="none"
    )
    try:
        async with (
            serving_app(settings) as base,
            running_worker(sending),
            httpx.AsyncClient(timeout=10, trust_env=False) as http,
        ):
            yield Stack(base, settings, http)
    finally:
        smtp.close()
        await smtp.wait_closed()
        await delete_topology(Names.for_prefix(prefix, settings.retry_delays))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser() -> AsyncIterator[Browser]:
    assert CHROMIUM is not None and os.access(CHROMIUM, os.X_OK), (
        f"no chromium binary at {CHROMIUM} (MAILROOM_CHROMIUM, or install the chromium package)"
    )
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM)
        yield launched
        await launched.close()


@dataclass
class Watched:
    """A page, and what it did that it must not: dialogs, script errors; its requests."""

    page: Page
    dialogs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)  # the ones that were answered


@contextlib.asynccontextmanager
async def tab(browser: Browser, name: str, **context: Any) -> AsyncIterator[Watched]:
    """A new tab (its own context: own sessionStorage); a screenshot when done."""
    ctx = await browser.new_context(
        viewport=context.pop("viewport", {"width": 1280, "height": 860}), **context
    )
    ctx.set_default_timeout(WAIT)
    page = await ctx.new_page()
    watched = Watched(page)

    async def on_dialog(dialog: Dialog) -> None:
        watched.dialogs.append(f"{dialog.type}: {dialog.message}")
        await dialog.dismiss()

    def on_request(request: Request) -> None:
        # Requests that got an answer: Chromium may start a fetch from the preview (its
        # preload scanner) that the frame's policy then blocks; that one reached nothing.
        watched.requests.append(request.url)

    page.on("dialog", on_dialog)
    page.on("pageerror", lambda error: watched.errors.append(str(error)))
    page.on("requestfinished", on_request)
    try:
        yield watched
        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
    finally:
        await ctx.close()
    assert watched.dialogs == [], watched.dialogs
    assert watched.errors == [], watched.errors


def row(page: Page, message_id: str) -> Any:
    return page.locator(f'#messages tbody tr[data-id="{message_id}"]')


# -- sending, live status, the outbox --------------------------------------------------------


async def test_send_with_the_keyboard_watch_it_sent_and_open_it_in_the_outbox(
    stack: Stack, browser: Browser
) -> None:
    async with tab(browser, "send-and-outbox") as watched:
        page = watched.page
        await page.goto(stack.base + "/")
        await expect(page.locator("#mode")).to_have_text(re.compile("local capture"))
        await page.evaluate("window.notReloaded = true")

        # Keyboard only: Tab from the top of the page to "To", type, Tab on, Enter.
        for _ in range(12):
            await page.keyboard.press("Tab")
            if await page.evaluate("document.activeElement.id") == "to":
                break
        assert await page.evaluate("document.activeElement.id") == "to"
        await page.keyboard.type("Ann <ann@example.com>, bob@example.com")
        await page.keyboard.press("Tab")
        await page.keyboard.type("Hello from the page")
        await page.keyboard.press("Tab")
        await page.keyboard.type("Hi Ann")
        await page.keyboard.press("Tab")
        await page.keyboard.type(
            '<h1>Hi <b id="bold">Ann</b></h1><img src="/?talktome=from-preview">'
            '<link rel="stylesheet" href="/ui/app.css?from-preview">'
            '<meta http-equiv="refresh" content="0;url=/?talktome=refresh">'
        )
        await page.keyboard.press("Tab")
        assert await page.evaluate("document.activeElement.id") == "send"
        await page.keyboard.press("Enter")

        result = page.locator("#send-result")
        await expect(result).to_contain_text("Queued:")
        message_id = (await result.locator("code").text_content() or "").strip()
        assert len(message_id) == 32

        # The row moves to sent without a reload.
        await expect(row(page, message_id)).to_have_attribute("data-status", "sent")
        await expect(row(page, message_id).locator(".subject")).to_have_text("Hello from the page")
        assert await page.evaluate("window.notReloaded") is True
        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(ARTIFACTS / "messages.png"))

        # Its details: recipients, attempts, history; then the captured mail.
        await row(page, message_id).locator(".subject a").click()
        await expect(page.locator("#m-status")).to_have_text("sent")
        await expect(page.locator("#m-recipients tbody tr")).to_have_count(2)
        await expect(page.locator("#m-recipients")).to_contain_text("ann@example.com")
        await expect(page.locator("#m-attempts")).to_have_text("1")
        history = page.locator("#m-history li .badge")
        await expect(history).to_have_text(["queued", "sending", "sent"])
        await page.locator("#m-outbox-link").click()

        await expect(page.locator("#mail-subject")).to_have_text("Hello from the page")
        await expect(page.locator("#mail-to")).to_have_text("ann@example.com, bob@example.com")
        preview = page.frame_locator("#mail-preview")
        await expect(preview.locator("#bold")).to_have_text("Ann")
        await page.locator("#tab-text").click()
        await expect(page.locator("#mail-text")).to_contain_text("Hi Ann")
        await page.locator("#tab-headers").click()
        await expect(page.locator("#mail-headers")).to_contain_text("X-Mailroom-Id")
        await page.screenshot(path=str(ARTIFACTS / "outbox-mail.png"), full_page=True)
        async with page.expect_download() as download_info:
            await page.locator("#mail-download").click()
        download = await download_info.value
        assert download.suggested_filename.endswith(".eml")
        eml = Path(await download.path()).read_bytes()
        assert b"Subject: Hello from the page" in eml
        assert message_id.encode() in eml

        # The preview loaded nothing, followed no refresh.
        await page.wait_for_timeout(300)
        assert not [url for url in watched.requests if "from-preview" in url or "refresh" in url]
    assert stack.settings.talktome_log.read_text() == ""  # no ?talktome from the preview


async def test_a_busy_mailbox_shows_retrying_with_the_reason_then_sent(
    stack: Stack, browser: Browser
) -> None:
    async with tab(browser, "retrying") as watched:
        page = watched.page
        await page.goto(stack.base + "/")
        await page.get_by_role("textbox", name="To", exact=True).fill("later-ann@example.com")
        await page.get_by_role("textbox", name="Subject", exact=True).fill("Busy mailbox")
        await page.get_by_role("textbox", name="Text", exact=True).fill("Try again")
        await page.get_by_role("button", name="Send", exact=True).click()
        await expect(page.locator("#send-result code")).to_have_text(re.compile("^[0-9a-f]{32}$"))
        message_id = (await page.locator("#send-result code").text_content() or "").strip()
        line = row(page, message_id)
        await expect(line).to_have_attribute("data-status", "retrying")
        await expect(line.locator(".reason").first).to_contain_text("451")
        await expect(line.locator(".reason").first).to_contain_text("try again later")
        await page.screenshot(path=str(ARTIFACTS / "retrying-row.png"))
        await expect(line).to_have_attribute("data-status", "sent")

        # The status filter.
        await page.get_by_label("Status").select_option("failed")
        await expect(line).to_have_count(0)
        await expect(page.locator("#messages-empty")).to_have_text("No failed messages.")
        await page.get_by_label("Status").select_option("sent")
        await expect(line).to_have_count(1)
        await expect(page.locator("#messages tbody tr[data-status='sent']")).to_have_count(2)


# -- the token ---------------------------------------------------------------------------------


async def test_a_remote_browser_is_asked_for_the_token(stack: Stack, browser: Browser) -> None:
    # Through a proxy (X-Forwarded-For): not a trusted loopback client.
    forwarded = {"extra_http_headers": {"X-Forwarded-For": "203.0.113.9"}}
    async with tab(browser, "token", **forwarded) as watched:
        page = watched.page
        await page.goto(stack.base + "/")
        await expect(page.locator("#auth")).to_be_visible()
        await expect(page.locator("#view-messages")).to_be_hidden()
        await expect(page.locator("#auth-why")).to_contain_text("API token")
        await expect(page.locator("#token")).to_be_focused()

        await page.keyboard.type("tok-" + "x" * 28)
        await page.keyboard.press("Enter")
        await expect(page.locator("#auth-error")).to_contain_text("not valid")
        await expect(page.locator("#view-messages")).to_be_hidden()
        assert await page.evaluate("sessionStorage.length") == 0

        await page.locator("#token").fill(TOKEN)
        await page.locator("#token").press("Enter")
        await expect(page.locator("#view-messages")).to_be_visible()
        await expect(page.locator("#auth")).to_be_hidden()
        await expect(page.locator("#forget-token")).to_be_visible()
        assert await page.evaluate("sessionStorage.getItem('mailroom.token')") == TOKEN
        assert await page.evaluate("localStorage.length") == 0
        assert await page.evaluate("document.cookie") == ""

        # Kept for the tab: a reload asks no more; every API call carried it.
        await page.reload()
        await expect(page.locator("#view-messages")).to_be_visible()
        await expect(page.locator("#auth")).to_be_hidden()
        await page.get_by_role("textbox", name="To", exact=True).fill("remote@example.com")
        await page.get_by_role("textbox", name="Subject", exact=True).fill("From afar")
        await page.get_by_role("textbox", name="Text", exact=True).fill("x")
        await page.get_by_role("button", name="Send", exact=True).click()
        await expect(page.locator("#send-result")).to_contain_text("Queued:")

    # Another tab knows nothing of it.
    async with tab(browser, "token-new-tab", **forwarded) as watched:
        await watched.page.goto(stack.base + "/")
        await expect(watched.page.locator("#auth")).to_be_visible()


# -- dead letters ------------------------------------------------------------------------------


async def test_requeue_a_dead_letter_from_the_page(stack: Stack, browser: Browser) -> None:
    message_id = await stack.send(to="once-ann@example.com", subject="Bounced once", text="x")
    await stack.wait_status(message_id, "failed")
    async with tab(browser, "dead-letters") as watched:
        page = watched.page
        await page.goto(stack.base + "/#/dead")
        letter = page.locator(f'#dead tbody tr[data-id="{message_id}"]')
        await expect(letter).to_contain_text("550")
        await expect(letter).to_contain_text("Refused here this once")
        await page.screenshot(path=str(ARTIFACTS / "dead-letters.png"))
        await letter.get_by_role("button", name=f"Re-queue message {message_id}").click()
        await expect(page.locator("#dead-result")).to_have_text("Re-queued 1 message(s).")
        await expect(letter).to_have_count(0)

        await page.goto(f"{stack.base}/#/messages/{message_id}")
        await expect(page.locator("#m-status")).to_have_text("sent")
        await expect(page.locator("#m-history")).to_contain_text("re-queued by an operator")


# -- hostile values ----------------------------------------------------------------------------


async def test_markup_in_a_message_is_shown_as_text_on_a_phone(
    stack: Stack, browser: Browser
) -> None:
    hostile = "<img src=x onerror=alert(1)>"
    message_id = await stack.send(
        to=["Mallory <mallory@example.com>"],
        subject=hostile,
        text="<script>alert(2)</script>",
        html="<img src=x onerror=alert(3)><script>alert(4)</script><p id=shown>visible</p>",
    )
    await stack.wait_status(message_id, "sent")
    phone = {"viewport": {"width": 390, "height": 844}, "is_mobile": True, "has_touch": True}
    async with tab(browser, "hostile-phone", **phone) as watched:
        page = watched.page
        await page.goto(stack.base + "/")
        subject = row(page, message_id).locator(".subject a")
        await expect(subject).to_have_text(hostile)
        assert await row(page, message_id).locator("img").count() == 0
        fits = "document.documentElement.scrollWidth <= window.innerWidth"
        assert await page.evaluate(fits)

        await subject.click()
        await expect(page.locator("#m-subject")).to_have_text(hostile)
        await page.goto(stack.base + "/#/outbox")
        mail = page.locator("#outbox tbody tr", has_text=hostile)
        await mail.locator("a").click()
        await expect(page.locator("#mail-subject")).to_have_text(hostile)
        await expect(page.frame_locator("#mail-preview").locator("#shown")).to_have_text("visible")
        await page.locator("#tab-text").click()
        await expect(page.locator("#mail-text")).to_have_text("<script>alert(2)</script>\n")
        assert await page.locator("main img, main script").count() == 0
        assert await page.evaluate(fits)
        await page.wait_for_timeout(300)  # an onerror would have fired by now
    # tab() asserts that no dialog opened and no script error happened
