"""Looking at the dead-letter queue from several places at once: every listing sees every
letter, in order, and listing neither loses nor reorders one (nor does a re-queue running
alongside)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from pathlib import Path

import aio_pika
import pytest

import deadletters
from broker import DEAD_KEY, Names, declare_topology
from config import Settings
from deadletters import dead_letters
from tests.conftest import running_app
from tests.support import AMQP_URL, Proc, child_env, finish, get_messages, spawn

LETTERS = 22


async def make_dead_letters(settings: Settings, count: int = LETTERS) -> list[str]:
    """``count`` dead letters, as the worker leaves them; their ids in queue order."""
    ids = [uuid.uuid4().hex for _ in range(count)]
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        topology = await declare_topology(channel, settings)
        for n, message_id in enumerate(ids):
            letter = aio_pika.Message(
                b"{}",
                message_id=message_id,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                headers={
                    "x-mailroom-error": f"550 mailbox {n} unavailable",
                    "x-mailroom-failed-at": "2026-01-01T00:00:00Z",
                    "x-mailroom-smtp-code": 550,
                },
            )
            await topology.exchange.publish(letter, DEAD_KEY)
    return ids


def admin_env(prefix: str, settings: Settings) -> dict[str, str]:
    return child_env(
        prefix,
        DATABASE_URL=settings.database_url.get(),
        RETRY_DELAYS=",".join(str(d) for d in settings.retry_delays),
        QUEUE_TYPE=settings.queue_type,
    )


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
async def test_concurrent_listings_each_see_every_letter_in_order(
    make_settings: Callable[..., Settings],
    prefix: str,
    tmp_path: Path,
    stop_later: list[Proc],
    queue_type: str,
) -> None:
    """Six listings through one server, three through a second one, one in this process
    and ``python admin.py dead list``, all at once: each lists all 22 letters in queue
    order, and afterwards the queue holds the same letters in the same order."""
    settings = make_settings(queue_type=queue_type)
    ids = await make_dead_letters(settings)
    admin = await spawn("admin.py", tmp_path, admin_env(prefix, settings), "dead", "list")
    stop_later.append(admin)
    async with running_app(settings) as (_, client), running_app(settings) as (_, other):
        responses = await asyncio.gather(
            *(client.get("/api/dead-letters") for _ in range(6)),
            *(other.get("/api/dead-letters") for _ in range(3)),
        )
        here = await dead_letters(settings, None, False)
    code, out = await finish(admin)
    listings = [[d["id"] for d in (await r.get_json())["dead_letters"]] for r in responses]
    listings.append([letter.id for letter in here])
    assert [len(listing) for listing in listings] == [LETTERS] * len(listings)
    assert all(listing == ids for listing in listings)
    assert code == 0, out
    assert f"{LETTERS} dead letter(s)" in out
    assert [line.split()[0] for line in out.splitlines() if line[:32] in ids] == ids
    remaining = await get_messages(Names.of(settings).dead_queue)
    assert [m.message_id for m in remaining] == ids


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
async def test_requeue_alongside_listings_takes_every_letter(
    make_settings: Callable[..., Settings], queue_type: str
) -> None:
    """``requeue --all`` while six listings run: every letter is re-queued (none was out
    of its sight, held by a listing), in order; a listing saw all of them or none."""
    settings = make_settings(queue_type=queue_type)
    ids = await make_dead_letters(settings)
    async with running_app(settings) as (_, client):
        listed = [asyncio.ensure_future(client.get("/api/dead-letters")) for _ in range(6)]
        requeued = await dead_letters(settings, None, True)
        responses = await asyncio.gather(*listed)
    assert [letter.id for letter in requeued if letter.requeued] == ids
    for response in responses:
        assert response.status_code == 200
        listing = [d["id"] for d in (await response.get_json())["dead_letters"]]
        assert listing in (ids, []), listing
    names = Names.of(settings)
    assert await get_messages(names.dead_queue) == []
    assert [m.message_id for m in await get_messages(names.send_queue)] == ids


async def test_listing_waits_for_the_reader_before_it_then_gives_up_plainly(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A listing waits while another process reads the queue, and lists everything once it
    is done; one that waits too long answers 503 with Retry-After rather than a part."""
    settings = make_settings()
    ids = await make_dead_letters(settings, 3)
    lock = f"{Names.of(settings).dead_queue}.lock"
    async with running_app(settings) as (_, client):
        holder = await aio_pika.connect(AMQP_URL)
        channel = await holder.channel()
        await channel.declare_queue(lock, exclusive=True, auto_delete=True)
        listing = asyncio.ensure_future(client.get("/api/dead-letters"))
        await asyncio.sleep(0.3)  # the other reader takes its time
        assert not listing.done()
        await holder.close()
        response = await asyncio.wait_for(listing, 10)
        assert [d["id"] for d in (await response.get_json())["dead_letters"]] == ids

        monkeypatch.setattr(deadletters, "LOCK_WAIT", 0.2)
        holder = await aio_pika.connect(AMQP_URL)
        async with holder:
            channel = await holder.channel()
            await channel.declare_queue(lock, exclusive=True, auto_delete=True)
            response = await client.get("/api/dead-letters")
        assert response.status_code == 503
        assert response.headers["Retry-After"]
        assert "another listing or re-queue" in (await response.get_json())["error"]
