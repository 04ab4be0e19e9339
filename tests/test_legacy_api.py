"""The two calls the users of the old stack know: ?talktome and ?sendmail=."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest
from quart import Quart
from quart.typing import TestClientProtocol as Client

from broker import Names
from config import Settings
from messages import LEGACY_SUBJECT, MailJob
from tests.conftest import running_app
from tests.support import TcpProxy, free_port, get_messages, queue_depth

STAMP = re.compile(r"^(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}) ")
AppClient = tuple[Quart, Client]


def log_lines(settings_path: Path) -> list[str]:
    return settings_path.read_text().splitlines()


@pytest.mark.parametrize("query", ["talktome", "talktome=", "talktome=yes please"])
async def test_talktome_logs_local_time(
    query: str, make_settings: Callable[..., Settings], app_client: AppClient
) -> None:
    app, client = app_client
    settings: Settings = app.config["MAILROOM_SETTINGS"]
    before = datetime.now().replace(microsecond=0)
    response = await client.get(f"/?{query}")
    after = datetime.now()
    assert response.status_code == 200
    assert response.mimetype == "text/plain"
    body = await response.get_data(as_text=True)
    lines = log_lines(settings.talktome_log)
    assert len(lines) == 1
    match = STAMP.match(lines[0])
    assert match, lines[0]
    logged = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S")
    assert before <= logged <= after
    assert match.group(1) in body  # the answer names the time it logged


async def test_concurrent_talktome_lines_are_intact(app_client: AppClient) -> None:
    app, client = app_client
    settings: Settings = app.config["MAILROOM_SETTINGS"]
    responses = await asyncio.gather(*(client.get("/?talktome") for _ in range(300)))
    assert {r.status_code for r in responses} == {200}
    lines = log_lines(settings.talktome_log)
    assert len(lines) == 300
    assert all(STAMP.match(line) and " talktome from " in line for line in lines)


async def test_usage_without_parameters(app_client: AppClient) -> None:
    _, client = app_client
    response = await client.get("/")
    assert response.status_code == 200
    assert "?sendmail=" in await response.get_data(as_text=True)


@pytest.mark.parametrize("address", ["email@example.com", "mailto:email@example.com"])
async def test_sendmail_queues_after_confirm(address: str, app_client: AppClient) -> None:
    app, client = app_client
    settings: Settings = app.config["MAILROOM_SETTINGS"]
    response = await client.get("/", query_string={"sendmail": address})
    assert response.status_code == 200
    assert response.mimetype == "text/plain"
    body = await response.get_data(as_text=True)
    match = re.fullmatch(r"Email to email@example\.com queued \(id ([0-9a-f]{32})\)\n", body)
    assert match, body
    (message,) = await get_messages(Names.for_prefix(settings.queue_prefix).send_queue)
    assert message.delivery_mode == 2  # persistent
    job = MailJob.from_bytes(message.body)
    assert job.id == match.group(1) == message.message_id
    assert job.to == ("email@example.com",)
    assert job.subject == LEGACY_SUBJECT


@pytest.mark.parametrize(
    "query",
    [
        "sendmail=not-an-address",
        "sendmail=",
        "sendmail=a@b.test%0D%0ABcc:%20victim@example.com",
        "sendmail=a@example.com%0ABcc:victim@example.com",
        "sendmail=a@example.com%00",
        "sendmail=mailto:",
        "sendmail=a@example.com,b@example.com",
        "sendmail=a@example.com&sendmail=b@example.com",
    ],
)
async def test_invalid_address_is_400_and_queues_nothing(query: str, app_client: AppClient) -> None:
    app, client = app_client
    settings: Settings = app.config["MAILROOM_SETTINGS"]
    response = await client.get(f"/?{query}")
    assert response.status_code == 400
    assert response.mimetype == "text/plain"
    assert await response.get_data(as_text=True)
    assert await queue_depth(Names.for_prefix(settings.queue_prefix).send_queue) == 0


async def test_broker_unreachable_answers_503_quickly(
    make_settings: Callable[..., Settings],
) -> None:
    from config import Secret

    settings = make_settings(amqp_url=Secret(f"amqp://guest:guest@127.0.0.1:{free_port()}/"))
    async with running_app(settings) as (_, client):
        started = time.monotonic()
        response = await client.get("/?sendmail=email@example.com")
        assert response.status_code == 503
        assert response.headers["Retry-After"]
        assert time.monotonic() - started < 2
        ready = await client.get("/readyz")
        assert ready.status_code == 503
        assert (await client.get("/healthz")).status_code == 200


async def test_broker_that_stops_answering_gives_503_within_publish_timeout(
    make_settings: Callable[..., Settings],
) -> None:
    from config import Secret

    proxy = await TcpProxy("127.0.0.1", 5672).start()
    try:
        settings = make_settings(
            amqp_url=Secret(f"amqp://guest:guest@127.0.0.1:{proxy.port}/"), publish_timeout=1.5
        )
        async with running_app(settings) as (app, client):
            await asyncio.wait_for(app.extensions["mailroom_broker"].wait_connected(), 10)
            assert (await client.get("/readyz")).status_code == 200
            proxy.frozen = True  # RabbitMQ never confirms
            started = time.monotonic()
            response = await client.get("/?sendmail=email@example.com")
            elapsed = time.monotonic() - started
            assert response.status_code == 503
            assert 1.4 < elapsed < 4
            proxy.frozen = False
    finally:
        await proxy.close()


async def test_readyz_and_healthz(app_client: AppClient) -> None:
    _, client = app_client
    assert (await client.get("/healthz")).status_code == 200
    assert (await client.get("/readyz")).status_code == 200
