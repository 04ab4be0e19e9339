"""CPU per mail of the worker's two writes (Store.claim, then Store.finish), SQLite
against PostgreSQL, in one process, without RabbitMQ or SMTP.

    .venv/bin/python bench/store_cost.py            # 3000 mails, 64 at a time

It creates the records the way the server does (Store.insert_queued, 100 at a time as
the batch endpoint does), then times the claim and the outcome of each,
``--concurrency`` mails at once, and prints mails/s and the process's CPU time per mail
(all threads: SQLite's writer thread included). On SQLite it also prints how long the
writes hold Mailroom's file lock, per new record and per claim + outcome: the time the
other process's writes wait for them; ``--busy`` keeps the event loop busy half the
time meanwhile (1 ms of work, then 1 ms idle, as a server answering requests does), so
that the writer thread waits for the GIL as it does in a busy process. ``--missing``
leaves the records out, so that each claim finds its record missing (the worker got the
message before the server's insert committed: 45% of the claims in a run of 4000
requests, a new connection each, 64 at a time). PostgreSQL: a database of its own on
``--pg`` (created, then dropped).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncpg

from config import Secret, Settings
from filelock import FileLock
from messages import MailJob, new_job
from store import RecipientResult, Store


class HoldTimer:
    """Mailroom's file lock, timing how long it is held."""

    def __init__(self, lock: FileLock) -> None:
        self.lock, self.held, self._since = lock, 0.0, 0.0

    def acquire(self, timeout: float) -> bool:
        taken = self.lock.acquire(timeout)
        self._since = time.perf_counter()
        return taken

    def release(self) -> None:
        self.held += time.perf_counter() - self._since
        self.lock.release()

    def close(self) -> None:
        self.lock.close()

    def take(self) -> float:
        held, self.held = self.held, 0.0
        return held


async def keep_busy(stop: asyncio.Event) -> None:
    """Half the event loop's time: 1 ms of work, then 1 ms idle."""
    while not stop.is_set():
        until = time.perf_counter() + 0.001
        while time.perf_counter() < until:
            pass
        await asyncio.sleep(0.001)


async def measure(
    url: str, count: int, concurrency: int, busy: bool = False, missing: bool = False
) -> str:
    stop = asyncio.Event()
    busy_loop = asyncio.create_task(keep_busy(stop)) if busy else None
    try:
        return await measure_writes(url, count, concurrency, missing)
    finally:
        stop.set()
        if busy_loop is not None:
            await busy_loop


async def measure_writes(url: str, count: int, concurrency: int, missing: bool) -> str:
    store = await Store.open(Settings(database_url=Secret(url)))
    timer = None
    if store._lock is not None:  # SQLite
        timer = store._lock = HoldTimer(store._lock)  # type: ignore[assignment]
    inserted = ""
    try:
        jobs = [new_job(to=f"u{n}@seed.invalid", subject="s", text="t") for n in range(count)]
        for start in range(0, 0 if missing else count, 100):
            await asyncio.gather(*(store.insert_queued(j) for j in jobs[start : start + 100]))
        if timer is not None and not missing:
            inserted = f"; the lock held {1e6 * timer.take() / count:.1f} us per new record"
        limit = asyncio.Semaphore(concurrency)

        async def one(job: MailJob) -> None:
            async with limit:
                claim = await store.claim(job, "bench/1/store-cost", 0, 30.0)
                if claim.attempt is None:
                    raise RuntimeError(f"message {job.id}: not claimed ({claim.kind})")
                sent = {job.to[0]: RecipientResult("sent")}
                if not await store.finish(claim.attempt, "sent", sent):
                    raise RuntimeError(f"message {job.id}: outcome not applied")

        wall, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(one(job) for job in jobs))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if timer is not None:
            inserted += f", {1e6 * timer.take() / count:.1f} us per claim + outcome"
    finally:
        await store.close()
    return f"{count / wall:.0f} mails/s, {1000 * cpu / count:.3f} ms of CPU per mail{inserted}"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--count", type=int, default=3000)
    parser.add_argument("-c", "--concurrency", type=int, default=64)
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432")
    parser.add_argument("--busy", action="store_true", help="keep the event loop half busy")
    parser.add_argument("--missing", action="store_true", help="claims find no record")
    args = parser.parse_args()
    options = (args.count, args.concurrency, args.busy, args.missing)
    with tempfile.TemporaryDirectory() as tmp:
        sqlite = await measure(f"sqlite:///{tmp}/store-cost.db", *options)
    print(f"SQLite:     {sqlite}")
    name = f"store_cost_{uuid.uuid4().hex[:10]}"
    try:
        pg = await measure(f"{args.pg}/{name}", *options)
    finally:
        admin = await asyncpg.connect(f"{args.pg}/postgres")
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        finally:
            await admin.close()
    print(f"PostgreSQL: {pg}")


if __name__ == "__main__":
    asyncio.run(main())
