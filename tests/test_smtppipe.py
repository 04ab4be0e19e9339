"""SMTP PIPELINING (smtppipe.py, RFC 2920) through mailer.sendmail: against a hand-written
server that answers a transaction's commands only once all of them arrived (a client
that waits for each answer would stall there), in one write or a byte at a time; and
against aiosmtpd offering PIPELINING, plain and with STARTTLS, where the outcome must be
what aiosmtplib's own sendmail gives. Each case runs on asyncio's event loop and on
uvloop's (the worker's), whose transports swap protocols on their own code."""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import aiosmtplib
import pytest
import uvloop

import mailer
from config import Settings
from messages import new_job
from tests.support import SmtpRecorder, start_no_ehlo, start_smtp

LOOPS = ["asyncio", "uvloop"]
MESSAGE = b"Subject: s\r\n\r\nline\r\n.leading dot\r\nend\r\n"


async def on_loop(loop: str, scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run ``scenario()`` on this test's asyncio loop, or on a uvloop in a thread."""
    if loop == "asyncio":
        await scenario()
    else:
        await asyncio.to_thread(uvloop.run, scenario())


def default_answer(command: bytes) -> bytes:
    if command.startswith(b"DATA"):
        return b"354 go ahead"
    return b"250 2.0.0 ok"


@dataclass
class Pipelined:
    """An SMTP server offering PIPELINING that answers MAIL, the RCPTs and DATA only once
    DATA arrived: all answers in one write, or (``split``) a byte at a time."""

    answer: Callable[[bytes], bytes] = default_answer
    split: bool = False
    drip: float = 0.0  # with split: seconds between bytes
    end_answer: bytes = b"250 2.0.0 queued"
    silent: bool = False  # read the group, answer nothing
    hang_up: bool = False  # read the group, close the connection
    only_first: int = 0  # read the group, answer only the first this many commands, then:
    then_hang_up: bool = False  # close the connection (else wait for the client to close)
    tls: ssl.SSLContext | None = None  # implicit TLS
    groups: list[list[bytes]] = field(default_factory=list)  # commands of each group
    messages: list[bytes] = field(default_factory=list)  # data as it arrived, dots and all
    port: int = 0

    async def write(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        if not self.split:
            writer.write(data)
        for i in range(len(data) if self.split else 0):
            writer.write(data[i : i + 1])
            await writer.drain()
            await asyncio.sleep(self.drip)
        await writer.drain()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            writer.write(b"220 pipe.test ready\r\n")
            while line := await reader.readline():
                command = line.rstrip(b"\r\n")
                verb = command[:4].upper()
                if verb == b"EHLO":
                    writer.write(b"250-pipe.test\r\n250-SIZE 1000000\r\n250 PIPELINING\r\n")
                elif verb in (b"RSET", b"NOOP"):
                    writer.write(b"250 2.0.0 ok\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 2.0.0 bye\r\n")
                    break
                elif verb == b"MAIL":
                    await self.transaction(command, reader, writer)
                else:
                    writer.write(b"502 5.5.2 not here\r\n")
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()

    async def transaction(
        self, mail: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        group = [mail]
        while not group[-1].upper().startswith(b"DATA"):
            if not (line := await reader.readline()):
                return  # the client closed the connection
            group.append(line.rstrip(b"\r\n"))
        self.groups.append(group)
        if self.hang_up:
            writer.close()
            return
        if self.silent:
            await reader.read()  # until the client gives up and closes
            return
        answers = [self.answer(command) for command in group]
        if self.only_first:
            await self.write(writer, b"".join(a + b"\r\n" for a in answers[: self.only_first]))
            if self.then_hang_up:
                writer.close()
            else:
                await reader.read()
            return
        await self.write(writer, b"".join(a + b"\r\n" for a in answers))
        if answers[-1].startswith(b"354"):
            lines = [await reader.readline()]
            while lines[-1] != b".\r\n":
                if not lines[-1]:
                    return  # the client closed the connection
                lines.append(await reader.readline())
            self.messages.append(b"".join(lines))
            end = self.end_answer if len(self.messages[-1]) > 3 else b"554 5.5.1 no recipients"
            await self.write(writer, end + b"\r\n")

    async def __aenter__(self) -> Pipelined:
        self._writers: list[asyncio.StreamWriter] = []
        self._server = await asyncio.start_server(self.serve, "127.0.0.1", 0, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        for writer in self._writers:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        await self._server.wait_closed()


async def connected(port: int, ca_file: str | None = None) -> aiosmtplib.SMTP:
    """A client after EHLO (over implicit TLS with ``ca_file``)."""
    client = aiosmtplib.SMTP(
        hostname="127.0.0.1",
        port=port,
        timeout=5,
        use_tls=ca_file is not None,
        start_tls=False,
        tls_context=ssl.create_default_context(cafile=ca_file) if ca_file else None,
    )
    await client.connect()
    await client.ehlo()
    return client


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
@pytest.mark.parametrize("split", [False, True], ids=["answers-together", "byte-by-byte"])
@pytest.mark.parametrize("loop", LOOPS)
async def test_a_transaction_goes_out_pipelined(
    loop: str, split: bool, tls: bool, server_tls: ssl.SSLContext, ca_file: str
) -> None:
    """MAIL (with SIZE), two RCPTs and DATA in one go; the message dot-stuffed after 354;
    the connection then answers ordinary commands (aiosmtplib's protocol is back). In
    plain text and over implicit TLS (the protocol swapped on a TLS transport)."""

    async def scenario() -> None:
        async with Pipelined(split=split, tls=server_tls if tls else None) as server:
            client = await connected(server.port, ca_file if tls else None)
            try:
                recipients = ["b@example.com", "c@example.com"]
                refused = await mailer.sendmail(client, "a@example.org", recipients, MESSAGE)
                assert refused == {}
                assert server.groups == [
                    [
                        b"MAIL FROM:<a@example.org> size=%d" % len(MESSAGE),
                        b"RCPT TO:<b@example.com>",
                        b"RCPT TO:<c@example.com>",
                        b"DATA",
                    ]
                ]
                assert server.messages == [MESSAGE.replace(b"\n.lead", b"\n..lead") + b".\r\n"]
                assert (await client.noop()).code == 250
                assert await mailer.sendmail(client, "a@example.org", ["d@x.org"], b"x") == {}
                assert server.messages[-1] == b"x\r\n.\r\n"
            finally:
                client.close()

    await on_loop(loop, scenario)


def refusing(command: bytes) -> bytes:
    """Refuses the sender refused@..., recipients nobody...; DATA without a recipient."""
    if command.startswith(b"MAIL FROM:<refused@"):
        return b"553 5.7.1 sender refused"
    if command.startswith(b"RCPT TO:<nobody"):
        return b"550-5.1.1 no such user\r\n550 5.1.1 (really)"
    return default_answer(command)


@pytest.mark.parametrize("loop", LOOPS)
async def test_refusals_are_what_aiosmtplib_raises_and_the_connection_stays_usable(
    loop: str,
) -> None:
    async def scenario() -> None:
        async with Pipelined(answer=refusing) as server:
            client = await connected(server.port)
            try:
                both = ["b@example.com", "nobody@example.com"]
                refused = await mailer.sendmail(client, "a@example.org", both, MESSAGE)
                assert list(refused) == ["nobody@example.com"]
                assert refused["nobody@example.com"].code == 550
                assert refused["nobody@example.com"].message == "5.1.1 no such user\n5.1.1 (really)"
                delivered = len(server.messages)

                # Every recipient refused, DATA still answered 354 (RFC 2920 3.1): the data
                # is ended empty, nothing is delivered.
                with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as none:
                    await mailer.sendmail(client, "a@example.org", ["nobody@x.org"], MESSAGE)
                assert [r.recipient for r in none.value.recipients] == ["nobody@x.org"]
                assert server.messages[-1] == b".\r\n"

                with pytest.raises(aiosmtplib.SMTPSenderRefused) as sender:
                    await mailer.sendmail(client, "refused@x.org", ["b@example.com"], MESSAGE)
                assert (sender.value.code, sender.value.sender) == (553, "refused@x.org")

                server.end_answer = b"554 5.6.0 content refused"
                with pytest.raises(aiosmtplib.SMTPDataError) as data:
                    await mailer.sendmail(client, "a@example.org", ["b@example.com"], MESSAGE)
                assert data.value.code == 554
                # Two ended empty (no recipient, then no sender), and this one.
                assert len(server.messages) == delivered + 3

                server.end_answer = b"250 ok"
                assert client.is_connected
                assert await mailer.sendmail(client, "a@example.org", ["b@x.org"], b"y") == {}
            finally:
                client.close()

    await on_loop(loop, scenario)


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize(
    "fault",
    [
        "hang-up",
        "421-then-hang-up",
        "421-then-silence",
        "rcpt-421-then-hang-up",
        "silent",
        "drip",
        "malformed",
        "cancelled",
    ],
)
async def test_a_lost_silent_or_garbled_server_closes_the_client(loop: str, fault: str) -> None:
    """As aiosmtplib: a lost connection, a read timeout (SMTP_TIMEOUT for each whole
    answer, however it trickles in) or an answer that cannot be parsed is raised, and the
    client is closed (what still comes could not be paired with its commands); so is a
    transaction cancelled midway. A 421 (the server closes the connection) ends the
    transaction at once, with what aiosmtplib raises: to MAIL, the sender refused; to the
    only RCPT, the recipient refused."""
    errors: dict[str, type[BaseException]] = {
        "hang-up": aiosmtplib.SMTPServerDisconnected,
        "421-then-hang-up": aiosmtplib.SMTPSenderRefused,
        "421-then-silence": aiosmtplib.SMTPSenderRefused,
        "rcpt-421-then-hang-up": aiosmtplib.SMTPRecipientsRefused,
        "silent": aiosmtplib.SMTPReadTimeoutError,
        "drip": aiosmtplib.SMTPReadTimeoutError,
        "malformed": aiosmtplib.SMTPResponseException,
        "cancelled": asyncio.CancelledError,
    }

    def answer(command: bytes) -> bytes:
        if fault == "malformed":
            return b"this is no answer"
        if fault.startswith("421") and command.startswith(b"MAIL"):
            return b"421 4.3.2 shutting down"
        if fault.startswith("rcpt-421") and command.startswith(b"RCPT"):
            return b"421 4.3.2 shutting down"
        if fault == "drip":
            return b"250 " + b"slowly " * 20
        return default_answer(command)

    async def scenario() -> None:
        server = Pipelined(
            answer=answer,
            hang_up=fault == "hang-up",
            only_first={"421-then-hang-up": 1, "421-then-silence": 1}.get(
                fault, 2 if fault == "rcpt-421-then-hang-up" else 0
            ),
            then_hang_up=fault.endswith("then-hang-up"),
            silent=fault in ("silent", "cancelled"),
            split=fault == "drip",
            drip=0.1,  # 0.1 s a byte: an answer takes 14 s
        )
        async with server:
            client = await connected(server.port)
            client.timeout = 0.5
            try:
                send = asyncio.ensure_future(
                    mailer.sendmail(client, "a@example.org", ["b@x.org"], MESSAGE)
                )
                if fault == "cancelled":
                    while not server.groups:  # the commands arrived: it waits for answers
                        await asyncio.sleep(0.01)
                    send.cancel()
                async with asyncio.timeout(10):
                    with pytest.raises(errors[fault]) as raised:
                        await send
                if fault.startswith("421"):
                    assert isinstance(raised.value, aiosmtplib.SMTPSenderRefused)
                    assert (raised.value.code, raised.value.sender) == (421, "a@example.org")
                if fault.startswith("rcpt-421"):
                    assert isinstance(raised.value, aiosmtplib.SMTPRecipientsRefused)
                    assert [(r.code, r.recipient) for r in raised.value.recipients] == [
                        (421, "b@x.org")
                    ]
                assert not client.is_connected
                assert server.messages == []
            finally:
                client.close()

    await on_loop(loop, scenario)


@dataclass
class PipeliningRecorder(SmtpRecorder):
    """aiosmtpd's handler that also offers PIPELINING (aiosmtpd reads commands one line
    at a time, so commands written ahead simply wait their turn) and records each MAIL's
    options."""

    mail_options: list[list[str]] = field(default_factory=list)

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        return [*responses[:-1], "250-PIPELINING", responses[-1]]  # before "250 HELP"

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        self.mail_options.append(list(options))
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"


async def refuse_nobody(address: str) -> str | None:
    return "550 5.1.1 no such user" if address.startswith("nobody") else None


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("security", ["none", "starttls"])
async def test_aiosmtpd_gets_what_aiosmtplibs_sendmail_sends(
    loop: str, security: str, server_tls: ssl.SSLContext, ca_file: str
) -> None:
    """Against aiosmtpd offering PIPELINING, in plain text and after STARTTLS (where the
    protocol is swapped on a TLS transport): the same envelope, SIZE, bytes and refusals
    as aiosmtplib's own sendmail."""

    async def scenario() -> None:
        recorder = PipeliningRecorder(on_rcpt=refuse_nobody)
        server = await start_smtp(security, server_tls, auth=False, recorder=recorder)  # type: ignore[arg-type]
        client = aiosmtplib.SMTP(
            hostname="127.0.0.1",
            port=server.port,
            timeout=5,
            start_tls=security == "starttls",
            tls_context=ssl.create_default_context(cafile=ca_file),
        )
        send: dict[str, Callable[[list[str]], Awaitable[Any]]] = {
            "ours": lambda to: mailer.sendmail(client, "a@example.org", to, MESSAGE),
            "theirs": lambda to: client.sendmail("a@example.org", to, MESSAGE),
        }
        try:
            await client.connect()
            await client.ehlo()
            assert client.supports_extension("pipelining")
            answers = {}
            for name, sending in send.items():
                result = await sending(["b@example.com", "nobody@example.com"])
                answers[name] = result if name == "ours" else result[0]
            assert answers["ours"] == answers["theirs"]
            assert set(answers["ours"]) == {"nobody@example.com"}
            first, second = recorder.received
            assert (first.mail_from, first.rcpt_tos, first.data) == (
                second.mail_from,
                second.rcpt_tos,
                second.data,
            )
            for sending in send.values():
                with pytest.raises(aiosmtplib.SMTPRecipientsRefused):
                    await sending(["nobody@example.com"])
            assert len(recorder.received) == 2
            assert await mailer.sendmail(client, "a@example.org", ["c@x.org"], b"z") == {}
            assert len(recorder.received) == 3
        finally:
            client.close()
            server.server.close()
            await server.server.wait_closed()

    await on_loop(loop, scenario)


@pytest.mark.parametrize("loop", LOOPS)
async def test_the_worker_pool_sends_pipelined(loop: str) -> None:
    """The worker's SmtpPool (built mail, envelope, pooled connection) goes through the
    pipelined transaction: the hand-written server stalls any other client. Two mails on
    one connection; a refused recipient comes back in the result."""

    async def scenario() -> None:
        async with Pipelined(answer=refusing) as server:
            settings = Settings(
                smtp_host="127.0.0.1", smtp_port=server.port, smtp_security="none", smtp_timeout=5
            )
            pool = mailer.SmtpPool(settings, 1)
            try:
                first = await pool.send(new_job(to="b@example.com", subject="s", text="one"))
                job = new_job(to=["c@example.com", "nobody@example.com"], subject="s", text="two")
                second = await pool.send(job)
            finally:
                await pool.close()
        assert first.accepted == ("b@example.com",) and first.refused == {}
        assert second.accepted == ("c@example.com",)
        assert set(second.refused) == {"nobody@example.com"}
        assert second.refused["nobody@example.com"][0] == 550
        assert [group[1:] for group in server.groups] == [
            [b"RCPT TO:<b@example.com>", b"DATA"],
            [b"RCPT TO:<c@example.com>", b"RCPT TO:<nobody@example.com>", b"DATA"],
        ]
        assert len(server.messages) == 2 and b"\r\n\r\none\r\n" in server.messages[0]

    await on_loop(loop, scenario)


BUILT: dict[str, Any] = {  # a mail built with the email package (build_mime)
    "to": "b@example.com",
    "subject": "built",
    "text": "text ü",
    "headers": {"X-Campaign": "c"},
    "attachments": [{"filename": "a.txt", "content": "eA=="}],
}


@pytest.mark.parametrize("loop", LOOPS)
async def test_a_built_mail_goes_pipelined_too(loop: str) -> None:
    """A mail with attachments or its own headers (a MIME message, flattened as
    aiosmtplib's send_message would) goes through the same pipelined transaction."""

    async def scenario() -> None:
        async with Pipelined() as server:
            settings = Settings(
                smtp_host="127.0.0.1", smtp_port=server.port, smtp_security="none", smtp_timeout=5
            )
            pool = mailer.SmtpPool(settings, 1)
            try:
                result = await pool.send(new_job(**BUILT))
            finally:
                await pool.close()
        assert result.accepted == ("b@example.com",)
        ((mail, *rest),) = server.groups
        assert mail.startswith(b"MAIL FROM:<") and b" size=" in mail  # no 8BITMIME offered
        assert rest == [b"RCPT TO:<b@example.com>", b"DATA"]
        (message,) = server.messages
        assert b"X-Campaign: c" in message and b'filename="a.txt"' in message

    await on_loop(loop, scenario)


@pytest.mark.parametrize("to", ["b@example.com", "jürgen@example.com"])
async def test_a_built_mail_is_what_aiosmtplibs_send_message_sends(
    make_settings: Callable[..., Settings], to: str
) -> None:
    """Against aiosmtpd offering PIPELINING and 8BITMIME: the pool's flattening and
    transaction give the server the same envelope, MAIL options (SIZE, BODY=8BITMIME; and
    SMTPUTF8 for an address that needs it, which goes through aiosmtplib's sendmail) and
    bytes as aiosmtplib's send_message of the same MIME message."""
    recorder = PipeliningRecorder()
    server = await start_smtp("none", None, auth=False, recorder=recorder)
    settings = make_settings(smtp_host="127.0.0.1", smtp_port=server.port, smtp_security="none")
    job = new_job(**{**BUILT, "to": to})
    built = mailer.build_mime(job, settings.mail_from)
    pool = mailer.SmtpPool(settings, 1)
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=server.port, timeout=5, start_tls=False)
    try:
        assert (await pool.send(job)).accepted == (to,)
        await client.connect()
        await client.send_message(built, sender=settings.mail_from, recipients=[to])
    finally:
        await pool.close()
        client.close()
        server.server.close()
        await server.server.wait_closed()
    ours, theirs = recorder.received

    def same_boundary(data: bytes) -> bytes:  # the email package draws one for each build
        return re.sub(rb"={15}\d+==", b"=BOUNDARY=", data)

    assert (ours.mail_from, ours.rcpt_tos, same_boundary(ours.data)) == (
        theirs.mail_from,
        theirs.rcpt_tos,
        same_boundary(theirs.data),
    )
    assert recorder.mail_options[0] == recorder.mail_options[1]
    assert "BODY=8BITMIME" in recorder.mail_options[0]
    assert ("SMTPUTF8" in recorder.mail_options[0]) == (not to.isascii())


async def test_a_built_mail_falls_back_to_helo_like_aiosmtplib() -> None:
    recorder = SmtpRecorder()
    server, port = await start_no_ehlo(recorder)
    settings = Settings(smtp_host="127.0.0.1", smtp_port=port, smtp_security="none", smtp_timeout=5)
    pool = mailer.SmtpPool(settings, 1)
    try:
        assert (await pool.send(new_job(**BUILT))).accepted == ("b@example.com",)
    finally:
        await pool.close()
        server.close()
        await server.wait_closed()
    (received,) = recorder.received
    assert b"X-Campaign: c" in received.data


@pytest.mark.parametrize("loop", LOOPS)
async def test_a_421_to_a_recipient_before_the_last_is_a_lost_connection(loop: str) -> None:
    """As aiosmtplib, which closes at the 421 and finds no connection for the next RCPT."""

    def answer(command: bytes) -> bytes:
        if command == b"RCPT TO:<b@x.org>":
            return b"421 4.3.2 shutting down"
        return default_answer(command)

    async def scenario() -> None:
        async with Pipelined(answer=answer, only_first=2, then_hang_up=True) as server:
            client = await connected(server.port)
            try:
                with pytest.raises(aiosmtplib.SMTPServerDisconnected):
                    await mailer.sendmail(client, "a@x.org", ["b@x.org", "c@x.org"], MESSAGE)
                assert not client.is_connected
            finally:
                client.close()

    await on_loop(loop, scenario)
