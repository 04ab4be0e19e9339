"""A local capture SMTP server for running without a mail account.

``python devsmtp.py [--host 127.0.0.1] [--port 2525] [--outbox var/outbox]`` accepts
every mail (no TLS, no login) and writes each one to ``<outbox>/<time>-<n>.eml``. The
run command starts it when no ``SMTP_HOST`` is configured.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import itertools
import logging
import os
import signal
import sys
from datetime import datetime
from pathlib import Path

from aiosmtpd.smtp import SMTP, Envelope, Session

log = logging.getLogger(__name__)


class OutboxHandler:
    """aiosmtpd handler: store each message as an .eml file (written off the event loop)."""

    def __init__(self, outbox: Path) -> None:
        self.outbox = outbox
        self._counter = itertools.count(1)

    def _write(self, name: str, data: bytes) -> Path:
        self.outbox.mkdir(parents=True, exist_ok=True)
        tmp = self.outbox / f".{name}.tmp"
        tmp.write_bytes(data)
        final = self.outbox / name
        tmp.rename(final)  # readers never see a half-written file
        return final

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        header = (
            f"X-Envelope-From: {envelope.mail_from}\r\n"
            f"X-Envelope-To: {', '.join(envelope.rcpt_tos)}\r\n"
        ).encode()
        name = f"{datetime.now():%Y%m%d-%H%M%S-%f}-{next(self._counter)}.eml"
        path = await asyncio.to_thread(self._write, name, header + content)
        log.info("stored mail for %s in %s", ", ".join(envelope.rcpt_tos), path)
        return "250 OK: stored in the outbox"


async def start(host: str, port: int, outbox: Path) -> asyncio.Server:
    handler = OutboxHandler(outbox)
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: SMTP(handler, hostname="mailroom-devsmtp", enable_SMTPUTF8=True),
        host=host,
        port=port,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=2525)
    parser.add_argument("--outbox", type=Path, default=Path("var/outbox"))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("mail.log").setLevel(logging.WARNING)

    async def run() -> int:
        try:
            server = await start(args.host, args.port, args.outbox)
        except OSError as exc:
            # A busy port (or an address that is not ours): one line, no traceback.
            why = os.strerror(exc.errno) if exc.errno else str(exc)
            hint = " (choose another --port)" if exc.errno == errno.EADDRINUSE else ""
            print(
                f"devsmtp: cannot listen on {args.host}:{args.port}: {why}{hint}", file=sys.stderr
            )
            return 1
        log.info("listening on %s:%d, writing to %s/", args.host, args.port, args.outbox)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        server.close()
        await server.wait_closed()
        return 0

    return asyncio.run(run())


if __name__ == "__main__":
    # Run the module under its own name, so its loggers say "devsmtp", not "__main__".
    import devsmtp

    sys.exit(devsmtp.main())
