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
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope
from quart import Quart, Response, request
from quart.asgi import ASGIHTTPConnection

from asgihttp import InlineHTTPConnection
from tests.conftest import serving


@pytest.fixture(params=[InlineHTTPConnection, ASGIHTTPConnection], ids=["inline", "quart"])
def connection_class(request: pytest.FixtureRequest) -> type[ASGIHTTPConnection]:
    return request.param  # type: ignore[no-any-return]


class Events:
    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.never = asyncio.Event()
        self.ended = asyncio.Condition()
        self.endings: list[str] = []  # how each HTTP call of the app ended

    async def ended_calls(self, count: int) -> list[str]:
        """How the app's calls ended, once ``count`` have (within 5 s)."""
        async with asyncio.timeout(5), self.ended:
            await self.ended.wait_for(lambda: len(self.endings) >= count)
        return self.endings


def make_app(events: Events, connection_class: type[ASGIHTTPConnection]) -> Quart:
    app = Quart(__name__)
    app.asgi_http_class = connection_class
    app.config["RESPONSE_TIMEOUT"] = 0.5
    inner = app.asgi_app

    async def recording(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if scope["type"] != "http" or scope["path"] == "/ready":  # served()'s own probes
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
            async with events.ended:
                events.ended.notify_all()

    app.asgi_app = recording  # type: ignore[method-assign]

    @app.get("/ready")
    async def ready() -> str:
        return "ok"

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
    """Its port, served by Hypercorn through graceful.serve."""
    async with serving(app, "/ready") as base:
        port = httpx.URL(base).port
        assert port is not None
        yield port


@pytest.fixture
async def app_port(
    connection_class: type[ASGIHTTPConnection],
) -> AsyncIterator[tuple[Events, int]]:
    """The test app with ``connection_class``, served: its events and its port."""
    events = Events()
    async with served(make_app(events, connection_class)) as port:
        yield events, port


async def send_raw(port: int, path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A GET sent on a connection of its own; the connection, to read the answer or hang up."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return reader, writer


async def test_body_streamed_in_chunks_reaches_the_handler(app_port: tuple[Events, int]) -> None:
    events, port = app_port
    body = bytes(range(256)) * 1000

    async def pieces() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 7000):
            yield body[start : start + 7000]
            await asyncio.sleep(0)

    async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
        answer = await client.post(f"http://127.0.0.1:{port}/echo", content=pieces())
        assert answer.status_code == 200
        assert answer.content == body[::-1]
        sized = await client.post(f"http://127.0.0.1:{port}/echo", content=b"abc")
        assert sized.content == b"cba"
    assert await events.ended_calls(2) == ["returned", "returned"]


async def test_a_client_that_hangs_up_cancels_the_handler(app_port: tuple[Events, int]) -> None:
    events, port = app_port
    _, writer = await send_raw(port, "/wait")
    await asyncio.wait_for(events.started.wait(), 5)
    writer.close()
    await writer.wait_closed()
    await asyncio.wait_for(events.cancelled.wait(), 5)
    assert await events.ended_calls(1) == ["returned"]  # ends normally, as Quart's does


async def test_an_error_in_the_handler_is_quarts_500(app_port: tuple[Events, int]) -> None:
    events, port = app_port
    async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
        failed = await client.get(f"http://127.0.0.1:{port}/boom")
        assert failed.status_code == 500
    # Quart logs it and answers 500 itself (outside debug and testing): the app returns.
    assert await events.ended_calls(1) == ["returned"]


async def test_the_response_timeout_ends_a_stuck_answer(app_port: tuple[Events, int]) -> None:
    _, port = app_port
    reader, writer = await send_raw(port, "/slow-body")
    # RESPONSE_TIMEOUT (0.5 s) ends the answer after its first chunk, and Hypercorn closes
    # the connection without the last chunk, as with Quart's own handling: the client
    # sees the answer cut short, not a connection held open for ever.
    received = await asyncio.wait_for(reader.read(), 5)
    assert received.startswith(b"HTTP/1.1 200 ")
    assert received.endswith(b"\r\n\r\n6\r\nfirst\n\r\n")
    writer.close()
    await writer.wait_closed()
