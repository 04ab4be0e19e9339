"""The small error hierarchy: each class says what happened, not where."""

from __future__ import annotations

import asyncio


class MailroomError(Exception):
    """Base class of every error Mailroom raises on purpose."""


class ConfigError(MailroomError):
    """A setting is missing or bad; ``variable`` names it."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable
        self.problem = problem


class InvalidMessage(MailroomError, ValueError):
    """A message request (or a message read from the queue) is not acceptable.

    ``field`` names the offending field ("to", "subject", ...) when there is one.
    """

    def __init__(self, reason: str, field: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.field = field


class InvalidJSON(MailroomError):
    """A request body that is not acceptable JSON (syntax, a duplicate key, too deep).

    Not a ValueError on purpose: Quart turns a ValueError from its JSON parser into a bare
    400, and this one should reach the client with its reason (and ``field``, if any).
    """

    def __init__(self, reason: str, field: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.field = field


class BrokerUnavailable(MailroomError):
    """RabbitMQ could not be reached, or did not confirm a publish in time."""


class BrokerRefused(BrokerUnavailable):
    """RabbitMQ refused the user, password or virtual host in AMQP_URL: a settings fault,
    not an outage (retried all the same, in case the broker's side is what gets fixed)."""


class PublishUnconfirmed(BrokerUnavailable):
    """RabbitMQ has not confirmed in time: the message may still be stored, or not.

    ``outcome`` resolves to True once RabbitMQ confirms it, False when it will not be.
    """

    def __init__(self, reason: str, outcome: asyncio.Future[bool]) -> None:
        super().__init__(reason)
        self.outcome = outcome


class DeliveryError(MailroomError):
    """Sending a mail failed. ``code`` is the SMTP reply code when there was one."""

    def __init__(self, reason: str, code: int | None = None) -> None:
        super().__init__(f"{code} {reason}" if code else reason)
        self.reason = reason
        self.code = code


class TransientDeliveryError(DeliveryError):
    """Worth trying again later: connection trouble, timeouts, TLS errors, SMTP 4xx."""


class PermanentDeliveryError(DeliveryError):
    """Trying again will not help: SMTP 5xx, every recipient refused, unbuildable mail."""


class SmtpConfigError(TransientDeliveryError):
    """The SMTP server and our settings do not fit (login, TLS, STARTTLS, AUTH): fix the
    settings. ``settings`` names the variables to check.

    Retried with backoff, never counted against the message.
    """

    SETTINGS: tuple[str, ...] = ("SMTP_USERNAME", "SMTP_PASSWORD", "SMTP_SECURITY")

    def __init__(
        self, reason: str, code: int | None = None, settings: tuple[str, ...] | None = None
    ) -> None:
        super().__init__(reason, code)
        self.settings = settings or self.SETTINGS


class SmtpAuthError(SmtpConfigError):
    """The SMTP server refused our login."""

    SETTINGS = ("SMTP_USERNAME", "SMTP_PASSWORD")
