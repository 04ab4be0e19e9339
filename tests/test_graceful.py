"""graceful.serve: what a connection leaves behind once its client is gone."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

from quart import Quart

from tests.conftest import serving


async def test_a_kept_alive_connection_its_client_closes_leaves_no_task_behind() -> None:
    """Its idle task waited for the server's shutdown, and held the connection's task and
    objects until then: a task pair per closed keep-alive connection, for good."""
    app = Quart(__name__)

    @app.get("/")
    async def hello() -> str:
        return "ok"

    async with serving(app, "/") as base:
        url = urlsplit(base)
        host, port = url.hostname or "127.0.0.1", url.port or 80
        request = f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
        before = len(asyncio.all_tasks())  # the readiness check's connection's, if not ended
        for _ in range(20):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(request)
            assert (await reader.readuntil(b"ok")).startswith(b"HTTP/1.1 200")
            writer.close()  # idle and kept alive: the client goes
            await writer.wait_closed()
        async with asyncio.timeout(10):
            while len(asyncio.all_tasks()) > before:
                await asyncio.sleep(0.02)
