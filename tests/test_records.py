"""Stored work at scale (issue 17), on SQLite and PostgreSQL: every list is read from an
index in its order, records expire (never those still to be sent) and their space is
reused, the schema upgrade that adds the indexes, and the operator's records commands."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import sqlite3
import sys
import threading
import typing
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.expression import ClauseElement, Executable

from config import Secret, Settings
from messages import legacy_job, new_job
from schemas import ListQuery
from seeding import DOMAIN, seed
from store import (
    FINAL,
    SCHEMA_VERSION,
    MessageRecord,
    Store,
    _terms,
    list_statement,
    messages_table,
    now_utc,
)
from tests.conftest import running_app, wait_ready
from tests.support import ROOT, child_env, db_connection

# GET /api/messages of all records, or of one status.
STATUSES: list[str | None] = [
    None,
    *typing.get_args(typing.get_args(ListQuery.model_fields["status"].annotation)[0]),
]


@pytest.fixture
async def store(
    database_url: Secret, make_settings: Callable[..., Settings]
) -> AsyncIterator[Store]:
    opened = await Store.open(make_settings(database_url=database_url))
    yield opened
    await opened.close()


class Explain(Executable, ClauseElement):
    """``EXPLAIN [QUERY PLAN] <statement>``, its parameters bound as the statement's."""

    inherit_cache = False

    def __init__(self, statement: typing.Any) -> None:
        self.statement = statement


@compiles(Explain)
def _explain(element: Explain, compiler: typing.Any, **kw: typing.Any) -> str:
    prefix = "EXPLAIN QUERY PLAN " if compiler.dialect.name == "sqlite" else "EXPLAIN "
    return prefix + str(compiler.process(element.statement, **kw))


async def plan(store: Store, statement: typing.Any) -> list[str]:
    """The query plan of ``statement``, one string per line."""
    async with db_connection(store) as conn:
        rows = (await conn.execute(Explain(statement))).all()
    return [str(row[-1]) for row in rows]


def the_lists(newest: MessageRecord, sample: MessageRecord) -> list[dict[str, typing.Any]]:
    """Every list GET /api/messages offers, by kind of filter, and a few combinations;
    ``sample`` gives a recipient, tag and metadata value that exist."""
    recipient = sample.recipients[0]
    tag = sample.tags[0]
    meta = next(iter(sample.metadata.items()))
    cursor = (sample.created_at, sample.id)
    window = {
        "since": sample.created_at - timedelta(days=3),
        "until": sample.created_at + timedelta(milliseconds=1),
    }
    return [
        *({"status": status} for status in STATUSES),
        {"recipient": recipient},
        {"recipient": recipient.upper(), "status": sample.status},
        {"tag": tag},
        {"meta": meta},
        {"tag": tag, "meta": meta, "status": "sent"},
        {"before": cursor},
        {"status": "sent", "before": cursor},
        {"tag": tag, "before": cursor},
        window,
        {"status": "failed", **window},
        {"meta": meta, **window},
        {"before": (newest.created_at, newest.id), "recipient": recipient, "tag": tag},
    ]


def matches(record: MessageRecord, query: dict[str, typing.Any]) -> bool:
    at = (record.created_at, record.id)
    return (
        query.get("status") in (None, record.status)
        and ("recipient" not in query or query["recipient"].lower() in record.recipients)
        and ("tag" not in query or query["tag"] in record.tags)
        and ("meta" not in query or record.metadata.get(query["meta"][0]) == query["meta"][1])
        and ("before" not in query or at < query["before"])
        and ("since" not in query or record.created_at >= query["since"])
        and ("until" not in query or record.created_at < query["until"])
    )


async def test_every_list_reads_an_index_in_its_order(store: Store) -> None:
    """No list sorts: each walks an index backwards (the records' own, or the lookup
    table's) and stops after ``limit`` rows; and each finds what it should."""
    await seed(store, 3000, 30, rng=random.Random(17))
    if store.dialect == "postgresql":
        # What autovacuum does after a bulk load:
        async with db_connection(store, begin=True) as conn:
            await conn.execute(text("ANALYZE mailroom_messages"))
            await conn.execute(text("ANALYZE mailroom_lookup"))
    everything: list[MessageRecord] = []
    before = None
    while page := await store.list(limit=500, before=before):
        everything += page
        before = (page[-1].created_at, page[-1].id)
    assert len(everything) == 3000
    sample = next(r for r in everything[1000:] if r.tags and r.metadata and r.status == "sent")
    assert "sent" in STATUSES and "failed" in STATUSES
    for query in the_lists(everything[0], sample):
        arguments = {k: v for k, v in query.items() if k != "status"}
        lines = await plan(store, list_statement(query.get("status"), 20, **arguments))
        if store.dialect == "sqlite":
            assert not any("TEMP B-TREE" in line for line in lines), (query, lines)
            assert re.match(
                r"(SEARCH|SCAN) \w+ USING (COVERING )?INDEX ix_mailroom_messages_|"
                r"(SEARCH|SCAN) found USING PRIMARY KEY",
                lines[0],
            ), (query, lines)
        else:
            assert not any("Sort" in line for line in lines), (query, lines)
            assert any(" Scan Backward using " in line for line in lines), (query, lines)
        listed = await store.list(query.get("status"), 20, **arguments)
        expected = [r.id for r in everything if matches(r, query)][:20]
        assert [r.id for r in listed] == expected, query
        assert expected or "status" in query, query  # the sample makes every filter find some


async def test_a_slow_read_delays_neither_writes_nor_other_reads(store: Store) -> None:
    """While a read holds its transaction open (a list that takes its time), records are
    written, claimed and finished, and read by id and listed. On SQLite the slow read is
    one of the store's own, holding one of its reader threads and read connections."""
    await seed(store, 200, 1, rng=random.Random(2))
    listed, release = threading.Event(), threading.Event()

    def slow_list(conn: Connection) -> int:
        found = len(conn.execute(list_statement(None, 500)).all())
        listed.set()
        release.wait(20)  # in the reader thread, its transaction open
        return found

    async with contextlib.AsyncExitStack() as held:
        if store.dialect == "sqlite":
            slow = asyncio.ensure_future(store._read(slow_list))
            held.callback(release.set)
            assert await asyncio.to_thread(listed.wait, 10)
        else:  # PostgreSQL's reads wait on the server: hold a transaction open there
            conn = await held.enter_async_context(db_connection(store))
            assert len((await conn.execute(list_statement(None, 500))).all()) == 200
        async with asyncio.timeout(10):
            job = legacy_job("reader@example.com")
            await store.insert_queued(job)
            claim = await store.claim(job, "worker-a", 0, lease=30)
            assert claim.attempt is not None
            assert await store.finish(claim.attempt, "sent")
            record = await store.get(job.id)
            assert record is not None and record.status == "sent"
            assert (await store.list("sent", 1))[0].id == job.id
        if store.dialect == "sqlite":
            assert not slow.done()  # all that ran beside it
    if store.dialect == "sqlite":
        assert await asyncio.wait_for(slow, 10) == 200


async def test_seeded_records_read_like_the_service_wrote_them(store: Store) -> None:
    now = now_utc()
    # In chunks of 700: built in a process of their own, as a large seed is.
    assert await seed(store, 2000, 10, now=now, rng=random.Random(7), chunk=700) == 2000
    stats = await store.stats()
    assert stats.total == 2000
    assert stats.by_status["sent"] > 1800 and stats.by_status["failed"] > 20
    assert set(stats.by_status) <= {"sent", "failed", "queued", "retrying"}
    assert stats.oldest is not None and now - timedelta(days=10) <= stats.oldest
    records = await store.list(limit=500) + [
        r for status in ("queued", "retrying", "failed") for r in await store.list(status, 500)
    ]
    for record in records:
        shown = record.to_json()  # every record reads back as the API shows it
        assert shown["history"][0]["status"] == "queued"
        assert shown["history"][-1]["status"] == record.status
        assert all(a.endswith(f"@{DOMAIN}") for a in record.recipients)
        assert list(record.results) == record.recipients
        assert record.created_at <= record.updated_at
        assert shown["history"][0]["at"] == shown["created_at"]  # times as the store writes them
        assert all(len(h["at"]) == 29 and h["at"].endswith("+00:00") for h in shown["history"])
        if record.status not in FINAL:  # pending only within the last day, as live
            assert record.created_at >= now - timedelta(days=1)
        got = await store.get(record.id)
        assert got is not None and got.to_json() == shown
    if store.dialect == "sqlite":
        # The same text SQLAlchemy writes: JSON as json.dumps makes it, UTC times.
        async with db_connection(store) as conn:
            rows = (
                await conn.exec_driver_sql(
                    "SELECT recipients, results, history, created_at, updated_at "
                    "FROM mailroom_messages LIMIT 300"
                )
            ).all()
        for row in rows:
            recipients, results, history, created, updated = tuple(row)
            for value in (recipients, results, history):
                assert json.dumps(json.loads(value)) == value
            assert created < updated and len(created) == len(updated) == 26
    # Their lookup rows, exactly those the service writes with a record (store._terms).
    async with db_connection(store) as conn:
        found = (
            await conn.exec_driver_sql("SELECT term, created_at, message_id FROM mailroom_lookup")
        ).all()
        seeded = (
            await conn.exec_driver_sql(
                "SELECT id, created_at, results, tags, meta FROM mailroom_messages"
            )
        ).all()
    wanted = []
    for row in seeded:
        record_id, created, *json_columns = tuple(row)
        values = [json.loads(v) if isinstance(v, str) else v for v in json_columns]
        wanted += [(term, created, record_id) for term in _terms(*values)]
    assert sorted(tuple(row) for row in found) == sorted(wanted)
    assert any(term.startswith("tag:") for term, _, _ in wanted)
    assert any(term.startswith("meta:customer c") for term, _, _ in wanted)


async def test_retention_keeps_what_is_still_to_be_sent(store: Store) -> None:
    """Final records older than the retention go, in small batches; records still to be
    sent (queued, sending, retrying) stay whatever their age, and so do recent ones."""
    now = now_utc()
    old = now - timedelta(days=40)
    await seed(store, 400, 10, now=old, rng=random.Random(3))  # pending ones among them
    await seed(store, 100, 5, now=now, rng=random.Random(4))
    at = old.isoformat(timespec="milliseconds")
    waiting = [
        new_job(to=f"w{n}@example.com", subject="s", text="t", created_at=at) for n in (1, 2, 3)
    ]
    for job in waiting:
        await store.insert_queued(job)
    await store.claim(waiting[1], "worker-a", 0, lease=30)  # sending
    claim = await store.claim(waiting[2], "worker-a", 0, lease=30)
    assert claim.attempt is not None
    await store.finish(claim.attempt, "retrying", next_attempt_at=now + timedelta(minutes=5))
    before = await store.stats()
    expired = [r for r in await store.list(limit=500) if r.created_at < old and r.status in FINAL]
    assert expired

    removed = await store.prune(now - timedelta(days=30), batch=7)

    after = await store.stats()
    old_unfinished = before.total - 100 - removed
    assert removed == sum(before.by_status[s] for s in ("sent", "failed")) - sum(
        after.by_status.get(s, 0) for s in ("sent", "failed")
    )
    assert after.total == before.total - removed
    for status in ("queued", "sending", "retrying"):
        assert after.by_status.get(status) == before.by_status.get(status), status
    kept = await store.list(limit=500)
    assert all(r.status not in FINAL for r in kept if r.created_at < now - timedelta(days=30))
    assert sum(1 for r in kept if r.created_at < now - timedelta(days=30)) == old_unfinished
    assert {job.id for job in waiting} <= {r.id for r in kept}
    for record in expired[:20]:
        assert await store.get(record.id) is None
    async with db_connection(store) as conn:  # their lookup rows went with them
        orphans = await conn.scalar(
            text(
                "SELECT count(*) FROM mailroom_lookup "
                "WHERE message_id NOT IN (SELECT id FROM mailroom_messages)"
            )
        )
        kept_rows = await conn.scalar(
            text("SELECT count(DISTINCT message_id) FROM mailroom_lookup")
        )
    assert orphans == 0 and kept_rows == after.total
    assert await store.expire(0) == 0  # 0 keeps everything
    assert await store.expire(30) == 0  # nothing left to expire


async def test_freed_space_is_reused(store: Store, tmp_path: Path) -> None:
    """After a prune the database stops growing until new records filled the space freed."""
    now = now_utc()
    await seed(store, 4000, 10, now=now - timedelta(days=50), rng=random.Random(5))
    removed = await store.expire(30)
    assert removed > 3800
    size = await database_size(store)
    await seed(store, removed // 2, 1, now=now, rng=random.Random(6))
    # Written into the freed pages (PostgreSQL's VACUUM may even hand back empty ones).
    assert await database_size(store) <= size
    await seed(store, removed, 1, now=now, rng=random.Random(8))
    assert await database_size(store) > size  # and grows again once they are full


async def database_size(store: Store) -> int:
    """Bytes the records take. SQLite: the file, checkpointed (all its pages, free ones
    included). PostgreSQL: the table after a VACUUM, which autovacuum runs after many
    deletes to make the space of the deleted rows reusable (emptied index pages are
    recycled a vacuum later, so the indexes are not counted)."""
    if store.dialect == "postgresql":
        async with db_connection(store) as conn:
            conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
            await conn.exec_driver_sql("VACUUM mailroom_messages")
            size = await conn.scalar(text("SELECT pg_relation_size('mailroom_messages')"))
        return int(size)
    path = typing.cast("str", make_url(store.url).database)

    def checkpointed() -> int:
        conn = sqlite3.connect(path)
        try:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            pages, page_size = (
                conn.execute(f"PRAGMA {pragma}").fetchone()[0]
                for pragma in ("page_count", "page_size")
            )
        finally:
            conn.close()
        size = os.path.getsize(path)
        assert size == pages * page_size
        return size

    return await asyncio.to_thread(checkpointed)


async def test_schema_5_database_gets_the_list_indexes_and_lookups(
    database_url: Secret, make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database of the previous version (schema 5: single-column indexes, no lookup
    table) is upgraded in place when a process opens it: the composite indexes replace
    the old ones, and every record's recipients, tags and metadata are in the lookup."""
    settings = make_settings(database_url=database_url)
    tagged = new_job(
        to=["Old@Example.com", "two@example.com", "Ann@BÜCHER.de"],
        subject="s",
        text="t",
        tags=["promo"],
        metadata={"order": "42", "city": "Zürich"},
    )
    plain = legacy_job("plain@example.com")
    store = await Store.open(settings)
    try:
        for job in (tagged, plain):
            await store.insert_queued(job)
        async with db_connection(store, begin=True) as conn:  # back to what schema 5 looked like
            for index in messages_table.indexes:
                await conn.exec_driver_sql(f"DROP INDEX {index.name}")
            for column in ("status", "created_at"):
                await conn.exec_driver_sql(
                    f"CREATE INDEX ix_mailroom_messages_{column} ON mailroom_messages ({column})"
                )
            await conn.exec_driver_sql("DROP TABLE mailroom_lookup")
            await conn.execute(text("UPDATE mailroom_schema SET version = 5"))
    finally:
        await store.close()
    monkeypatch.setattr("store.FILL_CHUNK", 1)  # a statement per record
    store = await Store.open(settings)
    try:
        async with db_connection(store) as conn:
            version = (await conn.execute(text("SELECT version FROM mailroom_schema"))).scalar()
            if store.dialect == "sqlite":
                query = "SELECT name FROM sqlite_master WHERE tbl_name = 'mailroom_messages'"
            else:
                query = "SELECT indexname FROM pg_indexes WHERE tablename = 'mailroom_messages'"
            names = {row[0] for row in (await conn.exec_driver_sql(query)).all()}
        assert version == SCHEMA_VERSION == 6
        assert {i.name for i in messages_table.indexes} <= names
        assert not names & {"ix_mailroom_messages_status", "ix_mailroom_messages_created_at"}
        assert {r.id for r in await store.list("queued")} == {plain.id, tagged.id}
        for found in (
            await store.list(recipient="old@example.com"),
            await store.list(recipient="TWO@example.com", tag="promo"),
            await store.list(meta=("order", "42")),
            await store.list(meta=("city", "Zürich"), recipient="ann@xn--bcher-kva.de"),
            await store.list(recipient="ann@bücher.de"),
        ):
            assert [r.id for r in found] == [tagged.id]
        assert [r.id for r in await store.list(recipient="plain@example.com")] == [plain.id]
    finally:
        await store.close()


async def test_processes_opening_a_new_database_at_once_take_turns(
    database_url: Secret, make_settings: Callable[..., Settings]
) -> None:
    """Several processes set up (or upgrade) the schema at the same moment: one does it,
    the others wait for it and find it done."""
    settings = make_settings(database_url=database_url)
    stores = await asyncio.gather(*(Store.open(settings) for _ in range(4)))
    try:
        for opened in stores:
            async with db_connection(opened) as conn:
                version = await conn.scalar(text("SELECT version FROM mailroom_schema"))
                rows = await conn.scalar(text("SELECT count(*) FROM mailroom_schema"))
            assert (version, rows) == (SCHEMA_VERSION, 1)
    finally:
        for opened in stores:
            await opened.close()


async def test_server_expires_old_records_at_start(make_settings: Callable[..., Settings]) -> None:
    """The server applies MESSAGE_RETENTION_DAYS in the background as it starts: an
    expired id then answers 404, like an unknown one."""
    settings = make_settings(message_retention_days=30)
    store = await Store.open(settings)
    try:
        await seed(store, 50, 5, now=now_utc() - timedelta(days=45), rng=random.Random(9))
        old = [r.id for r in await store.list(limit=500) if r.status in FINAL]
        job = legacy_job("new@example.com")
        await store.insert_queued(job)
    finally:
        await store.close()
    async with running_app(settings) as (app, client):
        await wait_ready(app)
        async with asyncio.timeout(20):
            while (await client.get(f"/api/messages/{old[0]}")).status_code != 404:
                await asyncio.sleep(0.05)
        for message_id in old:
            assert (await client.get(f"/api/messages/{message_id}")).status_code == 404
        assert (await client.get(f"/api/messages/{job.id}")).status_code == 200


async def test_lists_take_turns_and_reads_by_id_do_not_wait(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server answers one list at a time (clients listing in a loop cannot take the
    process from the accepts); reads by id and accepts go on meanwhile."""
    running = {"now": 0, "most": 0}
    real_list = Store.list

    async def counted(self: Store, *args: typing.Any, **kwargs: typing.Any) -> typing.Any:
        running["now"] += 1
        running["most"] = max(running["most"], running["now"])
        try:
            await asyncio.sleep(0.05)  # a list that takes its time
            return await real_list(self, *args, **kwargs)
        finally:
            running["now"] -= 1

    monkeypatch.setattr(Store, "list", counted)
    async with running_app(make_settings()) as (app, client):
        await wait_ready(app)
        sent = await client.get("/?sendmail=first@example.com")
        first = (await sent.get_data(as_text=True)).split("(id ")[1].rstrip(")\n")
        lists = [asyncio.ensure_future(client.get("/api/messages?limit=5")) for _ in range(6)]
        async with asyncio.timeout(5):
            while running["now"] == 0:
                await asyncio.sleep(0.01)
        assert (await client.get(f"/api/messages/{first}")).status_code == 200
        assert (await client.get("/?sendmail=second@example.com")).status_code == 200
        assert not all(task.done() for task in lists)  # still taking turns
        answers = await asyncio.gather(*lists)
    assert [a.status_code for a in answers] == [200] * 6
    assert running["most"] == 1


async def test_records_commands(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    """``admin.py records seed | stats | prune``, as an operator runs them."""
    settings = make_settings()
    env = child_env(
        settings.queue_prefix, DATABASE_URL=settings.database_url.get(), MESSAGE_RETENTION_DAYS=2
    )

    async def admin(*argv: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(ROOT / "admin.py"),
            *argv,
            cwd=tmp_path,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()
        return out.decode()

    assert (await admin("records", "seed", "--count", "3000", "--days", "6")).startswith(
        "seeded 3000 record(s) over 6 days in "
    )
    stats = json.loads(await admin("records", "stats"))
    assert stats["total"] == 3000 == sum(stats["by_status"].values())
    assert stats["by_status"]["sent"] > stats["by_status"]["failed"] > 0
    assert stats["oldest"] < (now_utc() - timedelta(days=5)).isoformat()
    removed = int((await admin("records", "prune")).split()[1])
    assert 1800 < removed < 2200  # the final ones of the 4 days past the retention
    after = json.loads(await admin("records", "stats"))
    assert after["total"] == 3000 - removed
    assert after["oldest"] > (now_utc() - timedelta(days=2, minutes=5)).isoformat()
    env["MESSAGE_RETENTION_DAYS"] = "0"
    assert "kept forever" in await admin("records", "prune")


def test_message_ids_are_random_uuid4_read_in_bulk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ids look as uuid.uuid4().hex made them, never repeat, and os.urandom (which gives
    up the GIL) is called once for many of them, not once per message."""
    reads: list[int] = []
    real = os.urandom

    def counted(n: int) -> bytes:
        reads.append(n)
        return real(n)

    monkeypatch.setattr(os, "urandom", counted)
    ids = [legacy_job("a@example.com").id for _ in range(1000)]
    assert len(set(ids)) == len(ids)
    for made in ids:
        parsed = uuid.UUID(made)
        assert parsed.hex == made
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
    assert 1 <= len(reads) <= 5, reads
    # The 128 bits are random but for the six that say "version 4, RFC 4122".
    ones = [sum(int(made, 16) >> bit & 1 for made in ids) for bit in range(128)]
    fixed = {76, 77, 78, 79, 62, 63}
    assert all(300 < count < 700 for bit, count in enumerate(ones) if bit not in fixed)
