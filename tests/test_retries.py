"""Transient failures are retried through delay queues; permanent ones fail at once."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import ssl
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aiosmtpd.smtp import Envelope
from quart.typing import TestClientProtocol as Client

import deadletters
import devsmtp
from broker import Names
from config import Secret, Settings
from tests.conftest import running_app, running_worker, wait_ready
from tests.support import (
    AMQP_URL,
    SMTP_PASS,
    SMTP_USER,
    SmtpRecorder,
    get_messages,
    queue_depth,
    start_smtp,
)
from tests.test_status_api import wait_status


@contextlib.asynccontextmanager
async def app_and_worker(settings: Settings) -> AsyncIterator[Client]:
    """The app, connected to the broker, and a worker, both on ``settings``: the app's
    test client."""
    async with running_app(settings) as (app, client), running_worker(settings):
        await wait_ready(app)
        yield client


async def sendmail(client: Client, address: str = "a@example.com") -> str:
    """A mail to ``address`` through the legacy ``/?sendmail=``: its message id."""
    response = await client.get(f"/?sendmail={address}")
    return (await response.get_data(as_text=True)).split("id ")[1][:32]


async def post_mail(client: Client, to: str | list[str]) -> str:
    """A mail (subject "s", text "t") through ``POST /api/messages``: its message id."""
    response = await client.post("/api/messages", json={"to": to, "subject": "s", "text": "t"})
    return str((await response.get_json())["id"])


async def test_transient_failures_are_retried_until_sent(
    database_url: Secret, make_settings: Callable[..., Settings]
) -> None:
    answers = iter(["421 4.3.2 busy", "451 4.3.0 later"])

    async def flaky(envelope: Envelope) -> str | None:
        return next(answers, None)

    smtp = await start_smtp("none", None, auth=False, recorder=SmtpRecorder(on_data=flaky))
    settings = make_settings(database_url=database_url, **smtp.settings_overrides(None, False))
    async with app_and_worker(settings) as client:
        started = datetime.now().astimezone()
        message_id = await sendmail(client)
        record = await wait_status(client, message_id, "sent")
        elapsed = (datetime.now().astimezone() - started).total_seconds()
    assert len(smtp.recorder.received) == 1
    assert record["attempts"] == 3
    statuses = [h["status"] for h in record["history"]]
    assert statuses == ["queued", "sending", "retrying", "sending", "retrying", "sending", "sent"]
    assert "451" in record["last_error"]["message"] or record["last_error"]["code"] == 451
    # Two waits in the delay tiers (0.2 s and 0.4 s, less up to 10% jitter).
    assert elapsed >= 0.5
    smtp.server.close()


async def test_retries_exhausted_then_failed_and_dead_lettered(
    make_settings: Callable[..., Settings],
) -> None:
    async def busy(envelope: Envelope) -> str:
        return "452 4.2.2 mailbox full"

    smtp = await start_smtp("none", None, auth=False, recorder=SmtpRecorder(on_data=busy))
    settings = make_settings(**smtp.settings_overrides(None, False))
    names = Names.of(settings)
    async with app_and_worker(settings) as client:
        message_id = await post_mail(client, "a@example.com")
        record = await wait_status(client, message_id, "failed")
    assert record["attempts"] == len(settings.retry_delays) + 1
    assert record["last_error"]["code"] == 452
    (dead,) = await get_messages(names.dead_queue)
    assert dead.message_id == message_id
    assert "gave up after 4 attempts" in str(dead.headers["x-mailroom-error"])
    smtp.server.close()


async def test_permanent_failure_is_not_retried(make_settings: Callable[..., Settings]) -> None:
    async def reject(envelope: Envelope) -> str:
        return "554 5.7.1 message rejected as spam"

    smtp = await start_smtp("none", None, auth=False, recorder=SmtpRecorder(on_data=reject))
    settings = make_settings(**smtp.settings_overrides(None, False))
    async with app_and_worker(settings) as client:
        record = await wait_status(client, await post_mail(client, "a@example.com"), "failed")
    assert record["attempts"] == 1
    # The code once, in its own field: the message does not start with it.
    assert record["last_error"] == {"code": 554, "message": "5.7.1 message rejected as spam"}
    assert [h["status"] for h in record["history"]] == ["queued", "sending", "failed"]
    assert await queue_depth(Names.of(settings).dead_queue) == 1
    smtp.server.close()


async def test_partial_refusal_never_resends_to_accepted(
    database_url: Secret, make_settings: Callable[..., Settings]
) -> None:
    tries: dict[str, int] = {}

    async def rcpt(address: str) -> str | None:
        tries[address] = tries.get(address, 0) + 1
        if address.startswith("gone"):
            return "550 5.1.1 no such user"
        if address.startswith("later") and tries[address] == 1:
            return "450 4.2.1 try later"
        return None

    smtp = await start_smtp("none", None, auth=False, recorder=SmtpRecorder(on_rcpt=rcpt))
    settings = make_settings(database_url=database_url, **smtp.settings_overrides(None, False))
    async with app_and_worker(settings) as client:
        to = ["ok@example.com", "gone@example.com", "later@example.com"]
        message_id = await post_mail(client, to)
        # gone@ was refused in the first attempt, later@ accepted in the second: partial.
        record = await wait_status(client, message_id, "partial")
    by_address = {r["address"]: r for r in record["recipients"]}
    assert by_address["ok@example.com"]["status"] == "sent"
    assert by_address["later@example.com"]["status"] == "sent"
    assert by_address["gone@example.com"]["status"] == "refused"
    assert by_address["gone@example.com"]["code"] == 550
    assert record["last_error"] == {
        "code": 550,
        "message": "recipients refused: gone@example.com: 550 5.1.1 no such user",
    }
    delivered = [r for m in smtp.recorder.received for r in m.rcpt_tos]
    assert sorted(delivered) == ["later@example.com", "ok@example.com"]  # ok@ only once
    assert tries == {"ok@example.com": 1, "gone@example.com": 1, "later@example.com": 2}
    smtp.server.close()


async def test_partial_delivery_is_partial_not_failed(
    make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    """ok@ accepts, bad@ is refused for good, later@ defers until the retries run out: the
    final status is partial (final, dead-lettered for an operator), and refused and
    deferred recipients are told apart in the log and in last_error."""
    caplog.set_level(logging.INFO)

    async def rcpt(address: str) -> str | None:
        if address.startswith("bad"):
            return "550 5.1.1 no such user"
        if address.startswith("later"):
            return "451 4.3.0 try again later"
        return None

    smtp = await start_smtp("none", None, auth=False, recorder=SmtpRecorder(on_rcpt=rcpt))
    settings = make_settings(**smtp.settings_overrides(None, False))
    names = Names.of(settings)
    async with app_and_worker(settings) as client:
        to = ["ok@example.com", "bad@example.com", "later@example.com"]
        message_id = await post_mail(client, to)
        record = await wait_status(client, message_id, "partial")
        (dead,) = await get_messages(names.dead_queue)
        # Final stays final: the same copy coming back (an ack that was lost) is put in
        # the dead-letter queue again, and nothing is sent or recorded.
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            channel = await connection.channel()
            exchange = await channel.get_exchange(names.exchange)
            await exchange.publish(
                aio_pika.Message(dead.body, message_id=message_id, headers=dead.headers), "send"
            )
        async with asyncio.timeout(15):
            while await queue_depth(names.dead_queue) == 0:
                await asyncio.sleep(0.05)
        again = await (await client.get(f"/api/messages/{message_id}")).get_json()
        assert again["status"] == "partial" and again["attempts"] == record["attempts"]
    assert record["attempts"] == len(settings.retry_delays) + 1
    statuses = [h["status"] for h in record["history"]]
    assert statuses[-1] == "partial" and "failed" not in statuses
    by_address = {r["address"]: (r["status"], r["code"]) for r in record["recipients"]}
    assert by_address == {
        "ok@example.com": ("sent", None),
        "bad@example.com": ("refused", 550),
        "later@example.com": ("pending", 451),
    }
    assert record["last_error"] == {
        "code": 451,
        "message": "gave up after 4 attempts: recipients deferred: later@example.com: 451 "
        "4.3.0 try again later / recipients refused: bad@example.com: 550 5.1.1 no such user",
    }
    delivered = [r for m in smtp.recorder.received for r in m.rcpt_tos]
    assert delivered == ["ok@example.com"]
    # The dead letter says who has the mail already: a re-queue never sends to them again.
    assert dead.message_id == message_id
    assert dead.headers["x-mailroom-sent"] == "ok@example.com"
    assert "recipients refused: bad@example.com" in str(dead.headers["x-mailroom-error"])
    retries = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert retries and all(
        "recipients deferred: later@example.com: 451" in line
        and "refused: bad@example.com: 550" in line
        and "deferred: bad@" not in line
        for line in retries
    )
    assert f"message {message_id}: partial: sent to 1 of 3 recipient(s)" in caplog.text
    smtp.server.close()


async def test_refused_login_is_retried_not_failed(
    make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    smtp = await start_smtp("none", None, auth=True)
    overrides = smtp.settings_overrides(None, login=True)
    overrides["smtp_password"] = Secret("wrong-password-123")
    settings = make_settings(**overrides)
    async with running_app(settings) as (app, client):
        await wait_ready(app)
        message_id = await sendmail(client)
        async with running_worker(settings):
            record = await wait_kept_past_retries(client, message_id, settings)
        assert "LOGIN REFUSED" in caplog.text
        assert "check SMTP_USERNAME and SMTP_PASSWORD" in caplog.text
        assert "wrong-password-123" not in caplog.text
        assert record["last_error"]["code"] == 535
        assert record["last_error"]["message"].startswith("SMTP login refused (AUTH PLAIN): ")
        # One AUTH per attempt (no second mechanism with the same password), each time
        # followed by QUIT.
        assert all(login == ("PLAIN", False) for login in smtp.recorder.logins)
        assert smtp.recorder.quits == len(smtp.recorder.logins) >= record["attempts"] - 1
        # The operator fixes the password: the same message goes out.
        fixed = make_settings(**{**overrides, "smtp_password": Secret(SMTP_PASS)})
        async with running_worker(fixed):
            record = await wait_status(client, message_id, "sent")
    assert smtp.recorder.received[0].login == SMTP_USER
    assert await queue_depth(Names.of(settings).dead_queue) == 0
    smtp.server.close()


async def wait_kept_past_retries(
    client: Any, message_id: str, settings: Settings, timeout: float = 20
) -> dict[str, Any]:
    """Until the message was tried more often than its retries allow; it must still be
    waiting (a settings fault never uses them up). Its record then."""
    async with asyncio.timeout(timeout):
        while True:
            record: dict[str, Any] = await (
                await client.get(f"/api/messages/{message_id}")
            ).get_json()
            if record["attempts"] > len(settings.retry_delays) + 1:
                break
            await asyncio.sleep(0.1)
    assert record["status"] in ("retrying", "sending")
    assert await queue_depth(Names.of(settings).dead_queue) == 0
    return record


async def test_untrusted_certificate_is_kept_then_sent_once_trusted(
    make_settings: Callable[..., Settings],
    server_tls: ssl.SSLContext,
    ca_file: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """CERTIFICATE_VERIFY_FAILED (a private CA, SMTP_CA_FILE unset) is a settings fault:
    the message is kept and retried without using up its retries, the log names
    SMTP_CA_FILE, and once it is set the same message goes out."""
    caplog.set_level(logging.INFO)
    smtp = await start_smtp("ssl", server_tls, auth=True)
    settings = make_settings(**smtp.settings_overrides(None, login=True))
    async with running_app(settings) as (app, client):
        await wait_ready(app)
        message_id = await sendmail(client)
        async with running_worker(settings):
            record = await wait_kept_past_retries(client, message_id, settings)
        assert "SMTP SETTINGS FAULT" in caplog.text and "check SMTP_CA_FILE;" in caplog.text
        assert record["last_error"]["code"] is None
        assert record["last_error"]["message"].startswith(
            "the SMTP server's TLS certificate is not trusted by the system's CAs"
        )
        fixed = make_settings(**smtp.settings_overrides(ca_file, login=True))
        async with running_worker(fixed):
            await wait_status(client, message_id, "sent")
    assert len(smtp.recorder.received) == 1
    smtp.server.close()


async def test_username_without_auth_on_the_server_is_kept_and_named(
    make_settings: Callable[..., Settings], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SMTP_USERNAME set, pointing at a local sink that offers no AUTH (devsmtp): the log
    says the server offers no login and names SMTP_USERNAME; nothing is called a refused
    login, and the message is kept."""
    caplog.set_level(logging.INFO)
    server = await devsmtp.start("127.0.0.1", 0, tmp_path / "outbox")
    settings = make_settings(
        smtp_host="127.0.0.1",
        smtp_port=server.sockets[0].getsockname()[1],
        smtp_security="none",
        smtp_username=SMTP_USER,
        smtp_password=Secret(SMTP_PASS),
    )
    try:
        async with app_and_worker(settings) as client:
            message_id = await sendmail(client)
            record = await wait_status(client, message_id, "retrying")
    finally:
        server.close()
        await server.wait_closed()
    assert "LOGIN REFUSED" not in caplog.text
    assert "SMTP_USERNAME is set, but the SMTP server offers no login" in caplog.text
    assert "check SMTP_USERNAME, SMTP_PASSWORD and SMTP_SECURITY" in caplog.text
    assert record["last_error"]["message"].startswith("SMTP_USERNAME is set, but")


async def test_operator_lists_and_requeues_dead_letters(
    make_settings: Callable[..., Settings],
) -> None:
    reject_all = True

    async def rcpt(address: str) -> str | None:
        # No 5.1.x enhanced code: a 5.1.1 refusal would also put the address on the
        # suppression list (issue 13), and the re-queued copies would skip it.
        return "550 unknown user" if reject_all else None

    smtp = await start_smtp("none", None, auth=False, recorder=SmtpRecorder(on_rcpt=rcpt))
    settings = make_settings(**smtp.settings_overrides(None, False))
    names = Names.of(settings)
    async with running_app(settings) as (app, client):
        await wait_ready(app)
        ids = []
        for n in range(3):
            ids.append(await sendmail(client, f"u{n}@example.com"))
        async with running_worker(settings):
            for message_id in ids:
                await wait_status(client, message_id, "failed")
        assert await queue_depth(names.dead_queue) == 3

        seen = await deadletters.dead_letters(settings, None, False)
        assert sorted(s.id for s in seen) == sorted(ids)
        assert all("unknown user" in s.error and s.smtp_code == 550 for s in seen)
        assert await queue_depth(names.dead_queue) == 3  # listing takes nothing away

        reject_all = False
        await deadletters.dead_letters(settings, {ids[0]}, False)
        assert await queue_depth(names.dead_queue) == 2
        record = await (await client.get(f"/api/messages/{ids[0]}")).get_json()
        assert record["status"] == "queued"
        async with running_worker(settings):
            await wait_status(client, ids[0], "sent")
            await deadletters.dead_letters(settings, None, True)
            for message_id in ids[1:]:
                await wait_status(client, message_id, "sent")
    assert await queue_depth(names.dead_queue) == 0
    assert sorted(r for m in smtp.recorder.received for r in m.rcpt_tos) == [
        "u0@example.com",
        "u1@example.com",
        "u2@example.com",
    ]
    smtp.server.close()


async def test_admin_command_line(make_settings: Callable[..., Settings]) -> None:
    """`python admin.py dead list` prints each dead letter with its reason."""
    settings = make_settings()
    names = Names.of(settings)
    async with running_app(settings) as (app, _):
        await wait_ready(app)
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange(names.exchange)
        await exchange.publish(
            aio_pika.Message(b"{}", message_id="f" * 32, headers={"x-mailroom-error": "boom"}),
            "dead",
        )
    env = {"AMQP_URL": AMQP_URL, "QUEUE_PREFIX": settings.queue_prefix}
    env["RETRY_DELAYS"] = ",".join(str(d) for d in settings.retry_delays)
    env["DATABASE_URL"] = settings.database_url.get()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = await asyncio.to_thread(_run_admin, env, ["dead", "list"])
    assert code == 0
    assert f"{'f' * 32}" in out.getvalue() and "boom" in out.getvalue()
    assert "1 dead letter(s)" in out.getvalue()


def _run_admin(env: dict[str, str], argv: list[str]) -> int:
    import subprocess
    import sys

    from tests.conftest import ROOT

    proc = subprocess.run(
        [sys.executable, str(ROOT / "admin.py"), *argv],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd="/",  # no stray .env
    )
    print(proc.stdout, end="")
    return proc.returncode


async def test_missing_starttls_is_a_settings_fault(
    make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    """SMTP_SECURITY=starttls against a server without it: kept and retried, not failed."""
    caplog.set_level(logging.INFO)
    smtp = await start_smtp("none", None, auth=False)
    settings = make_settings(
        **{**smtp.settings_overrides(None, False), "smtp_security": "starttls"}
    )
    async with app_and_worker(settings) as client:
        message_id = await sendmail(client)
        await wait_kept_past_retries(client, message_id, settings)
    assert "SMTP SETTINGS FAULT" in caplog.text and "STARTTLS" in caplog.text
    assert "check SMTP_SECURITY and SMTP_PORT" in caplog.text
    smtp.server.close()


async def test_dropped_and_stalled_smtp_connections_are_retried(
    make_settings: Callable[..., Settings],
) -> None:
    """The SMTP server drops the connection in DATA, then stalls past SMTP_TIMEOUT, then
    accepts: the mail goes out once, after two recorded failures."""
    from aiosmtpd.smtp import SMTP

    behaviour = iter(["drop", "stall"])
    servers: list[SMTP] = []
    never = asyncio.Event()

    async def misbehave(envelope: Envelope) -> str | None:
        what = next(behaviour, None)
        if what == "drop":
            transport = servers[-1].transport
            assert isinstance(transport, asyncio.Transport)
            transport.abort()  # the connection dies under the client
            return None
        if what == "stall":
            await never.wait()  # never answers: the client's timeout must fire
        return None

    recorder = SmtpRecorder(on_data=misbehave)
    loop = asyncio.get_running_loop()

    def factory() -> SMTP:
        servers.append(SMTP(recorder, hostname="flaky.test"))
        return servers[-1]

    server = await loop.create_server(factory, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    settings = make_settings(
        smtp_host="127.0.0.1", smtp_port=port, smtp_security="none", smtp_timeout=1.0
    )
    async with app_and_worker(settings) as client:
        message_id = await sendmail(client)
        record = await wait_status(client, message_id, "sent", timeout=20)
    never.set()
    server.close()
    statuses = [h["status"] for h in record["history"]]
    assert statuses.count("retrying") == 2
    assert record["attempts"] == 3
    # The dropped DATA was never accepted; the stalled one was abandoned by the client.
    # Only the third attempt counts as delivered by our side.
    assert record["recipients"][0]["status"] == "sent"
