"""Message records and idempotency keys, in SQLite (default) or PostgreSQL.

One code path for both through SQLAlchemy Core: the same statements, written as small
synchronous units (see :class:`Store` for the writer that runs them). SQLite (WAL, so the
server and several workers on one host share the file safely) writes through a plain
``sqlite3`` connection in a writer thread and reads through a few more in reader threads;
PostgreSQL (workers on several hosts) does both through ``asyncpg`` (SQLAlchemy's asyncio
extension, imported only then: with its ORM, which it loads, it costs each process 8 MB).
The schema is created or upgraded when a process opens it.

A record's ``status`` moves
``queued -> sending -> (retrying -> sending)* -> sent | partial | failed``
(a message with ``send_at`` starts ``scheduled``; ``queued``, ``scheduled`` and
``retrying`` may become ``cancelled``, final too; a ``sending`` whose worker stopped
before it had a connection goes back, :meth:`Store.hand_back`) and every transition is
appended to its ``history`` with a UTC time stamp.

Every list is read from an index in the order it answers (:func:`list_statement`): the
records' own by ``(status, created_at, id)`` and ``(created_at, id)``, or, by recipient,
tag or metadata, ``mailroom_lookup``, written with the record. Finished records expire
after ``MESSAGE_RETENTION_DAYS`` (:meth:`Store.prune`, a few of them a write).

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
import functools
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    Select,
    String,
    Table,
    Text,
    bindparam,
    delete,
    event,
    func,
    insert,
    inspect,
    select,
    text,
    true,
    tuple_,
    update,
)
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection, Engine, create_engine, make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError
from sqlalchemy.pool import SingletonThreadPool

from config import Settings
from dbsetup import create_missing_database
from dbwatch import FileWatch, Probe, preflight
from errors import InvalidMessage, MailroomError
from filelock import FileLock
from messages import MailJob, addr_spec, suppression_key

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

log = logging.getLogger(__name__)

Status = Literal[
    "queued", "scheduled", "sending", "retrying", "sent", "partial", "failed", "cancelled"
]
FINAL = frozenset({"sent", "partial", "failed", "cancelled"})
# What DELETE /api/messages/<id> may still take back (nothing is being sent).
CANCELLABLE = frozenset({"queued", "scheduled", "retrying"})
SCHEMA_VERSION = 6
IDEMPOTENCY_TTL = timedelta(hours=24)
PRUNE_BATCH = 50  # records deleted per write transaction by retention (about 3 ms)
PRUNE_PAUSE = 0.01  # seconds between two such transactions


class StoreUnavailable(MailroomError):
    """The database could not be reached or refused the operation."""


class _BatchNotWritten(StoreUnavailable):
    """A write transaction that could not run or commit as a whole (Mailroom's file lock
    not had in time, the database file removed or replaced, the connection lost): no
    unit of it is at fault, so each gets this error at once, none is run again alone."""


class IdempotencyConflict(MailroomError):
    """The same Idempotency-Key was used before with a different request."""


metadata = MetaData()

messages_table = Table(
    "mailroom_messages",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("recipients", JSON, nullable=False),
    Column("subject", Text, nullable=False),
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("next_attempt_at", DateTime(timezone=True)),
    Column("last_error", Text),
    Column("last_error_code", Integer),
    Column("results", JSON, nullable=False),
    Column("history", JSON, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    # Attempt ownership (schema 2): who holds the current attempt, until when, and the
    # newest copy number seen.
    Column("owner", String(96)),
    Column("lease_until", DateTime(timezone=True)),
    Column("copy", Integer, nullable=False, server_default="0"),
    # Schema 4 (issue 12): the message's tags (a JSON list) and metadata (a JSON object).
    Column("tags", JSON),
    Column("meta", JSON),
    # Every list is read from an index in the order it answers, newest first (schema 6):
    # all records, or those of one status (a cursor or a time range is a range of either);
    # retention finds the oldest finished records of a status in the first one.
    Index("ix_mailroom_messages_status_created", "status", "created_at", "id"),
    Index("ix_mailroom_messages_created", "created_at", "id"),
)

# The lists by recipient, tag or metadata (schema 6): one row per term of a record (its
# envelope addresses, tags and metadata pairs: :func:`_terms`), in the order the lists
# answer, written with the record and deleted with it. The primary key is the index.
lookup_table = Table(
    "mailroom_lookup",
    metadata,
    Column("term", String(600), primary_key=True),
    Column("created_at", DateTime(timezone=True), primary_key=True),
    Column("message_id", String(32), primary_key=True),
    sqlite_with_rowid=False,
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

# Schema 4 (issue 12): message templates (PUT/GET/DELETE /api/templates/<name>).
templates_table = Table(
    "mailroom_templates",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("subject", Text, nullable=False),
    Column("text", Text),
    Column("html", Text),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

# The suppression list (schema 5): addresses never sent to again, in normalised form
# (:func:`suppression_key`); ``reason`` says why (a 5.1.x refusal, or an operator).
suppressions_table = Table(
    "mailroom_suppressions",
    metadata,
    Column("address", String(320), primary_key=True),
    Column("reason", Text, nullable=False),
    Column("source", String(16), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
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


def _datetime(value: Any) -> datetime | None:
    """A time as the driver returned it from an aggregate (SQLite gives its text)."""
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value))


def _iso(value: datetime | None) -> str | None:
    aware = _aware(value)
    return aware.isoformat(timespec="milliseconds") if aware else None


@dataclass(frozen=True)
class RecipientResult:
    """``pending`` (not tried or deferred by a 4xx), ``sent``, ``refused`` (5xx, final) or
    ``suppressed`` (on the suppression list: not sent to, final)."""

    status: Literal["pending", "sent", "refused", "suppressed"]
    code: int | None = None
    message: str | None = None


# The history entry of a claim handed back unsent (Store.hand_back), and how the note of
# an outcome that came too late to apply (Store.finish) begins.
HANDED_BACK = "handed back unsent: the worker stopped before it had a connection"
LATE_OUTCOME = "late outcome of attempt"


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
    tags: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)

    def unfinished_attempts(self) -> int:
        """How many attempts in a row were started (``sending``) and never finished. A
        claim handed back unsent (:meth:`Store.hand_back`) is not one, and does not end
        the row either."""
        count = 0
        handed_back = False
        for entry in reversed(self.history):
            if handed_back:  # its claim's own entry: not counted
                handed_back = False
                if entry.get("status") == "sending":
                    continue
            if entry.get("detail") == HANDED_BACK:
                handed_back = True
                continue
            if entry.get("status") != "sending":
                break
            count += 1
        return count

    def status_before_claim(self) -> str:
        """What a record held by a claim goes back to when the claim is handed back:
        ``queued``, or ``retrying`` once an attempt was made (a message that fell due is
        ``queued``)."""
        entries = self.history
        claimed = max((n for n, e in enumerate(entries) if e.get("status") == "sending"), default=0)
        # The status the claim found: the entry before it that is not a note of another
        # attempt's late outcome (those carry that outcome, not the record's status).
        before = next(
            (
                e.get("status")
                for e in reversed(entries[:claimed])
                if not str(e.get("detail", "")).startswith(LATE_OUTCOME)
            ),
            None,
        )
        if before in ("queued", "retrying"):
            return str(before)
        if before == "scheduled":
            return "queued"
        return "retrying" if before == "sending" else "queued"

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
            "tags": self.tags,
            "metadata": self.metadata,
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
        tags=list(row.tags or ()),
        metadata=dict(row.meta or {}),
    )


@dataclass(frozen=True)
class StoredTemplate:
    """A message template: Jinja2 sources of the subject, text and HTML (templates.py)."""

    name: str
    subject: str
    text: str | None
    html: str | None
    updated_at: str | None = None


@dataclass(frozen=True)
class Attempt:
    """The attempt a worker holds: it may record an outcome only while it still holds it."""

    message_id: str
    number: int  # the record's ``attempts`` once this one began
    owner: str
    # The record as this attempt's claim left it: while the attempt holds the record,
    # only its lease changes, so the outcome can be written without reading it again.
    record: MessageRecord | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class RecordStats:
    total: int
    by_status: dict[str, int]
    oldest: datetime | None  # when the oldest record was created

    def to_json(self) -> dict[str, Any]:
        return {"total": self.total, "by_status": self.by_status, "oldest": _iso(self.oldest)}


ClaimKind = Literal["claimed", "final", "stale", "busy"]


@dataclass(frozen=True)
class Claim:
    """What :meth:`Store.claim` found.

    * ``claimed``: the caller now holds ``attempt``; ``record`` is the updated record.
    * ``final``: the record is ``sent``, ``partial``, ``failed`` or ``cancelled``: do not send.
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


def _sqlite_connect_writer(dbapi_connection: Any, _record: Any) -> None:
    # The writer thread may wait: SQLite's own busy handler covers other programs'
    # writes (Mailroom's processes queue on the file lock first).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout={int(LOCK_WAIT * 1000)}")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute(f"PRAGMA cache_size=-{WRITER_CACHE_KIB}")
    cursor.close()


def _sqlite_begin_writer(conn: Connection) -> None:
    # Take the write lock up front: a deferred transaction that reads and then writes
    # cannot get it later when another process wrote meanwhile.
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def _sqlite_begin(conn: Connection) -> None:
    conn.exec_driver_sql("BEGIN")  # a reader: WAL never makes it wait


_CLOSED = "the database is closed: this process is stopping"  # reads and writes refused
READ_CONNECTIONS = 3  # SQLite: read connections (and reader threads) per process
LINGER_BELOW = 64  # a lingering writer (Store.open's linger) waits only for fewer writes
LOCK_WAIT = 15.0  # seconds a write may wait for another process's write lock
READY_FOR = 0.1  # seconds of waiting for the file lock after which units are made again
SEED_CACHE_KIB = 262144  # page cache of a connection that seeds (Store.insert_file)
# Page cache of the write connection (SQLite's default is 2000 KiB). A write touches a few
# pages, which the OS keeps cached anyway; the default cache filled up in each process as
# the database grew. Measured: the peak RSS of server + worker after 4000 mails by the
# batch endpoint 143.5-144 MB, with 256 KiB 140.8-141.4 (all connections); store_cost.py
# with 20000 mails no change in CPU per mail or lock hold beyond the noise; 12000 mails by
# the batch endpoint, six alternating pairs (2000 against 512 KiB): the worker's CPU per
# mail 2% more on average, the server's 2%, each pair's difference between -37 and +42 us
# (of 250-690): within the noise, for 1.5 MB less in the worker.
WRITER_CACHE_KIB = 512
WAL_AUTOCHECKPOINT = 1000  # SQLite's default: pages in the WAL that make a commit checkpoint
MIGRATION_WAIT = 600.0  # seconds a process may wait for another's schema upgrade
MIGRATION_LOCK = 0x6D61696C726F6F6D  # pg_advisory_xact_lock key of the schema upgrade
# SQLite: a batch's new records go in one INSERT ... RETURNING, its claims and outcomes in
# one UPDATE ... FROM ... RETURNING per shape (SQLite 3.35.5 and newer: 3.35.0-3.35.4 had
# RETURNING defects; before, one statement per unit), each with at most this many bound
# values (SQLite's default limit since 3.32; a build's lower limit is read from the
# connection) and SQLITE_MOST_ROWS rows (see _chunks).
SQLITE_RETURNING = sqlite3.sqlite_version_info >= (3, 35, 5)
SQLITE_MAX_PARAMETERS = 32766
SQLITE_MOST_ROWS = 64


Unit = Callable[[Connection], Any]
_T = TypeVar("_T")


class Store:
    """Async access to message records. Build with :meth:`open`, finish with :meth:`close`.

    The writer, in one paragraph: every write is a *unit*, a small synchronous function of
    a SQLAlchemy ``Connection``, queued by its caller, who awaits its result. One writer
    task per process takes everything queued and runs it as one transaction: for SQLite in
    a single hop to a thread of its own that holds the process's only write connection
    (the file lock, SQLite's lock and the commit wait there, never on the event loop; the
    per-mail units build their rows before it takes the file lock, so that they hold it
    for their statements alone);
    for PostgreSQL on one pooled asyncpg connection. After the commit every caller gets its
    result; when a unit fails, the batch is rolled back and its units run again one at a
    time, so only that caller sees the error (when the transaction failed as a whole,
    :class:`_BatchNotWritten`, every caller gets the error at once). What arrives while a
    batch runs makes up the next one: the busier the process, the bigger the batches and
    the fewer commits per mail. The worker's writer also lingers (``linger``, 15 ms
    there) before a batch of fewer than ``LINGER_BELOW`` writes, so that its claims
    and outcomes, which nobody outside waits for, go in fewer and bigger commits; the
    server's does not (a client waits for each of its writes).
    The new records of a batch (:class:`_NewRecord`) go first, in one statement (on
    SQLite one more for their lookup rows, :func:`_sqlite_insert_many`). On PostgreSQL
    its claims go next (one UPDATE per shape, then the records found missing
    inserted as claimed, in one statement), then its outcomes and the rest (one UPDATE
    per shape): the units of a batch come from callers running concurrently, so no order
    among them is promised, and this one (records in id order) keeps a server's and a
    worker's transactions from deadlocking (:func:`_run_units`). On SQLite (3.35.5 and
    newer, else one statement per unit), where one writer at a time holds the file lock,
    its claims and outcomes go next, one UPDATE per shape that two or more share, then
    the records found missing inserted as claimed, then the rest in order
    (:func:`_run_sqlite_units`): fewer statements, and so fewer waits for the GIL while
    the lock is held. A claim whose record is missing (the worker got the message before
    the server's insert committed) inserts it as claimed (:meth:`_FastUnit.missing`).
    """

    def __init__(
        self,
        url: str,
        postgres: AsyncEngine | None = None,
        sqlite: tuple[Engine, Engine] | None = None,
        lock_path: Path | None = None,
        linger: float = 0.0,
    ) -> None:
        """``postgres``: the engine of every read and write; else ``sqlite``: the engine
        of the reader threads and that of the writer thread. ``linger``: seconds the
        writer waits for more writes before it writes a small batch."""
        self.url = url  # as engine_url() gives it
        self._linger = linger
        self._postgres = postgres
        self._sqlite_reader: Engine | None = sqlite[0] if sqlite else None
        self._sqlite_writer: Engine | None = sqlite[1] if sqlite else None
        self._thread = self._readers = None
        self._closed = False  # set by close: reads refused from then on
        self._closing = False  # set as close begins: new writes refused
        if sqlite is not None:
            self._thread = ThreadPoolExecutor(1, "mailroom-writer")
            self._readers = ThreadPoolExecutor(READ_CONNECTIONS, "mailroom-reader")
        # Mailroom's processes take turns on it; used in the writer thread only.
        self._lock = FileLock(lock_path) if lock_path is not None else None
        self._queue: list[tuple[Unit, asyncio.Future[Any]]] = []
        self._wake = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        # Is the database still usable (dbwatch.py): a SQLite file watch, or SELECT 1.
        self._file_watch: FileWatch | None = None
        self._probe: Probe | None = None

    async def _write(self, unit: Unit) -> Any:
        """Run ``unit(conn)`` in the next write transaction; its result after the commit."""
        if self._closing and unit is not _nothing:
            # Nothing would write it: the writer stops after the writes already queued.
            raise StoreUnavailable(_CLOSED)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((unit, future))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush_forever(), name="store-writer")
        self._wake.set()
        return await future

    async def write(self, unit: Unit) -> Any:
        """Run ``unit(conn)`` in the next write transaction (see the class docstring);
        its result after the commit, a database error raised as :class:`StoreUnavailable`.
        (The per-mail writes, :meth:`insert_queued`, :meth:`claim` and :meth:`finish`, spell
        this out rather than spend another await on it.)"""
        try:
            return await self._write(unit)
        except _DB_ERRORS as exc:
            raise StoreUnavailable(_describe(exc)) from exc

    async def _flush_forever(self) -> None:
        while True:
            await self._wake.wait()
            if self._linger and len(self._queue) < LINGER_BELOW:
                await asyncio.sleep(self._linger)  # more writes join this batch meanwhile
            self._wake.clear()
            batch, self._queue = self._queue, []
            if batch:
                await self._flush(batch)

    async def _flush(self, batch: list[tuple[Unit, asyncio.Future[Any]]]) -> None:
        try:
            results = await self._transaction([unit for unit, _ in batch])
        except Exception as exc:  # noqa: BLE001 - rolled back; each unit runs alone below, errors go to its caller
            if len(batch) == 1 or _whole_batch_failed(exc):
                # Nothing to learn from running them again one at a time (which would
                # also wait as long again for each: LOCK_WAIT, a connection timeout).
                for _, future in batch:
                    if not future.done():
                        future.set_exception(_copy_of(exc))
                return
            log.warning(
                "writer: a batch of %d writes failed (%s); writing them one at a time",
                len(batch),
                _describe(exc) if isinstance(exc, _DB_ERRORS) else exc,
            )
            for unit, future in batch:
                try:
                    result = (await self._transaction([unit]))[0]
                except Exception as exc:  # noqa: BLE001 - handed to the caller of this unit
                    if not future.done():
                        future.set_exception(exc)
                else:
                    if not future.done():
                        future.set_result(result)
            return
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)

    async def _read(self, query: Callable[[Connection], _T]) -> _T:
        """``query(conn)`` on a read connection, what it returns: SQLite's in a reader
        thread (WAL: a read never waits for the writer), PostgreSQL's through asyncpg.
        A database error (the driver's own included) is raised as
        :class:`StoreUnavailable`, and so is a read once the store is closing."""
        self._refuse_if_closed()
        try:
            if self._postgres is not None:
                async with self._postgres.connect() as conn:
                    return await conn.run_sync(query)
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._readers, self._sqlite_read, query)
        except (*_DB_ERRORS, sqlite3.Error) as exc:
            raise StoreUnavailable(_describe(exc)) from exc

    def _sqlite_read(self, query: Callable[[Connection], _T]) -> _T:
        """In a reader thread: a read transaction (rolled back) of its own. Refused once
        the store is closing: a read still waiting for a thread then must not open a new
        connection (on a removed file, that would create an empty database)."""
        assert self._sqlite_reader is not None
        self._refuse_if_closed()
        with self._sqlite_reader.connect() as conn:
            return query(conn)

    def _refuse_if_closed(self) -> None:
        if self._closed:
            raise StoreUnavailable(_CLOSED)

    async def _transaction(self, units: list[Unit], wait: float | None = None) -> list[Any]:
        """One write transaction running ``units`` in order; their results. ``wait``:
        how long to wait for another process's write (SQLite; default LOCK_WAIT)."""
        if self._postgres is not None:
            async with self._postgres.begin() as conn:
                results: list[Any] = await conn.run_sync(_run_units, units)
                return results
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._thread, self._sqlite_transaction, units, wait)
        except StoreUnavailable:
            if self._file_watch is not None:
                await self._file_watch.verify()  # declares a lost file (rescue copy, ERROR)
            raise

    def _sqlite_transaction(self, units: list[Unit], wait: float | None = None) -> list[Any]:
        """In the writer thread: take Mailroom's file lock (processes queue on it, bounded
        by ``wait``), run the units, and commit unless the file was removed or replaced."""
        assert self._sqlite_writer is not None
        lock = self._lock
        wait = LOCK_WAIT if wait is None else wait
        dialect = self._sqlite_writer.dialect
        ready = _ready_units(units, dialect)
        asked = time.monotonic()
        if lock is not None and not lock.acquire(wait):
            raise _BatchNotWritten(f"another process has held {lock.path} for over {wait:g}s")
        if time.monotonic() - asked > READY_FOR:
            # A claim's lease and the record's times were counted from before that wait:
            # counted again, or a lease could be short (or over) when it is written.
            ready = _ready_units(units, dialect)
        try:
            with self._sqlite_writer.begin() as conn:
                results = _run_units(conn, ready)
                if self._file_watch is not None:
                    try:
                        problem = self._file_watch.files.problem()
                    except OSError as exc:
                        problem = f"cannot check database file {self._file_watch.files.path}: {exc}"
                    if problem is not None:
                        raise _BatchNotWritten(problem)  # rolled back: nothing goes to a ghost
                return results
        finally:
            if lock is not None:
                lock.release()

    # -- is the database still usable (dbwatch.py) --------------------------------------

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
    async def open(cls, settings: Settings, linger: float = 0.0) -> Store:
        url = engine_url(settings.database_url.get())
        is_sqlite = url.startswith("sqlite")
        path = make_url(url).database if is_sqlite else None
        if is_sqlite and path and path != ":memory:":
            await _mkdir(Path(path).parent)
            if refused := await asyncio.to_thread(preflight, Path(path)):
                raise StoreUnavailable(f"cannot open the database: {refused}")
        elif refused := await create_missing_database(url, settings.connect_timeout):
            raise StoreUnavailable(f"cannot open the database: {refused}")
        lock_path = None
        if is_sqlite and path and path != ":memory:":
            lock_path = Path(f"{path}.lock")
        if is_sqlite:
            plain = make_url(url).set(drivername="sqlite+pysqlite")
            # Reads: a few connections per process, one per reader thread (WAL: they
            # never wait for the writer), so that a read by id never queues behind a list.
            # (The pool never makes a read wait: a thread holds one connection at most.)
            reader = create_engine(plain, pool_size=READ_CONNECTIONS, max_overflow=0)
            event.listen(reader, "connect", _sqlite_connect)
            event.listen(reader, "begin", _sqlite_begin)
            # Writes: one plain connection, used only in the writer thread.
            writer = create_engine(plain, poolclass=SingletonThreadPool, pool_size=1)
            event.listen(writer, "connect", _sqlite_connect_writer)
            event.listen(writer, "begin", _sqlite_begin_writer)
            store = cls(url, sqlite=(reader, writer), lock_path=lock_path, linger=linger)
        else:
            from sqlalchemy.ext.asyncio import create_async_engine

            engine = create_async_engine(
                url,
                pool_pre_ping=True,
                pool_size=10,
                # Bounded waits: connecting, and every statement (asyncpg has no limit).
                connect_args={"timeout": settings.connect_timeout, "command_timeout": 30},
            )
            store = cls(url, postgres=engine, linger=linger)
        try:
            await store._migrate()
        except _DB_ERRORS as exc:
            await store._dispose()
            raise StoreUnavailable(f"cannot open the database: {_describe(exc)}") from exc
        if lock_path is not None and path:
            # Open the read connections now, on this file: the rescue copy of a removed
            # file is read through one (a connection opened later would make a new file).
            try:
                await asyncio.to_thread(store._open_readers)
            except _DB_ERRORS as exc:
                await store._dispose()
                raise StoreUnavailable(f"cannot open the database: {_describe(exc)}") from exc
            store._file_watch = FileWatch(Path(path), store._copy_to)
            await store._file_watch.start()
        elif store._postgres is not None:
            store._probe = Probe(store._postgres, min(settings.connect_timeout, 2.0))
        return store

    def _open_readers(self) -> None:
        """Open every read connection at once (then back to the pool, which keeps them)."""
        assert self._sqlite_reader is not None
        with contextlib.ExitStack() as held:
            for _ in range(READ_CONNECTIONS):
                held.enter_context(self._sqlite_reader.connect()).exec_driver_sql("SELECT 1")

    async def _copy_to(self, target: Path) -> None:
        """Write what this process sees of the SQLite database to ``target`` (``VACUUM
        INTO``, through a read connection opened at start: see :class:`FileWatch`)."""

        def vacuum_into(conn: Connection) -> None:
            # The driver's own connection, outside any transaction (VACUUM needs that).
            raw = conn.connection.driver_connection
            assert raw is not None
            raw.execute("VACUUM INTO ?", (str(target),))

        await self._read(vacuum_into)

    async def close(self) -> None:
        self._closing = True
        if self._flusher is not None:
            # Writes are flushed in order: once this one is done, all before it are too.
            with contextlib.suppress(StoreUnavailable, *_DB_ERRORS):
                await self._write(_nothing)
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = None
        if self._file_watch is not None:
            await self._file_watch.close()  # after a rescue copy in progress is written
        await self._dispose()

    async def _dispose(self) -> None:
        self._closed = True
        if self._postgres is not None:
            await self._postgres.dispose()
        if self._readers is not None:
            await asyncio.to_thread(self._close_readers)
        if self._thread is not None:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._thread, self._close_writer)
            self._thread.shutdown(wait=False)

    def _close_readers(self) -> None:
        """The reads under way finish first (those still waiting are refused), so that
        every read connection is back in the pool to be closed."""
        assert self._readers is not None and self._sqlite_reader is not None
        self._readers.shutdown(wait=True)
        self._sqlite_reader.dispose()

    def _close_writer(self) -> None:
        """In the writer thread, which owns the write connection and the lock file."""
        assert self._sqlite_writer is not None
        self._sqlite_writer.dispose()
        if self._lock is not None:
            self._lock.close()

    async def _migrate(self) -> None:
        for attempt in (1, 2):
            try:
                # A process that starts while another upgrades a big database waits
                # for it (SQLite: the file lock; PostgreSQL: an advisory lock).
                await self._transaction([_create_or_upgrade], wait=MIGRATION_WAIT)
                return
            except (IntegrityError, DBAPIError):
                # Another process created the schema at the same moment: look again.
                if attempt == 2:
                    raise

    # -- the server's side -------------------------------------------------------------

    async def insert_queued(self, job: MailJob) -> None:
        """Create the record of an accepted message (a no-op if a worker already did)."""

        try:
            await self._write(_NewRecord(job))
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

        def work(conn: Connection) -> Any:
            row = conn.execute(select(table).where(where)).first()
            if row is not None and _expired(row.created_at):
                conn.execute(delete(table).where(where))
                row = None
            if row is None:
                conn.execute(
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
            row = await self._read(lambda conn: conn.execute(select(table).where(where)).first())
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

        def work(conn: Connection) -> None:
            conn.execute(delete(table).where(table.c.created_at < now_utc() - IDEMPOTENCY_TTL))
            conn.execute(
                insert(table).values(batch_id=batch_id, answer=answer, created_at=now_utc())
            )

        await self.write(work)

    async def batch_answer(self, batch_id: str) -> str | None:
        """The answer :meth:`save_batch_answer` kept, or None (the batch is still running)."""
        table = batch_answers_table
        query = select(table.c.answer).where(table.c.batch_id == batch_id)
        answer = await self._read(lambda conn: conn.scalar(query))
        return None if answer is None else str(answer)

    async def purge_idempotency_keys(self) -> None:
        """Forget keys older than 24 hours (the server does this hourly)."""
        cutoff = now_utc() - IDEMPOTENCY_TTL
        await self._run(delete(idempotency_table).where(idempotency_table.c.created_at < cutoff))

    async def cancel(
        self, message_id: str, detail: str = "cancelled through the API"
    ) -> tuple[Literal["cancelled", "already", "conflict", "missing"], MessageRecord | None]:
        """Take back a ``queued``, ``scheduled`` or ``retrying`` message: it becomes
        ``cancelled`` (final), and a worker that gets its copy later acks it unsent.

        A compare-and-set on the status read (and the attempt number): a worker's claim
        that committed first wins (``conflict``: the record is ``sending`` or final), and
        a claim after this sees ``cancelled``. ``already`` when it was cancelled before."""

        def work(conn: Connection) -> tuple[Any, MessageRecord | None]:
            while True:
                record = self._load(conn, message_id)
                if record is None:
                    return "missing", None
                if record.status == "cancelled":
                    return "already", record
                if record.status not in CANCELLABLE:
                    return "conflict", record
                expect = {"expect_status": record.status, "expect_attempts": record.attempts}
                values = {"next_attempt_at": None, "lease_until": None}
                updated = self._write_transition(
                    conn, record, "cancelled", detail, values, expected=expect
                )
                if updated is not None:
                    return "cancelled", updated

        result: tuple[Any, MessageRecord | None] = await self.write(work)
        return result

    # -- the suppression list --------------------------------------------------------

    async def suppress(
        self, addresses: dict[str, str], source: Literal["bounce", "operator"]
    ) -> None:
        """Put ``addresses`` (normalised form -> reason) on the suppression list. An
        operator's entry replaces the reason of one already there; a bounce's keeps it."""
        if not addresses:
            return
        table = suppressions_table
        rows = [
            {"address": a, "reason": r[:1000], "source": source, "created_at": now_utc()}
            for a, r in addresses.items()
        ]

        def work(conn: Connection) -> None:
            if conn.dialect.name == "postgresql":
                from sqlalchemy.dialects.postgresql import insert as pg_insert

                statement: Any = pg_insert(table)
            else:
                statement = sqlite_insert(table)
            if source == "operator":
                statement = statement.on_conflict_do_update(
                    index_elements=["address"],
                    set_={"reason": statement.excluded.reason, "source": "operator"},
                )
            else:
                statement = statement.on_conflict_do_nothing(index_elements=["address"])
            conn.execute(statement, rows)

        await self.write(work)

    async def unsuppress(self, address: str) -> bool:
        """Take ``address`` (normalised) off the list; False when it was not on it."""
        table = suppressions_table

        def work(conn: Connection) -> bool:
            return bool(conn.execute(delete(table).where(table.c.address == address)).rowcount)

        removed: bool = await self.write(work)
        return removed

    async def suppressions(
        self, limit: int | None = None, after: str | None = None, only: str | None = None
    ) -> list[dict[str, Any]]:
        """Entries in address order (``after``: the last address of the page before;
        ``only``: just this address)."""
        table = suppressions_table
        query = select(table).order_by(table.c.address)
        if after is not None:
            query = query.where(table.c.address > after)
        if only is not None:
            query = query.where(table.c.address == only)
        if limit is not None:
            query = query.limit(limit)
        rows = await self._read(lambda conn: conn.execute(query).all())
        return [
            {
                "address": r.address,
                "reason": r.reason,
                "source": r.source,
                "created_at": _iso(r.created_at),
            }
            for r in rows
        ]

    async def suppressed_addresses(self) -> frozenset[str]:
        """Every suppressed address (normalised): what a worker caches."""
        query = select(suppressions_table.c.address)
        return await self._read(lambda conn: frozenset(conn.execute(query).scalars()))

    # -- reads -------------------------------------------------------------------------

    # -- templates (issue 12) ------------------------------------------------------------

    async def put_template(self, template: StoredTemplate) -> bool:
        """Create or replace a template; True when it is new."""
        table = templates_table
        values = {
            "subject": template.subject,
            "text": template.text,
            "html": template.html,
            "updated_at": now_utc(),
        }

        def work(conn: Connection) -> bool:
            changed = conn.execute(
                update(table).where(table.c.name == template.name).values(**values)
            ).rowcount
            if changed:
                return False
            conn.execute(insert(table).values(name=template.name, **values))
            return True

        return bool(await self.write(work))

    async def get_template(self, name: str) -> StoredTemplate | None:
        table = templates_table
        query = select(table).where(table.c.name == name)
        row = await self._read(lambda conn: conn.execute(query).first())
        if row is None:
            return None
        return StoredTemplate(row.name, row.subject, row.text, row.html, _iso(row.updated_at))

    async def delete_template(self, name: str) -> bool:
        """Forget a template; False when there was none."""
        table = templates_table

        def work(conn: Connection) -> bool:
            return bool(conn.execute(delete(table).where(table.c.name == name)).rowcount)

        return bool(await self.write(work))

    async def get(self, message_id: str) -> MessageRecord | None:
        parameters = {"message_id": message_id}
        row = await self._read(lambda conn: conn.execute(_SELECT_ONE, parameters).first())
        return _record(row) if row is not None else None

    async def list(
        self,
        status: str | None = None,
        limit: int = 50,
        tag: str | None = None,
        meta: tuple[str, str] | None = None,
        *,
        before: tuple[datetime, str] | None = None,
        recipient: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> list[MessageRecord]:
        """Records newest first (``created_at``, then ``id``). ``before`` is a cursor: the
        ``(created_at, id)`` of the last record of the page before, so a page never
        shifts when messages arrive meanwhile. ``recipient`` is an envelope address
        (``user@example.com``, compared in lower case); ``since`` and ``until`` bound
        ``created_at`` (until: exclusive). Every combination is read from an index in the
        order it answers (:func:`list_statement`)."""
        statement = list_statement(
            status,
            limit,
            tag=tag,
            meta=meta,
            recipient=recipient,
            before=before,
            since=since,
            until=until,
        )
        rows = await self._read(lambda conn: conn.execute(statement).all())
        return [_record(r) for r in rows]

    async def count_by_status(self) -> dict[str, int]:
        """How many records have each status (one grouped query)."""
        query = select(messages_table.c.status, func.count()).group_by(messages_table.c.status)
        rows = await self._read(lambda conn: conn.execute(query).all())
        return {str(status): int(count) for status, count in rows}

    # -- upkeep: retention, figures, capacity tests --------------------------------------

    async def prune(self, older_than: datetime, batch: int = PRUNE_BATCH) -> int:
        """Delete the finished records (FINAL) created before ``older_than``, with their
        lookup rows; how many. Records still to be sent are never touched.

        Each batch of at most ``batch`` records is one small unit of the writer (so it
        takes turns with the accepts and outcomes rather than holding the write lock),
        found through the status index, oldest first; a short pause between batches lets
        other writes through.
        """
        table = messages_table
        removed = 0
        for status in sorted(FINAL):
            oldest = (
                select(table.c.id, table.c.created_at, table.c.results, table.c.tags, table.c.meta)
                .where((table.c.status == status) & (table.c.created_at < older_than))
                .order_by(table.c.created_at, table.c.id)
                .limit(batch)
            )

            def work(conn: Connection, oldest: Select[Any] = oldest) -> int:
                rows = conn.execute(oldest).all()
                if not rows:
                    return 0
                keys = [
                    {"t": term, "c": row.created_at, "m": row.id}
                    for row in rows
                    for term in _terms(row.results, row.tags, row.meta)
                ]
                if keys:
                    conn.execute(_DELETE_LOOKUP, keys)
                ids = [row.id for row in rows]
                return int(conn.execute(delete(table).where(table.c.id.in_(ids))).rowcount)

            while True:
                deleted = await self.write(work)
                removed += deleted
                if deleted < batch:
                    break
                await asyncio.sleep(PRUNE_PAUSE)
        return removed

    async def expire(self, retention_days: int) -> int:
        """Apply the retention (``MESSAGE_RETENTION_DAYS``; 0 keeps everything): prune the
        finished records created more than that many days ago; how many were removed."""
        if retention_days <= 0:
            return 0
        return await self.prune(now_utc() - timedelta(days=retention_days))

    async def stats(self) -> RecordStats:
        """How many records there are, by status, and when the oldest was created."""
        by_status = await self.count_by_status()
        query = select(func.min(messages_table.c.created_at))
        oldest = await self._read(lambda conn: conn.scalar(query))
        found = dict(sorted(by_status.items()))
        return RecordStats(sum(found.values()), found, _aware(_datetime(oldest)))

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return "sqlite" if self._postgres is None else "postgresql"

    async def insert_rows(self, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """Insert ready-made rows into ``mailroom_messages`` in one write transaction, with
        the driver's own ``executemany`` (each value as the driver takes it: see
        seeding.py), and have the database write their lookup rows from the records'
        JSON. The rows are in the order of ``created_at``, and their recipients in ASCII.
        For capacity tests on PostgreSQL (SQLite seeds faster with :meth:`insert_file`):
        nothing is checked or converted."""
        if not rows:
            return
        names = ", ".join(columns)
        at = columns.index("created_at")
        low, high = (_aware(_datetime(rows[n][at])) for n in (0, -1))

        def work(conn: Connection) -> None:
            if conn.dialect.paramstyle == "qmark":
                marks = ", ".join("?" for _ in columns)
            else:  # asyncpg: numeric_dollar
                marks = ", ".join(f"${i}" for i in range(1, len(columns) + 1))
            conn.exec_driver_sql(
                f"INSERT INTO {messages_table.name} ({names}) VALUES ({marks})",  # noqa: S608 - our column names
                list(rows),
            )
            _fill_lookup_between(conn, low, high, from_low=True)

        await self.write(work)

    async def insert_file(self, path: str, columns: Sequence[str]) -> None:
        """SQLite: copy the rows of another SQLite file, ``path``, into the database in
        one write transaction: its table ``records`` (``columns``, each value as the
        driver would take it: see seeding.py; in the order of ``created_at``) into
        ``mailroom_messages``, and its table ``lookup`` (term, created_at, message_id: the
        records' lookup rows, in the order of the lookup's key) into ``mailroom_lookup``,
        each in the order of its rowids. For capacity tests: nothing is checked or
        converted.

        The file is attached to the write connection around the transaction (ATTACH
        cannot be in one), and each table goes in with one statement that SQLite runs
        on its own, with no Python value to convert. ``OR FAIL``: a row that fails stops
        its statement where it is (and the transaction is rolled back), so SQLite keeps
        no statement journal, which would copy every page the statement changes. The
        commit does not copy the WAL into the database (a checkpoint, which would hold
        the lock all the while); :meth:`_checkpoint` does after it, without the lock."""
        if self._thread is None:
            raise ValueError("insert_file is for SQLite only")
        names = ", ".join(columns)

        def work(conn: Connection) -> None:
            # This process's write connection: a larger page cache for the indexes, and
            # no checkpoint in the commit (with the lock held): one after it.
            conn.exec_driver_sql(f"PRAGMA cache_size=-{SEED_CACHE_KIB}")
            conn.exec_driver_sql("PRAGMA wal_autocheckpoint=0")
            conn.exec_driver_sql(
                f"INSERT OR FAIL INTO {messages_table.name} ({names}) "  # noqa: S608 - our column names
                f"SELECT {names} FROM chunk.records ORDER BY rowid"
            )
            conn.exec_driver_sql(
                "INSERT OR FAIL INTO mailroom_lookup (term, created_at, message_id) "
                "SELECT term, created_at, message_id FROM chunk.lookup ORDER BY rowid"
            )

        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._thread, self._on_writer, "ATTACH ? AS chunk", (path,))
        try:
            await self.write(work)
        finally:
            try:
                await loop.run_in_executor(self._thread, self._on_writer, "DETACH chunk", ())
            except StoreUnavailable as exc:  # the copy's own error, if any, goes on up
                log.warning("seeding: %s", exc)
            finally:
                await loop.run_in_executor(self._thread, self._checkpoint)

    def _on_writer(self, sql: str, parameters: tuple[Any, ...]) -> None:
        """In the writer thread, outside a transaction: one statement on the write
        connection (a SQLite error raised as :class:`StoreUnavailable`)."""
        assert self._sqlite_writer is not None
        raw = self._sqlite_writer.raw_connection()
        try:
            driver = raw.driver_connection
            assert driver is not None
            driver.execute(sql, parameters)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"{sql.split()[0]}: {exc}") from exc
        finally:
            raw.close()

    def _checkpoint(self) -> None:
        """In the writer thread, after a transaction of :meth:`insert_file`: copy the WAL
        into the database (as the commit would have), without Mailroom's file lock (other
        processes write meanwhile) and without waiting for anyone (PASSIVE); then the
        commits checkpoint again as usual."""
        assert self._sqlite_writer is not None
        raw = self._sqlite_writer.raw_connection()
        try:
            driver = raw.driver_connection
            assert driver is not None
            with contextlib.suppress(sqlite3.OperationalError):  # another one runs
                driver.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            driver.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT}")
            driver.execute(f"PRAGMA cache_size=-{WRITER_CACHE_KIB}")  # insert_file's back
        finally:
            raw.close()

    async def add_lookups(self, records: Sequence[dict[str, Any]]) -> None:
        """The lookup rows of ``records`` (dicts with ``id``, ``created_at``, ``results``,
        ``tags``, ``meta``, as SQLAlchemy reads them) that are missing: for records that
        came in some other way than :func:`_insert_queued` (``admin.py db copy``)."""
        keys = [
            {"term": term, "created_at": r["created_at"], "message_id": r["id"]}
            for r in records
            for term in _terms(r.get("results") or {}, r.get("tags"), r.get("meta"))
        ]
        if not keys:
            return

        def work(conn: Connection) -> None:
            conn.execute(_insert_lookup_ignoring(conn.dialect.name), keys)

        await self.write(work)

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

        def work(conn: Connection) -> Claim:
            while True:
                record = self._load(conn, job.id)
                if record is None:
                    _insert_queued(conn, job)
                    record = self._load(conn, job.id)
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
                values = {
                    "attempts": number,
                    "next_attempt_at": None,
                    "owner": owner,
                    "lease_until": now + timedelta(seconds=lease),
                    "copy": copy,
                }
                # Compare-and-set on the state just read: a cancel (or another claim) that
                # committed in between wins, and the record is read again.
                expect = {"expect_status": record.status, "expect_attempts": record.attempts}
                updated = self._write_transition(
                    conn, record, "sending", None, values, expected=expect
                )
                if updated is not None:
                    return Claim("claimed", updated, Attempt(job.id, number, owner, updated))

        unit: Unit = _Claiming(job, work)
        # The usual case, one statement: the first attempt at a record that nothing
        # touched since it was written (so it is still what the job says it is).
        if (fresh := _queued_record(job)) is not None and copy >= fresh.copy:
            untouched = fresh

            def first_claim() -> tuple[dict[str, Any], Claim]:
                values = {
                    "attempts": 1,
                    "next_attempt_at": None,
                    "owner": owner,
                    "lease_until": now_utc() + timedelta(seconds=lease),
                    "copy": copy,
                }
                changes, claimed = _transition_of(untouched, "sending", None, values)
                return changes, Claim("claimed", claimed, Attempt(job.id, 1, owner, claimed))

            unit = _FastUnit("untouched", job.id, None, first_claim, work, job)
        try:
            result: Claim = await self._write(unit)
        except _DB_ERRORS as exc:
            raise StoreUnavailable(_describe(exc)) from exc
        return result

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

        def outcome(record: MessageRecord) -> dict[str, Any]:
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
            return values

        def work(conn: Connection) -> bool:
            record = self._load(conn, attempt.message_id)
            if record is None:
                raise StoreUnavailable(f"no record for message {attempt.message_id}")
            if not _holds(record, attempt):
                note = f"{LATE_OUTCOME} {attempt.number}, not applied"
                if error:
                    note += f": {error[:200]}"
                self._append_history(conn, record, status, note)
                return False
            self._transition(conn, record, status, detail=detail, **outcome(record))
            return True

        unit: Unit = work
        if (claimed := attempt.record) is not None:
            # The usual case, one statement: still held, so still as claimed.

            def held_outcome() -> tuple[dict[str, Any], bool]:
                return _transition_of(claimed, status, detail, outcome(claimed))[0], True

            held = {"held_owner": attempt.owner, "held_attempts": attempt.number}
            unit = _FastUnit("held", attempt.message_id, held, held_outcome, work)
        try:
            applied: bool = await self._write(unit)
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

    async def hand_back(self, attempt: Attempt) -> bool:
        """Undo ``attempt``'s claim before anything was sent (its worker stopped while
        the message waited for an SMTP connection): the record is ``queued`` again
        (``retrying`` after an earlier attempt: :meth:`MessageRecord.status_before_claim`),
        without an owner, and its history says so. It can be cancelled again, and the
        attempt does not count as one started without an outcome (it stays counted in
        ``attempts``, as redeliveries are: a record is never "untouched" again, see
        ``Store.claim``'s one-statement case). True if applied: the attempt still held it."""

        def work(conn: Connection) -> bool:
            record = self._load(conn, attempt.message_id)
            if record is None or not _holds(record, attempt):
                return False
            self._transition(
                conn,
                record,
                record.status_before_claim(),
                detail=HANDED_BACK,
                owner=None,
                lease_until=None,
            )
            return True

        return bool(await self.write(work))

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

        def work(conn: Connection) -> int | None:
            record = self._load(conn, message_id)
            if record is None:
                return None
            merged = dict(record.results)
            merged.update(results)
            copy = record.copy + 1
            self._transition(
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

        result: int | None = await self.write(work)
        return result

    def _append_history(
        self, conn: Connection, record: MessageRecord, status: str, detail: str
    ) -> None:
        entry = {"status": status, "at": _iso(now_utc()), "detail": detail}
        conn.execute(
            _UPDATES["one"], {"message_id": record.id, "history": [*record.history, entry]}
        )

    def _load(self, conn: Connection, message_id: str) -> MessageRecord | None:
        row = conn.execute(_SELECT_ONE, {"message_id": message_id}).first()
        return _record(row) if row is not None else None

    def _transition(
        self,
        conn: Connection,
        record: MessageRecord,
        status: str,
        detail: str | None = None,
        **values: Any,
    ) -> MessageRecord:
        updated = self._write_transition(conn, record, status, detail, values)
        assert updated is not None
        return updated

    def _write_transition(
        self,
        conn: Connection,
        record: MessageRecord,
        status: str,
        detail: str | None,
        values: dict[str, Any],
        expected: dict[str, Any] | None = None,
    ) -> MessageRecord | None:
        """The transition; with ``expected``, only if the record's status and attempts are
        still those (compare-and-set), else None."""
        changes, after = _transition_of(record, status, detail, values)
        kind: _Where = "one" if expected is None else "expected"
        if _update_row(conn, kind, record.id, changes, expected) != 1 and kind != "one":
            return None
        return after

    async def _run(self, statement: Any) -> None:
        def work(conn: Connection) -> None:
            conn.execute(statement)

        await self.write(work)


# Built once: executing them with parameters skips building a statement per call.
_SELECT_ONE = select(messages_table).where(messages_table.c.id == bindparam("message_id"))
_Where = Literal["one", "held", "untouched", "expected"]
# What each kind of UPDATE compares besides the record's id: columns with fixed values,
# then columns with a value given in its ``condition`` (under the name paired with each).
# The statements below (SQLAlchemy's, SQLite's driver's, PostgreSQL's batched) are all
# built from it.
_WHERE: dict[_Where, tuple[dict[str, str | int], tuple[tuple[str, str], ...]]] = {
    "one": ({}, ()),
    "held": ({"status": "sending"}, (("owner", "held_owner"), ("attempts", "held_attempts"))),
    "untouched": ({"status": "queued", "attempts": 0, "copy": 0}, ()),
    "expected": ({}, (("status", "expect_status"), ("attempts", "expect_attempts"))),
}


def _update_where(kind: _Where) -> Any:
    table = messages_table
    fixed, compared = _WHERE[kind]
    return update(table).where(
        table.c.id == bindparam("message_id"),
        *(table.c[name] == value for name, value in fixed.items()),
        *(table.c[name] == bindparam(param) for name, param in compared),
    )


def _sql_where(kind: _Where, qualify: str, placeholder: Callable[[str], str]) -> str:
    """``kind``'s condition past the id as SQL text: columns prefixed with ``qualify``,
    each compared value written by ``placeholder(its name in the condition)``."""
    fixed, compared = _WHERE[kind]
    terms = [
        f"{qualify}{name} = " + (f"'{value}'" if isinstance(value, str) else str(value))
        for name, value in fixed.items()
    ]
    terms += [f"{qualify}{name} = {placeholder(param)}" for name, param in compared]
    return "".join(f" AND {term}" for term in terms)


_UPDATES: dict[_Where, Any] = {kind: _update_where(kind) for kind in _WHERE}
# The same conditions, for the statements written for SQLite's driver (below).
_SQLITE_WHERE: dict[_Where, str] = {
    kind: "id = ?" + _sql_where(kind, "", lambda param: "?") for kind in _WHERE
}


def _update_row(
    conn: Connection,
    kind: _Where,
    message_id: str,
    changes: dict[str, Any],
    condition: dict[str, Any] | None = None,
) -> int:
    """UPDATE one record with ``changes`` where ``kind`` holds (``condition``: the values
    it compares with, for ``held`` and ``expected``); the rows it changed."""
    if conn.dialect.name != "sqlite":
        return int(
            conn.execute(
                _UPDATES[kind], {"message_id": message_id, **changes, **(condition or {})}
            ).rowcount
        )
    sql, args = _sqlite_update(kind, message_id, changes, condition, _bind_converters(conn.dialect))
    return int(_driver(conn).execute(sql, args).rowcount)


def _sqlite_update(
    kind: _Where,
    message_id: str,
    changes: dict[str, Any],
    condition: dict[str, Any] | None,
    convert: dict[str, Callable[[Any], Any] | None],
) -> tuple[str, list[Any]]:
    """:func:`_update_row`'s statement and values on SQLite, for the driver's cursor: the
    values converted by SQLAlchemy's own column types (the same stored bytes as a full
    SQLAlchemy execution, at a fifth of its time)."""
    args = [(c(v) if (c := convert[k]) else v) for k, v in changes.items()]
    args.append(message_id)
    args += [(condition or {})[param] for _, param in _WHERE[kind][1]]
    return _sqlite_update_sql(tuple(changes), kind), args


def _driver(conn: Connection) -> sqlite3.Connection:
    """The ``sqlite3`` connection under the writer's SQLAlchemy connection."""
    driver = conn.connection.driver_connection
    assert isinstance(driver, sqlite3.Connection)
    return driver


@functools.lru_cache(maxsize=4)
def _bind_converters(dialect: Any) -> dict[str, Callable[[Any], Any] | None]:
    return {c.name: c.type.dialect_impl(dialect).bind_processor(dialect) for c in messages_table.c}


@functools.lru_cache(maxsize=64)
def _sqlite_update_sql(columns: tuple[str, ...], kind: _Where) -> str:
    # Names from the table itself (a KeyError for anything else); every value is bound.
    sets = ", ".join(f'"{messages_table.c[name].name}" = ?' for name in columns)
    return f"UPDATE mailroom_messages SET {sets} WHERE {_SQLITE_WHERE[kind]}"  # noqa: S608


def _accepted_at(job: MailJob) -> datetime | None:
    """When the server accepted ``job`` (its ``created_at``), if that is a UTC time."""
    try:
        at = datetime.fromisoformat(job.created_at)
    except ValueError:
        return None
    return at if at.tzinfo is not None and at.utcoffset() == timedelta(0) else None


def _insert_queued(conn: Connection, job: MailJob) -> None:
    """The record of a newly accepted message. It is a function of the job alone (its
    times are the job's ``created_at``), the same whichever process writes it first; so
    a worker can claim it without reading it (:func:`_queued_record`). A record that is
    already there (the worker got the message before the server's write committed, or the
    other way round) is left as it is (ON CONFLICT DO NOTHING): no error, so a batch of
    writes is never rolled back and replayed one unit at a time for it."""
    if conn.dialect.name == "sqlite":
        _sqlite_insert_new(job, _bind_converters(conn.dialect))(conn)
    else:
        _insert_together(conn, [job])


def _sqlite_insert_new(
    job: MailJob,
    convert: dict[str, Callable[[Any], Any] | None],
    changes: dict[str, Any] | None = None,
) -> _SqliteNewRecord:
    """:func:`_insert_queued` on SQLite, its values converted now: what is left to run
    is the driver's two statements; it says whether it inserted the record (the lookup
    rows go with a record inserted). ``changes``: the new record with those columns
    changed (a claim's, when the record is missing)."""
    row, terms = _queued_row(job)
    if changes:
        row |= changes
    args = [(c(v) if (c := convert[k]) else v) for k, v in row.items()]
    created = convert["created_at"](row["created_at"])  # type: ignore[misc]
    lookups = [(term, created, job.id) for term in terms]
    return _SqliteNewRecord(job.id, tuple(row), _sqlite_insert_sql(tuple(row)), args, lookups)


class _SqliteNewRecord:
    """A new record on SQLite, its values converted (:func:`_sqlite_insert_new`): a unit
    that inserts it alone, or joins the others of its batch (:func:`_sqlite_insert_many`)."""

    __slots__ = ("args", "columns", "lookups", "message_id", "sql")

    def __init__(
        self,
        message_id: str,
        columns: tuple[str, ...],
        sql: str,
        args: list[Any],
        lookups: list[tuple[str, Any, str]],
    ) -> None:
        self.message_id, self.columns, self.sql = message_id, columns, sql
        self.args, self.lookups = args, lookups

    def __call__(self, conn: Connection) -> bool:
        driver = _driver(conn)
        if driver.execute(self.sql, self.args).rowcount != 1:
            return False  # there already
        if len(self.lookups) == 1:  # the usual case: one recipient, no tags or metadata
            driver.execute(_SQLITE_INSERT_LOOKUP, self.lookups[0])
        else:
            driver.executemany(_SQLITE_INSERT_LOOKUP, self.lookups)
        return True


def _sqlite_insert_many(
    conn: Connection, records: Sequence[_SqliteNewRecord], what: str = "new records"
) -> set[str]:
    """The new records of a batch (distinct ids), with their lookup rows, in one INSERT
    per shape and one for all their lookup rows (each in parts, :func:`_chunks`): the
    ids of those inserted (RETURNING; a record already there is left as it is). One
    statement, not two per mail, because the writer thread gives up the GIL for every
    statement and waits for it again, while it holds the file lock that the other
    processes' writes wait for; in a busy server each wait is a fraction of a
    millisecond to several."""
    driver = _driver(conn)
    shapes: dict[tuple[str, ...], list[_SqliteNewRecord]] = {}
    for record in records:
        shapes.setdefault(record.columns, []).append(record)
    inserted: set[str] = set()
    bound = _bound_values(driver)
    for columns, group in shapes.items():
        for chunk in _chunks(group, bound // len(columns)):
            sql = _sqlite_insert_rows_sql(columns, len(chunk))
            rows = driver.execute(sql, [value for record in chunk for value in record.args])
            inserted.update(message_id for (message_id,) in rows.fetchall())
    log.debug("writer: %d %s inserted together", len(records), what)
    lookups = [row for record in records if record.message_id in inserted for row in record.lookups]
    for part in _chunks(lookups, bound // 3):
        driver.execute(_sqlite_insert_lookups_sql(len(part)), [v for row in part for v in row])
    return inserted


_ChunkItem = TypeVar("_ChunkItem")


def _bound_values(driver: sqlite3.Connection) -> int:
    """How many values one statement may bind on this connection, at most
    SQLITE_MAX_PARAMETERS."""
    return min(SQLITE_MAX_PARAMETERS, driver.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER))


def _chunks(items: Sequence[_ChunkItem], most: int) -> list[Sequence[_ChunkItem]]:
    """``items`` in parts of a power of two in size, each at most ``most`` (and at most
    SQLITE_MOST_ROWS), the biggest first: 100 records go as 64 + 32 + 4. The driver keeps
    each statement it ran prepared (128 of them): one per batch size held 24 MB more
    after 200 sizes of a new record's INSERT; the powers of two up to 256 held 1 MB (now
    up to 64), and an UPDATE of a claim's or outcome's shape 0.6 MB at 256 rows alone,
    0.18 at 64.
    (The worker's write batches held 9-13 units on average in scratch runs of 6000
    requests, a new connection each or keep-alive.)"""
    most = max(1, min(most, SQLITE_MOST_ROWS))
    most = 1 << (most.bit_length() - 1)  # a power of two itself
    parts: list[Sequence[_ChunkItem]] = []
    start = 0
    while start < len(items):
        size = min(most, 1 << ((len(items) - start).bit_length() - 1))
        parts.append(items[start : start + size])
        start += size
    return parts


@functools.lru_cache(maxsize=16)
def _sqlite_insert_lookups_sql(rows: int) -> str:
    return _SQLITE_INSERT_LOOKUPS.format(rows=_value_rows(3, rows))


def _value_rows(width: int, rows: int) -> str:
    """``(?, ?), (?, ?)`` for ``rows`` rows of ``width`` bound values."""
    return ", ".join([f"({', '.join('?' * width)})"] * rows)


def _queued_row(job: MailJob) -> tuple[dict[str, Any], list[str]]:
    """The columns of ``job``'s new record (the others are NULL, ``copy`` 0) and its
    lookup terms."""
    at = _accepted_at(job) or now_utc()
    due = job.due_at()
    entry: dict[str, Any] = {"status": "scheduled" if due else "queued", "at": _iso(at)}
    if due is not None:
        entry["detail"] = f"send at {_iso(due)}"
    row = {
        "id": job.id,
        "recipients": list(job.recipients),
        "subject": job.subject,
        "status": entry["status"],
        "attempts": 0,
        "next_attempt_at": due,
        "last_error": None,
        "last_error_code": None,
        "results": {
            addr_spec(a): {"status": "pending", "code": None, "message": None}
            for a in job.recipients
        },
        "history": [entry],
        "created_at": at,
        "updated_at": at,
        "tags": list(job.tags) if job.tags else None,
        "meta": dict(job.metadata) if job.metadata else None,
    }
    return row, _terms(row["results"], job.tags, job.metadata)


class _NewRecord:
    """The unit that writes a newly accepted message's record (:func:`_insert_queued`);
    the writer joins those of a batch into one statement (:func:`_insert_together`,
    :func:`_sqlite_insert_many`)."""

    __slots__ = ("job",)

    def __init__(self, job: MailJob) -> None:
        self.job = job

    def __call__(self, conn: Connection) -> None:
        _insert_queued(conn, self.job)

    def ready(self, convert: dict[str, Callable[[Any], Any] | None]) -> Unit:
        """SQLite: this unit with its values converted (:func:`_ready_units`)."""
        return _sqlite_insert_new(self.job, convert)


class _Claiming:
    """A claim in general (:meth:`Store.claim`): it reads the record, inserts it when it
    is missing, and updates it."""

    __slots__ = ("job", "message_id", "work")

    def __init__(self, job: MailJob, work: Unit) -> None:
        self.job, self.message_id, self.work = job, job.id, work

    def __call__(self, conn: Connection) -> Any:
        return self.work(conn)


_SQLITE_INSERT_LOOKUPS = (
    "INSERT INTO mailroom_lookup (term, created_at, message_id) VALUES {rows} "
    "ON CONFLICT DO NOTHING"
)
_SQLITE_INSERT_LOOKUP = _SQLITE_INSERT_LOOKUPS.format(rows="(?, ?, ?)")


@functools.lru_cache(maxsize=2)
def _insert_lookup_ignoring(dialect: str) -> Any:
    """INSERT into mailroom_lookup, leaving a row that is there already alone."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(lookup_table).on_conflict_do_nothing()
    return sqlite_insert(lookup_table).on_conflict_do_nothing()


_DELETE_LOOKUP = delete(lookup_table).where(
    (lookup_table.c.term == bindparam("t"))
    & (lookup_table.c.created_at == bindparam("c"))
    & (lookup_table.c.message_id == bindparam("m"))
)


def _recipient_key(address: str) -> str:
    """How an envelope address is looked up: in lower case, an IDN domain in ASCII (the
    form the suppression list compares, :func:`messages.suppression_key`)."""
    if address.isascii():
        return address.lower()
    try:
        return suppression_key(address)
    except InvalidMessage:
        return address.lower()


def _terms(results: Any, tags: Any, meta: Any) -> list[str]:
    """The lookup terms of a record: ``to:<address>`` for each envelope address (the keys
    of its results), ``tag:<tag>`` for each tag, ``meta:<key> <value>`` for each metadata
    pair (a key has no space). Each once."""
    terms = [f"to:{_recipient_key(a)}" for a in results]
    if tags:
        terms += [f"tag:{t}" for t in tags]
    if meta:
        pairs = meta.items() if isinstance(meta, dict) else meta
        terms += [f"meta:{k} {v}" for k, v in pairs]
    return terms if len(terms) == 1 else list(dict.fromkeys(terms))


def list_statement(
    status: str | None,
    limit: int,
    *,
    tag: str | None = None,
    meta: tuple[str, str] | None = None,
    recipient: str | None = None,
    before: tuple[datetime, str] | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> Select[Any]:
    """The query of a list, newest first (``created_at``, then ``id``), read from an index
    in that order so that it stops after ``limit`` matching rows whatever the table holds:

    * by recipient, tag or metadata: the lookup table's primary key for the first of
      those terms, joined to the records; another term is checked by primary key;
    * otherwise ``ix_mailroom_messages_status_created`` for one status, else
      ``ix_mailroom_messages_created``.

    A cursor (``before``) and ``since``/``until`` are ranges of the same index; the status
    is checked on each record found through the lookup table.
    """
    table = messages_table
    terms = []
    if recipient is not None:
        terms.append(f"to:{_recipient_key(recipient)}")
    if tag is not None:
        terms.append(f"tag:{tag}")
    if meta is not None:
        terms.append(f"meta:{meta[0]} {meta[1]}")
    query = select(table)
    if terms:
        found = lookup_table.alias("found")
        at, key = found.c.created_at, found.c.message_id
        query = query.select_from(found.join(table, table.c.id == key)).where(
            found.c.term == terms[0]
        )
        for term in terms[1:]:
            also = lookup_table.alias()
            query = query.where(
                select(also.c.term)
                .where(
                    (also.c.term == term) & (also.c.created_at == at) & (also.c.message_id == key)
                )
                .exists()
            )
    else:
        at, key = table.c.created_at, table.c.id
    if status is not None:
        query = query.where(table.c.status == status)
    if before is not None:
        query = query.where(tuple_(at, key) < tuple_(*before))
    if since is not None:
        query = query.where(at >= since)
    if until is not None:
        query = query.where(at < until)
    return query.order_by(at.desc(), key.desc()).limit(limit)


@functools.lru_cache(maxsize=4)
def _sqlite_insert_sql(columns: tuple[str, ...]) -> str:
    return _sqlite_insert_rows_sql(columns, 1).removesuffix(" RETURNING id")


@functools.lru_cache(maxsize=32)
def _sqlite_insert_rows_sql(columns: tuple[str, ...], rows: int) -> str:
    # Names from the table itself (a KeyError for anything else); every value is bound.
    names = ", ".join(f'"{messages_table.c[name].name}"' for name in columns)
    return (
        f"INSERT INTO mailroom_messages ({names}) VALUES {_value_rows(len(columns), rows)} "  # noqa: S608
        "ON CONFLICT (id) DO NOTHING RETURNING id"
    )


def _queued_record(job: MailJob) -> MessageRecord | None:
    """The record :func:`_insert_queued` wrote for ``job``, as long as nothing changed it
    since (status ``queued``, no attempt yet); None when its time is not the job's."""
    at = _accepted_at(job)
    if at is None or job.send_at is not None:
        return None
    return MessageRecord(
        id=job.id,
        recipients=list(job.recipients),
        subject=job.subject,
        status="queued",
        attempts=0,
        next_attempt_at=None,
        last_error=None,
        last_error_code=None,
        results={addr_spec(a): RecipientResult("pending") for a in job.recipients},
        history=[{"status": "queued", "at": _iso(at)}],
        created_at=at,
        updated_at=at,
        tags=list(job.tags),
        metadata=dict(job.metadata),
    )


def _transition_of(
    record: MessageRecord, status: str, detail: str | None, values: dict[str, Any]
) -> tuple[dict[str, Any], MessageRecord]:
    """The column changes that move ``record`` to ``status`` with ``values`` (its history
    one entry longer), and the record they make, without reading it back."""
    at = now_utc()
    entry: dict[str, Any] = {"status": status, "at": _iso(at)}
    if detail:
        entry["detail"] = detail
    history = [*record.history, entry]
    changes = {"status": status, "history": history, "updated_at": at, **values}
    kept = {k: v for k, v in values.items() if k != "results"}
    if "results" in values:
        stored = {a: r if isinstance(r, dict) else r.__dict__ for a, r in values["results"].items()}
        changes["results"] = stored
        kept["results"] = {a: RecipientResult(**r) for a, r in stored.items()}
    return changes, dataclasses.replace(
        record, status=status, history=history, updated_at=at, **kept
    )


def _whole_batch_failed(exc: BaseException) -> bool:
    """Did the write transaction fail as a whole, rather than for one of its units?"""
    return isinstance(exc, _BatchNotWritten) or (
        isinstance(exc, DBAPIError) and exc.connection_invalidated
    )


def _copy_of(exc: Exception) -> Exception:
    """``exc`` for one more caller: its own instance where that is easy to make (each
    caller's traceback then stays its own)."""
    if isinstance(exc, StoreUnavailable):
        return type(exc)(*exc.args)
    return exc


class _FastUnit:
    """A unit whose usual case is one UPDATE of one record: ``prepare()`` gives, when the
    unit runs, the column changes to write where ``kind`` holds (with ``condition``'s
    values) and the unit's result if that row was updated; else :meth:`missing` (a
    claim's record inserted as claimed) or ``slow(conn)`` runs and gives it. Alone it runs
    that UPDATE itself; the writer joins the usual cases of a batch into one statement
    per shape (:func:`_run_units`; on SQLite :func:`_run_sqlite_units`, where one of a
    shape runs alone)."""

    __slots__ = ("condition", "job", "kind", "message_id", "prepare", "slow")

    def __init__(
        self,
        kind: _Where,
        message_id: str,
        condition: dict[str, Any] | None,
        prepare: Callable[[], tuple[dict[str, Any], Any]],
        slow: Unit,
        job: MailJob | None = None,
    ) -> None:
        """``job``: a claim's, whose record, when it is missing, is inserted with the
        changes made instead of taking the slow path (:meth:`missing`)."""
        self.kind, self.message_id, self.condition = kind, message_id, condition
        self.prepare, self.slow, self.job = prepare, slow, job

    def __call__(self, conn: Connection) -> Any:
        return self.apply(conn, *self.prepare())

    def apply(self, conn: Connection, changes: dict[str, Any], result: Any) -> Any:
        """Its usual case alone, with prepared ``changes``; else :meth:`missing`."""
        if _update_row(conn, self.kind, self.message_id, changes, self.condition) == 1:
            return result
        return self.missing(conn, changes, result)

    def missing(self, conn: Connection, changes: dict[str, Any], result: Any) -> Any:
        """Its UPDATE changed no row. A claim's record may be missing (the worker got the
        message before the server's insert committed): inserted as the claim makes it,
        the record that the slow path would insert and update (SQLite: two statements
        against its six, read, insert, read, update); else the slow path."""
        if self.job is not None and _insert_claimed(conn, self.job, changes):
            return result
        return self.slow(conn)

    def ready(self, convert: dict[str, Callable[[Any], Any] | None]) -> _SqliteUpdate:
        """SQLite: this unit with its changes prepared and converted (:func:`_ready_units`)."""
        changes, result = self.prepare()
        sql, args = _sqlite_update(self.kind, self.message_id, changes, self.condition, convert)
        return _SqliteUpdate(self, changes, result, sql, args)


class _SqliteUpdate:
    """A :class:`_FastUnit` on SQLite, its UPDATE prepared (:meth:`_FastUnit.ready`): a
    unit that runs it alone (:meth:`_FastUnit.apply`), or joins the others of its shape in
    the batch (:func:`_sqlite_update_many`)."""

    __slots__ = ("args", "changes", "fast", "result", "sql")

    def __init__(
        self, fast: _FastUnit, changes: dict[str, Any], result: Any, sql: str, args: list[Any]
    ) -> None:
        self.fast, self.changes, self.result, self.sql, self.args = fast, changes, result, sql, args

    def __call__(self, conn: Connection) -> Any:
        if _driver(conn).execute(self.sql, self.args).rowcount == 1:
            return self.result
        return self.fast.missing(conn, self.changes, self.result)

    @property
    def shape(self) -> tuple[_Where, tuple[str, ...]]:
        return self.fast.kind, tuple(self.changes)


def _ready_units(units: list[Unit], dialect: Any) -> list[Unit]:
    """SQLite, in the writer thread before it takes the file lock: the per-mail units
    (:class:`_NewRecord`, :class:`_FastUnit`) with their Python work done (rows built,
    JSON and times converted), so that what runs while the lock is held, keeping the other
    process's writes waiting, is the driver's statements and the commit
    (bench/store_cost.py: a new record holds the lock 16-19 us instead of 51-53, a claim
    and its outcome 25-41 us instead of 81-113; with ``--busy``, 53 us instead of 95-109
    and 87-108 us instead of 194-197). After a wait for the lock longer than READY_FOR
    they are made again (:meth:`Store._sqlite_transaction`): their times, a claim's
    lease among them, count from the write."""
    convert = _bind_converters(dialect)
    return [
        unit.ready(convert) if isinstance(unit, (_NewRecord, _FastUnit)) else unit for unit in units
    ]


def _run_sqlite_units(conn: Connection, units: list[Unit]) -> list[Any]:
    """SQLite: the new records of the batch first, together (:func:`_sqlite_insert_many`);
    then its claims and outcomes, one UPDATE per shape (:func:`_sqlite_update_many`), the
    records of the claims that found theirs missing inserted together as claimed, and the
    odd ones out (an outcome whose condition did not hold) on their own path; then the
    others, one by one in order. As on PostgreSQL, a record that two units of the batch
    touch joins with the first of them, and the other runs after, alone; the units of a
    batch come from callers running concurrently, so no order among them is promised.
    Each statement less is one wait less for the GIL while the file lock is held (see
    :func:`_sqlite_insert_many`)."""
    if not SQLITE_RETURNING:
        return [unit(conn) for unit in units]
    results: list[Any] = [None] * len(units)
    todo = set(range(len(units)))
    new: dict[str, tuple[int, _SqliteNewRecord]] = {}
    updates: dict[str, tuple[int, _SqliteUpdate]] = {}
    for index, unit in enumerate(units):
        if isinstance(unit, _SqliteNewRecord):
            new.setdefault(unit.message_id, (index, unit))
        elif isinstance(unit, _SqliteUpdate):
            updates.setdefault(unit.fast.message_id, (index, unit))
    if len(new) > 1:
        inserted = _sqlite_insert_many(conn, [record for _, record in new.values()])
        for index, record in new.values():
            results[index] = record.message_id in inserted
            todo.discard(index)
    shapes: dict[tuple[_Where, tuple[str, ...]], list[tuple[int, _SqliteUpdate]]] = {}
    for index, prepared in updates.values():
        shapes.setdefault(prepared.shape, []).append((index, prepared))
    missing: dict[int, _SqliteUpdate] = {}
    for group in shapes.values():
        if len(group) < 2:
            continue  # alone: its own statement, in its place below
        updated = _sqlite_update_many(conn, [prepared for _, prepared in group])
        for index, prepared in group:
            if prepared.fast.message_id in updated:
                results[index] = prepared.result
            else:
                missing[index] = prepared
            todo.discard(index)
    convert = _bind_converters(conn.dialect)
    made = {
        index: _sqlite_insert_new(prepared.fast.job, convert, prepared.changes)
        for index, prepared in missing.items()
        if prepared.fast.job is not None  # a claim: its record may be missing
    }
    if made:
        inserted = _sqlite_insert_many(conn, list(made.values()), "missing records, as claimed,")
        for index, record in made.items():
            if record.message_id in inserted:
                results[index] = missing.pop(index).result
    for index, prepared in missing.items():  # there, but its usual case did not hold
        results[index] = prepared.fast.slow(conn)
    for index in sorted(todo):
        results[index] = units[index](conn)
    return results


def _sqlite_update_many(conn: Connection, group: Sequence[_SqliteUpdate]) -> set[str]:
    """Claims or outcomes of one shape (distinct records), each row's changes where its
    own condition holds, in one ``UPDATE ... FROM (VALUES ...) RETURNING id`` (as many as
    SQLite's bound values need): the ids of the records updated."""
    kind, changed = group[0].shape
    width = len(group[0].args)  # one row's values
    driver = _driver(conn)
    updated: set[str] = set()
    for chunk in _chunks(group, _bound_values(driver) // width):
        sql = _sqlite_update_rows_sql(kind, changed, len(chunk))
        rows = driver.execute(sql, [value for update in chunk for value in update.args])
        updated.update(message_id for (message_id,) in rows.fetchall())
    log.debug("writer: %d %s updates in one statement, %d applied", len(group), kind, len(updated))
    return updated


@functools.lru_cache(maxsize=64)
def _sqlite_update_rows_sql(kind: _Where, changed: tuple[str, ...], rows: int) -> str:
    """The SQL of :func:`_sqlite_update_many` for one shape and number of rows (UPDATE
    ... FROM and RETURNING: SQLite 3.35.5 and newer, SQLITE_RETURNING); it looks each
    record up by its primary key (test_ownership checks the plan)."""
    compared = _WHERE[kind][1]
    # A row's values in the single UPDATE's order (:func:`_sqlite_update`), the changes,
    # the id, the compared values: each row is its unit's ``args`` as they are.
    names = ", ".join(f'"{name}"' for name in [*changed, "id", *(p for _, p in compared)])
    marks = _value_rows(1 + len(changed) + len(compared), rows)
    # Names from the table itself (a KeyError for anything else) and the fixed conditions.
    sets = ", ".join(f'"{messages_table.c[name].name}" = v."{name}"' for name in changed)
    # "+m.status": no index for the condition's columns (status has one), so that SQLite
    # looks each record up by its id whatever its statistics say; every value is bound.
    where = _sql_where(kind, "+m.", lambda param: f'v."{param}"')
    head = f"WITH v({names}) AS (VALUES {marks}) "
    update = f"UPDATE {messages_table.name} AS m SET {sets} FROM v "  # noqa: S608
    return f"{head}{update}WHERE m.id = v.id{where} RETURNING id"


def _run_units(conn: Connection, units: list[Unit]) -> list[Any]:
    if conn.dialect.name != "postgresql":
        return _run_sqlite_units(conn, units)
    # PostgreSQL: the new records first, all in one statement; then the usual cases, one
    # UPDATE per shape for all of them: one round trip instead of one per mail (a record
    # that two units of the batch touch: only the first joins; the other runs after,
    # alone). A new record's insert changes nothing where the record exists, whoever made
    # it, so it may go before the batch's other units.
    # The order keeps a server and a worker from deadlocking (PostgreSQL would abort one
    # after deadlock_timeout, a second): a worker's claim inserts the record it got before
    # the server's insert committed, so both insert the same records; an insert waits for
    # a transaction that inserted or updated the same record. Records are inserted in id
    # order, by the server here (before its other units) and by the claims below (one
    # statement, insert_missing); a batch's claims run before its other units, which only
    # update rows that exist: once a worker's transaction has updated a row that the
    # server's insert may wait for, it waits for nothing more. Not covered: a server's
    # batch that cancels a message (an UPDATE, after its inserts) which a worker's batch
    # claims while that batch waits for one of the server's inserts; PostgreSQL then
    # aborts one after a second, whose units are written again one at a time.
    new: dict[str, MailJob] = {}
    for unit in units:
        if isinstance(unit, _NewRecord):
            new.setdefault(unit.job.id, unit.job)  # the first, as one at a time
    if new:
        _insert_together(conn, [new[message_id] for message_id in sorted(new)])
        units = [_nothing if isinstance(unit, _NewRecord) else unit for unit in units]
    groups: dict[tuple[Any, ...], list[tuple[_FastUnit, dict[str, Any], Any]]] = {}
    prepared: dict[int, tuple[_FastUnit, dict[str, Any], Any]] = {}
    seen: set[str] = set()
    for unit in units:
        if isinstance(unit, _FastUnit) and unit.message_id not in seen:
            seen.add(unit.message_id)
            changes, result = unit.prepare()
            shape = (unit.kind, tuple(changes))
            groups.setdefault(shape, []).append((unit, changes, result))
            prepared[id(unit)] = (unit, changes, result)
    done: dict[int, tuple[_FastUnit, bool, Any]] = {}

    def update_together(claims: bool) -> None:
        for group in groups.values():
            if _may_insert(group[0][0]) != claims:
                continue
            if len(group) < 2 and not claims:
                continue  # alone: its own statement, in its place below
            # (Claims even alone: one whose record is missing then goes with the others
            # into insert_missing's statement, which inserts in id order.)
            sql, arrays = _batched_update(group, _bind_converters(conn.dialect))
            updated = set(conn.exec_driver_sql(sql, arrays).scalars())
            log.debug(
                "writer: %d %s updates in one statement, %d applied",
                len(group),
                group[0][0].kind,
                len(updated),
            )
            for fast, _, result in group:
                done[id(fast)] = (fast, fast.message_id in updated, result)

    def insert_missing() -> None:
        """In one statement, in id order: the records of the claims whose UPDATE together
        changed no row, inserted as claimed where missing (:meth:`_FastUnit.missing`), and
        those of the general claims (:class:`_Claiming`), inserted as the server does
        where missing: so that no claim inserts a record after this statement, out of
        id order."""
        rows: list[tuple[str, MailJob, dict[str, Any], _FastUnit | None]] = []
        for claim, applied, _ in done.values():
            if not applied and claim.job is not None:
                rows.append((claim.message_id, claim.job, prepared[id(claim)][1], claim))
        for unit in units:
            if isinstance(unit, _Claiming):
                rows.append((unit.message_id, unit.job, _UNCLAIMED, None))
        first: dict[str, tuple[str, MailJob, dict[str, Any], _FastUnit | None]] = {}
        for row in rows:
            first.setdefault(row[0], row)  # a record once: a claim's row before a plain one
        if not first:
            return
        chosen = [first[message_id] for message_id in sorted(first)]
        inserted = _insert_together(conn, [r[1] for r in chosen], [r[2] for r in chosen])
        for message_id, _, _, made in chosen:
            if made is not None and message_id in inserted:
                done[id(made)] = (made, True, prepared[id(made)][2])

    results: list[Any] = [None] * len(units)

    def one_by_one(indexes: list[int]) -> None:
        for index in indexes:
            unit = units[index]
            if (entry := done.get(id(unit))) is not None:
                fast, applied, result = entry
                results[index] = result if applied else fast.slow(conn)  # not missing
            elif (alone := prepared.get(id(unit))) is not None:
                results[index] = alone[0].apply(conn, alone[1], alone[2])
            else:
                results[index] = unit(conn)

    # The claims first, in id order, then the rest (see above).
    order = sorted(range(len(units)), key=lambda i: (_record_id(units[i]), i))
    update_together(claims=True)
    insert_missing()
    one_by_one([i for i in order if _may_insert(units[i])])
    update_together(claims=False)
    one_by_one([i for i in order if not _may_insert(units[i])])
    return results


# The columns of a new record that :func:`_queued_row` leaves out, as a claim's changes
# (:func:`_insert_together`): a record inserted as the server inserts it.
_UNCLAIMED: dict[str, Any] = {"owner": None, "lease_until": None, "copy": 0}


def _may_insert(unit: Unit) -> bool:
    """Whether ``unit`` is a claim, which inserts the record when it is missing."""
    return isinstance(unit, _Claiming) or (isinstance(unit, _FastUnit) and unit.kind == "untouched")


def _record_id(unit: Unit) -> str:
    """The id of the record a per-mail unit writes ("" for any other unit): the order in
    which :func:`_run_units` runs a PostgreSQL batch's units one by one (the units of a
    batch come from callers running concurrently: any order is theirs)."""
    if isinstance(unit, (_FastUnit, _Claiming)):
        return unit.message_id
    if isinstance(unit, _NewRecord):
        return unit.job.id
    return ""


def _insert_together(
    conn: Connection, jobs: list[MailJob], changes: list[dict[str, Any]] | None = None
) -> set[str]:
    """The records of ``jobs`` (distinct ids) and their lookup rows (PostgreSQL's
    :func:`_insert_queued`), in one statement, in the order given: one array per column,
    each value as SQLAlchemy binds it for that column (JSON as its text, ``None`` as JSON
    ``null`` included), and the terms as two arrays (record id, term). ``changes``: for
    each job, the columns its record has changed (claims of records that were missing).
    The ids of the records inserted (the others were there)."""
    convert = _bind_converters(conn.dialect)
    names = _NEW_COLUMNS if changes is None else _ALL_COLUMNS
    columns: dict[str, list[Any]] = {name: [] for name in names}
    term_ids: list[str] = []
    terms: list[str] = []
    for n, job in enumerate(jobs):
        row, job_terms = _queued_row(job)
        if changes is not None:
            row |= changes[n]
        for name, values in columns.items():
            value = row[name]
            values.append(c(value) if (c := convert[name]) else value)
        term_ids.extend([job.id] * len(job_terms))
        terms.extend(job_terms)
    sql = _insert_together_sql(names)
    inserted = set(conn.exec_driver_sql(sql, (*columns.values(), term_ids, terms)).scalars())
    what = "new records" if changes is None else "missing records, as claimed,"
    log.debug("writer: %d %s inserted together", len(jobs), what)
    return inserted


def _insert_claimed(conn: Connection, job: MailJob, changes: dict[str, Any]) -> bool:
    """Insert ``job``'s record with a claim's ``changes`` unless it is there; whether it
    was inserted (:meth:`_FastUnit.missing`)."""
    if conn.dialect.name == "sqlite":
        return _sqlite_insert_new(job, _bind_converters(conn.dialect), changes)(conn)
    return bool(_insert_together(conn, [job], [changes]))


# The columns :func:`_queued_row` gives, in the table's order; and all of them (a claim's
# changes give the others).
_NEW_COLUMNS = tuple(
    c.name for c in messages_table.c if c.name not in ("owner", "lease_until", "copy")
)
_ALL_COLUMNS = tuple(c.name for c in messages_table.c)


@functools.lru_cache(maxsize=2)
def _insert_together_sql(columns: tuple[str, ...]) -> str:
    arrays = _array_parameters(columns)
    names = ", ".join(f'"{name}"' for name in columns)
    n = len(columns)
    # S608: only this table's column names go into the text; every value is a parameter.
    return (
        f"WITH new_record AS (INSERT INTO {messages_table.name} ({names}) "  # noqa: S608
        f"SELECT * FROM unnest({arrays}) ON CONFLICT (id) DO NOTHING "
        "RETURNING id, created_at), "
        f"lookups AS (INSERT INTO {lookup_table.name} (term, created_at, message_id) "
        "SELECT t.term, r.created_at, r.id FROM new_record AS r "
        f"JOIN unnest(${n + 1}::text[], ${n + 2}::text[]) AS t(message_id, term) "
        "ON t.message_id = r.id ON CONFLICT DO NOTHING) "
        "SELECT id FROM new_record"
    )


def _batched_update(
    group: list[tuple[_FastUnit, dict[str, Any], Any]],
    convert: dict[str, Callable[[Any], Any] | None],
) -> tuple[str, tuple[list[Any], ...]]:
    """One ``UPDATE ... FROM unnest(<arrays>) RETURNING id`` for units of one shape (each
    with its prepared changes), each row's changes where its own condition holds
    (PostgreSQL), and its parameters: one array per column, each value as SQLAlchemy
    binds it for that column (``convert``: :func:`_bind_converters`), so the statement is
    the same whatever the number of rows (prepared once per shape by asyncpg)."""
    first, first_changes, _ = group[0]
    changed = tuple(first_changes)
    arrays: list[list[Any]] = [[unit.message_id for unit, _, _ in group]]
    for name in changed:
        c = convert[name]
        arrays.append([c(changes[name]) if c else changes[name] for _, changes, _ in group])
    for _, param in _WHERE[first.kind][1]:
        arrays.append([(unit.condition or {})[param] for unit, _, _ in group])
    return _batched_sql(first.kind, changed), tuple(arrays)


_PG_ARRAY_TYPES: dict[type, str] = {
    String: "text[]",
    Text: "text[]",
    Integer: "integer[]",
    DateTime: "timestamptz[]",
    JSON: "json[]",
}


def _array_parameters(columns: Sequence[str]) -> str:
    """``$1::<type>[], $2::<type>[], ...``: one array parameter per column of
    ``mailroom_messages``, typed as the column is."""
    return ", ".join(
        f"${n}::{_PG_ARRAY_TYPES[type(messages_table.c[name].type)]}"
        for n, name in enumerate(columns, start=1)
    )


@functools.lru_cache(maxsize=64)
def _batched_sql(kind: _Where, changed: tuple[str, ...]) -> str:
    """The SQL of :func:`_batched_update` for one shape."""
    compared = _WHERE[kind][1]
    columns = [("id", "id"), *((name, name) for name in changed), *compared]
    arrays = _array_parameters([name for name, _ in columns])
    sets = ", ".join(f'"{name}" = v."{name}"' for name in changed)
    names = ", ".join(f'"{alias}"' for _, alias in columns)
    where = _sql_where(kind, "m.", lambda param: f"v.{param}")
    # S608: only this table's column names and fixed conditions go into the text; every
    # value is a parameter.
    head = f"UPDATE {messages_table.name} AS m SET {sets} FROM unnest({arrays}) "  # noqa: S608
    return f"{head}AS v({names}) WHERE m.id = v.id{where} RETURNING m.id"


def _nothing(conn: Connection) -> None:
    return None


def _holds(record: MessageRecord, attempt: Attempt) -> bool:
    return (
        record.status == "sending"
        and record.owner == attempt.owner
        and record.attempts == attempt.number
    )


def _create_or_upgrade(conn: Connection) -> None:
    if conn.dialect.name == "postgresql":
        # One process at a time sets up or upgrades the schema; the others then find it
        # done (SQLite's processes take turns on the file lock already).
        # Polled: a statement may take 30 s at most (asyncpg's command_timeout).
        deadline = time.monotonic() + MIGRATION_WAIT
        while not conn.scalar(select(func.pg_try_advisory_xact_lock(MIGRATION_LOCK))):
            if time.monotonic() > deadline:
                raise StoreUnavailable(
                    f"another process has been upgrading the schema for over {MIGRATION_WAIT:g}s"
                )
            conn.execute(select(func.pg_sleep(0.2)))
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
        # Schema 5 (issue 13) adds only a table (mailroom_suppressions), which create_all
        # above made: nothing to alter, whichever other steps ran.
        if version < 2:
            # Attempt ownership: an owner, its lease, and the newest copy number.
            for ddl in (
                "ALTER TABLE mailroom_messages ADD COLUMN owner VARCHAR(96)",
                "ALTER TABLE mailroom_messages ADD COLUMN lease_until TIMESTAMP"
                + (" WITH TIME ZONE" if conn.dialect.name == "postgresql" else ""),
                "ALTER TABLE mailroom_messages ADD COLUMN copy INTEGER NOT NULL DEFAULT 0",
            ):
                conn.exec_driver_sql(ddl)
        if version < 4:
            # Issue 12: tags and metadata on the record (JSON; NULL for none). Added only
            # when missing, whichever other steps ran before.
            _add_missing_columns(conn, "mailroom_messages", {"tags": "JSON", "meta": "JSON"})
        if version < 6:
            # Issue 17: lists read from indexes in their order. Two composite indexes
            # replace the single-column ones, and the lookup table (made by create_all
            # above) gets the terms of every record. Both read the whole table once.
            for old in ("ix_mailroom_messages_status", "ix_mailroom_messages_created_at"):
                conn.exec_driver_sql(f"DROP INDEX IF EXISTS {old}")
            for index in messages_table.indexes:
                index.create(conn, checkfirst=True)
            _fill_lookup(conn)
        conn.execute(update(schema_table).values(version=SCHEMA_VERSION))


# The lookup rows of the records created in (:lo, :hi], written by the database itself
# from their JSON (schema 6): envelope addresses in ASCII (the results' keys, in lower
# case), tags, metadata pairs. Records with a non-ASCII address are completed by
# _fill_lookup. In the order of the lookup's key on SQLite: one pass over its pages.
_FILL_LOOKUP = {
    "sqlite": (
        "INSERT OR IGNORE INTO mailroom_lookup (term, created_at, message_id) "
        "SELECT 'to:' || lower(j.key), m.created_at, m.id "
        "FROM mailroom_messages AS m, json_each(m.results) AS j "
        "WHERE j.key NOT GLOB '*[^ -~]*' AND {range} ORDER BY 1",
        "INSERT OR IGNORE INTO mailroom_lookup (term, created_at, message_id) "
        "SELECT 'tag:' || j.value, m.created_at, m.id "
        "FROM mailroom_messages AS m, json_each(m.tags) AS j "
        "WHERE json_type(m.tags) = 'array' AND {range} ORDER BY 1",
        "INSERT OR IGNORE INTO mailroom_lookup (term, created_at, message_id) "
        "SELECT 'meta:' || j.key || ' ' || j.value, m.created_at, m.id "
        "FROM mailroom_messages AS m, json_each(m.meta) AS j "
        "WHERE json_type(m.meta) = 'object' AND {range} ORDER BY 1",
    ),
    "postgresql": (
        "INSERT INTO mailroom_lookup (term, created_at, message_id) "
        "SELECT 'to:' || lower(k), m.created_at, m.id "
        "FROM mailroom_messages AS m, json_object_keys(m.results) AS k "
        "WHERE k ~ '^[ -~]*$' AND {range} ON CONFLICT DO NOTHING",
        "INSERT INTO mailroom_lookup (term, created_at, message_id) "
        "SELECT 'tag:' || t, m.created_at, m.id "
        "FROM mailroom_messages AS m, json_array_elements_text(m.tags) AS t "
        "WHERE json_typeof(m.tags) = 'array' AND {range} ON CONFLICT DO NOTHING",
        "INSERT INTO mailroom_lookup (term, created_at, message_id) "
        "SELECT 'meta:' || e.key || ' ' || e.value, m.created_at, m.id "
        "FROM mailroom_messages AS m, json_each_text(m.meta) AS e "
        "WHERE json_typeof(m.meta) = 'object' AND {range} ON CONFLICT DO NOTHING",
    ),
}
# json.dumps writes a non-ASCII character as \\uXXXX: the records _fill_lookup completes.
_NOT_ASCII = {
    "sqlite": "instr(results, '\\u') > 0",
    "postgresql": "strpos(results::text, '\\u') > 0",
}
FILL_CHUNK = 200_000  # records per statement of the schema 6 upgrade


def _fill_lookup_between(
    conn: Connection, low: datetime | None, high: datetime | None, *, from_low: bool = False
) -> None:
    """The database writes the lookup rows of the records created after ``low`` (from it,
    with ``from_low``) up to ``high`` (None: no bound), but for non-ASCII recipients."""
    bounds = []
    if low is not None:
        bounds.append("m.created_at >= :lo" if from_low else "m.created_at > :lo")
    if high is not None:
        bounds.append("m.created_at <= :hi")
    values = {k: v for k, v in (("lo", low), ("hi", high)) if v is not None}
    stamp = DateTime(timezone=True)
    for statement in _FILL_LOOKUP[conn.dialect.name]:
        sql = text(statement.format(range=" AND ".join(bounds) or "1 = 1"))
        conn.execute(sql.bindparams(*(bindparam(k, type_=stamp) for k in values)), values)


def _fill_lookup(conn: Connection, chunk: int = 5000) -> None:
    """Write the lookup rows of every record: by the database itself, FILL_CHUNK records
    a statement (none may take more than a few seconds), then here (in :func:`_terms`'s
    form: an IDN domain in ASCII) those of the records with a non-ASCII recipient,
    ``chunk`` at a time, oldest first."""
    table = messages_table
    low: Any = None
    while True:
        after = table.c.created_at > low if low is not None else true()
        high = conn.scalar(
            select(table.c.created_at)
            .where(after)
            .order_by(table.c.created_at)
            .offset(FILL_CHUNK)
            .limit(1)
        )
        _fill_lookup_between(conn, low, high)
        if high is None:
            break
        low = high
    columns = (table.c.id, table.c.created_at, table.c.results, table.c.tags, table.c.meta)
    query = (
        select(*columns)
        .where(text(_NOT_ASCII[conn.dialect.name]))
        .order_by(table.c.created_at, table.c.id)
        .limit(chunk)
    )
    last: tuple[Any, str] | None = None
    while True:
        page = (
            query
            if last is None
            else query.where(tuple_(table.c.created_at, table.c.id) > tuple_(*last))
        )
        rows = conn.execute(page).all()
        if not rows:
            return
        keys = [
            {"term": term, "created_at": row.created_at, "message_id": row.id}
            for row in rows
            for term in _terms(row.results, row.tags, row.meta)
        ]
        conn.execute(_insert_lookup_ignoring(conn.dialect.name), keys)
        last = (rows[-1].created_at, rows[-1].id)


def _add_missing_columns(conn: Connection, table: str, columns: dict[str, str]) -> None:
    present = {c["name"] for c in inspect(conn).get_columns(table)}
    for name, kind in columns.items():
        if name not in present:
            conn.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")


def _describe(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"


async def _mkdir(path: Path) -> None:
    await asyncio.to_thread(path.mkdir, parents=True, exist_ok=True)
