"""InlineHTTPConnection keeps what Quart's own request handling does, over real
connections to Hypercorn: the body streamed in, a disconnect cancelling the handler (and
the app then returning normally), an error in the handler (Quart's 500), the response
timeout. Each test runs with Quart's own class too, to show that they agree; the suite's
other tests run every request of Mailroom's app through InlineHTTPConnection."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import httpx
import pytest
from hypercorn.config import Config
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope
from quart import Quart, Response, request
from quart.asgi import ASGIHTTPConnection

from asgihttp import InlineHTTPConnection
from graceful import serve
from tests.support import free_port


@pytest.fixture(params=[InlineHTTPConnection, ASGIHTTPConnection], ids=["inline", "quart"])
def connection_class(request: pytest.FixtureRequest) -> type[ASGIHTTPConnection]:
    return request.param  # type: ignore[no-any-return]


class Events:
    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.never = asyncio.Event()
        self.ended = asyncio.Event()
        self.endings: list[str] = []  # how each HTTP call of the app ended


def make_app(events: Events, connection_class: type[ASGIHTTPConnection]) -> Quart:
    app = Quart(__name__)
    app.asgi_http_class = connection_class
    app.config["RESPONSE_TIMEOUT"] = 0.5
    inner = app.asgi_app

    async def recording(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if scope["type"] != "http":
            await inner(scope, receive, send)
            return
        try:
            await inner(scope, receive, send)
        except asyncio.CancelledError:
            events.endings.append("cancelled")
            raise
        except Exception as exc:
            events.endings.append(f"raised {type(exc).__name__}")
            raise
        else:
            events.endings.append("returned")
        finally:
            events.ended.set()

    app.asgi_app = recording  # type: ignore[method-assign]

    @app.post("/echo")
    async def echo() -> Response:
        body = await request.get_data(as_text=False)
        return Response(body[::-1], mimetype="application/octet-stream")

    @app.get("/wait")
    async def wait() -> str:
        events.started.set()
        try:
            await events.never.wait()
        except asyncio.CancelledError:
            events.cancelled.set()
            raise
        return "never"

    @app.get("/boom")
    async def boom() -> str:
        raise RuntimeError("boom")

    @app.get("/slow-body")
    async def slow_body() -> Response:
        async def chunks() -> AsyncIterator[bytes]:
            yield b"first\n"
            await events.never.wait()
            yield b"never\n"

        return Response(chunks(), mimetype="text/plain")

    return app


@contextlib.asynccontextmanager
async def served(app: Quart) -> AsyncIterator[int]:
    config = Config()
    port = free_port()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    config.errorlog = None
    config.graceful_timeout = 2
    stop = asyncio.Event()
    task = asyncio.create_task(serve(app, config, stop))
    try:
        async with asyncio.timeout(10):
            while True:
                with contextlib.suppress(OSError):
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                    writer.close()
                    await writer.wait_closed()
                    break
                await asyncio.sleep(0.02)
        yield port
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def test_body_streamed_in_chunks_reaches_the_handler(
    connection_class: type[ASGIHTTPConnection],
) -> None:
    body = bytes(range(256)) * 1000

    async def pieces() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 7000):
            yield body[start : start + 7000]
            await asyncio.sleep(0)

    events = Events()
    async with (
        served(make_app(events, connection_class)) as port,
        httpx.AsyncClient(trust_env=False, timeout=10) as client,
    ):
        answer = await client.post(f"http://127.0.0.1:{port}/echo", content=pieces())
        assert answer.status_code == 200
        assert answer.content == body[::-1]
        sized = await client.post(f"http://127.0.0.1:{port}/echo", content=b"abc")
        assert sized.content == b"cba"
    assert events.endings == ["returned", "returned"]


async def test_a_client_that_hangs_up_cancels_the_handler(
    connection_class: type[ASGIHTTPConnection],
) -> None:
    events = Events()
    async with served(make_app(events, connection_class)) as port:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /wait HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.wait_for(events.started.wait(), 5)
        writer.close()
        await writer.wait_closed()
        await asyncio.wait_for(events.cancelled.wait(), 5)
        await asyncio.wait_for(events.ended.wait(), 5)
        assert events.endings == ["returned"]  # the app ends normally, as Quart's does


async def test_an_error_in_the_handler_is_quarts_500(
    connection_class: type[ASGIHTTPConnection],
) -> None:
    events = Events()
    async with (
        served(make_app(events, connection_class)) as port,
        httpx.AsyncClient(trust_env=False, timeout=10) as client,
    ):
        failed = await client.get(f"http://127.0.0.1:{port}/boom")
        assert failed.status_code == 500
    # Quart logs it and answers 500 itself (outside debug and testing): the app returns.
    assert events.endings == ["returned"]


async def test_the_response_timeout_ends_a_stuck_answer(
    connection_class: type[ASGIHTTPConnection],
) -> None:
    events = Events()
    async with served(make_app(events, connection_class)) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /slow-body HTTP/1.1\r\nHost: x\r\n\r\n")
        # RESPONSE_TIMEOUT (0.5 s) ends the answer after its first chunk, and Hypercorn
        # closes the connection without the last chunk, as with Quart's own handling: the
        # client sees the answer cut short, not a connection held open for ever.
        received = await asyncio.wait_for(reader.read(), 5)
        assert received.startswith(b"HTTP/1.1 200 ")
        assert received.endswith(b"\r\n\r\n6\r\nfirst\n\r\n")
        writer.close()
        await writer.wait_closed()
