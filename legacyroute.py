"""``GET /?sendmail=<address>`` straight from the ASGI scope, without Quart's request cycle.

The legacy send is what curl users and the benchmark call most, and Quart's cycle (its
request and response objects, contexts, routing, hooks, werkzeug's headers) cost about
as much CPU as the rest of the request: without it the server's CPU per mail went from
1.19 to 0.79-0.81 ms with a new connection per request and from 0.61 to 0.41 ms with
keep-alive clients (bench/bench.py, default runs on one machine, stored in
bench/results/: 20261206T231349Z against 20261206T235139Z and 20261207T000229Z).

:func:`match` recognises the requests this path takes, and reads from the scope what
Quart's ``before_request`` gate reads from its request object (the same parsing:
werkzeug's ``request.args`` is ``parse_qsl`` of the UTF-8 query, which :func:`match`
repeats when the query is strictly valid). Everything else, and anything unusual (a
body, a query the gate would refuse or that holds other parameters, HEAD), goes through
Quart as before. The answer itself is made by the same functions the Quart route uses
(server.py), so both give the same status, headers and text; :func:`send_response`
writes it. One difference on purpose: a client that hangs up does not cancel a send
here (Quart cancels its handler), as the JSON API's accept is shielded from it too.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypercorn.typing import ASGISendCallable, HTTPResponseBodyEvent, HTTPResponseStartEvent, Scope
from quart import Response
from quart.utils import encode_headers

from messages import query_pairs

_BODY_HEADERS = (b"content-length", b"transfer-encoding")


@dataclass(frozen=True, slots=True)
class LegacySend:
    """What the gate and the route read from one ``GET /?sendmail=`` request."""

    addresses: list[str]  # every sendmail value (the route wants exactly one)
    query_token: str | None  # &token=
    authorization: str | None  # the first Authorization header
    peer: str  # the TCP peer, as Quart's request.remote_addr
    x_forwarded_for: list[str]  # every X-Forwarded-For header line
    forwarded: bool  # a Forwarded header is present


def match(scope: Scope) -> LegacySend | None:
    """The request, if it is a plain ``GET /?sendmail=...[&token=...]``; else None."""
    if (
        scope["type"] != "http"
        or scope["method"] != "GET"
        or scope["path"] != "/"
        or scope.get("root_path", "")
    ):
        return None
    raw = scope["query_string"]
    if b"sendmail" not in raw:
        return None  # (a name spelled with %-escapes goes to Quart too: either answers)
    pairs = query_pairs(raw)
    if pairs is None:
        return None  # not valid UTF-8: the gate answers 400
    addresses: list[str] = []
    tokens: list[str] = []
    for name, value in pairs:
        if name == "sendmail":
            addresses.append(value)
        elif name == "token":
            tokens.append(value)
        else:
            return None
    if not addresses or len(tokens) > 1:
        return None
    authorization: str | None = None
    x_forwarded_for: list[str] = []
    forwarded = False
    for header, raw_value in scope["headers"]:
        if header in _BODY_HEADERS:
            return None  # a GET with a body, or framing the gate refuses
        if header == b"authorization":
            if authorization is None:
                authorization = raw_value.decode("latin1")
        elif header == b"x-forwarded-for":
            x_forwarded_for.append(raw_value.decode("latin1"))
        elif header == b"forwarded":
            forwarded = True
        elif header == b"host" and not _host_binds(raw_value):
            return None  # Quart fails to route it (werkzeug's BadHost): a 500 there
    client = scope.get("client")
    return LegacySend(
        addresses=addresses,
        query_token=tokens[0] if tokens else None,
        authorization=authorization,
        peer=client[0] if client else "<local>",
        x_forwarded_for=x_forwarded_for,
        forwarded=forwarded,
    )


def _host_binds(host: bytes) -> bool:
    """Whether werkzeug's ``Map.bind``, which Quart runs for every request, takes this
    Host: its name (without the port) must encode as IDNA."""
    try:
        host.decode("latin1").lower().partition(":")[0].encode("idna")
    except UnicodeError:
        return False
    return True


async def send_response(send: ASGISendCallable, response: Response) -> None:
    """Write a Quart response with a body in memory, as Quart would."""
    body = await response.get_data(as_text=False)
    start: HTTPResponseStartEvent = {
        "type": "http.response.start",
        "status": response.status_code,
        "headers": encode_headers(response.headers),
    }
    await send(start)
    end: HTTPResponseBodyEvent = {"type": "http.response.body", "body": body, "more_body": False}
    await send(end)
