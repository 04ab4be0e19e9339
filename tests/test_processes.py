"""The real entry points as a user runs them: python server.py, python worker.py, hypercorn."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import h11
import httpx
import pytest
from aiosmtpd.smtp import Envelope

from broker import Names
from config import LISTEN_BACKLOG, Settings
from launcher import port_open
from messages import MailJob
from tests.conftest import ROOT, running_app, wait_ready
from tests.support import (
    Proc,
    SmtpRecorder,
    SmtpServer,
    child_env,
    finish,
    free_port,
    get_messages,
    queue_depth,
    spawn,
    spawn_argv,
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


BURST = 300  # clients connecting at once; Hypercorn's own backlog would take 101


@pytest.mark.skipif(
    int(Path("/proc/sys/net/core/somaxconn").read_text()) <= BURST,
    reason=f"net.core.somaxconn caps every listen backlog at or below {BURST} here",
)
@pytest.mark.parametrize("bound_by", ["server", "launcher"])
async def test_a_burst_of_new_connections_waits_in_the_listen_backlog(
    bound_by: str, prefix: str, tmp_path: Path, stop_later: list[Proc]
) -> None:
    """300 clients connect at once while the server takes none of them (it is paused):
    the kernel completes every handshake into the listen backlog, so none waits for a
    SYN retry (a second, then three). Hypercorn listens again with its own backlog of
    100 on a socket it is handed too (the launcher's, ``--listen-fd``), where 199 of them
    would wait (a p99 of a second in the bench's run of 128 new connections at a time)."""
    env = child_env(prefix, TALKTOME_LOG=tmp_path / "t.log")
    if bound_by == "server":
        port = free_port()
        proc = await spawn("server.py", tmp_path, dict(env, PORT=str(port)))
    else:
        with socket.create_server(("127.0.0.1", 0), backlog=LISTEN_BACKLOG) as sock:
            port = sock.getsockname()[1]
            fd = sock.fileno()
            proc = await spawn("server.py", tmp_path, env, "--listen-fd", str(fd), pass_fds=(fd,))
    stop_later.append(proc)
    await wait_http(f"http://127.0.0.1:{port}/readyz", proc)

    async def connect() -> asyncio.StreamWriter | None:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2)
        except TimeoutError:
            return None
        return writer

    proc.send_signal(signal.SIGSTOP)
    try:
        writers = await asyncio.gather(*(connect() for _ in range(BURST)))
    finally:
        proc.send_signal(signal.SIGCONT)
    connected = [w for w in writers if w is not None]
    for writer in connected:
        writer.close()
    assert len(connected) == BURST
    await wait_http(f"http://127.0.0.1:{port}/readyz", proc)


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


def readme_commands(section: str) -> list[str]:
    """The commands of the first code block under ``## <section>`` in the README (a line
    ending in a backslash continues on the next)."""
    text = (ROOT / "README.md").read_text()
    after = text.split(f"\n## {section}\n", 1)[1]
    block = after.split("```\n", 2)[1]
    return [line for line in block.replace("\\\n", " ").splitlines() if line.strip()]


async def test_readme_commands_by_hand_work_despite_a_dotenv_account(
    prefix: str, tmp_path: Path, stop_later: list[Proc]
) -> None:
    """ "Running the pieces by hand", as written, in a directory whose .env holds a real
    SMTP account: the worker still sends to the local devsmtp, without trying to log in."""
    commands = readme_commands("Running the pieces by hand")
    smtp_port, http_port = free_port(), free_port()
    (tmp_path / ".env").write_text(
        "SMTP_HOST=smtp.example.com\nSMTP_SECURITY=ssl\n"
        "SMTP_USERNAME=me@example.com\nSMTP_PASSWORD=account-Passw0rd\n"
        "EMAIL_USERNAME=old@example.com\nEMAIL_PASSWORD=old-Passw0rd\n"
        f"PORT={http_port}\n"
    )
    env = child_env(prefix)  # RabbitMQ and the queue prefix; the rest from .env

    def run(script: str) -> Awaitable[Proc]:
        line = next(c for c in commands if f" {script}" in c and "hypercorn" not in c)
        line = line.replace(".venv/bin/python ", f"{sys.executable} {ROOT}/")
        return spawn_argv(["bash", "-c", line.replace("2525", str(smtp_port))], tmp_path, env)

    devsmtp = await run("devsmtp.py")
    stop_later.append(devsmtp)
    async with asyncio.timeout(20):
        while not await port_open("127.0.0.1", smtp_port):
            assert devsmtp.returncode is None, await finish(devsmtp)
            await asyncio.sleep(0.05)
    worker, server = await run("worker.py"), await run("server.py")
    stop_later.extend((worker, server))
    await wait_http(f"http://127.0.0.1:{http_port}/readyz", server)
    async with httpx.AsyncClient() as client:
        sent = await client.get(f"http://127.0.0.1:{http_port}/?sendmail=by-hand@example.com")
    assert sent.status_code == 200, sent.text
    outbox = tmp_path / "var" / "outbox"
    async with asyncio.timeout(20):
        while not list(outbox.glob("*.eml")):
            await asyncio.sleep(0.05)
    (mail,) = outbox.glob("*.eml")
    assert "X-Envelope-To: by-hand@example.com" in mail.read_text()
    code, listed = await finish(await run("admin.py"))
    assert code == 0 and "0 dead letter(s)" in listed, listed
    for proc in (server, worker, devsmtp):
        proc.send_signal(signal.SIGTERM)
    outputs = [await finish(proc) for proc in (server, worker, devsmtp)]
    assert [code for code, _ in outputs] == [0, 0, 0], outputs
    worker_log = outputs[1][1]
    assert f"SMTP 127.0.0.1:{smtp_port} none" in worker_log
    assert "SETTINGS FAULT" not in worker_log and "LOGIN REFUSED" not in worker_log
    assert "Passw0rd" not in "".join(out for _, out in outputs)


async def test_devsmtp_on_a_busy_port_says_so_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = await spawn("devsmtp.py", tmp_path, child_env("unused"), "--port", str(port))
        code, out = await finish(proc)
    assert code == 1
    assert out == (
        f"devsmtp: cannot listen on 127.0.0.1:{port}: Address already in use "
        "(choose another --port)\n"
    )


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
    count: int = 1,
    before_signal: Callable[[], Awaitable[None]] | None = None,
    **worker_settings: str,
) -> tuple[int, str, SmtpServer]:
    """Queue ``count`` mails, start ``python worker.py``, SIGTERM it once the SMTP server
    is in DATA (``on_data`` sets ``started``) and ``before_signal`` returned; return its
    exit status, output and the server."""
    smtp = await start_smtp("none", None, auth=False, recorder=SmtpRecorder(on_data=on_data))
    async with running_app(settings) as (app, client):
        await wait_ready(app)
        for n in range(count):
            assert (await client.get(f"/?sendmail=a{n}@example.com")).status_code == 200
    env = worker_env(prefix, settings, smtp.port, SHUTDOWN_GRACE=grace, **worker_settings)
    worker = await spawn("worker.py", tmp_path, env)
    stop_later.append(worker)
    await asyncio.wait_for(started.wait(), 20)
    if before_signal is not None:
        await asyncio.wait_for(before_signal(), 20)
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


async def test_sigterm_returns_messages_waiting_for_a_connection_unsent(
    prefix: str, tmp_path: Path, make_settings: Callable[..., Settings], stop_later: list[Proc]
) -> None:
    """The worker holds WORKER_PREFETCH messages, claimed (``sending``) while they wait for
    one of its WORKER_CONCURRENCY connections: on SIGTERM it finishes the send under way
    and hands the others back at once, unsent: ``queued`` again, cancellable, back in the
    queue."""
    started = asyncio.Event()

    async def slow(envelope: Envelope) -> None:
        started.set()
        await asyncio.sleep(1.5)

    settings = make_settings()

    async def all_claimed() -> None:
        async with running_app(settings) as (_app, client):
            while True:
                listed = await (await client.get("/api/messages?status=sending")).get_json()
                if len(listed["messages"]) == 5:
                    return
                await asyncio.sleep(0.05)

    code, out, smtp = await sigterm_mid_send(
        prefix,
        tmp_path,
        settings,
        stop_later,
        slow,
        started,
        grace=20,
        count=5,
        before_signal=all_claimed,
        WORKER_CONCURRENCY="1",
        WORKER_PREFETCH="5",
    )
    assert code == 0, out
    assert len(smtp.recorder.received) == 1
    assert "stopping; 5 message(s) in flight" in out
    assert out.count("stopping before its send; claim handed back, to the queue") == 4
    assert await queue_depth(Names.for_prefix(prefix).send_queue) == 4
    async with running_app(settings) as (app, client):
        await wait_ready(app)
        listed = (await (await client.get("/api/messages?status=queued")).get_json())["messages"]
        assert len(listed) == 4
        for item in listed:
            record = await (await client.get(f"/api/messages/{item['id']}")).get_json()
            assert record["attempts"] == 1  # counted, as redeliveries are
            assert [h["status"] for h in record["history"]] == ["queued", "sending", "queued"]
            assert "handed back unsent" in record["history"][-1]["detail"]
        answer = await client.delete(f"/api/messages/{listed[0]['id']}")
        assert answer.status_code == 200  # handed back: cancellable again
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


class KeepAlive:
    """One raw HTTP/1.1 keep-alive connection (h11 on the client side)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.conn = h11.Connection(h11.CLIENT)

    @classmethod
    async def open(cls, port: int) -> KeepAlive:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def exchange(self, method: str, url: str, body: bytes = b"") -> tuple[int, str]:
        """One request and its whole answer; h11.RemoteProtocolError or ConnectionError
        if the connection closes first."""
        headers = [("Host", "127.0.0.1"), ("Content-Length", str(len(body)))]
        if body:
            headers.append(("Content-Type", "application/json"))
        send = self.conn.send
        self.writer.write(send(h11.Request(method=method, target=url, headers=headers)))
        self.writer.write(send(h11.Data(data=body)) + send(h11.EndOfMessage()))
        await self.writer.drain()
        status, text = 0, b""
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(await asyncio.wait_for(self.reader.read(65536), 20))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                text += event.data
            elif isinstance(event, h11.EndOfMessage):
                if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
                    self.conn.start_next_cycle()
                return status, text.decode()
            else:
                raise h11.RemoteProtocolError(f"closed before an answer: {event!r}")

    def close(self) -> None:
        self.writer.close()


def tagged_request(tag: str, k: int) -> tuple[str, str, bytes]:
    """A mail whose tag can be found in the queue: the subject (POST) or the address."""
    if k % 2:
        return "GET", f"/?sendmail={tag}@example.com", b""
    mail = {"to": "a@example.com", "subject": tag, "text": "x"}
    return "POST", "/api/messages", json.dumps(mail).encode()


async def test_sigterm_under_keep_alive_load_answers_every_accepted_request(
    prefix: str, tmp_path: Path, stop_later: list[Proc]
) -> None:
    """SIGTERM while keep-alive clients keep sending: a request the server took (its mail
    is queued) got its whole answer; a request it did not take queued nothing.

    What went wrong: a request arriving on an idle keep-alive connection just as the
    server stopped was read and queued, and its connection closed without the answer.
    Here idle keep-alive connections get requests one by one around the SIGTERM (until
    the server is seen closing connections, and a while after), while httpx clients keep
    sending on theirs."""
    port = free_port()
    env = child_env(
        prefix,
        PORT=port,
        TALKTOME_LOG=tmp_path / "t.log",
        DATABASE_URL=f"sqlite:///{tmp_path}/mailroom.db",
        LOG_LEVEL="WARNING",
    )
    proc = await spawn("server.py", tmp_path, env)
    stop_later.append(proc)
    base = f"http://127.0.0.1:{port}"
    await wait_http(f"{base}/readyz", proc)
    answered: dict[str, tuple[int, str]] = {}
    failed: dict[str, str] = {}
    flowing = asyncio.Event()  # the httpx clients have answers
    closing = asyncio.Event()  # a connection closed without an answer: the server stops

    async def keep_sending(n: int, client: httpx.AsyncClient) -> None:
        for k in range(1000):
            tag = f"h{n}r{k}"
            method, url, body = tagged_request(tag, k)
            headers = {"Content-Type": "application/json"} if body else {}
            try:
                response = await client.request(method, url, content=body, headers=headers)
            except httpx.TransportError as exc:
                failed[tag] = repr(exc)
                closing.set()
                if isinstance(exc, httpx.ConnectError):
                    return  # the server no longer accepts connections
                continue
            answered[tag] = (response.status_code, response.text)
            flowing.set()

    async def send_on(connection: KeepAlive, tag: str, k: int) -> None:
        try:
            answered[tag] = await connection.exchange(*tagged_request(tag, k))
        except (ConnectionError, h11.RemoteProtocolError) as exc:
            failed[tag] = repr(exc)
            closing.set()
        finally:
            connection.close()

    idle = [await KeepAlive.open(port) for _ in range(60)]
    warm = await asyncio.gather(*(c.exchange("GET", "/healthz") for c in idle))
    assert {status for status, _ in warm} == {200}
    limits = httpx.Limits(max_connections=8, max_keepalive_connections=8)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=20) as client:
        senders = [asyncio.create_task(keep_sending(n, client)) for n in range(8)]
        await asyncio.wait_for(flowing.wait(), 10)
        tasks, after_close = [], 0
        for k, connection in enumerate(idle):
            if k == 3:
                proc.send_signal(signal.SIGTERM)
            if after_close >= 15:
                connection.close()  # idle, the server closes it: nothing to check
                continue
            tasks.append(asyncio.create_task(send_on(connection, f"k{k}", k)))
            after_close += closing.is_set()
            await asyncio.sleep(0.0002)
        await asyncio.wait_for(asyncio.gather(*senders, *tasks), 30)
    code, out = await finish(proc)
    assert code == 0, out
    assert closing.is_set() and answered, "the SIGTERM did not land mid-load"
    queued: dict[str, str] = {}
    for message in await get_messages(Names.for_prefix(prefix).send_queue):
        job = MailJob.from_bytes(message.body)
        tag = job.subject if job.to[0] == "a@example.com" else job.to[0].partition("@")[0]
        queued[tag] = job.id
    unanswered = sorted(set(queued) - set(answered))
    assert not unanswered, f"queued without an answer: {unanswered}; {failed}; {out}"
    for tag, (status, text) in answered.items():
        assert status in (200, 202) and queued.get(tag, "?") in text, (tag, status, text)
