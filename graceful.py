"""Serve with Hypercorn and stop without dropping an answer.

How Hypercorn (0.17, 0.18; asyncio) stops once its shutdown trigger returns: it sets
``terminated``, closes the listening sockets, waits up to ``graceful_timeout`` for the
open connections, then runs the app's ``after_serving``. A connection with a request in
progress closes after the answer. An idle keep-alive connection has an idle task waiting
on ``terminated`` (or the keep-alive timeout), which then closes it, concurrently with the
task that reads the connection. When a request arrives at that moment, the reader may
already hold its bytes (on Python 3.11 ``asyncio.wait_for`` runs the read in a task of its
own, so they wait in a finished task), and it parses them after the close: the request
runs to the end, the mail is queued, and the answer goes into a closed socket. The client
sees "Server disconnected without response". The same race exists at every keep-alive
timeout.

:func:`serve` makes the close and the start of a request exclude each other. Both run
without a pause in between, so one of them comes first:

* the idle close happens only while no request has started on the connection; a request
  that started is answered, then its connection closes (at shutdown) or stays open (at
  the keep-alive timeout);
* once an idle connection is closed, nothing more read from it is parsed: a request that
  was still on its way was never taken (the client sees the connection closed before an
  answer and may retry; with ``Idempotency-Key`` for a POST, to be sure).

Once stopping, every answer also says ``Connection: close``, so no client sends another
request on a connection that is about to close.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from ssl import SSLError
from typing import Any

import hypercorn.asyncio.run
from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.asyncio.tcp_server import MAX_RECV, TCPServer
from hypercorn.config import Config
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, ASGISendEvent, Scope

from acceptloop import Busy

log = logging.getLogger(__name__)

ASGIApp = Callable[[Scope, ASGIReceiveCallable, ASGISendCallable], Awaitable[None]]


# Answers up to this size are gathered into one write (head and body in one segment).
_COALESCE_BYTES = 64 * 1024


class _TCPServer(TCPServer):
    """Hypercorn's connection, whose idle close and next request cannot overlap.

    Two savings besides: the bytes of an answer (its head, its body) go out in one write
    at the end of the event loop's turn instead of one write and drain each; and the
    keep-alive wait is a timer rather than a task started and cancelled per request.
    """

    _busy: Busy | None = None  # the loop's busy count (acceptloop), while this one is in it
    _request_started = False  # a request was parsed and has not been answered yet
    _closed_idle = False  # the idle close happened: read nothing more
    _out: list[bytes] | None = None  # bytes to write at the end of this turn
    _out_size = 0
    _idle_timer: asyncio.TimerHandle | None = None
    _closing = False  # _close began: no more idle timers

    def _enter_busy(self) -> None:
        # Busy from a request's head to its answer (acceptloop.Busy), on HTTP/1.1 only
        # (HTTP/2 reports no end for a stream its client resets). Not from the
        # connection's start: connections that send nothing must not count; the idle
        # timer closes them.
        busy = getattr(self.loop, "busy", None)
        if self._busy is None and isinstance(busy, Busy) and self._speaks_h11():
            busy.enter()
            self._busy = busy

    def _speaks_h11(self) -> bool:
        protocol = getattr(self, "protocol", None)  # none once run has ended
        return isinstance(getattr(protocol, "protocol", None), H11Protocol)

    def _leave_busy(self) -> None:
        busy, self._busy = self._busy, None
        if busy is not None:
            busy.leave()

    async def run(self) -> None:
        try:
            await super().run()
        finally:
            # Two cycles through which a connection's ~35 objects (streams, transport,
            # h11 state, task groups) waited for the collector, hundreds of connections'
            # worth under load. The protocol holds this connection's protocol_send, a
            # bound method; nothing uses the protocol once run has ended (its task group
            # is done; a shielded idle close took it as it began). And a connection lost
            # with an error (a reset) keeps the error, whose traceback holds the frames
            # that hold this connection.
            self.__dict__.pop("protocol", None)
            if (error := self.reader.exception()) is not None:
                error.__traceback__ = None

    async def protocol_send(self, event: Event) -> None:
        if isinstance(event, RawData):
            if self._out is None:
                self._out = []
                self.loop.call_soon(self._flush_out)
            self._out.append(event.data)
            self._out_size += len(event.data)
            if self._out_size > _COALESCE_BYTES:  # a big answer: write now, with backpressure
                async with self.send_lock:
                    self._flush_out()
                    try:
                        await self.writer.drain()
                    except (ConnectionError, RuntimeError):
                        await self.protocol.handle(Closed())
            return
        if isinstance(event, Updated):
            # Set before anything awaits: the protocol reports a request (idle=False)
            # as soon as it has parsed its head, before the app runs.
            self._request_started = not event.idle
            self._stop_idle_timer()
            if event.idle:
                self._leave_busy()
                if self.context.terminated.is_set() and not self._closing:
                    self._task_group.spawn(self._initiate_server_close)
                else:
                    self._start_idle_timer()
            else:
                self._enter_busy()
            return
        if isinstance(event, Closed):
            self._flush_out()
        await super().protocol_send(event)

    def _flush_out(self) -> None:
        out, self._out, self._out_size = self._out, None, 0
        if not out or self.writer.is_closing():
            return
        try:
            self.writer.write(b"".join(out))
        except (ConnectionError, RuntimeError) as exc:
            # The reader sees the connection end and closes the protocol.
            log.debug("connection lost while answering: %s", exc)

    async def _idle_timeout(self) -> None:
        # Hypercorn starts this once, as the connection opens (and at every idle moment,
        # which protocol_send above takes over): the first keep-alive wait, and the close
        # of an idle connection at shutdown.
        self._start_idle_timer()
        await self.context.terminated.wait()
        if not self._request_started:
            await asyncio.shield(self._initiate_server_close())

    def _start_idle_timer(self) -> None:
        if self._closing:
            return  # the protocol may report idle once more as the connection ends
        self._idle_timer = self.loop.call_later(self.config.keep_alive_timeout, self._idle_expired)

    def _stop_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _idle_expired(self) -> None:
        self._idle_timer = None
        if self._closing:
            return
        try:
            self._task_group.spawn(self._initiate_server_close)
        except RuntimeError as exc:  # the connection's task group already ended
            log.debug("idle close after the connection ended: %s", exc)

    async def _close(self) -> None:
        self._leave_busy()
        self._closing = True
        self._flush_out()
        self._stop_idle_timer()
        await super()._close()

    async def _initiate_server_close(self) -> None:
        if self._request_started:
            return  # answered first; then closed after the answer (or kept alive)
        self._closed_idle = True
        await super()._initiate_server_close()

    async def _read_data(self) -> None:
        # Hypercorn's loop, with the one check: bytes read before an idle close but
        # handled after it are dropped, never parsed into a request.
        while not self.reader.at_eof():
            try:
                data = await asyncio.wait_for(self.reader.read(MAX_RECV), self.config.read_timeout)
            except (TimeoutError, ConnectionError, OSError, SSLError):
                break
            if self._closed_idle:
                break
            await self.protocol.handle(RawData(data))
            if self._busy is not None and not self._speaks_h11():
                self._leave_busy()  # upgraded to HTTP/2 (h2c, or its preface)
        await self.protocol.handle(Closed())
        self._closing = True  # nothing more comes: no idle close to wait for
        self._stop_idle_timer()
        # The idle task waits for the server's shutdown: stopped now, or this connection's
        # tasks (and it) would live until then after its client closed it while idle.
        await self.idle_task.stop()


def _install() -> None:
    # worker_serve looks the class up in its module for every new connection.
    hypercorn.asyncio.run.TCPServer = _TCPServer  # type: ignore[attr-defined]


def close_when(stopping: asyncio.Event, app: ASGIApp) -> ASGIApp:
    """``app``, whose HTTP answers say ``Connection: close`` once ``stopping`` is set."""

    async def wrapped(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return

        async def send_closing(message: ASGISendEvent) -> None:
            if message["type"] == "http.response.start" and stopping.is_set():
                headers: list[Any] = [
                    (name, value)
                    for name, value in message.get("headers", [])
                    if name.lower() != b"connection"
                ]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        await app(scope, receive, send_closing)

    return wrapped


async def serve(app: ASGIApp, config: Config, stopping: asyncio.Event) -> None:
    """Serve ``app`` until ``stopping`` is set; then stop taking connections, answer every
    request already read, close idle connections, and run the app's shutdown."""
    _install()
    await hypercorn_serve(
        close_when(stopping, app), config, shutdown_trigger=stopping.wait, mode="asgi"
    )
