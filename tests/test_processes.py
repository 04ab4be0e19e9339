"""The real entry points as a user runs them: python server.py, python worker.py, hypercorn."""

from __future__ import annotations

import asyncio
import re
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
from aiosmtpd.smtp import Envelope

from broker import Names
from config import Settings
from tests.conftest import ROOT, running_app, wait_ready
from tests.support import (
    Proc,
    SmtpRecorder,
    SmtpServer,
    child_env,
    finish,
    free_port,
    queue_depth,
    spawn,
    start_smtp,
    wait_http,
    worker_env,
)


async def test_server_config_error_names_variable(prefix: str, tmp_path: Path) -> None:
    proc = await spawn("server.py", tmp_path, child_env(prefix, PORT="abc"))
    code, out = await finish(proc)
    assert code == 2
    assert "PORT" in out and "Traceback" not in out


async def test_server_reports_unopenable_talktome_log(prefix: str, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    log_path = blocker / "sub" / "talk.log"  # a file where a directory should be
    proc = await spawn("server.py", tmp_path, child_env(prefix, TALKTOME_LOG=log_path))
    code, out = await finish(proc)
    assert code == 2
    assert "TALKTOME_LOG" in out and str(log_path) in out


async def test_worker_without_smtp_host_names_it(prefix: str, tmp_path: Path) -> None:
    proc = await spawn("worker.py", tmp_path, child_env(prefix))
    code, out = await finish(proc)
    assert code == 2
    assert "SMTP_HOST" in out


async def test_config_from_dotenv_file(prefix: str, tmp_path: Path, stop_later: list[Proc]) -> None:
    port = free_port()
    (tmp_path / ".env").write_text(f"PORT={port}\nTALKTOME_LOG={tmp_path}/from-dotenv.log\n")
    proc = await spawn("server.py", tmp_path, child_env(prefix))
    stop_later.append(proc)
    await wait_http(f"http://127.0.0.1:{port}/?talktome", proc)
    assert (tmp_path / "from-dotenv.log").read_text().count("talktome") >= 1


async def test_several_server_processes_share_the_log_intact(
    prefix: str, tmp_path: Path, stop_later: list[Proc]
) -> None:
    log_path = tmp_path / "shared.log"
    ports = [free_port(), free_port()]
    for port in ports:
        proc = await spawn(
            "server.py", tmp_path, child_env(prefix, PORT=port, TALKTOME_LOG=log_path)
        )
        stop_later.append(proc)
        await wait_http(f"http://127.0.0.1:{port}/healthz", proc)
    limits = httpx.Limits(max_connections=40)
    # A busy machine may take a while: this checks the log's integrity, not speed, so a
    # request may wait for one of the 40 connections longer than httpx's default 5 s.
    timeout = httpx.Timeout(10.0, pool=40.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        responses = await asyncio.gather(
            *(client.get(f"http://127.0.0.1:{ports[n % 2]}/?talktome") for n in range(400))
        )
    assert {r.status_code for r in responses} == {200}
    lines = log_path.read_text().splitlines()
    assert len(lines) == 400
    pattern = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d talktome from 127\.0\.0\.1")
    assert all(pattern.fullmatch(line) for line in lines)
    for proc in stop_later:
        proc.send_signal(signal.SIGTERM)
        code, out = await finish(proc)
        assert code == 0, out


async def test_hypercorn_server_app(prefix: str, tmp_path: Path, stop_later: list[Proc]) -> None:
    port = free_port()
    env = child_env(prefix, TALKTOME_LOG=tmp_path / "t.log", PYTHONPATH=ROOT)
    proc = await spawn("hypercorn", tmp_path, env, "server:app", "--bind", f"127.0.0.1:{port}")
    stop_later.append(proc)
    await wait_http(f"http://127.0.0.1:{port}/readyz", proc)
    async with httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{port}/?talktome")
    assert response.status_code == 200
    assert "talktome" in (tmp_path / "t.log").read_text()


async def sigterm_mid_send(
    prefix: str,
    tmp_path: Path,
    settings: Settings,
    stop_later: list[Proc],
    on_data: Callable[[Envelope], Awaitable[str | None]],
    started: asyncio.Event,
    grace: float,
) -> tuple[int, str, SmtpServer]:
    """Queue one mail, start ``python worker.py``, SIGTERM it once the SMTP server is in
    DATA (``on_data`` sets ``started``); return its exit status, output and the server."""
    smtp = await start_smtp("none", None, auth=False, recorder=SmtpRecorder(on_data=on_data))
    async with running_app(settings) as (app, client):
        await wait_ready(app)
        assert (await client.get("/?sendmail=a@example.com")).status_code == 200
    env = worker_env(prefix, settings, smtp.port, SHUTDOWN_GRACE=grace)
    worker = await spawn("worker.py", tmp_path, env)
    stop_later.append(worker)
    await asyncio.wait_for(started.wait(), 20)
    worker.send_signal(signal.SIGTERM)
    code, out = await finish(worker)
    return code, out, smtp


async def test_sigterm_drains_in_flight_sends(
    prefix: str, tmp_path: Path, make_settings: Callable[..., Settings], stop_later: list[Proc]
) -> None:
    started = asyncio.Event()

    async def slow(envelope: Envelope) -> None:
        started.set()
        await asyncio.sleep(1.5)  # a slow SMTP server: the worker must wait for it

    code, out, smtp = await sigterm_mid_send(
        prefix, tmp_path, make_settings(), stop_later, slow, started, grace=20
    )
    assert code == 0, out
    assert len(smtp.recorder.received) == 1
    assert await queue_depth(Names.for_prefix(prefix).send_queue) == 0
    assert "stopping; 1 message(s) in flight" in out
    smtp.server.close()


async def test_sigterm_past_grace_returns_message_to_queue(
    prefix: str, tmp_path: Path, make_settings: Callable[..., Settings], stop_later: list[Proc]
) -> None:
    started = asyncio.Event()
    never = asyncio.Event()

    async def stuck(envelope: Envelope) -> str:
        started.set()
        await never.wait()
        return "421 shutting down"

    code, out, smtp = await sigterm_mid_send(
        prefix, tmp_path, make_settings(), stop_later, stuck, started, grace=0.5
    )
    assert code == 0, out
    assert await queue_depth(Names.for_prefix(prefix).send_queue) == 1  # not lost
    never.set()
    smtp.server.close()
