"""Exactly one send per accepted message, through crashes, cut connections and outages."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from aiosmtpd.smtp import Envelope
from quart.typing import TestClientProtocol as Client

from broker import Names
from config import Secret, Settings
from errors import BrokerUnavailable, PublishUnconfirmed
from tests.conftest import running_app, running_worker, wait_ready
from tests.support import (
    Proc,
    SmtpRecorder,
    TcpProxy,
    connected_broker,
    finish,
    get_messages,
    publish_eventually,
    queue_depth,
    rabbitmqctl,
    spawn,
    start_smtp,
    worker_env,
)
from tests.test_status_api import wait_status


def recipients(recorder: SmtpRecorder) -> list[str]:
    return [r for m in recorder.received for r in m.rcpt_tos]


async def send(client: Client, address: str) -> tuple[int, float]:
    started = time.monotonic()
    response = await client.get("/", query_string={"sendmail": address})
    return response.status_code, time.monotonic() - started


async def wait_until(check: Callable[[], bool], timeout: float = 20) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.05)


@pytest.fixture
async def proxy() -> AsyncIterator[TcpProxy]:
    proxy = await TcpProxy("127.0.0.1", 5672).start()
    yield proxy
    await proxy.close()


def via(proxy: TcpProxy) -> Secret:
    return Secret(f"amqp://guest:guest@127.0.0.1:{proxy.port}/")


async def test_ack_lost_after_send_is_not_sent_twice(
    database_url: Secret,
    make_settings: Callable[..., Settings],
    proxy: TcpProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The channel dies after the SMTP server accepted the mail, before the ack."""
    caplog.set_level(logging.INFO)
    cut_once = asyncio.Event()

    async def accept_then_cut(envelope: Envelope) -> None:
        if not cut_once.is_set():
            cut_once.set()
            proxy.cut()  # the worker's AMQP connection dies before it can ack

    smtp = await start_smtp(
        "none", None, auth=False, recorder=SmtpRecorder(on_data=accept_then_cut)
    )
    base = make_settings(database_url=database_url, **smtp.settings_overrides(None, False))
    worker_settings = make_settings(
        database_url=database_url,
        amqp_url=via(proxy),
        **smtp.settings_overrides(None, False),
    )
    async with running_app(base) as (app, client), running_worker(worker_settings):
        await wait_ready(app)
        status, _ = await send(client, "once@example.com")
        assert status == 200
        await wait_until(lambda: "already sent; acking without sending" in caplog.text)
        # The consumer came back after the reconnect: new mail still flows.
        assert (await send(client, "after@example.com"))[0] == 200
        await smtp.recorder.wait_for(2, timeout=20)
    assert sorted(recipients(smtp.recorder)) == ["after@example.com", "once@example.com"]
    assert await queue_depth(Names.of(base).send_queue) == 0
    smtp.server.close()


async def test_worker_killed_mid_burst_loses_nothing(
    prefix: str, tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    async def slowish(envelope: Envelope) -> None:
        await asyncio.sleep(0.02)

    smtp = await start_smtp("none", None, auth=False, recorder=SmtpRecorder(on_data=slowish))
    settings = make_settings()
    count = 60
    env = worker_env(prefix, settings, smtp.port, WORKER_CONCURRENCY=4, WORKER_PREFETCH=8)
    workers: list[Proc] = []
    try:
        async with running_app(settings) as (app, client):
            await wait_ready(app)
            for n in range(count):
                assert (await send(client, f"k{n}@example.com"))[0] == 200
            workers.append(await spawn("worker.py", tmp_path, env))
            await smtp.recorder.wait_for(10, timeout=30)
            os.killpg(workers[0].pid, signal.SIGKILL)
            await finish(workers[0])
            delivered_before = len(smtp.recorder.received)
            assert delivered_before < count, "the burst finished before the kill"
            workers.append(await spawn("worker.py", tmp_path, env))
            await wait_until(lambda: len(set(recipients(smtp.recorder))) == count, timeout=40)
            workers[1].send_signal(signal.SIGTERM)
            code, out = await finish(workers[1])
            assert code == 0, out
    finally:
        for proc in workers:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await finish(proc)
        smtp.server.close()
    delivered = recipients(smtp.recorder)
    assert set(delivered) == {f"k{n}@example.com" for n in range(count)}
    # At-least-once window: only mails the killed worker held (at most WORKER_PREFETCH).
    assert len(delivered) - count <= 8
    assert await queue_depth(Names.of(settings).send_queue) == 0


async def test_connection_cut_mid_burst(
    make_settings: Callable[..., Settings], proxy: TcpProxy
) -> None:
    smtp = await start_smtp("none", None, auth=False)
    settings = make_settings(amqp_url=via(proxy), **smtp.settings_overrides(None, False))
    accepted: list[str] = []
    async with running_app(settings) as (app, client), running_worker(settings):
        await wait_ready(app)
        for n in range(20):
            status, _ = await send(client, f"a{n}@example.com")
            assert status == 200
            accepted.append(f"a{n}@example.com")
        proxy.accepting = False
        proxy.cut()  # RabbitMQ is gone for both processes
        outage = []
        for n in range(5):
            status, elapsed = await send(client, f"out{n}@example.com")
            outage.append((status, elapsed))
            if status == 200:
                accepted.append(f"out{n}@example.com")
        assert all(status == 503 for status, _ in outage)
        assert all(elapsed < settings.publish_timeout + 1 for _, elapsed in outage)
        assert (await client.get("/readyz")).status_code == 503
        proxy.accepting = True
        async with asyncio.timeout(20):
            while (await client.get("/readyz")).status_code != 200:
                await asyncio.sleep(0.1)
        for n in range(20):
            status, _ = await send(client, f"b{n}@example.com")
            assert status == 200
            accepted.append(f"b{n}@example.com")
        await wait_until(lambda: set(accepted) <= set(recipients(smtp.recorder)), timeout=30)
    assert len(recipients(smtp.recorder)) == len(accepted)  # none twice
    smtp.server.close()


async def test_broker_closes_every_connection_of_its_vhost(
    vhost: str, make_settings: Callable[..., Settings]
) -> None:
    """RabbitMQ itself closes the connections (as on a node restart), in a vhost of our own."""
    smtp = await start_smtp("none", None, auth=False)
    settings = make_settings(
        amqp_url=Secret(f"amqp://guest:guest@127.0.0.1:5672/{vhost}"),
        **smtp.settings_overrides(None, False),
    )
    async with running_app(settings) as (app, client), running_worker(settings):
        await wait_ready(app)
        for n in range(10):
            assert (await send(client, f"v{n}@example.com"))[0] == 200
        await smtp.recorder.wait_for(10)
        await asyncio.to_thread(
            rabbitmqctl, "close_all_connections", "-p", vhost, "mailroom fault test"
        )
        async with asyncio.timeout(20):
            while (await client.get("/readyz")).status_code != 200:
                await asyncio.sleep(0.1)
        for n in range(10, 20):
            status, _ = await send(client, f"v{n}@example.com")
            assert status in (200, 503)
            if status == 503:  # the worker side may still be coming back: try again
                await asyncio.sleep(0.5)
                assert (await send(client, f"v{n}@example.com"))[0] == 200
        await wait_until(lambda: len(set(recipients(smtp.recorder))) == 20, timeout=30)
    assert len(recipients(smtp.recorder)) == 20
    smtp.server.close()


async def test_smtp_down_then_back(
    database_url: Secret, make_settings: Callable[..., Settings]
) -> None:
    smtp = await start_smtp("none", None, auth=False)
    port = smtp.port
    smtp.server.close()
    await smtp.server.wait_closed()  # the SMTP server is down
    settings = make_settings(
        database_url=database_url,
        retry_delays=(0.3, 0.6, 1.2, 2.4, 4.8),
        **smtp.settings_overrides(None, False),
    )
    async with running_app(settings) as (app, client), running_worker(settings):
        await wait_ready(app)
        ids = []
        for n in range(3):
            body = await (await client.get(f"/?sendmail=d{n}@example.com")).get_data(as_text=True)
            ids.append(body.split("id ")[1][:32])
        for message_id in ids:
            record = await wait_status(client, message_id, "retrying")
            assert "Connect" in record["last_error"]["message"] or record["last_error"]["message"]
        loop = asyncio.get_running_loop()
        revived = await loop.create_server(lambda: _smtp_factory(smtp.recorder), "127.0.0.1", port)
        try:
            records = [await wait_status(client, i, "sent", timeout=20) for i in ids]
        finally:
            revived.close()
    assert all(r["attempts"] >= 2 for r in records)
    assert all("retrying" in [h["status"] for h in r["history"]] for r in records)
    assert sorted(recipients(smtp.recorder)) == [f"d{n}@example.com" for n in range(3)]


def _smtp_factory(recorder: SmtpRecorder):  # type: ignore[no-untyped-def]
    from aiosmtpd.smtp import SMTP

    return SMTP(recorder, hostname="smtp.test")


async def test_quorum_queues(make_settings: Callable[..., Settings]) -> None:
    answers = iter(["451 4.3.0 later"])

    async def once_busy(envelope: Envelope) -> str | None:
        return next(answers, None)

    smtp = await start_smtp("none", None, auth=False, recorder=SmtpRecorder(on_data=once_busy))
    settings = make_settings(queue_type="quorum", **smtp.settings_overrides(None, False))
    async with running_app(settings) as (app, client), running_worker(settings):
        await wait_ready(app)
        body = await (await client.get("/?sendmail=q@example.com")).get_data(as_text=True)
        record = await wait_status(client, body.split("id ")[1][:32], "sent")
    assert record["attempts"] == 2  # went through a quorum retry tier and back
    listing = await asyncio.to_thread(
        subprocess.run,
        ["rabbitmqctl", "-q", "list_queues", "name", "type", "arguments"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    ours = {
        line.split("\t")[0]: line
        for line in listing.stdout.splitlines()
        if line.startswith(settings.queue_prefix + ".")
    }
    assert set(ours) == set(Names.of(settings).all_queues())
    assert all("\tquorum\t" in line for line in ours.values())
    assert "x-delivery-limit" in ours[Names.of(settings).send_queue]
    smtp.server.close()


@pytest.mark.broker_restart
async def test_real_broker_restart(make_settings: Callable[..., Settings]) -> None:
    """RabbitMQ's own application restarts (stop_app/start_app) in the middle of traffic.

    It disturbs every client of the node, so it runs only with --broker-restart (the test
    command passes it) and after every other test.
    """
    smtp = await start_smtp("none", None, auth=False)
    settings = make_settings(**smtp.settings_overrides(None, False))
    accepted: list[str] = []
    async with running_app(settings) as (app, client), running_worker(settings):
        await wait_ready(app)
        for n in range(10):
            assert (await send(client, f"r{n}@example.com"))[0] == 200
            accepted.append(f"r{n}@example.com")
        await asyncio.to_thread(rabbitmqctl, "stop_app")
        try:
            status, elapsed = await send(client, "during@example.com")
            assert status == 503
            assert elapsed < settings.publish_timeout + 1
        finally:
            await asyncio.to_thread(rabbitmqctl, "start_app")
            await asyncio.to_thread(rabbitmqctl, "await_startup")
        async with asyncio.timeout(30):
            while (await client.get("/readyz")).status_code != 200:
                await asyncio.sleep(0.1)
        for n in range(10, 20):
            async with asyncio.timeout(15):
                while (status := (await send(client, f"r{n}@example.com"))[0]) != 200:
                    assert status == 503
                    await asyncio.sleep(0.2)
            accepted.append(f"r{n}@example.com")
        await wait_until(lambda: set(accepted) <= set(recipients(smtp.recorder)), timeout=40)
    assert sorted(recipients(smtp.recorder)) == sorted(accepted)
    smtp.server.close()


async def test_message_that_keeps_killing_the_worker_is_failed(
    prefix: str, tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    """Classic queues have no delivery limit: the record's attempts stop a crash loop."""
    started = asyncio.Event()
    release = asyncio.Event()

    async def hang(envelope: Envelope) -> str:
        started.set()
        await release.wait()
        return "421 closing"

    smtp = await start_smtp("none", None, auth=False, recorder=SmtpRecorder(on_data=hang))
    settings = make_settings(delivery_limit=2)
    env = worker_env(prefix, settings, smtp.port, DELIVERY_LIMIT=2)
    async with running_app(settings) as (app, client):
        await wait_ready(app)
        body = await (await client.get("/?sendmail=deadly@example.com")).get_data(as_text=True)
        message_id = body.split("id ")[1][:32]
        for _ in range(2):  # the worker dies on it, twice
            started.clear()
            worker = await spawn("worker.py", tmp_path, env)
            await asyncio.wait_for(started.wait(), 20)
            os.killpg(worker.pid, signal.SIGKILL)
            await finish(worker)
        worker = await spawn("worker.py", tmp_path, env)
        try:
            record = await wait_status(client, message_id, "failed", timeout=20)
        finally:
            worker.send_signal(signal.SIGTERM)
            code, out = await finish(worker)
        assert code == 0, out
    release.set()
    smtp.server.close()
    assert record["attempts"] == 3
    assert "without an outcome" in record["last_error"]["message"]
    assert await queue_depth(Names.of(settings).dead_queue) == 1
    assert await queue_depth(Names.of(settings).send_queue) == 0


async def test_unconfirmed_publishes_are_bounded(
    make_settings: Callable[..., Settings], proxy: TcpProxy
) -> None:
    """While RabbitMQ takes nothing (a frozen link; a memory alarm blocks publishers the
    same way), at most ``max_unconfirmed`` publishes are written: nothing waits for the
    socket's buffer, so this bounds what it holds. One more waits for a slot within
    PUBLISH_TIMEOUT, then fails as not queued (never written); the slots come back with
    the late confirms."""
    settings = make_settings(amqp_url=via(proxy), publish_timeout=1.0)
    async with connected_broker(settings, "test-bounded", max_unconfirmed=3) as broker:
        proxy.frozen = True
        held = [asyncio.create_task(broker.publish(b"{}", f"m{n}")) for n in range(3)]
        for _ in range(3):
            await asyncio.sleep(0)  # each takes its slot in its first step
        with pytest.raises(BrokerUnavailable, match="3 publishes are waiting") as refused:
            await broker.publish(b"{}", "m3")
        assert not isinstance(refused.value, PublishUnconfirmed)  # it was never written
        for task in held:
            with pytest.raises(PublishUnconfirmed):
                await task
        proxy.frozen = False  # the three go through; their confirms come back, late
        await publish_eventually(broker, "after", 15)  # a slot is free once a confirm came
        ids = sorted(str(m.message_id) for m in await get_messages(Names.of(settings).send_queue))
        assert ids == ["after", "m0", "m1", "m2"]


async def test_late_confirm_keeps_the_idempotency_key(
    make_settings: Callable[..., Settings], proxy: TcpProxy
) -> None:
    """RabbitMQ confirms after PUBLISH_TIMEOUT: the caller got 503, but a retry with the
    same key finds the stored message instead of queueing a second one."""
    settings = make_settings(amqp_url=via(proxy), publish_timeout=1.0)
    body = {"to": "late@example.com", "subject": "s", "text": "t"}
    headers = {"Idempotency-Key": "late-confirm"}
    async with running_app(settings) as (app, client):
        await wait_ready(app)
        proxy.frozen = True  # the publish goes out; its confirm does not come back yet
        first = await client.post("/api/messages", json=body, headers=headers)
        assert first.status_code == 503
        message_id = re.search(r"[0-9a-f]{32}", (await first.get_json())["error"])
        assert message_id
        retry_early = await client.post("/api/messages", json=body, headers=headers)
        assert retry_early.status_code == 409  # still unknown: not a second message
        proxy.frozen = False  # the confirm arrives, late
        async with asyncio.timeout(15):
            while (await client.get(f"/api/messages/{message_id.group()}")).status_code != 200:
                await asyncio.sleep(0.05)
        again = await client.post("/api/messages", json=body, headers=headers)
        assert again.status_code == 202
        assert (await again.get_json())["id"] == message_id.group()
    assert await queue_depth(Names.of(settings).send_queue) == 1
