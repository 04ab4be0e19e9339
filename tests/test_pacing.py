"""Lists give way to sends (pacing.py): one list at a time; while the server accepts mail,
a list starts only once as long has passed since the previous one as it took."""

from __future__ import annotations

import asyncio
import time

from pacing import ListPacer


async def timed_list(pacer: ListPacer, work: float) -> tuple[float, float]:
    """A list that takes ``work`` seconds (waiting, as on the database); its start and end."""
    async with pacer.turn():
        started = time.monotonic()
        await asyncio.sleep(work)
        return started, time.monotonic()


async def test_lists_take_turns_and_run_back_to_back_without_sends() -> None:
    pacer = ListPacer()
    first, second = await asyncio.wait_for(
        asyncio.gather(timed_list(pacer, 0.05), timed_list(pacer, 0.05)), 10
    )
    assert second[0] >= first[1]  # one at a time
    assert pacer.paused == 0.0  # and no pause: nobody is sending


async def test_while_sends_are_answered_lists_take_at_most_half_the_time() -> None:
    pacer = ListPacer(busy_window=30.0)
    pacer.sent()
    first, second = await asyncio.wait_for(
        asyncio.gather(timed_list(pacer, 0.1), timed_list(pacer, 0.1)), 10
    )
    took = first[1] - first[0]
    assert second[0] - first[1] >= took - 0.005  # a pause as long as the list before
    assert pacer.paused > 0


async def test_sends_long_past_no_longer_pace_the_lists() -> None:
    pacer = ListPacer(busy_window=0.0)
    pacer.sent()
    await asyncio.wait_for(asyncio.gather(timed_list(pacer, 0.05), timed_list(pacer, 0.05)), 10)
    assert pacer.paused == 0.0
