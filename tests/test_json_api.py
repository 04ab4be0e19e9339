"""POST /api/messages: validated JSON in, 202 with the id after RabbitMQ confirmed."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import pytest
from quart import Quart
from quart.typing import TestClientProtocol as Client

from broker import Names
from config import Settings
from messages import MailJob
from tests.conftest import running_app, wait_ready
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
        ({"bcc": "not an address"}, "bcc"),
        ({"shipping": "x@example.com"}, "shipping"),
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


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        ('{"to": "a@example.com",\n "subject": }', "expecting value at line 2, column 13"),
        ('{"to": "a@example.com" "subject": "s"}', "expecting ',' delimiter at line 1, column 24"),
        ('{"to": "a@example.com"}}', "extra data at line 1, column 24"),
        ('{"to": NaN}', "NaN is not a JSON value"),
    ],
)
async def test_malformed_json_says_where(app_client: AppClient, raw: str, error: str) -> None:
    app, client = app_client
    for path in ("/api/messages", "/api/messages/batch"):
        response = await client.post(path, data=raw, headers={"Content-Type": "application/json"})
        assert response.status_code == 400
        assert response.mimetype == "application/json"
        assert await response.get_json() == {"error": f"the body is not valid JSON: {error}"}
    empty = await client.post(
        "/api/messages", data="", headers={"Content-Type": "application/json"}
    )
    assert (await empty.get_json()) == {"error": "the body is empty: send a JSON object"}
    assert await queue_depth(send_queue(app)) == 0


async def test_every_error_says_what_it_sends(make_settings: Callable[..., Settings]) -> None:
    """Each error answer's Content-Type is what its body is: JSON under /api/ and /logs,
    text for the legacy GET and the rest (a 405 once said text/html and sent JSON)."""
    settings = make_settings(
        max_request_bytes=1024, rate_limit_exempt_loopback=False, rate_limit_talktome="1/hour"
    )
    json_body = {"Content-Type": "application/json"}
    proxied = {"X-Forwarded-For": "203.0.113.9"}
    requests: list[tuple[str, str, dict[str, Any], int]] = [
        ("DELETE", "/api/messages", {}, 405),
        ("PUT", "/api/messages/batch", {}, 405),
        ("POST", "/api/dead-letters", {}, 405),
        ("POST", "/healthz", {}, 405),
        ("PUT", "/?talktome", {}, 405),
        ("GET", "/api/nothing-here", {}, 404),
        ("GET", "/nothing-here", {}, 404),
        ("GET", "/api/messages/" + "0" * 32, {}, 404),
        ("POST", "/api/messages", {"data": "x" * 2048, "headers": json_body}, 413),
        ("POST", "/api/messages", {"data": "{}", "headers": {"Content-Type": "text/plain"}}, 415),
        ("POST", "/api/messages", {"data": "{", "headers": json_body}, 400),
        ("GET", "/api/messages?limit=0", {}, 400),
        ("GET", "/logs?lines=x", {}, 400),
        ("GET", "/logs", {"headers": proxied}, 401),
        ("POST", "/logs", {}, 405),
        ("GET", "/?sendmail=nobody", {}, 400),
        ("GET", "/api/messages", {"headers": proxied}, 401),
        ("GET", "/?sendmail=a@example.com", {"headers": proxied}, 401),
        ("GET", "/?talktome", {}, 200),
        ("GET", "/?talktome", {}, 429),
    ]
    async with running_app(settings) as (app, client):
        await wait_ready(app)
        description = await (await client.get("/openapi.json")).get_json()
        for method, path, kwargs, status in requests:
            response = await client.open(path, method=method, **kwargs)
            assert response.status_code == status, (method, path)
            # What a route answers is in its OpenAPI description, body type included.
            operation = find_operation(description, method, path)
            if operation is not None:
                documented = operation["responses"].get(str(status))
                assert documented is not None, (method, path, status)
                assert response.mimetype in documented["content"], (method, path, status)
            body = await response.get_data(as_text=True)
            if path.startswith(("/api/", "/logs")):
                assert response.mimetype == "application/json", (method, path)
                assert isinstance(json.loads(body)["error"], str)
            else:
                assert response.mimetype == "text/plain", (method, path, response.mimetype)
                assert not body.startswith("{"), (method, path)


def find_operation(description: dict[str, Any], method: str, path: str) -> Any:
    """The OpenAPI operation that serves ``method path`` (None: no such route or method)."""
    bare = path.split("?", 1)[0]
    for template, operations in description["paths"].items():
        if re.fullmatch(re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)), bare):
            return operations.get(method.lower())
    return None


async def test_openapi_lists_every_answer_of_each_operation(app_client: AppClient) -> None:
    """Every status each operation can give is in /openapi.json, with what it means."""
    _, client = app_client
    paths = (await (await client.get("/openapi.json")).get_json())["paths"]
    expected = {
        ("post", "/api/messages"): {202, 400, 401, 409, 413, 415, 422, 429, 503},
        ("post", "/api/messages/batch"): {200, 400, 401, 409, 413, 415, 422, 429, 503},
        ("get", "/api/messages/{message_id}"): {200, 400, 401, 404, 503},
        ("get", "/api/messages"): {200, 400, 401, 503},
        ("get", "/api/dead-letters"): {200, 400, 401, 503},
        ("get", "/logs"): {200, 400, 401},
        ("get", "/"): {200, 400, 401, 429, 503},
        ("get", "/healthz"): {200, 400},
        ("get", "/readyz"): {200, 400, 503},
        ("get", "/api/outbox"): {200, 400, 401},
        ("get", "/api/outbox/{name}"): {200, 400, 401, 404, 422},
        ("get", "/api/outbox/{name}/raw"): {200, 400, 401, 404, 422},
        ("post", "/api/dead-letters/requeue"): {200, 400, 401, 413, 415, 503},
        ("put", "/api/templates/{name}"): {200, 201, 400, 401, 413, 503},
        ("get", "/api/templates/{name}"): {200, 400, 401, 404, 503},
        ("delete", "/api/templates/{name}"): {204, 400, 401, 404, 503},
        ("get", "/api/stats"): {200, 400, 401, 503},
        ("get", "/metrics"): {200, 400, 401},
        ("delete", "/api/messages/{message_id}"): {200, 400, 401, 404, 409, 503},
        ("get", "/api/suppressions"): {200, 400, 401, 503},
        ("put", "/api/suppressions/{address}"): {200, 400, 401, 404, 413, 415, 503},
        ("delete", "/api/suppressions/{address}"): {200, 400, 401, 404, 503},
    }
    found = {(m, p) for p, operations in paths.items() for m in operations}
    assert found == set(expected)
    for (method, path), codes in expected.items():
        responses = paths[path][method]["responses"]
        assert {int(code) for code in responses} == codes, (method, path)
        assert all(r["description"] for r in responses.values()), (method, path)
    message_statuses = paths["/api/messages"]["get"]["parameters"]
    assert "partial" in json.dumps(message_statuses)
    assert paths["/api/messages"]["post"]["responses"]["429"]["headers"]["Retry-After"]
