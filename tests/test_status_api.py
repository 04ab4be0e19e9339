"""Message records through the API, on SQLite and PostgreSQL; idempotency keys."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Any

import pytest
from quart import Quart
from quart.typing import TestClientProtocol as Client

from config import Secret, Settings
from tests.conftest import running_app, running_worker, wait_ready
from tests.support import SmtpServer, db_connection, queue_depth

BODY = {"to": ["a@example.com", "B <b@example.com>"], "subject": "status", "text": "t"}


async def wait_status(client: Client, message_id: str, status: str, timeout: float = 15) -> Any:
    async with asyncio.timeout(timeout):
        while True:
            response = await client.get(f"/api/messages/{message_id}")
            if response.status_code == 200:
                record = await response.get_json()
                if record["status"] == status:
                    return record
            await asyncio.sleep(0.05)


async def test_record_follows_the_message(
    database_url: Secret, make_settings: Callable[..., Settings], smtp: SmtpServer
) -> None:
    settings = make_settings(database_url=database_url, **smtp.settings_overrides(None, False))
    async with running_app(settings) as (app, client):
        await wait_ready(app)
        response = await client.post("/api/messages", json=BODY)
        assert response.status_code == 202
        assert response.headers["Location"].endswith((await response.get_json())["id"])
        message_id = (await response.get_json())["id"]
        queued = await (await client.get(f"/api/messages/{message_id}")).get_json()
        assert queued["status"] == "queued"
        assert queued["attempts"] == 0
        assert queued["last_error"] is None
        async with running_worker(settings):
            record = await wait_status(client, message_id, "sent")
    assert record["id"] == message_id
    assert record["subject"] == "status"
    assert record["attempts"] == 1
    assert [r["address"] for r in record["recipients"]] == ["a@example.com", "b@example.com"]
    assert {r["status"] for r in record["recipients"]} == {"sent"}
    assert [h["status"] for h in record["history"]] == ["queued", "sending", "sent"]
    assert all(re.match(r"\d{4}-\d\d-\d\dT", h["at"]) for h in record["history"])
    assert record["next_attempt_at"] is None


async def test_legacy_answer_carries_an_id_to_look_up(app_client: tuple[Quart, Client]) -> None:
    _, client = app_client
    body = await (await client.get("/?sendmail=x@example.com")).get_data(as_text=True)
    message_id = re.search(r"id ([0-9a-f]{32})", body)
    assert message_id
    record = await (await client.get(f"/api/messages/{message_id.group(1)}")).get_json()
    assert record["status"] == "queued"
    assert record["recipients"][0]["address"] == "x@example.com"


async def test_unknown_id_is_404(app_client: tuple[Quart, Client]) -> None:
    _, client = app_client
    assert (await client.get(f"/api/messages/{'0' * 32}")).status_code == 404
    assert (await client.get("/api/messages/not-an-id")).status_code == 404


async def test_list_newest_first_with_filter(
    database_url: Secret, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(database_url=database_url)
    async with running_app(settings) as (app, client):
        await wait_ready(app)
        ids = []
        for n in range(5):
            response = await client.post("/api/messages", json={**BODY, "subject": f"n{n}"})
            ids.append((await response.get_json())["id"])
        listed = await (await client.get("/api/messages?status=queued&limit=3")).get_json()
        assert [m["id"] for m in listed["messages"]] == ids[::-1][:3]
        none = await (await client.get("/api/messages?status=sent")).get_json()
        assert none["messages"] == []
        assert (await client.get("/api/messages?status=bogus")).status_code == 400
        assert (await client.get("/api/messages?limit=0")).status_code == 400
        assert (await client.get("/api/messages?limit=x")).status_code == 400


async def test_idempotency_key_returns_the_first_answer(
    database_url: Secret, make_settings: Callable[..., Settings]
) -> None:
    from broker import Names

    settings = make_settings(database_url=database_url)
    async with running_app(settings) as (app, client):
        await wait_ready(app)
        headers = {"Idempotency-Key": "order-42"}
        first = await client.post("/api/messages", json=BODY, headers=headers)
        second = await client.post("/api/messages", json=BODY, headers=headers)
        assert first.status_code == second.status_code == 202
        assert await first.get_json() == await second.get_json()
        assert second.headers["Idempotent-Replayed"] == "true"
        assert await queue_depth(Names.of(settings).send_queue) == 1
        changed = await client.post(
            "/api/messages", json={**BODY, "subject": "other"}, headers=headers
        )
        assert changed.status_code == 422
        assert "different" in (await changed.get_json())["error"]
        # Another client may use the same key for its own message.
        other = await client.post(
            "/api/messages", json=BODY, headers={**headers, "Authorization": "Bearer other"}
        )
        assert other.status_code == 202
        assert (await other.get_json())["id"] != (await first.get_json())["id"]
        assert await queue_depth(Names.of(settings).send_queue) == 2


async def test_concurrent_requests_with_one_key_queue_one_message(
    make_settings: Callable[..., Settings],
) -> None:
    from broker import Names

    settings = make_settings()
    async with running_app(settings) as (app, client):
        await wait_ready(app)
        headers = {"Idempotency-Key": "burst"}
        responses = await asyncio.gather(
            *(client.post("/api/messages", json=BODY, headers=headers) for _ in range(10))
        )
        codes = sorted(r.status_code for r in responses)
        assert set(codes) <= {202, 409}
        ids = {(await r.get_json())["id"] for r in responses if r.status_code == 202}
        assert len(ids) == 1
        assert await queue_depth(Names.of(settings).send_queue) == 1


@pytest.mark.parametrize("key", ["", "x" * 256, "tab\there"])
async def test_bad_idempotency_key(key: str, app_client: tuple[Quart, Client]) -> None:
    _, client = app_client
    response = await client.post("/api/messages", json=BODY, headers={"Idempotency-Key": key})
    assert response.status_code == 400


async def test_key_released_when_broker_refuses(make_settings: Callable[..., Settings]) -> None:
    from tests.support import free_port

    settings = make_settings(amqp_url=Secret(f"amqp://guest:guest@127.0.0.1:{free_port()}/"))
    async with running_app(settings) as (_, client):
        headers = {"Idempotency-Key": "retry-me"}
        assert (await client.post("/api/messages", json=BODY, headers=headers)).status_code == 503
        again = await client.post("/api/messages", json=BODY, headers=headers)
        assert again.status_code == 503  # not 409: the key did not stay taken


async def test_idempotency_keys_expire_after_24_hours(
    database_url: Secret, make_settings: Callable[..., Settings]
) -> None:
    from datetime import timedelta

    from sqlalchemy import update

    from store import Store, idempotency_table, now_utc

    store = await Store.open(make_settings(database_url=database_url))
    try:
        assert await store.claim_idempotency_key("c", "k", "h1", "a" * 32) is None
        assert await store.claim_idempotency_key("c", "k", "h1", "b" * 32) == "a" * 32
        async with db_connection(store, begin=True) as conn:
            await conn.execute(
                update(idempotency_table).values(created_at=now_utc() - timedelta(hours=25))
            )
        # A day later the key is free again, even with another body.
        assert await store.claim_idempotency_key("c", "k", "h2", "c" * 32) is None
        assert await store.claim_idempotency_key("c", "k", "h2", "d" * 32) == "c" * 32
    finally:
        await store.close()


async def test_two_writers_share_one_sqlite_file(make_settings: Callable[..., Settings]) -> None:
    """As the server and a worker do: two stores on one file, writing at once, lose nothing."""
    from messages import legacy_job
    from store import Attempt, Store

    settings = make_settings()
    first, second = await Store.open(settings), await Store.open(settings)
    try:
        jobs = [legacy_job(f"w{n}@example.com") for n in range(300)]
        await asyncio.gather(
            *(first.insert_queued(job) for job in jobs),
            *(second.claim(job, "w1", 0, 30) for job in jobs),
        )
        attempts = [Attempt(job.id, 1, "w1") for job in jobs[::2]]
        await asyncio.gather(*(first.finish(attempt, "sent") for attempt in attempts))
        records = await second.list(limit=500)
    finally:
        await first.close()
        await second.close()
    assert len(records) == 300
    statuses = sorted(r.status for r in records)
    assert statuses == ["sending"] * 150 + ["sent"] * 150
    assert all(r.attempts == 1 for r in records)
