"""The ngrok command (scripts/ngrok.sh -> tunnel.py), and requests as ngrok delivers them.

ngrok itself cannot be reached from here. What can be tested: ``python tunnel.py`` against
a stand-in, an ``ngrok`` executable on PATH that records its arguments and then runs like
the agent (or fails as the agent does without an authtoken), plus ngrok's local API on a
loopback port (``--api``), which reports the tunnel once the agent is running; in front
of the real app. And a request carrying ngrok's forwarding headers (and nginx's after
them) is a remote client: it needs the token.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from config import Secret, Settings
from tests.conftest import running_app, serving_app, wait_ready
from tests.support import Proc, child_env, finish, free_port, spawn

TOKEN = "tok-" + "g" * 28
PUBLIC = "https://a1b2-203-0-113-7.ngrok-free.app"


@dataclass
class FakeNgrok:
    """The stand-in agent (``bin/ngrok``) and its local API on ``api``."""

    bin: Path
    args_file: Path
    pid_file: Path
    fail_file: Path
    api: str

    @property
    def args(self) -> list[str]:
        return self.args_file.read_text().splitlines() if self.args_file.exists() else []


AGENT = """#!/bin/sh
# A stand-in for the ngrok agent: records its arguments, then runs until stopped.
printf '%s\\n' "$@" > {args}
echo $$ > {pid}
echo 't=2026-12-04T12:00:00+0000 lvl=info msg="starting web service" addr=127.0.0.1:4040'
if [ -f {fail} ]; then
    echo 't=2026-12-04T12:00:01+0000 lvl=eror msg="session closing" \
err="authentication failed: Usage of ngrok requires a verified account and authtoken. \
ERR_NGROK_4018"'
    exit 1
fi
exec sleep 600
"""


@pytest.fixture
async def ngrok(tmp_path: Path) -> AsyncIterator[FakeNgrok]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    args_file, pid_file, fail_file = (tmp_path / n for n in ("ngrok.args", "ngrok.pid", "fail"))
    agent = bin_dir / "ngrok"
    agent.write_text(AGENT.format(args=args_file, pid=pid_file, fail=fail_file))
    agent.chmod(0o755)

    async def local_api(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """GET /api/tunnels: the agent's tunnel, once it runs (ngrok's JSON, trimmed)."""
        request_line = await reader.readline()
        while (await reader.readline()).strip():
            pass
        tunnels: list[dict[str, Any]] = []
        started = args_file.read_text().splitlines() if args_file.exists() else []
        if request_line.split()[1:2] == [b"/api/tunnels"] and len(started) >= 2:
            tunnels = [
                {
                    "name": "command_line",
                    "public_url": PUBLIC,
                    "proto": "https",
                    "config": {"addr": started[1], "inspect": True},
                }
            ]
        body = json.dumps({"tunnels": tunnels, "uri": "/api/tunnels"}).encode()
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(local_api, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield FakeNgrok(bin_dir, args_file, pid_file, fail_file, f"http://127.0.0.1:{port}")
    server.close()
    await server.wait_closed()


async def tunnel(
    tmp_path: Path, prefix: str, ngrok: FakeNgrok | None, *args: str, **env: str | int
) -> Proc:
    path = f"{ngrok.bin}:/usr/local/bin:/usr/bin:/bin" if ngrok else "/usr/local/bin:/usr/bin:/bin"
    api = ["--api", ngrok.api] if ngrok else []
    return await spawn(
        "tunnel.py", tmp_path, {**child_env(prefix, **env), "PATH": path}, *api, *args
    )


async def read_until(proc: Proc, marker: str, timeout: float = 20) -> str:
    assert proc.stdout is not None
    seen = ""
    async with asyncio.timeout(timeout):
        while marker not in seen:
            line = await proc.stdout.readline()
            if not line:
                raise AssertionError(f"exited before {marker!r}: {seen}")
            seen += line.decode()
    return seen


def alive(pid: int) -> bool:
    try:
        Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"


async def test_prints_the_public_url_and_the_curl_commands(
    ngrok: FakeNgrok,
    make_settings: Callable[..., Settings],
    prefix: str,
    tmp_path: Path,
    stop_later: list[Proc],
) -> None:
    settings = make_settings(api_tokens=(Secret(TOKEN),), trusted_proxy_hops=1)
    async with serving_app(settings) as base:
        port = int(base.rsplit(":", 1)[1])
        nginx_port = free_port()  # nothing there: the app it is
        proc = await tunnel(
            tmp_path,
            prefix,
            ngrok,
            "--nginx-port",
            str(nginx_port),
            PORT=port,
            API_TOKEN=TOKEN,
            TRUSTED_PROXY_HOPS=1,
        )
        stop_later.append(proc)
        shown = await read_until(proc, "Press Ctrl-C")
        assert ngrok.args == ["http", f"http://127.0.0.1:{port}", "--log", "stdout"]
        assert f"Mailroom is public at {PUBLIC}/" in shown
        assert f'curl "{PUBLIC}/?talktome"' in shown
        assert (
            f"curl -H 'Authorization: Bearer {TOKEN}' \"{PUBLIC}/?sendmail=email@example.com\""
            in shown
        )
        assert "changes every time" in shown
        assert "warning" not in shown
        agent = int(ngrok.pid_file.read_text())
        assert alive(agent)
        proc.send_signal(signal.SIGINT)
        code, rest = await finish(proc)
    assert code == 0, rest
    assert not alive(agent)  # ngrok stopped with it


async def test_nginx_when_it_answers_and_a_word_on_proxy_hops(
    ngrok: FakeNgrok,
    make_settings: Callable[..., Settings],
    prefix: str,
    tmp_path: Path,
    stop_later: list[Proc],
) -> None:
    # Something answering /healthz on the "nginx" port (the app itself stands in for it).
    async with serving_app(make_settings(api_tokens=(Secret(TOKEN),))) as base:
        port = base.rsplit(":", 1)[1]
        proc = await tunnel(
            tmp_path, prefix, ngrok, "--nginx-port", port, API_TOKEN=TOKEN, TRUSTED_PROXY_HOPS=1
        )
        stop_later.append(proc)
        shown = await read_until(proc, "Press Ctrl-C")
        assert ngrok.args[1] == f"http://127.0.0.1:{port}"
        assert "ngrok -> nginx -> the app" in shown
        assert "TRUSTED_PROXY_HOPS is 1, but behind ngrok -> nginx it should be 2" in shown
        proc.send_signal(signal.SIGTERM)
        code, _ = await finish(proc)
    assert code == 0


async def test_refuses_without_api_token(
    ngrok: FakeNgrok, prefix: str, tmp_path: Path, stop_later: list[Proc]
) -> None:
    proc = await tunnel(tmp_path, prefix, ngrok)
    stop_later.append(proc)
    code, out = await finish(proc)
    assert code == 2
    assert "refusing to expose a server that has no API_TOKEN" in out
    assert "secrets.token_urlsafe(32)" in out and "API_TOKEN=<token>" in out
    assert ngrok.args == []  # ngrok never started


@pytest.mark.parametrize("problem", ["no ngrok", "no authtoken", "no app"])
async def test_says_what_is_missing(
    problem: str,
    ngrok: FakeNgrok,
    make_settings: Callable[..., Settings],
    prefix: str,
    tmp_path: Path,
    stop_later: list[Proc],
) -> None:
    nowhere = str(free_port())
    if problem == "no ngrok":
        proc = await tunnel(tmp_path, prefix, None, API_TOKEN=TOKEN)
        expected = ["ngrok is not installed", "ngrok config add-authtoken"]
    elif problem == "no app":
        proc = await tunnel(
            tmp_path, prefix, ngrok, "--nginx-port", nowhere, PORT=nowhere, API_TOKEN=TOKEN
        )
        expected = ["does not answer GET /healthz", "./scripts/run.sh"]
    else:
        ngrok.fail_file.write_text("")
        async with serving_app(make_settings()) as base:
            proc = await tunnel(
                tmp_path,
                prefix,
                ngrok,
                "--to",
                "app",
                PORT=base.rsplit(":", 1)[1],
                API_TOKEN=TOKEN,
            )
            stop_later.append(proc)
            code, out = await finish(proc)
        expected = ["ngrok exited (status 1)", "ERR_NGROK_4018", "ngrok config add-authtoken"]
        assert code == 1, out
        assert all(text in out for text in expected), out
        return
    stop_later.append(proc)
    code, out = await finish(proc)
    assert code == 1, out
    assert all(text in out for text in expected), out
    assert "Traceback" not in out


# -- what arrives through ngrok ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("hops", "forwarded_for"),
    [
        (2, "203.0.113.7, 127.0.0.1"),  # ngrok -> nginx -> app: both appended
        (1, "203.0.113.7"),  # ngrok -> app
    ],
    ids=["ngrok-nginx", "ngrok"],
)
async def test_requests_through_ngrok_are_remote(
    hops: int, forwarded_for: str, make_settings: Callable[..., Settings]
) -> None:
    """ngrok adds X-Forwarded-For / -Proto / -Host (nginx appends to the first, sets the
    second): the peer is 127.0.0.1, but such a request is no trusted loopback client."""
    settings = make_settings(api_tokens=(Secret(TOKEN),), trusted_proxy_hops=hops)
    headers = {
        "Host": "a1b2-203-0-113-7.ngrok-free.app",
        "X-Forwarded-For": forwarded_for,
        "X-Forwarded-Proto": "https" if hops == 1 else "http",
        "X-Forwarded-Host": "a1b2-203-0-113-7.ngrok-free.app",
    }
    bearer = {**headers, "Authorization": f"Bearer {TOKEN}"}
    mail = {"to": "a@example.com", "subject": "s", "text": "t"}
    async with running_app(settings) as (app, client):
        await wait_ready(app)
        for method, path, body in (
            ("GET", "/?sendmail=a@example.com", None),
            ("POST", "/api/messages", mail),
            ("GET", "/api/messages", None),
            ("GET", "/api/dead-letters", None),
            ("GET", "/api/outbox", None),
            ("POST", "/api/dead-letters/requeue", {"all": True}),
        ):
            refused = await client.open(path, method=method, json=body, headers=headers)
            assert refused.status_code == 401, (path, await refused.get_data(as_text=True))
            assert "A token is required" in await refused.get_data(as_text=True)
        allowed = await client.post("/api/messages", json=mail, headers=bearer)
        assert allowed.status_code == 202
        assert (await client.get("/api/outbox", headers=bearer)).status_code == 200
        # The page holds no data: it is served, and then asks for the token.
        page = await client.get("/", headers={**headers, "Accept": "text/html"})
        assert page.status_code == 200 and page.mimetype == "text/html"
        assert (await client.get("/?talktome", headers=headers)).status_code == 200
    logged = settings.talktome_log.read_text()
    assert re.search(r" talktome from 203\.0\.113\.7$", logged.strip()), logged
