"""Against a real mail server: Postfix (implicit TLS and STARTTLS listeners, SASL logins
through Dovecot, delivery to Maildir), with what arrived read back over IMAPS (Dovecot)
with imaplib.

One Postfix and one Dovecot serve the whole module. Both run as ordinary processes from
a temporary directory of their own (configuration, queue, mailboxes, logs) on free
loopback ports, and are stopped afterwards. Postfix delivers only to its own domain,
``mailroom.test``: there is no relay host, and every other domain goes to the ``error``
transport, so nothing can leave the machine.

Needs the Debian packages postfix, dovecot-core and dovecot-imapd (scripts/test.sh
installs them when it can, through scripts/ensure-mailserver.sh) and root, which
Postfix needs to start. Without them the tests skip, except where the packages are
required (MAILROOM_MAILSERVER=1, set by scripts/test.sh once it has them, or CI=true):
there a missing package fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import imaplib
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import trustme

from config import Secret, Settings
from tests.conftest import running_app, running_worker, wait_ready
from tests.support import free_port
from tests.test_retries import wait_kept_past_retries
from tests.test_status_api import wait_status

PACKAGES = {
    "postfix": "/usr/sbin/postfix",
    "dovecot-core": "/usr/sbin/dovecot",
    "dovecot-imapd": "/usr/lib/dovecot/imap",
}
DOMAIN = "mailroom.test"  # a .test address: accepted like any other (issue 16)
LOGIN = (f"mailer@{DOMAIN}", "mailer-Passw0rd")  # the worker's SMTP account
ALICE = (f"alice@{DOMAIN}", "alice-Passw0rd")  # a mailbox, read over IMAPS
HELO_NAME = "worker.mailroom.test"
NOBODY_UID = 65534  # owns the mailboxes (Postfix's virtual delivery, Dovecot's IMAP)
# A session's summary in Postfix's log: "disconnect from ... ehlo=1 auth=0/1 quit=1 ...".
DISCONNECT = re.compile(r"disconnect from \S+ (.*)$", re.MULTILINE)


@dataclass
class MailServer:
    directory: Path
    smtps_port: int  # implicit TLS
    submission_port: int  # STARTTLS
    imaps_port: int
    ca_file: str

    @property
    def maillog(self) -> Path:
        return self.directory / "maillog"

    def log_mark(self) -> int:
        return self.maillog.stat().st_size

    async def sessions(self, mark: int, count: int, timeout: float = 15) -> list[str]:
        """The summaries of the first ``count`` SMTP sessions that ended after ``mark``
        (Postfix writes its log through postlogd: a line may come a moment later)."""
        async with asyncio.timeout(timeout):
            while True:
                text = (await asyncio.to_thread(self.maillog.read_bytes))[mark:].decode()
                # (commands=0/0: the fixture's checks that the ports listen)
                found = [s for s in DISCONNECT.findall(text) if s != "commands=0/0"]
                if len(found) >= count:
                    return found[:count]
                await asyncio.sleep(0.05)

    def settings(self, security: str, **overrides: Any) -> dict[str, Any]:
        return {
            "smtp_host": "127.0.0.1",
            "smtp_port": self.smtps_port if security == "ssl" else self.submission_port,
            "smtp_security": security,
            "smtp_ca_file": Path(self.ca_file),
            "smtp_username": LOGIN[0],
            "smtp_password": Secret(LOGIN[1]),
            "smtp_helo_name": HELO_NAME,
            "mail_from": f"Mailroom <{LOGIN[0]}>",
            **overrides,
        }

    async def fetch(self, mailroom_id: str, timeout: float = 20) -> EmailMessage:
        """The mail with ``X-Mailroom-Id: mailroom_id`` in Alice's inbox, over IMAPS."""
        return await asyncio.to_thread(self._fetch, mailroom_id, timeout)

    def _fetch(self, mailroom_id: str, timeout: float) -> EmailMessage:
        context = ssl.create_default_context(cafile=self.ca_file)
        deadline = time.monotonic() + timeout
        with imaplib.IMAP4_SSL(
            "127.0.0.1", self.imaps_port, ssl_context=context, timeout=10
        ) as imap:
            imap.login(*ALICE)
            while True:
                imap.select("INBOX", readonly=True)
                _, found = imap.search(None, "HEADER", "X-Mailroom-Id", mailroom_id)
                if found[0]:
                    _, data = imap.fetch(found[0].split()[0], "(RFC822)")
                    raw = data[0]
                    assert isinstance(raw, tuple)
                    body = raw[1].replace(b"\r\n", b"\n")
                    message = email.message_from_bytes(body, policy=policy.default)
                    assert isinstance(message, EmailMessage)
                    return message
                assert time.monotonic() < deadline, f"{mailroom_id} did not arrive"
                time.sleep(0.1)  # polling the mailbox, in a worker thread


def _missing() -> list[str]:
    return [name for name, path in PACKAGES.items() if not os.access(path, os.X_OK)]


def _postfix_config(d: Path, smtps: int, submission: int) -> tuple[str, str]:
    main = f"""\
compatibility_level = 3.6
queue_directory = {d}/queue
data_directory = {d}/data
mail_owner = postfix
setgid_group = postdrop
maillog_file = {d}/maillog
maillog_file_prefixes = {d}
myhostname = mx.{DOMAIN}
mydomain = {DOMAIN}
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
# Never off the machine: no relay host, and every domain but our own is refused.
relayhost =
default_transport = error:5.7.1 this test server delivers only to {DOMAIN}
relay_transport = $default_transport
local_transport = $default_transport
smtp_dns_support_level = disabled
smtpd_peername_lookup = no
smtpd_relay_restrictions = permit_sasl_authenticated, reject_unauth_destination
smtpd_recipient_restrictions = reject_unauth_destination
virtual_mailbox_domains = {DOMAIN}
virtual_mailbox_base = {d}/mail
virtual_mailbox_maps = texthash:{d}/mailboxes
virtual_uid_maps = static:{NOBODY_UID}
virtual_gid_maps = static:{NOBODY_UID}
alias_maps =
alias_database =
smtpd_sasl_type = dovecot
smtpd_sasl_path = {d}/dovecot-auth
smtpd_sasl_auth_enable = yes
smtpd_tls_chain_files = {d}/server.pem
smtpd_tls_security_level = may
smtpd_tls_auth_only = yes
smtpd_tls_received_header = yes
smtpd_helo_required = yes
smtpd_helo_restrictions = reject_invalid_helo_hostname, reject_non_fqdn_helo_hostname
smtpd_error_sleep_time = 0
smtputf8_enable = yes
biff = no
"""
    # Each listener takes only logged-in clients, like a real submission service.
    submit = "-o smtpd_client_restrictions=permit_sasl_authenticated,reject"
    master = f"""\
127.0.0.1:{smtps} inet n - n - - smtpd -o smtpd_tls_wrappermode=yes {submit}
127.0.0.1:{submission} inet n - n - - smtpd -o smtpd_tls_security_level=encrypt {submit}
cleanup unix n - n - 0 cleanup
qmgr unix n - n 300 1 qmgr
rewrite unix - - n - - trivial-rewrite
bounce unix - - n - 0 bounce
defer unix - - n - 0 bounce
trace unix - - n - 0 bounce
verify unix - - n - 1 verify
error unix - - n - - error
retry unix - - n - - error
virtual unix - n n - - virtual
proxymap unix - - n - - proxymap
anvil unix - - n - 1 anvil
scache unix - - n - 1 scache
tlsmgr unix - - n 1000? 1 tlsmgr
postlog unix-dgram n - n - 1 postlogd
"""
    return main, master


def _dovecot_config(d: Path, imaps: int) -> str:
    return f"""\
base_dir = {d}/dovecot-run
state_dir = {d}/dovecot-state
log_path = {d}/dovecot.log
protocols = imap
listen = 127.0.0.1
ssl = required
ssl_cert = <{d}/cert.pem
ssl_key = <{d}/key.pem
auth_mechanisms = plain login
# No wait after a failed login, and no growing penalty for the address that keeps
# failing (127.0.0.1): the tests provoke several failures on purpose.
auth_failure_delay = 0
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN {d}/users
}}
userdb {{
  driver = static
  args = uid={NOBODY_UID} gid={NOBODY_UID} home={d}/mail/%n
}}
mail_location = maildir:{d}/mail/%n
service imap-login {{
  inet_listener imap {{
    port = 0
  }}
  inet_listener imaps {{
    port = {imaps}
    ssl = yes
  }}
}}
service auth {{
  unix_listener {d}/dovecot-auth {{
    mode = 0666
  }}
}}
"""


def _wait_listening(ports: list[int], procs: list[subprocess.Popen[bytes]], d: Path) -> None:
    deadline = time.monotonic() + 30
    for port in ports:
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            dead = [p.args for p in procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                logs = "\n".join(
                    f"--- {name}\n{(d / name).read_text(errors='replace')}"
                    for name in ("maillog", "dovecot.log", "postfix.out", "dovecot.out")
                    if (d / name).exists()
                )
                pytest.fail(f"mail server not listening on {port} (exited: {dead})\n{logs}")
            time.sleep(0.05)


def _stop(proc: subprocess.Popen[bytes], stop: list[str] | None) -> None:
    if proc.poll() is None:
        if stop is not None:
            subprocess.run(stop, capture_output=True, timeout=30, check=False)
        else:
            proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


@pytest.fixture(scope="module")
def mailserver(ca: trustme.CA, ca_file: str) -> Iterator[MailServer]:
    missing = _missing()
    if missing:
        why = (
            f"{', '.join(missing)} not installed: run scripts/ensure-mailserver.sh "
            f"(or: sudo apt-get install -y {' '.join(PACKAGES)})"
        )
        if os.environ.get("MAILROOM_MAILSERVER") == "1" or os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    if os.geteuid() != 0:
        pytest.skip("Postfix starts only as root (postfix, dovecot-core, dovecot-imapd)")
    # Not under pytest's own temporary directory: that is private to root, and Postfix's
    # and Dovecot's unprivileged processes must reach their files.
    d = Path(tempfile.mkdtemp(prefix="mailroom-mailserver-"))
    d.chmod(0o755)
    smtps, submission, imaps = free_port(), free_port(), free_port()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        cert = ca.issue_cert("127.0.0.1", "localhost")
        cert.private_key_and_cert_chain_pem.write_to_path(str(d / "server.pem"))
        cert.cert_chain_pems[0].write_to_path(str(d / "cert.pem"))
        cert.private_key_pem.write_to_path(str(d / "key.pem"))
        for key in ("server.pem", "key.pem"):
            (d / key).chmod(0o600)
        (d / "users").write_text(
            f"{LOGIN[0]}:{{PLAIN}}{LOGIN[1]}\n{ALICE[0]}:{{PLAIN}}{ALICE[1]}\n"
        )
        (d / "mailboxes").write_text(f"{ALICE[0]} alice/\n")
        for sub in ("postfix", "queue", "data", "mail", "dovecot-run", "dovecot-state"):
            (d / sub).mkdir()
        shutil.chown(d / "data", "postfix")
        os.chown(d / "mail", NOBODY_UID, NOBODY_UID)
        (d / "maillog").touch()
        main, master = _postfix_config(d, smtps, submission)
        (d / "postfix" / "main.cf").write_text(main)
        (d / "postfix" / "master.cf").write_text(master)
        (d / "dovecot.conf").write_text(_dovecot_config(d, imaps))

        def start(args: list[str], out: str) -> None:
            with (d / out).open("wb") as sink:
                procs.append(
                    subprocess.Popen(
                        args, cwd=d, stdin=subprocess.DEVNULL, stdout=sink, stderr=sink
                    )
                )

        start([PACKAGES["dovecot-core"], "-F", "-c", str(d / "dovecot.conf")], "dovecot.out")
        start([PACKAGES["postfix"], "-c", str(d / "postfix"), "start-fg"], "postfix.out")
        _wait_listening([imaps, smtps, submission], procs, d)
        yield MailServer(d, smtps, submission, imaps, ca_file)
    finally:
        # Postfix first (it asks Dovecot about logins), with its own command: its master
        # process leaves the session of the command that started it.
        postfix_stop = [PACKAGES["postfix"], "-c", str(d / "postfix"), "stop"]
        for proc, stop in reversed(list(zip(procs, [None, postfix_stop], strict=False))):
            _stop(proc, stop)
        shutil.rmtree(d, ignore_errors=True)


async def send(client: Any, to: str, subject: str = "Grüße ✉", text: str = "Hallo\n") -> str:
    response = await client.post("/api/messages", json={"to": to, "subject": subject, "text": text})
    assert response.status_code == 202, await response.get_json()
    message_id: str = (await response.get_json())["id"]
    return message_id


@pytest.mark.parametrize("security", ["ssl", "starttls"])
async def test_login_and_delivery(
    security: str, mailserver: MailServer, make_settings: Callable[..., Settings]
) -> None:
    """Implicit TLS (465-style) and STARTTLS (587-style), each with a login: the mail
    arrives in the mailbox with our EHLO name, TLS and the login in Postfix's Received
    header; one login per connection, with PLAIN, and QUIT at shutdown."""
    settings = make_settings(**mailserver.settings(security))
    mark = mailserver.log_mark()
    async with running_app(settings) as (app, client):
        await wait_ready(app)
        message_id = await send(client, f"Alice <{ALICE[0]}>")
        async with running_worker(settings):
            await wait_status(client, message_id, "sent")
        (session,) = await mailserver.sessions(mark, 1)
    mail = await mailserver.fetch(message_id)
    assert mail["Subject"] == "Grüße ✉"
    assert mail.get_content() == "Hallo\n"
    assert mail["To"] == f"Alice <{ALICE[0]}>"
    assert mail["From"] == f"Mailroom <{LOGIN[0]}>"
    received = " ".join(mail["Received"].split())
    assert received.startswith(f"from {HELO_NAME} (")  # SMTP_HELO_NAME
    assert "(using TLSv1.3" in received and "with ESMTPSA" in received
    expected = "ehlo=1 auth=1" if security == "ssl" else "ehlo=2 starttls=1 auth=1"
    assert session.startswith(f"{expected} mail=1 rcpt=1 data=1 quit=1")
    log = mailserver.maillog.read_text()
    assert f"sasl_method=PLAIN, sasl_username={LOGIN[0]}" in log
    # Postfix offers PIPELINING there: the transaction went out pipelined (smtppipe.py).
    probe = aiosmtplib.SMTP(
        hostname="127.0.0.1",
        port=settings.smtp_port,
        use_tls=security == "ssl",
        start_tls=security == "starttls",
        tls_context=ssl.create_default_context(cafile=mailserver.ca_file),
        timeout=10,
    )
    async with probe:
        await probe.ehlo()
        assert probe.supports_extension("pipelining"), probe.esmtp_extensions


async def test_refused_login_is_one_auth_then_quit(
    mailserver: MailServer,
    make_settings: Callable[..., Settings],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A wrong password: each attempt makes one AUTH (Postfix logs auth=0/1, not 0/2) and
    ends with QUIT; the message is kept, and the error does not repeat its code."""
    settings = make_settings(**mailserver.settings("ssl", smtp_password=Secret("wrong-pass-1")))
    mark = mailserver.log_mark()
    async with running_app(settings) as (app, client):
        await wait_ready(app)
        message_id = await send(client, ALICE[0])
        async with running_worker(settings):
            record = await wait_kept_past_retries(client, message_id, settings, timeout=40)
        sessions = await mailserver.sessions(mark, record["attempts"])
    assert all(s.startswith("ehlo=1 auth=0/1 quit=1 ") for s in sessions), sessions
    assert record["last_error"]["code"] == 535
    assert record["last_error"]["message"].startswith(
        "SMTP login refused (AUTH PLAIN): 5.7.8 Error: authentication failed"
    )
    assert "SMTP LOGIN REFUSED" in caplog.text and "wrong-pass-1" not in caplog.text


async def test_untrusted_certificate_is_kept_and_names_smtp_ca_file(
    mailserver: MailServer,
    make_settings: Callable[..., Settings],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Postfix's certificate is from a CA the system does not know: without SMTP_CA_FILE
    the message is kept and retried, the log names SMTP_CA_FILE; with it, it arrives."""
    settings = make_settings(**mailserver.settings("starttls", smtp_ca_file=None))
    async with running_app(settings) as (app, client):
        await wait_ready(app)
        message_id = await send(client, ALICE[0])
        async with running_worker(settings):
            record = await wait_kept_past_retries(client, message_id, settings, timeout=40)
        assert "SMTP SETTINGS FAULT" in caplog.text and "check SMTP_CA_FILE;" in caplog.text
        assert "certificate is not trusted" in record["last_error"]["message"]
        fixed = make_settings(**mailserver.settings("starttls"))
        async with running_worker(fixed):
            await wait_status(client, message_id, "sent")
    assert (await mailserver.fetch(message_id))["X-Mailroom-Id"] == message_id


async def test_unknown_recipients_are_refused_once_and_dead_lettered(
    mailserver: MailServer, make_settings: Callable[..., Settings]
) -> None:
    """An unknown mailbox, and a domain this Postfix does not deliver to (nothing leaves
    the machine): each refused once, at RCPT; the message fails at once."""
    settings = make_settings(**mailserver.settings("ssl"))
    mark = mailserver.log_mark()
    async with running_app(settings) as (app, client), running_worker(settings):
        await wait_ready(app)
        response = await client.post(
            "/api/messages",
            json={"to": [f"nobody@{DOMAIN}", "someone@example.com"], "subject": "s", "text": "t"},
        )
        record = await wait_status(client, (await response.get_json())["id"], "failed")
    assert record["attempts"] == 1
    assert record["last_error"]["code"] == 550
    assert not record["last_error"]["message"].startswith("550")
    refused = {r["address"]: (r["status"], r["code"], r["message"]) for r in record["recipients"]}
    assert refused[f"nobody@{DOMAIN}"][:2] == ("refused", 550)
    assert refused[f"nobody@{DOMAIN}"][2].startswith(f"5.1.1 <nobody@{DOMAIN}>")
    assert refused["someone@example.com"][:2] == ("refused", 554)
    assert refused["someone@example.com"][2].startswith("5.7.1 <someone@example.com>: Relay")
    (session,) = await mailserver.sessions(mark, 1)
    assert "rcpt=0/2" in session and "quit=1" in session
