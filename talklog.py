"""The ``?talktome`` log: one line appended per request, never interleaved.

The file is opened once with ``O_APPEND`` and every line is written with a single
``write(2)`` call in a worker thread, so concurrent requests and several server
processes sharing the file never interleave or lose lines, and the event loop never
waits on the disk.
"""

from __future__ import annotations

import asyncio
import os
from datetime import datetime
from pathlib import Path

from errors import ConfigError


class TalkLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def _open(self) -> int:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise ConfigError(
                "TALKTOME_LOG", f"cannot open {self.path} for appending: {exc.strerror}"
            ) from None

    def check(self) -> None:
        """Create the file, or fail with a :class:`ConfigError` (entry points, before serving)."""
        os.close(self._open())

    async def open(self) -> None:
        """Open (and create) the file; a :class:`ConfigError` names the path and variable."""
        if self._fd is None:
            self._fd = await asyncio.to_thread(self._open)

    async def append(self, text: str, now: datetime | None = None) -> str:
        """Append ``<local time> <text>``; return the time stamp written."""
        if self._fd is None:
            raise RuntimeError("TalkLog.open() was not awaited")
        stamp = (now or datetime.now()).strftime("%Y-%m-%d %H:%M:%S")
        data = f"{stamp} {text}\n".encode()
        written = await asyncio.to_thread(os.write, self._fd, data)
        if written != len(data):  # only on a full disk; O_APPEND writes are otherwise whole
            raise OSError(f"short write to {self.path}: {written} of {len(data)} bytes")
        return stamp

    async def tail(self, count: int) -> list[str]:
        """The last ``count`` lines of the file (read from its end, in a worker thread)."""
        return await asyncio.to_thread(_tail, self.path, count)

    async def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            await asyncio.to_thread(os.close, fd)


def _tail(path: Path, count: int, block: int = 65536) -> list[str]:
    try:
        with path.open("rb") as handle:
            end = handle.seek(0, os.SEEK_END)
            data = b""
            position = end
            while position > 0 and data.count(b"\n") <= count:
                step = min(block, position)
                position -= step
                handle.seek(position)
                data = handle.read(step) + data
    except FileNotFoundError:
        return []
    lines = data.decode("utf-8", errors="replace").splitlines()
    return lines[-count:]
