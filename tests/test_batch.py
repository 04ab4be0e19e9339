"""POST /api/messages/batch: up to 500 messages, each judged as POST /api/messages would."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from quart import Quart
from quart.typing import TestClientProtocol as Client

from broker import Names
from config import Secret, Settings
from messages import MailJob
from tests.conftest import running_app, running_worker, wait_ready
from tests.support import SmtpServer, TcpProxy, free_port, get_messages, queue_depth
from tests.test_status_api import wait_status

AppClient = tuple[Quart, Client]
URL = "/api/messages/batch"


def mail(n: int, **change: Any) -> dict[str, Any]:
    return {"to": f"user{n}@example.com", "subject": f"s{n}", "text": f"t{n}", **change}


def send_queue(settings: Settings) -> str:
    return Names.of(settings).send_queue


async def queued_ids(settings: Settings) -> list[str]:
    return [MailJob.from_bytes(m.body).id for m in await get_messages(send_queue(settings))]


async def test_mixed_valid_and_invalid_items(app_client: AppClient) -> None:
    """One answer per item, in order: the valid ones queued with their ids, each invalid one
    with exactly the error the single endpoint gives it; only the valid ones are queued."""
    app, client = app_client
    invalid = [
        mail(1, to="nope"),
        {"to": "a@example.com", "text": "no subject"},
        mail(3, subject="hi\r\nBcc: x@example.com"),
        mail(4, bcc="not an address"),
        mail(5, to=["a@example.com", "A@example.com"]),
        5,
        ["a list"],
    ]
    body: list[Any] = [mail(0), *invalid, mail(8, html="<p>8</p>")]
    response = await client.post(URL, json=body)
    assert response.status_code == 200
    answer = await response.get_json()
    results = answer["results"]
    assert len(results) == len(body) and answer["queued"] == 2
    for index in (0, len(body) - 1):
        assert results[index]["code"] == 202 and results[index]["status"] == "queued"
        assert re.fullmatch("[0-9a-f]{32}", results[index]["id"])
    for item, result in zip(invalid, results[1:-1], strict=True):
        single = await client.post("/api/messages", json=item)
        assert single.status_code == result["code"] == 400
        assert {k: v for k, v in result.items() if k != "code"} == await single.get_json()
    assert [r.get("field") for r in results[1:-1]] == [
        "to", "subject", "subject", "bcc", "to", None, None
    ]  # fmt: skip
    jobs = [MailJob.from_bytes(m.body) for m in await get_messages(send_queue(app_settings(app)))]
    assert {job.id: (job.to, job.html) for job in jobs} == {
        results[0]["id"]: (("user0@example.com",), None),
        results[-1]["id"]: (("user8@example.com",), "<p>8</p>"),
    }
    # The status API knows each queued id at once.
    for index in (0, -1):
        assert (await client.get(f"/api/messages/{results[index]['id']}")).status_code == 200


def app_settings(app: Quart) -> Settings:
    settings: Settings = app.config["MAILROOM_SETTINGS"]
    return settings


async def test_batch_size_and_shape(make_settings: Callable[..., Settings]) -> None:
    """500 items are one batch; 501, none, or not an array are refused whole (400)."""
    # 500 confirms take about a second here, several with both cores busy.
    async with running_app(make_settings(publish_timeout=15.0)) as (app, client):
        await wait_ready(app)
        await check_batch_size_and_shape(app, client)


async def check_batch_size_and_shape(app: Quart, client: Client) -> None:
    settings = app_settings(app)
    too_many = await client.post(URL, json=[mail(n) for n in range(501)])
    assert too_many.status_code == 400
    assert "at most 500" in (await too_many.get_json())["error"]
    bodies: list[Any] = [[], mail(0), "x", None]
    for body in bodies:
        refused = await client.post(URL, json=body)
        assert refused.status_code == 400, body
        assert (await refused.get_json())["error"]
    assert (await client.post(URL, data="[]")).status_code == 415
    bad_json = await client.post(URL, data="[{", headers={"Content-Type": "application/json"})
    assert bad_json.status_code == 400
    assert await queue_depth(send_queue(settings)) == 0
    full = await client.post(URL, json=[mail(n) for n in range(500)])
    assert full.status_code == 200
    answer = await full.get_json()
    assert answer["queued"] == 500
    assert [r["code"] for r in answer["results"]] == [202] * 500
    ids = [r["id"] for r in answer["results"]]
    assert sorted(await queued_ids(settings)) == sorted(ids) and len(set(ids)) == 500


async def test_one_idempotency_key_covers_the_batch(
    database_url: Secret, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(database_url=database_url)
    body = [mail(0), mail(1, to="bad"), mail(2)]
    headers = {"Idempotency-Key": "batch-7"}
    async with running_app(settings) as (app, client):
        await wait_ready(app)
        first, second = [await client.post(URL, json=body, headers=headers) for _ in range(2)]
        assert first.status_code == second.status_code == 200
        assert await first.get_json() == await second.get_json()
        assert second.headers["Idempotent-Replayed"] == "true"
        assert "Idempotent-Replayed" not in first.headers
        changed = await client.post(URL, json=[mail(0), mail(2)], headers=headers)
        assert changed.status_code == 422
        # The key is the batch's: the single endpoint cannot reuse it for another request.
        single = await client.post("/api/messages", json=mail(0), headers=headers)
        assert single.status_code == 422
        # Concurrent copies of a new batch: one runs, the others wait their turn (409) or
        # replay its answer; its messages are queued once.
        again = {"Idempotency-Key": "batch-8"}
        burst = await asyncio.gather(
            *(client.post(URL, json=body, headers=again) for _ in range(6))
        )
        assert {r.status_code for r in burst} <= {200, 409}
        fresh = [r for r in burst if "Idempotent-Replayed" not in r.headers]
        assert len([r for r in fresh if r.status_code == 200]) == 1
        answers = [await r.get_json() for r in burst if r.status_code == 200]
        assert all(a == answers[0] for a in answers)
        first_ids = [r["id"] for r in (await first.get_json())["results"] if "id" in r]
        burst_ids = [r["id"] for r in answers[0]["results"] if "id" in r]
        assert sorted(await queued_ids(settings)) == sorted(first_ids + burst_ids)
        assert len(first_ids) == len(burst_ids) == 2


async def test_rate_limits_count_each_recipient(make_settings: Callable[..., Settings]) -> None:
    """Each item spends what the single endpoint would: an item over a recipient's limit is
    refused (429, the limit named) and spends nothing; the items around it are queued."""
    settings = make_settings(
        rate_limit_exempt_loopback=False, rate_limit_recipient="2/hour", rate_limit_send="5/hour"
    )
    hot = "hot@example.com"
    body = [mail(0, to=hot), mail(1, to=[hot, "b@example.com"]), mail(2, to=hot), mail(3)]
    async with running_app(settings) as (app, client):
        await wait_ready(app)
        answer = await (await client.post(URL, json=body)).get_json()
        codes = [r["code"] for r in answer["results"]]
        assert codes == [202, 202, 429, 202]
        assert f"Too many messages to {hot}" in answer["results"][2]["error"]
        assert "2 per 1 hour" in answer["results"][2]["error"]
        # The refused item spent nothing: b@ and the client have room for exactly one more
        # (5 sends per client: 3 spent, so 2 left; b@ has 1 left).
        more = [mail(4, to="b@example.com"), mail(5, to="b@example.com"), mail(6), mail(7)]
        answer = await (await client.post(URL, json=more)).get_json()
        results = answer["results"]
        assert [r["code"] for r in results] == [202, 429, 202, 429]
        assert "Too many messages to b@example.com" in results[1]["error"]
        assert "Too many messages from you" in results[3]["error"]
        # Out of sends altogether: refused before the body is read, as a single send is.
        whole = await client.post(URL, json=[mail(8)])
        assert whole.status_code == 429
    assert await queue_depth(send_queue(settings)) == 5


async def test_rabbitmq_down_queues_nothing_and_frees_the_key(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(amqp_url=Secret(f"amqp://guest:guest@127.0.0.1:{free_port()}/"))
    headers = {"Idempotency-Key": "down"}
    async with running_app(settings) as (_, client):
        for _ in range(2):  # not 409 the second time: the key was released
            response = await client.post(URL, json=[mail(0), mail(1)], headers=headers)
            assert response.status_code == 503
            assert response.headers["Retry-After"]
            assert "nothing was queued" in (await response.get_json())["error"]


class BudgetProxy(TcpProxy):
    """A proxy to RabbitMQ that, once ``budget`` is set, passes that many more bytes from
    the client and drops the rest: RabbitMQ stores the publishes it got whole (and confirms
    them), and never sees the others, as when a link dies in the middle of a batch."""

    def __init__(self) -> None:
        super().__init__("127.0.0.1", 5672)
        self.sent = 0
        self.budget: int | None = None

    async def _upstream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                if self.budget is not None:
                    data = data[: max(0, self.budget - self.sent)]
                if data:
                    self.sent += len(data)
                    writer.write(data)
                    await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            self._writers.discard(writer)


@pytest.fixture
async def budget_proxy() -> AsyncIterator[BudgetProxy]:
    proxy = BudgetProxy()
    await proxy.start()
    yield proxy
    await proxy.close()


async def test_batch_cut_off_by_rabbitmq_reports_exactly_what_was_queued(
    make_settings: Callable[..., Settings], budget_proxy: BudgetProxy
) -> None:
    """RabbitMQ gets a part of the batch, then nothing more (and the link is cut): the items
    it confirmed are queued, each of the others says it was not confirmed and names its
    id, and the queue holds exactly the items the answer calls queued."""
    proxy = budget_proxy
    settings = make_settings(
        amqp_url=Secret(f"amqp://guest:guest@127.0.0.1:{proxy.port}/"), publish_timeout=1.5
    )
    body: list[Any] = [mail(n, text="x" * 1500) for n in range(120)]
    body[7] = mail(7, to="invalid")
    async with running_app(settings) as (app, client):
        await wait_ready(app)
        proxy.budget = proxy.sent + 40 * 1600  # about 40 of the 119 publishes get through
        response = await client.post(URL, json=body)
        proxy.budget = None  # the reconnection after the cut goes through
        proxy.cut()
        assert response.status_code == 200
        answer = await response.get_json()
        results = answer["results"]
        assert results[7]["code"] == 400 and results[7]["field"] == "to"
        queued = [r["id"] for r in results if r["code"] == 202]
        unconfirmed = [r for r in results if r["code"] == 503]
        assert answer["queued"] == len(queued)
        assert 0 < len(queued) < 119 and len(queued) + len(unconfirmed) == 119
        for result in unconfirmed:
            assert "did not confirm message" in result["error"]
            assert "may still be stored" in result["error"]
            assert "id" not in result
        named = [re.search("[0-9a-f]{32}", r["error"]) for r in unconfirmed]
        unconfirmed_ids = {m.group() for m in named if m}
        assert len(unconfirmed_ids) == len(unconfirmed)
        assert not unconfirmed_ids & set(queued)
        for message_id in queued[:3]:
            assert (await client.get(f"/api/messages/{message_id}")).status_code == 200
    # Exactly the confirmed ones are in the queue: none of the others was stored.
    assert sorted(await queued_ids(settings)) == sorted(queued)


async def test_batch_is_delivered(make_settings: Callable[..., Settings], smtp: SmtpServer) -> None:
    settings = make_settings(**smtp.settings_overrides(None, False))
    body = [mail(0), mail(1, to=["x@example.com", "y@example.com"]), mail(2, to="bad"), mail(3)]
    async with running_app(settings) as (app, client), running_worker(settings):
        await wait_ready(app)
        answer = await (await client.post(URL, json=body)).get_json()
        ids = [r["id"] for r in answer["results"] if r["code"] == 202]
        assert len(ids) == 3
        for message_id in ids:
            await wait_status(client, message_id, "sent")
        received = await smtp.recorder.wait_for(3)
    assert sorted(r for m in received for r in m.rcpt_tos) == [
        "user0@example.com",
        "user3@example.com",
        "x@example.com",
        "y@example.com",
    ]
    assert sorted(m.message["Subject"] for m in received) == ["s0", "s1", "s3"]
