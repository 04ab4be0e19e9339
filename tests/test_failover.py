"""AMQP_URL with several brokers: the first that answers is used, and when it goes away
the server and the worker carry on with the next."""

from __future__ import annotations

from collections.abc import Callable

import httpx

from config import Secret, Settings
from tests.conftest import running_worker, serving_app
from tests.support import SmtpServer, TcpProxy, free_port
from tests.test_metrics import wait_until_async

BODY = {"to": "a@example.com", "subject": "failover", "text": "t"}


async def test_server_and_worker_fail_over_to_the_next_broker(
    make_settings: Callable[..., Settings], smtp: SmtpServer
) -> None:
    """Three 'brokers': a port nobody listens on, then two proxies to the local RabbitMQ.
    Both processes skip the dead one; when the one they use goes away (refusing new
    connections too), they reconnect through the other and mail flows again."""
    first, second = (
        await TcpProxy("127.0.0.1", 5672).start(),
        await TcpProxy("127.0.0.1", 5672).start(),
    )
    urls = ",".join(
        f"amqp://guest:guest@127.0.0.1:{port}/" for port in (free_port(), first.port, second.port)
    )
    settings = make_settings(amqp_url=Secret(urls), **smtp.settings_overrides(None, login=False))
    try:
        async with (
            serving_app(settings) as base,
            running_worker(settings),
            httpx.AsyncClient(trust_env=False, timeout=15) as client,
        ):
            assert (await client.post(f"{base}/api/messages", json=BODY)).status_code == 202
            await smtp.recorder.wait_for(1, timeout=20)
            first.accepting = False
            first.cut()

            async def accepted() -> bool:
                response = await client.post(f"{base}/api/messages", json=BODY)
                return response.status_code == 202

            await wait_until_async(accepted, 30)
            await smtp.recorder.wait_for(2, timeout=30)
    finally:
        await first.close()
        await second.close()


def test_a_list_of_brokers_is_shown_redacted() -> None:
    settings = Settings.from_env(
        {"AMQP_URL": "amqp://u:pw1@h1:5672/v, amqp://u:pw2@h2:5672/v"}, env_file=None
    )
    assert settings.amqp_urls == ("amqp://u:pw1@h1:5672/v", "amqp://u:pw2@h2:5672/v")
    assert settings.amqp_url_redacted == "amqp://u:***@h1:5672/v, amqp://u:***@h2:5672/v"
