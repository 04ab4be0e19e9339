"""Is the database this process opened still the one at ``DATABASE_URL``, and usable?

SQLite: a file removed or replaced while a process has it open (``rm var/mailroom.db``)
stays readable and writable through the descriptors the process holds, but nobody else
will ever see what is written there. :class:`FileWatch` remembers the identity
(``st_dev``, ``st_ino``) of the database file and of its ``-wal`` and ``-shm`` as first
seen, and compares them with what is at those paths now: every second, and before a write
transaction commits. Once they differ the loss is final for this process: every later
write is refused, and a copy of what the process still sees is written to
``<db>.rescued-<UTC time>-<pid>`` so that no record or idempotency key is lost with it.

PostgreSQL: :class:`Probe` answers ``SELECT 1`` within a short timeout, at most once a
second (a dropped or unreachable database makes readiness fail until it is back).

Every stat runs in a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import threading
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from errors import MailroomError

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

log = logging.getLogger(__name__)

INTERVAL = 1.0  # seconds between checks; also how long a readiness answer is reused
SUFFIXES = ("", "-wal", "-shm")


class FileId(NamedTuple):
    dev: int
    ino: int


def _file_id(path: str) -> FileId | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return FileId(st.st_dev, st.st_ino)


def preflight(path: Path) -> str | None:
    """Why a process must not open the database at ``path`` now (blocking; in a thread).

    A missing database file with its ``-wal`` or ``-shm`` still there was removed while a
    process had it open (or before a crash): SQLite would pair a new file with the old
    journal (the "disk I/O error" of a restarted process). A rescue copy next to it means
    the file was lost while in use: opening a new empty (or another) database would
    silently drop the records and idempotency keys that the copy holds, so an operator
    decides first.
    """
    rescued = sorted(str(p) for p in path.parent.glob(f"{path.name}.rescued-*"))
    missing = not path.exists()
    leftovers = [str(p) for p in (Path(f"{path}-wal"), Path(f"{path}-shm")) if p.exists()]
    if missing and leftovers:
        return (
            f"database file {path} is missing but {' and '.join(leftovers)} "
            f"{'exist' if len(leftovers) > 1 else 'exists'}: the file was removed while a "
            "Mailroom process still had it open (or before a crash). Stop every process "
            "that uses it and delete those files (they belong to the removed file); then "
            f"move a rescue copy ({path}.rescued-*) or a backup to {path}, or start with "
            "an empty database"
        )
    if rescued:
        return (
            f"{rescued[-1]} holds the records and idempotency keys rescued when {path} was "
            f"removed or replaced while in use. To keep them: stop every process, delete "
            f"{path}-wal and {path}-shm, move that copy to {path} and the other copies "
            "away. To go on without them: move every rescue copy away"
        )
    return None


class SqliteFiles:
    """The database file, its ``-wal`` and ``-shm``, by identity as first seen."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # Strings made once: the store's writer checks before every commit.
        self._paths = tuple((suffix, f"{path}{suffix}") for suffix in SUFFIXES)
        self._seen: dict[str, FileId] = {}
        self._lock = threading.Lock()  # checks run in worker threads

    def problem(self) -> str | None:
        """What changed at the paths since first seen (blocking; call in a thread)."""
        with self._lock:
            for suffix, path in self._paths:
                now = _file_id(path)
                seen = self._seen.get(suffix)
                if seen is None:
                    # -wal and -shm appear with the first transaction; the file at once.
                    if now is not None:
                        self._seen[suffix] = now
                    elif not suffix:
                        return f"database file {path} was removed"
                elif now is None:
                    return f"database file {path} was removed"
                elif now != seen:
                    return f"database file {path} was replaced by another file"
        return None


class FileWatch:
    """Watches the SQLite database file at ``path`` (see the module docstring).

    When the loss is found, a copy of the database as this process still sees it is
    written, once, in a task of its own: ``copy_to(target)``, which reads through a
    connection to the removed file (the store's ``VACUUM INTO``).
    """

    def __init__(self, path: Path, copy_to: Callable[[Path], Awaitable[None]]) -> None:
        self.files = SqliteFiles(path)
        self.lost: str | None = None
        self._copy_to = copy_to
        self._lost_event = asyncio.Event()
        self._checked_at = -INTERVAL
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Take the identities now (after the database was opened) and check every second."""
        await self.verify()
        self._spawn(self._every_second(), "database-file-watch")

    async def verify(self) -> str | None:
        """Stat now; the reason the database is unusable, or None. Found once, final."""
        if self.lost is not None:
            return self.lost
        try:
            problem = await asyncio.to_thread(self.files.problem)
        except OSError as exc:  # e.g. the directory became unreadable: not final
            return f"cannot check database file {self.files.path}: {exc}"
        self._checked_at = asyncio.get_running_loop().time()
        if problem is not None and self.lost is None:
            self._declare(problem)
        return problem

    async def check(self) -> str | None:
        """Like :meth:`verify`, but reuses a check made less than INTERVAL ago (readiness)."""
        if self.lost is not None:
            return self.lost
        if asyncio.get_running_loop().time() - self._checked_at < INTERVAL:
            return None
        return await self.verify()

    async def wait_lost(self) -> str:
        await self._lost_event.wait()
        assert self.lost is not None
        return self.lost

    async def close(self) -> None:
        """Stop checking; let a rescue copy in progress finish first."""
        for task in list(self._tasks):
            if task.get_name() == "database-file-watch":
                task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _declare(self, problem: str) -> None:
        self.lost = problem
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        target = Path(f"{self.files.path}.rescued-{stamp}-{os.getpid()}")
        log.error(
            "%s while this process had it open: writes are refused from now on "
            "(restart every Mailroom process after putting the database back); "
            "copying what this process still sees to %s",
            problem,
            target,
        )
        self._lost_event.set()
        self._spawn(self._rescue_to(target), "database-rescue")

    async def _rescue_to(self, target: Path) -> None:
        try:
            await self._copy_to(target)
        except (sqlite3.Error, SQLAlchemyError, OSError, MailroomError) as exc:  # refusal stands
            log.error("could not write the rescue copy %s: %s", target, exc)
            return
        log.error(
            "rescue copy of the removed database written to %s: stop every Mailroom "
            "process, move it to %s, then start them again",
            target,
            self.files.path,
        )

    async def _every_second(self) -> None:
        while self.lost is None:
            await asyncio.sleep(INTERVAL)
            await self.verify()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class Probe:
    """``SELECT 1`` within ``timeout``, run at most once per INTERVAL; callers arriving
    meanwhile share the last answer or the check in progress."""

    def __init__(self, engine: AsyncEngine, timeout: float) -> None:
        self._engine = engine
        self._timeout = timeout
        self._answer: str | None = None
        self._at = -INTERVAL
        self._running: asyncio.Future[str | None] | None = None

    async def problem(self) -> str | None:
        loop = asyncio.get_running_loop()
        if loop.time() - self._at < INTERVAL:
            return self._answer
        if self._running is None:
            self._running = asyncio.ensure_future(self._probe())
        running = self._running
        try:
            return await asyncio.shield(running)
        finally:
            if running.done() and self._running is running:
                self._running = None

    async def _probe(self) -> str | None:
        try:
            async with asyncio.timeout(self._timeout):
                async with self._engine.connect() as conn:
                    await conn.execute(text("SELECT 1"))
        except TimeoutError:
            answer: str | None = f"the database did not answer within {self._timeout:g}s"
        except (SQLAlchemyError, OSError) as exc:
            lines = str(getattr(exc, "orig", None) or exc).splitlines()
            answer = f"the database is unusable: {type(exc).__name__}: {lines[0] if lines else ''}"
        else:
            answer = None
        self._answer, self._at = answer, asyncio.get_running_loop().time()
        return answer
