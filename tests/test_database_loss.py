"""The database removed or dropped while the processes run: found, refused, rescued."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest
from sqlalchemy.engine import Connection

from config import Secret, Settings
from messages import new_job
from store import READ_CONNECTIONS, Store, StoreUnavailable
from tests.conftest import pg_database, running_app, wait_ready
from tests.support import (
    Proc,
    SmtpServer,
    child_env,
    finish,
    free_port,
    spawn,
    wait_http,
    worker_env,
)

MAIL = {"to": "a@example.com", "subject": "once", "text": "only once"}


async def wait_not_ready(readyz: Callable[[], Awaitable[tuple[int, str]]]) -> str:
    """Poll /readyz until it answers 503, within 5 seconds; return what it says."""
    async with asyncio.timeout(5):
        while True:
            status, body = await readyz()
            if status == 503:
                return body
            await asyncio.sleep(0.05)


def rescued_key(copy: Path, key: str) -> str | None:
    """The message id an Idempotency-Key maps to in a (rescued) database file."""
    with sqlite3.connect(copy) as conn:
        row = conn.execute("SELECT message_id FROM mailroom_idempotency WHERE key = ?", (key,))
        found = row.fetchone()
    return str(found[0]) if found else None


async def test_removed_sqlite_file_is_refused_rescued_and_restored(
    prefix: str,
    tmp_path: Path,
    make_settings: Callable[..., Settings],
    smtp: SmtpServer,
    stop_later: list[Proc],
) -> None:
    """rm var/mailroom.db under a running server and worker (python server.py/worker.py)."""
    db = tmp_path / "var" / "mailroom.db"
    settings = make_settings(database_url=Secret(f"sqlite:///{db}"))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server_env = child_env(prefix, PORT=port, DATABASE_URL=settings.database_url.get())
    env = worker_env(prefix, settings, smtp.port)

    async def start_both() -> tuple[Proc, Proc]:
        server = await spawn("server.py", tmp_path, server_env)
        worker = await spawn("worker.py", tmp_path, env)
        stop_later.extend((server, worker))
        await wait_http(f"{base}/readyz", server)
        return server, worker

    server, worker = await start_both()
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        first = await client.post("/api/messages", json=MAIL, headers={"Idempotency-Key": "k1"})
        assert first.status_code == 202, first.text
        sent_id = first.json()["id"]
        await smtp.recorder.wait_for(1)
        async with asyncio.timeout(10):  # the outcome is recorded before the file goes
            while (await client.get(f"/api/messages/{sent_id}")).json()["status"] != "sent":
                await asyncio.sleep(0.05)

        await asyncio.to_thread(db.unlink)  # -wal and -shm stay, as in the report

        async def readyz() -> tuple[int, str]:
            response = await client.get("/readyz")
            return response.status_code, response.text

        body = await wait_not_ready(readyz)
        assert f"database file {db} was removed" in body
        # A new key is never claimed in the removed file: 503, safe to retry.
        second = await client.post("/api/messages", json=MAIL, headers={"Idempotency-Key": "k2"})
        assert second.status_code == 503 and second.headers["Retry-After"], second.text
        # The worker stops loudly (exit 1) rather than keep using the removed file.
        code, out = await finish(worker)
        assert code == 1, out
        assert f"database file {db} was removed" in out and "Traceback" not in out

        # A restarted worker says why it cannot start (not "disk I/O error").
        again = await spawn("worker.py", tmp_path, env)
        stop_later.append(again)
        code, out = await finish(again)
        assert code == 1, out
        assert f"{db}-wal" in out and "removed while a Mailroom process" in out, out
        assert "disk I/O error" not in out
        assert not db.exists()  # it did not create an empty database either

        server.send_signal(signal.SIGTERM)
        code, out = await finish(server)
        assert code == 0, out
        assert "rescue copy of the removed database written to" in out, out

    # What the processes still saw was rescued: k1 and its message, not k2.
    copies = sorted(db.parent.glob("mailroom.db.rescued-*"))
    assert copies, list(db.parent.iterdir())
    for copy in copies:
        assert await asyncio.to_thread(rescued_key, copy, "k1") == sent_id
        assert await asyncio.to_thread(rescued_key, copy, "k2") is None

    # The operator's way back, as the error message says.
    for leftover in (Path(f"{db}-wal"), Path(f"{db}-shm")):
        leftover.unlink()
    copies[-1].rename(db)
    for copy in copies[:-1]:
        copy.unlink()
    server, worker = await start_both()
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        replay = await client.post("/api/messages", json=MAIL, headers={"Idempotency-Key": "k1"})
        assert replay.status_code == 202 and replay.json()["id"] == sent_id, replay.text
        assert replay.headers["Idempotent-Replayed"] == "true"
        record = await client.get(f"/api/messages/{sent_id}")
        assert record.json()["status"] == "sent"
        fresh = await client.post("/api/messages", json=MAIL, headers={"Idempotency-Key": "k2"})
        assert fresh.status_code == 202 and fresh.json()["id"] != sent_id
        await smtp.recorder.wait_for(2)
    assert len(smtp.recorder.received) == 2  # k1 once, k2 once
    for proc in (server, worker):
        proc.send_signal(signal.SIGTERM)
        code, out = await finish(proc)
        assert code == 0, out


@pytest.mark.parametrize("how", ["removed", "replaced"])
async def test_no_write_lands_in_a_removed_file(
    how: str, make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """Refused at once (before the once-a-second check ran), and nothing reached the file."""
    db = tmp_path / "mailroom.db"
    store = await Store.open(make_settings(database_url=Secret(f"sqlite:///{db}")))
    try:
        kept = new_job(to=["a@example.com"], subject="s", text="t")
        await store.insert_queued(kept)
        if how == "removed":
            await asyncio.to_thread(db.unlink)
        else:
            other = tmp_path / "other.db"
            await asyncio.to_thread(other.write_bytes, b"")
            await asyncio.to_thread(os.replace, other, db)
        lost = new_job(to=["a@example.com"], subject="s", text="t")
        with pytest.raises(StoreUnavailable, match=f"database file {db} was {how}"):
            await store.insert_queued(lost)
        with pytest.raises(StoreUnavailable, match=how):
            await store.claim_idempotency_key("addr:x", "key", "hash", lost.id)
        assert store.lost is not None and how in store.lost
        # Read through the connection that still has the old file open: nothing written.
        assert await store.get(kept.id) is not None
        assert await store.get(lost.id) is None
    finally:
        await store.close()
    # Its rescue copy is there: no process opens a database beside it until someone chose.
    copies = list(tmp_path.glob("mailroom.db.rescued-*"))
    assert len(copies) == 1
    why = "is missing but" if how == "removed" else f"{copies[0]} holds the records"
    with pytest.raises(StoreUnavailable, match=why):
        await Store.open(make_settings(database_url=Secret(f"sqlite:///{db}")))


async def test_reads_waiting_when_the_store_closes_open_no_new_file(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """Every reader thread busy and more reads waiting for one when the process closes
    its store: the busy reads finish, the waiting ones are refused (StoreUnavailable)
    and open no connection, which on a removed database file would create a new, empty
    one (the file is removed here once the close has begun). A read after the close is
    refused too."""
    db = tmp_path / "mailroom.db"
    store = await Store.open(make_settings(database_url=Secret(f"sqlite:///{db}")))
    release = threading.Event()
    busy = threading.Semaphore(0)

    def slow(conn: Connection) -> int:
        busy.release()
        release.wait(10)
        return int(conn.exec_driver_sql("SELECT count(*) FROM mailroom_messages").scalar_one())

    reads = [asyncio.ensure_future(store._read(slow)) for _ in range(READ_CONNECTIONS + 2)]
    try:
        for _ in range(READ_CONNECTIONS):  # every reader thread holds a read
            assert await asyncio.to_thread(busy.acquire, True, 10)
        closing = asyncio.ensure_future(store.close())
        async with asyncio.timeout(10):
            while not store._closed:  # the close reached the readers
                await asyncio.sleep(0.01)
        await asyncio.to_thread(db.unlink)
        release.set()
        await asyncio.wait_for(closing, 20)
    finally:
        release.set()
        results = await asyncio.gather(*reads, return_exceptions=True)
    assert results[:READ_CONNECTIONS] == [0] * READ_CONNECTIONS
    assert all(isinstance(r, StoreUnavailable) for r in results[READ_CONNECTIONS:]), results
    assert not db.exists()
    with pytest.raises(StoreUnavailable, match="closed"):
        await store.get("whatever")


async def test_dropped_postgresql_database_makes_readyz_and_keyed_sends_503(
    make_settings: Callable[..., Settings],
) -> None:
    async with pg_database() as (name, admin):
        url = Secret(f"postgresql://postgres@127.0.0.1:5432/{name}")
        async with running_app(make_settings(database_url=url)) as (app, client):
            await wait_ready(app)
            assert (await client.get("/readyz")).status_code == 200
            await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')

            async def readyz() -> tuple[int, str]:
                response = await client.get("/readyz")
                return response.status_code, await response.get_data(as_text=True)

            body = await wait_not_ready(readyz)
            assert "database" in body and name in body, body
            response = await client.post(
                "/api/messages", json=MAIL, headers={"Idempotency-Key": "k1"}
            )
            assert response.status_code == 503
