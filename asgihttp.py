"""Quart's handling of one HTTP request, in fewer tasks.

Quart (0.19-0.22) runs each request in three tasks besides the server's own: one reads
the request body and waits for the client to go away, one runs the handler, and one
sends the answer (``asyncio.wait_for`` with ``RESPONSE_TIMEOUT`` makes a task of it on
Python 3.11); the first two are raced with ``asyncio.wait`` and the loser is cancelled and
awaited. :class:`InlineHTTPConnection` runs the handler and the answer in the server's
task for the request, under ``asyncio.timeout``, and keeps one task: the reader, which
fills the body as Quart's does and, when the client disconnects, cancels the handler as
Quart's does (and then, as Quart's, the app returns normally). Behaviour is otherwise
Quart's: the same request object, the same exceptions out of the app, the same
timeouts; tests/test_asgihttp.py runs both classes side by side. With a new connection
per request this cut Hypercorn and a one-route Quart app from 0.58 to 0.49 ms of CPU per
request, and 0.23 to 0.21 ms with keep-alive (``ab`` and ``wrk`` on loopback, 10000
requests).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable
from quart.asgi import ASGIHTTPConnection, _handle_exception
from quart.wrappers import Request, Response

if TYPE_CHECKING:
    from quart.typing import ResponseTypes


class InlineHTTPConnection(ASGIHTTPConnection):
    """Set as the app's ``asgi_http_class``."""

    _handling = False  # the handler runs: a disconnect cancels it
    _hung_up = False  # the reader cancelled the handler

    async def __call__(self, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        request = self._create_request_from_scope(send)
        handler = asyncio.current_task()
        reader = asyncio.ensure_future(self._read(request, receive, handler))
        self._handling = True
        try:
            await self.handle_request(request, send)
        except asyncio.CancelledError:
            # Cancelled by the reader alone (the client went away): end normally, as
            # Quart's class does once it has cancelled its handler task.
            if not self._hung_up or handler is None or handler.uncancel() > 0:
                raise
        finally:
            self._handling = False
            reader.cancel()

    async def _read(
        self, request: Request, receive: ASGIReceiveCallable, handler: asyncio.Task[object] | None
    ) -> None:
        await self.handle_messages(request, receive)  # returns at http.disconnect
        if self._handling and handler is not None:
            self._hung_up = True
            handler.cancel()

    async def handle_request(self, request: Request, send: ASGISendCallable) -> None:
        try:
            response: ResponseTypes = await self.app.handle_request(request)
        except Exception as error:  # noqa: BLE001 - Quart's own handling: re-raised unless debug
            response = await _handle_exception(self.app, error)
        if isinstance(response, Response) and response.timeout != Ellipsis:
            timeout: float | None = response.timeout
        else:
            timeout = self.app.config["RESPONSE_TIMEOUT"]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._send_response(send, response)
