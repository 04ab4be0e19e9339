"""Safe to expose: tokens, loopback trust, real client addresses, limits, hostile input."""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from quart.typing import TestClientProtocol as Client

from broker import Names
from config import Secret, Settings
from tests.conftest import running_app, running_worker, wait_ready
from tests.support import (
    SMTP_PASS,
    Proc,
    SmtpRecorder,
    SmtpServer,
    child_env,
    finish,
    free_port,
    queue_depth,
    spawn,
    start_smtp,
    wait_http,
)

TOKEN = "tok-" + "a" * 28
OTHER_TOKEN = "tok-" + "b" * 28

BODY = {"to": "a@example.com", "subject": "s", "text": "t"}


def remote(ip: str = "203.0.113.5") -> dict[str, Any]:
    return {"scope_base": {"client": (ip, 5555)}}


async def depth(settings: Settings) -> int:
    return await queue_depth(Names.of(settings).send_queue)


# -- who may send ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "kwargs"),
    [
        ("GET", "/?sendmail=a@example.com", {}),
        ("POST", "/api/messages", {"json": BODY}),
        ("GET", "/api/messages", {}),
        ("GET", f"/api/messages/{'a' * 32}", {}),
        ("GET", "/api/dead-letters", {}),
        ("GET", "/logs", {}),
        # the web page's endpoints (web.py)
        ("GET", "/api/outbox", {}),
        ("GET", "/api/outbox/20261204-120000-000001-1.eml", {}),
        ("GET", "/api/outbox/20261204-120000-000001-1.eml/raw", {}),
        ("POST", "/api/dead-letters/requeue", {"json": {"ids": ["a" * 32]}}),
    ],
)
@pytest.mark.parametrize(
    "how",
    [
        remote(),
        {"headers": {"X-Forwarded-For": "127.0.0.1"}},
        {"headers": {"Forwarded": "for=127.0.0.1"}},
    ],
    ids=["remote-peer", "x-forwarded-for", "forwarded"],
)
async def test_without_token_only_direct_loopback(
    method: str,
    path: str,
    kwargs: dict[str, Any],
    how: dict[str, Any],
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings()
    async with running_app(settings) as (app, client):
        await wait_ready(app)
        response = await client.open(path, method=method, **kwargs, **how)
        assert response.status_code == 401
        body = await response.get_data(as_text=True)
        assert "API_TOKEN" in body and "Authorization: Bearer" in body
        assert response.headers["WWW-Authenticate"] == "Bearer"
        assert await depth(settings) == 0
        # The same request straight from loopback goes through.
        direct = await client.open(path, method=method, **kwargs)
        assert direct.status_code in (200, 202, 404)


async def test_token_in_header_or_query(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(api_tokens=(Secret(TOKEN), Secret(OTHER_TOKEN)))
    async with running_app(settings) as (app, client):
        await wait_ready(app)
        bearer = {"Authorization": f"Bearer {OTHER_TOKEN}"}
        via_header = await client.get("/?sendmail=a@example.com", headers=bearer, **remote())
        assert via_header.status_code == 200
        via_query = await client.get(f"/?sendmail=b@example.com&token={TOKEN}", **remote())
        assert via_query.status_code == 200
        both = await client.get(
            f"/?sendmail=c@example.com&token={TOKEN}", headers=bearer, **remote()
        )
        assert both.status_code == 200
        posted = await client.post("/api/messages", json=BODY, headers=bearer, **remote())
        assert posted.status_code == 202
        listed = await client.get("/api/messages", headers=bearer, **remote())
        assert listed.status_code == 200
        assert await depth(settings) == 4

        for bad in (
            await client.get(f"/?sendmail=a@example.com&token={TOKEN}x", **remote()),
            await client.get(
                "/?sendmail=a@example.com", headers={"Authorization": "Bearer nope"}, **remote()
            ),
            await client.get(
                "/?sendmail=a@example.com", headers={"Authorization": TOKEN}, **remote()
            ),
            await client.get(f"/?sendmail=a@example.com&token={TOKEN}&token={TOKEN}", **remote()),
            # The query token is for the legacy GET only.
            await client.post(f"/api/messages?token={TOKEN}", json=BODY, **remote()),
        ):
            assert bad.status_code in (400, 401)
        assert await depth(settings) == 4


async def test_loopback_can_be_required_to_use_a_token(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(api_tokens=(Secret(TOKEN),), allow_loopback=False)
    async with running_app(settings) as (app, client):
        await wait_ready(app)
        assert (await client.get("/?sendmail=a@example.com")).status_code == 401
        ok = await client.get(
            "/?sendmail=a@example.com", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        assert ok.status_code == 200


async def test_talktome_stays_open(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(api_tokens=(Secret(TOKEN),))
    async with running_app(settings) as (_, client):
        assert (await client.get("/?talktome", **remote())).status_code == 200
        proxied = await client.get("/?talktome", headers={"X-Forwarded-For": "198.51.100.1"})
        assert proxied.status_code == 200


# -- the real client address -----------------------------------------------------------


@pytest.mark.parametrize(
    ("hops", "forwarded_for", "expected"),
    [
        (0, "6.6.6.6", "127.0.0.1"),  # no proxy trusted: the header changes nothing
        (1, "198.51.100.7", "198.51.100.7"),
        (1, "6.6.6.6, 198.51.100.7", "198.51.100.7"),  # the client forged the first entry
        (2, "6.6.6.6, 198.51.100.7, 127.0.0.1", "198.51.100.7"),
        (2, "198.51.100.7", "127.0.0.1"),  # fewer entries than trusted hops: the peer
    ],
)
async def test_client_address_with_trusted_hops(
    hops: int, forwarded_for: str, expected: str, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(trusted_proxy_hops=hops)
    async with running_app(settings) as (_, client):
        response = await client.get("/?talktome", headers={"X-Forwarded-For": forwarded_for})
        assert response.status_code == 200
    line = settings.talktome_log.read_text().splitlines()[-1]
    assert line.endswith(f"talktome from {expected}")


# -- limits ----------------------------------------------------------------------------


async def test_talktome_rate_limited_through_a_proxy(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(rate_limit_talktome="3/minute", trusted_proxy_hops=1)
    async with running_app(settings) as (_, client):
        proxied = {"headers": {"X-Forwarded-For": "198.51.100.9"}}
        codes = [(await client.get("/?talktome", **proxied)).status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        limited = await client.get("/?talktome", **proxied)
        assert 0 < int(limited.headers["Retry-After"]) <= 60
        assert "limit" in await limited.get_data(as_text=True)
        other = await client.get("/?talktome", headers={"X-Forwarded-For": "198.51.100.10"})
        assert other.status_code == 200  # per client
        direct = [(await client.get("/?talktome")).status_code for _ in range(5)]
        assert direct == [200] * 5  # direct loopback clients are exempt


async def test_loopback_exemption_can_be_turned_off(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(rate_limit_talktome="2/minute", rate_limit_exempt_loopback=False)
    async with running_app(settings) as (_, client):
        codes = [(await client.get("/?talktome")).status_code for _ in range(3)]
        assert codes == [200, 200, 429]


async def test_send_limits_per_client_and_global(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(
        api_tokens=(Secret(TOKEN),),
        rate_limit_send="2/minute",
        rate_limit_global="5/minute",
    )
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    async with running_app(settings) as (app, client):
        await wait_ready(app)

        async def send(ip: str, n: int) -> int:
            response = await client.get(
                f"/?sendmail=u{n}@example.com", headers=bearer, **remote(ip)
            )
            return response.status_code

        assert [await send("198.51.100.1", n) for n in range(3)] == [200, 200, 429]
        assert [await send("198.51.100.2", n) for n in range(3, 5)] == [200, 200]
        assert await send("198.51.100.3", 5) == 200
        assert await send("198.51.100.4", 6) == 429  # the global limit: 5 a minute
        posted = await client.post(
            "/api/messages", json=BODY, headers=bearer, **remote("198.51.100.4")
        )
        assert posted.status_code == 429
        assert (await posted.get_json())["error"]
        assert int(posted.headers["Retry-After"]) > 0
        assert await depth(settings) == 5


async def test_one_recipient_cannot_be_flooded(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(api_tokens=(Secret(TOKEN),), rate_limit_recipient="2/hour")
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    async with running_app(settings) as (app, client):
        await wait_ready(app)
        codes = []
        for n in range(3):
            response = await client.get(
                "/?sendmail=victim@example.com", headers=bearer, **remote(f"198.51.100.{n}")
            )
            codes.append(response.status_code)
        assert codes == [200, 200, 429]
        body = {"to": ["other@example.com", "Victim@example.com"], "subject": "s", "text": "t"}
        response = await client.post("/api/messages", json=body, headers=bearer, **remote())
        assert response.status_code == 429
        assert "victim@example.com" in (await response.get_json())["error"].lower()
        ok = await client.get("/?sendmail=someone@example.com", headers=bearer, **remote())
        assert ok.status_code == 200
        assert await depth(settings) == 3


async def test_size_limits(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(
        max_request_bytes=4096, max_recipients=3, max_subject_chars=20, max_body_chars=100
    )
    async with running_app(settings) as (app, client):
        await wait_ready(app)
        huge = await client.post("/api/messages", json={**BODY, "text": "x" * 5000})
        assert huge.status_code == 413
        assert "4096 bytes" in (await huge.get_json())["error"]
        cases: list[tuple[dict[str, Any], str]] = [
            ({"to": [f"r{n}@example.com" for n in range(4)]}, "to"),
            ({"subject": "s" * 21}, "subject"),
            ({"text": "t" * 101}, "text"),
            ({"html": "h" * 101}, "html"),
        ]
        for change, field in cases:
            response = await client.post("/api/messages", json={**BODY, **change})
            assert response.status_code == 400
            answer = await response.get_json()
            assert answer["field"] == field and answer["error"]
        assert await depth(settings) == 0


# -- hostile input ---------------------------------------------------------------------

HOSTILE_GETS = [
    "/?sendmail=mailto:a@b.test?subject=x",
    "/?sendmail=mailto:a@b.test%3Fsubject%3Dx",
    "/?sendmail=a@example.com%0D%0ABcc:%20x@example.com",
    "/?sendmail=a@example.com%00",
    "/?sendmail=%22Evil%0D%0ABcc:x@example.com%22%20%3Ca@example.com%3E",
    "/?sendmail=",
    "/?sendmail",
    "/?sendmail=a@example.com&sendmail=b@example.com",
    "/?sendmail=" + "a" * 70_000 + "@example.com",
    "/?sendmail=%FF%FE",
    "/?sendmail=<script>@example.com",
]


@pytest.mark.parametrize("path", HOSTILE_GETS, ids=range(len(HOSTILE_GETS)))
async def test_hostile_legacy_input_is_a_clear_4xx(
    path: str, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings()
    async with running_app(settings) as (app, client):
        await wait_ready(app)
        response = await client.get(path)
        assert 400 <= response.status_code < 500
        assert await response.get_data(as_text=True)
        assert await depth(settings) == 0


HOSTILE_BODIES: list[tuple[Any, str | None]] = [
    ({**BODY, "subject": "hi\r\nBcc: x@example.com"}, "subject"),
    ({**BODY, "subject": "nul\0"}, "subject"),
    ({**BODY, "subject": "Hi\x0bReply-To :attacker@evil.example"}, "subject"),
    ({**BODY, "subject": "form\x0cfeed"}, "subject"),
    ({**BODY, "subject": "line\u2028separator"}, "subject"),
    ({**BODY, "subject": "c1\x85next line"}, "subject"),
    ({**BODY, "to": '"Ann\x0bX-Evil :1" <a@example.com>'}, "to"),
    ({**BODY, "reply_to": "Ann\x1c <a@example.com>"}, "reply_to"),
    ({**BODY, "reply_to": "a@example.com\nBcc: x@example.com"}, "reply_to"),
    ({**BODY, "to": '"Evil\r\nBcc: x@example.com" <a@example.com>'}, "to"),
    ({**BODY, "to": "Evil\0 <a@example.com>"}, "to"),
    ({**BODY, "to": "mailto:a@b.test?subject=x"}, "to"),
    ({**BODY, "to": ["a@example.com", "A@example.com"]}, "to"),
    ({**BODY, "to": ""}, "to"),
    ({**BODY, "to": None}, "to"),
    ({**BODY, "to": {"a": 1}}, "to"),
    ({**BODY, "text": None}, "text"),
    ({**BODY, "html": 5}, "html"),
    ({"to": "a@example.com"}, "subject"),
    ([BODY], None),
    ("just a string", None),
    (12, None),
]


@pytest.mark.parametrize(("body", "field"), HOSTILE_BODIES, ids=range(len(HOSTILE_BODIES)))
async def test_hostile_json_is_a_clear_400(
    body: Any, field: str | None, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings()
    async with running_app(settings) as (app, client):
        await wait_ready(app)
        response = await client.post("/api/messages", json=body)
        assert response.status_code == 400
        answer = await response.get_json()
        assert answer["error"]
        if field is not None:
            assert answer["field"] == field
        assert await depth(settings) == 0


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status"),
    [
        (
            "POST",
            "/api/messages",
            {"data": "{not json", "headers": {"Content-Type": "application/json"}},
            400,
        ),
        ("POST", "/api/messages", {"data": "to=a@example.com"}, 415),
        ("POST", "/api/messages", {"data": "<x/>", "headers": {"Content-Type": "text/xml"}}, 415),
        ("PUT", "/api/messages", {"json": BODY}, 405),
        ("DELETE", "/", {}, 405),
        ("POST", "/", {"data": "sendmail=a@example.com"}, 405),
        ("GET", "/api/nothing-here", {}, 404),
        ("GET", "/api/messages?limit=0", {}, 400),
        ("GET", "/api/messages?status=lost", {}, 400),
        ("GET", "/logs?lines=-1", {}, 400),
    ],
)
async def test_wrong_requests_are_clear_4xx(
    method: str,
    path: str,
    kwargs: dict[str, Any],
    status: int,
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings()
    async with running_app(settings) as (app, client):
        await wait_ready(app)
        response = await client.open(path, method=method, **kwargs)
        assert response.status_code == status
        assert await response.get_data(as_text=True)
        assert await depth(settings) == 0


async def test_internationalised_addresses(
    make_settings: Callable[..., Settings], smtp: SmtpServer
) -> None:
    """IDN domains go out as punycode; UTF-8 local parts use SMTPUTF8 where offered."""
    settings = make_settings(**smtp.settings_overrides(None, False))
    async with running_app(settings) as (app, client), running_worker(settings):
        await wait_ready(app)
        for address in ("jürgen@bücher.example", "plain@bücher.example"):
            response = await client.post("/api/messages", json={**BODY, "to": address})
            assert response.status_code == 202
        mails = await smtp.recorder.wait_for(2)
    envelopes = sorted(r for m in mails for r in m.rcpt_tos)
    assert envelopes == ["jürgen@xn--bcher-kva.example", "plain@xn--bcher-kva.example"]


async def test_utf8_local_part_refused_clearly_without_smtputf8(
    make_settings: Callable[..., Settings],
) -> None:
    from aiosmtpd.smtp import SMTP

    recorder = SmtpRecorder()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(recorder, hostname="old.test", enable_SMTPUTF8=False), "127.0.0.1", 0
    )
    port = server.sockets[0].getsockname()[1]
    settings = make_settings(smtp_host="127.0.0.1", smtp_port=port, smtp_security="none")
    async with running_app(settings) as (app, client), running_worker(settings):
        await wait_ready(app)
        response = await client.post("/api/messages", json={**BODY, "to": "jürgen@example.com"})
        message_id = (await response.get_json())["id"]
        from tests.test_status_api import wait_status

        record = await wait_status(client, message_id, "failed")
    assert "SMTPUTF8" in record["last_error"]["message"]
    assert record["attempts"] == 1  # refused at once, not retried
    server.close()


# -- secrets and logs ------------------------------------------------------------------


async def test_logs_view_is_behind_the_token(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(api_tokens=(Secret(TOKEN),))
    async with running_app(settings) as (_, client):
        for _ in range(5):
            await client.get("/?talktome")
        assert (await client.get("/logs", **remote())).status_code == 401
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        response = await client.get("/logs?lines=3", headers=bearer, **remote())
        assert response.status_code == 200
        lines = (await response.get_json())["lines"]
        assert len(lines) == 3 and all("talktome from" in line for line in lines)
        everything = await client.get("/logs", headers=bearer, **remote())
        assert len((await everything.get_json())["lines"]) == 5
        assert (await client.get("/logs?lines=10001", headers=bearer)).status_code == 400


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


async def test_no_secret_reaches_logs_answers_or_reprs(
    make_settings: Callable[..., Settings],
    caplog: pytest.LogCaptureFixture,
    server_tls: Any,
) -> None:
    amqp_user, amqp_pass = f"mr-{uuid.uuid4().hex[:8]}", f"amqp-{uuid.uuid4().hex}"
    await asyncio.to_thread(rabbitmqctl, "add_user", amqp_user, amqp_pass)
    try:
        await asyncio.to_thread(
            rabbitmqctl, "set_permissions", "-p", "/", amqp_user, ".*", ".*", ".*"
        )
        smtp = await start_smtp("none", server_tls, auth=True)
        wrong_password = f"wrong-{uuid.uuid4().hex}"
        secrets = [TOKEN, amqp_pass, SMTP_PASS, wrong_password]
        base = dict(
            amqp_url=Secret(f"amqp://{amqp_user}:{amqp_pass}@127.0.0.1:5672/"),
            api_tokens=(Secret(TOKEN),),
            **smtp.settings_overrides(None, login=True),
        )
        settings = make_settings(**base)
        bad_login = make_settings(**{**base, "smtp_password": Secret(wrong_password)})
        caplog.set_level(logging.DEBUG)
        shown: list[str] = [repr(settings), str(settings), repr(bad_login)]
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        async with running_app(settings) as (app, client):
            await wait_ready(app)
            async with running_worker(bad_login):
                response = await client.get(f"/?sendmail=a@example.com&token={TOKEN}", **remote())
                message_id = (await response.get_data(as_text=True)).split("id ")[1][:32]
                shown.append(await response.get_data(as_text=True))
                from tests.test_status_api import wait_status

                record = await wait_status(client, message_id, "retrying")
            async with running_worker(settings):
                await wait_status(client, message_id, "sent")
            for path in (
                f"/api/messages/{message_id}",
                "/api/messages",
                "/logs",
                "/api/dead-letters",
            ):
                shown.append(await (await client.get(path, headers=bearer)).get_data(as_text=True))
            shown.append(str(record))
            for bad in (f"{TOKEN}x", TOKEN[:-1]):
                denied = await client.get(f"/?sendmail=a@example.com&token={bad}", **remote())
                shown.append(await denied.get_data(as_text=True))
        smtp.server.close()
        shown.append(caplog.text)
        everything = "\n".join(shown)
        assert "LOGIN REFUSED" in caplog.text  # the logs did cover the failures
        for secret in secrets:
            assert secret not in everything
            assert secret[:-1] not in everything
        assert amqp_user in everything  # user names are fine; the passwords are not
    finally:
        await asyncio.to_thread(rabbitmqctl, "delete_user", amqp_user)


async def test_openapi_description_is_served(app_client: tuple[Any, Client]) -> None:
    _, client = app_client
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    spec = await response.get_json()
    assert spec["openapi"].startswith("3.")
    assert {"/", "/api/messages", "/api/messages/{message_id}", "/logs"} <= set(spec["paths"])
    post = spec["paths"]["/api/messages"]["post"]
    assert "requestBody" in post and "202" in post["responses"]
    assert re.search("bearer", str(spec["components"]["securitySchemes"]), re.I)


async def test_limits_hold_across_server_processes_with_redis(
    prefix: str, tmp_path: Path, stop_later: list[Proc]
) -> None:
    """RATE_LIMIT_STORAGE=redis://... shares the counts between server processes."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", 6379), 2)
        writer.close()
    except (OSError, TimeoutError):
        pytest.skip("no Redis on 127.0.0.1:6379 (only needed for shared rate limits)")
    client_ip = f"2001:db8::{uuid.uuid4().hex[:4]}"  # fresh counters on every run
    ports = [free_port(), free_port()]
    for port in ports:
        env = child_env(
            prefix,
            PORT=port,
            TALKTOME_LOG=tmp_path / "talk.log",
            DATABASE_URL=f"sqlite:///{tmp_path}/mailroom.db",
            TRUSTED_PROXY_HOPS=1,
            RATE_LIMIT_TALKTOME="4/minute",
            RATE_LIMIT_STORAGE="redis://127.0.0.1:6379/0",
        )
        proc = await spawn("server.py", tmp_path, env)
        stop_later.append(proc)
        await wait_http(f"http://127.0.0.1:{port}/healthz", proc)
    async with httpx.AsyncClient(headers={"X-Forwarded-For": client_ip}) as http:
        codes = [
            (await http.get(f"http://127.0.0.1:{ports[n % 2]}/?talktome")).status_code
            for n in range(6)
        ]
    assert codes == [200, 200, 200, 200, 429, 429]
    for proc in stop_later:
        proc.send_signal(signal.SIGTERM)
        code, out = await finish(proc)
        assert code == 0, out
