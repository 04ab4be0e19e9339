"""From the HTTP request to the SMTP server, through the real RabbitMQ."""

from __future__ import annotations

import asyncio
import dataclasses
import ssl
from collections.abc import Callable
from email.utils import parsedate_to_datetime

import aio_pika
import pytest
from aiosmtpd.smtp import Envelope

from broker import Names
from config import Settings
from messages import LEGACY_SUBJECT, LEGACY_TEXT
from tests.conftest import running_app, running_worker, wait_ready
from tests.support import (
    AMQP_URL,
    SMTP_USER,
    Security,
    SmtpRecorder,
    SmtpServer,
    get_messages,
    queue_depth,
    start_smtp,
)
from tests.test_faults import wait_until
from tests.test_ownership import Gate


async def test_mail_waits_for_a_worker_and_is_delivered_once(
    make_settings: Callable[..., Settings], smtp: SmtpServer
) -> None:
    settings = make_settings(**smtp.settings_overrides(None, login=False))
    async with running_app(settings) as (app, client):
        await wait_ready(app)
        response = await client.get("/?sendmail=email@example.com")
        assert response.status_code == 200
    names = Names.for_prefix(settings.queue_prefix)
    assert await queue_depth(names.send_queue) == 1  # stored while no worker runs
    assert smtp.recorder.received == []
    async with running_worker(settings):
        (mail,) = await smtp.recorder.wait_for(1)
    assert mail.rcpt_tos == ["email@example.com"]
    assert mail.message["Subject"] == LEGACY_SUBJECT
    assert mail.message.get_content() == LEGACY_TEXT
    assert len(smtp.recorder.received) == 1  # exactly once
    assert await queue_depth(names.send_queue) == 0  # acked
    assert await queue_depth(names.dead_queue) == 0


async def test_mime_headers_and_encodings(
    make_settings: Callable[..., Settings], smtp: SmtpServer
) -> None:
    settings = make_settings(
        **smtp.settings_overrides(None, login=False), mail_from="Mäilroom <noreply@example.org>"
    )
    async with running_app(settings) as (app, client), running_worker(settings):
        await wait_ready(app)
        response = await client.post(
            "/api/messages",
            json={
                "to": ["Zoë Ünïcode <zoe@example.com>", "plain@example.com"],
                "subject": "Grüße aus Köln ✉ test",
                "text": "Hallo Zoë\n",
                "html": "<p>Hallo <b>Zoë</b></p>",
                "reply_to": "Ré Ply <reply@example.com>",
            },
        )
        assert response.status_code == 202
        job_id = (await response.get_json())["id"]
        (mail,) = await smtp.recorder.wait_for(1)
    raw_headers = mail.data.split(b"\r\n\r\n", 1)[0]
    assert raw_headers.isascii()  # every non-ASCII header is RFC 2047 encoded
    msg = mail.message
    assert msg["Subject"] == "Grüße aus Köln ✉ test"
    assert msg["From"].addresses[0].display_name == "Mäilroom"
    assert msg["From"].addresses[0].addr_spec == "noreply@example.org"
    assert [a.display_name for a in msg["To"].addresses] == ["Zoë Ünïcode", ""]
    assert msg["Reply-To"].addresses[0].addr_spec == "reply@example.com"
    assert msg["Message-ID"] == f"<{job_id}@example.org>"
    assert parsedate_to_datetime(msg["Date"]).tzinfo is not None
    assert msg.get_content_type() == "multipart/alternative"
    plain = msg.get_body(("plain",))
    html = msg.get_body(("html",))
    assert plain is not None and html is not None
    assert plain.get_content() == "Hallo Zoë\n"
    assert "<b>Zoë</b>" in html.get_content()
    assert mail.mail_from == "noreply@example.org"
    assert sorted(mail.rcpt_tos) == ["plain@example.com", "zoe@example.com"]


@pytest.mark.parametrize("security", ["none", "ssl", "starttls"])
async def test_each_security_mode_with_login(
    security: Security,
    make_settings: Callable[..., Settings],
    server_tls: ssl.SSLContext,
    ca_file: str,
) -> None:
    server = await start_smtp(security, server_tls, auth=True)
    try:
        settings = make_settings(**server.settings_overrides(ca_file, login=True))
        async with running_app(settings) as (app, client), running_worker(settings):
            await wait_ready(app)
            for n in range(3):
                response = await client.get(f"/?sendmail=user{n}@example.com")
                assert response.status_code == 200
            mails = await server.recorder.wait_for(3)
        assert {m.login for m in mails} == {SMTP_USER}
        assert sorted(r for m in mails for r in m.rcpt_tos) == [
            f"user{n}@example.com" for n in range(3)
        ]
    finally:
        server.server.close()
        await server.server.wait_closed()


async def test_connections_are_reused(
    make_settings: Callable[..., Settings], smtp: SmtpServer
) -> None:
    settings = make_settings(**smtp.settings_overrides(None, login=False), worker_concurrency=2)
    async with running_app(settings) as (app, client), running_worker(settings):
        await wait_ready(app)
        for n in range(20):
            assert (await client.get(f"/?sendmail=u{n}@example.com")).status_code == 200
        await smtp.recorder.wait_for(20)
    assert smtp.recorder.connections <= 2


async def test_prefetch_holds_more_than_it_sends(
    make_settings: Callable[..., Settings], server_tls: ssl.SSLContext
) -> None:
    """WORKER_CONCURRENCY bounds SMTP transactions at once and WORKER_PREFETCH the
    messages the worker takes from RabbitMQ: the rest stay queued for other workers."""
    gate = asyncio.Event()
    sending = 0
    most = 0

    async def held(envelope: Envelope) -> None:
        nonlocal sending, most
        sending += 1
        most = max(most, sending)
        try:
            await gate.wait()
        finally:
            sending -= 1

    server = await start_smtp("none", server_tls, auth=False, recorder=SmtpRecorder(on_data=held))
    try:
        settings = make_settings(
            **server.settings_overrides(None, login=False), worker_concurrency=2, worker_prefetch=6
        )
        send_queue = Names.for_prefix(settings.queue_prefix).send_queue
        async with running_app(settings) as (app, client), running_worker(settings) as worker:
            await wait_ready(app)
            for n in range(10):
                assert (await client.get(f"/?sendmail=p{n}@example.com")).status_code == 200
            async with asyncio.timeout(10):
                while sending < 2 or await queue_depth(send_queue) != 4:
                    await asyncio.sleep(0.05)
            assert most == 2 and worker.pool.turns_in_use == 2
            gate.set()
            await server.recorder.wait_for(10)
            async with asyncio.timeout(10):
                while worker.pool.turns_in_use:
                    await asyncio.sleep(0.05)
        assert most == 2
        assert server.recorder.connections <= 2
        assert await queue_depth(send_queue) == 0
    finally:
        gate.set()
        server.server.close()
        await server.server.wait_closed()


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
async def test_overflow_worker_takes_only_what_the_others_cannot_hold(
    make_settings: Callable[..., Settings], server_tls: ssl.SSLContext, queue_type: str
) -> None:
    """WORKER_PRIORITY: a worker of a lower priority gets no message while a worker of a
    higher one has room in its prefetch, and takes the backlog once that one is full.
    (The overflow worker starts first: RabbitMQ would otherwise hand it every other one.)"""
    held_first, held_overflow = Gate(), Gate()  # each counts the mails held in its DATA
    first_smtp = await start_smtp("none", server_tls, False, SmtpRecorder(on_data=held_first))
    overflow_smtp = await start_smtp("none", server_tls, False, SmtpRecorder(on_data=held_overflow))
    try:
        first = make_settings(
            **first_smtp.settings_overrides(None, login=False),
            worker_concurrency=2,
            worker_prefetch=4,
            queue_type=queue_type,
        )
        overflow = dataclasses.replace(
            first, **overflow_smtp.settings_overrides(None, login=False), worker_priority=-1
        )
        send_queue = Names.for_prefix(first.queue_prefix).send_queue
        async with running_app(first) as (app, client):
            await wait_ready(app)
            async with running_worker(overflow) as spare, running_worker(first) as worker:
                for n in range(3):
                    assert (await client.get(f"/?sendmail=a{n}@example.com")).status_code == 200
                # The first worker sends two and holds the third.
                await wait_until(lambda: held_first.waiting == 2 and worker.in_flight == 3, 10)
                assert await queue_depth(send_queue) == 0
                assert spare.in_flight == 0 and overflow_smtp.recorder.connections == 0
                for n in range(6):
                    assert (await client.get(f"/?sendmail=b{n}@example.com")).status_code == 200
                # The first holds four (its prefetch), the overflow worker four, one waits.
                await wait_until(
                    lambda: (
                        worker.in_flight == 4
                        and spare.in_flight == 4
                        and held_first.waiting == 2
                        and held_overflow.waiting == 2
                    ),
                    10,
                )
                assert await queue_depth(send_queue) == 1
                held_first.open.set()
                held_overflow.open.set()
                await wait_until(
                    lambda: (
                        len(first_smtp.recorder.received) + len(overflow_smtp.recorder.received)
                        == 9
                    ),
                    10,
                )
                await wait_until(lambda: worker.in_flight + spare.in_flight == 0, 10)
        received = [
            r
            for m in (first_smtp, overflow_smtp)
            for mail in m.recorder.received
            for r in mail.rcpt_tos
        ]
        assert sorted(received) == sorted(
            [f"a{n}@example.com" for n in range(3)] + [f"b{n}@example.com" for n in range(6)]
        )
        assert len(overflow_smtp.recorder.received) >= 4
        assert await queue_depth(send_queue) == 0
    finally:
        held_first.open.set()
        held_overflow.open.set()
        for server in (first_smtp, overflow_smtp):
            server.server.close()
            await server.server.wait_closed()


async def wait_dead(settings: Settings, count: int) -> list[aio_pika.abc.AbstractIncomingMessage]:
    dead_queue = Names.for_prefix(settings.queue_prefix).dead_queue
    collected: list[aio_pika.abc.AbstractIncomingMessage] = []
    async with asyncio.timeout(10):
        while len(collected) < count:
            collected += await get_messages(dead_queue)
            if len(collected) < count:
                await asyncio.sleep(0.05)
    return collected


async def test_refused_mail_is_dead_lettered_with_reason(
    make_settings: Callable[..., Settings], server_tls: ssl.SSLContext
) -> None:
    async def refuse(address: str) -> str | None:
        return "550 5.1.1 no such user" if address.startswith("nobody") else None

    server = await start_smtp("none", server_tls, auth=False, recorder=SmtpRecorder(on_rcpt=refuse))
    try:
        settings = make_settings(**server.settings_overrides(None, login=False))
        async with running_app(settings) as (app, client), running_worker(settings):
            await wait_ready(app)
            response = await client.get("/?sendmail=nobody@example.com")
            job_id = (await response.get_data(as_text=True)).split("id ")[1].rstrip(")\n")
            assert (await client.get("/?sendmail=somebody@example.com")).status_code == 200
            (dead,) = await wait_dead(settings, 1)
            await server.recorder.wait_for(1)  # the other mail still flows
        assert dead.message_id == job_id
        assert "no such user" in str(dead.headers["x-mailroom-error"])
        assert dead.headers["x-mailroom-smtp-code"] == 550
        assert await queue_depth(Names.for_prefix(settings.queue_prefix).send_queue) == 0
    finally:
        server.server.close()
        await server.server.wait_closed()


async def test_temporary_failure_is_never_lost(
    make_settings: Callable[..., Settings], server_tls: ssl.SSLContext
) -> None:
    async def busy(envelope: Envelope) -> str:
        return "451 4.3.0 try again later"

    server = await start_smtp("none", server_tls, auth=False, recorder=SmtpRecorder(on_data=busy))
    try:
        settings = make_settings(**server.settings_overrides(None, login=False))
        async with running_app(settings) as (app, client), running_worker(settings):
            await wait_ready(app)
            assert (await client.get("/?sendmail=a@example.com")).status_code == 200
            (dead,) = await wait_dead(settings, 1)
        # The code goes in its own header; the text does not repeat it.
        assert dead.headers["x-mailroom-smtp-code"] == 451
        assert str(dead.headers["x-mailroom-error"]).endswith(": 4.3.0 try again later")
    finally:
        server.server.close()
        await server.server.wait_closed()


async def test_poison_message_is_dead_lettered_and_the_rest_flow(
    make_settings: Callable[..., Settings], smtp: SmtpServer
) -> None:
    settings = make_settings(**smtp.settings_overrides(None, login=False))
    names = Names.for_prefix(settings.queue_prefix)
    async with running_app(settings) as (app, client), running_worker(settings):
        await wait_ready(app)
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            channel = await connection.channel()
            exchange = await channel.get_exchange(names.exchange)
            await exchange.publish(aio_pika.Message(b"\xff not json", message_id="bad"), "send")
        assert (await client.get("/?sendmail=a@example.com")).status_code == 200
        (dead,) = await wait_dead(settings, 1)
        await smtp.recorder.wait_for(1)
    assert dead.body == b"\xff not json"
    assert "undecodable" in str(dead.headers["x-mailroom-error"])
