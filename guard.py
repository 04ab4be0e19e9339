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
"""

from __future__ import annotations

import hmac
import ipaddress
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from limits import RateLimitItem, parse_many
from limits.aio.storage import Storage
from limits.aio.strategies import MovingWindowRateLimiter
from limits.storage import storage_from_string

from config import Settings
from errors import MailroomError

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
    there was a ``Forwarded`` header.
    """
    forwarded_for = [
        part.strip() for line in x_forwarded_for for part in line.split(",") if part.strip()
    ]
    proxied = bool(forwarded_for) or forwarded
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
        """Constant-time comparison against every configured token."""
        if presented is None or not self._tokens:
            return False
        candidate = presented.encode()
        matched = False
        for token in self._tokens:
            matched |= hmac.compare_digest(candidate, token)
        return matched

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

    async def limit_send(self, client: Client) -> None:
        """Per-client and global send limits (before the request is even read)."""
        if self.exempt(client):
            return
        await self._hit(self._send, ("send", client.address), "Too many messages from you")
        await self._hit(self._global, ("global",), "Too many messages right now")

    async def limit_recipients(self, client: Client, recipients: Iterable[str]) -> None:
        if self.exempt(client):
            return
        for address in recipients:
            await self._hit(
                self._recipient,
                ("rcpt", address.lower()),
                f"Too many messages to {address}",
            )

    async def limit_talktome(self, client: Client) -> None:
        if self.exempt(client):
            return
        await self._hit(self._talktome, ("talktome", client.address), "Too many requests")

    async def _hit(self, items: list[RateLimitItem], key: tuple[str, ...], message: str) -> None:
        for item in items:
            if not await self._limiter.hit(item, *key):
                stats = await self._limiter.get_window_stats(item, *key)
                retry_after = max(1, math.ceil(stats.reset_time - time.time()))
                raise Denied(
                    429,
                    f"{message}: the limit is {item}; try again in {retry_after}s.",
                    {"Retry-After": str(retry_after)},
                )
