"""The lock Mailroom's processes take in turn to write one SQLite file (filelock.py), and
the store's writes waiting on it: handed over the moment the holder lets go, given up
after the bound, and a write that gave up never runs."""

from __future__ import annotations

import asyncio
import fcntl
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import store as store_module
from config import Secret, Settings
from filelock import FileLock
from messages import new_job
from store import Store, StoreUnavailable

# Another process holding the lock until its stdin closes.
HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.read()
"""


@contextmanager
def held_by_another_process(path: Path) -> Iterator[subprocess.Popen[str]]:
    with subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as holder:
        try:
            assert holder.stdout is not None
            assert holder.stdout.readline().strip() == "held"
            yield holder
        finally:
            let_go(holder)


def let_go(holder: subprocess.Popen[str]) -> None:
    """The holder exits (its end of input), and with it its lock."""
    assert holder.stdin is not None
    if not holder.stdin.closed:
        holder.stdin.close()
    holder.wait(10)


def free_for_others(path: Path) -> bool:
    """Whether another open file of ``path`` can take the lock now (and drops it again)."""
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # drops the lock if it was taken
    return True


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_free_lock_is_taken_and_released_at_once(tmp_path: Path) -> None:
    path = tmp_path / "db.lock"
    lock = FileLock(path)
    try:
        assert lock.acquire(0)
        assert not free_for_others(path)
        lock.release()
        assert free_for_others(path)
        assert lock.acquire(0)  # again, on the same open file
    finally:
        lock.close()
    assert free_for_others(path)


def test_a_waiting_acquire_gets_the_lock_when_the_holder_lets_go(tmp_path: Path) -> None:
    path = tmp_path / "db.lock"
    lock = FileLock(path)
    got: list[bool] = []
    try:
        with held_by_another_process(path) as holder:
            waiter = threading.Thread(target=lambda: got.append(lock.acquire(30)))
            waiter.start()
            # Still waiting while the other process holds it...
            waiter.join(0.3)
            assert waiter.is_alive() and not got
            let_go(holder)
            # ...and holding it once that process let go (no poll interval to sit out).
            waiter.join(5)
            assert got == [True]
            assert not free_for_others(path)
            lock.release()
            assert free_for_others(path)
    finally:
        lock.close()


def test_acquire_gives_up_after_its_bound_and_the_late_lock_is_dropped(tmp_path: Path) -> None:
    path = tmp_path / "db.lock"
    lock = FileLock(path)
    try:
        with held_by_another_process(path) as holder:
            started = time.monotonic()
            assert not lock.acquire(0.2)
            assert 0.2 <= time.monotonic() - started < 5
            let_go(holder)
        # The abandoned wait takes the lock when it comes free and drops it: nobody is
        # left out, and the lock can be had again, by others and by this one.
        wait_until(lambda: free_for_others(path))
        assert lock.acquire(5)
        assert not free_for_others(path)
        lock.release()
    finally:
        lock.close()


async def test_a_write_waits_for_another_process_and_gives_up_after_lock_wait(
    make_settings: Callable[..., Settings], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "mailroom.db"
    store = await Store.open(make_settings(database_url=Secret(f"sqlite:///{db}")))
    lock_path = Path(f"{db}.lock")
    try:
        monkeypatch.setattr(store_module, "LOCK_WAIT", 0.3)
        dropped = new_job(to=["a@example.com"], subject="s", text="t")
        with (
            held_by_another_process(lock_path),
            pytest.raises(StoreUnavailable, match=r"has held .* for over 0\.3s"),
        ):
            await asyncio.wait_for(store.insert_queued(dropped), 10)
        monkeypatch.setattr(store_module, "LOCK_WAIT", 30.0)
        kept = new_job(to=["a@example.com"], subject="s", text="t")
        with held_by_another_process(lock_path) as holder:
            write = asyncio.ensure_future(store.insert_queued(kept))
            done, _ = await asyncio.wait({write}, timeout=0.3)
            assert not done  # waits for the other process...
            await asyncio.to_thread(let_go, holder)
            await asyncio.wait_for(write, 5)  # ...and writes once it let go
        # The write that gave up never ran, not even once the lock came free.
        assert await store.get(dropped.id) is None
        assert await store.get(kept.id) is not None
    finally:
        await store.close()


async def test_writes_waiting_together_give_up_together(
    make_settings: Callable[..., Settings], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writes queued together while another process holds the lock all fail once LOCK_WAIT
    has passed: not one after the other, each waiting LOCK_WAIT again on its own (the
    transaction failed as a whole; running its writes again one at a time would take the
    number of writes times LOCK_WAIT, here 8 s more)."""
    db = tmp_path / "mailroom.db"
    store = await Store.open(make_settings(database_url=Secret(f"sqlite:///{db}")))
    try:
        monkeypatch.setattr(store_module, "LOCK_WAIT", 1.0)
        jobs = [new_job(to=[f"w{n}@example.com"], subject="s", text="t") for n in range(8)]
        with held_by_another_process(Path(f"{db}.lock")):
            started = time.monotonic()
            results = await asyncio.wait_for(
                asyncio.gather(*(store.insert_queued(job) for job in jobs), return_exceptions=True),
                30,
            )
            took = time.monotonic() - started
        assert all(isinstance(r, StoreUnavailable) for r in results), results
        assert all("for over 1s" in str(r) for r in results)
        assert took < 4.0, f"the writes gave up after {took:.1f}s"
        for job in jobs:  # none was written later either
            assert await store.get(job.id) is None
    finally:
        await store.close()
