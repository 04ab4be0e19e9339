"""The HTTP API's request and response shapes, from which the OpenAPI description is made.

quart-schema validates requests against these models (types, required and unknown
fields); :func:`messages.new_job` then checks what a type cannot say (addresses, CR/LF,
size limits), so both the description and the checks come from one place each.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class MessageRequest(_Strict):
    to: str | list[str] = Field(
        description="One address or a list; 'Name <user@example.com>' is accepted.",
        examples=["user@example.com"],
    )
    subject: str = Field(description="No CR, LF or NUL.")
    text: str = Field(description="The plain-text body.")
    html: str | None = Field(default=None, description="An optional HTML alternative.")
    reply_to: str | None = Field(default=None, description="An optional Reply-To address.")


class Queued(BaseModel):
    id: str = Field(pattern="^[0-9a-f]{32}$")
    status: Literal["queued"]


class Error(BaseModel):
    error: str
    field: str | None = None


class RecipientView(BaseModel):
    address: str
    status: Literal["pending", "sent", "refused"]
    code: int | None
    message: str | None


class LastError(BaseModel):
    code: int | None
    message: str


class HistoryEntry(BaseModel):
    model_config = ConfigDict(extra="allow")
    status: str
    at: str


class MessageView(BaseModel):
    id: str
    status: Literal["queued", "sending", "retrying", "sent", "failed"]
    recipients: list[RecipientView]
    subject: str
    attempts: int
    next_attempt_at: str | None
    last_error: LastError | None
    history: list[HistoryEntry]
    created_at: str
    updated_at: str


class MessageList(BaseModel):
    messages: list[MessageView]


class ListQuery(BaseModel):
    status: Literal["queued", "sending", "retrying", "sent", "failed"] | None = None
    limit: int = Field(default=50, ge=1, le=500)


class LegacyQuery(BaseModel):
    """The query of ``GET /`` (documented; the legacy parsing is done by hand)."""

    sendmail: str | None = Field(
        default=None, description="Queue the test mail to this address (mailto: accepted)."
    )
    talktome: str | None = Field(default=None, description="Present (any value): log the time.")
    token: str | None = Field(default=None, description="An API token, if not in the header.")


class LogsQuery(BaseModel):
    lines: int = Field(default=100, ge=1, le=10_000)


class LogLines(BaseModel):
    lines: list[str]


class DeadLetterView(BaseModel):
    id: str
    error: str
    failed_at: str
    smtp_code: int | None
    requeued: bool


class DeadLetterList(BaseModel):
    dead_letters: list[DeadLetterView] = Field(
        description="Every letter in the dead-letter queue, in queue order."
    )


class IdempotencyHeaders(BaseModel):
    idempotency_key: str | None = Field(
        default=None,
        min_length=1,
        max_length=255,
        description="Same key and body within 24 hours: the first answer, no second message.",
    )
