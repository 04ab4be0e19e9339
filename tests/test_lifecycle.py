"""A message's life like a mail API's (issue 13): cancel, scheduled sends, the suppression
list, the sandbox and simulator recipients, and finding messages page by page."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from quart.typing import TestClientProtocol as Client

from broker import Names
from config import Secret, Settings
from tests.conftest import running_app, running_worker, wait_ready
from tests.support import SmtpRecorder, SmtpServer, queue_depth, rabbitmqctl, start_smtp
from tests.test_faults import recipients, wait_until
from tests.test_ownership import Gate
from tests.test_status_api import wait_status
from webhooks import sign
from worker import Worker


def mail(to: str | list[str], **extra: Any) -> dict[str, Any]:
    return {"to": to, "subject": "Lifecycle", "text": "Hello.\n", **extra}


async def post(client: Client, to: str | list[str], **extra: Any) -> Any:
    response = await client.post("/api/messages", json=mail(to, **extra))
    assert response.status_code == 202, await response.get_data()
    return await response.get_json()


def rfc3339(seconds_from_now: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds_from_now)).isoformat()


async def idle(worker: Worker, settings: Settings) -> None:
    """Until the worker has nothing in flight and the work queue is empty."""
    names = Names.of(settings)
    async with asyncio.timeout(20):
        while worker._inflight or await queue_depth(names.send_queue, settings.amqp_url.get()):
            await asyncio.sleep(0.05)


# -- cancel --------------------------------------------------------------------------------


async def test_a_cancelled_message_is_never_sent_though_its_copy_is_queued(
    make_settings: Callable[..., Settings], smtp: SmtpServer
) -> None:
    settings = make_settings(**smtp.settings_overrides(None, False))
    async with running_app(settings) as (app, client):
        await wait_ready(app)
        taken_back = (await post(client, "gone@example.com"))["id"]
        for _ in range(2):  # idempotent
            answer = await client.delete(f"/api/messages/{taken_back}")
            assert answer.status_code == 200
            assert await answer.get_json() == {"id": taken_back, "status": "cancelled"}
        assert (await client.delete(f"/api/messages/{'0' * 32}")).status_code == 404
        kept = (await post(client, "kept@example.com"))["id"]
        async with running_worker(settings) as worker:
            await wait_status(client, kept, "sent")
            await idle(worker, settings)
        record = await wait_status(client, taken_back, "cancelled")
        assert [h["status"] for h in record["history"]] == ["queued", "cancelled"]
        answer = await client.delete(f"/api/messages/{kept}")
        assert answer.status_code == 409
        assert (await answer.get_json())["status"] == "sent"
    assert recipients(smtp.recorder) == ["kept@example.com"]


async def test_cancel_racing_the_worker_never_sends_a_cancelled_message(
    database_url: Secret, make_settings: Callable[..., Settings]
) -> None:
    """Cancels fired while a worker takes the same messages: the record's compare-and-set
    decides each one. 200 (cancelled) means never sent; 409 means it was being sent. (The
    worker claims every message it holds, WORKER_PREFETCH of them, before a connection is
    free: here it holds only as many as it sends at once.)"""
    gate = Gate()
    smtp = await start_smtp("none", None, auth=False, recorder=SmtpRecorder(on_data=gate))
    settings = make_settings(
        database_url=database_url,
        worker_concurrency=4,
        worker_prefetch=4,
        smtp_timeout=30.0,
        **smtp.settings_overrides(None, False),
    )
    count = 10
    async with running_app(settings) as (app, client), running_worker(settings) as worker:
        await wait_ready(app)
        ids = [(await post(client, f"race{n}@example.com"))["id"] for n in range(count)]
        await wait_until(lambda: gate.waiting >= 1)  # the worker holds at least one
        answers = await asyncio.gather(*(client.delete(f"/api/messages/{i}") for i in ids))
        codes = {i: a.status_code for i, a in zip(ids, answers, strict=True)}
        assert set(codes.values()) <= {200, 409}
        assert 409 in codes.values() and 200 in codes.values()
        for answer in answers:
            if answer.status_code == 409:
                assert (await answer.get_json())["status"] == "sending"
        gate.open.set()
        for i, code in codes.items():
            await wait_status(client, i, "cancelled" if code == 200 else "sent", timeout=30)
        await idle(worker, settings)
    sent = sorted(f"race{ids.index(i)}@example.com" for i, c in codes.items() if c == 409)
    assert sorted(recipients(smtp.recorder)) == sent
    smtp.server.close()


async def test_a_message_waiting_in_the_worker_for_a_connection_is_sending(
    make_settings: Callable[..., Settings],
) -> None:
    """A worker claims each message it holds (WORKER_PREFETCH) as it arrives: one that
    waits there for a busy connection is ``sending``, a cancel answers 409, and it is
    sent once the connection is free."""
    gate = Gate()
    smtp = await start_smtp("none", None, auth=False, recorder=SmtpRecorder(on_data=gate))
    settings = make_settings(
        worker_concurrency=1,
        worker_prefetch=3,
        smtp_timeout=30.0,
        **smtp.settings_overrides(None, False),
    )
    async with running_app(settings) as (app, client), running_worker(settings) as worker:
        await wait_ready(app)
        ids = [(await post(client, f"held{n}@example.com"))["id"] for n in range(3)]
        await wait_until(lambda: gate.waiting >= 1)  # one in DATA, two waiting for it
        for message_id in ids:
            await wait_status(client, message_id, "sending")
        for message_id in ids:
            answer = await client.delete(f"/api/messages/{message_id}")
            assert answer.status_code == 409
            assert (await answer.get_json())["status"] == "sending"
        assert gate.waiting == 1 and worker.pool.turns_in_use == 1
        gate.open.set()
        for message_id in ids:
            await wait_status(client, message_id, "sent", timeout=30)
        await idle(worker, settings)
    assert sorted(recipients(smtp.recorder)) == [f"held{n}@example.com" for n in range(3)]
    smtp.server.close()


async def test_a_retrying_message_can_be_cancelled(
    make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    """Its retry copy comes back from the retry tier and is acked unsent."""
    caplog.set_level(logging.INFO)
    settings = make_settings(sandbox=True, smtp_host=None, retry_delays=(1.5,))
    async with running_app(settings) as (app, client), running_worker(settings):
        await wait_ready(app)
        message = (await post(client, "defer@simulator.mailroom.invalid"))["id"]
        await wait_status(client, message, "retrying")
        assert (await client.delete(f"/api/messages/{message}")).status_code == 200
        await wait_until(lambda: "already cancelled; acking without sending" in caplog.text)
        record = await wait_status(client, message, "cancelled")
    assert record["attempts"] == 1
    assert [h["status"] for h in record["history"]][-2:] == ["retrying", "cancelled"]


# -- scheduled sends -----------------------------------------------------------------------


async def test_a_late_message_does_not_hold_up_an_early_one(
    make_settings: Callable[..., Settings], smtp: SmtpServer
) -> None:
    settings = make_settings(**smtp.settings_overrides(None, False))
    async with running_app(settings) as (app, client), running_worker(settings):
        await wait_ready(app)
        late = await post(client, "late@example.com", send_at=rfc3339(3600))
        assert late["status"] == "scheduled"
        due = time.time() + 2
        early = await post(
            client, "early@example.com", send_at=datetime.fromtimestamp(due, UTC).isoformat()
        )
        record = await wait_status(client, early["id"], "scheduled")
        assert record["next_attempt_at"] is not None
        await smtp.recorder.wait_for(1, timeout=15)
        arrived = time.time()
        assert due <= arrived < due + 5, arrived - due
        assert recipients(smtp.recorder) == ["early@example.com"]
        await wait_status(client, early["id"], "sent")
        assert (await wait_status(client, late["id"], "scheduled"))["attempts"] == 0
        # A scheduled message can be taken back; its copy is dropped when it next hops.
        assert (await client.delete(f"/api/messages/{late['id']}")).status_code == 200


@pytest.mark.parametrize(
    ("send_at", "answer"),
    [
        ("2001-01-01T00:00:00Z", 202),  # in the past: now
        ("2001-01-01T00:00:00+02:00", 202),
        ("2001-01-01T00:00:00", 400),  # no offset
        ("tomorrow", 400),
        ("2001-13-01T00:00:00Z", 400),
    ],
)
async def test_send_at_is_checked(
    app_client: tuple[Any, Client], send_at: str, answer: int
) -> None:
    _, client = app_client
    response = await client.post("/api/messages", json=mail("x@example.com", send_at=send_at))
    assert response.status_code == answer
    if answer == 202:
        assert (await response.get_json())["status"] == "queued"
    else:
        assert (await response.get_json())["field"] == "send_at"


async def test_more_than_max_schedule_days_ahead_is_refused(
    make_settings: Callable[..., Settings],
) -> None:
    async with running_app(make_settings(max_schedule_days=2)) as (app, client):
        await wait_ready(app)
        far = await client.post("/api/messages", json=mail("x@e.com", send_at=rfc3339(3 * 86400)))
        assert far.status_code == 400
        assert "MAX_SCHEDULE_DAYS" in (await far.get_json())["error"]
        near = mail("x@e.com", send_at=rfc3339(86400))
        for _ in range(2):  # the replay of an Idempotency-Key says scheduled too
            answer = await client.post("/api/messages", json=near, headers={"Idempotency-Key": "k"})
            assert (await answer.get_json())["status"] == "scheduled"


async def test_a_scheduled_message_waits_out_a_worker_restart(
    make_settings: Callable[..., Settings], smtp: SmtpServer
) -> None:
    """Accepted while a worker runs, due while none does: sent once one is back."""
    settings = make_settings(**smtp.settings_overrides(None, False))
    async with running_app(settings) as (app, client):
        await wait_ready(app)
        async with running_worker(settings):
            due = time.time() + 3
            message = await post(
                client, "later@example.com", send_at=datetime.fromtimestamp(due, UTC).isoformat()
            )
        async with running_worker(settings):
            await smtp.recorder.wait_for(1, timeout=20)
            assert time.time() >= due
            await wait_status(client, message["id"], "sent")


@pytest.mark.broker_restart
async def test_a_scheduled_message_waits_out_a_rabbitmq_restart(
    make_settings: Callable[..., Settings], smtp: SmtpServer
) -> None:
    settings = make_settings(**smtp.settings_overrides(None, False))
    async with running_app(settings) as (app, client):
        await wait_ready(app)
        due = time.time() + 8
        message = await post(
            client, "after@example.com", send_at=datetime.fromtimestamp(due, UTC).isoformat()
        )
        await asyncio.to_thread(rabbitmqctl, "stop_app")
        await asyncio.to_thread(rabbitmqctl, "start_app")
        await asyncio.to_thread(rabbitmqctl, "await_startup")
        async with running_worker(settings):
            await smtp.recorder.wait_for(1, timeout=30)
            assert time.time() >= due
            await wait_status(client, message["id"], "sent")


# -- the suppression list ------------------------------------------------------------------


async def test_suppressed_recipients_are_skipped_and_unknown_users_suppressed(
    database_url: Secret, make_settings: Callable[..., Settings]
) -> None:
    async def refuse_unknown(address: str) -> str | None:
        return "550 5.1.1 no such user here" if address.startswith("nobody@") else None

    smtp = await start_smtp("none", None, auth=False, recorder=SmtpRecorder(on_rcpt=refuse_unknown))
    settings = make_settings(
        database_url=database_url,
        suppression_refresh=0.2,
        **smtp.settings_overrides(None, False),
    )
    async with running_app(settings) as (app, client), running_worker(settings):
        await wait_ready(app)
        put = await client.put("/api/suppressions/Blocked@B%C3%9CCHER.de", json={"reason": "asked"})
        assert put.status_code == 200
        entry = await put.get_json()
        assert entry["address"] == "blocked@xn--bcher-kva.de"
        assert (entry["reason"], entry["source"]) == ("asked", "operator")
        await asyncio.sleep(0.5)  # the worker's cache is refreshed every 0.2 s here
        first = await post(client, ["blocked@bücher.de", "nobody@example.com", "a@example.com"])
        await smtp.recorder.wait_for(1)
        record = await wait_status(client, first["id"], "partial")
        results = {r["address"]: r["status"] for r in record["recipients"]}
        assert results == {
            "blocked@bücher.de": "suppressed",
            "nobody@example.com": "refused",
            "a@example.com": "sent",
        }
        listed = await (await client.get("/api/suppressions")).get_json()
        found = {s["address"]: s["source"] for s in listed["suppressions"]}
        assert found == {"blocked@xn--bcher-kva.de": "operator", "nobody@example.com": "bounce"}
        # Now suppressed: a message to it alone is not sent at all.
        second = await post(client, "nobody@example.com")
        record = await wait_status(client, second["id"], "failed")
        assert record["recipients"][0]["status"] == "suppressed"
        removed = await client.delete("/api/suppressions/nobody@EXAMPLE.com")
        assert await removed.get_json() == {"address": "nobody@example.com", "removed": True}
        assert (await client.put("/api/suppressions/not-an-address", json={})).status_code == 400
        await asyncio.sleep(0.5)
        third = await post(client, "blocked@bücher.de")
        await wait_status(client, third["id"], "failed")
    assert recipients(smtp.recorder) == ["a@example.com"]
    smtp.server.close()


# -- sandbox and simulator -----------------------------------------------------------------


async def test_sandbox_hands_nothing_to_smtp(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(sandbox=True, smtp_host=None)
    async with running_app(settings) as (app, client), running_worker(settings) as worker:
        await wait_ready(app)
        message = await post(client, ["a@example.com", "bounce@simulator.mailroom.invalid"])
        record = await wait_status(client, message["id"], "partial")
        assert worker.pool.turns_in_use == 0  # the send turn came back without SMTP
    results = {r["address"]: (r["status"], r["code"]) for r in record["recipients"]}
    assert results == {
        "a@example.com": ("sent", None),
        "bounce@simulator.mailroom.invalid": ("refused", 550),
    }


async def test_simulator_recipients_without_a_connection(
    make_settings: Callable[..., Settings], smtp: SmtpServer
) -> None:
    settings = make_settings(**smtp.settings_overrides(None, False))
    sim = "simulator.mailroom.invalid"
    async with running_app(settings) as (app, client), running_worker(settings) as worker:
        await wait_ready(app)
        delivered = await post(client, [f"delivered@{sim}", f"delivered+x@{sim}"])
        assert (await wait_status(client, delivered["id"], "sent"))["attempts"] == 1
        assert worker.pool.turns_in_use == 0
        mixed = await post(client, ["real@example.com", f"defer@{sim}"])
        record = await wait_status(client, mixed["id"], "partial", timeout=30)
        assert worker.pool.turns_in_use == 0  # each retry's SMTP send gave its turn back
        assert record["attempts"] == 1 + len(settings.retry_delays)
        results = {r["address"]: r["status"] for r in record["recipients"]}
        assert results == {"real@example.com": "sent", f"defer@{sim}": "pending"}
        sandboxed = await (await client.get("/api/suppressions")).get_json()
        assert sandboxed["suppressions"] == []
    assert recipients(smtp.recorder) == ["real@example.com"]
    assert smtp.recorder.connections == 1


# -- finding messages ----------------------------------------------------------------------


async def test_pages_stay_put_while_messages_arrive(
    database_url: Secret, make_settings: Callable[..., Settings]
) -> None:
    async with running_app(make_settings(database_url=database_url)) as (app, client):
        await wait_ready(app)
        await find_messages(client)


async def find_messages(client: Client) -> None:
    ids = [(await post(client, f"p{n}@example.com"))["id"] for n in range(5)]
    other = (await post(client, "someone_else@example.com"))["id"]
    first = await (await client.get("/api/messages", query_string={"limit": 3})).get_json()
    assert [m["id"] for m in first["messages"]] == [other, ids[4], ids[3]]
    await post(client, "newcomer@example.com")  # newer: never on a later page
    second = await (
        await client.get("/api/messages", query_string={"limit": 3, "cursor": first["next_cursor"]})
    ).get_json()
    assert [m["id"] for m in second["messages"]] == [ids[2], ids[1], ids[0]]
    after = {"limit": 3, "cursor": second["next_cursor"]}
    last = await (await client.get("/api/messages", query_string=after)).get_json()
    assert last == {"messages": [], "next_cursor": None}
    to_one = await (
        await client.get("/api/messages", query_string={"recipient": "P2@EXAMPLE.com"})
    ).get_json()
    assert [m["id"] for m in to_one["messages"]] == [ids[2]]
    underscore = await (
        await client.get("/api/messages", query_string={"recipient": "someone_else@example.com"})
    ).get_json()
    assert [m["id"] for m in underscore["messages"]] == [other]
    created = [m["created_at"] for m in second["messages"]]
    window = await (
        await client.get(
            "/api/messages", query_string={"since": created[1], "until": created[0], "limit": 10}
        )
    ).get_json()
    assert [m["id"] for m in window["messages"]] == [ids[1]]
    for bad in ({"cursor": "nonsense"}, {"since": "yesterday"}, {"recipient": "x"}):
        assert (await client.get("/api/messages", query_string=bad)).status_code == 400
    cancelled = await client.delete(f"/api/messages/{ids[0]}")
    assert cancelled.status_code == 200
    listed = await (
        await client.get("/api/messages", query_string={"status": "cancelled"})
    ).get_json()
    assert [m["id"] for m in listed["messages"]] == [ids[0]]


# -- delivery webhooks ---------------------------------------------------------------------

SECRET = "webhook-secret-0123456789"


class Receiver:
    """A loopback HTTP receiver: answers each POST with the next of ``codes`` (then 200),
    or never (``hang``); records what it got."""

    def __init__(self, codes: list[int] | None = None, hang: bool = False) -> None:
        self.codes = list(codes or [])
        self.hang = hang
        self.got: list[tuple[dict[str, str], bytes, int]] = []
        self.changed = asyncio.Condition()
        self.server: asyncio.Server | None = None
        self.handlers: set[asyncio.Task[Any]] = set()

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/hooks"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        try:
            await reader.readline()
            headers: dict[str, str] = {}
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode().partition(":")
                headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            code = 0 if self.hang else (self.codes.pop(0) if self.codes else 200)
            async with self.changed:
                self.got.append((headers, body, code))
                self.changed.notify_all()
            if self.hang:
                await asyncio.sleep(3600)
            writer.write(f"HTTP/1.1 {code} X\r\nContent-Length: 0\r\n\r\n".encode())
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            self.handlers.discard(task)

    async def wait_for(self, check: Callable[[], bool], timeout: float = 20) -> None:
        async with asyncio.timeout(timeout), self.changed:
            await self.changed.wait_for(check)

    def events(self, code: int = 200) -> list[dict[str, Any]]:
        return [json.loads(body) for _, body, got in self.got if got == code]

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for task in list(self.handlers):
            task.cancel()
        await asyncio.gather(*self.handlers, return_exceptions=True)
        await self.server.wait_closed()


async def test_webhooks_are_signed_retried_and_never_slow_mail(
    make_settings: Callable[..., Settings], smtp: SmtpServer
) -> None:
    flaky = Receiver(codes=[500])  # the first POST fails, the retry gets through
    hanging = Receiver(hang=True)
    urls = (await flaky.start(), await hanging.start())
    settings = make_settings(
        webhook_urls=urls,
        webhook_secret=Secret(SECRET),
        webhook_timeout=0.5,
        **smtp.settings_overrides(None, False),
    )
    try:
        async with running_app(settings) as (app, client), running_worker(settings):
            await wait_ready(app)
            started = time.monotonic()
            sent = (await post(client, "hooked@example.com"))["id"]
            await wait_status(client, sent, "sent")
            assert time.monotonic() - started < 5  # the hanging receiver holds up nothing
            later = (await post(client, "x@example.com", send_at=rfc3339(600)))["id"]
            assert (await client.delete(f"/api/messages/{later}")).status_code == 200
            await flaky.wait_for(lambda: len(flaky.events()) == 2)
            names = Names.of(settings)
            url = settings.amqp_url.get()
            async with asyncio.timeout(30):  # 1 + 3 tries of 0.5 s each, then dead
                while await queue_depth(names.webhook_dead_queue, url) < 2:
                    await asyncio.sleep(0.1)
    finally:
        await flaky.close()
        await hanging.close()
    assert flaky.got[0][2] == 500
    events = {e["event"]: e for e in flaky.events()}
    assert events["sent"]["message_id"] == sent
    assert events["sent"]["recipients"][0]["address"] == "hooked@example.com"
    assert events["sent"]["recipients"][0]["status"] == "sent"
    assert events["cancelled"]["message_id"] == later
    for headers, body, _ in flaky.got:
        timestamp = headers["x-mailroom-timestamp"]
        assert abs(int(timestamp) - time.time()) < 60
        assert headers["x-mailroom-signature"] == sign(SECRET, timestamp, body)
        expected = hmac.new(SECRET.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
        assert headers["x-mailroom-signature"] == "v1=" + expected.hexdigest()
    assert len(hanging.got) >= 4  # tried, timed out, retried through every tier


async def test_webhook_events_of_a_message_arrive_in_order(
    make_settings: Callable[..., Settings], smtp: SmtpServer
) -> None:
    """The first event fails (500) and waits for its retry: the later events of the same
    message wait behind it, so the receiver gets them in order."""
    receiver = Receiver(codes=[500])
    settings = make_settings(
        webhook_urls=(await receiver.start(),),
        webhook_secret=Secret(SECRET),
        **smtp.settings_overrides(None, False),
    )
    try:
        async with running_app(settings) as (app, client), running_worker(settings):
            await wait_ready(app)
            message = await post(client, ["real@example.com", "defer@simulator.mailroom.invalid"])
            await wait_status(client, message["id"], "partial", timeout=30)
            deferrals = len(settings.retry_delays)  # then the last attempt gives up
            await receiver.wait_for(lambda: len(receiver.events()) == deferrals + 1, timeout=30)
    finally:
        await receiver.close()
    events = receiver.events()
    assert [e["event"] for e in events] == ["deferred"] * deferrals + ["failed"]
    sequences = [e["sequence"] for e in events]
    assert sequences == sorted(sequences) and len(set(sequences)) == len(sequences)
    assert events[-1]["status"] == "partial"
