"""The worker's acks, coalesced: one ``basic.ack`` for every delivery settled together.

The store's writer commits the outcomes of many mails at once, so their acks come in the
same turn of the event loop. :meth:`Acks.ack` queues a delivery's ack and returns once it
was written to the channel; at the end of the turn each channel gets one ``basic.ack``
with ``multiple=True`` for the longest run of its oldest unsettled deliveries that are all
being acked, and single acks for the rest. A delivery not yet settled (still being sent,
or being nacked) is never covered by a multiple ack: it ends every run.

Every delivery is registered on arrival (:meth:`delivered`) and leaves once settled
here: acked, nacked or rejected. A multiple ack covers deliveries whose aio-pika message
objects do not know it: settle each delivery once, through here, never with its own
``ack()``, ``nack()`` or ``reject()`` besides.
"""

from __future__ import annotations

import asyncio

from aio_pika.abc import AbstractIncomingMessage
from aiormq.abc import AbstractChannel
from aiormq.exceptions import ChannelInvalidStateError

from broker import AMQP_ERRORS


class Acks:
    def __init__(self) -> None:
        # Per channel: the delivery tags not yet settled, and those queued for an ack.
        self._open: dict[AbstractChannel, set[int]] = {}
        self._queued: dict[AbstractChannel, dict[int, _Queued]] = {}
        self._flushing: asyncio.Handle | None = None
        self._sending: set[asyncio.Future[None]] = set()
        self.frames = 0  # basic.ack frames sent (for the tests and the curious)

    def delivered(self, message: AbstractIncomingMessage) -> None:
        """``message`` arrived and is not settled yet."""
        channel = _channel(message)
        if message.delivery_tag is None or channel is None:
            return
        tags = self._open.get(channel)
        if tags is None:
            # A new channel: forget the deliveries of closed ones (RabbitMQ requeued them).
            for closed in [c for c in self._open if c.is_closed]:
                del self._open[closed]
            tags = self._open[channel] = set()
        tags.add(message.delivery_tag)

    async def refuse(self, message: AbstractIncomingMessage, *, requeue: bool) -> None:
        """Nack ``message`` back to the queue (``requeue``) or reject it to the dead
        letters, at once; it leaves the deliveries being settled whatever happens (on a
        dead channel RabbitMQ has put it back already)."""
        try:
            await (message.nack(requeue=True) if requeue else message.reject(requeue=False))
        finally:
            if (channel := _channel(message)) is not None:
                self._forget(channel, message.delivery_tag)

    async def ack(self, message: AbstractIncomingMessage) -> None:
        """Ack ``message``; returns once its ack (alone or with others) was written."""
        tag = message.delivery_tag
        channel = _channel(message)
        if tag is None or channel is None:
            await message.ack()  # raises ChannelInvalidStateError on a closed channel
            return
        done = asyncio.get_running_loop().create_future()
        self._queued.setdefault(channel, {})[tag] = _Queued(message, done)
        if self._flushing is None:
            self._flushing = asyncio.get_running_loop().call_soon(self._flush)
        await done

    def _flush(self) -> None:
        self._flushing = None
        queued, self._queued = self._queued, {}
        for channel, acks in queued.items():
            task = asyncio.ensure_future(self._send(channel, acks))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send(self, channel: AbstractChannel, acks: dict[int, _Queued]) -> None:
        run: list[int] = []
        for tag in sorted(self._open.get(channel, ())):
            if tag not in acks:
                break
            run.append(tag)
        covered = set(run) if len(run) > 1 else set()  # a run of one is a single ack
        sends = [(run, True)] if covered else []
        sends += [([tag], False) for tag in acks if tag not in covered]
        for tags, multiple in sends:
            outcome: BaseException | None = None
            try:
                await acks[tags[-1]].message.ack(multiple=multiple)
                self.frames += 1
            except AMQP_ERRORS as exc:  # handed to each caller whose ack this was
                outcome = exc
            except asyncio.CancelledError as exc:  # shutting down: the callers too
                outcome = exc
            for tag in tags:
                self._forget(channel, tag)
                done = acks[tag].done
                if done.done():
                    continue
                if outcome is None:
                    done.set_result(None)
                elif isinstance(outcome, asyncio.CancelledError):
                    done.cancel()
                else:
                    done.set_exception(outcome)
                    done.exception()  # retrieved: its caller may have stopped waiting
            if isinstance(outcome, asyncio.CancelledError):
                raise outcome

    def _forget(self, channel: AbstractChannel, tag: int | None) -> None:
        tags = self._open.get(channel)
        if tags is None or tag is None:
            return
        tags.discard(tag)
        if not tags:
            del self._open[channel]


def _channel(message: AbstractIncomingMessage) -> AbstractChannel | None:
    """The channel ``message`` came on; None once it is closed (aio-pika then raises)."""
    try:
        return message.channel
    except ChannelInvalidStateError:
        return None


class _Queued:
    __slots__ = ("done", "message")

    def __init__(self, message: AbstractIncomingMessage, done: asyncio.Future[None]) -> None:
        self.message = message
        self.done = done
