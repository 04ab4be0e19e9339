"""Synthetic message records, for capacity tests and the bench (``admin.py records seed``).

``seed(store, count, days)`` writes ``count`` records spread evenly over the last ``days``
days, oldest first, in the shapes the worker leaves them: mostly ``sent``, some
``failed`` (a recipient refused for good, or deferred until the retries ran out), and,
within the last day only, a few still ``retrying`` or ``queued`` as in a live system.
Recipients are in ``seed.invalid`` (a name that never resolves, RFC 2606), so nothing
seeded can ever be mailed; most records carry a tag (TAGS) and half of them metadata
``{"customer": "c<n>"}``, and their lookup rows are those the service writes
(store._terms).

Not for production databases: the rows go in as they are (no validation, no idempotency
keys, nothing in RabbitMQ behind the pending ones), in transactions of CHUNK records,
through the store's writer (so a running server or worker only waits for the lock, never
fights it). BUILDERS processes of their own build the next chunks while this one writes.
On SQLite each builder writes its chunk into a scratch SQLite file of its own (the
records, and their lookup rows sorted in the order of the lookup's key), and the writer
copies it in with one ``INSERT ... SELECT`` per table (store.Store.insert_file): no row
is converted from Python in this process, and no chunk is pickled. (The files are in a
temporary directory, each removed once copied; a seeder killed outright leaves it.) A
chunk holds the write lock for 1.1-2 s up to 1M records and 2.4-2.9 s from 1M to 3M (on
2 cores, the builders on them too; up to twice that under other work; LOCK_WAIT is 15
s). The WAL is copied into the database after each commit, out of the lock: each chunk
rewrites nearly every page of the randomly ordered indexes (record ids, and the lookup's
recipients and customers), and that copy takes 0.4-1.6 s of a chunk's 1.5-4.5 s. Those
pages are why the chunks are as large as the lock allows: twice as many records per chunk
rewrite them half as often. On PostgreSQL the builders hand the rows over and the
database writes their lookup rows from the records' JSON (store.Store.insert_rows).

How fast it seeds, measured: the README's "At scale".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import random
import shutil
import sqlite3
import tempfile
from collections import deque
from collections.abc import AsyncGenerator, Callable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from store import Store, now_utc

DOMAIN = "seed.invalid"
CHUNK = 200_000  # records per write transaction (see the module docstring)
BUILDERS = 2  # processes building the next chunks while this one writes
COLUMNS = (
    "id",
    "recipients",
    "subject",
    "status",
    "attempts",
    "next_attempt_at",
    "last_error",
    "last_error_code",
    "results",
    "history",
    "created_at",
    "updated_at",
    "owner",
    "lease_until",
    "copy",
    "tags",
    "meta",
)
_ID, _CREATED = COLUMNS.index("id"), COLUMNS.index("created_at")
TAGS = ("receipt", "newsletter", "password-reset", "welcome")
CUSTOMERS = 20_000  # metadata {"customer": "c<n>"}
OWNER = "seed/0/00000000"
SUBJECTS = ("Your order {n} has shipped", "Password reset", "Invoice {n}", "Welcome aboard")
REFUSED = "5.1.1 no such user"
DEFERRED = "4.7.1 try again later"
SENT_RESULT = '{"status": "sent", "code": null, "message": null}'
REFUSED_RESULT = f'{{"status": "refused", "code": 550, "message": "{REFUSED}"}}'
# Seconds after creation of each step of an attempt: taken, then its outcome.
TAKEN, DONE = 0.004, 0.045
RETRY_DELAYS = (30.0, 120.0, 600.0, 3600.0, 14400.0)  # the default RETRY_DELAYS
DAY = 86400.0


def _iso(at: datetime) -> str:
    """A time as the records' history and ``to_json`` write it (store._iso)."""
    return at.isoformat(timespec="milliseconds")


class _Rows:
    """Builds rows in COLUMNS order for one dialect, from one random source.

    The common shapes (one attempt, then sent or refused: 99% of the rows) are written
    from string templates, the same text ``json.dumps`` makes: ``json.dumps`` and
    ``datetime`` arithmetic for each field would take several times as long.
    """

    def __init__(self, dialect: str, rng: random.Random) -> None:
        self.rng = rng
        self.sqlite = dialect == "sqlite"

    def stored(self, at: datetime) -> Any:
        """A time as the driver takes it: for SQLite the text SQLAlchemy's DateTime
        writes (UTC, no offset, microseconds); a datetime for asyncpg."""
        return at.replace(tzinfo=None).isoformat(" ", "microseconds") if self.sqlite else at

    def row(self, created: datetime, recent: bool) -> tuple[Any, list[str]]:
        """One record as a tuple of COLUMNS, and its lookup terms (store._terms)."""
        random_ = self.rng.random  # random() is C; randrange() is Python, and slower
        roll = random_()
        n = 1 if roll < 0.85 else 2 if roll < 0.95 else 3
        addresses = list(
            dict.fromkeys([f"user{int(random_() * 1_000_000)}@{DOMAIN}" for _ in range(n)])
        )
        subject = SUBJECTS[int(roll * 1000) % len(SUBJECTS)].format(n=int(random_() * 1e6))
        record_id = f"{self.rng.getrandbits(128):032x}"
        recipients = '["' + '", "'.join(addresses) + '"]'
        record = self._shape(record_id, recipients, subject, addresses, created, recent)
        roll = random_()
        tags = meta = None
        terms = [f"to:{a}" for a in addresses]  # in lower case and ASCII already
        if roll < 0.6:  # most mail is tagged with its kind
            tag = TAGS[int(roll * 100) % len(TAGS)]
            tags = f'["{tag}"]'
            terms.append(f"tag:{tag}")
        if random_() < 0.5:
            customer = f"c{int(random_() * CUSTOMERS)}"
            meta = f'{{"customer": "{customer}"}}'
            terms.append(f"meta:customer {customer}")
        return (*record, tags, meta), terms

    def _shape(
        self,
        record_id: str,
        recipients: str,
        subject: str,
        addresses: list[str],
        created: datetime,
        recent: bool,
    ) -> tuple[Any, ...]:
        """The record's columns up to ``copy``, as the worker leaves a message."""
        roll = self.rng.random()
        micro = created.microsecond
        if not (recent and roll < 0.03) and roll < 0.99 and micro < 950_000:
            # One attempt within the same second: sent, or refused for good.
            sent = roll < 0.96
            iso = created.isoformat(timespec="microseconds")  # ...T03:04:05.678901+00:00
            head, ms = iso[:20], micro // 1000
            final = "sent" if sent else "failed"
            history = (
                f'[{{"status": "queued", "at": "{head}{ms:03d}+00:00"}}, '
                f'{{"status": "sending", "at": "{head}{ms + 4:03d}+00:00"}}, '
                f'{{"status": "{final}", "at": "{head}{ms + 45:03d}+00:00"}}]'
            )
            result = SENT_RESULT if sent else REFUSED_RESULT
            results = "{" + ", ".join([f'"{a}": {result}' for a in addresses]) + "}"
            if self.sqlite:
                created_at: Any = f"{iso[:10]} {iso[11:26]}"
                updated_at: Any = f"{iso[:10]} {iso[11:20]}{micro + 45_000:06d}"
            else:
                created_at, updated_at = created, created + timedelta(seconds=DONE)
            error = None if sent else _error("refused", addresses, 550, REFUSED)
            return (
                record_id,
                recipients,
                subject,
                final,
                1,
                None,
                error,
                None if sent else 550,
                results,
                history,
                created_at,
                updated_at,
                OWNER,
                None,
                0,
            )
        return self._rare(record_id, recipients, subject, addresses, created, recent, roll)

    def _rare(
        self,
        record_id: str,
        recipients: str,
        subject: str,
        addresses: list[str],
        created: datetime,
        recent: bool,
        roll: float,
    ) -> tuple[Any, ...]:
        """The other shapes, field by field."""
        history = [{"status": "queued", "at": _iso(created)}]
        error: str | None = None
        code: int | None = None
        next_at: datetime | None = None
        owner: str | None = OWNER
        updated = created
        outcome: dict[str, tuple[str, int | None, str | None]]
        if recent and roll < 0.01:
            status, attempts, owner = "queued", 0, None
            outcome = dict.fromkeys(addresses, ("pending", None, None))
        elif recent and roll < 0.03:
            status, attempts = "retrying", 1
            updated = created + timedelta(seconds=DONE)
            history += [
                {"status": "sending", "at": _iso(created + timedelta(seconds=TAKEN))},
                {"status": "retrying", "at": _iso(updated)},
            ]
            next_at = updated + timedelta(seconds=RETRY_DELAYS[0])
            outcome = dict.fromkeys(addresses, ("pending", 451, DEFERRED))
            error, code = _error("deferred", addresses, 451, DEFERRED), 451
        elif roll < 0.99:
            # One attempt that crosses into the next second.
            sent = roll < 0.96
            status, attempts = ("sent" if sent else "failed"), 1
            updated = created + timedelta(seconds=DONE)
            history += [
                {"status": "sending", "at": _iso(created + timedelta(seconds=TAKEN))},
                {"status": status, "at": _iso(updated)},
            ]
            if sent:
                outcome = dict.fromkeys(addresses, ("sent", None, None))
            else:
                outcome = dict.fromkeys(addresses, ("refused", 550, REFUSED))
                error, code = _error("refused", addresses, 550, REFUSED), 550
        else:
            # Deferred at every attempt until the retries ran out (about 5 hours).
            status, attempts = "failed", len(RETRY_DELAYS) + 1
            at = 0.0
            for delay in (*RETRY_DELAYS, None):
                history.append({"status": "sending", "at": _iso(created + timedelta(seconds=at))})
                at += DONE
                step = "failed" if delay is None else "retrying"
                history.append({"status": step, "at": _iso(created + timedelta(seconds=at))})
                at += delay or 0.0
            updated = created + timedelta(seconds=at)
            outcome = dict.fromkeys(addresses, ("pending", 451, DEFERRED))
            error, code = _error("deferred", addresses, 451, DEFERRED), 451
        results = {a: {"status": s, "code": c, "message": m} for a, (s, c, m) in outcome.items()}
        return (
            record_id,
            recipients,
            subject,
            status,
            attempts,
            None if next_at is None else self.stored(next_at),
            error,
            code,
            json.dumps(results),
            json.dumps(history),
            self.stored(created),
            self.stored(updated),
            owner,
            None,
            0,
        )


def _error(kind: str, addresses: list[str], code: int, text: str) -> str:
    return f"recipients {kind}: " + "; ".join(f"{a}: {code} {text}" for a in addresses)


@dataclass(frozen=True)
class _Plan:
    """What every chunk needs to build its rows on its own (in another process too)."""

    dialect: str
    count: int
    start: datetime
    step: float  # seconds between two records
    recent_from: datetime
    seed: int

    def build(self, first: int, last: int) -> tuple[list[Any], list[Any] | None]:
        """Records ``first`` to ``last``, oldest first, and for SQLite their lookup rows
        (term, created_at, message_id) in the order of the lookup's key (None for
        PostgreSQL, which still writes them itself from the records' JSON)."""
        rows = _Rows(self.dialect, random.Random(self.seed + first))
        out: list[Any] = []
        keys: list[Any] = []
        add = keys.extend
        for i in range(first, last):
            created = self.start + timedelta(seconds=(i + rows.rng.random()) * self.step)
            row, terms = rows.row(created, created >= self.recent_from)
            out.append(row)
            if rows.sqlite:
                at, record_id = row[_CREATED], row[_ID]
                add([(term, at, record_id) for term in terms])
        if not rows.sqlite:
            return out, None
        keys.sort()
        return out, keys

    def write(self, first: int, last: int, path: str) -> str:
        """SQLite: records ``first`` to ``last`` and their lookup rows (:meth:`build`)
        into a new SQLite file ``path``, as store.Store.insert_file takes them; ``path``."""
        rows, keys = self.build(first, last)
        with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
            # A scratch file of this process's own: nothing to recover after a crash.
            db.execute("PRAGMA journal_mode=OFF")
            db.execute("PRAGMA synchronous=OFF")
            # Columns without a type: every value stays as it is given.
            db.execute(f"CREATE TABLE records ({', '.join(COLUMNS)})")
            db.execute("CREATE TABLE lookup (term, created_at, message_id)")
            db.execute("BEGIN")
            marks = ", ".join("?" for _ in COLUMNS)
            db.executemany(f"INSERT INTO records VALUES ({marks})", rows)  # noqa: S608 - our columns
            db.executemany("INSERT INTO lookup VALUES (?, ?, ?)", keys or ())
            db.execute("COMMIT")
        return path


async def seed(
    store: Store,
    count: int,
    days: float,
    now: datetime | None = None,
    rng: random.Random | None = None,
    chunk: int = CHUNK,
) -> int:
    """Write ``count`` synthetic records created over the ``days`` days before ``now``
    (see the module docstring); how many were written.

    More than one chunk: the chunks are built in BUILDERS processes of their own while
    this one writes (building in a thread here instead would fight the writer thread
    for the GIL on every row); one chunk is built in a thread, then written.
    """
    if count < 0 or days <= 0:
        raise ValueError("count must be at least 0 and days more than 0")
    end = (now or now_utc()).astimezone(UTC)
    start = end - timedelta(days=days)
    plan = _Plan(
        dialect=store.dialect,
        count=count,
        start=start,
        step=(end - start).total_seconds() / max(count, 1),
        recent_from=end - timedelta(seconds=DAY),
        seed=(rng or random.Random()).getrandbits(64),
    )
    bounds = [(first, min(first + chunk, count)) for first in range(0, count, chunk)]
    # spawn, not fork: this process runs threads (the writer, the drivers').
    pool = (
        ProcessPoolExecutor(BUILDERS, mp_context=multiprocessing.get_context("spawn"))
        if len(bounds) > 1
        else None  # asyncio's threads
    )
    scratch: str | None = None  # SQLite: the directory of the chunks' files
    try:
        if store.dialect != "sqlite":
            builds = [partial(plan.build, first, last) for first, last in bounds]
            async with contextlib.aclosing(_in_order(pool, builds, BUILDERS)) as built:
                async for rows, _ in built:
                    await store.insert_rows(COLUMNS, rows)
            return count
        scratch = await asyncio.to_thread(tempfile.mkdtemp, prefix="mailroom-seed-")
        files = [
            partial(plan.write, first, last, str(Path(scratch, f"{first}.db")))
            for first, last in bounds
        ]
        async with contextlib.aclosing(_in_order(pool, files, BUILDERS)) as written:
            async for path in written:
                await store.insert_file(path, COLUMNS)
                await asyncio.to_thread(Path(path).unlink)
        return count
    finally:
        if pool is not None:
            # Before the directory goes: after an error, builders may still write in it.
            await asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True)
        if scratch is not None:
            await asyncio.to_thread(shutil.rmtree, scratch, ignore_errors=True)


_T = TypeVar("_T")


async def _in_order(
    pool: Executor | None, calls: Sequence[Callable[[], _T]], ahead: int
) -> AsyncGenerator[_T, None]:
    """The results of ``calls`` run in ``pool``, in order; while the caller uses one,
    the next ``ahead`` run."""
    loop = asyncio.get_running_loop()
    running: deque[asyncio.Future[_T]] = deque()
    try:
        for call in calls:
            running.append(loop.run_in_executor(pool, call))
            if len(running) > ahead:
                yield await running.popleft()
        while running:
            yield await running.popleft()
    finally:
        for future in running:  # the caller stopped early: nobody wants these
            future.cancel()
