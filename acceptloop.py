"""The server's event loop: uvloop's, whose listening sockets take in every connection
waiting when they become readable, not one per turn of the loop.

Why: libuv, under uvloop, accepts one connection each time a listening socket polls
readable and leaves the next for the next turn of the loop (libuv 1.45 and later, pull
request 3696: "don't accept() connections in a loop"). Each turn of the server's loop
also runs the requests already in, so with a connection per request the server took in
about one connection per turn, however many were waiting: with 64 clients (``ab -c 64``)
20 to 50 connections sat in the kernel's accept queue (``ss -ltn``) at any time, about
40 ms each, while the loop still had idle moments between RabbitMQ's confirms and the
database's commits. Python's own selector loop accepts up to ``backlog`` connections
per wakeup; :class:`Loop` does the same (at most :data:`ACCEPTS_PER_WAKEUP`) for the
plain TCP and Unix sockets Hypercorn listens on (``create_server(sock=...)``), and
leaves everything else (TLS, host and port) to uvloop. Measured (one server and one
worker, SQLite, 64 clients, a connection per request; this 2-core machine): 755-794 ->
1143-1169 requests/s and p99 135-144 -> 87-89 ms with ``ab``; the bench's own client
712-841 -> 933-1053 mails/s, p99 122-150 -> 87-113 ms.

Each connection in the process holds 50-100 KB of RSS at the peak until it is answered,
so taking every waiting one is bounded by :class:`Busy`: while :data:`BUSY_AT_MOST` of
the loop's connections are busy (a request to read or to answer; graceful.py says when a
request is in progress), the servers stop taking more, and the others wait in the
kernel's queue.
``ab -c 128``: the server's peak RSS 97 MB with no bound, 91 MB with it, at 1347 and 1338
requests/s (a bound on *open* connections instead, which counts those answered and not
yet closed, cut 64 clients back to 752 requests/s).

Each accepted connection is set up by ``loop.connect_accepted_socket`` in a task of its
own, as asyncio's loop does; a failure there is logged (uvloop closes the socket), the
server goes on. When accept() fails (out of descriptors or memory), the server stops
accepting for :data:`ACCEPT_RETRY_DELAY` seconds (asyncio's way: Linux would go on
reporting the socket readable) and says so in the log.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import Any

import uvloop

log = logging.getLogger(__name__)

# Accepted at most per wakeup of a listening socket: above what one server takes in per
# turn under load (a few), and a bound on how many a burst brings in before the requests
# already in get their turn. Servers sharing one socket (launcher.py --servers) are all
# woken and the first takes up to this many: they share less evenly than one at a time.
ACCEPTS_PER_WAKEUP = 16
ACCEPT_RETRY_DELAY = 1.0  # seconds without accepting after running out of descriptors
# Busy connections (see Busy) at which a loop's servers stop taking more in: the others
# wait in the kernel's queue, as they did one turn at a time under libuv, and cost the
# process no memory there. Each connection held costs 50-100 KB of RSS at the peak until it
# is answered; one server is busy all the time with 64 requests in flight (64 clients,
# a new connection per request each, ran as fast with the bound as without: measured).
BUSY_AT_MOST = 64
# Seconds a server stays paused for BUSY_AT_MOST before it takes one wakeup's worth of
# connections anyway: requests that hold their place for long (a slow upload, a stuck
# client) slow the taking in, and never stop it.
BUSY_PAUSE_AT_MOST = 0.1

ProtocolFactory = Callable[[], asyncio.BaseProtocol]


class Busy:
    """How many connections of one event loop are busy: a request read and not answered
    yet. graceful.py's connection says when one enters (a request's head parsed) and
    leaves (answered, or closed); the loop's servers take no connection while
    :data:`BUSY_AT_MOST` are busy, counting those they took that are not set up yet, and
    start again as soon as fewer are, or after BUSY_PAUSE_AT_MOST anyway. A connection
    that sends nothing never counts (graceful closes it after the keep-alive timeout), nor
    does HTTP/2 (whose streams do not all report their end), and requests that hold their
    place for long only slow the taking in (BUSY_PAUSE_AT_MOST)."""

    def __init__(self) -> None:
        self.count = 0
        self._waiting: list[Callable[[], None]] = []

    def room(self) -> int:
        return BUSY_AT_MOST - self.count

    def enter(self) -> None:
        self.count += 1

    def leave(self) -> None:
        self.count -= 1
        if self._waiting and self.room() > 0:
            waiting, self._waiting = self._waiting, []
            for resume in waiting:
                resume()

    def when_room(self, resume: Callable[[], None]) -> None:
        """Call ``resume`` once a connection leaves and there is room."""
        if resume not in self._waiting:
            self._waiting.append(resume)

    def forget(self, resume: Callable[[], None]) -> None:
        if resume in self._waiting:
            self._waiting.remove(resume)


class Loop(uvloop.Loop):
    """uvloop's event loop; a server on a listening socket of its own accepts greedily,
    while fewer than BUSY_AT_MOST of the loop's connections are busy (:attr:`busy`)."""

    def __init__(self) -> None:
        super().__init__()
        self.busy = Busy()

    async def create_server(  # type: ignore[override]
        self,
        protocol_factory: ProtocolFactory,
        host: Any = None,
        port: Any = None,
        *,
        sock: socket.socket | None = None,
        backlog: int = 100,
        ssl: Any = None,
        start_serving: bool = True,
        **kwargs: Any,
    ) -> asyncio.AbstractServer:
        if (
            sock is None
            or host is not None
            or port is not None
            or ssl is not None
            or kwargs
            or not start_serving
            or sock.type != socket.SOCK_STREAM
            or sock.family not in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX)
        ):
            server: asyncio.AbstractServer = await super().create_server(
                protocol_factory,
                host,
                port,
                sock=sock,
                backlog=backlog,
                ssl=ssl,
                start_serving=start_serving,
                **kwargs,
            )
            return server
        return GreedyServer(self, sock, protocol_factory, backlog, self.busy)


class GreedyServer(asyncio.AbstractServer):
    """Serves ``protocol_factory`` on the listening ``sock`` (which it closes with
    :meth:`close`): each time ``sock`` is readable, it accepts what is waiting, at most
    :data:`ACCEPTS_PER_WAKEUP`, and no more than ``busy`` has room for (counting the
    connections it took that are not set up yet); with no room it stops listening until
    a busy connection leaves."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        protocol_factory: ProtocolFactory,
        backlog: int,
        busy: Busy,
    ) -> None:
        self._loop = loop
        self._busy = busy
        self._listening = False
        self._valve: asyncio.TimerHandle | None = None  # ends a pause for BUSY_AT_MOST
        self._warned_at = -60.0
        self._sock: socket.socket | None = sock
        self._factory = protocol_factory
        self._setups: set[asyncio.Task[Any]] = set()
        self._retry: asyncio.TimerHandle | None = None
        self._closed = loop.create_future()
        sock.setblocking(False)
        sock.listen(backlog)
        self._listen()

    def _listen(self) -> None:
        self._close_valve()
        if self._sock is not None and self._retry is None and not self._listening:
            self._loop.add_reader(self._sock.fileno(), self._accept)
            self._listening = True

    def _close_valve(self) -> None:
        if self._valve is not None:
            self._valve.cancel()
            self._valve = None

    def _stop_listening(self) -> None:
        if self._sock is not None and self._listening:
            self._loop.remove_reader(self._sock.fileno())
            self._listening = False

    def _accept(self, anyway: bool = False) -> None:
        sock = self._sock
        if sock is None:
            return
        for _ in range(ACCEPTS_PER_WAKEUP):
            if not anyway and self._room() <= 0:
                self._pause()
                return
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return  # nothing more waiting
            except ConnectionAbortedError:
                continue  # that client gave up before it was taken
            except OSError as exc:
                # Out of descriptors or memory, mostly: Linux goes on reporting the
                # socket readable, so stop listening to it for a while.
                log.error(
                    "cannot accept connections on %s: %s; trying again in %gs",
                    _name(sock),
                    exc.strerror or exc,
                    ACCEPT_RETRY_DELAY,
                )
                self._stop_listening()
                self._retry = self._loop.call_later(ACCEPT_RETRY_DELAY, self._resume)
                return
            conn.setblocking(False)
            setup = self._loop.create_task(self._loop.connect_accepted_socket(self._factory, conn))
            self._setups.add(setup)
            setup.add_done_callback(self._set_up)

    def _pause(self) -> None:
        """No room: stop listening (level-triggered, the socket would wake the loop every
        turn) until a busy connection leaves, or BUSY_PAUSE_AT_MOST has passed."""
        self._stop_listening()
        self._busy.when_room(self._listen)
        if self._valve is None:
            self._valve = self._loop.call_later(BUSY_PAUSE_AT_MOST, self._accept_anyway)

    def _accept_anyway(self) -> None:
        self._valve = None
        if self._sock is None or self._listening or self._retry is not None:
            return
        now = self._loop.time()
        if now - self._warned_at >= 60:
            self._warned_at = now
            log.warning(
                "%d requests in progress for over %gs: taking connections anyway",
                self._busy.count,
                BUSY_PAUSE_AT_MOST,
            )
        self._accept(anyway=True)
        if self._sock is not None and not self._listening and self._retry is None:
            if self._room() > 0:
                self._listen()
            else:
                self._pause()

    def _set_up(self, setup: asyncio.Task[Any]) -> None:
        # uvloop's transport owns the socket once made, and closes it when this fails.
        self._setups.discard(setup)
        if self._retry is None and not self._listening and self._room() > 0:
            self._busy.forget(self._listen)  # a setup that failed never becomes busy
            self._listen()
        if not setup.cancelled() and (exc := setup.exception()) is not None:
            log.error("could not set up an accepted connection: %s", exc, exc_info=exc)

    def _room(self) -> int:
        """How many more connections the busy count has room for, counting those taken
        and not set up yet."""
        return self._busy.room() - len(self._setups)

    def _resume(self) -> None:
        self._retry = None
        self._listen()

    def close(self) -> None:
        """Stop accepting and close the listening socket; connections taken stay open."""
        if self._sock is None:
            return
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        self._busy.forget(self._listen)
        self._close_valve()
        self._stop_listening()
        sock, self._sock = self._sock, None
        sock.close()
        self._closed.set_result(None)

    async def wait_closed(self) -> None:
        """Once closed (the connections it took are the caller's to wait for, as with
        asyncio's own server on Python 3.11)."""
        await asyncio.shield(self._closed)

    def is_serving(self) -> bool:
        return self._sock is not None

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return () if self._sock is None else (self._sock,)

    async def start_serving(self) -> None:
        """It serves from the start."""

    async def serve_forever(self) -> None:
        await self.wait_closed()


def _name(sock: socket.socket) -> str:
    try:
        return str(sock.getsockname())
    except OSError:
        return repr(sock)
