"""Benchmark Mailroom against the reference Flask + Celery stack, in one run, on loopback.

    .venv/bin/python bench/bench.py                      # full run (about 7 minutes)
    .venv/bin/python bench/bench.py -n 500 --repeat 1 --rounds 1    # quick look

Everything listens on 127.0.0.1 and is started and stopped by this script:

* the sink: postfix ``smtp-sink`` (installed with apt-get when missing and allowed),
  appending every mail to a dump file on tmpfs, which is read incrementally to see each
  recipient arrive (unique vs total: lost and duplicate mails);
* the systems under test, one after the other: reference mode a and b through
  ``stack.sh`` (then ``cleanup_rabbit.py``), Mailroom (``server.py`` + ``worker.py``
  + an overflow ``worker.py`` one consumer priority lower, as launcher.py starts them on
  two cores, with a private QUEUE_PREFIX whose queues and exchange are deleted
  afterwards), and Mailroom with two server processes (the client alternates between
  their ports) or two equal workers;
* a small asyncio HTTP/1.1 client (a new connection per request, like the reference
  figures) sending ``GET /?sendmail=<unique address>`` with bounded concurrency.

Per system: a warm-up, then ``--repeat`` measured batches. The sequence of systems runs
``--rounds`` times (each system started afresh each time), and each metric is the median
over a system's batches of all rounds (lost, duplicates and requests not accepted: sums).
The machine's speed drifts within minutes: a slow spell then falls on every system rather
than on the one that happened to run in it.
A sweep over WORKER_CONCURRENCY measures Mailroom end to end and draining a backlog
(worker started after the batch was queued). Results: a table on stdout,
``bench/results.md`` and ``bench/results.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import logging
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import quote

import aio_pika
import asyncpg

log = logging.getLogger("bench")

REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO / "bench"
HOST = "127.0.0.1"
# The systems mailroom, mailroom-pg and mailroom-2srv run what launcher.py starts on two
# cores: besides one worker (half the cores), its one overflow worker (OVERFLOW_WORKERS),
# which consumes one priority lower and so takes only a backlog.
LAUNCHER_OVERFLOW = 1
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
PG_SERVER = "postgresql://postgres@127.0.0.1:5432"  # trust auth on this machine
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
MAIL_DOMAIN = "example.com"
# The systems under test see only these variables of ours, plus their own settings: no
# Mailroom or reference setting leaks in from the caller's environment.
BASE_ENV = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR")


def base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k in BASE_ENV}


class BenchError(Exception):
    """Something needed for the benchmark is missing or broke; the message says what."""


# --------------------------------------------------------------------------------------
# Processes: everything started is registered here and stopped on any exit path.


class Registry:
    """What this run started: process groups, reference modes, RabbitMQ prefixes."""

    def __init__(self) -> None:
        self.processes: dict[int, tuple[str, subprocess.Popen[bytes]]] = {}
        self.ref_modes: dict[str, Callable[[], None]] = {}
        self.prefixes: set[str] = set()
        self.databases: set[str] = set()

    def add(self, name: str, proc: subprocess.Popen[bytes]) -> None:
        self.processes[proc.pid] = (name, proc)

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> int | None:
        """SIGTERM the process group, wait, then SIGKILL what is left of it."""
        name = self.processes.pop(proc.pid, ("?", proc))[0]
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning(
                    "%s (pid %d) ignored SIGTERM for %gs; killing it", name, proc.pid, timeout
                )
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # leftovers of its group, if any
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
        return proc.returncode

    def stop_all(self) -> None:
        for stop in list(self.ref_modes.values()):
            try:
                stop()
            except (OSError, subprocess.SubprocessError) as exc:
                log.error("could not stop a reference stack: %s", exc)
        self.ref_modes.clear()
        for _, proc in list(self.processes.values())[::-1]:
            self.stop(proc, timeout=10)
        if self.prefixes:
            try:
                asyncio.run(delete_mailroom_topology(sorted(self.prefixes)))
            except (OSError, aio_pika.exceptions.AMQPException) as exc:
                log.error("could not delete queues of %s: %s", sorted(self.prefixes), exc)
            self.prefixes.clear()
        for name in sorted(self.databases):
            try:
                asyncio.run(drop_database(name))
            except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
                log.error("could not drop PostgreSQL database %s: %s", name, exc)
        self.databases.clear()


REGISTRY = Registry()


async def create_database(name: str) -> None:
    """A fresh PostgreSQL database ``name``, registered to be dropped on any exit."""
    try:
        admin = await asyncpg.connect(f"{PG_SERVER}/postgres", timeout=10)
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        raise BenchError(
            f"PostgreSQL does not answer at {PG_SERVER} (user postgres): {exc}"
        ) from exc
    try:
        REGISTRY.databases.add(name)
        await admin.execute(f'CREATE DATABASE "{name}"', timeout=30)
    except (TimeoutError, asyncpg.PostgresError) as exc:
        raise BenchError(f"cannot create the PostgreSQL database {name}: {exc}") from exc
    finally:
        await admin.close(timeout=5)


async def drop_database(name: str) -> None:
    admin = await asyncpg.connect(f"{PG_SERVER}/postgres", timeout=10)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', timeout=60)
        REGISTRY.databases.discard(name)
    finally:
        await admin.close(timeout=5)


def spawn(
    name: str, argv: Sequence[str], logfile: Path, env: dict[str, str], cwd: Path
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in its own session (so Ctrl-C reaches only us), output to ``logfile``."""
    with logfile.open("ab") as out:
        proc = subprocess.Popen(  # noqa: S603 - fixed argv built by this script
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
    REGISTRY.add(name, proc)
    log.debug("started %s: pid %d", name, proc.pid)
    return proc


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


async def wait_port(port: int, within: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"process {proc.pid} exited ({proc.returncode}) before listening")
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), 1)
        except (OSError, TimeoutError):
            await asyncio.sleep(0.1)
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return
    raise BenchError(f"nothing listens on {HOST}:{port} after {within:g}s")


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --------------------------------------------------------------------------------------
# /proc sampling: CPU time and memory of process trees.


def _stat(pid: int) -> tuple[int, int] | None:
    """(ppid, utime+stime in ticks) of ``pid``, or None if it is gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2 :].split()
    return int(fields[1]), int(fields[11]) + int(fields[12])


def _all_parents() -> dict[int, int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None:
                parents[int(entry)] = st[0]
    return parents


def process_tree(roots: Sequence[int]) -> list[int]:
    parents = _all_parents()
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    found: list[int] = []
    todo = [r for r in roots if r in parents]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _status_kb(pid: int, key: bytes, file: str = "status") -> int:
    try:
        for line in Path(f"/proc/{pid}/{file}").read_bytes().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def pids_named(comm: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{entry}/comm").read_text().strip() == comm:
                    found.append(int(entry))
    return found


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) clock ticks of the whole machine since boot, from /proc/stat."""
    first = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    ticks = [int(x) for x in first[1:9]]  # user nice system idle iowait irq softirq steal
    return sum(ticks) - ticks[3] - ticks[4], sum(ticks)


def own_cpu_s() -> float:
    """CPU time of this process (the load generator, samplers and sink reader)."""
    t = os.times()
    return t.user + t.system


@dataclass
class Usage:
    cpu_s: float = 0.0
    cpu_by_role: dict[str, float] = field(default_factory=dict)
    peak_rss_mb: float = 0.0
    peak_pss_mb: float = 0.0
    # The servers and the one worker that held the most (issue 15's "server + one worker").
    peak_rss_one_worker_mb: float = 0.0
    # What made that peak: each role's RSS (MB) at the sample that set it.
    peak_rss_one_worker_roles: dict[str, float] = field(default_factory=dict)
    processes: int = 0


class Sampler:
    """Samples the process trees under ``roles`` (name -> root pid): summed RSS (every
    ``interval``), summed PSS (every second: smaps_rollup is costlier), and the CPU time
    (utime+stime) each tree used between :meth:`start` and :meth:`stop`."""

    def __init__(self, roles: dict[str, int], interval: float = 0.2) -> None:
        self.roles = dict(roles)
        self.interval = interval
        self.first: dict[int, int] = {}
        self.last: dict[int, int] = {}
        self.role_of: dict[int, str] = {}
        self.usage = Usage()
        self._task: asyncio.Task[None] | None = None
        self._last_pss = 0.0

    def sample(self, *, baseline: bool = False) -> None:
        pids: list[int] = []
        for role, root in self.roles.items():
            for pid in process_tree([root]):
                self.role_of.setdefault(pid, role)
                pids.append(pid)
        rss_by_role: dict[str, int] = {}
        for pid in pids:
            st = _stat(pid)
            if st is None:
                continue
            if baseline:
                self.first[pid] = st[1]
            else:
                self.first.setdefault(pid, 0)  # born during the measurement
            self.last[pid] = st[1]
            role = self.role_of[pid]
            rss_by_role[role] = rss_by_role.get(role, 0) + _status_kb(pid, b"VmRSS:")
        rss = sum(rss_by_role.values())
        workers = [kb for role, kb in rss_by_role.items() if role.startswith("worker")]
        one_worker = rss - sum(workers) + max(workers, default=0)
        self.usage.peak_rss_mb = max(self.usage.peak_rss_mb, rss / 1024)
        if one_worker / 1024 > self.usage.peak_rss_one_worker_mb:
            self.usage.peak_rss_one_worker_mb = one_worker / 1024
            self.usage.peak_rss_one_worker_roles = {
                role: round(kb / 1024, 1) for role, kb in sorted(rss_by_role.items())
            }
        self.usage.processes = max(self.usage.processes, len(pids))
        now = time.monotonic()
        if baseline or now - self._last_pss >= 1.0:
            self._last_pss = now
            pss = sum(_status_kb(pid, b"Pss:", "smaps_rollup") for pid in pids)
            self.usage.peak_pss_mb = max(self.usage.peak_pss_mb, pss / 1024)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.sample()

    def start(self) -> None:
        self.sample(baseline=True)
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> Usage:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.sample()
        by_role = dict.fromkeys(self.roles, 0.0)
        for pid, ticks in self.last.items():
            by_role[self.role_of[pid]] += (ticks - self.first.get(pid, 0)) / CLK_TCK
        self.usage.cpu_by_role = by_role
        self.usage.cpu_s = sum(by_role.values())
        return self.usage


# --------------------------------------------------------------------------------------
# The sink: postfix smtp-sink, dumping every mail to one file that we read as it grows.


def ensure_smtp_sink(install: bool) -> str:
    found = shutil.which("smtp-sink") or (
        "/usr/sbin/smtp-sink" if Path("/usr/sbin/smtp-sink").exists() else None
    )
    if found:
        return found
    how = "DEBIAN_FRONTEND=noninteractive apt-get install -y postfix"
    if not install or os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise BenchError(
            "postfix's smtp-sink is missing; it is the SMTP server mail is delivered to.\n"
            f"  Install it with:  {how}\n  (run as root, or pass --install to let bench.py do it)"
        )
    log.info("smtp-sink is missing; installing postfix (%s)", how)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(
        ["apt-get", "install", "-y", "postfix"],  # noqa: S607 - apt-get from PATH, as documented
        env=env,
        check=True,
        timeout=600,
        stdout=subprocess.DEVNULL,
    )
    found = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
    if not Path(found).exists():
        raise BenchError("postfix was installed but smtp-sink is still not found")
    return found


class Sink:
    """smtp-sink on a loopback port; tracks each recipient's arrival times by run tag."""

    def __init__(self, binary: str, directory: Path) -> None:
        self.binary = binary
        self.dir = directory
        self.dump = self.dir / "dump"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._offset = 0
        self._partial = b""
        self.seen: dict[str, list[float]] = {}  # recipient -> arrival times (poll times)
        self.ids: dict[str, int] = {}  # X-Mailroom-Id -> count
        self.messages = 0

    async def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        argv = [self.binary, "-c", "-m", "1024", "-D", str(self.dump)]
        if os.geteuid() == 0:
            # smtp-sink must drop root privileges (-u nobody) before it writes the dump.
            shutil.chown(self.dir, user="nobody")
            argv += ["-u", "nobody"]
        argv += [f"{HOST}:{self.port}", "1024"]
        self.proc = spawn("smtp-sink", argv, self.dir / "smtp-sink.log", base_env(), self.dir)
        await wait_port(self.port, 10, self.proc)
        log.info("sink: smtp-sink on %s:%d, dump %s", HOST, self.port, self.dump)

    def stop(self) -> None:
        if self.proc is not None:
            REGISTRY.stop(self.proc, timeout=5)
            self.proc = None

    def poll(self) -> None:
        """Read what was appended to the dump since the last poll."""
        if self.proc is not None and self.proc.poll() is not None:
            raise BenchError(f"smtp-sink exited ({self.proc.returncode}); see {self.dir}")
        try:
            with self.dump.open("rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return
        if not data:
            return
        self._offset += len(data)
        now = time.monotonic()
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            if line.startswith(b"X-Rcpt-Args: "):
                addr = line[13:].split(b">", 1)[0].lstrip(b"<").decode(errors="replace").lower()
                self.seen.setdefault(addr, []).append(now)
                self.messages += 1
            elif line.startswith(b"X-Mailroom-Id: "):
                key = line[15:].strip().decode(errors="replace")
                self.ids[key] = self.ids.get(key, 0) + 1

    def cpu_s(self) -> float:
        st = _stat(self.proc.pid) if self.proc is not None else None
        return st[1] / CLK_TCK if st is not None else 0.0

    def counted(self, addrs: Sequence[str]) -> tuple[int, int]:
        """(unique, total) arrivals among ``addrs``."""
        unique = total = 0
        for a in addrs:
            times = self.seen.get(a)
            if times:
                unique += 1
                total += len(times)
        return unique, total

    def with_tag(self, tag: str) -> dict[str, list[float]]:
        prefix = f"bench-{tag}-"
        return {a: t for a, t in self.seen.items() if a.startswith(prefix)}


def addresses(tag: str, n: int) -> list[str]:
    return [f"bench-{tag}-{i}@{MAIL_DOMAIN}" for i in range(n)]


# --------------------------------------------------------------------------------------
# The load generator: a minimal asyncio HTTP/1.1 client. Two modes: a new connection per
# request ("close", what curl does) and keep-alive ("keepalive": each of the
# ``concurrency`` client connections is reused for request after request, reopened only
# when the server closes it). The batch endpoint is driven over keep-alive connections.

_STATUS = re.compile(rb"^HTTP/1\.([01]) (\d{3})")
_JOB_ID = re.compile(rb"\(id ([0-9a-f]{32})\)")
MODES = ("close", "keepalive")
MODE_LABEL = {
    "close": "a new connection per request",
    "keepalive": "keep-alive clients",
    "batch": "batch endpoint",
}


@dataclass
class LoadResult:
    requested: int
    sent: int = 0
    accepted: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)  # seconds, accepted requests
    statuses: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    job_ids: list[str] = field(default_factory=list)
    started: float = 0.0
    ended: float = 0.0
    timed_out: bool = False
    client_cpu_s: float = 0.0
    connections: int = 0  # TCP connections opened
    http_requests: int = 0  # HTTP requests answered (a batch request counts once)

    @property
    def seconds(self) -> float:
        return max(self.ended - self.started, 1e-9)

    def error(self, key: str) -> None:
        self.errors[key] = self.errors.get(key, 0) + 1


async def http_get(port: int, target: str, within: float) -> tuple[int, bytes]:
    request = f"GET {target} HTTP/1.1\r\nHost: {HOST}:{port}\r\nConnection: close\r\n\r\n"
    async with asyncio.timeout(within):
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            writer.write(request.encode())
            data = await reader.read()  # to EOF: the server closes after the response
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    match = _STATUS.match(head)
    if match is None:
        raise ConnectionError(f"not an HTTP response: {head[:40]!r}")
    return int(match.group(2)), body


class KeepAliveConnection:
    """One client connection reused for many HTTP/1.1 requests, reopened when the server
    closes it (``Connection: close``, a response delimited by EOF, or an HTTP/1.0 answer
    without ``keep-alive``). ``opened`` counts the TCP connections it made."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.opened = 0
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def close(self) -> None:
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def request(
        self,
        method: str,
        target: str,
        within: float,
        body: bytes = b"",
        content_type: str | None = None,
    ) -> tuple[int, bytes]:
        head = f"{method} {target} HTTP/1.1\r\nHost: {HOST}:{self.port}\r\n"
        if body or method == "POST":
            head += f"Content-Length: {len(body)}\r\n"
        if content_type:
            head += f"Content-Type: {content_type}\r\n"
        try:
            async with asyncio.timeout(within):
                if self._writer is None:
                    self._reader, self._writer = await asyncio.open_connection(HOST, self.port)
                    self.opened += 1
                assert self._reader is not None
                self._writer.write(head.encode() + b"\r\n" + body)
                status, data, keep = await _read_response(self._reader)
        except BaseException:
            await self.close()
            raise
        if not keep:
            await self.close()
        return status, data


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """(status, body, whether the connection stays open) of one HTTP/1.x response."""
    head = await reader.readuntil(b"\r\n\r\n")
    match = _STATUS.match(head)
    if match is None:
        raise ConnectionError(f"not an HTTP response: {head[:40]!r}")
    minor, status = match.group(1), int(match.group(2))
    headers: dict[bytes, bytes] = {}
    for line in head.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep:
            headers[name.strip().lower()] = value.strip().lower()
    connection = headers.get(b"connection", b"")
    keep = b"close" not in connection and (minor == b"1" or b"keep-alive" in connection)
    if b"chunked" in headers.get(b"transfer-encoding", b""):
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")  # no trailers expected
                break
            parts.append(await reader.readexactly(size + 2))
        return status, b"".join(p[:-2] for p in parts), keep
    if b"content-length" in headers:
        return status, await reader.readexactly(int(headers[b"content-length"])), keep
    if status in (204, 304) or 100 <= status < 200:
        return status, b"", keep
    return status, await reader.read(), False  # delimited by EOF


def _count(result: LoadResult, status: int) -> None:
    result.http_requests += 1
    result.statuses[str(status)] = result.statuses.get(str(status), 0) + 1


async def _bounded(result: LoadResult, workers: Sequence[Any], total_timeout: float) -> None:
    cpu0 = time.process_time()
    result.started = time.monotonic()
    try:
        async with asyncio.timeout(total_timeout):
            await asyncio.gather(*workers)
    except TimeoutError:
        result.timed_out = True
        log.warning(
            "load: stopped after %gs with %d of %d sent",
            total_timeout,
            result.sent,
            result.requested,
        )
    result.ended = time.monotonic()
    result.client_cpu_s = time.process_time() - cpu0


def _accept_legacy(result: LoadResult, addr: str, status: int, body: bytes, t0: float) -> None:
    _count(result, status)
    if status == 200 and body.startswith(b"Email to"):
        result.latencies.append(time.perf_counter() - t0)
        result.accepted.append(addr)
        match = _JOB_ID.search(body)
        if match:
            result.job_ids.append(match.group(1).decode())


async def run_load(
    ports: Sequence[int],
    addrs: Sequence[str],
    concurrency: int,
    request_timeout: float,
    total_timeout: float,
    mode: str = "close",
) -> LoadResult:
    """GET /?sendmail=<addr> for every address, ``concurrency`` at a time. ``close``: a new
    connection per request, ports round-robin; ``keepalive``: ``concurrency`` connections
    (spread over the ports), each reused for many requests."""
    result = LoadResult(requested=len(addrs))
    todo: Iterator[tuple[int, str]] = iter(enumerate(addrs))

    async def close_worker() -> None:
        for i, addr in todo:
            port = ports[i % len(ports)]
            t0 = time.perf_counter()
            result.sent += 1
            result.connections += 1
            try:
                status, body = await http_get(
                    port, f"/?sendmail={quote(addr, safe='@')}", request_timeout
                )
            except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                result.error(type(exc).__name__)
                continue
            _accept_legacy(result, addr, status, body, t0)

    async def keepalive_worker(k: int) -> None:
        conn = KeepAliveConnection(ports[k % len(ports)])
        try:
            for _, addr in todo:
                t0 = time.perf_counter()
                result.sent += 1
                try:
                    status, body = await conn.request(
                        "GET", f"/?sendmail={quote(addr, safe='@')}", request_timeout
                    )
                except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                    result.error(type(exc).__name__)
                    continue
                except (ValueError, asyncio.LimitOverrunError) as exc:  # malformed answer
                    result.error(type(exc).__name__)
                    continue
                _accept_legacy(result, addr, status, body, t0)
        finally:
            result.connections += conn.opened
            await conn.close()

    n = min(concurrency, len(addrs))
    if mode == "close":
        workers = [close_worker() for _ in range(n)]
    elif mode == "keepalive":
        workers = [keepalive_worker(k) for k in range(n)]
    else:
        raise ValueError(f"unknown load mode {mode!r}")
    await _bounded(result, workers, total_timeout)
    return result


class BatchUnavailable(Exception):
    """The server has no ``POST /api/messages/batch`` (it answered 404 or 405)."""


def batch_body(addrs: Sequence[str]) -> bytes:
    return json.dumps(
        [{"to": a, "subject": "bench", "text": "This is a benchmark mail."} for a in addrs]
    ).encode()


def batch_items(payload: Any) -> list[Any]:
    """The per-item results of a batch answer: the JSON array itself, or the first array
    under "results"/"items"/"messages"."""
    if isinstance(payload, list):
        return payload
    if isinstance(payload, dict):
        for key in ("results", "items", "messages"):
            if isinstance(payload.get(key), list):
                return list(payload[key])
    raise ValueError("no per-item results in the batch answer")


async def run_batch_load(
    ports: Sequence[int],
    addrs: Sequence[str],
    batch_size: int,
    concurrency: int,
    request_timeout: float,
    total_timeout: float,
) -> LoadResult:
    """POST /api/messages/batch with ``batch_size`` mails per request, ``concurrency``
    requests in flight over keep-alive connections. An item counts as accepted when its
    result (same position as in the request) has an "id" and no "error"."""
    result = LoadResult(requested=len(addrs))
    chunks = iter([addrs[i : i + batch_size] for i in range(0, len(addrs), batch_size)])
    unavailable: list[int] = []

    async def worker(k: int) -> None:
        conn = KeepAliveConnection(ports[k % len(ports)])
        try:
            for chunk in chunks:
                t0 = time.perf_counter()
                result.sent += len(chunk)
                try:
                    status, body = await conn.request(
                        "POST",
                        "/api/messages/batch",
                        request_timeout,
                        batch_body(chunk),
                        "application/json",
                    )
                except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                    result.error(type(exc).__name__)
                    continue
                except (ValueError, asyncio.LimitOverrunError) as exc:
                    result.error(type(exc).__name__)
                    continue
                _count(result, status)
                if status in (404, 405):
                    unavailable.append(status)
                    return
                if not 200 <= status < 300:
                    continue
                try:
                    items = batch_items(json.loads(body))
                except ValueError:
                    result.error("bad batch answer")
                    continue
                if len(items) != len(chunk):
                    result.error("batch answer of another length")
                elapsed = time.perf_counter() - t0
                for addr, item in zip(chunk, items, strict=False):
                    if isinstance(item, dict) and item.get("id") and not item.get("error"):
                        result.accepted.append(addr)
                        result.latencies.append(elapsed)
                        result.job_ids.append(str(item["id"]))
        finally:
            result.connections += conn.opened
            await conn.close()

    n = max(1, min(concurrency, -(-len(addrs) // batch_size)))
    await _bounded(result, [worker(k) for k in range(n)], total_timeout)
    if unavailable and not result.accepted:
        raise BatchUnavailable(f"POST /api/messages/batch answered {unavailable[0]}")
    return result


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


# --------------------------------------------------------------------------------------
# Systems under test.


@dataclass(frozen=True)
class Options:
    requests: int
    concurrency: int
    warmup: int
    repeat: int
    request_timeout: float
    load_timeout: float
    delivery_timeout: float
    stall_timeout: float
    settle: float
    ref_dir: Path
    ref_venv: Path
    mailroom_python: Path
    mailroom_src: Path
    mailroom_log_level: str | None
    workdir: Path
    sink_dir: Path
    load_concurrencies: tuple[int, ...] = ()
    load_repeat: int = 1
    modes: tuple[str, ...] = MODES
    batch_size: int = 100
    batch_concurrency: int = 4
    rounds: int = 1  # the CLI's default is 2; scale.py runs one


class System:
    name = "?"
    label = "?"
    run_dir: Path  # its logs and files (each subclass sets it; run_system, per round)

    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.ports: list[int] = []
        self.notes: list[str] = []
        self.extra: dict[str, Any] = {}
        self.env: dict[str, str] = {}

    def configure(self, smtp_port: int) -> None:
        """Build the environment of the processes; mail goes to the sink on ``smtp_port``."""
        raise NotImplementedError

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    def roots(self) -> dict[str, int]:
        """The root pid of each part (its process tree is sampled), by role."""
        raise NotImplementedError


class Reference(System):
    """Reference stack mode a or b, through its own stack.sh."""

    def __init__(self, opts: Options, mode: str) -> None:
        super().__init__(opts)
        self.mode = mode
        self.name = f"ref-{mode}"
        self.label = {
            "a": "reference a (Flask dev + celery)",
            "b": "reference b (gunicorn -w4 + celery -c8)",
        }[mode]
        self.run_dir = opts.workdir / self.name
        self.port = free_port()
        self.ports = [self.port]
        self._roots: dict[str, int] = {}

    def _env(self, smtp_port: int) -> dict[str, str]:
        env = base_env()
        env.update(
            PORT=str(self.port),
            SMTP_HOST=HOST,
            SMTP_PORT=str(smtp_port),
            VENV=str(self.opts.ref_venv),
            RUN_DIR=str(self.run_dir),
        )
        return env

    def _stack(self, action: str, env: dict[str, str], timeout: float) -> str:
        done = subprocess.run(  # noqa: S603 - fixed argv
            [str(self.opts.ref_dir / "stack.sh"), self.mode, action],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise BenchError(
                f"stack.sh {self.mode} {action} failed ({done.returncode}): {done.stderr.strip()}\n"
                f"web log:\n{tail(self.run_dir / 'web.log')}\n"
                f"worker log:\n{tail(self.run_dir / 'worker.log')}"
            )
        return done.stdout.strip()

    def configure(self, smtp_port: int) -> None:
        self.env = self._env(smtp_port)

    async def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        REGISTRY.ref_modes[self.name] = self._stop_sync
        await asyncio.to_thread(self._stack, "start", self.env, 120)
        pids = self._stack("pids", self.env, 10)
        web, worker = (int(p) for p in pids.split(","))
        self._roots = {"web": web, "worker": worker}
        log.info("%s: up on port %d (web %d, worker %d)", self.name, self.port, web, worker)

    def roots(self) -> dict[str, int]:
        return self._roots

    def _stop_sync(self) -> None:
        REGISTRY.ref_modes.pop(self.name, None)
        try:
            self._stack("stop", self.env, 120)
        finally:
            done = subprocess.run(  # noqa: S603 - fixed argv
                [
                    str(self.opts.ref_venv / "bin/python"),
                    str(self.opts.ref_dir / "cleanup_rabbit.py"),
                    "--exchanges",
                ],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            for line in done.stderr.splitlines():
                left = re.match(r"deleted queue celery \((\d+) messages\)", line)
                if (left and left.group(1) != "0") or line.startswith("kept"):
                    self.notes.append(f"cleanup_rabbit.py: {line.strip()}")
            if done.returncode != 0:
                log.warning("cleanup_rabbit.py failed: %s", done.stderr.strip()[-400:])

    async def stop(self) -> None:
        await asyncio.to_thread(self._stop_sync)
        log.info("%s: stopped", self.name)


class Mailroom(System):
    """``python server.py`` (one or more, each on its own port) + ``python worker.py`` (one
    or more, plus ``overflow`` more with WORKER_PRIORITY=-1, as launcher.py starts them)."""

    def __init__(
        self,
        opts: Options,
        servers: int,
        concurrency: int | None,
        name: str,
        postgres: bool = False,
        workers: int = 1,
        overflow: int = 0,
    ) -> None:
        super().__init__(opts)
        self.name = name
        cc = "default" if concurrency is None else str(concurrency)
        db = "PostgreSQL" if postgres else "SQLite"
        procs = f"{servers} server{'s' if servers > 1 else ''}"
        if workers > 1 or overflow:
            procs += f", {workers} worker{'s' if workers > 1 else ''}"
        if overflow:
            procs += f" + {overflow} overflow"
        self.label = f"Mailroom ({procs}, concurrency {cc}, {db})"
        self.database = f"bench_{uuid.uuid4().hex[:12]}" if postgres else None
        self.servers = servers
        self.concurrency = concurrency
        self.prefix = f"bench-{uuid.uuid4().hex[:10]}"
        self.run_dir = opts.workdir / name
        self.ports = [free_port() for _ in range(servers)]
        self.server_procs: list[subprocess.Popen[bytes]] = []
        self.workers = workers
        self.overflow = overflow
        self.worker_procs: list[subprocess.Popen[bytes]] = []
        self.worker_starts = 0

    def configure(self, smtp_port: int) -> None:
        env = base_env()
        env.update(
            AMQP_URL=AMQP_URL,
            QUEUE_PREFIX=self.prefix,
            SMTP_HOST=HOST,
            SMTP_PORT=str(smtp_port),
            SMTP_SECURITY="none",
            HOST=HOST,
            TALKTOME_LOG=str(self.run_dir / "talktome.log"),
            # Mailroom's default store is SQLite under var/; give each system its own file
            # (or, for mailroom-pg, a PostgreSQL database created and dropped by the bench).
            DATABASE_URL=(
                f"{PG_SERVER}/{self.database}"
                if self.database
                else f"sqlite:///{self.run_dir / 'mailroom.db'}"
            ),
            SHUTDOWN_GRACE="10",
            PYTHONUNBUFFERED="1",
        )
        if self.concurrency is not None:
            env["WORKER_CONCURRENCY"] = str(self.concurrency)
        if self.opts.mailroom_log_level:
            env["LOG_LEVEL"] = self.opts.mailroom_log_level
        self.env = env

    def _spawn(self, script: str, logname: str, **extra: str) -> subprocess.Popen[bytes]:
        # cwd is the run directory, so no .env of a checkout is read.
        return spawn(
            f"{self.name} {logname}",
            [str(self.opts.mailroom_python), str(self.opts.mailroom_src / script)],
            self.run_dir / f"{logname}.log",
            dict(self.env, **extra),
            self.run_dir,
        )

    async def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        REGISTRY.prefixes.add(self.prefix)
        if self.database:
            await create_database(self.database)
        for i, port in enumerate(self.ports):
            self.server_procs.append(self._spawn("server.py", f"server{i}", PORT=str(port)))
        for i, proc in enumerate(self.server_procs):
            await self._wait_ready(self.ports[i], proc, self.run_dir / f"server{i}.log")
        await self.start_worker()
        log.info("%s: up on port(s) %s, queue prefix %s", self.name, self.ports, self.prefix)

    async def _wait_ready(self, port: int, proc: subprocess.Popen[bytes], logfile: Path) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise BenchError(
                    f"{self.name}: server exited ({proc.returncode}):\n{tail(logfile)}"
                )
            with contextlib.suppress(OSError, TimeoutError, ConnectionError):
                status, _ = await http_get(port, "/readyz", 2)
                if status == 200:
                    return
            await asyncio.sleep(0.1)
        raise BenchError(f"{self.name}: server not ready after 30s:\n{tail(logfile)}")

    async def start_worker(self) -> None:
        """Start the worker process(es); return once each consumes the send queue."""
        self.worker_starts += 1
        count = self.workers + self.overflow
        logfiles = [
            self.run_dir / f"worker{self.worker_starts}{'' if count == 1 else f'-{i}'}.log"
            for i in range(count)
        ]
        # The overflow workers last, one consumer priority lower (launcher.py's way).
        overflow = {"WORKER_PRIORITY": "-1"}
        self.worker_procs = [
            self._spawn("worker.py", logfile.stem, **(overflow if i >= self.workers else {}))
            for i, logfile in enumerate(logfiles)
        ]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for proc, logfile in zip(self.worker_procs, logfiles, strict=True):
                if proc.poll() is not None:
                    raise BenchError(
                        f"{self.name}: worker exited ({proc.returncode}):\n{tail(logfile)}"
                    )
            if await consumers(f"{self.prefix}.send") >= count:
                return
            await asyncio.sleep(0.2)
        raise BenchError(f"{self.name}: worker not consuming after 30s:\n{tail(logfiles[0])}")

    async def stop_worker(self) -> None:
        procs, self.worker_procs = self.worker_procs, []
        for proc in procs:
            code = await asyncio.to_thread(REGISTRY.stop, proc, 30.0)
            if code != 0:
                self.notes.append(f"worker exited with status {code} on SIGTERM")

    def roots(self) -> dict[str, int]:
        roles = {f"server{i}": p.pid for i, p in enumerate(self.server_procs)}
        for i, proc in enumerate(self.worker_procs):
            roles["worker" if len(self.worker_procs) == 1 else f"worker{i}"] = proc.pid
        return roles

    async def stop(self) -> None:
        for proc in self.server_procs:
            code = await asyncio.to_thread(REGISTRY.stop, proc, 20.0)
            if code != 0:
                self.notes.append(f"server exited with status {code} on SIGTERM")
        self.server_procs = []
        await self.stop_worker()
        queues = await delete_mailroom_topology([self.prefix])
        REGISTRY.prefixes.discard(self.prefix)
        if self.database and self.database in REGISTRY.databases:
            await drop_database(self.database)
        self.extra["queues_at_stop"] = queues
        self.extra["log_problems"] = scan_logs(self.run_dir)
        for name, messages in queues.items():
            if messages:
                self.notes.append(f"queue {name} held {messages} message(s) at stop")
        log.info("%s: stopped; its queues and exchanges deleted", self.name)


async def consumers(queue_name: str) -> int:
    """How many consumers ``queue_name`` has (0 if it does not exist yet)."""
    try:
        connection = await asyncio.wait_for(aio_pika.connect(AMQP_URL, timeout=5), 10)
    except (OSError, TimeoutError, aio_pika.exceptions.AMQPException):
        return 0
    async with connection:
        channel = await connection.channel()
        try:
            queue = await channel.declare_queue(queue_name, passive=True)
        except aio_pika.exceptions.AMQPException:
            return 0
        return queue.declaration_result.consumer_count or 0


def rabbitmqctl(*args: str) -> list[list[str]]:
    """Rows of ``rabbitmqctl -q <args>`` (tab-separated), without the header row."""
    done = subprocess.run(  # noqa: S603 - fixed argv
        ["rabbitmqctl", "-q", *args],  # noqa: S607 - from PATH, like cleanup_rabbit.py
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    rows = [line.split("\t") for line in done.stdout.splitlines() if line.strip()]
    return rows[1:] if rows and rows[0][0] == "name" else rows


async def delete_mailroom_topology(prefixes: Sequence[str]) -> dict[str, int]:
    """Delete every queue named ``<prefix>.*`` and exchange ``<prefix>[.*]`` (whatever
    topology the Mailroom version declares); return each deleted queue's message count."""
    owned = tuple(prefixes)
    dotted = tuple(f"{p}." for p in owned)
    queue_rows = await asyncio.to_thread(rabbitmqctl, "list_queues", "name", "messages")
    exchange_rows = await asyncio.to_thread(rabbitmqctl, "list_exchanges", "name")
    queues = {r[0]: int(r[1]) for r in queue_rows if len(r) == 2 and r[0].startswith(dotted)}
    exchanges = [r[0] for r in exchange_rows if r and (r[0] in owned or r[0].startswith(dotted))]
    connection = await asyncio.wait_for(aio_pika.connect(AMQP_URL, timeout=5), 10)
    async with connection:
        for queue_name in queues:
            channel = await connection.channel()
            with contextlib.suppress(aio_pika.exceptions.AMQPException):
                await channel.queue_delete(queue_name)
                await channel.close()
        for exchange in exchanges:
            channel = await connection.channel()
            with contextlib.suppress(aio_pika.exceptions.AMQPException):
                await channel.exchange_delete(exchange)
                await channel.close()
    return queues


_PROBLEM = re.compile(r" (WARNING|ERROR|CRITICAL) |Traceback")
_NOISE = (
    (re.compile(r"[0-9a-f]{32}"), "<id>"),
    (re.compile(r"bench-[\w.-]+@[\w.-]+"), "<addr>"),
    (re.compile(r"\b\d+(\.\d+)?s\b"), "<n>s"),
)


def scan_logs(run_dir: Path) -> dict[str, Any]:
    """Count WARNING/ERROR/Traceback lines in Mailroom's logs, by distinct message."""
    count = 0
    kinds: dict[str, int] = {}
    for path in sorted(run_dir.glob("*.log")):
        role = re.sub(r"\d+$", "", path.stem)
        for line in path.read_text(errors="replace").splitlines():
            if not _PROBLEM.search(line):
                continue
            count += 1
            text = line.split(" ", 2)[-1] if line[:2].isdigit() else line
            for pattern, repl in _NOISE:
                text = pattern.sub(repl, text)
            key = f"{role}: {text[:300]}"
            kinds[key] = kinds.get(key, 0) + 1
    top = sorted(kinds.items(), key=lambda kv: -kv[1])[:10]
    return {"lines": count, "kinds": dict(top)}


# --------------------------------------------------------------------------------------
# Measurements.


@dataclass
class Batch:
    """One measured batch of requests against one system."""

    requested: int
    accepted: int
    http_errors: int
    accepted_per_s: float
    p50_ms: float
    p99_ms: float
    all_delivered: bool
    delivered: int
    lost: int
    duplicates: int
    unexpected: int
    to_all_delivered_s: float
    e2e_mails_per_s: float
    lag_after_load_s: float
    peak_rss_mb: float
    peak_pss_mb: float
    processes: int
    cpu_ms_per_mail: float
    rabbit_cpu_ms_per_mail: float
    client_cpu_ms_per_req: float
    machine_busy_cores: float
    other_cores: float
    detail: dict[str, Any] = field(default_factory=dict)
    peak_rss_one_worker_mb: float = 0.0  # the servers and the worker that held the most
    peak_rss_one_worker_roles: dict[str, float] = field(default_factory=dict)  # at that peak
    mode: str = "close"
    concurrency: int = 0
    connections_per_request: float = 0.0
    speed_probe_ms: float = 0.0  # speed_probe() just before the batch


async def wait_delivered(
    sink: Sink, addrs: Sequence[str], deadline: float, stall: float
) -> tuple[int, float]:
    """Poll until every address arrived, or no progress for ``stall`` s, or ``deadline``.
    Returns (unique arrivals, time the last new one was seen)."""
    last_count, last_change = -1, time.monotonic()
    last_new = time.monotonic()
    while True:
        sink.poll()
        unique, _ = sink.counted(addrs)
        now = time.monotonic()
        if unique != last_count:
            last_count, last_change = unique, now
            last_new = now
        if unique >= len(addrs) or now > deadline or now - last_change > stall:
            return unique, last_new
        await asyncio.sleep(0.02)


async def _poll_sink(sink: Sink) -> None:
    while True:
        sink.poll()
        await asyncio.sleep(0.05)


def speed_probe() -> float:
    """Milliseconds this process takes for ``sum(range(10**6))``, the best of three: how
    fast the machine runs Python just now. Its speed drifts within minutes here (the same
    commit's rate by a fifth and more), so each batch says what it ran on."""
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        sum(range(10**6))
        best = min(best, time.perf_counter() - started)
    return best * 1000


async def measure(
    system: System,
    sink: Sink,
    tag: str,
    n: int,
    opts: Options,
    mode: str = "close",
    concurrency: int | None = None,
) -> Batch:
    """Send ``n`` mails (``mode``: close, keepalive or batch), wait for them, and measure
    the system while it works."""
    concurrency = opts.concurrency if concurrency is None else concurrency
    addrs = addresses(tag, n)
    probe_ms = speed_probe()  # before the samplers: its CPU is not the batch's
    app = Sampler(system.roots())
    rabbit = Sampler(
        {f"rabbitmq{i}": pid for i, pid in enumerate(pids_named("beam.smp"))}, interval=1.0
    )
    app.start()
    rabbit.start()
    busy0, total0 = cpu_jiffies()
    own0, sink0 = own_cpu_s(), sink.cpu_s()
    poller = asyncio.create_task(_poll_sink(sink))
    try:
        if mode == "batch":
            load = await run_batch_load(
                system.ports,
                addrs,
                opts.batch_size,
                concurrency,
                opts.request_timeout,
                opts.load_timeout,
            )
        else:
            load = await run_load(
                system.ports, addrs, concurrency, opts.request_timeout, opts.load_timeout, mode
            )
    except BaseException:
        await app.stop()
        await rabbit.stop()
        raise
    finally:
        poller.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await poller
    deadline = time.monotonic() + opts.delivery_timeout
    unique, last_new = await wait_delivered(sink, load.accepted, deadline, opts.stall_timeout)
    usage = await app.stop()
    rabbit_usage = await rabbit.stop()
    busy1, total1 = cpu_jiffies()
    ours = usage.cpu_s + rabbit_usage.cpu_s + own_cpu_s() - own0 + sink.cpu_s() - sink0
    seconds = (total1 - total0) / CLK_TCK / (os.cpu_count() or 1)
    busy_s = (busy1 - busy0) / CLK_TCK
    await asyncio.sleep(opts.settle)  # late duplicates
    sink.poll()
    unique, total = sink.counted(load.accepted)
    accepted_set = set(load.accepted)
    arrived = sink.with_tag(tag)
    unexpected = sum(1 for a in arrived if a not in accepted_set)
    ids = [sink.ids.get(i, 0) for i in load.job_ids]
    done = unique == len(load.accepted)
    to_all = last_new - load.started
    delivered_total = max(unique, 1)
    batch = Batch(
        requested=n,
        accepted=len(load.accepted),
        http_errors=n - len(load.accepted),
        accepted_per_s=len(load.accepted) / load.seconds,
        p50_ms=percentile(load.latencies, 50) * 1000,
        p99_ms=percentile(load.latencies, 99) * 1000,
        all_delivered=done,
        delivered=unique,
        lost=len(load.accepted) - unique,
        duplicates=total - unique,
        unexpected=unexpected,
        to_all_delivered_s=to_all,
        e2e_mails_per_s=unique / max(to_all, 1e-9),
        lag_after_load_s=max(0.0, last_new - load.ended),
        peak_rss_mb=usage.peak_rss_mb,
        peak_pss_mb=usage.peak_pss_mb,
        peak_rss_one_worker_mb=usage.peak_rss_one_worker_mb,
        peak_rss_one_worker_roles=usage.peak_rss_one_worker_roles,
        processes=usage.processes,
        cpu_ms_per_mail=usage.cpu_s * 1000 / delivered_total,
        rabbit_cpu_ms_per_mail=rabbit_usage.cpu_s * 1000 / delivered_total,
        client_cpu_ms_per_req=load.client_cpu_s * 1000 / max(load.sent, 1),
        machine_busy_cores=busy_s / max(seconds, 1e-9),
        other_cores=max(0.0, busy_s - ours) / max(seconds, 1e-9),
        mode=mode,
        concurrency=concurrency,
        connections_per_request=load.connections / max(load.http_requests, 1),
        speed_probe_ms=probe_ms,
        detail={
            "http_requests": load.http_requests,
            "connections": load.connections,
            "statuses": load.statuses,
            "errors": load.errors,
            "load_seconds": round(load.seconds, 3),
            "load_timed_out": load.timed_out,
            "job_ids": len(load.job_ids),
            "job_ids_missing_at_sink": sum(1 for c in ids if c == 0),
            "job_ids_duplicated_at_sink": sum(1 for c in ids if c > 1),
            "cpu_ms_per_mail_by_role": {
                role: round(cpu * 1000 / delivered_total, 3)
                for role, cpu in usage.cpu_by_role.items()
            },
        },
    )
    log.info(
        "%s %s %s c=%d: %d/%d accepted, %.0f req/s, p50 %.0f ms, p99 %.0f ms; %d delivered in %.2fs"
        " (%.0f mails/s), lost %d, dup %d; CPU %.2f ms/mail (+RabbitMQ %.2f), RSS %.0f MB;"
        " speed probe %.1f ms",
        system.name,
        tag,
        mode,
        concurrency,
        batch.accepted,
        n,
        batch.accepted_per_s,
        batch.p50_ms,
        batch.p99_ms,
        unique,
        to_all,
        batch.e2e_mails_per_s,
        batch.lost,
        batch.duplicates,
        batch.cpu_ms_per_mail,
        batch.rabbit_cpu_ms_per_mail,
        batch.peak_rss_mb,
        batch.speed_probe_ms,
    )
    return batch


async def warm_up(system: System, sink: Sink, tag: str, opts: Options) -> None:
    if opts.warmup <= 0:
        return
    load = await run_load(
        system.ports, addresses(tag, opts.warmup), opts.concurrency, opts.request_timeout, 60
    )
    unique, _ = await wait_delivered(sink, load.accepted, time.monotonic() + 60, 20)
    log.info(
        "%s: warm-up %d/%d accepted, %d delivered",
        system.name,
        len(load.accepted),
        opts.warmup,
        unique,
    )
    if not load.accepted:
        raise BenchError(f"{system.name}: the warm-up got no request accepted: {load.errors}")


METRICS: tuple[tuple[str, str, str], ...] = (
    # (Batch field, label, format)
    ("accepted_per_s", "accepted req/s", "{:.0f}"),
    ("p50_ms", "accept latency p50 (ms)", "{:.0f}"),
    ("p99_ms", "accept latency p99 (ms)", "{:.0f}"),
    ("e2e_mails_per_s", "end-to-end mails/s (all delivered)", "{:.0f}"),
    ("to_all_delivered_s", "time until all delivered (s)", "{:.2f}"),
    ("lag_after_load_s", "last mail after last accept (s)", "{:.2f}"),
    ("lost", "lost mails", "{:.0f}"),
    ("duplicates", "duplicate mails", "{:.0f}"),
    ("http_errors", "requests not accepted", "{:.0f}"),
    ("peak_rss_mb", "peak RSS, app processes (MB)", "{:.0f}"),
    ("peak_pss_mb", "peak PSS, app processes (MB)", "{:.0f}"),
    ("cpu_ms_per_mail", "CPU per mail, app (ms)", "{:.2f}"),
    ("rabbit_cpu_ms_per_mail", "CPU per mail, RabbitMQ (ms)", "{:.2f}"),
    ("total_cpu_ms_per_mail", "CPU per mail, app + RabbitMQ (ms)", "{:.2f}"),
    ("client_cpu_ms_per_req", "CPU per request, load generator (ms)", "{:.2f}"),
    ("machine_busy_cores", "machine CPU busy during batch (cores)", "{:.2f}"),
    ("other_cores", "CPU used by unrelated processes (cores)", "{:.2f}"),
    ("connections_per_request", "TCP connections per HTTP request", "{:.2f}"),
    ("speed_probe_ms", "speed probe: ms for sum(range(10**6)), higher is slower", "{:.1f}"),
)
COUNT_METRICS = {"lost", "duplicates", "http_errors"}
CONTEXT_METRICS = {
    "client_cpu_ms_per_req",
    "machine_busy_cores",
    "other_cores",
    "connections_per_request",
    "speed_probe_ms",
}
# No ratio either: a ratio to a lag of about 0 s says nothing (the targets row says it).
NO_RATIO = CONTEXT_METRICS | {"lag_after_load_s"}  # no ratios


def summarize(batches: Sequence[Batch]) -> dict[str, float]:
    """Median of each metric over the batches (sums for the loss counters)."""
    out: dict[str, float] = {}
    for key, _, _ in METRICS:
        if key == "total_cpu_ms_per_mail":
            values = [b.cpu_ms_per_mail + b.rabbit_cpu_ms_per_mail for b in batches]
        else:
            values = [float(getattr(b, key)) for b in batches]
        out[key] = float(sum(values)) if key in COUNT_METRICS else statistics.median(values)
    return out


async def probe_batch(system: System, opts: Options, tag: str) -> str | None:
    """None when ``POST /api/messages/batch`` takes a one-item batch, else why not."""
    conn = KeepAliveConnection(system.ports[0])
    try:
        status, body = await conn.request(
            "POST",
            "/api/messages/batch",
            opts.request_timeout,
            batch_body(addresses(tag, 1)),
            "application/json",
        )
    except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
        return f"the probe failed: {type(exc).__name__}: {exc}"
    finally:
        await conn.close()
    if status in (404, 405):
        return f"not available (POST /api/messages/batch answered {status})"
    if not 200 <= status < 300:
        return f"the probe answered {status}: {body[:200].decode(errors='replace')}"
    return None


def group(batches: Sequence[Batch]) -> dict[str, Any]:
    return {
        "median": summarize(batches),
        "cpu_ms_per_mail_by_role": {
            role: statistics.median(b.detail["cpu_ms_per_mail_by_role"][role] for b in batches)
            for role in (batches[0].detail["cpu_ms_per_mail_by_role"] if batches else {})
        },
        "batches": [asdict(b) for b in batches],
    }


@dataclass
class Collected:
    """One system's batches over every round (each round starts it afresh)."""

    name: str
    label: str = ""
    modes: dict[str, dict[int, list[Batch]]] = field(default_factory=dict)
    batch: list[Batch] = field(default_factory=list)
    batch_unavailable: str | None = None
    notes: list[str] = field(default_factory=list)
    extras: list[dict[str, Any]] = field(default_factory=list)


async def run_system(
    system: System, sink: Sink, opts: Options, run_id: str, rnd: int, into: Collected
) -> None:
    """Start, warm up, then for each load mode and client concurrency measure batches
    (``--repeat`` at ``--concurrency``, ``--load-repeat`` at the other concurrencies),
    and the batch endpoint for Mailroom; stop. The batches go ``into`` this system's
    collection; ``rnd`` is the round (each has its own run directory and database)."""
    system.run_dir = opts.workdir / f"{system.name}.{rnd}"
    system.configure(sink.port)
    log.info("=== %s: %s (round %d of %d)", system.name, system.label, rnd + 1, opts.rounds)
    into.label = system.label
    concurrencies = sorted({opts.concurrency, *opts.load_concurrencies})
    try:
        await system.start()
        await warm_up(system, sink, f"{run_id}.{system.name}.w{rnd}", opts)
        for mode in opts.modes:
            for c in concurrencies:
                done = into.modes.setdefault(mode, {}).setdefault(c, [])
                for _ in range(opts.repeat if c == opts.concurrency else opts.load_repeat):
                    tag = f"{run_id}.{system.name}.{mode[0]}{c}-{len(done)}"
                    done.append(await measure(system, sink, tag, opts.requests, opts, mode, c))
        if isinstance(system, Mailroom) and opts.batch_size > 0:
            why = await probe_batch(system, opts, f"{run_id}.{system.name}.bp{rnd}")
            if why is None:
                for _ in range(opts.repeat):
                    tag = f"{run_id}.{system.name}.b-{len(into.batch)}"
                    into.batch.append(
                        await measure(
                            system, sink, tag, opts.requests, opts, "batch", opts.batch_concurrency
                        )
                    )
            else:
                log.info("%s: batch endpoint %s", system.name, why)
                into.batch_unavailable = why
                if opts.rounds > 1:  # another round may have batches: say this one has none
                    system.notes.append(f"batch endpoint {why}: no batch in this round")
    finally:
        await system.stop()
        into.notes.extend(f"round {rnd + 1}: {n}" if opts.rounds > 1 else n for n in system.notes)
        into.extras.append(system.extra)


def system_results(collected: Collected, opts: Options) -> dict[str, Any]:
    """A system's figures over all its rounds: each metric the median of its batches."""
    out: dict[str, Any] = {"name": collected.name, "label": collected.label, "modes": {}}
    for mode, by_c in collected.modes.items():
        out["modes"][mode] = {str(c): group(batches) for c, batches in by_c.items() if batches}
    if collected.batch:
        out["batch"] = group(collected.batch)
    elif collected.batch_unavailable is not None:
        out["batch"] = {"unavailable": collected.batch_unavailable}
    main = out["modes"].get("close", out["modes"].get("keepalive", {})).get(str(opts.concurrency))
    if main:  # the headline figures: connection per request at --concurrency
        out["median"] = main["median"]
        out["cpu_ms_per_mail_by_role"] = main["cpu_ms_per_mail_by_role"]
        out["batches"] = main["batches"]
    out["notes"] = collected.notes
    for extra in collected.extras:  # queues left at stop and log problems: over all rounds
        for key, value in extra.items():
            if key == "queues_at_stop":
                queues = out.setdefault(key, {})
                for name, messages in value.items():
                    queues[name] = queues.get(name, 0) + messages
            elif key == "log_problems":
                problems = out.setdefault(key, {"lines": 0, "kinds": {}})
                problems["lines"] += value["lines"]
                for kind, count in value["kinds"].items():
                    problems["kinds"][kind] = problems["kinds"].get(kind, 0) + count
            else:
                out[key] = value
    if problems := out.get("log_problems"):  # each round's top ten, merged: the top ten
        top = sorted(problems["kinds"].items(), key=lambda kv: -kv[1])[:10]
        problems["kinds"] = dict(top)
    return out


async def drain_once(
    system: Mailroom, sink: Sink, opts: Options, tag: str, n: int
) -> dict[str, Any]:
    """Queue ``n`` mails with the worker stopped, then time a new worker alone."""
    await system.stop_worker()
    load = await run_load(
        system.ports, addresses(tag, n), opts.concurrency, opts.request_timeout, opts.load_timeout
    )
    sink.poll()
    before = len(sink.with_tag(tag))
    await system.start_worker()
    sampler = Sampler(system.roots())
    sampler.start()
    await wait_delivered(
        sink, load.accepted, time.monotonic() + opts.delivery_timeout, opts.stall_timeout
    )
    usage = await sampler.stop()
    await asyncio.sleep(opts.settle)
    sink.poll()
    unique, total = sink.counted(load.accepted)
    firsts = sorted(times[0] for times in sink.with_tag(tag).values())
    span = firsts[-1] - firsts[0] if len(firsts) > 1 else float("nan")
    k95 = max(1, int(0.95 * len(firsts)) - 1)
    span95 = firsts[k95] - firsts[0] if len(firsts) > 1 else float("nan")
    drain = {
        "server_alone_req_per_s": len(load.accepted) / load.seconds,
        "server_alone_p99_ms": percentile(load.latencies, 99) * 1000,
        "queued": len(load.accepted),
        "delivered_before_worker": before,
        "delivered": unique,
        "lost": len(load.accepted) - unique,
        "duplicates": total - unique,
        "seconds_first_to_last": span,
        "mails_per_s": (len(firsts) - 1) / span if span > 0 else 0.0,
        "mails_per_s_first_95pct": k95 / span95 if span95 > 0 else 0.0,
        "cpu_ms_per_mail": usage.cpu_s * 1000 / max(unique, 1),
        "peak_rss_mb": usage.peak_rss_mb,
    }
    log.info(
        "%s drain: %d mails in %.2fs = %.0f mails/s (first 95%%: %.0f), lost %d, dup %d, "
        "worker CPU %.2f ms/mail; server alone took %.0f req/s",
        system.name,
        unique,
        span,
        drain["mails_per_s"],
        drain["mails_per_s_first_95pct"],
        drain["lost"],
        drain["duplicates"],
        drain["cpu_ms_per_mail"],
        drain["server_alone_req_per_s"],
    )
    return drain


async def sweep_one(
    concurrency: int, sink: Sink, opts: Options, run_id: str, n: int, repeat: int
) -> dict[str, Any]:
    """Mailroom with one WORKER_CONCURRENCY: end to end, then draining a queued backlog."""
    system = Mailroom(opts, 1, concurrency, f"sweep-c{concurrency}")
    system.configure(sink.port)
    log.info("=== sweep: WORKER_CONCURRENCY=%d", concurrency)
    e2e: list[Batch] = []
    drains: list[dict[str, Any]] = []
    try:
        await system.start()
        await warm_up(system, sink, f"{run_id}.{system.name}.w", opts)
        for r in range(repeat):
            e2e.append(await measure(system, sink, f"{run_id}.{system.name}.e{r}", n, opts))
            drains.append(await drain_once(system, sink, opts, f"{run_id}.{system.name}.d{r}", n))
    finally:
        await system.stop()
    drain = {
        key: (sum if key in ("lost", "duplicates") else statistics.median)(d[key] for d in drains)
        for key in drains[0]
    }
    return {
        "concurrency": concurrency,
        "e2e": summarize(e2e),
        "drain": drain,
        "e2e_batches": [asdict(b) for b in e2e],
        "drain_batches": drains,
        "notes": system.notes,
        **system.extra,
    }


def recommend(sweep: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Smallest concurrency whose backlog drain rate is within 5% of the best one."""
    if not sweep:
        return {}
    rates = {s["concurrency"]: float(s["drain"]["mails_per_s"]) for s in sweep}
    best = max(rates, key=lambda c: rates[c])
    near = sorted(c for c, r in rates.items() if r >= 0.95 * rates[best])
    return {
        "fastest": best,
        "within_5pct": near,
        "smallest_within_5pct": near[0],
        "drain_rates": rates,
    }


# --------------------------------------------------------------------------------------
# Report.


def fmt(value: float, pattern: str) -> str:
    if value != value:  # NaN
        return "n/a"
    return pattern.format(value)


def ratio(a: float, b: float) -> str:
    if a != a or b != b:
        return "n/a"
    if b == 0:
        return "=" if a == 0 else "n/a"
    return f"{a / b:.2f}x"


REF = "ref-b"  # the issue's targets are ratios to reference b
TARGET_SYSTEM = "mailroom"
ORDER = ("ref-a", "ref-b", "mailroom", "mailroom-pg", "mailroom-2srv", "mailroom-2wrk")


def _median(system: dict[str, Any] | None, mode: str, c: int) -> dict[str, float] | None:
    if system is None:
        return None
    if mode == "batch":
        found = system.get("batch", {})
    else:
        found = system.get("modes", {}).get(mode, {}).get(str(c), {})
    median: dict[str, float] | None = found.get("median")
    return median


def _all_batches(system: dict[str, Any]) -> list[dict[str, Any]]:
    found = [
        b for by_c in system.get("modes", {}).values() for g in by_c.values() for b in g["batches"]
    ]
    return found + list(system.get("batch", {}).get("batches", []))


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with the value measured in this run and whether it is met."""
    systems = {s["name"]: s for s in results["systems"]}
    c = results["config"]["concurrency"]
    me, ref, pg = systems.get(TARGET_SYSTEM), systems.get(REF), systems.get("mailroom-pg")
    rows: list[dict[str, Any]] = []

    def add(target: str, measured: str, met: bool | None) -> None:
        rows.append({"target": target, "measured": measured, "met": met})

    def r(a: float, b: float) -> float:
        return a / b if b else float("nan")

    for mode, want in (("keepalive", 2.2), ("close", 1.6)):
        mine, theirs = _median(me, mode, c), _median(ref, mode, c)
        label = f"end-to-end mails/s, {MODE_LABEL[mode]}: >= {want}x {REF}"
        if mine and theirs:
            x = r(mine["e2e_mails_per_s"], theirs["e2e_mails_per_s"])
            add(
                label,
                f"{x:.2f}x ({mine['e2e_mails_per_s']:.0f} vs {theirs['e2e_mails_per_s']:.0f})",
                x >= want,
            )
        else:
            add(label, "not measured", None)
    lags = {m: _median(me, m, c) for m in (*MODES, "batch")}
    lag = {m: v["lag_after_load_s"] for m, v in lags.items() if v}
    add(
        "last mail <= 1 s after the last accepted request",
        ", ".join(f"{MODE_LABEL[m]} {v:.2f} s" for m, v in lag.items()) or "not measured",
        max(lag.values()) <= 1.0 if lag else None,
    )
    for key, label, want in (
        ("total_cpu_ms_per_mail", f"CPU per mail (app + RabbitMQ) <= 0.6x {REF}", 0.6),
        ("p99_ms", f"accept p99 <= 0.6x {REF} at concurrency {c}", 0.6),
    ):
        parts, oks = [], []
        for mode in MODES:
            mine, theirs = _median(me, mode, c), _median(ref, mode, c)
            if mine and theirs:
                x = r(mine[key], theirs[key])
                parts.append(
                    f"{MODE_LABEL[mode]} {x:.2f}x ({mine[key]:.2f} vs {theirs[key]:.2f})"
                    if key != "p99_ms"
                    else f"{MODE_LABEL[mode]} {x:.2f}x ({mine[key]:.0f} vs {theirs[key]:.0f} ms)"
                )
                oks.append(x <= want)
        add(label, "; ".join(parts) or "not measured", all(oks) if oks else None)
    batch = (me or {}).get("batch", {})
    ref_best = max(
        (m["e2e_mails_per_s"] for mode in MODES if (m := _median(ref, mode, c))), default=0.0
    )
    label = f"batch endpoint mails/s >= 4x {REF} (its best mode)"
    if batch.get("median") and ref_best:
        x = r(batch["median"]["e2e_mails_per_s"], ref_best)
        add(label, f"{x:.2f}x ({batch['median']['e2e_mails_per_s']:.0f} vs {ref_best:.0f})", x >= 4)
    else:
        add(label, batch.get("unavailable", "not measured"), None)
    if me:
        every = _all_batches(me)
        lost = sum(b["lost"] + b["unexpected"] for b in every)
        dup = sum(b["duplicates"] for b in every)
        mails = sum(b["accepted"] for b in every)
        add(
            "0 lost and 0 duplicates (issue: at N=20000)",
            f"{lost} lost, {dup} duplicates over {mails} accepted mails in {len(every)} batches "
            f"(largest batch {max((b['requested'] for b in every), default=0)})",
            lost == 0 and dup == 0,
        )
        # Runs before 2026-12-06 kept only the sum over all app processes (one worker then).
        top: dict[str, Any] = max(
            every, key=lambda b: b.get("peak_rss_one_worker_mb") or b["peak_rss_mb"], default={}
        )
        rss = top.get("peak_rss_one_worker_mb") or top.get("peak_rss_mb", float("nan"))
        # The servers and the worker that held the most: the roles summed into the peak.
        at_peak: dict[str, float] = top.get("peak_rss_one_worker_roles", {})
        workers = [role for role in at_peak if role.startswith("worker")]
        summed = [role for role in at_peak if role not in workers]
        summed += [max(workers, key=at_peak.__getitem__)] if workers else []
        roles = " + ".join(f"{role} {at_peak[role]:.0f}" for role in summed)
        everything = max((b["peak_rss_mb"] for b in every), default=float("nan"))
        add(
            "peak RSS server + one worker <= 150 MB",
            f"{rss:.0f} MB (max over batches{f': {roles}' if roles else ''}; "
            f"{everything:.0f} MB with every worker)",
            rss <= 150,
        )
    parts, oks = [], []
    for mode in (*MODES, "batch"):
        a, b = _median(pg, mode, c), _median(me, mode, c)
        if a and b:
            x = r(a["e2e_mails_per_s"], b["e2e_mails_per_s"])
            parts.append(
                f"{MODE_LABEL[mode]} {x:.2f}x "
                f"({a['e2e_mails_per_s']:.0f} vs {b['e2e_mails_per_s']:.0f})"
            )
            oks.append(x >= 0.8)
    add(
        "PostgreSQL mails/s within 20% of SQLite (>= 0.8x)",
        "; ".join(parts) or "not measured",
        all(oks) if oks else None,
    )
    return rows


def keepalive_support(results: dict[str, Any]) -> list[str]:
    """Whether each server kept the keep-alive clients' connections open: TCP connections
    opened against the client connections (one per client if the server keeps them all)."""
    lines = []
    for s in results["systems"]:
        batches = [
            b for g in s.get("modes", {}).get("keepalive", {}).values() for b in g["batches"]
        ]
        if not batches:
            continue
        opened = sum(b["detail"].get("connections", 0) for b in batches)
        answered = sum(b["detail"].get("http_requests", 0) for b in batches)
        clients = sum(min(b["concurrency"], b["requested"]) for b in batches)
        if not answered:
            continue
        if opened >= 0.9 * answered:
            verdict = (
                "**does not keep connections alive**: it "
                "closed the connection after every response, so its keep-alive figures are "
                "connection-per-request figures"
            )
        elif opened <= clients * 1.05:
            verdict = "keeps connections alive (one connection per client)"
        else:
            verdict = "closed some connections (the clients reopened them)"
        lines.append(
            f"- `{s['name']}`: {opened} TCP connections for {answered} requests from "
            f"{clients} client connections: {verdict}."
        )
    return lines


def busy_cores(g: dict[str, Any]) -> str:
    """Cores in use during a group's batches (medians): each process tree's (its CPU per mail
    times mails/s: its CPU time over the time to the last mail, so a little high, as the
    sampling starts before the load and ends after the last mail) and the whole machine's.
    A tree near one core while the machine has cores to spare may be a process at its
    limit, or one waiting for a CPU: its threads' schedstat tells (bench/README.md)."""
    roles: dict[str, list[float]] = {}
    for b in g["batches"]:
        for role, ms in b.get("detail", {}).get("cpu_ms_per_mail_by_role", {}).items():
            roles.setdefault(role, []).append(ms * b["e2e_mails_per_s"] / 1000)
    trees = ", ".join(f"{r} {statistics.median(v):.2f}" for r, v in roles.items())
    machine = g["median"].get("machine_busy_cores", float("nan"))  # group() took it
    return f"cores in use: {trees}; the machine {machine:.2f}"


def render(results: dict[str, Any]) -> str:
    systems = {s["name"]: s for s in results["systems"]}
    cfg = results["config"]
    env = results["environment"]
    c = cfg["concurrency"]
    modes = cfg.get("modes", ["close"])
    mailroom = results.get("mailroom", {})
    others = ", ".join(str(x) for x in cfg.get("load_concurrencies", [c]) if x != c)
    rounds = cfg.get("rounds", 1)
    out = [
        "# Mailroom vs reference stack",
        "",
        f"Measured {results['date']}; Mailroom "
        + ", ".join(f"{k}: {v}" for k, v in mailroom.items())
        + f"; bench at {results.get('bench_commit', '?')}.",
        "",
        f"Machine: {env['machine']}; Python {env.get('python', '?')}; load average before the "
        f"run: {env['loadavg_before']}, after: {env.get('loadavg_after', '?')}.",
        "",
        f"Load: N={cfg['requests']} mails per batch; client concurrency {c} (median of "
        f"{cfg['repeat'] * rounds} batch(es)) and {others or 'no other'} "
        f"({cfg.get('load_repeat', 1) * rounds} batch(es) each), over {rounds} round(s) in "
        "which each system ran in turn, started afresh; HTTP/1.1 modes: "
        f"{cfg['http']}; "
        "batch endpoint: "
        f"{cfg.get('batch_size', 0)} mails per request, {cfg.get('batch_concurrency', 0)} requests "
        f"in flight, keep-alive. Warm-up {cfg['warmup']}. Lost/duplicates/not accepted: sums. "
        "All ratios come from this one run.",
        "",
    ]
    rows = targets(results)
    if TARGET_SYSTEM in systems and REF in systems:
        out += [
            f"## Targets of issue 15 (`{TARGET_SYSTEM}` against `{REF}`, concurrency {c})",
            "",
            "| target | measured | met |",
            "|---|---|---|",
        ]
        for row in rows:
            met = {True: "yes", False: "**no**", None: "n/a"}[row["met"]]
            out.append(f"| {row['target']} | {row['measured']} | {met} |")
        out.append("")
    ka = keepalive_support(results)
    if ka:
        out += ["Keep-alive: does each server keep the client's connection open?", "", *ka, ""]
    if results.get("plot"):
        out += [
            f"![mails/s and accept p99 against client concurrency]({results['plot']})",
            "",
        ]
    order = [n for n in ORDER if n in systems]
    mine_names = [n for n in order if n.startswith("mailroom")]
    for mode in modes:
        present = [n for n in order if _median(systems[n], mode, c)]
        if not present:
            continue
        pairs = [m for m in mine_names if m in present] if REF in present else []
        head = ["metric", *present, *[f"{m} / {REF}" for m in pairs]]
        out += [
            f"## {MODE_LABEL[mode].capitalize()}, concurrency {c}",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "---|" * len(head),
        ]
        meds = {n: _median(systems[n], mode, c) or {} for n in present}
        for key, label, pattern in METRICS:
            cells = [label]
            for n in present:
                cells.append(fmt(meds[n].get(key, float("nan")), pattern))
            for mine_name in pairs:
                mine = meds[mine_name].get(key, float("nan"))
                theirs = meds[REF].get(key, float("nan"))
                cells.append("" if key in NO_RATIO else ratio(mine, theirs))
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    out += [
        "Ratios are Mailroom divided by the reference: above 1x is better for req/s and mails/s, "
        "below 1x is better for latency, time, memory and CPU (`=`: both zero).",
        "",
    ]
    batch_rows = [n for n in order if "batch" in systems[n]]
    if batch_rows:
        ref_best = max(
            (
                med["e2e_mails_per_s"]
                for mode in MODES
                if (med := _median(systems.get(REF), mode, c))
            ),
            default=float("nan"),
        )
        out += [
            f"## Batch endpoint (`POST /api/messages/batch`, {cfg.get('batch_size')} mails per "
            f"request, {cfg.get('batch_concurrency')} in flight)",
            "",
            f"| system | mails/s | / {REF} best mode | batch request p50 / p99 (ms) | last mail "
            "after last accept (s) | CPU ms/mail app + RabbitMQ | lost | dup |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for n in batch_rows:
            b = systems[n]["batch"]
            if "unavailable" in b:
                out.append(f"| {n} | {b['unavailable']} | | | | | | |")
                continue
            m = b["median"]
            out.append(
                f"| {n} | {m['e2e_mails_per_s']:.0f} | {ratio(m['e2e_mails_per_s'], ref_best)} | "
                f"{m['p50_ms']:.0f} / {m['p99_ms']:.0f} | {m['lag_after_load_s']:.2f} | "
                f"{m['total_cpu_ms_per_mail']:.2f} | {m['lost']:.0f} | {m['duplicates']:.0f} |"
            )
        out.append("")
    sweep_rows = []
    for n in order:
        for mode in modes:
            for cs, g in sorted(
                systems[n].get("modes", {}).get(mode, {}).items(), key=lambda kv: int(kv[0])
            ):
                m = g["median"]
                ref_m = _median(systems.get(REF), mode, int(cs))
                sweep_rows.append(
                    f"| {n} | {MODE_LABEL[mode]} | {cs} | {m['accepted_per_s']:.0f} | "
                    f"{m['e2e_mails_per_s']:.0f} | "
                    f"{ratio(m['e2e_mails_per_s'], ref_m['e2e_mails_per_s']) if ref_m else 'n/a'}"
                    " | "
                    f"{m['p50_ms']:.0f} | {m['p99_ms']:.0f} | "
                    f"{ratio(m['p99_ms'], ref_m['p99_ms']) if ref_m else 'n/a'} | "
                    f"{m['lag_after_load_s']:.2f} | {m['total_cpu_ms_per_mail']:.2f} | "
                    f"{m.get('connections_per_request', float('nan')):.2f} | "
                    f"{m['lost']:.0f} | {m['duplicates']:.0f} |"
                )
    if sweep_rows:
        out += [
            "## Client concurrency sweep",
            "",
            f"| system | mode | concurrency | accepted req/s | mails/s | mails/s / {REF} "
            f"| p50 (ms) | p99 (ms) | p99 / {REF} | last mail after last accept (s) "
            "| CPU ms/mail app + RabbitMQ | TCP connections per request | lost | dup |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
            *sweep_rows,
            "",
        ]
    for n in order:
        s = systems[n]
        parts = []
        for mode in modes:
            g = s.get("modes", {}).get(mode, {}).get(str(c))
            if g:
                each = ", ".join(
                    f"{b['accepted_per_s']:.0f}/{b['e2e_mails_per_s']:.0f}" for b in g["batches"]
                )
                split = ", ".join(f"{r} {ms:.2f}" for r, ms in g["cpu_ms_per_mail_by_role"].items())
                parts.append(
                    f"{MODE_LABEL[mode]}: {each} (CPU ms per mail by tree: {split}; "
                    f"{busy_cores(g)})"
                )
        out.append(
            f"- `{n}`: {s['label']}; each batch's accepted req/s / e2e mails/s at concurrency "
            f"{c}: " + "; ".join(parts)
        )
    out.append("")
    sweep = results.get("sweep") or []
    if sweep:
        rec = results["recommendation"]
        out += [
            "## WORKER_CONCURRENCY sweep (Mailroom, 1 server)",
            "",
            f"One fresh Mailroom (1 server) per value and a warm-up, then {cfg['sweep_repeat']} "
            f"rounds of an e2e batch and a drain batch of {cfg['sweep_requests']} requests each; "
            "medians (lost/dup: sums). End to end (e2e): HTTP load and worker at once, as above. "
            "Drain: the batch is queued with the worker stopped, then a new worker is timed "
            "alone from the first mail to the last (all) and to the 95th percentile mail "
            "(first 95%: leaves out stragglers such as retried mails). With the worker stopped "
            "the server alone accepted "
            + ", ".join(f"{x['drain']['server_alone_req_per_s']:.0f}" for x in sweep)
            + " req/s.",
            "",
            "| WORKER_CONCURRENCY | e2e accepted req/s | e2e p99 (ms) | e2e mails/s (each round) "
            "| last mail after last accept (s) | e2e CPU ms/mail | drain mails/s (all; each round) "
            "| drain mails/s (first 95%) | drain worker CPU ms/mail | lost | dup |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for s in sweep:
            e, d = s["e2e"], s["drain"]
            out.append(
                f"| {s['concurrency']} | {e['accepted_per_s']:.0f} | {e['p99_ms']:.0f} | "
                f"{e['e2e_mails_per_s']:.0f} ("
                + ", ".join(f"{b['e2e_mails_per_s']:.0f}" for b in s.get("e2e_batches", []))
                + ") | "
                f"{e['lag_after_load_s']:.2f} | {e['cpu_ms_per_mail']:.2f} | "
                f"{d['mails_per_s']:.0f} ("
                + ", ".join(f"{x['mails_per_s']:.0f}" for x in s.get("drain_batches", []))
                + f") | {d['mails_per_s_first_95pct']:.0f} | "
                f"{d['cpu_ms_per_mail']:.2f} | {e['lost'] + d['lost']:.0f} | "
                f"{e['duplicates'] + d['duplicates']:.0f} |"
            )
        out += [
            "",
            f"Fastest drain on this sink: WORKER_CONCURRENCY={rec['fastest']}; within 5% of it: "
            f"{rec['within_5pct']}. The sink answers at once, so this measures Mailroom's own "
            "cost per mail, not how well concurrency hides a remote server's latency (at best "
            "concurrency / seconds per SMTP transaction).",
            "",
        ]
    notes = [
        f"- {s['name']}: {note}"
        for s in [
            *results["systems"],
            *[{"name": f"sweep c={x['concurrency']}", **x} for x in sweep],
        ]
        for note in s.get("notes", [])
    ]
    problems = []
    for s in [*results["systems"], *sweep]:
        found = s.get("log_problems", {})
        if found.get("lines"):
            name = s.get("name") or f"sweep c={s['concurrency']}"
            problems.append(f"- {name}: {found['lines']} warning/error line(s) in its logs:")
            problems += [f"  - {count} x `{text}`" for text, count in found["kinds"].items()]
    if notes or problems:
        out += ["## Notes", "", *notes, *problems, ""]
    out += [f"Total benchmark time: {results.get('duration_s', 0):.0f} s.", ""]
    return "\n".join(out)


# --------------------------------------------------------------------------------------
# Main.


def machine_description() -> dict[str, Any]:
    """Cores, CPU model, memory, kernel and Python of this machine."""
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_gb = float("nan")
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gb = int(line.split()[1]) / 1024 / 1024
    cores = os.cpu_count() or 0
    return {
        "machine": f"{cores} cores ({model}), {mem_gb:.1f} GB RAM, {platform.machine()}, "
        f"Linux {platform.release()}",
        "cores": cores,
        "cpu_model": model,
        "memory_gb": round(mem_gb, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def git(*args: str) -> str:
    done = subprocess.run(  # noqa: S603 - fixed argv
        ["git", "-C", str(REPO), *args],  # noqa: S607 - git from PATH
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout.strip()


def mailroom_source(rev: str, workdir: Path) -> tuple[Path, dict[str, Any]]:
    """Where to run Mailroom from: ``worktree`` (the checkout as it is, other people's
    uncommitted edits included) or a git revision exported with ``git archive``."""
    if rev == "worktree":
        dirty = [
            line[3:] for line in git("status", "--porcelain", "--", "*.py").splitlines() if line
        ]
        head = git("rev-parse", "--short=10", "HEAD")
        return REPO, {"source": "worktree", "head": head, "uncommitted_py": dirty}
    try:
        commit = git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    except subprocess.CalledProcessError:
        raise BenchError(
            f"--mailroom-src {rev!r} is neither 'worktree' nor a git revision"
        ) from None
    dest = workdir / f"mailroom-{commit[:10]}"
    archive = subprocess.run(  # noqa: S603 - fixed argv
        ["git", "-C", str(REPO), "archive", "--format=tar", commit],  # noqa: S607
        capture_output=True,
        timeout=60,
        check=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    # The last commit that changed Mailroom itself (bench/ commits do not).
    code = git("log", "-1", "--format=%h %s", commit, "--", ".", ":(exclude)bench")
    return dest, {"source": f"git archive {rev}", "commit": commit[:10], "last_code_change": code}


def preflight(opts: Options, systems: Sequence[str], install: bool) -> str:
    sink = ensure_smtp_sink(install)
    with socket.socket() as sock:
        sock.settimeout(2)
        if sock.connect_ex((HOST, 5672)) != 0:
            raise BenchError(
                "RabbitMQ does not answer on 127.0.0.1:5672 (start it: scripts/ensure-rabbitmq.sh)"
            )
    if any(s.startswith("ref-") for s in systems):
        if not (opts.ref_dir / "stack.sh").is_file():
            raise BenchError(f"no reference stack at {opts.ref_dir}")
        if not (opts.ref_venv / "bin/celery").exists():
            log.info("creating the reference venv at %s (setup.sh)", opts.ref_venv)
            subprocess.run(  # noqa: S603 - fixed argv
                [str(opts.ref_dir / "setup.sh")],
                env=dict(os.environ, VENV=str(opts.ref_venv)),
                check=True,
                timeout=600,
                stdout=subprocess.DEVNULL,
            )
    if not opts.mailroom_python.exists():
        raise BenchError(f"no Python at {opts.mailroom_python} (create the venv first)")
    return sink


async def run(
    opts: Options,
    systems: Sequence[str],
    sweep: Sequence[int],
    sweep_requests: int,
    sweep_repeat: int,
    sink_binary: str,
) -> dict[str, Any]:
    run_id = uuid.uuid4().hex[:6]
    results: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "run_id": run_id,
        "config": {
            "requests": opts.requests,
            "concurrency": opts.concurrency,
            "warmup": opts.warmup,
            "repeat": opts.repeat,
            "rounds": opts.rounds,
            "systems": list(systems),
            "sweep": list(sweep),
            "sweep_requests": sweep_requests,
            "sweep_repeat": sweep_repeat,
            "mailroom_log_level": opts.mailroom_log_level or "default (INFO)",
            "http": ", ".join(f"{m} ({MODE_LABEL[m]})" for m in opts.modes),
            "modes": list(opts.modes),
            "load_concurrencies": sorted({opts.concurrency, *opts.load_concurrencies}),
            "load_repeat": opts.load_repeat,
            "batch_size": opts.batch_size,
            "batch_concurrency": opts.batch_concurrency,
        },
        "environment": {
            **machine_description(),
            "loadavg_before": " ".join(f"{x:.2f}" for x in os.getloadavg()),
            "sink": "postfix smtp-sink -D <dump file on tmpfs>",
            "storage": "logs and Mailroom's SQLite file on disk (tempfile.mkdtemp)",
        },
        "systems": [],
        "sweep": [],
    }
    sink = Sink(sink_binary, opts.sink_dir)
    await sink.start()
    collected = {name: Collected(name) for name in systems}
    try:
        for rnd, name in ((rnd, name) for rnd in range(opts.rounds) for name in systems):
            system: System
            if name in ("ref-a", "ref-b"):
                system = Reference(opts, name[-1])
            elif name == "mailroom":
                system = Mailroom(opts, 1, None, name, overflow=LAUNCHER_OVERFLOW)
            elif name == "mailroom-2srv":
                system = Mailroom(opts, 2, None, name, overflow=LAUNCHER_OVERFLOW)
            elif name == "mailroom-2wrk":
                system = Mailroom(opts, 1, None, name, workers=2)
            elif name == "mailroom-pg":
                system = Mailroom(opts, 1, None, name, postgres=True, overflow=LAUNCHER_OVERFLOW)
            else:
                raise BenchError(f"unknown system {name!r}")
            await run_system(system, sink, opts, run_id, rnd, collected[name])
        results["systems"] = [system_results(collected[name], opts) for name in systems]
        for c in sweep:
            results["sweep"].append(
                await sweep_one(c, sink, opts, run_id, sweep_requests, sweep_repeat)
            )
        results["recommendation"] = recommend(results["sweep"])
        results["sink_messages_total"] = sink.messages
    finally:
        sink.stop()
    return results


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("-n", "--requests", type=int, default=2000, help="requests per batch (2000)")
    p.add_argument("-c", "--concurrency", type=int, default=64, help="requests in flight (64)")
    p.add_argument("--warmup", type=int, default=200, help="warm-up requests per system (200)")
    p.add_argument(
        "--repeat",
        type=int,
        default=2,
        help="measured batches per system, load mode and the batch endpoint at --concurrency (2)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="times the whole sequence of systems runs, each system started afresh in each "
        "round; its figures are medians over the batches of all rounds, so that a slow spell "
        "of the machine falls on every system rather than on one (2)",
    )
    p.add_argument(
        "--load-concurrency",
        default="16,64,128",
        help="client concurrencies of the load sweep (--concurrency is always in it) (16,64,128)",
    )
    p.add_argument(
        "--load-repeat",
        type=int,
        default=1,
        help="batches at each load concurrency other than --concurrency (1)",
    )
    p.add_argument(
        "--modes",
        default="close,keepalive",
        help="load modes: close (a new connection per request), keepalive (close,keepalive)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=100,
        help="mails per POST /api/messages/batch request; 0 skips the batch endpoint (100)",
    )
    p.add_argument("--batch-concurrency", type=int, default=4, help="batch requests in flight (4)")
    p.add_argument(
        "--systems",
        default="ref-a,ref-b,mailroom,mailroom-pg",
        help="comma-separated, from ref-a, ref-b, mailroom, mailroom-pg, mailroom-2srv (two "
        "servers), mailroom-2wrk (two workers) (ref-a,ref-b,mailroom,mailroom-pg)",
    )
    p.add_argument(
        "--sweep",
        default="",
        help="WORKER_CONCURRENCY values to sweep, e.g. 4,16,32,64; '' skips ('')",
    )
    p.add_argument(
        "--sweep-requests", type=int, default=1000, help="requests per sweep batch (1000)"
    )
    p.add_argument(
        "--sweep-repeat", type=int, default=2, help="e2e and drain batches per sweep value (2)"
    )
    p.add_argument("--request-timeout", type=float, default=30.0, help="seconds per request (30)")
    p.add_argument(
        "--load-timeout", type=float, default=180.0, help="seconds per batch's load (180)"
    )
    p.add_argument(
        "--delivery-timeout",
        type=float,
        default=180.0,
        help="seconds to wait for mails after load (180)",
    )
    p.add_argument(
        "--stall-timeout",
        type=float,
        default=30.0,
        help="give up waiting after this long without a new mail (30)",
    )
    p.add_argument(
        "--settle", type=float, default=1.0, help="seconds to wait for late duplicates (1)"
    )
    p.add_argument("--ref-dir", type=Path, default=Path("/work/shared/reference"))
    p.add_argument("--ref-venv", type=Path, default=Path(os.environ.get("VENV", "/tmp/refvenv")))  # noqa: S108
    p.add_argument(
        "--mailroom-log-level", default=None, help="LOG_LEVEL for Mailroom (its default: INFO)"
    )
    add_run_options(p, "results.md", "results.md and plot.png")
    return p.parse_args(argv)


def add_run_options(p: argparse.ArgumentParser, latest: str, report: str) -> None:
    """The options bench.py and scale.py share: which Mailroom to run, where the reports
    go (``latest``: the file in bench/ the latest one is copied to; ``report``: what
    --report-only renders) and the work directories."""
    p.add_argument("--mailroom-python", type=Path, default=REPO / ".venv/bin/python")
    p.add_argument(
        "--mailroom-src",
        default="HEAD",
        help="git revision of Mailroom to run (exported with git archive), or 'worktree' "
        "for the checkout as it is (HEAD)",
    )
    p.add_argument("--no-install", action="store_true", help="never apt-get install postfix")
    p.add_argument(
        "--out",
        type=Path,
        default=BENCH_DIR / "results",
        help="each run goes to a directory of its own in <out>, named by its UTC timestamp "
        "and Mailroom's commit (bench/results)",
    )
    p.add_argument(
        "--latest",
        default=str(BENCH_DIR / latest),
        help=f"where the latest report is copied, '' for nowhere (bench/{latest})",
    )
    p.add_argument(
        "--report-only",
        type=Path,
        metavar="RESULTS_JSON",
        help=f"only render {report} (next to RESULTS_JSON) from an earlier run",
    )
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, dump)")
    p.add_argument("-v", "--verbose", action="store_true")


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(message)s",
        datefmt="%H:%M:%S",
    )


def work_dirs_and_source(
    name: str, revision: str
) -> tuple[Path, Path, Path, dict[str, Any]] | None:
    """A run's work directories, ``mailroom-<name>-*``: the logs and Mailroom's SQLite file
    on disk, as in a deployment; the sink's dump on tmpfs, so that the sink stays fast.
    With Mailroom's source at ``revision`` (:func:`mailroom_source`) and what it is. None,
    the reason logged and the directories removed, when there is no such source."""
    workdir = Path(tempfile.mkdtemp(prefix=f"mailroom-{name}-"))
    workdir.chmod(0o755)
    shm = Path("/dev/shm")  # noqa: S108 - mkdtemp makes a private directory in it
    sink_dir = Path(
        tempfile.mkdtemp(prefix=f"mailroom-{name}-sink-", dir=shm if shm.is_dir() else None)
    )
    sink_dir.chmod(0o755)
    try:
        mailroom_src, mailroom_info = mailroom_source(revision, workdir)
    except (BenchError, subprocess.SubprocessError, OSError, tarfile.TarError) as exc:
        log.error("%s: cannot get Mailroom's source: %s", name, exc)
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(sink_dir, ignore_errors=True)
        return None
    return workdir, sink_dir, mailroom_src, mailroom_info


def stop_and_clean_up(workdir: Path, sink_dir: Path, keep: bool) -> None:
    """The end of a run, however it ended: stop everything it started (a SIGTERM no
    longer interrupts that), and remove its work directories unless ``keep``."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    REGISTRY.stop_all()
    if keep:
        log.info("work directories kept: %s (logs), %s (sink)", workdir, sink_dir)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(sink_dir, ignore_errors=True)


def finish_results(results: dict[str, Any], started: float, mailroom_info: dict[str, Any]) -> str:
    """Add the run's duration and the load after it to ``results``; the commit of Mailroom
    it measured ('-dirty' with uncommitted .py changes), to name the run's directory by."""
    results["duration_s"] = round(time.monotonic() - started, 1)
    results["environment"]["loadavg_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    commit: str = mailroom_info.get("commit") or mailroom_info.get("head", "unknown")
    if mailroom_info.get("uncommitted_py"):
        commit += "-dirty"
    return commit


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    latest = Path(args.latest) if args.latest else None
    if args.report_only is not None:
        write_report(json.loads(args.report_only.read_text()), args.report_only.parent, latest)
        return 0
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    sweep = [int(x) for x in args.sweep.split(",") if x.strip()]
    load_cc = tuple(int(x) for x in args.load_concurrency.split(",") if x.strip())
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    counts = (args.requests, args.concurrency, args.repeat, args.load_repeat, args.rounds)
    if min(counts) < 1:
        log.error(
            "--requests, --concurrency, --repeat, --load-repeat and --rounds must be at least 1"
        )
        return 2
    if any(c < 1 for c in load_cc) or args.batch_concurrency < 1 or args.batch_size < 0:
        log.error("concurrencies must be at least 1, --batch-size at least 0")
        return 2
    if len(set(sweep)) < len(sweep):
        # Each value's batches are named by the value: a repeated one would count the
        # first's mails again (as duplicates) and report its figures twice.
        log.error("--sweep: each value once (--sweep-repeat repeats them)")
        return 2
    if not modes or any(m not in MODES for m in modes):
        log.error("--modes: a comma-separated list from %s", ", ".join(MODES))
        return 2
    unknown = set(systems) - set(ORDER)
    if unknown:
        log.error("--systems: unknown %s (known: %s)", ", ".join(sorted(unknown)), ", ".join(ORDER))
        return 2
    prepared = work_dirs_and_source("bench", args.mailroom_src)
    if prepared is None:
        return 1
    workdir, sink_dir, mailroom_src, mailroom_info = prepared
    log.info("Mailroom from %s", mailroom_info)
    opts = Options(
        requests=args.requests,
        concurrency=args.concurrency,
        warmup=args.warmup,
        repeat=args.repeat,
        request_timeout=args.request_timeout,
        load_timeout=args.load_timeout,
        delivery_timeout=args.delivery_timeout,
        stall_timeout=args.stall_timeout,
        settle=args.settle,
        ref_dir=args.ref_dir,
        ref_venv=args.ref_venv,
        mailroom_python=args.mailroom_python,
        mailroom_src=mailroom_src,
        mailroom_log_level=args.mailroom_log_level,
        workdir=workdir,
        sink_dir=sink_dir,
        load_concurrencies=load_cc,
        load_repeat=args.load_repeat,
        modes=modes,
        batch_size=args.batch_size,
        batch_concurrency=args.batch_concurrency,
        rounds=args.rounds,
    )
    signal.signal(signal.SIGTERM, _terminate)
    # Also when started in the background, where a shell leaves SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    started = time.monotonic()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    try:  # the bench code this run uses (HEAD may move while it runs)
        bench_commit = git("rev-parse", "--short=10", "HEAD")
        if git("status", "--porcelain", "--", "bench/bench.py"):
            bench_commit += "-dirty"
    except (subprocess.SubprocessError, OSError):
        bench_commit = "?"
    try:
        sink_binary = preflight(opts, systems, install=not args.no_install)
        results = asyncio.run(
            run(opts, systems, sweep, args.sweep_requests, args.sweep_repeat, sink_binary)
        )
        results["mailroom"] = mailroom_info
    except BenchError as exc:
        log.error("bench: %s", exc)
        return 1
    except KeyboardInterrupt:
        log.error("bench: interrupted; stopping everything it started")
        return 130
    finally:
        stop_and_clean_up(workdir, sink_dir, args.keep)
    commit = finish_results(results, started, mailroom_info)
    results["bench_commit"] = bench_commit
    write_report(results, args.out / f"{stamp}-{commit}", latest)
    return 0


def plot(results: dict[str, Any], path: Path) -> bool:
    """mails/s and accept p99 against client concurrency, per system and load mode (PNG)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed (pip install matplotlib): no plot")
        return False
    systems = {s["name"]: s for s in results["systems"]}
    fig, (ax_rate, ax_p99) = plt.subplots(1, 2, figsize=(12, 6))
    styles = {"keepalive": "-", "close": "--"}
    colors = {
        "ref-a": "tab:gray",
        "ref-b": "tab:red",
        "mailroom": "tab:blue",
        "mailroom-pg": "tab:green",
        "mailroom-2srv": "tab:purple",
        "mailroom-2wrk": "tab:brown",
    }
    drawn = False
    for name in ORDER:
        s = systems.get(name)
        if s is None:
            continue
        for mode, by_c in s.get("modes", {}).items():
            points = sorted((int(c), g["median"]) for c, g in by_c.items())
            if not points:
                continue
            xs = [c for c, _ in points]
            label = f"{name}, {MODE_LABEL[mode]}"
            style = {"color": colors.get(name), "linestyle": styles.get(mode, ":"), "marker": "o"}
            ax_rate.plot(xs, [m["e2e_mails_per_s"] for _, m in points], label=label, **style)
            ax_p99.plot(xs, [m["p99_ms"] for _, m in points], label=label, **style)
            drawn = True
        batch = s.get("batch", {}).get("median")
        if batch:
            ax_rate.axhline(
                batch["e2e_mails_per_s"],
                color=colors.get(name),
                linestyle=":",
                label=f"{name}, batch endpoint ({results['config'].get('batch_size')}/request)",
            )
    if not drawn:
        plt.close(fig)
        return False
    for ax, title, unit in (
        (ax_rate, "end-to-end mails/s", "mails/s"),
        (ax_p99, "accept latency p99", "ms"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("client concurrency (connections)")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.set_ylim(bottom=0)
    concurrencies = results["config"].get("load_concurrencies") or [
        results["config"]["concurrency"]
    ]
    for ax in (ax_rate, ax_p99):
        ax.set_xticks(concurrencies, [str(c) for c in concurrencies])
    handles, labels = ax_rate.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    env = results["environment"]
    fig.suptitle(
        f"Mailroom vs reference, {results['date']}, Mailroom "
        f"{results.get('mailroom', {}).get('commit', results.get('mailroom', {}).get('head', '?'))}"
        f", {env.get('cores', '?')} cores, N={results['config']['requests']}",
        fontsize=9,
    )
    rows = -(-len(labels) // 3)
    fig.tight_layout(rect=(0, 0.05 * rows, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_report(results: dict[str, Any], run_dir: Path, latest: Path | None) -> None:
    """results.md, results.json and plot.png in ``run_dir``; ``latest``: a copy of the
    report whose links point into ``run_dir``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    results["plot"] = "plot.png" if plot(results, run_dir / "plot.png") else None
    (run_dir / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    report = render(results)
    print(report)
    (run_dir / "results.md").write_text(report)
    log.info("wrote %s (and results.json, plot.png)", run_dir / "results.md")
    if latest is not None:
        where = os.path.relpath(run_dir, latest.parent)
        copy = dict(results, plot=f"{where}/plot.png" if results["plot"] else None)
        latest.write_text(
            f"<!-- generated by bench/bench.py: the latest run, stored in {where}/ -->\n"
            f"The latest run; it is stored with its raw data in [{where}/]({where}/).\n\n"
            + render(copy)
        )
        log.info("wrote %s (the latest run)", latest)


if __name__ == "__main__":
    sys.exit(main())
