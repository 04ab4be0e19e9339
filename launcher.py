"""Run all of Mailroom on one machine: workers, servers and, without SMTP_HOST, devsmtp.

``python launcher.py [--workers N] [--servers N] [--overflow-workers N]`` (what
``scripts/run.sh`` ends with)
starts each piece as a child process of this interpreter, waits until every server
answers ``GET /readyz``, prints the URLs to try, and supervises: on Ctrl-C or SIGTERM it
stops the children (SIGTERM, then SIGKILL after a bounded wait) and exits 0; if a child
dies on its own it stops the others and exits 1. A second Ctrl-C kills the children at
once. SIGHUP restarts the servers and the workers one by one (see :meth:`Launcher.restart`).

The launcher opens the listening socket on HOST:PORT itself and hands it to every server
(``server.py --listen-fd``): the servers share it, and a connection made while one
restarts waits in the socket's backlog rather than being refused. Each server also
answers on a private loopback port of its own (``--probe-port``), for the launcher's
readiness checks. With several servers their metrics are summed through a directory of
this run (``PROMETHEUS_MULTIPROC_DIR``). Worker *n* (from 1, the overflow workers last)
gets ``WORKER_METRICS_PORT`` + *n* - 1 when that is set.

The overflow workers (one by default) consume with a RabbitMQ consumer priority one below
WORKER_PRIORITY: RabbitMQ hands them messages only while every other worker holds a full
WORKER_PREFETCH, so they take a backlog (a batch of hundreds, a burst) on a core the
others leave idle, and otherwise wait without costing anything.

When ``SMTP_HOST`` is not set, ``devsmtp.py`` is started on a free loopback port and the
worker is pointed at it, so every mail lands in ``var/outbox/`` as an ``.eml`` file.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from config import LISTEN_BACKLOG, PRIORITY_RANGE, Settings
from errors import ConfigError

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
READY_TIMEOUT = 60.0
DEVSMTP_TIMEOUT = 15.0
POLL_INTERVAL = 0.25
PROBE_TIMEOUT = 2.0  # one connection attempt or HTTP request
# Beyond SHUTDOWN_GRACE (the worker's drain time) before a child is killed.
STOP_MARGIN = 15.0
# Overflow workers by default. On 2 cores (bench/bench.py, 2026-12-06) one more worker
# taking only the backlog delivered the batch endpoint's mails 1.2-1.3x as fast and took
# no message with a client per request; see the README's Sizing.
OVERFLOW_WORKERS = 1
MAX_PORT = 65535
SMTP_CREDENTIALS = ("SMTP_USERNAME", "SMTP_PASSWORD", "EMAIL_USERNAME", "EMAIL_PASSWORD")


def default_counts(cores: int | None = None) -> tuple[int, int]:
    """(servers, workers) for a machine with ``cores`` CPUs: half the cores each.

    Measured with bench/bench.py on 2 cores (2026-12-05, against the reference in each
    run): a server spends about 0.7 ms of CPU per keep-alive request (1.1 ms with a new
    connection each) and a worker about 0.6 ms per mail, so both need about the same. One
    of each was the best all-round choice there: a second server gave 14-20% more mails/s
    with a new connection per request but 2-8% less with keep-alive clients and a higher
    accept p99 (the one worker then falls behind); a second worker gave 25% more with the
    batch endpoint but 12% less with keep-alive clients. On 2026-12-06's slower machine
    (bench/results/20261206T214101Z-c523fcec94) a second server gave 19% more with a
    new connection per request and 3% more with keep-alive clients, a higher accept p99 in
    both, and 80 MB more RSS. Much of a second server's gain with a new connection per
    request was libuv's one accept per turn of the loop, which acceptloop.py removed on
    2026-12-07 (one server: 30-55% more requests/s there); two servers not measured again
    since. The README's Production section says when to change them."""
    cores = cores or os.cpu_count() or 1
    half = max(1, cores // 2)
    return half, half


@dataclass
class Child:
    name: str
    process: asyncio.subprocess.Process
    args: list[str]
    env: dict[str, str]
    # A server's private port for GET /readyz, a worker's for GET /healthz.
    probe_port: int | None = None
    probe_host: str = "127.0.0.1"
    retiring: bool = False  # being stopped on purpose (a restart): its exit is expected

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
    def __init__(
        self,
        settings: Settings,
        ready_timeout: float,
        servers: int = 1,
        workers: int = 1,
        overflow: int = 0,
    ) -> None:
        self.settings = settings
        self.ready_timeout = ready_timeout
        self.servers = servers
        self.workers = workers
        self.overflow = overflow  # workers started after ``workers``, one priority lower
        self.children: list[Child] = []
        self.devsmtp_port: int | None = None
        self.listener: socket.socket | None = None
        self.metrics_dir: str | None = None
        self._stop = asyncio.Event()
        self._restart = asyncio.Event()
        self._signals = 0

    def _on_hangup(self) -> None:
        log.info("SIGHUP received: restarting the servers and workers one by one")
        self._restart.set()

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
        loop.add_signal_handler(signal.SIGHUP, self._on_hangup)
        try:
            return await self._run()
        finally:
            await self._stop_children()
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            if self.listener is not None:
                self.listener.close()
            if self.metrics_dir is not None:
                shutil.rmtree(self.metrics_dir, ignore_errors=True)

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
        try:
            self.listener = listen(s.host, s.port)
        except OSError as exc:
            log.error("cannot listen on %s:%d: %s", s.host, s.port, exc.strerror or exc)
            return 1
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        worker_env = dict(env)
        server_env = dict(env)
        if self.servers > 1:
            self.metrics_dir = tempfile.mkdtemp(prefix="mailroom-metrics-")
            server_env["PROMETHEUS_MULTIPROC_DIR"] = self.metrics_dir
        if s.smtp_host is None:
            status = await self._start_devsmtp(env)
            if status is not None:
                return status
            assert self.devsmtp_port is not None
            worker_env.update(self._devsmtp_env(self.devsmtp_port))
        for n in range(1, self.workers + 1):
            await self._spawn_worker(n, worker_env)
        if self.overflow:
            overflow_env = dict(worker_env, WORKER_PRIORITY=str(self.overflow_priority))
            for n in range(self.workers + 1, self.workers + self.overflow + 1):
                await self._spawn_worker(n, overflow_env)
        for n in range(1, self.servers + 1):
            await self._spawn_server(n, server_env)
        status = await self._wait_servers_ready(self._of("server"))
        if status is None:
            status = await self._wait_workers_ready(self._of("worker"))
        if status is not None:
            return status
        self._print_banner(f"http://{url_host(host)}:{s.port}")
        return await self._supervise()

    @property
    def overflow_priority(self) -> int:
        """The overflow workers' WORKER_PRIORITY: one below the others'."""
        return self.settings.worker_priority - 1

    async def _spawn_worker(self, n: int, env: dict[str, str]) -> Child:
        """Worker ``n``, with its metrics and health port: WORKER_METRICS_PORT + n - 1, or
        (unset) a free loopback port, so that the launcher can see it consume."""
        env = dict(env)
        if self.settings.worker_metrics_port is not None:
            port = self.settings.worker_metrics_port + n - 1
            host = connect_host(self.settings.worker_metrics_host)
        else:
            port, host = free_port(), "127.0.0.1"
            env["WORKER_METRICS_HOST"] = host
        env["WORKER_METRICS_PORT"] = str(port)
        name = "worker" if self.workers + self.overflow == 1 else f"worker-{n}"
        if n > self.workers:
            log.info("%s is an overflow worker (WORKER_PRIORITY=%s)", name, env["WORKER_PRIORITY"])
        child = await self._spawn(name, [str(HERE / "worker.py")], env)
        child.probe_host, child.probe_port = host, port
        return child

    async def _spawn_server(self, n: int, env: dict[str, str]) -> Child:
        assert self.listener is not None
        probe = free_port()
        fd = self.listener.fileno()
        args = [str(HERE / "server.py"), "--listen-fd", str(fd), "--probe-port", str(probe)]
        name = "server" if self.servers == 1 else f"server-{n}"
        child = await self._spawn(name, args, env, pass_fds=(fd,))
        child.probe_port = probe
        return child

    def _of(self, kind: str) -> list[Child]:
        return [c for c in self.children if c.name.startswith(kind) and c.running]

    async def _wait_workers_ready(self, workers: list[Child]) -> int | None:
        async def ready() -> bool:
            for child in workers:
                assert child.probe_port is not None
                if await http_status(child.probe_host, child.probe_port, "/healthz") != 200:
                    return False
            return True

        return await self._wait_for(
            "the workers to consume (GET /healthz on their metrics ports)",
            ready,
            self.ready_timeout,
        )

    async def _wait_servers_ready(self, servers: list[Child]) -> int | None:
        s = self.settings

        async def ready() -> bool:
            for child in servers:
                assert child.probe_port is not None
                if await http_status("127.0.0.1", child.probe_port, "/readyz") != 200:
                    return False
            return True

        return await self._wait_for(
            f"the server to answer GET /readyz on {connect_host(s.host)}:{s.port}",
            ready,
            self.ready_timeout,
            hint=(
                f"is RabbitMQ running at {s.amqp_url_redacted} (scripts/ensure-rabbitmq.sh), "
                "and does it accept the user, password and virtual host in AMQP_URL? "
                "The server's log above says which."
            ),
        )

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

    async def _spawn(
        self, name: str, args: list[str], env: dict[str, str], pass_fds: tuple[int, ...] = ()
    ) -> Child:
        # A process group of its own: a terminal's Ctrl-C reaches only the launcher,
        # which then stops the children in order (server and worker before devsmtp).
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            *args,
            env=env,
            stdin=subprocess.DEVNULL,
            process_group=0,
            pass_fds=pass_fds,
        )
        log.info("started %s (pid %d)", name, process.pid)
        child = Child(name, process, args, env)
        self.children.append(child)
        return child

    def _dead_child(self) -> Child | None:
        return next((c for c in self.children if not c.running and not c.retiring), None)

    async def restart(self) -> int | None:
        """Restart the servers, then the workers, one at a time; None when done, else the
        exit status (a new process did not come up).

        A server's successor starts first and takes connections from the shared socket
        once it answers ``GET /readyz``; then the old one stops as on SIGTERM (it answers
        every request it has read). A worker stops first (it finishes its sends, or hands
        them back to the queue), then its successor starts; the other workers consume
        meanwhile. Nothing accepted is lost, and no connection is refused.
        """
        for old in self._of("server"):
            new = await self._spawn_server(_number(old.name), old.env)
            new.name = old.name
            status = await self._wait_servers_ready([new])
            if status is not None:
                return status
            await self._retire(old, STOP_MARGIN + self.settings.publish_timeout)
        for old in self._of("worker"):
            await self._retire(old, self.settings.shutdown_grace + STOP_MARGIN)
            new = await self._spawn(old.name, old.args, old.env)
            new.probe_host, new.probe_port = old.probe_host, old.probe_port
            # The next one stops only once this one consumes.
            status = await self._wait_workers_ready([new])
            if status is not None:
                return status
        log.info("restart done")
        return None

    async def _retire(self, child: Child, grace: float) -> None:
        child.retiring = True
        await self._terminate([child], grace)
        self.children.remove(child)
        if self.metrics_dir is not None and child.name.startswith("server"):
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(child.process.pid, self.metrics_dir)  # type: ignore[no-untyped-call]

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
        """Wait for a stop signal (-> 0) or for a child to die (-> 1); restart on SIGHUP."""
        while True:
            stop = asyncio.ensure_future(self._stop.wait())
            restart = asyncio.ensure_future(self._restart.wait())
            exits = {asyncio.ensure_future(c.process.wait()): c for c in self.children}
            try:
                done, _ = await asyncio.wait(
                    {stop, restart, *exits}, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                for future in (stop, restart, *exits):
                    future.cancel()
            if stop in done:
                return 0
            dead = [exits[f] for f in done if f in exits]
            for child in dead:
                assert child.process.returncode is not None
                log.error(
                    "%s exited unexpectedly (%s); stopping the others",
                    child.name,
                    describe_exit(child.process.returncode),
                )
            if dead:
                return 1
            self._restart.clear()
            status = await self.restart()
            if status is not None:
                return status

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


def _number(name: str) -> int:
    """``server-2`` -> 2; ``server`` -> 1."""
    tail = name.rpartition("-")[2]
    return int(tail) if tail.isdigit() else 1


def listen(host: str, port: int) -> socket.socket:
    """The listening socket every server shares (inherited by the children)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host or "0.0.0.0", port))  # noqa: S104 - HOST says where
        sock.listen(LISTEN_BACKLOG)
        sock.set_inheritable(True)
    except OSError:
        sock.close()
        raise
    return sock


def layout_problem(settings: Settings, workers: int, overflow: int) -> str | None:
    """Why ``workers`` workers, ``overflow`` of them overflow workers, cannot start with
    ``settings``, or None."""
    if overflow and settings.worker_priority <= -PRIORITY_RANGE:
        return (
            f"WORKER_PRIORITY is {settings.worker_priority}, the lowest there is: overflow "
            "workers need one below it; raise it or start with --overflow-workers 0"
        )
    port = settings.worker_metrics_port
    if port is not None and port + workers - 1 > MAX_PORT:
        return (
            f"WORKER_METRICS_PORT {port} leaves no port for worker {workers}: each worker "
            f"takes the next one (up to {MAX_PORT})"
        )
    return None


def _count(value: str, least: int = 1) -> int:
    number = int(value)
    if not least <= number <= 64:
        raise argparse.ArgumentTypeError(f"must be between {least} and 64, not {value}")
    return number


def _count_or_zero(value: str) -> int:
    return _count(value, least=0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    servers, workers = default_counts()
    parser.add_argument(
        "--ready-timeout",
        type=float,
        default=READY_TIMEOUT,
        help=f"seconds to wait for GET /readyz to answer 200 (default {READY_TIMEOUT:g})",
    )
    parser.add_argument(
        "--servers",
        type=_count,
        default=servers,
        help=f"server processes sharing HOST:PORT (default here: {servers}, half the cores)",
    )
    parser.add_argument(
        "--workers",
        type=_count,
        default=workers,
        help=f"worker processes (default here: {workers}, half the cores)",
    )
    parser.add_argument(
        "--overflow-workers",
        type=_count_or_zero,
        default=OVERFLOW_WORKERS,
        help="worker processes more, one consumer priority lower, that take messages only "
        f"while the others hold a full prefetch (a backlog) (default {OVERFLOW_WORKERS})",
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
    problem = layout_problem(settings, args.workers + args.overflow_workers, args.overflow_workers)
    if problem is not None:
        print(f"launcher: {problem}", file=sys.stderr)
        return 2
    launcher = Launcher(
        settings, args.ready_timeout, args.servers, args.workers, args.overflow_workers
    )
    return asyncio.run(launcher.run())


if __name__ == "__main__":
    sys.exit(main())
