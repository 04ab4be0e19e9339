"""Scale out: several worker processes share one burst; the launcher runs several servers
and workers and restarts them one by one under load (SIGHUP) without losing anything."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from config import Secret, Settings
from launcher import default_counts, layout_problem
from tests.conftest import running_app, wait_ready
from tests.support import (
    Proc,
    SmtpRecorder,
    SmtpServer,
    child_env,
    finish,
    free_port,
    spawn,
    start_smtp,
    wait_http,
    worker_env,
)
from tests.test_metrics import samples

CONCURRENCY = 4
PREFETCH = 2 * CONCURRENCY  # held per worker: CONCURRENCY being sent, the rest waiting


@dataclass
class GatedRecorder(SmtpRecorder):
    """Holds every mail at the end of DATA until ``gate`` opens; a mail whose client went
    away meanwhile is not taken (the client never heard the 250)."""

    gate: asyncio.Event = field(default_factory=asyncio.Event)
    waiting: int = 0  # mails at the gate now

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.waiting += 1
        try:
            await self.gate.wait()
        finally:
            self.waiting -= 1
        transport = server.transport
        if transport is None or transport.is_closing():
            return "421 the client went away"
        return await super().handle_DATA(server, session, envelope)


@contextlib.asynccontextmanager
async def gated_smtp() -> AsyncIterator[SmtpServer]:
    server = await start_smtp("none", None, auth=False, recorder=GatedRecorder())
    try:
        yield server
    finally:
        server.server.close()
        await server.server.wait_closed()


async def worker_metrics(http: httpx.AsyncClient, port: int) -> dict[str, float]:
    text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
    return {name: value for (name, labels), value in samples(text).items() if not labels}


async def test_three_workers_share_a_burst_and_one_killed_loses_nothing(
    database_url: Secret,
    make_settings: Callable[..., Settings],
    prefix: str,
    tmp_path: Path,
    stop_later: list[Proc],
) -> None:
    """Three ``python worker.py`` processes against one burst of 60 mails: each takes its
    share (all three hold ``PREFETCH`` mails at once, ``CONCURRENCY`` of them in DATA),
    one is killed (SIGKILL) while it holds its share, and every mail still arrives
    exactly once."""
    settings = make_settings(database_url=database_url)
    total = 60
    async with gated_smtp() as smtp, running_app(settings) as (app, client):
        recorder = smtp.recorder
        assert isinstance(recorder, GatedRecorder)
        await wait_ready(app)
        for n in range(total):
            body = {"to": f"r{n}@example.com", "subject": f"burst {n}", "text": "t"}
            assert (await client.post("/api/messages", json=body)).status_code == 202
        ports = [free_port() for _ in range(3)]
        workers = []
        for port in ports:
            env = worker_env(
                prefix,
                settings,
                smtp.port,
                WORKER_CONCURRENCY=CONCURRENCY,
                WORKER_PREFETCH=PREFETCH,
                WORKER_METRICS_PORT=port,
                LOG_LEVEL="WARNING",
            )
            worker = await spawn("worker.py", tmp_path, env)
            stop_later.append(worker)
            workers.append(worker)
        for worker, port in zip(workers, ports, strict=True):
            await wait_http(f"http://127.0.0.1:{port}/healthz", worker, timeout=60)
        async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
            # Each worker takes its share: all three hold PREFETCH mails, CONCURRENCY of
            # them at the gate.
            async with asyncio.timeout(60):
                while True:
                    held = [
                        (await worker_metrics(http, port))["mailroom_messages_in_flight"]
                        for port in ports
                    ]
                    if held == [PREFETCH] * 3 and recorder.waiting == 3 * CONCURRENCY:
                        break
                    await asyncio.sleep(0.1)
            victim = workers[0]
            os.killpg(victim.pid, signal.SIGKILL)
            await finish(victim)
            recorder.gate.set()
            await recorder.wait_for(total, timeout=90)
            survivors = [await worker_metrics(http, port) for port in ports[1:]]
        async with asyncio.timeout(30):
            while (stats := await (await client.get("/api/stats")).get_json())["messages"][
                "sent"
            ] != total:
                await asyncio.sleep(0.1)
    got = Counter(address for mail in recorder.received for address in mail.rcpt_tos)
    assert got == Counter(f"r{n}@example.com" for n in range(total))  # each exactly once
    sent = [m["mailroom_messages_sent_total"] for m in survivors]
    assert all(count >= CONCURRENCY for count in sent), sent
    assert sum(sent) == total
    assert stats["queues"][f"{prefix}.send"] == 0
    for worker in workers[1:]:
        worker.send_signal(signal.SIGTERM)
        code, out = await finish(worker, timeout=60)
        assert code == 0, out


@pytest.mark.timeout(240)
async def test_launcher_runs_servers_and_workers_and_restarts_them_under_load(
    make_settings: Callable[..., Settings],
    prefix: str,
    tmp_path: Path,
    smtp: SmtpServer,
    stop_later: list[Proc],
) -> None:
    """``launcher.py --servers 2 --workers 2 --overflow-workers 1``: the third worker
    consumes one priority lower; SIGHUP restarts both servers and the three workers one
    by one while clients keep sending; no connection is refused, every
    request is answered 202 (a connection the stopping server closed before reading its
    request is sent again with the same Idempotency-Key, as graceful.py documents), every
    mail arrives exactly once, and ``/metrics`` sums what both servers (and the ones they
    replaced) accepted."""
    settings = make_settings()
    port = free_port()
    env = worker_env(
        prefix,
        settings,
        smtp.port,
        PORT=port,
        TALKTOME_LOG=tmp_path / "talktome.log",
        OUTBOX_DIR=tmp_path / "outbox",
        SHUTDOWN_GRACE=10,
        WORKER_CONCURRENCY=CONCURRENCY,
    )
    launcher = await spawn(
        "launcher.py", tmp_path, env, "--servers", "2", "--workers", "2", "--overflow-workers", "1"
    )
    stop_later.append(launcher)
    lines: list[str] = []
    restarted = asyncio.Event()

    async def read_output() -> None:
        assert launcher.stdout is not None
        while line := await launcher.stdout.readline():
            lines.append(line.decode(errors="replace").rstrip())
            if "launcher: restart done" in lines[-1]:
                restarted.set()

    reader = asyncio.create_task(read_output())
    base = f"http://127.0.0.1:{port}"
    answers: list[int] = []
    resent = 0
    sent_ids: list[str] = []

    async def send(client: httpx.AsyncClient, n: int) -> None:
        nonlocal resent
        body = {"to": f"r{n}@example.com", "subject": f"load {n}", "text": "t"}
        key = {"Idempotency-Key": uuid.uuid4().hex}
        for _ in range(5):
            try:
                response = await client.post(f"{base}/api/messages", json=body, headers=key)
            except (httpx.RemoteProtocolError, httpx.ReadError):
                # Closed unread by a stopping server (a FIN, or a reset when the request's
                # bytes were still unread): sent again with the same Idempotency-Key, so
                # that even a request that was taken after all is queued once.
                resent += 1
                continue
            answers.append(response.status_code)
            if response.status_code == 202:
                sent_ids.append(response.json()["id"])
            return
        raise AssertionError(f"request {n} was never answered")

    async def load(client: httpx.AsyncClient, first: int, stop: asyncio.Event) -> int:
        n = first
        while not stop.is_set():
            await asyncio.gather(*(send(client, n + k) for k in range(4)))
            n += 4
            await asyncio.sleep(0.05)  # steady load, not a benchmark
        return n

    try:
        async with asyncio.timeout(60):
            while not any("Press Ctrl-C to stop" in line for line in lines):
                if launcher.returncode is not None:
                    raise AssertionError("\n".join(lines))
                await asyncio.sleep(0.1)
        # A new connection per request: a keep-alive connection to a server that stops is
        # closed, which is graceful.py's business and tested there.
        limits = httpx.Limits(max_keepalive_connections=0)
        async with httpx.AsyncClient(trust_env=False, timeout=30, limits=limits) as client:
            stop = asyncio.Event()
            loader = asyncio.create_task(load(client, 0, stop))
            while len(answers) < 20:
                await asyncio.sleep(0.05)
                assert not loader.done(), loader.result()
            launcher.send_signal(signal.SIGHUP)
            await asyncio.wait_for(restarted.wait(), 150)
            while len(answers) < 40 or not any("restart done" in line for line in lines):
                await asyncio.sleep(0.05)
            stop.set()
            count = await loader
            metrics_text = (await client.get(f"{base}/metrics")).text
        assert Counter(answers) == Counter({202: count}), Counter(answers)
        await smtp.recorder.wait_for(count, timeout=60)
        got = Counter(a for mail in smtp.recorder.received for a in mail.rcpt_tos)
        assert got == Counter(f"r{n}@example.com" for n in range(count))
        accepted = samples(metrics_text)[("mailroom_messages_accepted_total", ())]
        assert accepted == count, (accepted, count)
        restarts = [line for line in lines if "launcher: started" in line]
        assert len(restarts) == 10, restarts  # 2 servers + 3 workers, twice
        assert any("worker-3 is an overflow worker (WORKER_PRIORITY=-1)" in x for x in lines)
        consuming = [line for line in lines if "consuming " in line]
        assert len(consuming) == 6, consuming  # each worker, then each one restarted
        assert sum(", priority -1," in line for line in consuming) == 2, consuming
        launcher.send_signal(signal.SIGTERM)
        await asyncio.wait_for(launcher.wait(), 60)
        assert launcher.returncode == 0, "\n".join(lines)
    finally:
        if launcher.returncode is None:
            launcher.send_signal(signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(launcher.wait(), 60)
        await asyncio.wait_for(reader, 10)
    print(f"{count} requests, {resent} sent again after a stopping server closed them unread")


def test_launcher_refuses_a_layout_it_cannot_start() -> None:
    """Overflow workers need a priority below WORKER_PRIORITY; each worker its metrics port."""
    assert layout_problem(Settings(), 2, 1) is None
    assert layout_problem(Settings(worker_priority=-99), 2, 1) is None
    lowest = layout_problem(Settings(worker_priority=-100), 2, 1)
    assert lowest is not None and "WORKER_PRIORITY is -100" in lowest
    assert layout_problem(Settings(worker_priority=-100), 1, 0) is None
    assert layout_problem(Settings(worker_metrics_port=65534), 2, 1) is None
    ports = layout_problem(Settings(worker_metrics_port=65534), 3, 1)
    assert ports is not None and "WORKER_METRICS_PORT 65534" in ports


async def test_launcher_with_the_lowest_priority_and_overflow_workers_exits_2(
    prefix: str, tmp_path: Path
) -> None:
    env = child_env(
        prefix,
        WORKER_PRIORITY=-100,
        PORT=free_port(),
        TALKTOME_LOG=tmp_path / "talktome.log",
        OUTBOX_DIR=tmp_path / "outbox",
    )
    code, out = await finish(await spawn("launcher.py", tmp_path, env), timeout=30)
    assert code == 2, out
    assert "WORKER_PRIORITY is -100, the lowest there is" in out


def test_default_process_counts_follow_the_cores() -> None:
    assert default_counts(1) == (1, 1)
    assert default_counts(2) == (1, 1)  # what the benchmark found fastest on 2 cores
    assert default_counts(8) == (4, 4)
