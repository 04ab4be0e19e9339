"""Lists give way to sends: the server's lists take turns, and while it accepts mail they
take at most half of its time.

A list is the costliest read (up to 500 records decoded and encoded again on the event
loop), and clients listing in a loop must not take the process from the accepts (issue
17: reads never delay accepts). :meth:`ListPacer.turn` lets one list run at a time; while
a send was answered in the last ``busy_window`` seconds, the next list starts only once
as much time has passed since the previous one ended as that one took. Without sends,
lists run back to back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

BUSY_WINDOW = 1.0  # seconds after an answered send during which lists pace themselves


class ListPacer:
    def __init__(self, busy_window: float = BUSY_WINDOW) -> None:
        self.busy_window = busy_window
        self._turn = asyncio.Lock()
        self._last_send = float("-inf")
        self._next_start = float("-inf")
        self.paused = 0.0  # seconds lists waited for sends, in all (for tests and metrics)

    def sent(self) -> None:
        """A send was answered now."""
        self._last_send = time.monotonic()

    @asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        async with self._turn:
            now = time.monotonic()
            if now - self._last_send < self.busy_window and self._next_start > now:
                pause = self._next_start - now
                self.paused += pause
                await asyncio.sleep(pause)
            started = time.monotonic()
            try:
                yield
            finally:
                ended = time.monotonic()
                self._next_start = ended + (ended - started)
