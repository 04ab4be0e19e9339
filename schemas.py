"""The HTTP API's request and response shapes, from which the OpenAPI description is made.

quart-schema validates requests against these models (types, required and unknown
fields); :func:`messages.new_job` then checks what a type cannot say (addresses, CR/LF,
size limits), so both the description and the checks come from one place each.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel

MAX_BATCH = 500  # messages in one POST /api/messages/batch


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


TEMPLATE_NAME = "^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class AttachmentRequest(_Strict):
    filename: str = Field(
        description="A plain file name (no path, no control characters); UTF-8 is fine."
    )
    content_type: str | None = Field(
        default=None, description="type/subtype; application/octet-stream when left out."
    )
    content: str = Field(description="The file's bytes, base64-encoded.")
    content_id: str | None = Field(
        default=None,
        description="For an inline image: the HTML refers to it as cid:<content_id>.",
    )


class MessageRequest(_Strict):
    to: str | list[str] = Field(
        description="One address or a list; 'Name <user@example.com>' is accepted.",
        examples=["user@example.com"],
    )
    subject: str | None = Field(
        default=None, description="No CR, LF or NUL. Required unless a template gives it."
    )
    text: str | None = Field(
        default=None,
        description="The plain-text body. Without it, one is made from html (or the template).",
    )
    html: str | None = Field(default=None, description="An optional HTML alternative.")
    reply_to: str | None = Field(default=None, description="An optional Reply-To address.")
    cc: str | list[str] | None = Field(
        default=None, description="Copies: shown in the Cc header. Counted in MAX_RECIPIENTS."
    )
    bcc: str | list[str] | None = Field(
        default=None,
        description="Blind copies: in the SMTP envelope only, never in a header. Counted in "
        "MAX_RECIPIENTS.",
    )
    from_: str | None = Field(
        default=None,
        alias="from",
        description="The sender (From), if not MAIL_FROM: an address ALLOWED_SENDERS names.",
    )
    headers: dict[str, str] | None = Field(
        default=None,
        max_length=50,
        description="Custom headers (X-Campaign, List-Unsubscribe ...): field names, no CR/LF; "
        "not From, To, Cc, Bcc, Subject, Date, Message-ID, MIME-Version, Reply-To, "
        "Content-*, DKIM-Signature or X-Mailroom-*.",
    )
    attachments: list[AttachmentRequest] | None = Field(
        default=None,
        max_length=100,
        description="Files: at most MAX_ATTACHMENT_BYTES in all (decoded).",
    )
    template: str | None = Field(
        default=None,
        pattern=TEMPLATE_NAME,
        description="A stored template (PUT /api/templates/<name>) giving subject, text and "
        "html; not with subject, text or html.",
    )
    variables: dict[str, Any] | None = Field(
        default=None, description="The template's variables; a missing one is a 400."
    )
    tags: list[str] | None = Field(
        default=None,
        max_length=10,
        description="Up to 10 tags (letters, digits, _ . : @ / + = -; 1 to 64), stored on the "
        "record: GET /api/messages?tag= finds them.",
    )
    metadata: dict[str, str] | None = Field(
        default=None,
        max_length=20,
        description="Up to 20 keys (as tags) with string values (up to 500 characters), "
        "stored on the record: GET /api/messages?metadata=key:value finds them.",
    )
    send_at: str | None = Field(
        default=None,
        description="Send it then, not before (RFC 3339 with an offset, e.g. "
        "2030-01-02T03:04:05+02:00): status 'scheduled' until then. A time in the past "
        "means now; more than MAX_SCHEDULE_DAYS (30) ahead is a 400.",
        examples=["2030-01-02T03:04:05Z"],
    )


class Queued(BaseModel):
    id: str = Field(pattern="^[0-9a-f]{32}$")
    status: Literal["queued", "scheduled"]


class Error(BaseModel):
    error: str
    field: str | None = None


class BatchRequest(RootModel[list[MessageRequest]]):
    """The body of ``POST /api/messages/batch`` (documented; each item is validated on its
    own, so one bad item does not refuse the others)."""

    root: list[MessageRequest] = Field(
        min_length=1,
        max_length=MAX_BATCH,
        description=f"1 to {MAX_BATCH} messages, each what POST /api/messages takes.",
    )


class BatchResult(BaseModel):
    code: int = Field(
        description="What POST /api/messages would have answered for this item: 202 (queued), "
        "400 (invalid), 413 (attachments over MAX_ATTACHMENT_BYTES), 429 (a rate limit, named "
        "in error) or 503 (not queued)."
    )
    id: str | None = Field(default=None, pattern="^[0-9a-f]{32}$", description="When queued.")
    status: Literal["queued", "scheduled"] | None = Field(
        default=None, description="When queued: scheduled with a future send_at."
    )
    error: str | None = Field(default=None, description="When not queued: why.")
    field: str | None = Field(default=None, description="The offending field, if one.")


class BatchAnswer(BaseModel):
    queued: int = Field(description="How many items were queued.")
    results: list[BatchResult] = Field(description="One per item, in request order.")


class RecipientView(BaseModel):
    address: str
    status: Literal["pending", "sent", "refused", "suppressed"]
    code: int | None
    message: str | None


class LastError(BaseModel):
    code: int | None
    message: str


class HistoryEntry(BaseModel):
    model_config = ConfigDict(extra="allow")
    status: str
    at: str


MessageStatus = Literal[
    "queued", "scheduled", "sending", "retrying", "sent", "partial", "failed", "cancelled"
]


class MessageView(BaseModel):
    id: str
    status: MessageStatus = Field(
        description="sent: every recipient accepted it; partial: some did, the others "
        "refused it (5xx) or kept deferring it (4xx) until the retries ran out; failed: "
        "none did. All three are final, and so is cancelled (DELETE /api/messages/<id>); "
        "scheduled: waiting for its send_at."
    )
    recipients: list[RecipientView]
    subject: str
    attempts: int
    next_attempt_at: str | None
    last_error: LastError | None
    history: list[HistoryEntry]
    created_at: str
    updated_at: str
    tags: list[str] = Field(default_factory=list, description="The message's tags.")
    metadata: dict[str, str] = Field(default_factory=dict, description="Its metadata.")


class MessageList(BaseModel):
    messages: list[MessageView]
    next_cursor: str | None = Field(
        default=None,
        description="Pass as ?cursor= for the next page (older messages); null on the last.",
    )


class Stats(BaseModel):
    queues: dict[str, int] = Field(
        description="Messages ready in each queue (work, retry tiers, dead letters), read "
        "from RabbitMQ at most every 5 s; empty while RabbitMQ cannot be asked."
    )
    messages: dict[MessageStatus, int] = Field(
        description="Message records by status (a status no record has is 0)."
    )


class ListQuery(BaseModel):
    status: MessageStatus | None = None
    limit: int = Field(default=50, ge=1, le=500)
    tag: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_.:@/+=-]{1,64}$",
        description="Only messages with this tag.",
    )
    metadata: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_.:@/+=-]{1,64}:",
        max_length=600,
        description="key:value: only messages whose metadata has this value for key.",
    )
    cursor: str | None = Field(
        default=None, max_length=200, description="next_cursor of the page before."
    )
    recipient: str | None = Field(
        default=None, max_length=400, description="Only messages to this address."
    )
    since: str | None = Field(
        default=None, description="Only messages accepted at or after this RFC 3339 time."
    )
    until: str | None = Field(
        default=None, description="Only messages accepted before this RFC 3339 time."
    )


class Cancelled(BaseModel):
    id: str = Field(pattern="^[0-9a-f]{32}$")
    status: Literal["cancelled"]


class Suppression(BaseModel):
    address: str = Field(description="The address in normalised form (domain in ASCII).")
    reason: str
    source: Literal["bounce", "operator"] = Field(
        description="bounce: an SMTP server refused it as unknown (5.1.x); operator: added."
    )
    created_at: str


class SuppressionList(BaseModel):
    suppressions: list[Suppression] = Field(description="In address order.")
    next_cursor: str | None = Field(description="Pass as ?cursor= for the next page.")


class SuppressionQuery(BaseModel):
    limit: int = Field(default=500, ge=1, le=5000)
    cursor: str | None = Field(default=None, max_length=400)


class SuppressionRequest(_Strict):
    reason: str | None = Field(default=None, max_length=1000, description="Why (optional).")


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
    id: str = Field(description="The message id.")
    error: str = Field(description="Why it could not be sent.")
    failed_at: str = Field(description="When, in local time with its UTC offset.")
    smtp_code: int | None = Field(description="The SMTP reply code, if the server gave one.")
    requeued: bool = Field(
        description="Whether this look sent it again: always false here (python admin.py "
        "dead requeue sends dead letters again)."
    )


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


# -- the web page's extra endpoints (web.py) ----------------------------------------------


class RequeueRequest(_Strict):
    ids: list[str] | None = Field(
        default=None,
        min_length=1,
        max_length=1000,
        description="The message ids of the dead letters to send again.",
    )
    all: bool = Field(default=False, description="Send every dead letter again.")


class RequeueAnswer(BaseModel):
    requeued: list[str] = Field(description="Sent again: back to queued.")
    kept: list[str] = Field(
        description="Kept in the dead-letter queue: their records could not be updated."
    )
    missing: list[str] = Field(description="Asked for, but not in the dead-letter queue.")
    dead_letters: list[DeadLetterView] = Field(description="What was in the queue, in order.")


class OutboxQuery(BaseModel):
    limit: int = Field(default=50, ge=1, le=500)
    message_id: str | None = Field(
        default=None, pattern="^[0-9a-f]{32}$", description="Only the mails of this message."
    )


class OutboxSummary(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    name: str = Field(description="The file name in the outbox directory.")
    size: int
    captured_at: str = Field(description="When the mail was captured (UTC).")
    subject: str
    from_: str = Field(alias="from")
    to: str = Field(description="The envelope recipients.")
    date: str | None
    message_id: str | None = Field(description="X-Mailroom-Id: the id in the status API.")


class OutboxList(BaseModel):
    enabled: bool = Field(description="False unless the server is in local capture mode.")
    reason: str | None = Field(description="Why the outbox is off.")
    directory: str | None
    total: int = Field(description="Mails in the outbox directory.")
    mails: list[OutboxSummary] = Field(description="The newest ones, newest first.")


class OutboxHeader(BaseModel):
    name: str
    value: str


class OutboxAttachment(BaseModel):
    filename: str | None
    content_type: str
    size: int


class OutboxMail(OutboxSummary):
    headers: list[OutboxHeader]
    text: str | None
    html: str | None = Field(description="Show it only in a sandboxed frame.")
    attachments: list[OutboxAttachment]


# -- templates (issue 12) -------------------------------------------------------------


class TemplateRequest(_Strict):
    subject: str = Field(description="Jinja2 (sandboxed): 'Hello {{ name }}'.")
    text: str | None = Field(default=None, description="The plain-text part (not escaped).")
    html: str | None = Field(default=None, description="The HTML part: variables are HTML-escaped.")


class TemplateView(BaseModel):
    name: str
    subject: str
    text: str | None
    html: str | None
    updated_at: str | None
