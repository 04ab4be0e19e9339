"""One attempt at a time, final states that stay final, and no second send when a
connection is lost (issue 7, points 1-3), on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import random
import signal
import sqlite3
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiosmtpd.smtp import Envelope
from sqlalchemy import BindParameter, bindparam, text

import store as store_module
from broker import COPY_HEADER, Names
from config import Secret, Settings
from filelock import FileLock
from messages import MailJob, legacy_job, new_job
from store import (
    HANDED_BACK,
    SCHEMA_VERSION,
    Attempt,
    MessageRecord,
    RecipientResult,
    Store,
    StoreUnavailable,
    now_utc,
)
from tests.conftest import running_app, running_worker, wait_ready
from tests.support import (
    Proc,
    SmtpRecorder,
    TcpProxy,
    db_connection,
    finish,
    queue_depth,
    rabbitmqctl,
    spawn,
    start_smtp,
    worker_env,
)
from tests.test_faults import recipients, send, via, wait_until
from tests.test_status_api import wait_status
from worker import SENT_HEADER


async def close_connections(vhost: str, name: str) -> int:
    """Have RabbitMQ close the connections called ``name`` in ``vhost``; how many.

    (``list_connections`` lists every vhost's connections: filter on the vhost column.)
    """
    listing = await asyncio.to_thread(
        rabbitmqctl, "list_connections", "pid", "vhost", "client_properties"
    )
    pids = [
        fields[0]
        for line in listing.splitlines()
        if len(fields := line.split("\t")) >= 3 and fields[1] == vhost and f'"{name}"' in fields[2]
    ]
    for pid in pids:
        await asyncio.to_thread(rabbitmqctl, "close_connection", pid, "mailroom fault test")
    return len(pids)


class Gate:
    """An SMTP DATA hook that holds every mail until released, counting who waits."""

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.waiting = 0

    async def __call__(self, envelope: Envelope) -> None:
        self.waiting += 1
        await self.open.wait()


async def test_redelivery_waits_for_the_attempt_still_running(
    database_url: Secret,
    vhost: str,
    make_settings: Callable[..., Settings],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """RabbitMQ closes the worker's connection while its sends are in DATA: the copies it
    delivers again wait for those sends instead of sending a second time, and the acks
    that can no longer land (dead channel) are not mistaken for internal errors."""
    caplog.set_level(logging.INFO)
    gate = Gate()
    smtp = await start_smtp("none", None, auth=False, recorder=SmtpRecorder(on_data=gate))
    settings = make_settings(
        database_url=database_url,
        amqp_url=Secret(f"amqp://guest:guest@127.0.0.1:5672/{vhost}"),
        worker_concurrency=8,
        smtp_timeout=20.0,  # the gate may hold a mail for a while on a busy machine
        **smtp.settings_overrides(None, False),
    )
    count = 12
    async with running_app(settings) as (app, client), running_worker(settings):
        await wait_ready(app)
        for n in range(count):
            assert (await send(client, f"c{n}@example.com"))[0] == 200
        await wait_until(lambda: gate.waiting == 8)  # 8 in DATA, 4 waiting in the queue
        assert await close_connections(vhost, "mailroom-worker") == 1
        # The consumer comes back and RabbitMQ delivers the 8 unacked copies again: they
        # wait (or, as before the fix, start second sends that the gate holds too).
        await wait_until(
            lambda: caplog.text.count("still running here; waiting") >= 8 or gate.waiting > 8
        )
        gate.open.set()
        await wait_until(lambda: len(recipients(smtp.recorder)) >= count, timeout=30)
        ids = [r.message["X-Mailroom-Id"] for r in smtp.recorder.received]
        for message_id in ids:
            await wait_status(client, message_id, "sent")
        await wait_until(lambda: "already sent; acking without sending" in caplog.text)
    assert sorted(recipients(smtp.recorder)) == sorted(f"c{n}@example.com" for n in range(count))
    assert "internal error" not in caplog.text
    names = Names.of(settings)
    vhost_url = f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
    assert await queue_depth(names.dead_queue, vhost_url) == 0
    assert await queue_depth(names.send_queue, vhost_url) == 0
    smtp.server.close()


async def test_other_worker_waits_for_the_live_owner(
    database_url: Secret,
    make_settings: Callable[..., Settings],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Worker A's connection dies mid-DATA; RabbitMQ hands its messages to worker B, which
    waits for A's outcome (A's lease) and then acks without sending."""
    caplog.set_level(logging.INFO)
    gate = Gate()
    smtp = await start_smtp("none", None, auth=False, recorder=SmtpRecorder(on_data=gate))
    proxy = await TcpProxy("127.0.0.1", 5672).start()
    common = {
        "database_url": database_url,
        "smtp_timeout": 20.0,
        **smtp.settings_overrides(None, False),
    }
    settings_a = make_settings(amqp_url=via(proxy), **common)
    settings_b = make_settings(**common)
    count = 6
    try:
        async with running_app(settings_b) as (app, client), running_worker(settings_a):
            await wait_ready(app)
            for n in range(count):
                assert (await send(client, f"o{n}@example.com"))[0] == 200
            await wait_until(lambda: gate.waiting == count)  # A holds all of them
            async with running_worker(settings_b):
                proxy.accepting = False
                proxy.cut()  # A loses RabbitMQ; its unacked messages go to B
                await wait_until(
                    lambda: (
                        caplog.text.count("waiting for its outcome") >= count
                        or gate.waiting > count
                    )
                )
                gate.open.set()
                await wait_until(lambda: len(recipients(smtp.recorder)) >= count)
                for received in smtp.recorder.received:
                    await wait_status(client, received.message["X-Mailroom-Id"], "sent")
                await wait_until(lambda: caplog.text.count("already sent; acking") >= count)
                assert await queue_depth(Names.of(settings_b).send_queue) == 0
    finally:
        await proxy.close()
        smtp.server.close()
    assert sorted(recipients(smtp.recorder)) == sorted(f"o{n}@example.com" for n in range(count))
    assert await queue_depth(Names.of(settings_b).dead_queue) == 0


async def test_abandoned_attempt_is_taken_over_when_its_lease_ends(
    database_url: Secret, make_settings: Callable[..., Settings]
) -> None:
    """A worker on another host claimed the message and vanished: once its lease has run
    out, the message is sent (once)."""
    recorder_smtp = await start_smtp("none", None, auth=False)
    settings = make_settings(
        database_url=database_url, **recorder_smtp.settings_overrides(None, False)
    )
    job = legacy_job("orphan@example.com")
    store = await Store.open(settings)
    try:
        claim = await store.claim(job, "elsewhere/4242/abcd", 0, lease=2.0)
        assert claim.kind == "claimed"
    finally:
        await store.close()
    async with running_app(settings) as (app, client), running_worker(settings):
        await wait_ready(app)
        await app.extensions["mailroom_broker"].publish(job.to_bytes(), job.id)
        record = await wait_status(client, job.id, "sent", timeout=15)
    assert recipients(recorder_smtp.recorder) == ["orphan@example.com"]
    assert record["attempts"] == 2
    recorder_smtp.server.close()


async def test_a_late_outcome_never_overwrites_a_final_status(
    database_url: Secret, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(database_url=database_url)
    store = await Store.open(settings)
    job = legacy_job("final@example.com")
    try:
        first = await store.claim(job, "worker-a", 0, lease=30)
        assert first.kind == "claimed" and first.attempt is not None
        # Worker b finds a's lease held, and takes over only once a is known dead.
        held = await store.claim(job, "worker-b", 0, lease=30)
        assert held.kind == "busy"
        second = await store.claim(job, "worker-b", 0, 30, owner_alive=lambda owner: False)
        assert second.kind == "claimed" and second.attempt is not None
        assert await store.finish(second.attempt, "sent")
        # a's late 451 must not turn "sent" back into "retrying".
        assert not await store.finish(first.attempt, "retrying", error="451 4.3.0 later")
        assert not await store.finish(first.attempt, "failed", error="550 no")
        record = await store.get(job.id)
        assert record is not None
        assert record.status == "sent"
        assert record.last_error is None
        late = [h for h in record.history if "late outcome" in h.get("detail", "")]
        assert [h["status"] for h in late] == ["retrying", "failed"]
        # Nor does a new claim send it again.
        assert (await store.claim(job, "worker-c", 0, 30)).kind == "final"
    finally:
        await store.close()


async def test_a_handed_back_claim_is_undone_only_by_its_holder(
    database_url: Secret, make_settings: Callable[..., Settings]
) -> None:
    """A worker stopping hands back the claims of messages it had not begun to send: the
    record's status is as before the claim, it has no owner, the history says so, the
    message can be cancelled again, and the claim is not an unfinished attempt; an
    attempt that no longer holds the record changes nothing."""
    settings = make_settings(database_url=database_url)
    store = await Store.open(settings)
    job = legacy_job("back@example.com")

    async def record_of() -> MessageRecord:
        record = await store.get(job.id)
        assert record is not None
        return record

    try:
        first = await store.claim(job, "worker-a", 0, lease=30)
        assert first.attempt is not None
        assert await store.hand_back(first.attempt)
        assert not await store.hand_back(first.attempt)  # no longer held: nothing
        record = await record_of()
        # queued again, its attempt still counted (so never "untouched": the next claim
        # reads the record, and keeps its history).
        assert (record.status, record.attempts, record.owner) == ("queued", 1, None)
        assert record.lease_until is None and record.unfinished_attempts() == 0
        assert [h["status"] for h in record.history] == ["queued", "sending", "queued"]
        assert record.history[-1]["detail"] == HANDED_BACK
        # Handed back again before any send: still queued, not retrying.
        again = await store.claim(job, "worker-b", 0, lease=30)
        assert again.kind == "claimed" and again.attempt is not None
        assert again.attempt.number == 2
        assert await store.hand_back(again.attempt)
        assert (await record_of()).status == "queued"
        third = await store.claim(job, "worker-b", 0, lease=30)
        assert third.attempt is not None and third.attempt.number == 3
        assert await store.finish(third.attempt, "retrying", error="451 later")
        assert [h["status"] for h in (await record_of()).history] == [
            *("queued", "sending", "queued", "sending", "queued"),
            *("sending", "retrying"),
        ]
        # worker-b claims the retry and dies; worker-c takes it over, then stops before
        # its send: the record is retrying, and b's attempt still counts as unfinished.
        fourth = await store.claim(job, "worker-b", 1, lease=30)
        assert fourth.attempt is not None and fourth.attempt.number == 4
        taken = await store.claim(job, "worker-c", 1, 30, owner_alive=lambda owner: False)
        assert taken.attempt is not None
        assert not await store.hand_back(fourth.attempt)  # not b's to undo any more
        assert await store.hand_back(taken.attempt)
        record = await record_of()
        assert (record.status, record.attempts, record.owner) == ("retrying", 5, None)
        assert record.unfinished_attempts() == 1
        # b's late outcome, noted (as "sent") after the record went back to retrying:
        # a claim handed back after it still finds the record retrying.
        assert not await store.finish(fourth.attempt, "sent")
        assert (await record_of()).history[-1]["status"] == "sent"
        fifth = await store.claim(job, "worker-c", 1, lease=30)
        assert fifth.attempt is not None
        assert await store.hand_back(fifth.attempt)
        assert (await record_of()).status == "retrying"
        outcome, cancelled = await store.cancel(job.id)
        assert outcome == "cancelled" and cancelled is not None
        assert cancelled.status == "cancelled"
    finally:
        await store.close()


@pytest.mark.parametrize("server_first", [True, False], ids=["server-first", "worker-first"])
async def test_first_claim_without_reading_matches_the_stored_record(
    server_first: bool, database_url: Secret, make_settings: Callable[..., Settings]
) -> None:
    """The first claim of an untouched record writes without reading it: what it returns
    (and later writes from) is exactly what is stored, whoever created the record."""
    settings = make_settings(database_url=database_url)
    store = await Store.open(settings)
    job = legacy_job("Ann <fresh@example.com>")
    try:
        if server_first:
            await store.insert_queued(job)
        claim = await store.claim(job, "worker-a", 0, lease=30)
        assert claim.kind == "claimed" and claim.attempt is not None
        stored = await store.get(job.id)
        assert stored is not None
        assert claim.record.to_json() == stored.to_json()
        assert [h["status"] for h in stored.history] == ["queued", "sending"]
        assert stored.history[0]["at"] == stored.to_json()["created_at"]
        # The server's insert, arriving after the worker's claim, changes nothing.
        await store.insert_queued(job)
        assert await store.finish(claim.attempt, "sent")
        again = await store.get(job.id)
        assert again is not None and again.status == "sent" and again.attempts == 1
        assert [h["status"] for h in again.history] == ["queued", "sending", "sent"]
        assert again.owner == "worker-a" and again.lease_until is None
        assert again.updated_at >= stored.updated_at >= stored.created_at
        # A second claim of the same job reads the record (no longer untouched).
        assert (await store.claim(job, "worker-b", 0, 30)).kind == "final"
    finally:
        await store.close()


def limit_sqlite(database_url: Secret, monkeypatch: pytest.MonkeyPatch, limits: str) -> bool:
    """SQLite "as built", or with "small statements" (SQLite's own limit of bound values
    lowered to 40 on the write connection, :func:`bound_values_of`: two records, 8 lookup
    rows, a few claims or outcomes each), or with "no RETURNING" (as before SQLite
    3.35.5: each write on its own); the last two only on SQLite. Whether the store writes
    batches together then."""
    if limits != "as built" and not database_url.get().startswith("sqlite"):
        pytest.skip("SQLite's statement limits")
    if limits == "no RETURNING":
        monkeypatch.setattr(store_module, "SQLITE_RETURNING", False)
    return database_url.get().startswith("postgresql") or store_module.SQLITE_RETURNING


async def bound_values_of(store: Store, limits: str) -> None:
    """For "small statements": SQLite itself refuses a statement of more than 40 bound
    values on the store's write connection (a batch would then fail and be written
    again one unit at a time, which the tests rule out)."""
    if limits == "small statements":
        limit = sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER
        await store.write(lambda conn: store_module._driver(conn).setlimit(limit, 40))


def written_one_at_a_time(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The store's warnings that a batch failed and was written again unit by unit."""
    return [
        r.getMessage() for r in caplog.records if "writing them one at a time" in r.getMessage()
    ]


@pytest.mark.parametrize("sqlite_limits", ["as built", "small statements", "no RETURNING"])
async def test_claims_and_outcomes_written_together_match_one_at_a_time(
    database_url: Secret,
    make_settings: Callable[..., Settings],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    sqlite_limits: str,
) -> None:
    """Claims and outcomes that arrive together are written together (one statement per
    kind for a whole batch): each record ends exactly as one write at a
    time would leave it, and a record whose usual case does not hold (cancelled before
    its claim, taken over before its outcome) takes its own path inside the same batch.
    (On SQLite too: each statement less is one wait less for the GIL under the file
    lock; also in statements of a few rows, and one at a time without RETURNING, as
    before SQLite 3.35.5.)"""
    batched = limit_sqlite(database_url, monkeypatch, sqlite_limits)
    settings = make_settings(database_url=database_url)
    store = await Store.open(settings)
    await bound_values_of(store, sqlite_limits)
    jobs = [legacy_job(f"batch{n}@example.com") for n in range(40)]
    try:
        await asyncio.gather(*(store.insert_queued(job) for job in jobs))
        caplog.set_level(logging.DEBUG, logger="store")
        cancelled = jobs[7]
        outcome, _ = await store.cancel(cancelled.id)
        assert outcome == "cancelled"
        claims = await asyncio.gather(*(store.claim(job, "worker-a", 0, 30) for job in jobs))
        assert [c.kind for c in claims] == ["final" if j is cancelled else "claimed" for j in jobs]
        attempts = [c.attempt for c in claims if c.attempt is not None]
        # Another worker took one over (worker-a was presumed dead): its outcome is late.
        lost = attempts[3]
        assert lost.record is not None
        job_lost = next(j for j in jobs if j.id == lost.message_id)
        taken = await store.claim(job_lost, "worker-b", 0, 30, owner_alive=lambda owner: False)
        assert taken.kind == "claimed"
        applied = await asyncio.gather(
            *(
                store.finish(a, "sent", {a.record.recipients[0]: RecipientResult("sent")})
                for a in attempts
                if a.record is not None
            )
        )
        assert applied == [a is not lost for a in attempts]
        for job in jobs:
            record = await store.get(job.id)
            assert record is not None
            statuses = [h["status"] for h in record.history]
            if job is cancelled:
                assert (record.status, statuses) == ("cancelled", ["queued", "cancelled"])
            elif job is job_lost:
                assert record.status == "sending" and record.owner == "worker-b"
                assert statuses == ["queued", "sending", "sending", "sent"]
                assert "late outcome" in record.history[-1]["detail"]
            else:
                assert (record.status, record.attempts, record.owner) == ("sent", 1, "worker-a")
                assert statuses == ["queued", "sending", "sent"]
                assert record.results[job.to[0]].status == "sent"
                assert record.lease_until is None
        together: list[tuple[Any, ...]] = [
            tuple(r.args or ()) for r in caplog.records if "in one statement" in r.getMessage()
        ]
        assert written_one_at_a_time(caplog) == []
        if not batched:
            assert together == []
        else:  # The batches really were written together, the odd ones out included.
            assert any(kind == "untouched" and n > applied_ for n, kind, applied_ in together)
            assert any(kind == "held" and n > applied_ for n, kind, applied_ in together)
    finally:
        await store.close()


async def test_claims_and_outcomes_written_together_leave_the_rows_one_at_a_time_does(
    database_url: Secret,
    make_settings: Callable[..., Settings],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Column by column: the records (and lookup rows) that claims and outcomes written
    together leave, after the claims and after the outcomes, and the records the claims
    return, are those that the same writes one at a time leave, for outcomes of
    every shape (sent with results, retrying with an error, a code, a retry time and a
    copy, failed) and a claim of a record already sent (its own path)."""
    at = now_utc()
    monkeypatch.setattr(store_module, "now_utc", lambda: at)  # the same times both ways
    store = await Store.open(make_settings(database_url=database_url))
    jobs = [legacy_job(f"rows{n}@example.com") for n in range(12)]
    later = at + timedelta(seconds=60)

    async def outcome(n: int, attempt: Attempt) -> bool:
        if n % 3 == 0:
            return await store.finish(attempt, "sent", {jobs[n].to[0]: RecipientResult("sent")})
        if n % 3 == 1:
            return await store.finish(
                attempt, "retrying", error="451 later", code=451, next_attempt_at=later, copy=1
            )
        return await store.finish(attempt, "failed", error="550 no", code=550)

    usual: list[Any] = []

    async def write(together: bool) -> list[Any]:
        await asyncio.gather(*(store.insert_queued(job) for job in jobs))
        if together:
            claims = await asyncio.gather(*(store.claim(j, "worker-a", 0, 30) for j in jobs))
        else:
            claims = [await store.claim(j, "worker-a", 0, 30) for j in jobs]
        attempts = [c.attempt for c in claims]
        assert all(a is not None for a in attempts)
        claimed = await stored_rows(store, *jobs)
        pairs = [(n, a) for n, a in enumerate(attempts) if a is not None]
        if together:
            applied = await asyncio.gather(*(outcome(n, a) for n, a in pairs))
            # Every claim and outcome so far takes its usual case: a statement that
            # joined some of them updated each of its rows (a wrong one would update
            # none, and each unit's own path would heal it unseen).
            usual.extend(r.args for r in caplog.records if "in one statement" in r.getMessage())
            again = await asyncio.gather(*(store.claim(jobs[n], "worker-b", 0, 30) for n in (0, 3)))
        else:
            applied = [await outcome(n, a) for n, a in pairs]
            again = [await store.claim(jobs[n], "worker-b", 0, 30) for n in (0, 3)]
        assert applied == [True] * len(jobs)
        assert [c.kind for c in again] == ["final", "final"]  # sent: its own path
        return [claimed, await stored_rows(store, *jobs), [c.record for c in claims]]

    try:
        caplog.set_level(logging.DEBUG, logger="store")
        written_together = await write(together=True)
        assert written_one_at_a_time(caplog) == []  # no batch failed and was written again
        lines = [r.getMessage() for r in caplog.records]
        if database_url.get().startswith("postgresql") or store_module.SQLITE_RETURNING:
            assert sum("updates in one statement" in line for line in lines) >= 4
            assert usual and all(n == applied for n, _, applied in usual), usual
        await clear_records(store)
        assert await write(together=False) == written_together
    finally:
        await store.close()


async def test_writes_batched_together_keep_every_condition(
    database_url: Secret, make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    """Each condition of the batched claim and outcome holds on its own: a re-queued
    record (queued, but attempts and copy past 0) is claimed as a next attempt, never as
    untouched; an outcome of an older attempt by the same owner, and a second outcome of
    an attempt already final, are late; outcomes of another shape (retrying, with an error,
    a retry time and a copy) are batched as well."""
    settings = make_settings(database_url=database_url)
    store = await Store.open(settings)
    caplog.set_level(logging.DEBUG, logger="store")
    jobs = [legacy_job(f"cond{n}@example.com") for n in range(12)]
    later = now_utc() + timedelta(seconds=60)
    try:
        await asyncio.gather(*(store.insert_queued(job) for job in jobs))
        first = await asyncio.gather(*(store.claim(job, "worker-a", 0, 30) for job in jobs))
        attempts = [c.attempt for c in first]
        assert all(a is not None for a in attempts)
        # Retrying outcomes of one shape, together.
        retrying = await asyncio.gather(
            *(
                store.finish(a, "retrying", error="451 4.3.0 later", next_attempt_at=later, copy=1)
                for a in attempts
                if a is not None
            )
        )
        assert retrying == [True] * len(jobs)
        # jobs[0]: failed, then re-queued by an operator (queued again, attempts 1, copy 2).
        again = await store.claim(jobs[0], "worker-a", 1, 30)
        assert again.attempt is not None
        assert await store.finish(again.attempt, "failed", error="550 no")
        copy = await store.requeue(jobs[0].id, {}, "re-queued by an operator")
        assert copy == 2
        # Second attempts by the same owner for jobs[1:], then everything at once: the
        # re-queued claim, outcomes of the first (older) attempts, outcomes of the second.
        second = await asyncio.gather(*(store.claim(j, "worker-a", 1, 30) for j in jobs[1:]))
        assert all(c.kind == "claimed" and c.attempt for c in second)
        fresh = [legacy_job(f"fresh{n}@example.com") for n in range(3)]
        await asyncio.gather(*(store.insert_queued(job) for job in fresh))
        claiming = asyncio.create_task(store.claim(jobs[0], "worker-a", copy, 30))
        # Untouched records claimed in the same batch: the re-queued one joins their
        # statement, whose condition must turn it away.
        fresh_claims = [asyncio.create_task(store.claim(j, "worker-a", 0, 30)) for j in fresh]
        outcomes = await asyncio.gather(
            *(store.finish(a, "sent") for a in attempts[1:] if a is not None),
            *(store.finish(c.attempt, "sent") for c in second if c.attempt is not None),
        )
        requeued = await claiming
        assert [(await c).kind for c in fresh_claims] == ["claimed"] * 3
        old, new = outcomes[: len(jobs) - 1], outcomes[len(jobs) - 1 :]
        assert requeued.kind == "claimed" and requeued.attempt is not None
        assert requeued.attempt.number == 3  # attempts 1 and 2 before: a next attempt
        assert old == [False] * (len(jobs) - 1) and new == [True] * (len(jobs) - 1)
        # A second outcome of an attempt already final: late, the record stays sent.
        finals = [c.attempt for c in second if c.attempt is not None]
        assert await asyncio.gather(*(store.finish(a, "failed") for a in finals)) == [False] * len(
            finals
        )
        record = await store.get(jobs[0].id)
        assert record is not None and record.status == "sending" and record.copy == 2
        assert [h["status"] for h in record.history][:5] == [
            "queued",
            "sending",
            "retrying",
            "sending",
            "failed",
        ]
        for job in jobs[1:]:
            record = await store.get(job.id)
            assert record is not None
            assert (record.status, record.attempts, record.copy) == ("sent", 2, 1)
            assert record.last_error == "451 4.3.0 later"  # from the retrying outcome
            # The second outcome of the final attempt is only noted (the first attempt's
            # late note may be gone: the holder's outcome writes the history it claimed
            # with, one-at-a-time as well).
            assert record.history[-1]["status"] == "failed"
            assert "late outcome of attempt 2" in record.history[-1]["detail"]
        # "writer: <n> <kind> updates in one statement, <m> applied"
        lines = [r.getMessage().split() for r in caplog.records]
        together = [(int(w[1]), w[2]) for w in lines if w[3:6] == ["updates", "in", "one"]]
        assert written_one_at_a_time(caplog) == []
        if database_url.get().startswith("postgresql") or store_module.SQLITE_RETURNING:
            assert any(n >= 2 and kind == "held" for n, kind in together)
            assert any(n >= 2 and kind == "untouched" for n, kind in together)
    finally:
        await store.close()


def tagged_job() -> MailJob:
    """A job of every part: several recipients, cc, tags and metadata."""
    return new_job(
        to=["Bob <bob@example.com>", "cy@example.com"],
        cc=["dee@example.com"],
        subject="Tagged",
        text="hello",
        tags=["receipt", "eu"],
        metadata={"customer": "c1", "plan": "pro"},
    )


async def stored_rows(store: Store, *chosen: MailJob) -> list[tuple[Any, ...]]:
    """The records of ``chosen`` and their lookup rows, as the database holds them."""
    ids = [job.id for job in chosen]
    where: BindParameter[list[str]] = bindparam("ids", expanding=True)
    async with db_connection(store) as conn:
        records = await conn.execute(
            text(
                "SELECT *, tags IS NULL, meta IS NULL FROM mailroom_messages "
                "WHERE id IN :ids ORDER BY id"
            ).bindparams(where),
            {"ids": ids},
        )
        lookups = await conn.execute(
            text(
                "SELECT term, created_at, message_id FROM mailroom_lookup "
                "WHERE message_id IN :ids ORDER BY term, message_id"
            ).bindparams(where),
            {"ids": ids},
        )
        return [tuple(row) for row in records] + [tuple(row) for row in lookups]


async def clear_records(store: Store) -> None:
    async with db_connection(store, begin=True) as conn:
        for table in ("mailroom_lookup", "mailroom_messages"):
            await conn.execute(text(f"DELETE FROM {table}"))


async def test_a_claim_whose_record_is_missing_makes_it_as_insert_and_claim_do(
    database_url: Secret,
    make_settings: Callable[..., Settings],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A worker that gets a message before the server's insert of its record has
    committed claims it all the same: the record and its lookup rows it writes are exactly
    those of the server's insert followed by the claim, whatever the job's shape. The
    claim inserts the record as claimed, without reading it (the slow path read it,
    inserted it, read it again and updated it); the claims of a batch whose records are
    missing are inserted in one statement (on SQLite one more for their lookup rows)."""
    settings = make_settings(database_url=database_url)
    store = await Store.open(settings)
    at = now_utc()
    monkeypatch.setattr(store_module, "now_utc", lambda: at)  # the same times both ways
    loads = 0
    load = Store._load

    def counted_load(self: Store, conn: Any, message_id: str) -> MessageRecord | None:
        nonlocal loads
        loads += 1
        return load(self, conn, message_id)

    monkeypatch.setattr(Store, "_load", counted_load)
    jobs = [
        legacy_job("missing@example.com"),
        tagged_job(),
        new_job(to="Jürgen <jürgen@bücher.example>", subject="Grüße", text="hallo"),
    ]
    more_jobs = [legacy_job(f"more{n}@example.com") for n in range(5)]  # claimed together

    def copy(job: MailJob) -> int:
        return 1 if job is jobs[0] else 0

    caplog.set_level(logging.DEBUG, logger="store")
    try:
        # The first job's claim is of a retry copy (copy 1), as after a redelivery.
        missing = [await store.claim(job, "worker-a", copy(job), lease=30) for job in jobs]
        together = await asyncio.gather(
            *(store.claim(job, "worker-a", 0, lease=30) for job in more_jobs)
        )
        made = await stored_rows(store, *jobs, *more_jobs)
        slow_loads, loads = loads, 0
        await clear_records(store)
        claims = []
        for job in [*jobs, *more_jobs]:
            await store.insert_queued(job)
            claims.append(await store.claim(job, "worker-a", copy(job), lease=30))
        assert await stored_rows(store, *jobs, *more_jobs) == made
        assert [(c.kind, c.record, c.attempt) for c in [*missing, *together]] == [
            (c.kind, c.record, c.attempt) for c in claims
        ]
        assert loads == 0  # inserted, then claimed: the usual one UPDATE each
        assert slow_loads == 0
        assert written_one_at_a_time(caplog) == []
        lines = [r.getMessage() for r in caplog.records]
        if database_url.get().startswith("postgresql") or store_module.SQLITE_RETURNING:
            assert "writer: 5 missing records, as claimed, inserted together" in lines
    finally:
        await store.close()


async def test_sqlite_write_connection_keeps_a_small_page_cache(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """The write connection's page cache is WRITER_CACHE_KIB (SQLite's default, 2000 KiB,
    filled up in each process as the database grew: its peak RSS), and it stays so after
    writes; the read connections keep SQLite's default."""
    settings = make_settings(database_url=Secret(f"sqlite:///{tmp_path}/cache.db"))
    store = await Store.open(settings)
    try:
        await asyncio.gather(
            *(store.insert_queued(legacy_job(f"c{n}@example.com")) for n in range(20))
        )

        def cache_size(conn: Any) -> int:
            return int(conn.exec_driver_sql("PRAGMA cache_size").scalar())

        assert await store.write(cache_size) == -store_module.WRITER_CACHE_KIB
        default = sqlite3.connect(":memory:").execute("PRAGMA cache_size").fetchone()[0]
        assert await store._read(cache_size) == default
    finally:
        await store.close()


@pytest.mark.parametrize("sqlite_limits", ["as built", "small statements", "no RETURNING"])
async def test_records_inserted_together_match_one_at_a_time(
    database_url: Secret,
    make_settings: Callable[..., Settings],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    sqlite_limits: str,
) -> None:
    """New records that arrive together (a batch request, concurrent accepts) are written
    together (one statement for the whole batch; on SQLite one for the records, one for
    their lookup rows): the rows and lookup rows are exactly those one insert at a time
    writes, whatever the shape (several recipients, cc, tags and metadata, a scheduled
    send, an international address); a record that is there already (its worker got it
    first) and the same job twice are left as they are. SQLite also with statements of
    two records and 8 lookup rows at most (a batch bigger than SQLite's bound values
    allow in one), and without RETURNING (SQLite before 3.35.5: one at a time)."""
    batched = limit_sqlite(database_url, monkeypatch, sqlite_limits)
    settings = make_settings(database_url=database_url)
    store = await Store.open(settings)
    await bound_values_of(store, sqlite_limits)
    later = (now_utc() + timedelta(hours=2)).isoformat()
    jobs = [legacy_job(f"new{n}@example.com") for n in range(6)] + [
        tagged_job(),
        new_job(to="ann@example.com", subject="Later", text="hi", send_at=later),
        new_job(to="Jürgen <jürgen@bücher.example>", subject="Grüße", text="hallo"),
    ]
    taken = legacy_job("taken@example.com")  # claimed by a worker before any insert
    raw_rows = functools.partial(stored_rows, store)
    try:
        assert (await store.claim(taken, "worker-a", 0, lease=30)).kind == "claimed"
        claimed = await raw_rows(taken)
        caplog.set_level(logging.DEBUG, logger="store")
        await asyncio.gather(*(store.insert_queued(job) for job in [*jobs, jobs[0], taken]))
        # "writer: <n> new records inserted together"
        lines = [r.getMessage().split() for r in caplog.records]
        together = [int(w[1]) for w in lines if w[-2:] == ["inserted", "together"]]
        written_together = await raw_rows(*jobs)
        assert await raw_rows(taken) == claimed
        # The same jobs once more, one insert at a time, into an empty table.
        await clear_records(store)
        for job in jobs:
            await store.insert_queued(job)
        assert await raw_rows(*jobs) == written_together
        records = [await store.get(job.id) for job in jobs]
        statuses = [r.status if r else None for r in records]
        assert statuses == [*["queued"] * 7, "scheduled", "queued"]
        assert records[6] is not None and records[6].recipients == [
            "Bob <bob@example.com>",
            "cy@example.com",
            "dee@example.com",
        ]
        assert written_one_at_a_time(caplog) == []
        if not batched:
            assert together == []  # one statement per write
        else:
            assert any(n > 1 for n in together)  # really written together
    finally:
        await store.close()


async def test_sqlite_batched_updates_find_each_record_by_its_id(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    """The batched claims and outcomes on SQLite look each record up by its primary key,
    never scan by status (which has an index), even once SQLite has statistics that
    make that index look selective (many sent records, few queued or sending)."""
    store = await Store.open(make_settings(database_url=Secret(f"sqlite:///{tmp_path}/p.db")))
    try:
        jobs = [legacy_job(f"plan{n}@example.com") for n in range(300)]
        await asyncio.gather(*(store.insert_queued(job) for job in jobs))
        claims = await asyncio.gather(*(store.claim(job, "w", 0, 30) for job in jobs[:290]))
        await asyncio.gather(*(store.finish(c.attempt, "sent") for c in claims if c.attempt))
        await store.write(lambda conn: store_module._driver(conn).execute("ANALYZE"))
        shapes: list[tuple[Any, tuple[str, ...]]] = [
            ("untouched", ("status", "owner", "attempts", "lease_until", "history")),
            ("held", ("status", "results", "history", "updated_at", "owner")),
            ("expected", ("status", "history")),
            ("one", ("status",)),
        ]
        for kind, changed in shapes:
            sql = store_module._sqlite_update_rows_sql(kind, changed, 4)
            values = [None] * (4 * (1 + len(changed) + len(store_module._WHERE[kind][1])))

            def explain(conn: Any, sql: str = sql, values: list[None] = values) -> list[str]:
                rows = store_module._driver(conn).execute(f"EXPLAIN QUERY PLAN {sql}", values)
                return [row[3] for row in rows]

            plan = await store.write(explain)
            by_id = "INDEX sqlite_autoindex_mailroom_messages_1 (id=?)"
            assert any(step.startswith("SEARCH m USING") and by_id in step for step in plan)
            assert not any(step.startswith("SCAN m") or "status" in step for step in plan)
    finally:
        await store.close()


def test_sqlite_batch_statements_come_in_few_sizes() -> None:
    """A batch's rows go in statements of a power of two in size, the biggest first,
    each within SQLite's bound values: the driver keeps every statement text it ran
    prepared, so a handful of sizes, not one per batch size (24 MB more after 200)."""
    sizes = {
        n: [len(part) for part in store_module._chunks(list(range(n)), 32766 // 14)]
        for n in range(1, 1200)
    }
    assert sizes[100] == [64, 32, 4] and sizes[1] == [1]
    assert sizes[700][:10] == [64] * 10 and sizes[700][10:] == [32, 16, 8, 4]
    assert {size for parts in sizes.values() for size in parts} == {2**k for k in range(7)}
    assert all(sum(parts) == n for n, parts in sizes.items())
    assert [len(part) for part in store_module._chunks(list(range(20)), 13)] == [8, 8, 4]


class RowHolder:
    """A PostgreSQL transaction of the test's own that inserts a record (a copy of
    ``model``'s with another id) and holds it uncommitted: whoever inserts that id waits."""

    def __init__(self, url: str) -> None:
        self.url, self.name = url, url.rsplit("/", 1)[1]

    async def __aenter__(self) -> RowHolder:
        self.conn = await asyncpg.connect(self.url, timeout=5)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.conn.close()

    async def hold(self, model: str, message_id: str) -> Any:
        held = self.conn.transaction()
        await held.start()
        await self.conn.execute(
            "CREATE TEMP TABLE x ON COMMIT DROP AS SELECT * FROM mailroom_messages WHERE id = $1",
            model,
        )
        await self.conn.execute("UPDATE x SET id = $1", message_id)
        await self.conn.execute("INSERT INTO mailroom_messages SELECT * FROM x")
        return held

    async def until_waiting(self, count: int) -> None:
        """Until ``count`` client backends of this database (other than this one) wait on
        a lock."""
        query = (
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 "
            "AND backend_type = 'client backend' AND pid <> pg_backend_pid() "
            "AND wait_event_type = 'Lock'"
        )
        async with asyncio.timeout(10):
            while await self.conn.fetchval(query, self.name) < count:
                await asyncio.sleep(0.02)


def ordered_jobs(*firsts: str) -> list[MailJob]:
    """Jobs whose ids sort as ``firsts`` (their first characters) do."""
    return [
        new_job(to=f"{n}@example.com", subject="s", text="t", job_id=f"{n}{uuid.uuid4().hex[1:]}")
        for n in firsts
    ]


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
@pytest.mark.parametrize("scheduled", [False, True], ids=["now", "a-scheduled"])
async def test_records_inserted_while_a_worker_claims_them_never_deadlock(
    database_url: Secret,
    make_settings: Callable[..., Settings],
    caplog: pytest.LogCaptureFixture,
    scheduled: bool,
) -> None:
    """A worker that gets messages before the server's insert of them has committed
    inserts their records itself, in a batch of its own, while the server inserts the same
    records in one statement. Both take the rows in id order, so neither waits for a row
    that the other holds while waiting for one of its own. Here the server's statement
    has inserted A and waits at X (held by a third transaction) before B; the worker's
    batch claims B and A, its claims reaching it in that order. Taken in its own order,
    the worker would insert B and wait for A: a deadlock once X is free, one transaction
    aborted after deadlock_timeout (a second) and its writes written again one at a
    time. In id order it waits at A holding nothing, and both batches commit. With A
    scheduled (due now) its claim is the general one, whose record cannot be known from
    the job: it is inserted as the server inserts it, in the same statement as B's."""
    settings = make_settings(database_url=database_url)
    server = await Store.open(settings)
    worker = await Store.open(settings)
    a, x, b = ordered_jobs("1", "5", "9")
    if scheduled:
        due = (now_utc() + timedelta(milliseconds=50)).isoformat()
        a = new_job(to="1@example.com", subject="s", text="t", send_at=due, job_id=a.id)
    model = legacy_job("model@example.com")
    caplog.set_level(logging.WARNING, logger="store")
    try:
        async with RowHolder(database_url.get()) as holder:
            await server.insert_queued(model)
            held = await holder.hold(model.id, x.id)
            inserting = asyncio.gather(*(server.insert_queued(job) for job in (a, x, b)))
            await holder.until_waiting(1)  # the server's statement, at X
            claiming = asyncio.gather(*(worker.claim(job, "w", 0, lease=30) for job in (b, a)))
            await holder.until_waiting(2)  # and the worker's batch
            await held.rollback()
            async with asyncio.timeout(20):
                await inserting
                claims = await claiming
        assert [claim.kind for claim in claims] == ["claimed", "claimed"]
        for job, status in ((a, "sending"), (x, "queued"), (b, "sending")):
            record = await server.get(job.id)
            assert record is not None and record.status == status
        failed = [r.getMessage() for r in caplog.records if "writes failed" in r.getMessage()]
        assert failed == []
    finally:
        await server.close()
        await worker.close()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_a_worker_claims_before_it_records_outcomes_so_never_deadlocks(
    database_url: Secret, make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    """The server's insert also waits for a worker's transaction that updates the record
    (the worker made it first, claimed it, sent the mail, and now writes the outcome). A
    worker's batch runs its claims, which may wait for the server's inserts, before its
    outcomes. Here the server's statement has inserted A and waits at X (held by a third
    transaction) before Q1; the worker's batch has the outcomes of Q1 and Q2 (written
    together) and the claim of A. Outcomes first, it would update Q1 and Q2, then wait for
    A: a deadlock once X is free (the server waits at Q1). Claims first, it waits at A
    holding nothing, and both batches commit."""
    settings = make_settings(database_url=database_url)
    server = await Store.open(settings)
    worker = await Store.open(settings)
    a, x, q1, q2 = ordered_jobs("1", "5", "8", "9")
    model = legacy_job("model@example.com")
    caplog.set_level(logging.DEBUG, logger="store")
    try:
        async with RowHolder(database_url.get()) as holder:
            await server.insert_queued(model)
            attempts = []
            for job in (q1, q2):  # the worker got these first: it made their records
                claim = await worker.claim(job, "w", 0, lease=30)
                assert claim.attempt is not None
                attempts.append(claim.attempt)
            held = await holder.hold(model.id, x.id)
            inserting = asyncio.gather(*(server.insert_queued(job) for job in (a, x, q1)))
            await holder.until_waiting(1)  # the server's statement, at X
            writing = asyncio.gather(
                *(worker.finish(attempt, "sent") for attempt in attempts),
                worker.claim(a, "w", 0, lease=30),
            )
            await holder.until_waiting(2)  # and the worker's batch, at A
            await held.rollback()
            async with asyncio.timeout(20):
                await inserting
                results = await writing
        assert results[:2] == [True, True]
        claimed = results[2]
        assert isinstance(claimed, store_module.Claim) and claimed.kind == "claimed"
        for job, status in ((a, "sending"), (x, "queued"), (q1, "sent"), (q2, "sent")):
            record = await server.get(job.id)
            assert record is not None and record.status == status
        messages = [r.getMessage() for r in caplog.records]
        assert "writer: 2 held updates in one statement, 2 applied" in messages  # together
        assert [m for m in messages if "writes failed" in m] == []
    finally:
        await server.close()
        await worker.close()


async def test_a_new_record_the_database_refuses_fails_alone(
    database_url: Secret, make_settings: Callable[..., Settings]
) -> None:
    """A new record that the database refuses in a batch of new records (PostgreSQL: an id
    longer than its column) fails for its own caller only: the batch is rolled back and
    its units run again one at a time, so every other record of it is written."""
    if database_url.get().startswith("sqlite"):
        pytest.skip("SQLite does not hold a text to its column's length")
    settings = make_settings(database_url=database_url)
    store = await Store.open(settings)
    jobs = [legacy_job(f"fine{n}@example.com") for n in range(6)]
    refused = new_job(to="long@example.com", subject="s", text="t", job_id="x" * 40)
    try:
        results = await asyncio.gather(
            *(store.insert_queued(job) for job in [*jobs[:3], refused, *jobs[3:]]),
            return_exceptions=True,
        )
        assert isinstance(results[3], StoreUnavailable)
        assert results[:3] + results[4:] == [None] * 6
        for job in jobs:
            record = await store.get(job.id)
            assert record is not None and record.status == "queued"
    finally:
        await store.close()


async def test_an_older_copy_is_dropped(
    database_url: Secret, make_settings: Callable[..., Settings]
) -> None:
    """Once a retry copy (copy 1) exists, the copy it replaced (copy 0) is stale."""
    settings = make_settings(database_url=database_url)
    store = await Store.open(settings)
    job = legacy_job("copies@example.com")
    try:
        claim = await store.claim(job, "worker-a", 0, lease=30)
        assert claim.attempt is not None
        assert await store.finish(claim.attempt, "retrying", error="451 later", copy=1)
        assert (await store.claim(job, "worker-b", 0, 30)).kind == "stale"
        newer = await store.claim(job, "worker-b", 1, 30)
        assert newer.kind == "claimed" and newer.record.copy == 1
    finally:
        await store.close()


async def test_nothing_left_to_send_is_recorded_without_smtp(
    database_url: Secret, make_settings: Callable[..., Settings]
) -> None:
    """A retry copy whose recipients all accepted the mail already (they ride on it in
    x-mailroom-sent) is recorded sent and acked without an SMTP connection."""
    smtp = await start_smtp("none", None, auth=False)
    settings = make_settings(database_url=database_url, **smtp.settings_overrides(None, False))
    job = legacy_job("done@example.com")
    async with running_app(settings) as (app, client):
        await wait_ready(app)
        broker = app.extensions["mailroom_broker"]
        await broker.publish(
            job.to_bytes(), job.id, headers={SENT_HEADER: "done@example.com", COPY_HEADER: 1}
        )
        async with running_worker(settings):
            record = await wait_status(client, job.id, "sent")
    assert smtp.recorder.connections == 0
    assert smtp.recorder.received == []
    assert record["recipients"][0]["status"] == "sent"
    assert await queue_depth(Names.of(settings).send_queue) == 0
    assert await queue_depth(Names.of(settings).dead_queue) == 0
    smtp.server.close()


async def test_server_connection_closed_during_a_burst_answers_503_never_500(
    vhost: str, make_settings: Callable[..., Settings]
) -> None:
    """RabbitMQ closes the server's connection again and again under load: each request
    is queued (200/202) or refused with 503 + Retry-After, never a 500, and a refused
    request with an Idempotency-Key has its key released (or kept only when the confirm
    is merely late)."""
    settings = make_settings(amqp_url=Secret(f"amqp://guest:guest@127.0.0.1:5672/{vhost}"))
    statuses: list[int] = []
    refused_keys: list[str] = []
    async with running_app(settings) as (app, client):
        await wait_ready(app)

        async def one(n: int) -> None:
            if n % 2:
                response = await client.get("/", query_string={"sendmail": f"b{n}@example.com"})
            else:
                key = f"burst-{n}"
                response = await client.post(
                    "/api/messages",
                    json={"to": f"b{n}@example.com", "subject": "s", "text": "t"},
                    headers={"Idempotency-Key": key},
                )
                if response.status_code == 503:
                    refused_keys.append(key)
            if response.status_code == 503:
                assert response.headers["Retry-After"] == "5"
            statuses.append(response.status_code)

        closed = asyncio.Event()
        numbers = iter(range(100_000))

        async def sender() -> None:  # keeps sending until the closes are over
            while not closed.is_set():
                await one(next(numbers))

        async def closer() -> None:
            try:
                for _ in range(3):
                    await wait_until(lambda: app.extensions["mailroom_broker"].is_ready)
                    await asyncio.sleep(0.15)  # some traffic on the new connection first
                    await close_connections(vhost, "mailroom-server")
            finally:
                closed.set()

        async with asyncio.timeout(40):
            await asyncio.gather(closer(), *(sender() for _ in range(16)))
        assert set(statuses) <= {200, 202, 503}, sorted(set(statuses))
        assert 503 in statuses  # the closes did land in the middle of the burst
        await wait_until(lambda: app.extensions["mailroom_broker"].is_ready)
        for key in refused_keys:  # a retry with the key is never stuck at 409
            n = int(key.split("-")[1])
            async with asyncio.timeout(20):
                while True:
                    again = await client.post(
                        "/api/messages",
                        json={"to": f"b{n}@example.com", "subject": "s", "text": "t"},
                        headers={"Idempotency-Key": key},
                    )
                    if again.status_code != 409:
                        break
                    await asyncio.sleep(0.2)
            assert again.status_code == 202, await again.get_data(as_text=True)


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
async def test_long_mixed_fault_scenario(
    database_url: Secret,
    vhost: str,
    make_settings: Callable[..., Settings],
    tmp_path: Path,
) -> None:
    """Slow SMTP, first tries deferred, the server's and the workers' connections closed
    again and again, and a worker SIGKILLed, all during one burst: every accepted mail is
    delivered, none twice beyond the SIGKILL window, and nothing delivered is
    dead-lettered."""
    deferred_once: set[str] = set()

    async def slow_and_deferring(envelope: Envelope) -> str | None:
        content = bytes(envelope.original_content or b"")
        message_id = content.split(b"X-Mailroom-Id: ", 1)[1][:32].decode()
        await asyncio.sleep(random.uniform(0.0, 0.25))
        if int(message_id, 16) % 4 == 0 and message_id not in deferred_once:
            deferred_once.add(message_id)
            return "451 4.3.0 try again later"
        return None

    smtp = await start_smtp(
        "none", None, auth=False, recorder=SmtpRecorder(on_data=slow_and_deferring)
    )
    url = f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
    settings = make_settings(
        database_url=database_url,
        amqp_url=Secret(url),
        retry_delays=(0.5, 1.0, 2.0, 4.0),
        **smtp.settings_overrides(None, False),
    )
    env = worker_env(
        settings.queue_prefix,
        settings,
        smtp.port,
        AMQP_URL=url,
        WORKER_CONCURRENCY=8,
        WORKER_PREFETCH=16,
        ATTEMPT_LEASE=3,
    )
    workers: list[Proc] = []
    accepted: dict[str, str] = {}  # message id -> recipient
    count = 240
    try:
        async with running_app(settings) as (app, client):
            await wait_ready(app)
            workers += [await spawn("worker.py", tmp_path, env) for _ in range(2)]
            broker = app.extensions["mailroom_broker"]

            async def submit(n: int) -> None:
                address = f"m{n}@example.com"
                async with asyncio.timeout(40):
                    while True:
                        response = await client.get("/", query_string={"sendmail": address})
                        if response.status_code == 200:
                            body = await response.get_data(as_text=True)
                            accepted[body.split("id ")[1][:32]] = address
                            return
                        assert response.status_code == 503
                        await asyncio.sleep(0.2)

            async def traffic() -> None:
                semaphore = asyncio.Semaphore(8)

                async def limited(n: int) -> None:
                    async with semaphore:
                        await submit(n)

                await asyncio.gather(*(limited(n) for n in range(count)))

            def more(than: int) -> bool:
                return len(smtp.recorder.received) >= than

            async def chaos() -> None:
                for round_, progress in enumerate((20, 70, 120)):
                    await wait_until(functools.partial(more, progress), 40)
                    await close_connections(vhost, "mailroom-worker")
                    await wait_until(lambda: broker.is_ready)
                    await close_connections(vhost, "mailroom-server")
                    if round_ == 1:
                        os.killpg(workers[0].pid, signal.SIGKILL)
                        await finish(workers[0])
                        workers.append(await spawn("worker.py", tmp_path, env))

            await asyncio.gather(traffic(), chaos())
            await wait_until(
                lambda: set(accepted.values()) <= set(recipients(smtp.recorder)), timeout=60
            )
            for message_id in accepted:
                await wait_status(client, message_id, "sent", timeout=30)
    finally:
        for proc in workers:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                code, out = await finish(proc, timeout=30)
                assert code == 0, out[-3000:]
        smtp.server.close()
    delivered = recipients(smtp.recorder)
    assert len(accepted) == count
    assert set(delivered) == set(accepted.values())
    # The only duplicates allowed: mails the worker held when it was SIGKILLed (at most
    # WORKER_PREFETCH).
    assert len(delivered) - len(set(delivered)) <= 16
    names = Names.of(settings)
    assert await queue_depth(names.dead_queue, url) == 0
    for queue in (names.send_queue, *(t.queue for t in names.retry_tiers)):
        assert await queue_depth(queue, url) == 0


async def test_schema_1_database_is_upgraded(
    database_url: Secret, make_settings: Callable[..., Settings]
) -> None:
    """A database written by the previous version (schema 1, no ownership columns) is
    upgraded in place when a process opens it, keeping its records."""
    from sqlalchemy import text

    settings = make_settings(database_url=database_url)
    job = legacy_job("old@example.com")
    store = await Store.open(settings)
    try:
        await store.insert_queued(job)
        async with db_connection(store, begin=True) as conn:  # back to what schema 1 looked like
            for column in ("owner", "lease_until", "copy"):
                await conn.execute(text(f"ALTER TABLE mailroom_messages DROP COLUMN {column}"))
            await conn.execute(text("UPDATE mailroom_schema SET version = 1"))
    finally:
        await store.close()
    store = await Store.open(settings)
    try:
        claim = await store.claim(job, "worker-a", 0, lease=30)
        assert claim.kind == "claimed" and claim.record.copy == 0
        async with db_connection(store) as conn:
            version = (await conn.execute(text("SELECT version FROM mailroom_schema"))).scalar()
        assert version == SCHEMA_VERSION
    finally:
        await store.close()


@pytest.mark.parametrize("linger", [0.0, 0.5], ids=["server", "worker"])
async def test_a_lingering_writer_takes_the_writes_that_come_meanwhile(
    database_url: Secret,
    make_settings: Callable[..., Settings],
    caplog: pytest.LogCaptureFixture,
    linger: float,
) -> None:
    """The worker's writer (Store.open's ``linger``) waits a little before a small batch,
    so a write that comes meanwhile is in the same transaction (seen by a failing one:
    the batch is rolled back and its writes run one at a time); the server's writer takes
    a write at once, alone."""
    store = await Store.open(make_settings(database_url=database_url), linger=linger)
    caplog.set_level(logging.WARNING, logger="store")

    def fine(conn: Any) -> int:
        return 1

    def broken(conn: Any) -> int:
        raise ValueError("a unit that fails")

    try:
        first = asyncio.create_task(store.write(fine))
        await asyncio.sleep(0.02)
        with pytest.raises(ValueError, match="a unit that fails"):
            await store.write(broken)
        assert await first == 1
    finally:
        await store.close()
    together = [r for r in caplog.records if "a batch of 2 writes failed" in r.getMessage()]
    assert len(together) == (1 if linger else 0)


async def test_sqlite_rows_are_built_before_the_file_lock_is_taken(
    tmp_path: Path, make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The per-mail writes (a new record, a claim, an outcome) build their rows (JSON,
    times, history) in the writer thread before it takes Mailroom's file lock: the other
    process's writes wait only for the statements and the commit."""
    url = Secret(f"sqlite:///{tmp_path}/mailroom.db")
    store = await Store.open(make_settings(database_url=url))
    lock = store._lock
    assert lock is not None
    held: list[tuple[str, bool]] = []

    def spying(name: str) -> Callable[..., Any]:
        real = getattr(store_module, name)

        def spy(*args: Any, **kwargs: Any) -> Any:
            held.append((name, lock._held is not None))
            return real(*args, **kwargs)

        return spy

    for name in ("_queued_row", "_transition_of", "_sqlite_update", "_sqlite_insert_sql"):
        monkeypatch.setattr(store_module, name, spying(name))
    monkeypatch.setattr(store_module, "_driver", spying("_driver"))  # the statements
    job = new_job(to="locked@example.com", subject="s", text="t")
    try:
        await store.insert_queued(job)
        claim = await store.claim(job, "worker-a", 0, lease=30)
        assert claim.attempt is not None
        assert await store.finish(claim.attempt, "sent", {job.to[0]: RecipientResult("sent")})
        record = await store.get(job.id)
    finally:
        await store.close()
    assert record is not None and record.status == "sent" and record.attempts == 1
    built = {name for name, _ in held if name != "_driver"}
    assert built == {"_queued_row", "_transition_of", "_sqlite_update", "_sqlite_insert_sql"}
    assert [entry for entry in held if entry[1] != (entry[0] == "_driver")] == []
    assert ("_driver", True) in held  # the statements themselves: under the lock


async def test_a_claim_that_waited_for_the_file_lock_gets_its_whole_lease(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    """A claim's row is built before the writer takes the file lock; when another process
    held the lock meanwhile (here for 1.5 s), it is built again after the wait, so its
    lease counts from the write, not from before the wait."""
    url = Secret(f"sqlite:///{tmp_path}/mailroom.db")
    store = await Store.open(make_settings(database_url=url))
    assert store._lock is not None
    other = FileLock(store._lock.path)  # another process's hold on the same lock
    job = new_job(to="waited@example.com", subject="s", text="t")
    try:
        await store.insert_queued(job)
        assert other.acquire(1)
        try:
            claiming = asyncio.create_task(store.claim(job, "worker-a", 0, lease=3))
            await asyncio.sleep(1.5)  # the other process's write, holding the lock
            assert not claiming.done()
        finally:
            other.close()
        claim = await asyncio.wait_for(claiming, 10)
        written = now_utc()
        record = await store.get(job.id)
    finally:
        await store.close()
    assert claim.kind == "claimed" and record is not None
    assert record.lease_until is not None
    assert record.lease_until >= written + timedelta(seconds=3 - 0.75)


async def test_a_write_once_the_store_is_closing_is_refused_at_once(
    database_url: Secret, make_settings: Callable[..., Settings]
) -> None:
    """Writes queued before ``close()`` are written; one that comes once it has begun is
    refused (StoreUnavailable) at once, never queued for a writer that is stopping (its
    caller would wait forever)."""
    settings = make_settings(database_url=database_url)
    store = await Store.open(settings, linger=0.05)
    job = legacy_job("closing@example.com")
    first = asyncio.create_task(store.insert_queued(job))
    await asyncio.sleep(0)
    closing = asyncio.create_task(store.close())
    await asyncio.sleep(0)
    with pytest.raises(StoreUnavailable, match="closed"):
        await asyncio.wait_for(store.claim(job, "worker-a", 0, lease=30), 5)
    await asyncio.wait_for(closing, 10)
    await asyncio.wait_for(first, 1)
    store = await Store.open(settings)
    try:
        record = await store.get(job.id)
        assert record is not None and record.status == "queued"
    finally:
        await store.close()
