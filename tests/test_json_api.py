"""POST /api/messages: validated JSON in, 202 with the id after RabbitMQ confirmed."""

from __future__ import annotations

from typing import Any

import pytest
from quart import Quart
from quart.typing import TestClientProtocol as Client

from broker import Names
from config import Settings
from messages import MailJob
from tests.support import get_messages, queue_depth

AppClient = tuple[Quart, Client]


def send_queue(app: Quart) -> str:
    settings: Settings = app.config["MAILROOM_SETTINGS"]
    return Names.for_prefix(settings.queue_prefix).send_queue


async def test_post_message_is_queued(app_client: AppClient) -> None:
    app, client = app_client
    body = {
        "to": ["Zoë Ünïcode <zoe@example.com>", "bob@example.com"],
        "subject": "Hello ✉",
        "text": "plain",
        "html": "<p>html</p>",
        "reply_to": "replies@example.com",
    }
    response = await client.post("/api/messages", json=body)
    assert response.status_code == 202
    answer = await response.get_json()
    assert answer["status"] == "queued"
    (message,) = await get_messages(send_queue(app))
    job = MailJob.from_bytes(message.body)
    assert job.id == answer["id"]
    assert job.to == ("Zoë Ünïcode <zoe@example.com>", "bob@example.com")
    assert (job.subject, job.text, job.html, job.reply_to) == (
        "Hello ✉",
        "plain",
        "<p>html</p>",
        "replies@example.com",
    )


async def test_single_recipient_string(app_client: AppClient) -> None:
    app, client = app_client
    response = await client.post(
        "/api/messages", json={"to": "a@example.com", "subject": "s", "text": "t"}
    )
    assert response.status_code == 202
    assert await queue_depth(send_queue(app)) == 1


GOOD: dict[str, Any] = {"to": "a@example.com", "subject": "s", "text": "t"}

# Syntactically valid, so accepted: test, intranet and other special-use names too
# (whether they can be delivered is the SMTP server's decision).
SPECIAL_USE = [
    "a@mailroom.test",
    "b@printer.local",
    "c@app.localhost",
    "d@localhost",
    "e@x.invalid",
    "f@1.0.0.127.in-addr.arpa",
    "g@abcdefghijklmnop.onion",
    "h@build.internal",
    "i@nas.lan",
    "j@mailhost",
    "Ünï <k@bücher.test>",
]


async def test_any_syntactically_valid_address_is_accepted(app_client: AppClient) -> None:
    app, client = app_client
    body = {**GOOD, "to": SPECIAL_USE, "reply_to": "replies@team.local"}
    response = await client.post("/api/messages", json=body)
    assert response.status_code == 202, await response.get_json()
    (message,) = await get_messages(send_queue(app))
    job = MailJob.from_bytes(message.body)
    assert job.to == tuple(SPECIAL_USE)
    assert job.reply_to == "replies@team.local"
    response = await client.get("/?sendmail=someone@example.test")
    assert response.status_code == 200


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"to": "nope"}, "to"),
        ({"to": []}, "to"),
        ({"to": ["a@example.com", "bad"]}, "to"),
        ({"to": "a@example.com\r\nBcc: x@example.com"}, "to"),
        ({"to": 5}, "to"),
        ({"subject": "hi\r\nBcc: x@example.com"}, "subject"),
        ({"subject": None}, "subject"),
        ({"text": 3}, "text"),
        ({"html": ["x"]}, "html"),
        ({"reply_to": "not an address"}, "reply_to"),
        ({"reply_to": "a@example.com\nX: y"}, "reply_to"),
        ({"bcc": "x@example.com"}, "bcc"),
    ],
)
async def test_invalid_field_is_named(
    change: dict[str, Any], field: str, app_client: AppClient
) -> None:
    app, client = app_client
    response = await client.post("/api/messages", json={**GOOD, **change})
    assert response.status_code == 400
    answer = await response.get_json()
    assert answer["field"] == field
    assert answer["error"]
    assert await queue_depth(send_queue(app)) == 0


@pytest.mark.parametrize("missing", ["to", "subject", "text"])
async def test_missing_field_is_named(missing: str, app_client: AppClient) -> None:
    app, client = app_client
    body = {k: v for k, v in GOOD.items() if k != missing}
    response = await client.post("/api/messages", json=body)
    assert response.status_code == 400
    assert (await response.get_json())["field"] == missing
    assert await queue_depth(send_queue(app)) == 0


async def test_not_json(app_client: AppClient) -> None:
    app, client = app_client
    response = await client.post("/api/messages", data="to=a@example.com")
    assert response.status_code == 415
    response = await client.post(
        "/api/messages", data="{not json", headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400
    response = await client.post("/api/messages", json=["a list"])
    assert response.status_code == 400
    assert await queue_depth(send_queue(app)) == 0
