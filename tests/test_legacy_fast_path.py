"""``GET /?sendmail=`` without Quart's request cycle (legacyroute.py) answers exactly as the
Quart route does, and only the requests it should take go that way."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, quote

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY
from quart import Quart
from werkzeug.datastructures import Headers
from werkzeug.sansio.request import Request as WerkzeugRequest

import legacyroute
import server
from broker import Names
from config import Secret, Settings
from tests.conftest import running_app, serving_app, wait_ready
from tests.support import free_port, queue_depth

TOKEN = "tok-" + "c" * 28
ID = re.compile(r"[0-9a-f]{32}")
VIA_QUART = "&via=quart"  # a parameter the fast path leaves to Quart, and the route ignores


def scope(query: bytes, method: str = "GET", path: str = "/", **extra: Any) -> Any:
    return {
        "type": "http",
        "method": method,
        "path": path,
        "root_path": "",
        "query_string": query,
        "headers": [(b"host", b"example.com")],
        "client": ("127.0.0.1", 5555),
        **extra,
    }


def test_match_reads_what_the_gate_reads() -> None:
    legacy = legacyroute.match(
        scope(
            b"sendmail=a%2Bb%40example.com&token=t+1",
            headers=[
                (b"authorization", b"Bearer x"),
                (b"authorization", b"Bearer y"),
                (b"x-forwarded-for", b"198.51.100.1, 198.51.100.2"),
                (b"x-forwarded-for", b"198.51.100.3"),
                (b"forwarded", b"for=198.51.100.4"),
            ],
            client=("203.0.113.9", 1),
        )
    )
    assert legacy == legacyroute.LegacySend(
        addresses=["a+b@example.com"],
        query_token="t 1",
        authorization="Bearer x",  # the first, as werkzeug's headers.get
        peer="203.0.113.9",
        x_forwarded_for=["198.51.100.1, 198.51.100.2", "198.51.100.3"],
        forwarded=True,
    )
    several = legacyroute.match(scope(b"sendmail=a@x.test&sendmail=b@x.test", client=None))
    assert several is not None
    assert several.addresses == ["a@x.test", "b@x.test"]  # the route answers 400
    assert several.peer == "<local>"  # as Quart's request.remote_addr without a client


@pytest.mark.parametrize(
    ("request_scope", "why"),
    [
        (scope(b"sendmail=a@x.test", method="HEAD"), "HEAD changes nothing (the gate: 405)"),
        (scope(b"sendmail=a@x.test", method="POST"), "only GET sends"),
        (scope(b"sendmail=a@x.test", path="/api/messages"), "another route"),
        (scope(b"sendmail=a@x.test", root_path="/mail"), "mounted below a prefix"),
        (scope(b"talktome"), "not a send"),
        (scope(b""), "the usage"),
        (scope(b"sendmail=a@x.test&talktome"), "another parameter"),
        (scope(b"xsendmail=a@x.test"), "another parameter"),
        (scope(b"sendmail=a@x.test&token=1&token=2"), "two tokens (the gate: 400)"),
        (scope(b"sendmail=%FF"), "not UTF-8 (the gate: 400)"),
        (
            scope(b"sendmail=a@x.test", headers=[(b"content-length", b"0")]),
            "a body (the gate checks its framing)",
        ),
        (scope(b"sendmail=a@x.test", headers=[(b"transfer-encoding", b"chunked")]), "a body"),
        ({**scope(b"sendmail=a@x.test"), "type": "websocket"}, "not HTTP"),
        (
            scope(b"sendmail=a@x.test", headers=[(b"host", b"a..b")]),
            "a Host werkzeug cannot bind (Quart: 500)",
        ),
    ],
)
def test_match_leaves_the_rest_to_quart(request_scope: Any, why: str) -> None:
    assert legacyroute.match(request_scope) is None, why


NAMES = st.sampled_from(["sendmail", "token", "talktome", "x", "sendmailx"])
VALUES = st.lists(
    st.sampled_from(["a", "@", "x.test", "+", " ", "%", "%2", "%26", "%3D", "%40", "é", "%FF"]),
    max_size=6,
).map("".join)
PAIRS = st.lists(st.tuples(NAMES, st.booleans(), VALUES), min_size=1, max_size=4)


@settings(max_examples=400, deadline=None)
@given(PAIRS)
def test_match_takes_what_werkzeug_reads_as_a_plain_send(
    pairs: list[tuple[str, bool, str]],
) -> None:
    """Queries of literal names, with or without '=', values with any escapes: match()
    takes exactly those that werkzeug (Quart's request.args) reads as valid UTF-8 holding
    one or more sendmail, at most one token and nothing else, and reads the same values."""
    raw = "&".join(f"{name}={value}" if equals else name for name, equals, value in pairs)
    legacy = legacyroute.match(scope(raw.encode()))
    try:
        raw.encode().decode()
        parse_qsl(raw, keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        assert legacy is None  # the gate refuses it (400)
        return
    # Quart's request is this class: its args are what the Quart route reads.
    args = WerkzeugRequest("GET", "http", None, "", "/", raw.encode(), Headers(), None).args
    plain = set(args) <= {"sendmail", "token"} and "sendmail" in args
    assert (legacy is not None) == (plain and len(args.getlist("token")) <= 1)
    if legacy is not None:
        assert legacy.addresses == args.getlist("sendmail")
        tokens = [] if legacy.query_token is None else [legacy.query_token]
        assert tokens == args.getlist("token")


def through_quart(app: Quart) -> list[str]:
    """The query strings of the requests that went through Quart's request cycle."""
    seen: list[str] = []

    @app.before_request
    async def note() -> None:
        from quart import request

        seen.append(request.query_string.decode())

    return seen


async def answers(client: Any, query: str, **kwargs: Any) -> tuple[Any, Any]:
    """The fast path's answer and the Quart route's to the same request, normalised."""
    fast = await client.get(f"/?{query}", **kwargs)
    slow = await client.get(f"/?{query}{VIA_QUART}", **kwargs)

    async def normal(response: Any) -> tuple[int, list[tuple[str, str]], str]:
        body = ID.sub("<id>", await response.get_data(as_text=True))
        headers = sorted((k, v) for k, v in response.headers.items() if k.lower() != "date")
        return response.status_code, headers, body

    return await normal(fast), await normal(slow)


async def test_fast_path_and_route_answer_alike(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(
        api_tokens=(Secret(TOKEN),), allow_loopback=False, rate_limit_recipient="2/hour"
    )
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    away = {"scope_base": {"client": ("203.0.113.5", 5555)}}  # no loopback exemption
    async with running_app(settings) as (app, client):
        await wait_ready(app)
        quart_saw = through_quart(app)
        cases = [
            ("sendmail=one@example.com", {"headers": bearer}, 200),
            (f"sendmail=mailto:two@example.com&token={TOKEN}", {}, 200),
            ("sendmail=three@example.com", {}, 401),  # no token
            ("sendmail=three@example.com&token=nope", {}, 401),
            ("sendmail=not-an-address", {"headers": bearer}, 400),
            ("sendmail=a@example.com&sendmail=b@example.com", {"headers": bearer}, 400),
            ("sendmail=victim@example.com", {"headers": bearer}, 200),  # 2 per hour:
            ("sendmail=victim@example.com", {"headers": bearer}, 429),  # the 3rd and 4th
        ]
        for query, kwargs, status in cases:
            fast, slow = await answers(client, query, **kwargs, **away)
            assert fast == slow, query
            assert fast[0] == status, (query, fast)
        assert quart_saw == [f"{quote(q, safe='@:=&')}{VIA_QUART}" for q, _, _ in cases]
        # Every 200 queued one message, by either path: 3 cases x 2.
        assert await queue_depth(Names.of(settings).send_queue) == 6


async def test_both_paths_share_the_client_and_the_counts(
    make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    """The client behind a trusted proxy is the same on both paths (one send limit), and
    both count their answers in the same metrics and log their 429s alike."""
    settings = make_settings(
        api_tokens=(Secret(TOKEN),), trusted_proxy_hops=1, rate_limit_send="1/minute"
    )

    def sample(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    async with running_app(settings) as (app, client):

        async def send(query: str, address: str) -> int:
            headers = {"Authorization": f"Bearer {TOKEN}", "X-Forwarded-For": address}
            return (await client.get(f"/?{query}", headers=headers)).status_code

        await wait_ready(app)
        accepted = sample("mailroom_accept_seconds_count")
        limited = sample("mailroom_messages_refused_total", reason="rate_limited")
        with caplog.at_level(logging.WARNING, logger="server"):
            codes = [
                await send("sendmail=a@example.com", "198.51.100.7"),
                await send(f"sendmail=a@example.com{VIA_QUART}", "198.51.100.7"),
                await send(f"sendmail=a@example.com{VIA_QUART}", "198.51.100.8"),
                await send("sendmail=b@example.com", "198.51.100.8"),
            ]
        assert codes == [200, 429, 200, 429]
        assert sample("mailroom_accept_seconds_count") - accepted == 2
        assert sample("mailroom_messages_refused_total", reason="rate_limited") - limited == 2
        logged = [r.getMessage() for r in caplog.records if "rate limited" in r.getMessage()]
        assert [line.split(":")[0] for line in logged] == [
            "rate limited 198.51.100.7 on /",  # the Quart route
            "rate limited 198.51.100.8 on /",  # the fast path
        ]


async def test_broker_unreachable_alike(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(amqp_url=Secret(f"amqp://guest:guest@127.0.0.1:{free_port()}/"))
    async with running_app(settings) as (_, client):
        fast, slow = await answers(client, "sendmail=email@example.com")
        assert fast == slow
        assert fast[0] == 503
        assert "retry-after" in {name.lower() for name, _ in fast[1]}


async def test_an_error_is_logged_and_answered_500_alike(
    make_settings: Callable[..., Settings],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(address: str) -> Any:
        raise RuntimeError("a bug in making the message")

    monkeypatch.setattr(server, "legacy_job", broken)
    async with running_app(make_settings()) as (app, client):
        await wait_ready(app)
        with caplog.at_level(logging.ERROR):
            fast, slow = await answers(client, "sendmail=email@example.com")
        assert fast == slow
        assert fast[0] == 500
        failures = [r for r in caplog.records if r.exc_info and "a bug in" in str(r.exc_info[1])]
        assert len(failures) == 2  # each path logged it with its traceback


async def test_served_by_hypercorn_alike(make_settings: Callable[..., Settings]) -> None:
    """Over a real connection: the same status line, headers and text."""
    async with (
        serving_app(make_settings()) as base,
        httpx.AsyncClient(base_url=base, trust_env=False) as http,
    ):
        fast = await http.get("/?sendmail=email@example.com")
        slow = await http.get(f"/?sendmail=email@example.com{VIA_QUART}")
    assert fast.status_code == slow.status_code == 200
    assert (
        ID.sub("", fast.text)
        == ID.sub("", slow.text)
        == "Email to email@example.com queued (id )\n"
    )

    def shown(response: httpx.Response) -> list[tuple[str, str]]:
        return sorted((k, v) for k, v in response.headers.items() if k != "date")

    assert shown(fast) == shown(slow)
    assert {"date", "server", "content-type", "content-length"} <= set(fast.headers)
