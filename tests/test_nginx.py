"""The shipped nginx/mailroom.conf, run by the real nginx binary, in front of a real
``python server.py``: what a client on the far side of nginx can and cannot do.

Each test starts the app (its own port, queue prefix and SQLite file) and an nginx of its
own on a free loopback port, from a top-level nginx.conf in a temporary directory that
includes the shipped file with only its listen address, app address and log paths
substituted. Both are stopped when the test ends. Without an nginx binary the tests skip
(scripts/ensure-nginx.sh installs one; scripts/test.sh exports MAILROOM_NGINX when it
did, and then a missing binary fails instead).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from broker import Names
from guard import SETUP_HELP
from tests.conftest import TEST_RETRY_DELAYS
from tests.support import ROOT, Proc, child_env, finish, free_port, queue_depth, spawn, wait_http

SHIPPED_CONF = ROOT / "nginx" / "mailroom.conf"
TOKEN = "tok-" + "n" * 28
MIB = 1024 * 1024


def find_nginx() -> str | None:
    """$MAILROOM_NGINX (set by scripts/test.sh), else nginx on PATH or in the sbin dirs."""
    configured = os.environ.get("MAILROOM_NGINX")
    if configured:
        return configured
    for candidate in (
        shutil.which("nginx"),
        "/usr/sbin/nginx",
        "/usr/local/sbin/nginx",
        "/usr/local/nginx/sbin/nginx",
    ):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


NGINX = find_nginx()

pytestmark = pytest.mark.skipif(
    NGINX is None,
    reason="nginx is not installed: run scripts/ensure-nginx.sh "
    "(or: sudo apt-get install -y nginx-light)",
)


def nginx_features(binary: str) -> tuple[tuple[int, ...], str]:
    """(version, configure arguments) from ``nginx -V``."""
    assert os.access(binary, os.X_OK), f"no nginx binary at {binary} (MAILROOM_NGINX)"
    out = subprocess.run(
        [binary, "-V"], capture_output=True, text=True, timeout=10, check=True
    ).stderr
    found = re.search(r"nginx/(\d+(?:\.\d+)*)", out)
    assert found, f"unexpected nginx -V output: {out}"
    return tuple(int(part) for part in found.group(1).split(".")), out


def render_site(shipped: str, *, listen_port: int, app_port: int, logs: Path) -> str:
    """The shipped site with only its addresses and log paths changed; each must be there
    exactly once, so a change to the shipped file cannot silently dodge the tests."""
    substitutions = [
        (
            "    listen 80 default_server;\n",
            f"    listen 127.0.0.1:{listen_port} default_server;\n",
        ),
        ("    listen [::]:80 default_server;\n", ""),  # the tests use loopback only
        ("    server 127.0.0.1:5000;\n", f"    server 127.0.0.1:{app_port};\n"),
        ("/var/log/nginx/mailroom.access.log", str(logs / "access.log")),
        ("/var/log/nginx/mailroom.error.log", str(logs / "site-error.log")),
    ]
    for old, new in substitutions:
        count = shipped.count(old)
        assert count == 1, f"{SHIPPED_CONF} holds {old!r} {count} times, not once"
        shipped = shipped.replace(old, new)
    return shipped


def write_nginx_conf(directory: Path, *, listen_port: int, app_port: int) -> Path:
    """A top-level nginx.conf around the rendered site; every path it writes is in
    ``directory``, so nginx runs from there, as any user."""
    assert NGINX is not None
    _, configure = nginx_features(NGINX)
    directory.mkdir(parents=True, exist_ok=True)
    site = directory / "mailroom.conf"
    site.write_text(
        render_site(
            SHIPPED_CONF.read_text(), listen_port=listen_port, app_port=app_port, logs=directory
        )
    )
    temp_paths = [f"client_body_temp_path {directory}/client_body;"]
    for module in ("proxy", "fastcgi", "uwsgi", "scgi"):
        if f"--without-http_{module}_module" not in configure:
            temp_paths.append(f"{module}_temp_path {directory}/{module};")
    # As root nginx would run its workers as nobody, who cannot enter pytest's private
    # temporary directory (client bodies over 16k are buffered in a file there).
    user = "user root;" if os.geteuid() == 0 else ""
    conf = directory / "nginx.conf"
    conf.write_text(
        "\n".join(
            [
                "daemon off;",
                "master_process on;",
                "worker_processes 1;",
                user,
                f"pid {directory}/nginx.pid;",
                f"error_log {directory}/error.log notice;",
                "events { worker_connections 256; }",
                "http {",
                *(f"    {line}" for line in temp_paths),
                f"    include {site};",
                "}",
                "",
            ]
        )
    )
    return conf


async def start_nginx(directory: Path, conf: Path) -> Proc:
    assert NGINX is not None
    version, _ = nginx_features(NGINX)
    # -e (1.19.5+): nginx's own error log before it reads the configuration; without it
    # nginx first tries /var/log/nginx/error.log.
    early_log = ["-e", str(directory / "error.log")] if version >= (1, 19, 5) else []
    return await asyncio.create_subprocess_exec(
        NGINX,
        "-p",
        str(directory),
        "-c",
        str(conf),
        *early_log,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )


async def stop(proc: Proc, sig: signal.Signals) -> tuple[int, str]:
    """``sig`` to the process, a bounded wait, then SIGKILL to whatever of its group is left."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # nginx workers, should any outlive the master
    return await finish(proc)


@dataclass
class Front:
    """The app at ``direct``, nginx in front of it at ``url``."""

    direct: str
    url: str
    nginx_dir: Path
    talktome_log: Path
    send_queue: str
    nginx: Proc

    @property
    def access_log(self) -> Path:
        return self.nginx_dir / "access.log"

    def error_logs(self) -> str:
        return "".join(
            path.read_text() for path in sorted(self.nginx_dir.glob("*error.log")) if path.exists()
        )

    async def depth(self) -> int:
        return await queue_depth(self.send_queue)


StartFront = Callable[..., Awaitable[Front]]


@pytest.fixture
async def start_front(prefix: str, tmp_path: Path) -> AsyncIterator[StartFront]:
    """``await start_front(API_TOKEN=..., ...)``: the app (with those settings) behind
    nginx, both ready; stopped (SIGTERM / SIGQUIT) when the test ends."""
    procs: list[tuple[Proc, signal.Signals]] = []

    async def start(**settings: str | float | Path) -> Front:
        app_port, nginx_port = free_port(), free_port()
        talktome_log = tmp_path / "talktome.log"
        env = child_env(
            prefix,
            PORT=app_port,
            TALKTOME_LOG=talktome_log,
            DATABASE_URL=f"sqlite:///{tmp_path}/mailroom.db",
            # the prefix fixture deletes the retry queues of these delays
            RETRY_DELAYS=",".join(str(d) for d in TEST_RETRY_DELAYS),
            **settings,
        )
        server = await spawn("server.py", tmp_path, env)
        procs.append((server, signal.SIGTERM))
        direct = f"http://127.0.0.1:{app_port}"
        await wait_http(f"{direct}/readyz", server)  # connected: the queues exist

        nginx_dir = tmp_path / "nginx"
        conf = write_nginx_conf(nginx_dir, listen_port=nginx_port, app_port=app_port)
        nginx = await start_nginx(nginx_dir, conf)
        procs.append((nginx, signal.SIGQUIT))
        url = f"http://127.0.0.1:{nginx_port}"
        front = Front(
            direct, url, nginx_dir, talktome_log, Names.for_prefix(prefix).send_queue, nginx
        )
        try:
            await wait_http(f"{url}/healthz", nginx, timeout=10)
        except (AssertionError, TimeoutError) as exc:
            raise AssertionError(f"nginx did not come up: {exc}\n{front.error_logs()}") from exc
        return front

    yield start
    for proc, sig in reversed(procs):
        await stop(proc, sig)


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    # trust_env=False: no proxy from the environment between us and 127.0.0.1
    async with httpx.AsyncClient(timeout=10, trust_env=False) as client:
        yield client


def queued_id(response: httpx.Response) -> str:
    found = re.fullmatch(r"Email to \S+ queued \(id ([0-9a-f]{32})\)\n", response.text)
    assert found, response.text
    return found.group(1)


async def log_lines(path: Path, count: int, timeout: float = 5.0) -> list[str]:
    """The lines of ``path`` other than the /healthz checks, once there are ``count``
    (nginx writes a request's line just after answering it)."""
    async with asyncio.timeout(timeout):
        while True:
            text = path.read_text() if path.exists() else ""
            lines = [line for line in text.splitlines() if "/healthz" not in line]
            if len(lines) >= count:
                return lines
            await asyncio.sleep(0.02)


# -- the shipped file ---------------------------------------------------------------------


def test_shipped_conf_settings() -> None:
    """The settings the app relies on are in the shipped file (nginx proves it runs)."""
    text = re.sub(r"#.*", "", SHIPPED_CONF.read_text())  # directives, not comments
    assert "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;" in text
    assert "proxy_set_header X-Forwarded-Proto $scheme;" in text
    assert "proxy_set_header Host $host;" in text
    assert "client_max_body_size 10m;" in text
    assert "proxy_next_upstream off;" in text
    log_format = re.search(r"log_format\s+mailroom\s+([^;]*);", text)
    assert log_format is not None
    for leaky in ("$request ", '$request"', "$request_uri", "$args", "$query_string", "$arg_"):
        assert leaky not in log_format.group(1)
    assert "$uri" in log_format.group(1)
    assert re.search(r"access_log\s+\S+\s+mailroom;", text)


# -- without API_TOKEN: nothing through nginx may send --------------------------------------


async def test_without_token_nginx_clients_may_not_send(
    start_front: StartFront, http: httpx.AsyncClient
) -> None:
    front = await start_front()

    response = await http.get(f"{front.url}/?sendmail=a@example.com")
    assert response.status_code == 401
    assert response.text == SETUP_HELP + "\n"
    assert response.headers["WWW-Authenticate"] == "Bearer"
    posted = await http.post(
        f"{front.url}/api/messages", json={"to": "a@example.com", "subject": "s", "text": "t"}
    )
    assert posted.status_code == 401
    assert posted.json() == {"error": SETUP_HELP}
    assert (await http.get(f"{front.url}/logs")).status_code == 401
    assert await front.depth() == 0

    # The same request straight to the app, from loopback, sends.
    direct = await http.get(f"{front.direct}/?sendmail=a@example.com")
    assert direct.status_code == 200
    queued_id(direct)
    assert await front.depth() == 1

    talk = await http.get(f"{front.url}/?talktome")
    assert talk.status_code == 200
    assert talk.text.startswith("Logged the current time: ")


# -- with API_TOKEN -----------------------------------------------------------------------


async def test_token_through_nginx(start_front: StartFront, http: httpx.AsyncClient) -> None:
    front = await start_front(API_TOKEN=TOKEN, TRUSTED_PROXY_HOPS=1)
    bearer = {"Authorization": f"Bearer {TOKEN}"}

    response = await http.get(f"{front.url}/?sendmail=a@example.com", headers=bearer)
    assert response.status_code == 200, response.text
    queued_id(response)
    assert await front.depth() == 1

    response = await http.get(f"{front.url}/", params={"sendmail": "b@example.com", "token": TOKEN})
    assert response.status_code == 200, response.text
    assert await front.depth() == 2

    wrong = "tok-" + "x" * 28
    for params, headers in (
        ({"sendmail": "c@example.com", "token": wrong}, {}),
        ({"sendmail": "c@example.com"}, {"Authorization": "Bearer " + wrong}),
    ):
        refused = await http.get(f"{front.url}/", params=params, headers=headers)
        assert refused.status_code == 401
        assert refused.text == "The token is not valid.\n"
    none = await http.get(f"{front.url}/?sendmail=c@example.com")
    assert none.status_code == 401
    assert "A token is required" in none.text
    assert await front.depth() == 2

    body = {"to": ["Ann <ann@example.com>"], "subject": "Hello", "text": "Hi Ann"}
    created = await http.post(f"{front.url}/api/messages", json=body, headers=bearer)
    assert created.status_code == 202, created.text
    message_id = created.json()["id"]
    assert created.json() == {"id": message_id, "status": "queued"}
    assert created.headers["Location"].endswith(f"/api/messages/{message_id}")
    assert await front.depth() == 3

    # Reading through nginx works with the token too.
    status = await http.get(f"{front.url}/api/messages/{message_id}", headers=bearer)
    assert status.status_code == 200
    assert status.json()["id"] == message_id


# -- ngrok in front of nginx -----------------------------------------------------------------


async def test_what_ngrok_forwards_through_nginx_needs_the_token(
    start_front: StartFront, http: httpx.AsyncClient
) -> None:
    """A request as the ngrok agent hands it to nginx (ngrok's X-Forwarded-* headers, its
    public Host): with TRUSTED_PROXY_HOPS=2 the client is the address ngrok saw, and it
    needs the token for everything but the open routes. The web page comes through
    with its security headers; its data needs the token as any client's."""
    front = await start_front(API_TOKEN=TOKEN, TRUSTED_PROXY_HOPS=2)
    host = "a1b2-203-0-113-7.ngrok-free.app"
    ngrok = {
        "Host": host,
        "X-Forwarded-For": "203.0.113.7",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": host,
    }
    for path in ("/?sendmail=a@example.com", "/api/messages", "/api/outbox", "/logs"):
        refused = await http.get(f"{front.url}{path}", headers=ngrok)
        assert refused.status_code == 401, path
        assert "A token is required" in refused.text
    bearer = {**ngrok, "Authorization": f"Bearer {TOKEN}"}
    assert (await http.get(f"{front.url}/api/outbox", headers=bearer)).status_code == 200
    sent = await http.get(f"{front.url}/?sendmail=a@example.com", headers=bearer)
    assert sent.status_code == 200, sent.text
    assert await front.depth() == 1

    page = await http.get(f"{front.url}/", headers={**ngrok, "Accept": "text/html"})
    assert page.status_code == 200
    assert page.headers["Content-Type"] == "text/html; charset=utf-8"
    assert page.headers["Content-Security-Policy"].startswith("default-src 'none'")
    assert (await http.get(f"{front.url}/", headers=ngrok)).text.startswith("Mailroom:")
    script = await http.get(f"{front.url}/ui/app.js", headers=ngrok)
    assert script.status_code == 200 and "textContent" in script.text

    assert (await http.get(f"{front.url}/?talktome", headers=ngrok)).status_code == 200
    assert front.talktome_log.read_text().endswith(" talktome from 203.0.113.7\n")


# -- forged forwarding headers ------------------------------------------------------------


async def test_forged_forwarding_headers_change_nothing(
    start_front: StartFront, http: httpx.AsyncClient
) -> None:
    front = await start_front(TRUSTED_PROXY_HOPS=1)

    talk = await http.get(f"{front.url}/?talktome", headers={"X-Forwarded-For": "6.6.6.6"})
    assert talk.status_code == 200
    lines = front.talktome_log.read_text().splitlines()
    assert len(lines) == 1
    assert lines[0].endswith(" talktome from 127.0.0.1"), lines

    # A forged header does not make a request "direct loopback": still no sending.
    for forged in (
        {"X-Forwarded-For": "6.6.6.6"},
        {"X-Forwarded-For": "127.0.0.1"},
        {"X-Forwarded-For": ""},
        {"Forwarded": "for=127.0.0.1"},
    ):
        response = await http.get(f"{front.url}/?sendmail=a@example.com", headers=forged)
        assert response.status_code == 401, forged
        assert response.text == SETUP_HELP + "\n"
    assert await front.depth() == 0


# -- rate limits ----------------------------------------------------------------------------


async def test_rate_limit_applies_through_nginx(
    start_front: StartFront, http: httpx.AsyncClient
) -> None:
    front = await start_front(RATE_LIMIT_TALKTOME="3/minute", TRUSTED_PROXY_HOPS=1)
    for _ in range(3):
        assert (await http.get(f"{front.url}/?talktome")).status_code == 200
    limited = await http.get(f"{front.url}/?talktome")
    assert limited.status_code == 429
    assert 1 <= int(limited.headers["Retry-After"]) <= 60
    assert limited.text.startswith("Too many requests")
    # A forged address is no way out: the client is still 127.0.0.1 (what nginx saw).
    forged = await http.get(f"{front.url}/?talktome", headers={"X-Forwarded-For": "7.7.7.7"})
    assert forged.status_code == 429

    # Direct loopback clients are exempt.
    for _ in range(5):
        assert (await http.get(f"{front.direct}/?talktome")).status_code == 200
    assert len(front.talktome_log.read_text().splitlines()) == 3 + 5


# -- request size ---------------------------------------------------------------------------


def json_body_of_size(size: int) -> bytes:
    """A message whose JSON encoding is exactly ``size`` bytes (its text is too long)."""
    start = json.dumps({"to": "a@example.com", "subject": "s", "text": ""}).encode()
    body = start[:-2] + b"x" * (size - len(start)) + b'"}'
    assert len(body) == size
    return body


async def test_body_size_limits(start_front: StartFront, http: httpx.AsyncClient) -> None:
    """nginx's client_max_body_size equals the app's MAX_REQUEST_BYTES default (10 MiB)."""
    front = await start_front(API_TOKEN=TOKEN, TRUSTED_PROXY_HOPS=1)
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}

    too_big = await http.post(
        f"{front.url}/api/messages", content=json_body_of_size(10 * MIB + 1), headers=headers
    )
    assert too_big.status_code == 413
    assert too_big.headers["Content-Type"].startswith("text/html")  # nginx's page, not the app's
    assert "413 Request Entity Too Large" in too_big.text

    # 10 MiB exactly passes nginx (buffered to its temp dir) and reaches the app, which
    # reads it and refuses the text as too long: its own size limit lets it through too.
    at_limit = await http.post(
        f"{front.url}/api/messages", content=json_body_of_size(10 * MIB), headers=headers
    )
    assert at_limit.status_code == 400, at_limit.text
    assert at_limit.json()["field"] == "text"
    assert await front.depth() == 0


async def test_app_413_passes_through(start_front: StartFront, http: httpx.AsyncClient) -> None:
    front = await start_front(API_TOKEN=TOKEN, TRUSTED_PROXY_HOPS=1, MAX_REQUEST_BYTES=1024)
    response = await http.post(
        f"{front.url}/api/messages",
        content=json_body_of_size(4096),
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
    )
    assert response.status_code == 413
    assert response.headers["Content-Type"] == "application/json"
    assert response.json() == {"error": "The request body is larger than 1024 bytes."}
    assert await front.depth() == 0


# -- logs -----------------------------------------------------------------------------------


async def test_access_log_has_no_token(start_front: StartFront, http: httpx.AsyncClient) -> None:
    front = await start_front(API_TOKEN=TOKEN, TRUSTED_PROXY_HOPS=1)
    response = await http.get(f"{front.url}/", params={"sendmail": "a@example.com", "token": TOKEN})
    assert response.status_code == 200, response.text
    message_id = queued_id(response)
    wrong = await http.get(
        f"{front.url}/", params={"sendmail": "a@example.com", "token": TOKEN[:-1]}
    )
    assert wrong.status_code == 401

    lines = await log_lines(front.access_log, 2)
    log = front.access_log.read_text()
    for secret in (TOKEN, TOKEN[:-1], "token=", "sendmail", message_id):
        assert secret not in log
    assert TOKEN not in front.error_logs()
    # ... and the requests are there, as method, path and status.
    assert len(lines) == 2, lines
    assert lines[0].startswith("127.0.0.1 - [")
    assert '"GET / HTTP/1.1" 200 ' in lines[0]
    assert '"GET / HTTP/1.1" 401 ' in lines[1]
