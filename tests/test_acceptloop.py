"""acceptloop.Loop: a listening socket takes in every waiting connection at once, serves
them like uvloop's own server, stops at close, and survives running out of descriptors."""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import uvloop
from hypercorn.config import Config as HypercornConfig
from hypercorn.typing import (
    ASGIReceiveCallable,
    ASGISendCallable,
    HTTPResponseBodyEvent,
    HTTPResponseStartEvent,
    Scope,
)

import acceptloop
import graceful
from tests.support import free_port
from tests.test_faults import wait_until

ROOT = Path(__file__).resolve().parent.parent
WAITING = 20  # connections made before the server takes any


def listening() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


def accept_queue(sock: socket.socket) -> int:
    """Connections waiting for accept() on the listening ``sock`` (Linux: TCP_INFO's
    tcpi_unacked on a listening socket)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    return int(struct.unpack_from("I", info, 24)[0])


def turns_taken(loop_factory: Callable[[], asyncio.AbstractEventLoop]) -> list[int]:
    """Make WAITING connections to a listening socket, then serve it on a loop from
    ``loop_factory``: the turn of the loop in which each connection reached the server."""
    sock = listening()
    clients = [socket.create_connection(sock.getsockname(), timeout=5) for _ in range(WAITING)]
    deadline = time.monotonic() + 10
    while accept_queue(sock) < WAITING:  # every handshake done: all of them wait together
        assert time.monotonic() < deadline, accept_queue(sock)
        time.sleep(0.01)

    async def serve() -> list[int]:
        loop = asyncio.get_running_loop()
        turn = 0
        seen: list[int] = []
        all_in = asyncio.Event()

        def tick() -> None:
            nonlocal turn
            turn += 1
            loop.call_soon(tick)

        async def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            seen.append(turn)
            if len(seen) == WAITING:
                all_in.set()
            writer.close()

        loop.call_soon(tick)
        server = await asyncio.start_server(connected, sock=sock)
        try:
            async with asyncio.timeout(10):
                await all_in.wait()
        finally:
            server.close()
            await server.wait_closed()
        return seen

    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            return runner.run(serve())
    finally:
        for client in clients:
            client.close()


def test_every_waiting_connection_is_taken_in_one_wakeup() -> None:
    seen = turns_taken(acceptloop.Loop)
    assert len(seen) == WAITING
    assert max(seen) - min(seen) <= 1, seen  # accepted together, set up in the next turn


def test_uvloop_alone_takes_one_connection_per_turn() -> None:
    """Why acceptloop exists (libuv 1.45+): if this fails, uvloop accepts greedily again
    and acceptloop.Loop may no longer be needed."""
    seen = turns_taken(uvloop.new_event_loop)
    assert len(seen) == WAITING
    assert len(set(seen)) >= WAITING - 2, seen


def test_serves_until_closed_and_leaves_other_servers_to_uvloop() -> None:
    async def scenario() -> None:
        taken = asyncio.Queue[None]()

        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            taken.put_nowait(None)
            writer.write(await reader.readline())
            await writer.drain()
            writer.close()

        async def ask(port: int) -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"ping\n")
            answer = await reader.readline()
            writer.close()
            return answer

        sock = listening()
        port = sock.getsockname()[1]
        server = await asyncio.start_server(echo, sock=sock)
        assert isinstance(server, acceptloop.GreedyServer)
        assert server.is_serving() and server.sockets == (sock,)
        async with asyncio.timeout(10):
            assert await asyncio.gather(*(ask(port) for _ in range(50))) == [b"ping\n"] * 50
            for _ in range(50):
                taken.get_nowait()
            # A connection taken before the close is still served after it.
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            await taken.get()
            server.close()
            await server.wait_closed()
            assert not server.is_serving()
            assert list(server.sockets) == []
            assert sock.fileno() == -1  # the listening socket is closed
            writer.write(b"late\n")
            assert await reader.readline() == b"late\n"
            writer.close()
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection("127.0.0.1", port)

        # Without a socket of its own (host and port), uvloop's server as it is.
        plain = await asyncio.start_server(echo, "127.0.0.1", 0)
        assert not isinstance(plain, acceptloop.GreedyServer)
        plain.close()
        await plain.wait_closed()

    with asyncio.Runner(loop_factory=acceptloop.Loop) as runner:
        runner.run(scenario())


# Serves with a descriptor limit just above what it has open: a few connections at once
# use up the free descriptors, the next ones wait in the kernel's queue.
OUT_OF_DESCRIPTORS = textwrap.dedent(
    """
    import asyncio, logging, os, resource, socket, sys
    import uvloop
    sys.path.insert(0, sys.argv[1])
    import acceptloop
    acceptloop.ACCEPT_RETRY_DELAY = 0.3
    logging.basicConfig(
        level=logging.INFO,
        format="%(levelname)s %(relativeCreated)d %(message)s",
        stream=sys.stdout,
    )

    async def main():
        served = 0
        async def answer(reader, writer):
            nonlocal served
            served += 1
            await reader.readline()
            writer.write(b"ok\\n")
            await writer.drain()
            writer.close()
            await writer.wait_closed()
            logging.info("served %d", served)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        server = await asyncio.start_server(answer, sock=sock)
        highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 3, hard))
        print("port", sock.getsockname()[1], flush=True)
        await asyncio.sleep(30)

    uvloop.run(main(), loop_factory=acceptloop.Loop)
    """
)


CLIENTS = 8


def test_out_of_descriptors_pauses_accepting_then_takes_the_rest() -> None:
    with subprocess.Popen(
        [sys.executable, "-c", OUT_OF_DESCRIPTORS, str(ROOT)],
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        try:
            first = proc.stdout.readline().split()
            assert first[0] == "port", first
            port = int(first[1])
            clients = [
                socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(CLIENTS)
            ]
            for client in clients:
                client.sendall(b"hi\n")
            # Each answer frees a descriptor; the server goes on accepting after its pause.
            for client in clients:
                with client, client.makefile("rb") as answer:
                    assert answer.readline() == b"ok\n"
            lines: list[str] = []
            while sum(" served " in line for line in lines) < CLIENTS:
                line = proc.stdout.readline()
                assert line, lines
                lines.append(line.strip())
            refused = [line for line in lines if "cannot accept connections" in line]
            assert refused and refused[0].startswith("ERROR"), lines
            assert "trying again in 0.3s" in refused[0]
            # Paused, not retried at every turn: most connections were served only after it.
            paused_at = int(refused[0].split()[1])
            later = [
                line
                for line in lines
                if " served " in line and int(line.split()[1]) >= paused_at + 250
            ]
            assert len(later) >= CLIENTS - 4, lines
        finally:
            proc.kill()
            proc.wait(10)


def test_takes_no_connection_while_the_loop_is_busy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(acceptloop, "BUSY_PAUSE_AT_MOST", 60.0)  # no valve in this test

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, acceptloop.Loop)
        taken = asyncio.Queue[None]()

        async def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            taken.put_nowait(None)  # a plain protocol: it never counts as busy itself
            writer.close()

        sock = listening()
        server = await asyncio.start_server(connected, sock=sock)
        for _ in range(acceptloop.BUSY_AT_MOST):
            loop.busy.enter()
        clients = [socket.create_connection(sock.getsockname(), timeout=5) for _ in range(5)]
        try:
            async with asyncio.timeout(10):
                await wait_until(lambda: accept_queue(sock) == 5)
                for _ in range(50):  # fifty turns of the loop: none is taken
                    await asyncio.sleep(0)
                assert taken.empty() and accept_queue(sock) == 5
                loop.busy.leave()  # room for one at a time: all five, one after another
                for _ in range(5):
                    await taken.get()
                assert accept_queue(sock) == 0
        finally:
            for client in clients:
                client.close()
            server.close()
            await server.wait_closed()

    with asyncio.Runner(loop_factory=acceptloop.Loop) as runner:
        runner.run(scenario())


def test_a_connection_is_busy_from_a_request_until_its_answer() -> None:
    """graceful's connection counts in the loop's busy count from a request's head to its
    answer: not while it sends nothing, nor once answered and kept alive."""
    answer = asyncio.Event()

    async def app(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if scope["type"] != "http":
            return
        await answer.wait()
        answer.clear()
        start: HTTPResponseStartEvent = {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-length", b"2")],
            "trailers": False,
        }
        await send(start)
        body: HTTPResponseBodyEvent = {
            "type": "http.response.body",
            "body": b"ok",
            "more_body": False,
        }
        await send(body)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, acceptloop.Loop)
        busy = loop.busy
        port = free_port()
        config = HypercornConfig()
        config.bind = [f"127.0.0.1:{port}"]
        config.accesslog = config.errorlog = None
        stop = asyncio.Event()
        served = asyncio.ensure_future(graceful.serve(app, config, stop))

        async def count_is(n: int) -> None:
            await wait_until(lambda: busy.count == n)

        writers: list[asyncio.StreamWriter] = []
        try:
            async with asyncio.timeout(20):
                while True:
                    try:
                        reader, writer = await asyncio.open_connection("127.0.0.1", port)
                        break
                    except ConnectionRefusedError:
                        await asyncio.sleep(0.05)
                writers.append(writer)
                _, silent = await asyncio.open_connection("127.0.0.1", port)
                writers.append(silent)
                silent.write(b"GET / HTTP/1.1\r\n")  # half a head, then nothing
                request = f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
                for _ in range(2):
                    writer.write(request)
                    await count_is(1)  # the silent one does not count
                    answer.set()
                    assert (await reader.readuntil(b"ok")).startswith(b"HTTP/1.1 200")
                    await count_is(0)  # answered, kept alive: idle
                # HTTP/2 does not count (a stream its client resets reports no end).
                _, h2 = await asyncio.open_connection("127.0.0.1", port)
                writers.append(h2)
                h2.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
                await h2.drain()
                writer.write(request)
                await count_is(1)
                writer.close()  # gone before its answer: busy until the app is done
                await asyncio.sleep(0.1)
                assert busy.count == 1
                answer.set()
                await count_is(0)
        finally:
            for each in writers:
                each.close()
            stop.set()
            await asyncio.wait_for(served, 15)

    with asyncio.Runner(loop_factory=acceptloop.Loop) as runner:
        runner.run(scenario())


def test_a_server_paused_for_busy_requests_takes_connections_anyway_after_a_while(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Requests that hold their place (slow uploads, stuck clients) slow the taking in and
    never stop it."""
    monkeypatch.setattr(acceptloop, "BUSY_PAUSE_AT_MOST", 0.3)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, acceptloop.Loop)
        taken = asyncio.Queue[float]()

        async def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            taken.put_nowait(loop.time())
            writer.close()

        sock = listening()
        server = await asyncio.start_server(connected, sock=sock)
        for _ in range(acceptloop.BUSY_AT_MOST):
            loop.busy.enter()  # and none leaves
        started = loop.time()
        clients = [socket.create_connection(sock.getsockname(), timeout=5) for _ in range(3)]
        try:
            async with asyncio.timeout(10):
                times = [await taken.get() for _ in range(3)]
            assert min(times) - started >= 0.25, times  # after the pause, not at once
        finally:
            for client in clients:
                client.close()
            server.close()
            await server.wait_closed()

    with (
        caplog.at_level(logging.WARNING, logger="acceptloop"),
        asyncio.Runner(loop_factory=acceptloop.Loop) as runner,
    ):
        runner.run(scenario())
    assert "64 requests in progress for over 0.3s: taking connections anyway" in caplog.text
