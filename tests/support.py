"""Real test peers: an in-process aiosmtpd server, a TCP proxy we can cut, helpers."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import subprocess
import sys
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any, Literal

import aio_pika
import httpx
from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Envelope, LoginPassword, Session
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

import store as store_module
from broker import Broker
from errors import BrokerUnavailable

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
ROOT = Path(__file__).resolve().parent.parent
SMTP_USER = "mailer"
SMTP_PASS = "s3cret-Passw0rd!"

Security = Literal["none", "ssl", "starttls"]


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    login: str | None
    peer: Any
    helo: str | None = None  # the name the client gave in EHLO (HELO)

    @property
    def message(self) -> EmailMessage:
        msg = message_from_bytes(self.data.replace(b"\r\n", b"\n"), policy=policy.default)
        assert isinstance(msg, EmailMessage)
        return msg


# A hook may answer instead of storing: return an SMTP reply like "451 try later".
DataHook = Callable[[Envelope], Awaitable[str | None]]
RcptHook = Callable[[str], Awaitable[str | None]]


@dataclass
class SmtpRecorder:
    """aiosmtpd handler that records every accepted mail and wakes waiters."""

    received: list[Received] = field(default_factory=list)
    connections: int = 0
    logins: list[tuple[str, bool]] = field(default_factory=list)  # (mechanism, accepted)
    quits: int = 0
    on_data: DataHook | None = None
    on_rcpt: RcptHook | None = None
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def handle_QUIT(self, server: SMTP, session: Session, envelope: Envelope) -> Any:
        self.quits += 1
        return MISSING  # aiosmtpd answers as usual

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self.on_rcpt is not None:
            answer = await self.on_rcpt(address)
            if answer is not None:
                return answer
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.on_data is not None:
            answer = await self.on_data(envelope)
            if answer is not None:
                return answer
        login = session.auth_data.login.decode() if session.auth_data else None
        item = Received(
            mail_from=str(envelope.mail_from),
            rcpt_tos=list(envelope.rcpt_tos),
            data=bytes(envelope.original_content or b""),
            login=login,
            peer=session.peer,
            helo=session.host_name,
        )
        async with self._changed:
            self.received.append(item)
            self._changed.notify_all()
        return "250 OK queued"

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        """Wait until at least ``count`` mails arrived; return them."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: len(self.received) >= count)
        return list(self.received)


def _authenticator(
    server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
) -> AuthResult:
    ok = (
        isinstance(auth_data, LoginPassword)
        and auth_data.login == SMTP_USER.encode()
        and auth_data.password == SMTP_PASS.encode()
    )
    return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)


@dataclass
class SmtpServer:
    host: str
    port: int
    security: Security
    recorder: SmtpRecorder
    server: asyncio.Server

    def settings_overrides(self, ca_file: str | None, login: bool = True) -> dict[str, Any]:
        from config import Secret

        out: dict[str, Any] = {
            "smtp_host": self.host,
            "smtp_port": self.port,
            "smtp_security": self.security,
        }
        if ca_file:
            out["smtp_ca_file"] = Path(ca_file)
        if login:
            out["smtp_username"] = SMTP_USER
            out["smtp_password"] = Secret(SMTP_PASS)
        return out


class NoEhloSmtp(SMTP):
    """An old server: EHLO is not a command it knows (HELO is)."""

    async def smtp_EHLO(self, hostname: str) -> None:
        await self.push("502 5.5.2 Error: command not recognized")


async def start_no_ehlo(recorder: SmtpRecorder) -> tuple[asyncio.Server, int]:
    """A :class:`NoEhloSmtp` server on a free loopback port, and the port."""
    server = await asyncio.get_running_loop().create_server(
        lambda: NoEhloSmtp(recorder), "127.0.0.1", 0
    )
    return server, server.sockets[0].getsockname()[1]


async def start_smtp(
    security: Security,
    tls: ssl.SSLContext | None,
    auth: bool = True,
    recorder: SmtpRecorder | None = None,
) -> SmtpServer:
    recorder = recorder or SmtpRecorder()

    def authenticator(
        server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        result = _authenticator(server, session, envelope, mechanism, auth_data)
        recorder.logins.append((mechanism, result.success))
        return result

    def factory() -> SMTP:
        recorder.connections += 1
        with warnings.catch_warnings():
            # "Requiring AUTH while not requiring TLS": deliberate for the plain test server.
            warnings.simplefilter("ignore", UserWarning)
            return SMTP(
                recorder,
                hostname="smtp.test",
                tls_context=tls if security == "starttls" else None,
                require_starttls=security == "starttls",
                authenticator=authenticator if auth else None,
                auth_required=auth,
                # implicit TLS is invisible to aiosmtpd here: it would hide AUTH
                auth_require_tls=security == "starttls",
                enable_SMTPUTF8=True,
            )

    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        factory, "127.0.0.1", 0, ssl=tls if security == "ssl" else None
    )
    port = server.sockets[0].getsockname()[1]
    return SmtpServer("127.0.0.1", port, security, recorder, server)


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class TcpProxy:
    """A loopback TCP proxy we control: cut every connection, or refuse new ones."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.server: asyncio.Server | None = None
        self.port = 0
        self.accepting = True
        self.frozen = False
        self._pipes: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> TcpProxy:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.accepting:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))
        tasks = [
            asyncio.create_task(self._upstream(reader, up_writer)),
            asyncio.create_task(self._pipe(up_reader, writer)),
        ]
        self._pipes.update(tasks)
        await asyncio.wait(tasks)
        self._pipes.difference_update(tasks)

    async def _upstream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Client to server (a subclass may meter or drop what goes up)."""
        await self._pipe(reader, writer)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                while self.frozen:
                    await asyncio.sleep(0.05)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            self._writers.discard(writer)

    def cut(self) -> None:
        """Drop every open connection (as a network failure would)."""
        for writer in list(self._writers):
            with contextlib.suppress(OSError, RuntimeError):
                transport = writer.transport
                sock = transport.get_extra_info("socket")
                if sock is not None:
                    # RST rather than FIN: the peer sees an abrupt failure.
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
                transport.abort()
        self._writers.clear()

    async def close(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        for task in list(self._pipes):
            task.cancel()


def rabbitmqctl(*args: str) -> str:
    """Run ``rabbitmqctl -q ARGS`` (blocking: from async code use asyncio.to_thread)."""
    done = subprocess.run(
        ["rabbitmqctl", "-q", *args], check=True, capture_output=True, text=True, timeout=60
    )
    return done.stdout


async def queue_depth(queue_name: str, url: str = AMQP_URL) -> int:
    """Messages ready in ``queue_name`` (declared passively)."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name, passive=True)
        count = queue.declaration_result.message_count
        assert count is not None
        return count


async def get_messages(queue_name: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Take (and ack) every message currently in ``queue_name``."""
    out = []
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name, passive=True)
        while (message := await queue.get(fail=False, timeout=5)) is not None:
            await message.ack()
            out.append(message)
    return out


Proc = asyncio.subprocess.Process


def child_env(prefix: str, **extra: str | float | Path) -> dict[str, str]:
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "AMQP_URL": AMQP_URL,
        "QUEUE_PREFIX": prefix,
        "LOG_LEVEL": "INFO",
    }
    env.update({k: str(v) for k, v in extra.items()})
    return env


def worker_env(
    prefix: str, settings: Any, smtp_port: int, **extra: str | float | Path
) -> dict[str, str]:
    """For ``python worker.py``: ``settings``' queues, database and retry tiers, sending to a
    plain SMTP server on 127.0.0.1:``smtp_port``."""
    return child_env(
        prefix,
        SMTP_HOST="127.0.0.1",
        SMTP_PORT=smtp_port,
        SMTP_SECURITY="none",
        DATABASE_URL=settings.database_url.get(),
        RETRY_DELAYS=",".join(str(d) for d in settings.retry_delays),
        **extra,
    )


async def spawn(
    script: str, cwd: Path, env: dict[str, str], *args: str, pass_fds: tuple[int, ...] = ()
) -> Proc:
    """``python script.py ARGS`` (or ``python -m module ARGS``) from this repository."""
    program = [str(ROOT / script)] if script.endswith(".py") else ["-m", script]
    return await spawn_argv([sys.executable, *program, *args], cwd, env, pass_fds)


async def spawn_argv(
    argv: list[str], cwd: Path, env: dict[str, str], pass_fds: tuple[int, ...] = ()
) -> Proc:
    """Any command, output (stdout and stderr) to a pipe, in a process group of its own;
    ``pass_fds``: file descriptors it inherits (a listening socket, say)."""
    return await asyncio.create_subprocess_exec(
        *argv,
        cwd=cwd,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,  # its own process group, so teardown can end all of it
        pass_fds=pass_fds,
    )


async def finish(proc: Proc, timeout: float = 20) -> tuple[int, str]:
    assert proc.stdout is not None
    out = await asyncio.wait_for(proc.stdout.read(), timeout)
    await asyncio.wait_for(proc.wait(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def wait_http(url: str, proc: Proc, timeout: float = 20) -> None:
    async with httpx.AsyncClient() as client, asyncio.timeout(timeout):
        while True:
            if proc.returncode is not None:
                raise AssertionError(f"process exited: {await finish(proc)}")
            try:
                if (await client.get(url)).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def db_connection(
    store: store_module.Store, *, begin: bool = False
) -> AsyncIterator[AsyncConnection]:
    """A connection of the test's own to ``store``'s database, set up as the store sets
    up its read connections (in a transaction that commits with ``begin``)."""
    engine = create_async_engine(store.url)
    if store.dialect == "sqlite":
        event.listen(engine.sync_engine, "connect", store_module._sqlite_connect)
        event.listen(engine.sync_engine, "begin", store_module._sqlite_begin)
    try:
        async with engine.begin() if begin else engine.connect() as conn:
            yield conn
    finally:
        await engine.dispose()


@contextlib.asynccontextmanager
async def connected_broker(settings: Any, name: str, **options: Any) -> AsyncIterator[Broker]:
    """A :class:`broker.Broker` of ``settings``, started and connected (within 10 s), closed
    afterwards."""
    broker = Broker(settings, name, **options)
    await broker.start()
    try:
        async with asyncio.timeout(10):
            await broker.wait_connected()
        yield broker
    finally:
        await broker.close()


async def publish_eventually(broker: Broker, message_id: str, within: float = 10.0) -> None:
    """Publish ``{}`` as ``message_id`` through ``broker``, again while it raises
    ``BrokerUnavailable`` (a fresh channel on its way, a slot not yet free), for at most
    ``within`` seconds."""
    async with asyncio.timeout(within):
        while True:
            try:
                await broker.publish(b"{}", message_id)
                return
            except BrokerUnavailable:
                await asyncio.sleep(0.1)
