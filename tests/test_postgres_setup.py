"""Moving to PostgreSQL: a missing database is created (or the createdb command named),
and admin.py copies the SQLite records across, idempotently."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from config import Secret, Settings
from messages import new_job
from store import RecipientResult, Store, StoredTemplate, StoreUnavailable
from tests.conftest import pg_database
from tests.support import child_env, finish, spawn

PG = "postgresql://{user}@127.0.0.1:5432/{name}"


async def test_missing_database_is_created_when_the_user_may(
    make_settings: Callable[..., Settings],
) -> None:
    async with pg_database() as (name, admin):
        await admin.execute(f'DROP DATABASE "{name}"')  # DATABASE_URL names no database
        settings = make_settings(database_url=Secret(PG.format(user="postgres", name=name)))
        store = await Store.open(settings)
        try:
            job = new_job(to=["a@example.com"], subject="s", text="t")
            await store.insert_queued(job)
            record = await store.get(job.id)
            assert record is not None and record.status == "queued"
        finally:
            await store.close()
        assert await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)


async def test_missing_database_the_user_may_not_create_names_the_command(
    prefix: str, tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    async with pg_database() as (name, admin):
        await admin.execute(f'DROP DATABASE "{name}"')
        role = f"mailroom_{uuid.uuid4().hex[:8]}"
        await admin.execute(f'CREATE ROLE "{role}" LOGIN')  # no CREATEDB
        try:
            url = PG.format(user=role, name=name)
            with pytest.raises(StoreUnavailable) as refused:
                await Store.open(make_settings(database_url=Secret(url)))
            command = f"sudo -u postgres createdb --owner={role} {name}"
            assert str(refused.value) == (
                f'cannot open the database: database "{name}" does not exist, and user '
                f'"{role}" may not create it; create it with: {command}'
            )
            # The server says so in one line (no traceback) and exits 1.
            proc = await spawn("server.py", tmp_path, child_env(prefix, DATABASE_URL=url))
            code, out = await finish(proc)
            assert code == 1 and "Traceback" not in out, out
            assert out == f"server: {refused.value} (DATABASE_URL)\n"
        finally:
            await admin.execute(f'DROP ROLE "{role}"')


async def test_admin_copies_sqlite_records_to_postgresql_idempotently(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    source = make_settings()  # SQLite, in tmp_path
    store = await Store.open(source)
    jobs = [new_job(to=[f"u{n}@example.com"], subject=f"s{n}", text="t") for n in range(3)]
    try:
        for job in jobs:
            await store.insert_queued(job)
        claim = await store.claim(jobs[0], "someone", 0, 30)
        assert claim.attempt is not None
        await store.finish(claim.attempt, "sent", {"u0@example.com": RecipientResult("sent")})
        assert await store.claim_idempotency_key("addr:127.0.0.1", "k1", "h", jobs[1].id) is None
        await store.save_batch_answer("b" * 32, '{"queued": 0, "results": []}')
        await store.put_template(StoredTemplate("welcome", "Hi {{ name }}", "t", None))
        before = {job.id: await store.get(job.id) for job in jobs}
    finally:
        await store.close()
    async with pg_database() as (name, admin):
        await admin.execute(f'DROP DATABASE "{name}"')  # created by the copy
        target_url = PG.format(user="postgres", name=name)
        env = child_env("unused", DATABASE_URL=target_url)
        command = ("db", "copy", "--from", source.database_url.get())
        code, first = await finish(await spawn("admin.py", tmp_path, env, *command))
        assert code == 0, first
        assert first.splitlines() == [
            f'WARNING dbsetup: created the PostgreSQL database "{name}" (DATABASE_URL)',
            "mailroom_messages: 3 copied",
            "mailroom_idempotency: 1 copied",
            "mailroom_batch_answers: 1 copied",
            "mailroom_templates: 1 copied",
            f"into {target_url}",
        ]
        code, again = await finish(await spawn("admin.py", tmp_path, env, *command))
        assert code == 0, again
        assert again.splitlines()[:3] == [
            "mailroom_messages: 0 copied, 3 already there",
            "mailroom_idempotency: 0 copied, 1 already there",
            "mailroom_batch_answers: 0 copied, 1 already there",
        ]
        target = await Store.open(dataclasses.replace(source, database_url=Secret(target_url)))
        try:
            for n, job in enumerate(jobs):
                assert await target.get(job.id) == before[job.id]
                # Found by recipient too: the copy wrote the lookup rows.
                found = await target.list(recipient=f"u{n}@example.com")
                assert [r.id for r in found] == [job.id]
            assert (await target.claim_idempotency_key("addr:127.0.0.1", "k1", "h", "x")) == (
                jobs[1].id
            )
            assert await target.batch_answer("b" * 32) == '{"queued": 0, "results": []}'
            template = await target.get_template("welcome")
            assert template is not None and template.subject == "Hi {{ name }}"
        finally:
            await target.close()
    code, out = await finish(
        await spawn("admin.py", tmp_path, env, "db", "copy", "--from", "sqlite:///no/such.db")
    )
    assert code == 1 and out == "admin: sqlite:///no/such.db: no such database file: no/such.db\n"
