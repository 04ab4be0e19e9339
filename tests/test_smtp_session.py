"""The SMTP session of the worker's connection pool, against in-process aiosmtpd servers:
one AUTH per attempt, QUIT whenever an open session ends, the EHLO name, and which
failures are settings faults (and which setting they name)."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import trustme
from aiosmtpd.smtp import MISSING

import mailer
from config import Secret, Settings
from devsmtp import start as start_devsmtp
from errors import DeliveryError, PermanentDeliveryError, SmtpAuthError, SmtpConfigError
from mailer import SmtpPool
from messages import MailJob, new_job
from tests.conftest import running_worker
from tests.support import (
    SMTP_PASS,
    SMTP_USER,
    Security,
    SmtpRecorder,
    SmtpServer,
    start_no_ehlo,
    start_smtp,
)


def job() -> MailJob:
    return new_job(to="a@example.com", subject="s", text="t")


def settings_for(server: SmtpServer, ca_file: str | None, **overrides: Any) -> Settings:
    return Settings(
        **{**server.settings_overrides(ca_file, login=True), "smtp_timeout": 5.0, **overrides}
    )


@pytest.fixture
async def servers(server_tls: ssl.SSLContext) -> AsyncIterator[dict[Security, SmtpServer]]:
    """An aiosmtpd server of each kind (with AUTH PLAIN and LOGIN), closed afterwards."""
    kinds: tuple[Security, ...] = ("none", "starttls", "ssl")
    started = {k: await start_smtp(k, server_tls if k != "none" else None) for k in kinds}
    yield started
    for server in started.values():
        server.server.close()
        await server.server.wait_closed()


async def send_error(settings: Settings) -> DeliveryError:
    """What one send with ``settings`` raises (the pool is closed afterwards)."""
    pool = SmtpPool(settings, 1)
    try:
        with pytest.raises(DeliveryError) as info:
            await pool.send(job())
    finally:
        await pool.close()
    return info.value


@pytest.mark.parametrize("security", ["ssl", "starttls"])
async def test_refused_login_is_one_auth_then_quit(
    security: Security, servers: dict[Security, SmtpServer], ca_file: str
) -> None:
    """The server offers PLAIN and LOGIN: a refused PLAIN is not followed by LOGIN with
    the same password, and the session ends with QUIT, not a dropped connection."""
    server = servers[security]
    error = await send_error(settings_for(server, ca_file, smtp_password=Secret("wrong-1234")))
    assert isinstance(error, SmtpAuthError)
    assert server.recorder.logins == [("PLAIN", False)]
    assert server.recorder.quits == 1
    assert error.code == 535
    assert error.reason.startswith("SMTP login refused (AUTH PLAIN): 5.7.8 ")  # not "535 ..."
    assert error.settings == ("SMTP_USERNAME", "SMTP_PASSWORD")


async def test_login_once_per_connection_and_quit_when_retired_and_at_close(
    servers: dict[Security, SmtpServer], ca_file: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = servers["ssl"]
    pool = SmtpPool(settings_for(server, ca_file, smtp_helo_name="worker.example.org"), 2)
    try:
        await pool.send(job())
        await pool.send(job())  # the same connection: no second login
        assert (server.recorder.connections, server.recorder.logins) == (1, [("PLAIN", True)])
        monkeypatch.setattr(mailer, "IDLE_CLOSE_SECONDS", 0.0)
        await pool.send(job())  # the idle connection is retired (QUIT) for a new one
        assert server.recorder.connections == 2
        assert server.recorder.quits == 1
    finally:
        await pool.close()  # shutdown: QUIT on the idle one
    assert server.recorder.quits == 2
    assert [m.helo for m in server.recorder.received] == ["worker.example.org"] * 3
    assert {m.login for m in server.recorder.received} == {SMTP_USER}


@pytest.fixture
def other_ca_file(tmp_path: Path) -> str:
    path = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    return str(path)


async def test_untrusted_certificates_name_smtp_ca_file(
    servers: dict[Security, SmtpServer], other_ca_file: str, tmp_path: Path
) -> None:
    """CERTIFICATE_VERIFY_FAILED is a settings fault (never the message's), for implicit
    TLS and STARTTLS, without SMTP_CA_FILE, with the wrong one, and for a self-signed
    server certificate."""
    for security in ("ssl", "starttls"):
        for ca_file in (None, other_ca_file):
            error = await send_error(settings_for(servers[security], ca_file))
            assert isinstance(error, SmtpConfigError), (security, ca_file, error)
            assert error.settings == ("SMTP_CA_FILE",)
            assert "certificate is not trusted" in error.reason
            assert (ca_file or "the system's CAs") in error.reason
    self_signed = trustme.CA()  # its own certificate, signed by itself, serves as the server's
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    with self_signed.cert_pem.tempfile() as cert, self_signed.private_key_pem.tempfile() as key:
        tls.load_cert_chain(cert, key)
    server = await start_smtp("ssl", tls)
    try:
        error = await send_error(settings_for(server, None))
    finally:
        server.server.close()
        await server.server.wait_closed()
    assert isinstance(error, SmtpConfigError)
    assert error.settings == ("SMTP_CA_FILE",)
    assert "self-signed" in error.reason
    assert all(not s.recorder.received for s in servers.values())


@pytest.mark.parametrize(
    ("security", "server_kind", "expected"),
    [
        ("ssl", "none", "does not speak TLS"),  # TLS to a plain server
        ("starttls", "ssl", "expects TLS from the start"),  # STARTTLS to implicit TLS
        ("none", "ssl", "expects TLS from the start"),  # plain to implicit TLS
        ("starttls", "none", "offers no STARTTLS"),  # STARTTLS to a server without it
    ],
)
async def test_wrong_security_for_the_port_names_smtp_security(
    security: Security,
    server_kind: Security,
    expected: str,
    servers: dict[Security, SmtpServer],
    ca_file: str,
) -> None:
    # An implicit-TLS server never greets a plain client: found out after SMTP_TIMEOUT.
    settings = settings_for(servers[server_kind], ca_file, smtp_security=security, smtp_timeout=1.0)
    error = await send_error(settings)
    assert isinstance(error, SmtpConfigError), error
    assert expected in error.reason
    assert error.settings == ("SMTP_SECURITY", "SMTP_PORT")
    assert not servers[server_kind].recorder.logins


async def test_username_for_a_server_without_auth_says_so(tmp_path: Path) -> None:
    """devsmtp (the local capture server) offers no AUTH: with SMTP_USERNAME set, the
    fault says exactly that, rather than calling some answer a refused login."""
    server = await start_devsmtp("127.0.0.1", 0, tmp_path / "outbox")
    try:
        port = server.sockets[0].getsockname()[1]
        settings = Settings(
            smtp_host="127.0.0.1",
            smtp_port=port,
            smtp_security="none",
            smtp_username=SMTP_USER,
            smtp_password=Secret(SMTP_PASS),
        )
        error = await send_error(settings)
    finally:
        server.close()
        await server.wait_closed()
    assert type(error) is SmtpConfigError
    assert error.reason.startswith("SMTP_USERNAME is set, but the SMTP server offers no login")
    assert "unset SMTP_USERNAME and SMTP_PASSWORD" in error.reason
    assert error.settings == ("SMTP_USERNAME", "SMTP_PASSWORD", "SMTP_SECURITY")
    assert error.code is None
    assert not list((tmp_path / "outbox").glob("*.eml"))


async def test_login_required_but_no_username_names_it(
    servers: dict[Security, SmtpServer], ca_file: str
) -> None:
    """530 Authentication required (no SMTP_USERNAME) is a settings fault, not a 5xx that
    fails the message."""
    settings = settings_for(servers["ssl"], ca_file, smtp_username=None, smtp_password=None)
    error = await send_error(settings)
    assert isinstance(error, SmtpConfigError)
    assert not isinstance(error, PermanentDeliveryError)
    assert (error.code, error.settings) == (530, ("SMTP_USERNAME", "SMTP_PASSWORD"))
    assert error.reason == "the SMTP server requires a login: 5.7.0 Authentication required"


async def test_worker_warns_at_start_when_the_ehlo_name_has_no_dot(
    make_settings: Callable[..., Settings], smtp: SmtpServer, caplog: pytest.LogCaptureFixture
) -> None:
    plain = smtp.settings_overrides(None, login=False)
    for name, warned in (("mailhost", True), ("mailer.example.org", False)):
        caplog.clear()
        async with running_worker(make_settings(**plain, smtp_helo_name=name)):
            pass
        warnings = [r.getMessage() for r in caplog.records if "EHLO name" in r.getMessage()]
        assert len(warnings) == warned, warnings
        if warned:
            assert f"EHLO name {name!r} has no dot" in warnings[0]
            assert "set SMTP_HELO_NAME" in warnings[0]
    # Unset, the name is the machine's fully qualified name.
    assert await SmtpPool(make_settings(**plain), 1).helo_name() == socket.getfqdn()


@dataclass
class RefusesDotlessNames(SmtpRecorder):
    """Refuses an EHLO (HELO) name without a dot, as Postfix's
    reject_non_fqdn_helo_hostname does when it does not delay the refusal."""

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        if "." not in hostname:
            return [f"504 5.5.2 <{hostname}>: Helo command rejected: need fully-qualified name"]
        session.host_name = hostname
        return responses

    async def handle_HELO(self, server: Any, session: Any, envelope: Any, hostname: str) -> Any:
        return f"504 5.5.2 <{hostname}>: Helo command rejected" if "." not in hostname else MISSING


async def test_a_refused_ehlo_name_names_smtp_helo_name() -> None:
    server = await start_smtp("none", None, auth=False, recorder=RefusesDotlessNames())
    try:
        plain = server.settings_overrides(None, login=False)
        error = await send_error(Settings(**plain, smtp_helo_name="mailhost"))
        assert isinstance(error, SmtpConfigError)
        assert (error.code, error.settings) == (504, ("SMTP_HELO_NAME",))
        assert "Helo command rejected" in error.reason
        pool = SmtpPool(Settings(**plain, smtp_helo_name="mailer.example.org"), 1)
        await pool.send(job())
        await pool.close()
    finally:
        server.server.close()
        await server.server.wait_closed()
    assert [m.helo for m in server.recorder.received] == ["mailer.example.org"]


@dataclass
class AnswersAuthWith250(SmtpRecorder):
    """Answers AUTH with "250 2.0.0 Ok": what a newcomer's sink did (issue 9)."""

    async def handle_AUTH(self, server: Any, session: Any, envelope: Any, args: list[str]) -> str:
        self.logins.append((args[0], False))
        return "250 2.0.0 Ok"


async def test_an_answer_to_auth_that_is_no_refusal_is_not_called_one(ca_file: str) -> None:
    server = await start_smtp("none", None, auth=True, recorder=AnswersAuthWith250())
    try:
        error = await send_error(settings_for(server, ca_file))
    finally:
        server.server.close()
        await server.server.wait_closed()
    assert type(error) is SmtpConfigError  # not SmtpAuthError: nothing was refused
    assert error.reason.startswith(
        "the SMTP server answered AUTH PLAIN with '250 2.0.0 Ok', which is neither a login "
        "nor a refusal"
    )
    assert error.code is None
    assert server.recorder.logins == [("PLAIN", False)]
    assert server.recorder.quits == 1


@dataclass
class EnvelopeRecorder(SmtpRecorder):
    """Refuses the sender ``refused@...`` and recipients ``nobody...``; records each
    accepted transaction's MAIL options beside what SmtpRecorder keeps."""

    mail_options: list[list[str]] = field(default_factory=list)

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if address.startswith("refused@"):
            return "553 5.7.1 sender refused"
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.mail_options.append(list(envelope.mail_options))
        return await super().handle_DATA(server, session, envelope)


async def test_the_transaction_is_what_aiosmtplibs_sendmail_sends(
    server_tls: ssl.SSLContext,
) -> None:
    """mailer.sendmail writes MAIL and RCPT itself for everyday addresses: the server sees
    the same envelope, SIZE and bytes as from aiosmtplib's sendmail, and refusals come
    back (or are raised) the same way; the connection stays usable after each."""
    recorder = EnvelopeRecorder(on_rcpt=refuse_nobody)
    server = await start_smtp("none", server_tls, auth=False, recorder=recorder)
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=server.port, timeout=5, start_tls=False)
    message = b"Subject: s\n\nline\n.leading dot\r\nend\n"
    try:
        await client.connect()
        ours = await mailer.sendmail(client, "a@example.org", ["b@example.com"], message)
        theirs, _ = await client.sendmail("a@example.org", ["b@example.com"], message)
        assert ours == theirs == {}
        first, second = recorder.received
        assert (first.mail_from, first.rcpt_tos, first.data) == (
            second.mail_from,
            second.rcpt_tos,
            second.data,
        )
        assert recorder.mail_options[0] == recorder.mail_options[1] == [f"SIZE={len(first.data)}"]

        both = ["b@example.com", "nobody@example.com"]
        ours = await mailer.sendmail(client, "a@example.org", both, message)
        theirs, _ = await client.sendmail("a@example.org", both, message)
        assert ours == theirs
        assert set(ours) == {"nobody@example.com"} and ours["nobody@example.com"].code == 550

        for sender, recipients, error in (
            ("a@example.org", ["nobody@example.com"], aiosmtplib.SMTPRecipientsRefused),
            ("refused@example.org", ["b@example.com"], aiosmtplib.SMTPSenderRefused),
        ):
            with pytest.raises(error) as mine:
                await mailer.sendmail(client, sender, recipients, message)
            with pytest.raises(error) as library:
                await client.sendmail(sender, recipients, message)
            assert str(mine.value) == str(library.value)
        assert len(recorder.received) == 4  # the refused ones never reached DATA
        await mailer.sendmail(client, "a@example.org", ["b@example.com"], message)
        assert len(recorder.received) == 5  # each refusal was followed by RSET
    finally:
        client.close()
        server.server.close()
        await server.server.wait_closed()


async def refuse_nobody(address: str) -> str | None:
    return "550 5.1.1 no such user" if address.startswith("nobody") else None


async def test_the_transaction_falls_back_to_helo_like_aiosmtplib() -> None:
    recorder = SmtpRecorder()
    server, port = await start_no_ehlo(recorder)
    message = b"Subject: s\n\nold server\n"
    try:
        for send in ("ours", "aiosmtplib"):
            client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=5, start_tls=False)
            await client.connect()
            try:
                if send == "ours":
                    assert await mailer.sendmail(client, "a@localhost", ["b@x.org"], message) == {}
                else:
                    assert (await client.sendmail("a@localhost", ["b@x.org"], message))[0] == {}
            finally:
                client.close()
        first, second = recorder.received
        assert (first.mail_from, first.rcpt_tos, first.data) == (
            second.mail_from,
            second.rcpt_tos,
            second.data,
        )
    finally:
        server.close()
        await server.wait_closed()


async def test_a_turn_waited_for_until_a_stop_is_never_lost(
    make_settings: Callable[..., Settings], smtp: SmtpServer
) -> None:
    """``Turn.acquire(unless=stop)``: the stop ends the wait with nothing held, also when
    the turn is granted at the same moment, and a waiter cancelled just after its grant
    gives it back; the pool's one turn is never lost."""
    pool = SmtpPool(make_settings(**smtp.settings_overrides(None, login=False)), 1)
    holder = pool.turn()
    assert await holder.acquire()

    async def free_turn_is_taken_at_once() -> None:
        turn = pool.turn()
        assert await asyncio.wait_for(turn.acquire(unless=asyncio.Event()), 1)
        turn.release()

    # A stop while waiting.
    stop = asyncio.Event()
    waiter = asyncio.create_task(pool.turn().acquire(unless=stop))
    await asyncio.sleep(0)
    stop.set()
    assert await asyncio.wait_for(waiter, 5) is False
    assert pool.turns_in_use == 1
    # Granted and stopped in the same moment: not taken.
    stop = asyncio.Event()
    waiter = asyncio.create_task(pool.turn().acquire(unless=stop))
    await asyncio.sleep(0)
    holder.release()
    stop.set()
    assert await asyncio.wait_for(waiter, 5) is False
    assert pool.turns_in_use == 0
    await free_turn_is_taken_at_once()
    # Cancelled after the grant, before it ran again: the grant goes back.
    assert await holder.acquire()
    waiter = asyncio.create_task(pool.turn().acquire(unless=asyncio.Event()))
    await asyncio.sleep(0)
    holder.release()
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert pool.turns_in_use == 0
    await free_turn_is_taken_at_once()
    # Already stopped: nothing is waited for.
    stop.set()
    assert await pool.turn().acquire(unless=stop) is False
    await pool.close()


async def test_turns_go_in_the_order_asked_and_a_stop_frees_every_waiter() -> None:
    """Turns: first come, first served; a cancelled waiter leaves the line; a stop ends
    every wait at once (one watcher for them all, gone with the stop), and the turns
    held stay counted."""
    turns = mailer.Turns(2)
    assert await turns.take() and await turns.take()
    stop = asyncio.Event()
    served: list[int] = []

    async def wait(n: int) -> bool:
        got = await turns.take(unless=stop)
        if got:
            served.append(n)
        return got

    waiters = [asyncio.create_task(wait(n)) for n in range(5)]
    other = asyncio.create_task(turns.take(unless=asyncio.Event()))  # another stop's
    await asyncio.sleep(0)
    waiters[1].cancel()
    turns.give()
    turns.give()
    assert await asyncio.wait_for(waiters[0], 5) and await asyncio.wait_for(waiters[2], 5)
    assert served == [0, 2]
    assert stop in turns._watchers and len(turns._watchers) == 2  # one task per stop event
    stop.set()
    assert [await asyncio.wait_for(w, 5) for w in waiters[3:]] == [False, False]
    assert stop not in turns._watchers and not other.done()  # still waits
    assert await turns.take(unless=stop) is False
    for _ in range(2):  # the two held by 0 and 2 come back: to the other waiter, then free
        turns.give()
    assert await asyncio.wait_for(other, 5)
    turns.give()
    assert not turns._waiting
    assert await turns.take() and await turns.take()
    late = asyncio.create_task(turns.take())
    await asyncio.sleep(0)
    assert not late.done()  # both taken: a third waits
    turns.give()
    assert await asyncio.wait_for(late, 5)
    await turns.close()


async def test_closing_the_turns_ends_the_waits_that_a_stop_would_have_ended() -> None:
    """After close() nothing watches the stop events any more: their waiters give up at
    once (also when close() comes before the watcher task first ran), those that named
    no event wait on, and no watcher is left behind."""
    turns = mailer.Turns(1)
    assert await turns.take()
    stop = asyncio.Event()
    stopped = asyncio.create_task(turns.take(unless=stop))
    patient = asyncio.create_task(turns.take())
    await asyncio.sleep(0)  # both wait; the watcher task is made but has not run yet
    await turns.close()
    assert await asyncio.wait_for(stopped, 5) is False
    assert not turns._watchers and not patient.done()
    turns.give()
    assert await asyncio.wait_for(patient, 5)
