"""One SMTP transaction with PIPELINING (RFC 2920) on an aiosmtplib connection.

aiosmtplib writes a command and waits for its answer before the next: MAIL, each RCPT,
DATA and the message are four round trips and four writes for a mail to one recipient.
When the server offers PIPELINING, :func:`transaction` writes MAIL, the RCPTs and DATA
at once, reads their answers, then writes the message: two writes and two round trips.

aiosmtplib's protocol keeps one answer at a time (answers that arrive together for
commands written ahead are dropped or held), so for the transaction the transport's
protocol is a :class:`_Answers` that keeps them all in order; aiosmtplib's is put back
afterwards, and is told meanwhile if the connection ends, so the client knows it is
closed. Outcomes and errors are those of aiosmtplib's ``sendmail``: the refused
recipients, or ``SMTPSenderRefused``, ``SMTPRecipientsRefused``, ``SMTPDataError``, a
read timeout or a lost connection (the last two close the client, as aiosmtplib does;
so does a garbled answer or a cancelled transaction). A 421 (the server is closing the
connection) ends the transaction at once, with what aiosmtplib raises at that command.
"""

from __future__ import annotations

import asyncio
import re
from collections import deque
from typing import cast

import aiosmtplib
from aiosmtplib import SMTPResponse, SMTPStatus
from aiosmtplib.protocol import SMTPProtocol

# The longest answer kept (aiosmtplib allows 32 KiB; a real one is a line or a few).
MAX_ANSWER_BYTES = 32 * 1024
_LEADING_DOT = re.compile(rb"(?m)^\.")  # RFC 5321 4.5.2: a line's leading dot is doubled
ACCEPTED = (SMTPStatus.completed, SMTPStatus.will_forward)  # what RCPT answers when it takes one


def recipients_refused(refused: dict[str, SMTPResponse]) -> aiosmtplib.SMTPRecipientsRefused:
    """The error aiosmtplib's sendmail raises when every recipient was ``refused``."""
    return aiosmtplib.SMTPRecipientsRefused(
        [aiosmtplib.SMTPRecipientRefused(a.code, a.message, r) for r, a in refused.items()]
    )


def offered(client: aiosmtplib.SMTP) -> bool:
    """Whether the server offered PIPELINING in its EHLO answer."""
    return client.supports_extension("pipelining")


class _Answers(asyncio.Protocol):
    """Stands in for aiosmtplib's protocol on the transport during one transaction."""

    def __init__(self, inner: SMTPProtocol, timeout: float | None) -> None:
        self._inner = inner
        self._timeout = timeout  # seconds for each whole answer
        self._buffer = bytearray()
        self._answers: deque[SMTPResponse] = deque()
        self._error: aiosmtplib.SMTPException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.lost = False  # the connection ended and ``inner`` was told

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        try:
            while (answer := self._parse()) is not None:
                self._answers.append(answer)
        except aiosmtplib.SMTPResponseException as exc:
            self._fail(exc)
        if self._answers:
            self._wake()  # not for a part of an answer: the timeout is for a whole one

    def _parse(self) -> SMTPResponse | None:
        """The first whole answer in the buffer (taken out of it), or None."""
        lines: list[bytes] = []
        offset = 0
        while (end := self._buffer.find(b"\n", offset)) != -1:
            line = bytes(self._buffer[offset : end + 1])
            offset = end + 1
            code = line[:3]
            if not code.isdigit():
                raise aiosmtplib.SMTPResponseException(
                    SMTPStatus.invalid_response,
                    "Malformed SMTP response line: " + line.decode("utf-8", "ignore"),
                )
            lines.append(line[4:].strip(b" \t\r\n"))
            if line[3:4] != b"-":
                del self._buffer[:offset]
                text = b"\n".join(lines).decode("utf-8", "surrogateescape")
                return SMTPResponse(int(code), text)
        if len(self._buffer) > MAX_ANSWER_BYTES:
            raise aiosmtplib.SMTPResponseException(SMTPStatus.invalid_response, "Response too long")
        return None

    def eof_received(self) -> bool:
        self._fail(aiosmtplib.SMTPServerDisconnected("Unexpected EOF received"))
        return False  # close the transport (connection_lost follows), as aiosmtplib does

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(aiosmtplib.SMTPServerDisconnected("Connection lost"))
        self.lost = True
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def _fail(self, exc: aiosmtplib.SMTPException) -> None:
        if self._error is None:
            self._error = exc
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def next(self) -> SMTPResponse:
        """The next answer, in the order the commands were written."""
        if self._answers:  # it came with an earlier one
            return self._answers.popleft()
        try:
            async with asyncio.timeout(self._timeout):
                while not self._answers:
                    if self._error is not None:
                        raise self._error
                    self._waiter = asyncio.get_running_loop().create_future()
                    try:
                        await self._waiter
                    finally:
                        self._waiter = None
        except TimeoutError:
            raise aiosmtplib.SMTPReadTimeoutError("Timed out waiting for server response") from None
        return self._answers.popleft()


async def transaction(
    client: aiosmtplib.SMTP,
    sender: str,
    options: list[bytes],
    recipients: list[str],
    message: bytes,
) -> dict[str, SMTPResponse]:
    """Send ``message`` from ``sender`` with MAIL's ``options`` to ``recipients``
    (addresses that need no quoting); return the refused recipients with their answers.
    ``message`` has CRLF line endings (as ``normalize_message_line_endings`` gives it);
    its leading dots are doubled here. The caller has the connection to itself (the
    pool's turn): aiosmtplib's command lock is not taken."""
    protocol = client.protocol
    if protocol is None or protocol.transport is None or protocol.transport.is_closing():
        raise aiosmtplib.SMTPServerDisconnected("Server not connected")
    transport = cast(asyncio.Transport, protocol.transport)  # uvloop's is no subclass
    answers = _Answers(protocol, client.timeout)
    end: SMTPResponse | None = None
    transport.set_protocol(answers)
    try:
        mail = b" ".join([b"MAIL FROM:<%s>" % sender.encode(), *options])
        commands = [mail, *(b"RCPT TO:<%s>" % r.encode() for r in recipients), b"DATA"]
        transport.write(b"\r\n".join(commands) + b"\r\n")
        begun = await answers.next()
        if begun.code == SMTPStatus.domain_unavailable:
            raise aiosmtplib.SMTPSenderRefused(begun.code, begun.message, sender)
        replies: list[SMTPResponse] = []
        for _ in recipients:
            replies.append(reply := await answers.next())
            if reply.code == SMTPStatus.domain_unavailable:
                _closing_after(recipients, replies)
        data = await answers.next()
        accepted = sum(a.code in ACCEPTED for a in replies)
        if data.code == SMTPStatus.start_input:
            if begun.code != SMTPStatus.completed or not accepted:
                # RFC 2920 3.1: the server takes data although no transaction was begun;
                # end it empty (its answer says it failed).
                transport.write(b".\r\n")
                await answers.next()
            else:
                transport.write(_LEADING_DOT.sub(b"..", message) + b".\r\n")
                end = await answers.next()
    except BaseException:
        # Lost, timed out, a malformed answer, a 421 (the server is closing the
        # connection), cancelled: what still comes could not be paired with its command.
        _restore(transport, answers, protocol)
        client.close()
        raise
    _restore(transport, answers, protocol)
    if data.code == SMTPStatus.domain_unavailable:
        client.close()
    if begun.code != SMTPStatus.completed:
        raise aiosmtplib.SMTPSenderRefused(begun.code, begun.message, sender)
    refused = {r: a for r, a in zip(recipients, replies, strict=True) if a.code not in ACCEPTED}
    if not accepted:
        raise recipients_refused(refused)
    if data.code != SMTPStatus.start_input:
        raise aiosmtplib.SMTPDataError(data.code, data.message)
    assert end is not None
    if end.code != SMTPStatus.completed:
        raise aiosmtplib.SMTPDataError(end.code, end.message)
    return refused


def _closing_after(recipients: list[str], replies: list[SMTPResponse]) -> None:
    """A 421 to the last RCPT answered: raise what aiosmtplib's sendmail raises then (it
    closes the client at a 421, so its next command finds no connection)."""
    if len(replies) < len(recipients) or any(a.code in ACCEPTED for a in replies):
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    raise recipients_refused(dict(zip(recipients, replies, strict=True)))


def _restore(transport: asyncio.BaseTransport, answers: _Answers, inner: SMTPProtocol) -> None:
    """aiosmtplib's protocol back on the transport, unless it was told the connection
    ended (then nothing more comes)."""
    if not answers.lost:
        transport.set_protocol(inner)
