"""Connecting to RabbitMQ: one log line per failed attempt, a refused login said plainly,
and a request that comes while the first connection is being made waits for it."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from pathlib import Path
from typing import cast

import aio_pika
import aiormq
import pytest

from broker import Names
from config import Secret, Settings
from errors import BrokerUnavailable
from tests.conftest import running_app
from tests.support import (
    AMQP_URL,
    Proc,
    TcpProxy,
    child_env,
    connected_broker,
    finish,
    free_port,
    get_messages,
    publish_eventually,
    spawn,
)

WRONG_PASSWORD = "not-the-Passw0rd-42"


async def attempts(proc: Proc, count: int, timeout: float = 30) -> list[str]:
    """The lines ``proc`` printed until its ``count``-th failed attempt; then stop it."""
    assert proc.stdout is not None
    lines: list[str] = []
    async with asyncio.timeout(timeout):
        while sum("retrying in" in line for line in lines) < count:
            line = (await proc.stdout.readline()).decode()
            assert line, f"exited: {lines}"
            lines.append(line)
    proc.send_signal(signal.SIGTERM)
    code, rest = await finish(proc)
    assert code == 0, rest
    return lines + rest.splitlines()


async def test_wrong_address_or_password_is_logged_once_per_attempt(
    prefix: str, tmp_path: Path, stop_later: list[Proc]
) -> None:
    refused = await spawn(
        "server.py",
        tmp_path,
        child_env(
            prefix,
            PORT=free_port(),
            AMQP_URL=f"amqp://guest:{WRONG_PASSWORD}@127.0.0.1:5672/",
            DATABASE_URL=f"sqlite:///{tmp_path}/a.db",
        ),
    )
    nobody = await spawn(
        "server.py",
        tmp_path,
        child_env(
            prefix,
            PORT=free_port(),
            AMQP_URL=f"amqp://guest:guest@127.0.0.1:{free_port()}/",
            DATABASE_URL=f"sqlite:///{tmp_path}/b.db",
        ),
    )
    stop_later.extend((refused, nobody))
    login, down = await asyncio.gather(attempts(refused, 3), attempts(nobody, 3))
    # A refused login: a settings fault naming AMQP_URL, at ERROR, once per attempt.
    failures = [line for line in login if "RabbitMQ" in line or "aiormq" in line]
    assert len(failures) == 3, login
    for line in failures:
        assert "ERROR broker: RABBITMQ LOGIN REFUSED by amqp://guest:***@127.0.0.1:5672/" in line
        assert "password in AMQP_URL is wrong (a settings fault, not an outage" in line
    assert WRONG_PASSWORD not in "".join(login)
    # Nothing listening: an outage, a WARNING, once per attempt (aiormq's own ERROR gone).
    failures = [line for line in down if "RabbitMQ" in line or "aiormq" in line]
    assert len(failures) == 3, down
    assert all("WARNING broker: cannot connect to RabbitMQ" in line for line in failures)
    # The waits the README promises: 0.5 s, then doubling.
    waits = [line.rsplit("retrying in ", 1)[1].strip() for line in failures]
    assert waits == ["0.5s", "1.0s", "2.0s"]


async def test_a_request_during_the_first_connection_waits_for_it(
    make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    """The server has just started and RabbitMQ is slow to answer: a send that comes
    meanwhile is queued once the connection is up (within PUBLISH_TIMEOUT), not 503."""
    caplog.set_level(logging.INFO)
    proxy = await TcpProxy("127.0.0.1", 5672).start()
    proxy.frozen = True  # the AMQP handshake stalls until we let it through
    settings = make_settings(
        amqp_url=Secret(f"amqp://guest:guest@127.0.0.1:{proxy.port}/"), publish_timeout=10.0
    )
    try:
        async with running_app(settings) as (app, client):
            broker = app.extensions["mailroom_broker"]
            assert not broker.is_ready
            request = asyncio.create_task(client.get("/?sendmail=early@example.com"))
            async with asyncio.timeout(10):
                while "waiting up to 10s for RabbitMQ" not in caplog.text:
                    await asyncio.sleep(0.02)
            assert not request.done() and not broker.is_ready
            proxy.frozen = False
            response = await asyncio.wait_for(request, 15)
            assert response.status_code == 200, await response.get_data(as_text=True)
            body = await response.get_data(as_text=True)
    finally:
        await proxy.close()
    (queued,) = await get_messages(f"{settings.queue_prefix}.send")
    assert queued.message_id is not None and queued.message_id in body


async def test_refused_publishes_move_to_a_fresh_channel(
    make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    """A publish RabbitMQ refuses (here returned: the work queue was deleted under the
    running process) moves publishing to a fresh channel, which declares the topology
    again: publishes succeed again instead of failing for as long as the process runs.
    (The same renewal is what gets publishing going again on a cluster whose channel kept
    stale state of a quorum queue that changed leader: tests/test_cluster.py.)"""
    settings = make_settings(publish_timeout=2.0)
    names = Names.of(settings)
    async with connected_broker(settings, "test-renew") as broker:
        await broker.publish(b"{}", "before")
        first = broker.channel
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            await (await connection.channel()).queue_delete(names.send_queue)
        with pytest.raises(BrokerUnavailable, match="refused"):
            await broker.publish(b"{}", "refused")
        await publish_eventually(broker, "after")  # the fresh channel is on its way
        assert broker.channel is not first
        assert [m.message_id for m in await get_messages(names.send_queue)] == ["after"]
        assert "publishing on a fresh channel" in caplog.text
        assert first is not None
        async with asyncio.timeout(10):
            while not first.is_closed:  # retired once its publishes had PUBLISH_TIMEOUT
                await asyncio.sleep(0.1)


async def test_concurrent_publishes_reach_the_socket_together(
    make_settings: Callable[..., Settings],
) -> None:
    """Publishes made at once are all handed to the connection's writer within a few
    turns of the event loop, before any confirm: none waits for another's frame to be
    written (aiormq holds the channel's lock until then unless told not to wait, which
    let one publish through per three turns), so they go out and are confirmed together."""
    settings = make_settings()
    names = Names.of(settings)
    async with connected_broker(settings, "test-together") as broker:
        assert broker.channel is not None
        underlay = cast(aiormq.Channel, await broker.channel.get_underlay_channel())
        first = underlay.delivery_tag
        publishes = [asyncio.create_task(broker.publish(b"{}", f"m{n}")) for n in range(50)]
        for _ in range(5):
            await asyncio.sleep(0)  # a turn of the event loop: no confirm can come yet
        assert underlay.delivery_tag - first == 50
        assert not any(p.done() for p in publishes)
        async with asyncio.timeout(10):
            await asyncio.gather(*publishes)
        assert len(await get_messages(names.send_queue)) == 50
