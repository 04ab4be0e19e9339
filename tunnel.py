"""A public https URL for a running Mailroom, through ngrok, in one command.

``./scripts/ngrok.sh`` (``python tunnel.py``) checks that the server has an ``API_TOKEN``
(it refuses to expose one without, saying how to set one), finds what to expose (nginx on
port 80 when it answers, else the app on HOST:PORT), starts ``ngrok http`` to it, reads
the public https URL from ngrok's local API (``http://127.0.0.1:4040/api/tunnels``;
``--api`` changes that), and prints the two curl commands of the README with that URL
and the token. It then waits; Ctrl-C (or SIGTERM) stops ngrok and exits 0. If ngrok exits
on its own (no authtoken, another agent already online), it shows ngrok's last lines and
exits 1.

``TRUSTED_PROXY_HOPS`` should be 2 behind ngrok -> nginx, 1 behind ngrok alone: the
command says so when it is not, but does not refuse (the token still guards).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from urllib.parse import urlsplit

from config import Settings
from errors import ConfigError
from launcher import connect_host, http_get, http_status, url_host

NGROK_API = "http://127.0.0.1:4040"
NGINX_PORT = 80
URL_TIMEOUT = 30.0  # seconds for ngrok to report its public URL
STOP_TIMEOUT = 5.0  # seconds ngrok gets to exit after SIGTERM
REFUSAL = """\
tunnel: refusing to expose a server that has no API_TOKEN.
Anyone who has the public URL can reach it: the token is what keeps them from sending
mail under your name (and without one nothing sent through the tunnel works). Make one:

    python -c 'import secrets; print(secrets.token_urlsafe(32))'

put it in .env as API_TOKEN=<token>, restart Mailroom (./scripts/run.sh), and run this
again."""
NO_NGROK = """\
tunnel: ngrok is not installed (no 'ngrok' on PATH).
Install it (https://ngrok.com/download; on Debian/Ubuntu from ngrok's apt repository, or
unpack the Linux tarball into /usr/local/bin), sign up for a free account, then once:

    ngrok config add-authtoken <your ngrok authtoken>

and run this again."""


class TunnelError(Exception):
    """The tunnel could not be opened; the message says why and what to do."""


@dataclass(frozen=True)
class Target:
    name: str  # "nginx" or "app"
    host: str
    port: int
    hops: int  # TRUSTED_PROXY_HOPS this setup needs

    @property
    def addr(self) -> str:
        return f"http://{url_host(self.host)}:{self.port}"


async def choose_target(settings: Settings, to: str, nginx_port: int) -> Target:
    """nginx when asked, or (auto) when it answers /healthz on nginx_port; else the app."""
    app = Target("app", connect_host(settings.host), settings.port, 1)
    nginx = Target("nginx", "127.0.0.1", nginx_port, 2)
    if to == "app":
        candidates = [app]
    elif to == "nginx":
        candidates = [nginx]
    else:
        candidates = [nginx, app]
    for target in candidates:
        if await http_status(target.host, target.port, "/healthz") == 200:
            return target
    tried = " or ".join(f"{t.name} at {t.addr}" for t in candidates)
    raise TunnelError(
        f"tunnel: Mailroom does not answer GET /healthz ({tried} tried). "
        "Start it first (./scripts/run.sh), or say where it is (--to, --nginx-port, PORT)."
    )


def public_url(answer: bytes, target: Target) -> str | None:
    """The https URL of a tunnel to ``target`` in ngrok's /api/tunnels answer."""
    try:
        tunnels = json.loads(answer).get("tunnels") or []
    except (ValueError, AttributeError):
        return None
    wanted = {target.port, str(target.port)}
    for tunnel in tunnels:
        url = str(tunnel.get("public_url") or "")
        addr = str((tunnel.get("config") or {}).get("addr") or "")
        port = urlsplit(addr if "://" in addr else f"http://{addr}").port
        if url.startswith("https://") and (port in wanted or addr in wanted):
            return url.rstrip("/")
    return None


class Tunnel:
    def __init__(self, settings: Settings, args: argparse.Namespace) -> None:
        self.settings = settings
        self.args = args
        self.output: collections.deque[str] = collections.deque(maxlen=20)
        self.stop = asyncio.Event()

    async def run(self) -> int:
        token = self.settings.api_tokens[0].get()
        ngrok = shutil.which(self.args.ngrok)
        if ngrok is None:
            print(NO_NGROK, file=sys.stderr)
            return 1
        try:
            target = await choose_target(self.settings, self.args.to, self.args.nginx_port)
        except TunnelError as exc:
            print(exc, file=sys.stderr)
            return 1
        if self.settings.trusted_proxy_hops != target.hops:
            print(
                f"tunnel: warning: TRUSTED_PROXY_HOPS is {self.settings.trusted_proxy_hops}, "
                f"but behind ngrok -> {target.name} it should be {target.hops}: set "
                f"TRUSTED_PROXY_HOPS={target.hops} in .env and restart Mailroom, or rate "
                "limits and the talktome log see the wrong client address.",
                file=sys.stderr,
            )
        process = await asyncio.create_subprocess_exec(
            ngrok,
            "http",
            target.addr,
            "--log",
            "stdout",
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches us; we stop ngrok
        )
        reader = asyncio.create_task(self._keep_output(process))
        try:
            url = await self._wait_for_url(process, target)
            if url is None:
                return 1
            self._print(url, target, token)
            return await self._wait(process)
        finally:
            if process.returncode is None:
                process.terminate()
                try:
                    await asyncio.wait_for(process.wait(), STOP_TIMEOUT)
                except TimeoutError:
                    process.kill()
                    await process.wait()
            await reader

    async def _keep_output(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        while line := await process.stdout.readline():
            self.output.append(line.decode(errors="replace").rstrip())

    async def _wait_for_url(
        self, process: asyncio.subprocess.Process, target: Target
    ) -> str | None:
        api = urlsplit(self.args.api)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.args.timeout
        while True:
            if self.stop.is_set():
                return None
            if process.returncode is not None:
                self._ngrok_failed(f"ngrok exited (status {process.returncode})")
                return None
            answer = await http_get(api.hostname or "127.0.0.1", api.port or 80, "/api/tunnels")
            if answer is not None and answer[0] == 200 and (url := public_url(answer[1], target)):
                return url
            if loop.time() > deadline:
                self._ngrok_failed(
                    f"ngrok's local API at {self.args.api} showed no https tunnel to "
                    f"{target.addr} within {self.args.timeout:g}s (another ngrok agent may "
                    "hold port 4040: stop it, or give its address with --api)"
                )
                return None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), 0.25)

    def _ngrok_failed(self, what: str) -> None:
        print(f"tunnel: {what}. ngrok said:", file=sys.stderr)
        for line in list(self.output) or ["(nothing)"]:
            print(f"  {line}", file=sys.stderr)
        print(
            "If it is about the authtoken: ngrok config add-authtoken <your ngrok authtoken>",
            file=sys.stderr,
        )

    def _print(self, url: str, target: Target, token: str) -> None:
        via = "nginx -> " if target.name == "nginx" else ""
        print(
            f"\nMailroom is public at {url}/\n"
            f"  (ngrok -> {via}the app; {target.addr} on this machine)\n\n"
            "Try:\n"
            f'  curl "{url}/?talktome"\n'
            f"  curl -H {shlex.quote('Authorization: Bearer ' + token)} "
            f'"{url}/?sendmail=email@example.com"\n\n'
            f"In a browser: {url}/ (it asks for the token once per tab)\n"
            "The free ngrok URL changes every time ngrok starts.\n\n"
            "Press Ctrl-C to stop ngrok.\n",
            flush=True,
        )

    async def _wait(self, process: asyncio.subprocess.Process) -> int:
        stop = asyncio.ensure_future(self.stop.wait())
        exited = asyncio.ensure_future(process.wait())
        try:
            await asyncio.wait({stop, exited}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            exited.cancel()
        if self.stop.is_set():
            return 0
        self._ngrok_failed(f"ngrok exited (status {process.returncode})")
        return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--to",
        choices=("auto", "nginx", "app"),
        default="auto",
        help="what ngrok forwards to: nginx, the app (HOST:PORT), or auto (nginx when it "
        "answers on --nginx-port, else the app; the default)",
    )
    parser.add_argument("--nginx-port", type=int, default=NGINX_PORT, help="default 80")
    parser.add_argument("--api", default=NGROK_API, help=f"ngrok's local API (default {NGROK_API})")
    parser.add_argument("--ngrok", default="ngrok", help="the ngrok command (default ngrok)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=URL_TIMEOUT,
        help=f"seconds to wait for the public URL (default {URL_TIMEOUT:g})",
    )
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"tunnel: configuration error: {exc}", file=sys.stderr)
        return 2
    if not settings.api_tokens:
        print(REFUSAL, file=sys.stderr)
        return 2

    async def run() -> int:
        tunnel = Tunnel(settings, args)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, tunnel.stop.set)
        return await tunnel.run()

    return asyncio.run(run())


if __name__ == "__main__":
    sys.exit(main())
