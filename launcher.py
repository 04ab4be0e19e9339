"""Run all of Mailroom on one machine: worker, server and, without SMTP_HOST, devsmtp.

``python launcher.py`` (what ``scripts/run.sh`` ends with) starts each piece as a child
process of this interpreter, waits until the server answers ``GET /readyz``, prints the
URLs to try, and supervises: on Ctrl-C or SIGTERM it stops the children (SIGTERM, then
SIGKILL after a bounded wait) and exits 0; if a child dies on its own it stops the
others and exits 1. A second Ctrl-C kills the children at once.

When ``SMTP_HOST`` is not set, ``devsmtp.py`` is started on a free loopback port and the
worker is pointed at it, so every mail lands in ``var/outbox/`` as an ``.eml`` file.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from config import Settings
from errors import ConfigError

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
READY_TIMEOUT = 60.0
DEVSMTP_TIMEOUT = 15.0
POLL_INTERVAL = 0.25
PROBE_TIMEOUT = 2.0  # one connection attempt or HTTP request
# Beyond SHUTDOWN_GRACE (the worker's drain time) before a child is killed.
STOP_MARGIN = 15.0
SMTP_CREDENTIALS = ("SMTP_USERNAME", "SMTP_PASSWORD", "EMAIL_USERNAME", "EMAIL_PASSWORD")


@dataclass
class Child:
    name: str
    process: asyncio.subprocess.Process

    @property
    def running(self) -> bool:
        return self.process.returncode is None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def connect_host(host: str) -> str:
    """Where to connect to reach a server bound to ``host`` (wildcards -> loopback)."""
    if host in ("", "0.0.0.0"):  # noqa: S104 - a comparison, not a bind
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


async def port_open(host: str, port: int) -> bool:
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            _, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def http_get(host: str, port: int, path: str) -> tuple[int, bytes] | None:
    """(status, body) of ``GET path`` over one plain HTTP/1.1 connection, or None when
    there is no HTTP answer within PROBE_TIMEOUT."""
    request = f"GET {path} HTTP/1.1\r\nHost: {url_host(host)}:{port}\r\nConnection: close\r\n\r\n"
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(request.encode("ascii"))
                await writer.drain()
                return await _read_answer(reader)
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError):
        return None


async def _read_answer(reader: asyncio.StreamReader) -> tuple[int, bytes] | None:
    """The status and body of an HTTP/1.1 answer (Content-Length, chunked, or until EOF)."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    status_line, *header_lines = head.split("\r\n")
    parts = status_line.split()
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        return None
    headers = {
        name.strip().lower(): value.strip()
        for name, _, value in (line.partition(":") for line in header_lines if line)
    }
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            body += await reader.readexactly(size)
            await reader.readexactly(2)
    elif "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    else:
        body = await reader.read()
    return int(parts[1]), body


async def http_status(host: str, port: int, path: str) -> int | None:
    """The status code of ``GET path``, or None when there is no HTTP answer."""
    answer = await http_get(host, port, path)
    return None if answer is None else answer[0]


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


class Launcher:
    def __init__(self, settings: Settings, ready_timeout: float) -> None:
        self.settings = settings
        self.ready_timeout = ready_timeout
        self.children: list[Child] = []
        self.devsmtp_port: int | None = None
        self._stop = asyncio.Event()
        self._signals = 0

    def _on_signal(self, signum: int) -> None:
        self._signals += 1
        name = signal.Signals(signum).name
        if self._signals == 1:
            log.info("%s received: stopping", name)
            self._stop.set()
            return
        log.warning("%s received again: killing the children", name)
        for child in self.children:
            if child.running:
                with contextlib.suppress(ProcessLookupError):
                    child.process.kill()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            return await self._run()
        finally:
            await self._stop_children()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    async def _run(self) -> int:
        s = self.settings
        host = connect_host(s.host)
        if await port_open(host, s.port):
            log.error(
                "something already listens on %s:%d; stop it or choose another PORT",
                host,
                s.port,
            )
            return 1
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        worker_env = dict(env)
        if s.smtp_host is None:
            status = await self._start_devsmtp(env)
            if status is not None:
                return status
            assert self.devsmtp_port is not None
            worker_env.update(self._devsmtp_env(self.devsmtp_port))
        await self._spawn("worker", [str(HERE / "worker.py")], worker_env)
        await self._spawn("server", [str(HERE / "server.py")], env)

        async def ready() -> bool:
            return await http_status(host, s.port, "/readyz") == 200

        status = await self._wait_for(
            f"the server to answer GET /readyz on {host}:{s.port}",
            ready,
            self.ready_timeout,
            hint=(
                f"is RabbitMQ running at {s.amqp_url_redacted} (scripts/ensure-rabbitmq.sh), "
                "and does it accept the user, password and virtual host in AMQP_URL? "
                "The server's log above says which."
            ),
        )
        if status is not None:
            return status
        self._print_banner(f"http://{url_host(host)}:{s.port}")
        return await self._supervise()

    def _devsmtp_env(self, port: int) -> dict[str, str]:
        """Point the worker at devsmtp; the environment wins over .env (see config.py)."""
        s = self.settings
        if s.smtp_username is not None:
            log.warning("SMTP_USERNAME is set but SMTP_HOST is not: using the local devsmtp")
        env = {
            "SMTP_HOST": "127.0.0.1",
            "SMTP_PORT": str(port),
            "SMTP_SECURITY": "none",
            "SMTP_CA_FILE": "",
            # devsmtp takes no login; MAIL_FROM may have come from the username.
            "MAIL_FROM": s.mail_from,
        }
        env.update(dict.fromkeys(SMTP_CREDENTIALS, ""))
        return env

    async def _start_devsmtp(self, env: dict[str, str]) -> int | None:
        port = free_port()
        self.devsmtp_port = port
        args = [str(HERE / "devsmtp.py"), "--host", "127.0.0.1", "--port", str(port)]
        await self._spawn("devsmtp", [*args, "--outbox", str(self.settings.outbox_dir)], env)

        async def listening() -> bool:
            return await port_open("127.0.0.1", port)

        return await self._wait_for(
            f"devsmtp to listen on 127.0.0.1:{port}", listening, DEVSMTP_TIMEOUT
        )

    async def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> Child:
        # A process group of its own: a terminal's Ctrl-C reaches only the launcher,
        # which then stops the children in order (server and worker before devsmtp).
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            *args,
            env=env,
            stdin=subprocess.DEVNULL,
            process_group=0,
        )
        log.info("started %s (pid %d)", name, process.pid)
        child = Child(name, process)
        self.children.append(child)
        return child

    def _dead_child(self) -> Child | None:
        return next((c for c in self.children if not c.running), None)

    async def _wait_for(
        self,
        what: str,
        check: Callable[[], Awaitable[bool]],
        limit: float,
        hint: str = "",
    ) -> int | None:
        """Poll ``check`` until it holds (None); else the exit status to return."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        while True:
            if self._stop.is_set():
                return 0
            dead = self._dead_child()
            if dead is not None:
                assert dead.process.returncode is not None
                log.error(
                    "%s exited (%s) while waiting for %s",
                    dead.name,
                    describe_exit(dead.process.returncode),
                    what,
                )
                return 1
            if await check():
                return None
            if loop.time() >= deadline:
                log.error("gave up after %gs waiting for %s", limit, what)
                if hint:
                    log.error("%s", hint)
                return 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), POLL_INTERVAL)

    async def _supervise(self) -> int:
        """Wait for a stop signal (-> 0) or for a child to die (-> 1)."""
        stop = asyncio.ensure_future(self._stop.wait())
        exits = {asyncio.ensure_future(c.process.wait()): c for c in self.children}
        try:
            done, _ = await asyncio.wait({stop, *exits}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for future in (stop, *exits):
                future.cancel()
        if stop in done:
            return 0
        for future in done:
            child = exits[future]
            assert child.process.returncode is not None
            log.error(
                "%s exited unexpectedly (%s); stopping the others",
                child.name,
                describe_exit(child.process.returncode),
            )
        return 1

    async def _stop_children(self) -> None:
        grace = self.settings.shutdown_grace + STOP_MARGIN
        first = [c for c in self.children if c.name != "devsmtp"]
        last = [c for c in self.children if c.name == "devsmtp"]
        await self._terminate(first, grace)
        await self._terminate(last, STOP_MARGIN)

    async def _terminate(self, children: list[Child], grace: float) -> None:
        for child in children:
            if child.running:
                with contextlib.suppress(ProcessLookupError):
                    child.process.terminate()
        try:
            async with asyncio.timeout(grace):
                await asyncio.gather(*(c.process.wait() for c in children))
        except TimeoutError:
            for child in children:
                if child.running:
                    log.warning("%s did not stop within %gs: killing it", child.name, grace)
                    with contextlib.suppress(ProcessLookupError):
                        child.process.kill()
            await asyncio.gather(*(c.process.wait() for c in children))
        for child in children:
            assert child.process.returncode is not None
            log.info("%s stopped (%s)", child.name, describe_exit(child.process.returncode))

    def _print_banner(self, base: str) -> None:
        s = self.settings
        if self.devsmtp_port is not None:
            mail = (
                f"Mail is captured, not sent: {s.outbox_dir.resolve()}/*.eml\n"
                f"  (local devsmtp on 127.0.0.1:{self.devsmtp_port}; set SMTP_HOST to send)"
            )
        else:
            mail = f"Mail goes out via {s.smtp_host}:{s.smtp_port} ({s.smtp_security})"
        print(
            f"\nMailroom is running at {base}/\n"
            "  (open it in a browser: send a mail, watch its status, the dead letters"
            f"{' and the outbox' if self.devsmtp_port is not None else ''})\n\n"
            "Try:\n"
            f'  curl "{base}/?talktome"\n'
            f'  curl "{base}/?sendmail=email@example.com"\n\n'
            f"talktome log: {s.talktome_log.resolve()}\n"
            f"{mail}\n"
            f"Dead letters: queue {s.queue_prefix}.dead in RabbitMQ\n\n"
            "Press Ctrl-C to stop.\n",
            flush=True,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--ready-timeout",
        type=float,
        default=READY_TIMEOUT,
        help=f"seconds to wait for GET /readyz to answer 200 (default {READY_TIMEOUT:g})",
    )
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"launcher: configuration error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s launcher: %(message)s",
    )
    for directory in (settings.talktome_log.parent, settings.outbox_dir):
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            print(f"launcher: cannot create {directory}: {exc.strerror}", file=sys.stderr)
            return 2
    return asyncio.run(Launcher(settings, args.ready_timeout).run())


if __name__ == "__main__":
    sys.exit(main())
