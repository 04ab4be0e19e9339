"""Fixtures: a unique queue prefix per test, real SMTP servers, a running app and worker."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import ssl
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import aio_pika
import asyncpg
import httpx
import pytest
import trustme
from hypercorn.config import Config as HypercornConfig
from quart import Quart
from quart.testing import QuartClient
from quart.typing import TestClientProtocol as Client

from broker import Names
from config import Secret, Settings
from graceful import serve
from server import create_app
from tests.support import (
    AMQP_URL,
    Proc,
    SmtpServer,
    finish,
    free_port,
    rabbitmqctl,
    start_smtp,
)
from tests.support import ROOT as ROOT  # re-exported for the test modules
from worker import Worker

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--broker-restart",
        action="store_true",
        help="also run tests that restart the local RabbitMQ (disturbs its other clients)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "broker_restart: restarts the local RabbitMQ; needs --broker-restart"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    restart = [item for item in items if "broker_restart" in item.keywords]
    if not config.getoption("--broker-restart"):
        skip = pytest.mark.skip(reason="restarts RabbitMQ: run with --broker-restart")
        for item in restart:
            item.add_marker(skip)
    # Whatever restarts the broker runs last, after everything else.
    items[:] = [item for item in items if item not in restart] + restart


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def server_tls(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
    return ctx


@pytest.fixture(scope="session")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    """A queue prefix of this test's own; its queues and exchange are deleted afterwards."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    yield name
    # Processes started with the default RETRY_DELAYS declare those tiers too.
    for delays in (TEST_RETRY_DELAYS, Settings().retry_delays):
        await delete_topology(Names.for_prefix(name, delays))


TEST_RETRY_DELAYS = (0.2, 0.4, 0.8)


async def delete_topology(names: Names) -> None:
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        for queue in names.all_queues():
            channel = await connection.channel()
            with contextlib.suppress(aio_pika.exceptions.ChannelClosed):
                await channel.queue_delete(queue)
        channel = await connection.channel()
        with contextlib.suppress(aio_pika.exceptions.ChannelClosed):
            await channel.exchange_delete(names.exchange)


def settings_for(prefix: str, tmp_path: Path, **overrides: Any) -> Settings:
    """The tests' settings: queues under ``prefix``, files under ``tmp_path``, short
    timeouts and retry delays; ``overrides`` on top."""
    base = Settings(
        amqp_url=Secret(AMQP_URL),
        queue_prefix=prefix,
        talktome_log=tmp_path / "log" / "messaging_system.log",
        outbox_dir=tmp_path / "outbox",
        smtp_timeout=5.0,
        publish_timeout=3.0,
        connect_timeout=3.0,
        shutdown_grace=10.0,
        worker_concurrency=8,
        database_url=Secret(f"sqlite:///{tmp_path}/mailroom.db"),
        retry_delays=TEST_RETRY_DELAYS,
    )
    return dataclasses.replace(base, **overrides)


@pytest.fixture
async def make_settings(prefix: str, tmp_path: Path) -> AsyncIterator[Callable[..., Settings]]:
    """Settings for this test; every topology they name is deleted afterwards."""
    made: list[Settings] = []

    def make(**overrides: Any) -> Settings:
        settings = settings_for(prefix, tmp_path, **overrides)
        made.append(settings)
        return settings

    yield make
    for names in {Names.of(s) for s in made if s.queue_prefix != prefix}:
        await delete_topology(names)
    for delays in {s.retry_delays for s in made if s.queue_prefix == prefix}:
        await delete_topology(Names.for_prefix(prefix, delays))


@contextlib.asynccontextmanager
async def pg_database() -> AsyncIterator[tuple[str, Any]]:
    """A PostgreSQL database of the caller's own: (its name, an admin connection);
    dropped afterwards. Skips the test when PostgreSQL is not reachable."""
    name = f"mailroom_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = await asyncpg.connect(PG_ADMIN, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.skip(f"PostgreSQL is not reachable at {PG_ADMIN}: {exc}")
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield name, admin
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture(params=["sqlite", "postgresql"])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Secret]:
    """Each backend in turn: a SQLite file, or a PostgreSQL database of this test's own."""
    if request.param == "sqlite":
        yield Secret(f"sqlite:///{tmp_path}/mailroom.db")
        return
    async with pg_database() as (name, _):
        yield Secret(f"postgresql://postgres@127.0.0.1:5432/{name}")


@pytest.fixture
def vhost() -> Iterator[str]:
    """A RabbitMQ vhost of this test's own (guest may use it), deleted afterwards."""
    name = f"mailroom-test-{uuid.uuid4().hex[:8]}"
    rabbitmqctl("add_vhost", name)
    rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    yield name
    rabbitmqctl("delete_vhost", name)


@pytest.fixture
async def smtp(server_tls: ssl.SSLContext) -> AsyncIterator[SmtpServer]:
    """A plain SMTP server (no TLS, no login) on a free port."""
    server = await start_smtp("none", server_tls, auth=False)
    yield server
    server.server.close()
    await server.server.wait_closed()


class PeerClient(QuartClient):
    """A test client whose requests come from ``peer`` (default: a loopback address)."""

    peer: tuple[str, int] = ("127.0.0.1", 40000)

    async def open(self, path: str, *args: Any, **kwargs: Any) -> Any:
        kwargs["scope_base"] = {"client": self.peer, **(kwargs.get("scope_base") or {})}
        return await super().open(path, *args, **kwargs)


@contextlib.asynccontextmanager
async def running_app(settings: Settings) -> AsyncIterator[tuple[Quart, Client]]:
    """The app with its serving lifecycle run, and a test client (from 127.0.0.1)."""
    app = create_app(settings)
    app.test_client_class = cast("type[Client]", PeerClient)
    async with app.test_app() as test_app:
        yield app, test_app.test_client()


@contextlib.asynccontextmanager
async def serving_app(settings: Settings) -> AsyncIterator[str]:
    """The app served by Hypercorn as ``python server.py`` serves it, on a free loopback
    port, in this process; its base URL once ``GET /readyz`` answers 200. Stopped after."""
    async with serving(create_app(settings), "/readyz") as base:
        yield base


@contextlib.asynccontextmanager
async def serving(app: Quart, ready_path: str) -> AsyncIterator[str]:
    """``app`` served by Hypercorn through graceful.serve, on a free loopback port, in this
    process; its base URL once ``GET ready_path`` answers 200. Stopped after."""
    config = HypercornConfig()
    port = free_port()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    config.errorlog = None
    config.graceful_timeout = 5
    stop = asyncio.Event()
    task = asyncio.create_task(serve(app, config, stop))
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(trust_env=False) as client, asyncio.timeout(30):
            while not task.done():
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get(f"{base}{ready_path}")).status_code == 200:
                        break
                await asyncio.sleep(0.05)
        if task.done():
            task.result()
            raise AssertionError("the server stopped before it was ready")
        yield base
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def wait_ready(app: Quart, timeout: float = 10.0) -> None:
    await asyncio.wait_for(app.extensions["mailroom_broker"].wait_connected(), timeout)


@contextlib.asynccontextmanager
async def running_worker(settings: Settings) -> AsyncIterator[Worker]:
    worker = Worker(settings)
    task = asyncio.create_task(worker.run())
    try:
        ready = asyncio.create_task(worker.ready.wait())
        done, _ = await asyncio.wait({ready, task}, timeout=15, return_when="FIRST_COMPLETED")
        if task in done:
            task.result()
            raise AssertionError("worker stopped before it was ready")
        assert ready in done, "worker not ready within 15s"
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(task, 30)


@pytest.fixture
async def app_client(
    make_settings: Callable[..., Settings],
) -> AsyncIterator[tuple[Quart, Client]]:
    async with running_app(make_settings()) as (app, client):
        await wait_ready(app)
        yield app, client


@pytest.fixture
async def stop_later() -> AsyncIterator[list[Proc]]:
    """Processes a test started; whatever still runs at the end is killed."""
    procs: list[Proc] = []
    yield procs
    for proc in procs:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        await finish(proc)
