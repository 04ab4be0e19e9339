"""Message records and idempotency keys, in SQLite (default) or PostgreSQL.

One code path for both through SQLAlchemy's async Core: ``sqlite+aiosqlite`` (WAL, so the
server and several workers on one host share the file safely) or ``postgresql+asyncpg``
(workers on several hosts). The schema is created or upgraded when a process opens it.

A record's ``status`` moves ``queued -> sending -> (retrying -> sending)* -> sent | failed``
and every transition is appended to its ``history`` with a UTC time stamp.

Who may send, and which copy counts (see the README's delivery guarantees):

* **Final states stay final.** An attempt's outcome is written only while the record is
  still ``sending`` under that very attempt (owner and attempt number: a compare-and-set).
  A late outcome of an attempt that lost its claim goes to the history, nothing else.
* **One attempt at a time.** :meth:`Store.claim` makes the caller the owner of the next
  attempt, with a lease (``ATTEMPT_LEASE``) that the owner renews while it sends. Another
  delivery of the message finds the lease held and waits; a lease whose owner died (it
  expired, or its process is gone on this host) is taken over.
* **Only the newest copy is sent.** Every copy of a message in RabbitMQ carries its
  number (``x-mailroom-copy``: 0 for the accepted message, +1 for each retry copy or
  operator re-queue); the record keeps the newest number it has seen, and an older copy
  (one whose attempt handed over to a retry copy, but whose ack was lost) is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    bindparam,
    delete,
    event,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from config import Settings
from dbwatch import FileWatch, Probe, preflight
from errors import MailroomError
from messages import MailJob, addr_spec

log = logging.getLogger(__name__)

Status = Literal["queued", "sending", "retrying", "sent", "failed"]
FINAL = frozenset({"sent", "failed", "cancelled"})
SCHEMA_VERSION = 2
IDEMPOTENCY_TTL = timedelta(hours=24)


class StoreUnavailable(MailroomError):
    """The database could not be reached or refused the operation."""


class IdempotencyConflict(MailroomError):
    """The same Idempotency-Key was used before with a different request."""


metadata = MetaData()

messages_table = Table(
    "mailroom_messages",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("recipients", JSON, nullable=False),
    Column("subject", Text, nullable=False),
    Column("status", String(16), nullable=False, index=True),
    Column("attempts", Integer, nullable=False),
    Column("next_attempt_at", DateTime(timezone=True)),
    Column("last_error", Text),
    Column("last_error_code", Integer),
    Column("results", JSON, nullable=False),
    Column("history", JSON, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, index=True),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    # Attempt ownership (schema 2): who holds the current attempt, until when, and the
    # newest copy number seen.
    Column("owner", String(96)),
    Column("lease_until", DateTime(timezone=True)),
    Column("copy", Integer, nullable=False, server_default="0"),
)

idempotency_table = Table(
    "mailroom_idempotency",
    metadata,
    Column("client", String(64), primary_key=True),
    Column("key", String(255), primary_key=True),
    Column("request_hash", String(64), nullable=False),
    Column("message_id", String(32), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, index=True),
)

# The first answer of a batch (POST /api/messages/batch) sent with an Idempotency-Key: the
# key maps to the batch id in mailroom_idempotency, the batch id to its answer here.
batch_answers_table = Table(
    "mailroom_batch_answers",
    metadata,
    Column("batch_id", String(32), primary_key=True),
    Column("answer", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, index=True),
)

schema_table = Table(
    "mailroom_schema",
    metadata,
    Column("version", Integer, nullable=False),
)

_DB_ERRORS = (SQLAlchemyError, OSError, ConnectionError)


def now_utc() -> datetime:
    return datetime.now(UTC)


def _aware(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _expired(created_at: datetime) -> bool:
    return created_at.replace(tzinfo=created_at.tzinfo or UTC) < now_utc() - IDEMPOTENCY_TTL


def _iso(value: datetime | None) -> str | None:
    aware = _aware(value)
    return aware.isoformat(timespec="milliseconds") if aware else None


@dataclass(frozen=True)
class RecipientResult:
    """``pending`` (not tried or deferred by a 4xx), ``sent`` or ``refused`` (5xx, final)."""

    status: Literal["pending", "sent", "refused"]
    code: int | None = None
    message: str | None = None


@dataclass
class MessageRecord:
    id: str
    recipients: list[str]
    subject: str
    status: str
    attempts: int
    next_attempt_at: datetime | None
    last_error: str | None
    last_error_code: int | None
    results: dict[str, RecipientResult]
    history: list[dict[str, Any]]
    created_at: datetime
    updated_at: datetime
    owner: str | None = None
    lease_until: datetime | None = None
    copy: int = 0

    def unfinished_attempts(self) -> int:
        """How many attempts in a row were started (``sending``) and never finished."""
        count = 0
        for entry in reversed(self.history):
            if entry.get("status") != "sending":
                break
            count += 1
        return count

    def pending(self) -> list[str]:
        """Envelope addresses still to be sent to (never the ones already accepted)."""
        return [a for a, r in self.results.items() if r.status == "pending"]

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "status": self.status,
            "recipients": [
                {"address": a, "status": r.status, "code": r.code, "message": r.message}
                for a, r in self.results.items()
            ],
            "subject": self.subject,
            "attempts": self.attempts,
            "next_attempt_at": _iso(self.next_attempt_at),
            "last_error": (
                {"code": self.last_error_code, "message": self.last_error}
                if self.last_error is not None
                else None
            ),
            "history": self.history,
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
        }


def _record(row: Any) -> MessageRecord:
    results = {a: RecipientResult(**r) for a, r in row.results.items()}
    created = _aware(row.created_at)
    updated = _aware(row.updated_at)
    assert created is not None and updated is not None
    return MessageRecord(
        id=row.id,
        recipients=list(row.recipients),
        subject=row.subject,
        status=row.status,
        attempts=row.attempts,
        next_attempt_at=_aware(row.next_attempt_at),
        last_error=row.last_error,
        last_error_code=row.last_error_code,
        results=results,
        history=list(row.history),
        created_at=created,
        updated_at=updated,
        owner=row.owner,
        lease_until=_aware(row.lease_until),
        copy=row.copy or 0,
    )


@dataclass(frozen=True)
class Attempt:
    """The attempt a worker holds: it may record an outcome only while it still holds it."""

    message_id: str
    number: int  # the record's ``attempts`` once this one began
    owner: str


ClaimKind = Literal["claimed", "final", "stale", "busy"]


@dataclass(frozen=True)
class Claim:
    """What :meth:`Store.claim` found.

    * ``claimed``: the caller now holds ``attempt``; ``record`` is the updated record.
    * ``final``: the record is ``sent``, ``failed`` or ``cancelled``: do not send.
    * ``stale``: a newer copy of the message exists (``record.copy``): drop this one.
    * ``busy``: another owner's lease runs until ``record.lease_until``: wait for it.
    """

    kind: ClaimKind
    record: MessageRecord
    attempt: Attempt | None = None


def engine_url(database_url: str) -> str:
    """Map the URLs users write to the async drivers: postgresql:// -> postgresql+asyncpg://."""
    url = make_url(database_url)
    if url.drivername in ("postgresql", "postgres", "postgresql+asyncpg"):
        url = url.set(drivername="postgresql+asyncpg")
    elif url.drivername in ("sqlite", "sqlite+aiosqlite"):
        url = url.set(drivername="sqlite+aiosqlite")
    else:
        raise ValueError(f"unsupported database {url.drivername!r}: use sqlite or postgresql")
    return url.render_as_string(hide_password=False)


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # The driver's own transaction handling off: _sqlite_begin starts every transaction.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA busy_timeout=10000")  # only while switching to WAL, just below
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    # No busy handler: SQLite's sleeps (up to 100 ms, in the driver's thread) stall every
    # request of the process. A locked write is retried by Store._transaction instead.
    cursor.execute("PRAGMA busy_timeout=0")
    cursor.close()


def _sqlite_begin(conn: Connection) -> None:
    if conn.get_execution_options().get(_WRITE):
        # Take the write lock up front: a deferred transaction that reads and then writes
        # cannot get it later when another process wrote meanwhile.
        conn.exec_driver_sql("BEGIN IMMEDIATE")
    else:
        conn.exec_driver_sql("BEGIN")  # a reader: WAL never makes it wait


_WRITE = "mailroom_write"
LOCK_WAIT = 15.0  # seconds a write may wait for another process's write lock


def _flock_within(fd: int, seconds: float) -> bool:
    """Try for the lock for up to ``seconds`` (in a worker thread); True once held."""
    end = time.monotonic() + seconds
    pause = 0.0005
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if time.monotonic() > end:
                return False
            time.sleep(pause)  # a worker thread, never the event loop
            pause = min(pause * 2, 0.005)
        else:
            return True


def _unlock(fd: int, acquired: asyncio.Future[bool]) -> None:
    if not acquired.cancelled() and acquired.exception() is None and acquired.result():
        fcntl.flock(fd, fcntl.LOCK_UN)


def _locked(exc: BaseException) -> bool:
    return isinstance(exc, OperationalError) and "database is locked" in str(exc)


Work = Callable[[AsyncConnection], Awaitable[Any]]


class Store:
    """Async access to message records. Build with :meth:`open`, finish with :meth:`close`.

    With SQLite, writes are group-committed: the writes that arrive while one transaction
    runs go together into the next, so a burst costs a few file locks, not one per mail.
    """

    def __init__(
        self, engine: AsyncEngine, group_commit: bool = False, lock_path: Path | None = None
    ) -> None:
        self.engine = engine
        self._lock_path = lock_path
        self._lock_fd: int | None = None
        self._writer = engine.execution_options(**{_WRITE: True})
        self._group_commit = group_commit
        self._queue: list[tuple[Work, asyncio.Future[Any]]] = []
        self._wake = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        # Is the database still usable (dbwatch.py): a SQLite file watch, or SELECT 1.
        self._file_watch: FileWatch | None = None
        self._probe: Probe | None = None

    async def _write(self, work: Work) -> Any:
        """Run ``work(conn)`` in a write transaction; return its result after the commit."""
        if not self._group_commit:
            return await self._transaction(work)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((work, future))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush_forever(), name="store-group-commit")
        self._wake.set()
        return await future

    async def _transaction(self, work: Work) -> Any:
        """One write transaction.

        With a SQLite file, Mailroom's processes first take an flock on ``<db>.lock``,
        tried every 0.5-5 ms in a worker thread (off the event loop, finer than SQLite's
        busy handler) for up to LOCK_WAIT seconds. A BEGIN that still finds the database
        locked (another program writes to it) is retried after short pauses, for up to
        LOCK_WAIT seconds too.
        """
        if self._lock_path is None:
            return await self._transaction_retrying(work)
        if self._lock_fd is None:
            self._lock_fd = await asyncio.to_thread(
                os.open, self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
            )
        fd = self._lock_fd
        deadline = asyncio.get_running_loop().time() + LOCK_WAIT
        while True:
            acquire = asyncio.ensure_future(asyncio.to_thread(_flock_within, fd, 0.5))
            try:
                got = await asyncio.shield(acquire)
            except asyncio.CancelledError:
                # The thread may still get the lock: give it back as soon as it does.
                acquire.add_done_callback(lambda done: _unlock(fd, done))
                raise
            if got:
                break
            if asyncio.get_running_loop().time() > deadline:
                raise StoreUnavailable(
                    f"another process has held {self._lock_path} for over {LOCK_WAIT:g}s"
                )
        try:
            return await self._transaction_retrying(work)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)  # releasing never waits

    async def _transaction_retrying(self, work: Work) -> Any:
        pause = 0.001
        deadline = asyncio.get_running_loop().time() + LOCK_WAIT
        while True:
            try:
                async with self._writer.begin() as conn:
                    result = await work(conn)
                    await self._before_commit()
                    return result
            except OperationalError as exc:
                if not _locked(exc) or asyncio.get_running_loop().time() > deadline:
                    raise
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.02)

    async def _flush_forever(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._queue = self._queue, []
            if batch:
                await self._flush(batch)

    async def _flush(self, batch: list[tuple[Work, asyncio.Future[Any]]]) -> None:
        async def all_of_them(conn: AsyncConnection) -> list[Any]:
            return [await work(conn) for work, _ in batch]

        try:
            results = await self._transaction(all_of_them)
        except Exception:  # noqa: BLE001 - rolled back; each runs alone below, errors go to its caller
            if len(batch) == 1:
                await self._run_alone(*batch[0])
                return
            for work, future in batch:
                await self._run_alone(work, future)
            return
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)

    async def _run_alone(self, work: Work, future: asyncio.Future[Any]) -> None:
        try:
            result = await self._transaction(work)
        except Exception as exc:  # noqa: BLE001 - handed to the caller that asked for this write
            if not future.done():
                future.set_exception(exc)
        else:
            if not future.done():
                future.set_result(result)

    # -- is the database still usable (dbwatch.py) --------------------------------------

    async def _before_commit(self) -> None:
        """Roll back rather than commit into a SQLite file that was removed or replaced."""
        if self._file_watch is not None and (problem := await self._file_watch.verify()):
            raise StoreUnavailable(problem)

    async def check(self) -> str | None:
        """Why the database is not usable now, or None (an answer at most a second old)."""
        if self._file_watch is not None:
            return await self._file_watch.check()
        if self._probe is not None:
            return await self._probe.problem()
        return None

    @property
    def lost(self) -> str | None:
        """Set for good once the SQLite file this process opened was removed or replaced."""
        return self._file_watch.lost if self._file_watch is not None else None

    async def wait_lost(self) -> str:
        """Return :attr:`lost` once it is set (never, for PostgreSQL)."""
        if self._file_watch is None:
            await asyncio.Event().wait()
        assert self._file_watch is not None
        return await self._file_watch.wait_lost()

    @classmethod
    async def open(cls, settings: Settings) -> Store:
        url = engine_url(settings.database_url.get())
        is_sqlite = url.startswith("sqlite")
        path = make_url(url).database if is_sqlite else None
        if is_sqlite and path and path != ":memory:":
            await _mkdir(Path(path).parent)
            if refused := await asyncio.to_thread(preflight, Path(path)):
                raise StoreUnavailable(f"cannot open the database: {refused}")
        if is_sqlite:
            # One connection per process: SQLite takes one writer at a time anyway, and
            # queueing here is cheaper than connections fighting over the file lock.
            engine = create_async_engine(url, pool_size=1, max_overflow=0, pool_timeout=30)
            event.listen(engine.sync_engine, "connect", _sqlite_connect)
            event.listen(engine.sync_engine, "begin", _sqlite_begin)
        else:
            engine = create_async_engine(
                url,
                pool_pre_ping=True,
                pool_size=10,
                # Bounded waits: connecting, and every statement (asyncpg has no limit).
                connect_args={"timeout": settings.connect_timeout, "command_timeout": 30},
            )
        lock_path = None
        if is_sqlite and path and path != ":memory:":
            lock_path = Path(f"{path}.lock")
        store = cls(engine, group_commit=is_sqlite, lock_path=lock_path)
        try:
            await store._migrate()
        except _DB_ERRORS as exc:
            await engine.dispose()
            raise StoreUnavailable(f"cannot open the database: {_describe(exc)}") from exc
        if lock_path is not None and path:
            store._file_watch = FileWatch(Path(path), engine)
            await store._file_watch.start()
        elif not is_sqlite:
            store._probe = Probe(engine, min(settings.connect_timeout, 2.0))
        return store

    async def close(self) -> None:
        if self._flusher is not None:

            async def nothing(conn: AsyncConnection) -> None:
                return None

            # Writes are flushed in order: once this one is done, all before it are too.
            with contextlib.suppress(StoreUnavailable, *_DB_ERRORS):
                await self._write(nothing)
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = None
        if self._file_watch is not None:
            await self._file_watch.close()  # after a rescue copy in progress is written
        await self.engine.dispose()
        if self._lock_fd is not None:
            fd, self._lock_fd = self._lock_fd, None
            await asyncio.to_thread(os.close, fd)

    async def _migrate(self) -> None:
        for attempt in (1, 2):
            try:

                async def work(conn: AsyncConnection) -> None:
                    await conn.run_sync(_create_or_upgrade)

                await self._transaction(work)
                return
            except (IntegrityError, DBAPIError):
                # Another process created the schema at the same moment: look again.
                if attempt == 2:
                    raise

    # -- the server's side -------------------------------------------------------------

    async def insert_queued(self, job: MailJob) -> None:
        """Create the record of an accepted message (a no-op if a worker already did)."""

        async def work(conn: AsyncConnection) -> None:
            await _insert_queued(conn, job)

        try:
            await self._write(work)
        except IntegrityError:
            return
        except _DB_ERRORS as exc:
            raise StoreUnavailable(_describe(exc)) from exc

    async def claim_idempotency_key(
        self, client: str, key: str, request_hash: str, message_id: str
    ) -> str | None:
        """Reserve ``key`` for ``message_id``; return the earlier message id if it was taken.

        Raises :class:`IdempotencyConflict` when the key was used with another request.
        """
        table = idempotency_table
        where = (table.c.client == client) & (table.c.key == key)

        async def work(conn: AsyncConnection) -> Any:
            row = (await conn.execute(select(table).where(where))).first()
            if row is not None and _expired(row.created_at):
                await conn.execute(delete(table).where(where))
                row = None
            if row is None:
                await conn.execute(
                    insert(table).values(
                        client=client,
                        key=key,
                        request_hash=request_hash,
                        message_id=message_id,
                        created_at=now_utc(),
                    )
                )
            return row

        try:
            row = await self._write(work)
            if row is None:
                return None
        except IntegrityError:
            # A concurrent request with the same key won the insert: read what it stored.
            async with self.engine.connect() as conn:
                row = (await conn.execute(select(table).where(where))).first()
            if row is None:
                raise StoreUnavailable("idempotency key vanished during a race") from None
        except _DB_ERRORS as exc:
            raise StoreUnavailable(_describe(exc)) from exc
        if row.request_hash != request_hash:
            raise IdempotencyConflict(
                "this Idempotency-Key was already used with a different request body"
            )
        return str(row.message_id)

    async def release_idempotency_key(self, client: str, key: str) -> None:
        table = idempotency_table
        await self._run(delete(table).where((table.c.client == client) & (table.c.key == key)))

    async def save_batch_answer(self, batch_id: str, answer: str) -> None:
        """Keep the first answer of a batch for a replay (and forget those of the batches
        older than its key's 24 hours, in the same transaction)."""
        table = batch_answers_table

        async def work(conn: AsyncConnection) -> None:
            await conn.execute(
                delete(table).where(table.c.created_at < now_utc() - IDEMPOTENCY_TTL)
            )
            await conn.execute(
                insert(table).values(batch_id=batch_id, answer=answer, created_at=now_utc())
            )

        try:
            await self._write(work)
        except _DB_ERRORS as exc:
            raise StoreUnavailable(_describe(exc)) from exc

    async def batch_answer(self, batch_id: str) -> str | None:
        """The answer :meth:`save_batch_answer` kept, or None (the batch is still running)."""
        table = batch_answers_table
        try:
            async with self.engine.connect() as conn:
                found = await conn.execute(
                    select(table.c.answer).where(table.c.batch_id == batch_id)
                )
                answer = found.scalar()
        except _DB_ERRORS as exc:
            raise StoreUnavailable(_describe(exc)) from exc
        return None if answer is None else str(answer)

    async def purge_idempotency_keys(self) -> None:
        """Forget keys older than 24 hours (the server does this hourly)."""
        cutoff = now_utc() - IDEMPOTENCY_TTL
        await self._run(delete(idempotency_table).where(idempotency_table.c.created_at < cutoff))

    # -- reads -------------------------------------------------------------------------

    async def get(self, message_id: str) -> MessageRecord | None:
        try:
            async with self.engine.connect() as conn:
                row = (
                    await conn.execute(
                        select(messages_table).where(messages_table.c.id == message_id)
                    )
                ).first()
        except _DB_ERRORS as exc:
            raise StoreUnavailable(_describe(exc)) from exc
        return _record(row) if row is not None else None

    async def list(self, status: str | None = None, limit: int = 50) -> list[MessageRecord]:
        query = select(messages_table).order_by(
            messages_table.c.created_at.desc(), messages_table.c.id.desc()
        )
        if status is not None:
            query = query.where(messages_table.c.status == status)
        try:
            async with self.engine.connect() as conn:
                rows = (await conn.execute(query.limit(limit))).all()
        except _DB_ERRORS as exc:
            raise StoreUnavailable(_describe(exc)) from exc
        return [_record(r) for r in rows]

    # -- the worker's side -------------------------------------------------------------

    async def claim(
        self,
        job: MailJob,
        owner: str,
        copy: int,
        lease: float,
        owner_alive: Callable[[str], bool] = lambda owner: True,
    ) -> Claim:
        """Try to become the owner of the next attempt at ``job`` (creating its record if
        it has none). ``copy`` is the number of the queue copy being handled; ``lease`` how
        long the claim holds unless renewed; ``owner_alive`` says whether another owner is
        still running (False only when that is known for sure).
        """

        async def work(conn: AsyncConnection) -> Claim:
            record = await self._load(conn, job.id)
            if record is None:
                await _insert_queued(conn, job)
                record = await self._load(conn, job.id)
                assert record is not None
            if record.status in FINAL:
                return Claim("final", record)
            if copy < record.copy:
                return Claim("stale", record)
            now = now_utc()
            held = (
                record.status == "sending"
                and record.owner is not None
                and record.owner != owner
                and record.lease_until is not None
                and record.lease_until > now
            )
            if held and owner_alive(record.owner or ""):
                return Claim("busy", record)
            number = record.attempts + 1
            updated = await self._transition(
                conn,
                record,
                "sending",
                attempts=number,
                next_attempt_at=None,
                owner=owner,
                lease_until=now + timedelta(seconds=lease),
                copy=copy,
            )
            return Claim("claimed", updated, Attempt(job.id, number, owner))

        for attempt in (1, 2):
            try:
                result: Claim = await self._write(work)
                return result
            except IntegrityError as exc:
                # The server created the record between our read and our insert: read again.
                if attempt == 2:
                    raise StoreUnavailable(_describe(exc)) from exc
            except _DB_ERRORS as exc:
                raise StoreUnavailable(_describe(exc)) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    async def finish(
        self,
        attempt: Attempt,
        status: Status,
        results: dict[str, RecipientResult] | None = None,
        error: str | None = None,
        code: int | None = None,
        next_attempt_at: datetime | None = None,
        detail: str | None = None,
        copy: int | None = None,
    ) -> bool:
        """Record the outcome of ``attempt``; True if it was applied.

        Applied only while the record is ``sending`` under this attempt. Otherwise (the
        claim was taken over, or the record is final) the outcome is only appended to the
        history as a late outcome, and False is returned.
        """

        async def work(conn: AsyncConnection) -> bool:
            record = await self._load(conn, attempt.message_id)
            if record is None:
                raise StoreUnavailable(f"no record for message {attempt.message_id}")
            if not _holds(record, attempt):
                note = f"late outcome of attempt {attempt.number}, not applied"
                if error:
                    note += f": {error[:200]}"
                await self._append_history(conn, record, status, note)
                return False
            merged = dict(record.results)
            merged.update(results or {})
            values: dict[str, Any] = {
                "results": merged,
                "next_attempt_at": next_attempt_at,
                "lease_until": None,
            }
            if copy is not None:
                values["copy"] = max(copy, record.copy)
            if error is not None:
                values.update(last_error=error, last_error_code=code)
            await self._transition(conn, record, status, detail=detail, **values)
            return True

        try:
            applied: bool = await self._write(work)
        except _DB_ERRORS as exc:
            raise StoreUnavailable(_describe(exc)) from exc
        return applied

    async def release(self, attempt: Attempt) -> None:
        """Give up ``attempt`` without an outcome: the next delivery need not wait."""
        table = messages_table
        await self._run(
            update(table)
            .where(
                (table.c.id == attempt.message_id)
                & (table.c.status == "sending")
                & (table.c.owner == attempt.owner)
                & (table.c.attempts == attempt.number)
            )
            .values(lease_until=None)
        )

    async def renew(self, attempts: Sequence[Attempt], lease: float) -> None:
        """Extend the leases of attempts still running (one statement for all of them)."""
        if not attempts:
            return
        table = messages_table
        owners = {a.owner for a in attempts}
        assert len(owners) == 1, "one owner renews its own attempts"
        await self._run(
            update(table)
            .where(
                table.c.id.in_([a.message_id for a in attempts])
                & (table.c.status == "sending")
                & (table.c.owner == owners.pop())
            )
            .values(lease_until=now_utc() + timedelta(seconds=lease))
        )

    async def requeue(
        self, message_id: str, results: dict[str, RecipientResult], detail: str
    ) -> int | None:
        """An operator sends a dead-lettered message again: back to ``queued``.

        Returns the copy number the re-queued copy must carry (newer than any before),
        or None when the message has no record.
        """

        async def work(conn: AsyncConnection) -> int | None:
            record = await self._load(conn, message_id)
            if record is None:
                return None
            merged = dict(record.results)
            merged.update(results)
            copy = record.copy + 1
            await self._transition(
                conn,
                record,
                "queued",
                detail=detail,
                results=merged,
                next_attempt_at=None,
                owner=None,
                lease_until=None,
                copy=copy,
            )
            return copy

        try:
            result: int | None = await self._write(work)
        except _DB_ERRORS as exc:
            raise StoreUnavailable(_describe(exc)) from exc
        return result

    async def _append_history(
        self, conn: AsyncConnection, record: MessageRecord, status: str, detail: str
    ) -> None:
        entry = {"status": status, "at": _iso(now_utc()), "detail": detail}
        await conn.execute(
            _UPDATE_ONE, {"message_id": record.id, "history": [*record.history, entry]}
        )

    async def _load(self, conn: AsyncConnection, message_id: str) -> MessageRecord | None:
        row = (await conn.execute(_SELECT_ONE, {"message_id": message_id})).first()
        return _record(row) if row is not None else None

    async def _transition(
        self,
        conn: AsyncConnection,
        record: MessageRecord,
        status: str,
        detail: str | None = None,
        **values: Any,
    ) -> MessageRecord:
        at = now_utc()
        entry: dict[str, Any] = {"status": status, "at": _iso(at)}
        if detail:
            entry["detail"] = detail
        if "results" in values:
            values["results"] = {
                a: r if isinstance(r, dict) else r.__dict__ for a, r in values["results"].items()
            }
        history = [*record.history, entry]
        await conn.execute(
            _UPDATE_ONE,
            {"message_id": record.id, "status": status, "history": history, "updated_at": at}
            | values,
        )
        # The new state, without reading it back.
        changes = {k: v for k, v in values.items() if k != "results"}
        if "results" in values:
            changes["results"] = {a: RecipientResult(**r) for a, r in values["results"].items()}
        return dataclasses.replace(record, status=status, history=history, updated_at=at, **changes)

    async def _run(self, statement: Any) -> None:
        async def work(conn: AsyncConnection) -> None:
            await conn.execute(statement)

        try:
            await self._write(work)
        except _DB_ERRORS as exc:
            raise StoreUnavailable(_describe(exc)) from exc


# Built once: executing them with parameters skips building a statement per call.
_SELECT_ONE = select(messages_table).where(messages_table.c.id == bindparam("message_id"))
_UPDATE_ONE = update(messages_table).where(messages_table.c.id == bindparam("message_id"))
_INSERT = insert(messages_table)


async def _insert_queued(conn: AsyncConnection, job: MailJob) -> None:
    at = now_utc()
    await conn.execute(
        _INSERT,
        {
            "id": job.id,
            "recipients": list(job.to),
            "subject": job.subject,
            "status": "queued",
            "attempts": 0,
            "next_attempt_at": None,
            "last_error": None,
            "last_error_code": None,
            "results": {
                addr_spec(a): {"status": "pending", "code": None, "message": None} for a in job.to
            },
            "history": [{"status": "queued", "at": _iso(at)}],
            "created_at": at,
            "updated_at": at,
        },
    )


def _holds(record: MessageRecord, attempt: Attempt) -> bool:
    return (
        record.status == "sending"
        and record.owner == attempt.owner
        and record.attempts == attempt.number
    )


def _create_or_upgrade(conn: Connection) -> None:
    metadata.create_all(conn, checkfirst=True)
    version = conn.execute(select(schema_table.c.version)).scalar()
    if version is None:
        conn.execute(insert(schema_table).values(version=SCHEMA_VERSION))
    elif version > SCHEMA_VERSION:
        raise StoreUnavailable(
            f"the database schema is version {version}, newer than this program's "
            f"{SCHEMA_VERSION}: upgrade Mailroom"
        )
    elif version < SCHEMA_VERSION:
        if version < 2:
            # Attempt ownership: an owner, its lease, and the newest copy number.
            for ddl in (
                "ALTER TABLE mailroom_messages ADD COLUMN owner VARCHAR(96)",
                "ALTER TABLE mailroom_messages ADD COLUMN lease_until TIMESTAMP"
                + (" WITH TIME ZONE" if conn.dialect.name == "postgresql" else ""),
                "ALTER TABLE mailroom_messages ADD COLUMN copy INTEGER NOT NULL DEFAULT 0",
            ):
                conn.exec_driver_sql(ddl)
        conn.execute(update(schema_table).values(version=SCHEMA_VERSION))


def _describe(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"


async def _mkdir(path: Path) -> None:
    await asyncio.to_thread(path.mkdir, parents=True, exist_ok=True)
