"""Who may send, and how often.

* **Who:** a request may send when it carries one of the ``API_TOKEN`` tokens (``Authorization:
  Bearer <token>``, or ``token=<token>`` on the legacy GET), or when it comes straight from
  a loopback address with no forwarding header (``X-Forwarded-For`` / ``Forwarded``) and
  ``ALLOW_LOOPBACK`` is on. Anything that came through nginx or ngrok carries such a
  header, so a tunnelled instance sends nothing until a token is set.
* **Client address:** the direct peer, or with ``TRUSTED_PROXY_HOPS=n`` the n-th address
  from the right of ``X-Forwarded-For`` (what the n proxies we trust saw); entries a
  client wrote itself sit further left and change nothing.
* **How often:** moving-window limits (the ``limits`` library) per client, for everyone
  together, per recipient, and for ``?talktome``. Direct loopback clients are exempt
  unless ``RATE_LIMIT_EXEMPT_LOOPBACK=false``. ``RATE_LIMIT_STORAGE=memory://`` counts in
  each process; ``redis://...`` shares the counts between processes and hosts.
* **A refused request spends nothing:** a send is checked against every limit it touches
  first (``test``), and only a request that passes them all, with a valid body, is counted
  (``hit``). Between the two another request may take the last unit of a window; that
  hit then fails and the request is refused (429) with the units before it spent: a limit
  is never exceeded, and only such a race spends anything on a refused request.
"""

from __future__ import annotations

import functools
import hmac
import ipaddress
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from limits import RateLimitItem, parse_many
from limits.aio.storage import Storage
from limits.aio.strategies import MovingWindowRateLimiter
from limits.storage import storage_from_string

from config import Settings
from errors import MailroomError

# Rate-limit items, the key they count under, and what a 429 says.
_Limit = tuple[list[RateLimitItem], tuple[str, ...], str]

SETUP_HELP = (
    "Sending from here needs a token. Put API_TOKEN=<a long random string> in the server's "
    ".env (make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'), "
    "restart it, and send the header 'Authorization: Bearer <token>' "
    "(or add &token=<token> to the legacy GET)."
)


class Denied(MailroomError):
    """The request may not go on: ``status`` (401, 429) with a message and headers."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


@dataclass(frozen=True)
class Client:
    address: str  # the real client, after the trusted proxy hops
    peer: str  # the direct TCP peer
    proxied: bool  # the request carries X-Forwarded-For or Forwarded

    @property
    def direct_loopback(self) -> bool:
        return not self.proxied and is_loopback(self.peer)


@functools.lru_cache(maxsize=1024)  # asked several times per request, for few addresses
def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def identify(
    peer: str | None, x_forwarded_for: Iterable[str], forwarded: bool, trusted_hops: int
) -> Client:
    """Work out the real client address from the peer and the forwarding headers.

    ``x_forwarded_for`` holds every X-Forwarded-For header line; ``forwarded`` says whether
    there was a ``Forwarded`` header. Either header present means proxied, whatever it
    holds (empty, only commas or spaces): only a proxy or a client playing one sends it.
    """
    lines = list(x_forwarded_for)
    forwarded_for = [part.strip() for line in lines for part in line.split(",") if part.strip()]
    proxied = bool(lines) or forwarded
    direct = peer or "unknown"
    address = direct
    if trusted_hops and len(forwarded_for) >= trusted_hops:
        address = forwarded_for[-trusted_hops]
    return Client(address=address, peer=direct, proxied=proxied)


def bearer_token(authorization: str | None) -> str | None:
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def token_matches(tokens: Sequence[bytes], presented: str | None) -> bool:
    """Constant-time comparison against every configured token."""
    if presented is None or not tokens:
        return False
    candidate = presented.encode()
    matched = False
    for token in tokens:
        matched |= hmac.compare_digest(candidate, token)
    return matched


class Guard:
    """Authorisation and rate limits for one server process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._tokens = [t.get().encode() for t in settings.api_tokens]
        self._send = parse_many(settings.rate_limit_send)
        self._global = parse_many(settings.rate_limit_global)
        self._recipient = parse_many(settings.rate_limit_recipient)
        self._talktome = parse_many(settings.rate_limit_talktome)
        self._pool: Any = None
        self._storage: Storage = self._make_storage(settings.rate_limit_storage.get())
        self._limiter = MovingWindowRateLimiter(self._storage)

    def _make_storage(self, url: str) -> Storage:
        if url == "memory://":
            storage = storage_from_string("async+memory://")
        else:
            import redis.asyncio  # only needed for shared limits

            self._pool = redis.asyncio.ConnectionPool.from_url(url)
            storage = storage_from_string(
                "async+" + url, implementation="redispy", connection_pool=self._pool
            )
        assert isinstance(storage, Storage)
        return storage

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.disconnect()

    def token_ok(self, presented: str | None) -> bool:
        return token_matches(self._tokens, presented)

    def authorize(self, client: Client, presented: str | None) -> None:
        """Raise :class:`Denied` (401) unless this client may send and read."""
        if self.token_ok(presented):
            return
        if self.settings.allow_loopback and client.direct_loopback:
            return
        if not self._tokens:
            raise Denied(401, SETUP_HELP, {"WWW-Authenticate": "Bearer"})
        if presented is not None:
            raise Denied(401, "The token is not valid.", {"WWW-Authenticate": "Bearer"})
        raise Denied(
            401,
            "A token is required: send 'Authorization: Bearer <token>'.",
            {"WWW-Authenticate": "Bearer"},
        )

    def exempt(self, client: Client) -> bool:
        return self.settings.rate_limit_exempt_loopback and client.direct_loopback

    def _send_limits(self, client: Client) -> list[_Limit]:
        return [
            (self._send, ("send", client.address), "Too many messages from you"),
            (self._global, ("global",), "Too many messages right now"),
        ]

    async def check_send(self, client: Client) -> None:
        """Refuse (429) a client whose per-client or global send limit is used up, before
        its request body is read. Spends nothing: :meth:`spend_send` counts the send."""
        if self.exempt(client):
            return
        await self._test(self._send_limits(client))

    async def spend_send(self, client: Client, recipients: Iterable[str]) -> None:
        """Count one valid send: per client, globally and per recipient. Every limit is
        tested before any is hit, so a 429 for one recipient spends nothing for the others."""
        if self.exempt(client):
            return
        limits = self._send_limits(client) + [
            (self._recipient, ("rcpt", address.lower()), f"Too many messages to {address}")
            for address in recipients
        ]
        await self._test(limits)
        for items, key, message in limits:
            for item in items:
                if not await self._limiter.hit(item, *key):
                    # Another request took the last unit since the test: refuse all the
                    # same, so that no limit is ever exceeded (see the module docstring).
                    await self._refuse(item, key, message)

    async def limit_talktome(self, client: Client) -> None:
        if self.exempt(client):
            return
        key = ("talktome", client.address)
        await self._test([(self._talktome, key, "Too many requests")])
        for item in self._talktome:
            if not await self._limiter.hit(item, *key):
                await self._refuse(item, key, "Too many requests")

    async def _test(self, limits: list[_Limit]) -> None:
        for items, key, message in limits:
            for item in items:
                if not await self._limiter.test(item, *key):
                    await self._refuse(item, key, message)

    async def _refuse(self, item: RateLimitItem, key: tuple[str, ...], message: str) -> None:
        stats = await self._limiter.get_window_stats(item, *key)
        retry_after = max(1, math.ceil(stats.reset_time - time.time()))
        raise Denied(
            429,
            f"{message}: the limit is {item}; try again in {retry_after}s.",
            {"Retry-After": str(retry_after)},
        )
