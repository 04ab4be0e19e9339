"""The local outbox: the mails the capture SMTP server (devsmtp.py) wrote to OUTBOX_DIR.

Read for the web page through ``GET /api/outbox...`` (web.py). Every file operation runs
in a worker thread, never on the event loop, and the work per request is bounded: a
listing looks at the names in the directory, picks the newest ``limit`` of them and reads
only their headers (at most ``HEAD_BYTES`` each; parsed headers are cached by name, size
and modification time), and is not made again while the directory has not changed. A
mail is read whole only when one is opened, and only up to ``MAX_MAIL_BYTES``.

Only plain ``*.eml`` files directly in the directory with a safe name are shown (no
dot files, no paths, no symbolic links), so a request can never name another file.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import heapq
import os
import re
import stat
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage
from email.parser import BytesHeaderParser, BytesParser
from pathlib import Path
from typing import Any

# What devsmtp writes is <time>-<n>.eml; a mail copied in by hand with a plain name shows too.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}\.eml")
HEAD_BYTES = 64 * 1024  # headers beyond this are not read for a listing
MAX_MAIL_BYTES = 64 * 1024 * 1024  # a bigger file is not opened (download it instead)
MAX_LIST = 500  # most mails in one listing
SCAN_LIMIT = 500  # most mails looked at when searching for one message id
_CACHE_SIZE = 4096


class OutboxError(Exception):
    """A mail could not be read (too big, not a mail file); the message says why."""


@dataclass(frozen=True)
class Summary:
    """One captured mail, as the listing shows it."""

    name: str
    size: int
    captured_at: str  # the file's modification time, UTC ISO 8601
    subject: str
    sender: str
    to: str
    date: str | None
    message_id: str | None  # X-Mailroom-Id: the id the status API knows it by

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "size": self.size,
            "captured_at": self.captured_at,
            "subject": self.subject,
            "from": self.sender,
            "to": self.to,
            "date": self.date,
            "message_id": self.message_id,
        }


@dataclass(frozen=True)
class Mail:
    """One captured mail, opened: its headers in order, its text and HTML, attachments."""

    summary: Summary
    headers: list[tuple[str, str]]
    text: str | None
    html: str | None
    attachments: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            **self.summary.to_json(),
            "headers": [{"name": n, "value": v} for n, v in self.headers],
            "text": self.text,
            "html": self.html,
            "attachments": self.attachments,
        }


class Outbox:
    """The captured mails in ``directory`` (which need not exist yet)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._heads: OrderedDict[tuple[str, int, int], Summary] = OrderedDict()
        self._heads_lock = threading.Lock()  # listings run in several threads at once
        self._last: tuple[tuple[int, int, str | None], tuple[int, list[Summary]]] | None = None

    async def newest(self, limit: int, message_id: str | None = None) -> tuple[int, list[Summary]]:
        """(how many mails there are, the newest ``limit`` of them, newest first). With
        ``message_id``: only the mails carrying that X-Mailroom-Id, among the newest
        SCAN_LIMIT."""
        return await asyncio.to_thread(self._list, min(limit, MAX_LIST), message_id)

    async def read(self, name: str) -> Mail | None:
        """The mail called ``name``, or None when there is none."""
        return await asyncio.to_thread(self._read, name)

    async def raw(self, name: str) -> bytes | None:
        """The bytes of the mail called ``name`` (for a download), or None."""
        return await asyncio.to_thread(self._raw, name)

    # -- in a worker thread ------------------------------------------------------------

    def _names(self) -> list[tuple[str, os.stat_result]]:
        found: list[tuple[str, os.stat_result]] = []
        try:
            entries = os.scandir(self.directory)
        except FileNotFoundError:
            return found
        with entries:
            for entry in entries:
                if not NAME.fullmatch(entry.name):
                    continue
                with contextlib.suppress(OSError):  # removed meanwhile
                    info = entry.stat(follow_symlinks=False)
                    if stat.S_ISREG(info.st_mode):
                        found.append((entry.name, info))
        return found

    def _list(self, limit: int, message_id: str | None) -> tuple[int, list[Summary]]:
        # A directory whose modification time did not change holds the same files (devsmtp
        # renames each mail into it): the last answer to the same question still holds.
        try:
            changed = os.stat(self.directory).st_mtime_ns
        except FileNotFoundError:
            return 0, []
        question = (changed, limit, message_id)
        with self._heads_lock:
            if self._last is not None and self._last[0] == question:
                return self._last[1]
        answer = self._scan(limit, message_id)
        with self._heads_lock:
            self._last = (question, answer)
        return answer

    def _scan(self, limit: int, message_id: str | None) -> tuple[int, list[Summary]]:
        names = self._names()
        # Newest first: by modification time, then by name (devsmtp's names sort by time).
        newest: list[tuple[str, os.stat_result]] = heapq.nlargest(
            SCAN_LIMIT if message_id else limit, names, key=lambda n: (n[1].st_mtime_ns, n[0])
        )
        out: list[Summary] = []
        for name, info in newest:
            summary = self._summary(name, info)
            if summary is None or (message_id and summary.message_id != message_id):
                continue
            out.append(summary)
            if len(out) >= limit:
                break
        return len(names), out

    def _summary(self, name: str, info: os.stat_result) -> Summary | None:
        key = (name, info.st_size, info.st_mtime_ns)
        with self._heads_lock:
            cached = self._heads.get(key)
            if cached is not None:
                self._heads.move_to_end(key)
                return cached
        try:
            with self._open(name) as handle:
                head = handle.read(HEAD_BYTES)
        except (OSError, OutboxError):
            return None
        end = head.find(b"\r\n\r\n")
        if end < 0:
            end = head.find(b"\n\n")
        headers = BytesHeaderParser(policy=policy.default).parsebytes(
            head if end < 0 else head[: end + 2]
        )
        summary = _summarize(name, info, headers)
        with self._heads_lock:
            self._heads[key] = summary
            while len(self._heads) > _CACHE_SIZE:
                self._heads.popitem(last=False)
        return summary

    def _open(self, name: str) -> Any:
        """A regular file named ``name`` right in the directory, opened for reading."""
        if not NAME.fullmatch(name):
            raise OutboxError(f"not a mail file name: {name!r}")
        try:
            fd = os.open(self.directory / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise OutboxError(f"{name} is a symbolic link") from None
            raise
        handle = os.fdopen(fd, "rb")
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            handle.close()
            raise OutboxError(f"{name} is not a regular file")
        return handle

    def _raw(self, name: str) -> bytes | None:
        loaded = self._load(name)
        return None if loaded is None else loaded[0]

    def _load(self, name: str) -> tuple[bytes, os.stat_result] | None:
        try:
            with self._open(name) as handle:
                info = os.fstat(handle.fileno())
                if info.st_size > MAX_MAIL_BYTES:
                    raise OutboxError(f"{name} is larger than {MAX_MAIL_BYTES} bytes")
                data: bytes = handle.read(MAX_MAIL_BYTES + 1)
                return data, info
        except FileNotFoundError:
            return None

    def _read(self, name: str) -> Mail | None:
        loaded = self._load(name)
        if loaded is None:
            return None
        data, info = loaded
        message = BytesParser(policy=policy.default).parsebytes(data)
        assert isinstance(message, EmailMessage)
        headers = [(key, _header_text(value)) for key, value in message.items()]
        return Mail(
            summary=_summarize(name, info, message),
            headers=headers,
            text=_body(message, "plain"),
            html=_body(message, "html"),
            attachments=[
                {
                    "filename": part.get_filename(),
                    "content_type": part.get_content_type(),
                    "size": len(part.get_payload(decode=True) or b""),
                }
                for part in message.iter_attachments()
                if isinstance(part, EmailMessage)
            ],
        )


def _header_text(value: Any) -> str:
    try:
        return str(value)
    except (ValueError, LookupError):  # an undecodable encoded word: show it as it came
        return repr(value)


def _summarize(name: str, info: os.stat_result, headers: Any) -> Summary:
    def get(key: str) -> str | None:
        value = headers.get(key)
        return None if value is None else _header_text(value)

    captured = datetime.fromtimestamp(info.st_mtime, UTC).isoformat(timespec="milliseconds")
    return Summary(
        name=name,
        size=info.st_size,
        captured_at=captured,
        subject=get("Subject") or "",
        sender=get("From") or get("X-Envelope-From") or "",
        to=get("X-Envelope-To") or get("To") or "",
        date=get("Date"),
        message_id=get("X-Mailroom-Id"),
    )


def _body(message: EmailMessage, subtype: str) -> str | None:
    part = message.get_body(preferencelist=(subtype,))
    if part is None or part.get_content_type() != f"text/{subtype}":
        return None
    try:
        content = part.get_content()
    except (LookupError, ValueError):  # an unknown charset: decode what is there
        payload = part.get_payload(decode=True)
        return payload.decode("utf-8", "replace") if isinstance(payload, bytes) else None
    return content if isinstance(content, str) else None
