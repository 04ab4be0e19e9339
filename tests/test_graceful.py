"""graceful.serve: what a connection leaves behind once its client is gone."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import struct
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import pytest
from quart import Quart

import graceful
from tests.conftest import serving
from tests.test_faults import wait_until


@contextlib.asynccontextmanager
async def serving_ok() -> AsyncIterator[tuple[str, int]]:
    """A one-route app (``GET /`` answers "ok") served through graceful.serve: its host
    and port."""
    app = Quart(__name__)

    @app.get("/")
    async def hello() -> str:
        return "ok"

    async with serving(app, "/") as base:
        url = urlsplit(base)
        yield url.hostname or "127.0.0.1", url.port or 80


async def test_a_kept_alive_connection_its_client_closes_leaves_no_task_behind() -> None:
    """Its idle task waited for the server's shutdown, and held the connection's task and
    objects until then: a task pair per closed keep-alive connection, for good."""
    async with serving_ok() as (host, port):
        request = f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
        before = len(asyncio.all_tasks())  # the readiness check's connection's, if not ended
        for _ in range(20):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(request)
            assert (await reader.readuntil(b"ok")).startswith(b"HTTP/1.1 200")
            writer.close()  # idle and kept alive: the client goes
            await writer.wait_closed()
        await wait_until(lambda: len(asyncio.all_tasks()) <= before, timeout=10)


@pytest.mark.parametrize("ending", ["server closes", "client closes", "client resets"])
async def test_an_ended_connection_is_freed_without_the_collector(ending: str) -> None:
    """A connection's ~35 objects (streams, transport, h11 state, task groups) made a
    cycle through its protocol, which holds the connection's bound protocol_send, and
    one lost with an error made another through the error's traceback: each waited for
    the collector, hundreds of connections' worth under load (with 128 clients and a new
    connection per request, 9 MB of the server's peak RSS). With the collector off, they
    must go as the connections end, however they end."""

    def connections() -> int:
        return sum(isinstance(o, graceful._TCPServer) for o in gc.get_objects())

    async with serving_ok() as (host, port):
        close = b"Connection: close\r\n" if ending == "server closes" else b""
        request = b"GET / HTTP/1.1\r\nHost: %s:%d\r\n%s\r\n" % (host.encode(), port, close)
        gc.collect()
        gc.disable()
        try:
            for _ in range(20):
                reader, writer = await asyncio.open_connection(host, port)
                writer.write(request)
                assert (await reader.readuntil(b"ok")).startswith(b"HTTP/1.1 200")
                if ending == "server closes":
                    assert await reader.read() == b""  # to the end: the server closed
                elif ending == "client resets":  # an RST instead of a FIN
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.close()
                await writer.wait_closed()
            with contextlib.suppress(TimeoutError):
                await wait_until(lambda: connections() == 0, timeout=10)
            assert connections() == 0, "connection objects left for the collector"
        finally:
            gc.enable()
