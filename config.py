"""Settings: read once from the environment and `.env`, frozen, validated.

This is the only module that reads ``os.environ``. A missing or bad value raises
:class:`ConfigError` naming the variable; entry points turn that into a one-line
message and exit status 2. Secrets are kept in :class:`Secret` so they never show up
in a repr, a log line or a traceback.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import queue
import re
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from email.utils import getaddresses
from pathlib import Path
from typing import Literal, TypeVar
from urllib.parse import urlsplit

from dotenv import dotenv_values
from limits import parse_many

from errors import ConfigError

SmtpSecurity = Literal["ssl", "starttls", "none"]
QueueType = Literal["classic", "quorum"]
LogFormat = Literal["text", "json"]
_DEFAULT_SMTP_PORTS: dict[str, int] = {"ssl": 465, "starttls": 587, "none": 25}
# WORKER_PREFETCH's default, per SMTP transaction at once: the messages beyond those being
# sent wait for their record write or a connection, so one commit and one ack cover many
# (measured in bench/bench.py's drain: 1341 -> 1691 mails/s at concurrency 16, prefetch 16
# -> 64). 8 rather than 4 so that a worker rarely holds a full prefetch unless there is a
# backlog, which is when RabbitMQ hands messages to an overflow worker (WORKER_PRIORITY):
# three alternating bench runs each, 2026-12-06, with an overflow worker: keep-alive
# clients 987-1077 -> 1102-1142 mails/s, the overflow worker's share of their CPU
# 0.05-0.09 -> 0.00-0.01 ms per mail; a new connection per request and the batch endpoint
# the same within the noise.
PREFETCH_PER_SEND = 8
PRIORITY_RANGE = 100  # WORKER_PRIORITY from -100 to 100

T = TypeVar("T")


class Secret:
    """A string that does not show itself: ``repr`` and ``str`` print ``'**********'``."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)


def redact_url(url: str) -> str:
    """``amqp://user:pass@host/`` -> ``amqp://user:***@host/`` (safe to log).

    Plain string work, not a URL parser: a password with an unencoded ``#``, ``?`` or
    ``/`` must not slip through. ``password=`` query parameters are masked too.
    """
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest:
        userinfo, _, host = rest.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        rest = f"{user}:***@{host}" if colon else rest
    masked = f"{scheme}{sep}{rest}"
    return _PASSWORD_PARAM.sub(r"\1***", masked)


_PASSWORD_PARAM = re.compile(r"((?:^|[?&;])password=)[^&;]*", re.IGNORECASE)


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything the processes need. Build it with :meth:`from_env` (or directly in tests)."""

    amqp_url: Secret = field(default_factory=lambda: Secret("amqp://guest:guest@localhost:5672/"))
    queue_prefix: str = "mailroom"
    smtp_host: str | None = None
    smtp_port: int = 465
    smtp_security: SmtpSecurity = "ssl"
    smtp_username: str | None = None
    smtp_password: Secret | None = None
    smtp_timeout: float = 30.0
    smtp_ca_file: Path | None = None
    smtp_helo_name: str | None = None  # None: the machine's fully qualified name
    mail_from: str = "mailroom@localhost"
    talktome_log: Path = Path("var/log/messaging_system.log")
    outbox_dir: Path = Path("var/outbox")
    host: str = "127.0.0.1"
    port: int = 5000
    worker_concurrency: int = 16  # SMTP transactions at once (and connections in the pool)
    worker_prefetch: int = 0  # messages a worker holds at once; 0: 8 x worker_concurrency
    # RabbitMQ consumer priority: a worker gets messages only while every worker of a
    # higher one holds a full prefetch (launcher.py's overflow workers have one less).
    worker_priority: int = 0
    publish_timeout: float = 5.0
    connect_timeout: float = 5.0
    shutdown_grace: float = 30.0
    attempt_lease: float = 30.0
    log_level: str = "INFO"
    database_url: Secret = field(default_factory=lambda: Secret("sqlite:///var/mailroom.db"))
    message_retention_days: int = 30  # 0: message records are kept forever
    retry_delays: tuple[float, ...] = (30.0, 120.0, 600.0, 3600.0, 14400.0)
    queue_type: QueueType = "classic"
    delivery_limit: int = 20
    api_tokens: tuple[Secret, ...] = ()
    allow_loopback: bool = True
    trusted_proxy_hops: int = 0
    rate_limit_send: str = "20/minute;200/hour"
    rate_limit_global: str = "600/minute"
    rate_limit_recipient: str = "10/hour"
    rate_limit_talktome: str = "60/minute"
    rate_limit_exempt_loopback: bool = True
    rate_limit_storage: Secret = field(default_factory=lambda: Secret("memory://"))
    max_request_bytes: int = 10 * 1024 * 1024
    max_recipients: int = 50
    max_subject_chars: int = 998
    max_body_chars: int = 5_000_000
    # Issue 12: who may be a message's "from" (empty: MAIL_FROM only), attachment sizes,
    # and DKIM signing (all three DKIM_* or none).
    allowed_senders: tuple[str, ...] = ()
    max_attachment_bytes: int = 7 * 1024 * 1024
    dkim_domain: str | None = None
    dkim_selector: str | None = None
    dkim_private_key_file: Path | None = None

    def __post_init__(self) -> None:
        if self.worker_prefetch == 0:
            prefetch = PREFETCH_PER_SEND * self.worker_concurrency
            object.__setattr__(self, "worker_prefetch", prefetch)  # frozen: set once, here
        if self.worker_prefetch < self.worker_concurrency:
            raise ValueError("worker_prefetch must be at least worker_concurrency")
        if not -PRIORITY_RANGE <= self.worker_priority <= PRIORITY_RANGE:
            raise ValueError(
                f"worker_priority must be between {-PRIORITY_RANGE} and {PRIORITY_RANGE}"
            )

    @property
    def senders(self) -> tuple[str, ...]:
        """Who may be a message's "from": ALLOWED_SENDERS, else MAIL_FROM alone."""
        if self.allowed_senders:
            return self.allowed_senders
        return ((getaddresses([self.mail_from])[0][1] or self.mail_from).lower(),)

    metrics_public: bool = False
    worker_metrics_host: str = "127.0.0.1"
    worker_metrics_port: int | None = None  # None: the worker serves no metrics
    # Set (by the launcher) when several server processes count into one directory.
    prometheus_multiproc_dir: Path | None = None
    log_format: LogFormat = "text"
    # Issue 13: scheduled sends, the sandbox, the suppression list.
    max_schedule_days: int = 30
    sandbox: bool = False
    suppression_refresh: float = 5.0
    webhook_urls: tuple[str, ...] = ()
    webhook_secret: Secret | None = None
    webhook_timeout: float = 10.0
    webhook_concurrency: int = 4

    def __repr__(self) -> str:  # the URL carries a password: show it redacted
        shown = ", ".join(
            f"{name}={value!r}"
            for name, value in self.__dict__.items()
            if name not in ("amqp_url", "database_url", "rate_limit_storage", "webhook_urls")
        )
        return (
            f"Settings(amqp_url={redact_url(self.amqp_url.get())!r}, "
            f"database_url={redact_url(self.database_url.get())!r}, "
            f"rate_limit_storage={redact_url(self.rate_limit_storage.get())!r}, "
            f"webhook_urls={tuple(redact_url(u) for u in self.webhook_urls)!r}, {shown})"
        )

    @property
    def amqp_urls(self) -> tuple[str, ...]:
        """The brokers of ``AMQP_URL`` (a comma-separated list: a cluster's nodes)."""
        return tuple(part.strip() for part in self.amqp_url.get().split(",") if part.strip())

    @property
    def amqp_url_redacted(self) -> str:
        return ", ".join(redact_url(url) for url in self.amqp_urls)

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        env_file: str | Path | None = ".env",
    ) -> Settings:
        """Read settings; the process environment wins over ``env_file``."""
        values: dict[str, str] = {}
        if env_file is not None and Path(env_file).is_file():
            values.update({k: v for k, v in dotenv_values(env_file).items() if v is not None})
        values.update(os.environ if environ is None else environ)
        return _parse(values)


TEXT_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(settings: Settings) -> None:
    """For the entry points (server, worker): one line per event, at LOG_LEVEL; with
    ``LOG_FORMAT=json`` one JSON object per line (see :class:`JsonFormatter`).

    Lines are made where they are logged and written to stderr by a thread of their own
    (:class:`LineWriter`): the event loop never writes to a file."""
    quiet_amqp_libraries()
    if logging.getLogger().handlers:
        return  # configured already (basicConfig would change nothing either)
    # Nothing Mailroom logs names its caller's file, line, thread or process: not looking
    # them up saves about a third of what a line costs (the logging HOWTO, "Optimization").
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    formatter = (
        JsonFormatter() if settings.log_format == "json" else logging.Formatter(TEXT_LOG_FORMAT)
    )
    handler = LineWriter()
    handler.setFormatter(formatter)
    logging.basicConfig(level=settings.log_level, handlers=[handler])


def flush_logging() -> None:
    """Write every line logged so far (before something printed straight to stderr)."""
    for handler in logging.getLogger().handlers:
        handler.flush()


class LineWriter(logging.Handler):
    """A handler that formats each record where it is logged and leaves the writing to a
    thread: ``emit`` only queues the line. The thread writes every line queued, then
    pauses ``WRITE_PAUSE`` while more gather, so under load it wakes up (and takes the
    GIL) once per pause rather than once per line. A write gives up the GIL, and an
    event loop that did so while the store's writer thread ran waited up to the switch
    interval (5 ms) to get it back.

    Lines keep their order and stay whole: each write holds whole lines and at most
    ``PIPE_BUF`` bytes (one line longer than that alone), so that processes sharing one
    pipe (the launcher's children) do not tear each other's lines. Past ``MOST_QUEUED``
    lines (stderr cannot keep up) ``emit`` waits, as a direct write would. ``flush``
    waits until what was queued is written; ``close`` (logging's shutdown at exit) writes
    what is left, and lines logged after it, or after the thread ended, are written by
    their caller. Lost: the last ``WRITE_PAUSE`` of lines when the process is killed."""

    WRITE_PAUSE = 0.01
    MOST_QUEUED = 10_000
    PIPE_BUF = 4096  # POSIX: a pipe write of at most this many bytes is not interleaved

    def __init__(self) -> None:
        super().__init__()
        self._stream = sys.stderr
        self._lines: queue.SimpleQueue[str | threading.Event | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._write_lines, name="log-lines", daemon=True)
        self._thread.start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            if not self._thread.is_alive():
                self._write([line])
                return
            self._lines.put(line)
            while self._lines.qsize() > self.MOST_QUEUED and self._thread.is_alive():
                time.sleep(self.WRITE_PAUSE)
        except Exception:  # noqa: BLE001 - logging's own convention: report, never raise
            self.handleError(record)

    def flush(self) -> None:
        if self._thread.is_alive():
            written = threading.Event()
            self._lines.put(written)
            written.wait(timeout=5)

    def close(self) -> None:
        if self._thread.is_alive():
            self._lines.put(None)
            self._thread.join(timeout=5)
        self._write_items(self._take_queued([]))  # logged after the thread stopped
        super().close()

    def _write_lines(self) -> None:
        while self._write_items(self._take_queued([self._lines.get()])):
            time.sleep(self.WRITE_PAUSE)

    def _take_queued(
        self, items: list[str | threading.Event | None]
    ) -> list[str | threading.Event | None]:
        """``items`` and everything queued now."""
        with contextlib.suppress(queue.Empty):
            while True:
                items.append(self._lines.get_nowait())
        return items

    def _write_items(self, items: list[str | threading.Event | None]) -> bool:
        """Writes the lines among ``items`` in order, sets each flush's event once the
        lines before it are written; False once the end (None) was among them."""
        lines: list[str] = []
        going = True
        for item in items:
            if isinstance(item, str):
                lines.append(item)
                continue
            self._write(lines)
            lines = []
            if item is None:
                going = False
            else:
                item.set()
        self._write(lines)
        return going

    def _write(self, lines: list[str]) -> None:
        chunk: list[str] = []
        size = 0
        for line in lines:
            length = len(line.encode(errors="replace")) + 1
            if chunk and size + length > self.PIPE_BUF:
                self._write_chunk(chunk)
                chunk, size = [], 0
            chunk.append(line)
            size += length
        if chunk:
            self._write_chunk(chunk)

    def _write_chunk(self, lines: list[str]) -> None:
        try:
            self._stream.write("\n".join(lines) + "\n")
            self._stream.flush()
        except (OSError, ValueError, AttributeError):
            pass  # stderr is closed, broken or None: nowhere to say so; keep draining


# Connections that may wait for a server to accept them (the kernel caps it at
# net.core.somaxconn): the launcher's shared socket and every socket Hypercorn listens
# on. Hypercorn's own default is 100: a burst of more new connections than that, while
# the event loop is busy, has its SYNs dropped, and each of those clients waits a
# second for its retry.
LISTEN_BACKLOG = 1024

# Young objects between two collections of the youngest generation (CPython's default
# is 700): a mail's request, message and futures make a few hundred.
GC_YOUNG_THRESHOLD = 10_000


def configure_gc() -> None:
    """For the entry points, once set up and just before serving: the objects made so
    far (modules, classes, the app) are moved out of the collector's sight for good
    (``gc.freeze``), so a full collection no longer walks the 70-120 thousand of them
    (50 ms each time in the server), and the youngest generation is collected every
    GC_YOUNG_THRESHOLD allocations instead of 700. Measured with bench/bench.py (three
    runs each way): 6% less CPU per mail and 6% more mails/s with keep-alive clients,
    no change with a new connection per request; the peak RSS of server and worker in
    the full bench 3-4 MB higher (162 MB against 158-159)."""
    gc.collect()  # what is garbage by now is freed, not frozen with the rest
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and ``message_id`` when
    the event is about one message (a line that starts ``message <id>:``, or
    ``extra={"message_id": ...}``); an exception's traceback in ``exc_info``."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        message_id = getattr(record, "message_id", None)
        if (
            message_id is None
            and isinstance(record.msg, str)
            and record.msg.startswith("message %s")
            and isinstance(record.args, tuple)
            and record.args
        ):
            message_id = record.args[0]
        if message_id is not None:
            entry["message_id"] = str(message_id)
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class _OwnConnectLog(logging.Filter):
    """aiormq logs every failed connection attempt at ERROR; so does whoever made the
    attempt (broker.py, admin.py, or aio-pika's reconnect loop), saying more: keep one."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("error when creating transport")


def quiet_amqp_libraries() -> None:
    """aiormq and aio-pika log warnings and errors only, and each failed connection
    attempt once (see :class:`_OwnConnectLog`)."""
    logging.getLogger("aiormq").setLevel(logging.WARNING)
    logging.getLogger("aio_pika").setLevel(logging.WARNING)
    connection_log = logging.getLogger("aiormq.connection")
    if not any(isinstance(f, _OwnConnectLog) for f in connection_log.filters):
        connection_log.addFilter(_OwnConnectLog())


def _parse(env: Mapping[str, str]) -> Settings:
    def raw(name: str, *legacy: str) -> str | None:
        # The first name given at all counts: an empty SMTP_USERNAME= (in the environment,
        # say, over a .env account) means unset, whatever the old EMAIL_USERNAME says.
        for key in (name, *legacy):
            value = env.get(key)
            if value is not None:
                return value.strip() or None
        return None

    def conv(name: str, parse: Callable[[str], T], default: T, *legacy: str) -> T:
        value = raw(name, *legacy)
        if value is None:
            return default
        try:
            return parse(value)
        except ValueError as exc:
            raise ConfigError(name, f"{exc}") from None

    security: SmtpSecurity = conv("SMTP_SECURITY", _security, "ssl")
    username = raw("SMTP_USERNAME", "EMAIL_USERNAME")
    password = raw("SMTP_PASSWORD", "EMAIL_PASSWORD")
    if password is not None and username is None:
        raise ConfigError("SMTP_USERNAME", "required when SMTP_PASSWORD is set")
    if username is not None and password is None:
        raise ConfigError("SMTP_PASSWORD", "required when SMTP_USERNAME is set")
    mail_from = raw("MAIL_FROM") or (username if username and "@" in username else None)
    mail_from = mail_from or "mailroom@localhost"
    if any(c in mail_from for c in "\r\n\0") or "@" not in mail_from:
        raise ConfigError("MAIL_FROM", "must be one email address")
    ca_file = raw("SMTP_CA_FILE")
    if ca_file is not None and not Path(ca_file).is_file():
        raise ConfigError("SMTP_CA_FILE", f"no such file: {ca_file}")
    dkim = _dkim(raw)
    webhook_urls: tuple[str, ...] = conv("WEBHOOK_URLS", _webhook_urls, ())
    webhook_secret = raw("WEBHOOK_SECRET")
    if webhook_urls and webhook_secret is None:
        raise ConfigError("WEBHOOK_SECRET", "required when WEBHOOK_URLS is set")
    if webhook_secret is not None and len(webhook_secret) < 16:
        raise ConfigError("WEBHOOK_SECRET", "must be at least 16 characters")
    concurrency = conv("WORKER_CONCURRENCY", _size(1, 1000), 16)
    prefetch = conv("WORKER_PREFETCH", _size(1, 10_000), 0)  # 0: Settings derives it
    if 0 < prefetch < concurrency:
        at_least = f"must be at least WORKER_CONCURRENCY ({concurrency})"
        raise ConfigError("WORKER_PREFETCH", f"{at_least}, not {prefetch}")
    return Settings(
        amqp_url=Secret(conv("AMQP_URL", _amqp_url, "amqp://guest:guest@localhost:5672/")),
        queue_prefix=conv("QUEUE_PREFIX", _name, "mailroom"),
        smtp_host=raw("SMTP_HOST"),
        smtp_port=conv("SMTP_PORT", _port, _DEFAULT_SMTP_PORTS[security]),
        smtp_security=security,
        smtp_username=username,
        smtp_password=Secret(password) if password is not None else None,
        smtp_timeout=conv("SMTP_TIMEOUT", _positive_float, 30.0),
        smtp_ca_file=Path(ca_file) if ca_file else None,
        smtp_helo_name=conv("SMTP_HELO_NAME", _helo_name, None),
        mail_from=mail_from,
        talktome_log=Path(raw("TALKTOME_LOG") or "var/log/messaging_system.log"),
        outbox_dir=Path(raw("OUTBOX_DIR") or "var/outbox"),
        host=raw("HOST") or "127.0.0.1",
        port=conv("PORT", _port, 5000),
        worker_concurrency=concurrency,
        worker_prefetch=prefetch,
        worker_priority=conv("WORKER_PRIORITY", _size(-PRIORITY_RANGE, PRIORITY_RANGE), 0),
        publish_timeout=conv("PUBLISH_TIMEOUT", _positive_float, 5.0),
        connect_timeout=conv("CONNECT_TIMEOUT", _positive_float, 5.0),
        shutdown_grace=conv("SHUTDOWN_GRACE", _positive_float, 30.0),
        attempt_lease=conv("ATTEMPT_LEASE", _lease, 30.0),
        log_level=conv("LOG_LEVEL", _log_level, "INFO"),
        database_url=Secret(conv("DATABASE_URL", _database_url, "sqlite:///var/mailroom.db")),
        message_retention_days=conv("MESSAGE_RETENTION_DAYS", _retention, 30),
        retry_delays=conv("RETRY_DELAYS", _delays, (30.0, 120.0, 600.0, 3600.0, 14400.0)),
        queue_type=conv("QUEUE_TYPE", _queue_type, "classic"),
        delivery_limit=conv("DELIVERY_LIMIT", _size(1, 1000), 20),
        api_tokens=conv("API_TOKEN", _tokens, ()),
        allow_loopback=conv("ALLOW_LOOPBACK", _bool, True),
        trusted_proxy_hops=conv("TRUSTED_PROXY_HOPS", _size(0, 10), 0),
        rate_limit_send=conv("RATE_LIMIT_SEND", _rate, "20/minute;200/hour"),
        rate_limit_global=conv("RATE_LIMIT_GLOBAL", _rate, "600/minute"),
        rate_limit_recipient=conv("RATE_LIMIT_RECIPIENT", _rate, "10/hour"),
        rate_limit_talktome=conv("RATE_LIMIT_TALKTOME", _rate, "60/minute"),
        rate_limit_exempt_loopback=conv("RATE_LIMIT_EXEMPT_LOOPBACK", _bool, True),
        rate_limit_storage=Secret(conv("RATE_LIMIT_STORAGE", _rate_storage, "memory://")),
        max_request_bytes=conv("MAX_REQUEST_BYTES", _size(1024, 1024**3), 10 * 1024 * 1024),
        max_recipients=conv("MAX_RECIPIENTS", _size(1, 10_000), 50),
        max_subject_chars=conv("MAX_SUBJECT_CHARS", _size(1, 100_000), 998),
        max_body_chars=conv("MAX_BODY_CHARS", _size(1, 1024**3), 5_000_000),
        allowed_senders=conv("ALLOWED_SENDERS", _senders, ()),
        max_attachment_bytes=conv(
            "MAX_ATTACHMENT_BYTES", _size(0, 100 * 1024 * 1024), 7 * 1024 * 1024
        ),
        dkim_domain=dkim[0],
        dkim_selector=dkim[1],
        dkim_private_key_file=dkim[2],
        metrics_public=conv("METRICS_PUBLIC", _bool, False),
        worker_metrics_host=raw("WORKER_METRICS_HOST") or "127.0.0.1",
        worker_metrics_port=conv("WORKER_METRICS_PORT", _optional_port, None),
        prometheus_multiproc_dir=conv("PROMETHEUS_MULTIPROC_DIR", _directory, None),
        log_format=conv("LOG_FORMAT", _log_format, "text"),
        max_schedule_days=conv("MAX_SCHEDULE_DAYS", _size(1, 365), 30),
        sandbox=conv("SANDBOX", _bool, False),
        suppression_refresh=conv("SUPPRESSION_REFRESH", _positive_float, 5.0),
        webhook_urls=webhook_urls,
        webhook_secret=Secret(webhook_secret) if webhook_secret else None,
        webhook_timeout=conv("WEBHOOK_TIMEOUT", _positive_float, 10.0),
        webhook_concurrency=conv("WEBHOOK_CONCURRENCY", _size(1, 1000), 4),
    )


def _security(value: str) -> SmtpSecurity:
    lowered = value.lower()
    if lowered == "ssl":
        return "ssl"
    if lowered == "starttls":
        return "starttls"
    if lowered == "none":
        return "none"
    raise ValueError(f"must be ssl, starttls or none, not {value!r}")


# RFC 5321 4.1.1.1: EHLO takes a domain name or an address literal ([192.0.2.1]).
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HELO_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*|\[(?:IPv6:)?[0-9A-Fa-f:.]+\]")


def _helo_name(value: str) -> str:
    if len(value) > 253 or not _HELO_NAME.fullmatch(value):
        raise ValueError(
            "must be a host name (letters, digits, '-' and '.'; an internationalized name "
            f"in its xn-- form) or an address literal like [192.0.2.1], not {value!r}"
        )
    return value


def _whole(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"must be a whole number, not {value!r}") from None


def _port(value: str) -> int:
    port = _whole(value)
    if not 0 < port < 65536:
        raise ValueError(f"must be a TCP port (1-65535), not {value}")
    return port


def _optional_port(value: str) -> int | None:
    """A TCP port, or 0 for none."""
    return None if _whole(value) == 0 else _port(value)


def _directory(value: str) -> Path:
    path = Path(value)
    if not path.is_dir():
        raise ValueError(f"no such directory: {value}")
    return path


def _log_format(value: str) -> LogFormat:
    lowered = value.lower()
    if lowered == "text":
        return "text"
    if lowered == "json":
        return "json"
    raise ValueError(f"must be text or json, not {value!r}")


def _positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"must be a number of seconds, not {value!r}") from None
    if not number > 0:
        raise ValueError(f"must be a positive number of seconds, not {value}")
    return number


def _lease(value: str) -> float:
    seconds = _positive_float(value)
    if not 1 <= seconds <= 3600:
        raise ValueError(f"must be between 1 and 3600 seconds, not {value!r}")
    return seconds


def _amqp_url(value: str) -> str:
    """One URL, or several separated by commas (tried in turn)."""
    urls = [part.strip() for part in value.split(",")]
    if not all(urls):
        raise ValueError("has an empty entry in its comma-separated list")
    for url in urls:
        _one_amqp_url(url)
    return value


def _one_amqp_url(value: str) -> str:
    parts = urlsplit(value)
    try:
        parts.port  # noqa: B018 - raises on a malformed authority
    except ValueError:
        raise ValueError(
            "has a malformed host:port (percent-encode #, ?, / or @ in the password)"
        ) from None
    if parts.scheme not in ("amqp", "amqps") or not parts.hostname:
        raise ValueError("must look like amqp://user:password@host:5672/vhost")
    return value


def _name(value: str) -> str:
    if not value.replace(".", "").replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"may hold only letters, digits, '.', '-' and '_', not {value!r}")
    return value


def _database_url(value: str) -> str:
    scheme = value.split(":", 1)[0].lower()
    if scheme not in ("sqlite", "sqlite+aiosqlite", "postgresql", "postgres", "postgresql+asyncpg"):
        raise ValueError("must be sqlite:///path/to/file.db or postgresql://user@host/db")
    return value


def _retention(value: str) -> int:
    days = _whole(value)
    if not 0 <= days <= 36500:
        raise ValueError(
            f"must be a number of days from 1 to 36500, or 0 to keep forever, not {value}"
        )
    return days


def _delays(value: str) -> tuple[float, ...]:
    try:
        delays = tuple(float(part) for part in value.split(","))
    except ValueError:
        raise ValueError(
            f"must be comma-separated seconds like 30,120,600, not {value!r}"
        ) from None
    if not delays or any(not d > 0 for d in delays) or len(set(delays)) != len(delays):
        raise ValueError(f"must be distinct positive seconds, not {value!r}")
    return delays


_LOOPBACK_HOSTS = ("localhost", "::1")


def _webhook_urls(value: str) -> tuple[str, ...]:
    urls = tuple(part.strip() for part in value.split(",") if part.strip())
    for url in urls:
        parts = urlsplit(url)
        try:
            parts.port  # noqa: B018 - raises on a malformed port
        except ValueError:
            raise ValueError(f"has a malformed port: {redact_url(url)!r}") from None
        host = parts.hostname or ""
        loopback = host in _LOOPBACK_HOSTS or host.startswith("127.")
        if not host or parts.scheme not in ("https", "http"):
            raise ValueError(f"each must be an https:// URL, not {redact_url(url)!r}")
        if parts.scheme == "http" and not loopback:
            raise ValueError(
                f"http:// is allowed only for loopback receivers (use https): {redact_url(url)!r}"
            )
    return urls


def _queue_type(value: str) -> QueueType:
    lowered = value.lower()
    if lowered == "classic":
        return "classic"
    if lowered == "quorum":
        return "quorum"
    raise ValueError(f"must be classic or quorum, not {value!r}")


def _tokens(value: str) -> tuple[Secret, ...]:
    tokens = tuple(part.strip() for part in value.split(",") if part.strip())
    if not tokens:
        raise ValueError("must hold at least one token")
    for token in tokens:
        if len(token) < 16 or not token.isascii() or not token.isprintable() or " " in token:
            # Never echo the value: it is a secret, even when it is a bad one.
            raise ValueError(
                "each token must be at least 16 printable ASCII characters without spaces "
                "(make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))')"
            )
    return tuple(Secret(t) for t in tokens)


def _bool(value: str) -> bool:
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"must be true or false, not {value!r}")


def _rate(value: str) -> str:
    try:
        parse_many(value)
    except ValueError:
        raise ValueError(
            f"must be rates like '20/minute' or '20/minute;200/hour', not {value!r}"
        ) from None
    return value


def _rate_storage(value: str) -> str:
    if value == "memory://" or value.startswith(("redis://", "rediss://")):
        return value
    raise ValueError("must be memory:// or redis://host:6379/0")


def _size(low: int, high: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        number = _whole(value)
        if not low <= number <= high:
            raise ValueError(f"must be between {low} and {high}, not {value}")
        return number

    return parse


def _log_level(value: str) -> str:
    upper = value.upper()
    if upper not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError(f"must be DEBUG, INFO, WARNING, ERROR or CRITICAL, not {value!r}")
    return upper


def _senders(value: str) -> tuple[str, ...]:
    """ALLOWED_SENDERS: comma-separated addresses and @domain entries."""
    entries = [e.strip().lower() for e in value.split(",") if e.strip()]
    for entry in entries:
        _, at, domain = entry.rpartition("@")
        bad_domain = not domain or ("." not in domain and domain != "localhost")
        if not at or bad_domain or any(c.isspace() or c in '<>,;"' for c in entry):
            raise ValueError(
                f"must be addresses and @domain entries, comma-separated, not {entry!r}"
            )
    return tuple(entries)


def _dkim(raw: Callable[[str], str | None]) -> tuple[str | None, str | None, Path | None]:
    """DKIM_DOMAIN, DKIM_SELECTOR and DKIM_PRIVATE_KEY_FILE: all three, or none. The key
    itself is loaded and checked by the worker at start (mailer.DkimSigner)."""
    names = ("DKIM_DOMAIN", "DKIM_SELECTOR", "DKIM_PRIVATE_KEY_FILE")
    values = {name: raw(name) for name in names}
    given = [name for name in names if values[name] is not None]
    if not given:
        return None, None, None
    missing = [name for name in names if values[name] is None]
    if missing:
        raise ConfigError(missing[0], f"required when {given[0]} is set")
    domain, selector, key_file = (values[name] or "" for name in names)
    if not re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?", domain):
        raise ConfigError("DKIM_DOMAIN", f"must be a domain name, not {domain!r}")
    if not re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,61}[A-Za-z0-9])?", selector):
        raise ConfigError("DKIM_SELECTOR", f"must be a DNS label, not {selector!r}")
    if not Path(key_file).is_file():
        raise ConfigError("DKIM_PRIVATE_KEY_FILE", f"no such file: {key_file}")
    return domain.lower(), selector, Path(key_file)
