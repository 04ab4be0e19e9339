"""The worker's coalesced acks (acks.py), against the real RabbitMQ: deliveries acked
together go out as one multiple ack, and a multiple ack never covers a delivery that is
not settled (it comes back when the channel closes)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection

from acks import Acks
from tests.support import AMQP_URL

COUNT = 10


@pytest.fixture
async def connection() -> AsyncIterator[AbstractRobustConnection]:
    connection = await aio_pika.connect_robust(AMQP_URL)
    try:
        yield connection
    finally:
        await connection.close()


@pytest.fixture
async def queue_name(connection: AbstractRobustConnection) -> AsyncIterator[str]:
    name = f"test-acks-{uuid.uuid4().hex[:12]}"
    async with connection.channel() as channel:
        await channel.declare_queue(name)
        for n in range(COUNT):
            await channel.default_exchange.publish(
                aio_pika.Message(str(n).encode()), routing_key=name
            )
    yield name
    async with connection.channel() as channel:
        await channel.queue_delete(name)


async def receive(
    connection: AbstractRobustConnection, name: str, count: int
) -> tuple[aio_pika.abc.AbstractChannel, list[AbstractIncomingMessage], Acks]:
    """A channel of its own that received ``count`` deliveries (registered with an Acks)."""
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=COUNT)
    queue = await channel.get_queue(name)
    acks = Acks()
    got: list[AbstractIncomingMessage] = []
    all_in = asyncio.Event()

    async def on_message(message: AbstractIncomingMessage) -> None:
        acks.delivered(message)
        got.append(message)
        if len(got) == count:
            all_in.set()

    await queue.consume(on_message)
    await asyncio.wait_for(all_in.wait(), 10)
    return channel, got, acks


async def left_in(connection: AbstractRobustConnection, name: str) -> list[bytes]:
    """The bodies still in the queue (taken and acked, to count them)."""
    async with connection.channel() as channel:
        queue: AbstractQueue = await channel.get_queue(name)
        bodies = []
        while (message := await queue.get(fail=False, timeout=5)) is not None:
            bodies.append(message.body)
            await message.ack()
        return bodies


async def test_deliveries_acked_together_go_out_as_one_ack(
    connection: AbstractRobustConnection, queue_name: str
) -> None:
    channel, got, acks = await receive(connection, queue_name, COUNT)
    await asyncio.wait_for(asyncio.gather(*(acks.ack(m) for m in reversed(got))), 10)
    assert acks.frames == 1
    await channel.close()  # anything not acked would go back to the queue now
    assert await left_in(connection, queue_name) == []


async def test_an_unsettled_delivery_is_never_covered(
    connection: AbstractRobustConnection, queue_name: str
) -> None:
    channel, got, acks = await receive(connection, queue_name, COUNT)
    still_sending = got[5]
    await asyncio.wait_for(
        asyncio.gather(*(acks.ack(m) for m in got if m is not still_sending)), 10
    )
    # One multiple ack for the five before it, a single ack for each of the four after it.
    assert acks.frames == 1 + 4
    await channel.close()
    assert await left_in(connection, queue_name) == [still_sending.body]


async def test_an_ack_on_a_closed_channel_fails_for_its_caller(
    connection: AbstractRobustConnection, queue_name: str
) -> None:
    channel, got, acks = await receive(connection, queue_name, 2)
    await channel.close()
    outcomes = await asyncio.wait_for(
        asyncio.gather(*(acks.ack(m) for m in got), return_exceptions=True), 10
    )
    assert all(isinstance(o, Exception) for o in outcomes), outcomes
    assert acks.frames == 0
    # RabbitMQ put them back (with the rest, never acked).
    assert len(await left_in(connection, queue_name)) == COUNT
