"""The message as it is sent: a task's RFC 5322 bytes, for ``GET /api/v1/task/{id}/raw``.

Rebuilt on request by the sender's own builder (shared.delivery.message.compose) from the same stored
fields, so the bytes are the ones an SMTP server receives (tests/test_raw.py compares them with what a
real aiosmtpd server got): the same Message-ID, kept for the task's life, and the same ``Date``: when
the mail became due, its ``created_at`` or its later ``scheduled_at`` (``DATED_AT``). RFC 5322's
origination date is when the message was "ready to enter the mail delivery system"; a mail scheduled
for next week is ready then, and one dated at its enqueue would arrive a week old (clients sort by
it; spam filters score a Date far in the past). Both are stored, so the sender and this endpoint
agree without storing anything more; a retry's backoff moves neither. A retry sends the same bytes
again, so a duplicate after a lost reply is the same message in every header. Bcc recipients are on
the envelope only, as on the wire.

The attachments' bytes are read in slices (pg8000 reads a bytea as hex text: a whole 10 MiB value
would hold about 70 MiB), as the sender reads a large mail's.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from shared.context import Context
from shared.delivery.inflight import SLICE_BYTES, SLICE_SQL
from shared.delivery.message import Outgoing, compose
from shared.errors import Conflict, NotFound, PermanentSmtpError
from shared.tasks.storage import attachments_of

MEDIA_TYPE = "message/rfc822"

# A mail's Date header, in SQL over its task row ``t``: when it became due (the sender's claim reads it too).
DATED_AT = "GREATEST(t.created_at, t.scheduled_at)"

_TASK_SQL = sa.text(
    f"""
    SELECT t.id, t.recipient_email, t.subject, t.body, t.message_id, {DATED_AT} AS dated_at,
           u.email AS sender_email,
           c.html, c.from_name, c.recipient_name, c.cc, c.bcc, c.reply_to, c.headers, c.attachments,
           COALESCE(octet_length(c.attachment_data), 0) AS attachment_bytes
      FROM tasks AS t JOIN users AS u ON u.id = t.user_id
      LEFT JOIN task_contents AS c ON c.task_id = t.id
     WHERE t.id = :id AND t.user_id = :user_id
    """  # noqa: S608 - DATED_AT is a constant
)


def raw_message(ctx: Context, caller_id: int, task_id: int) -> bytes:
    """The wire bytes (CRLF line ends, before dot-stuffing) of one of the caller's tasks."""
    with ctx.engine.connect() as conn:
        row = conn.execute(_TASK_SQL, {"id": task_id, "user_id": caller_id}).one_or_none()
        if row is None:
            raise NotFound("No such task.")
        data = bytearray()
        while len(data) < row.attachment_bytes:
            params = {"id": task_id, "start": len(data) + 1, "length": SLICE_BYTES}
            data += conn.execute(SLICE_SQL, params).scalar_one()
    try:
        outgoing = compose_task(row, bytes(data) if data else None)
    except PermanentSmtpError as exc:  # no From or To address to put on the envelope
        raise Conflict(f"The mail cannot be built: {exc}"[:1000]) from None
    except Exception as exc:  # noqa: BLE001 - the task's own content, which the sender cancels the same way
        raise Conflict(f"The mail cannot be built: {exc}"[:1000]) from None
    return outgoing.data


def compose_task(task: Any, attachment_data: bytes | None) -> Outgoing:
    """compose() of a task's stored fields: the sender's claim and this endpoint's row name the same
    columns alike, so the raw message is the sent one by construction, not by two copies agreeing."""
    return compose(
        sender=task.sender_email,
        recipient=task.recipient_email,
        subject=task.subject,
        body=task.body,
        message_id=task.message_id,
        date=task.dated_at,  # when it became due: the same on every try
        html=task.html,
        from_name=task.from_name,
        recipient_name=task.recipient_name,
        cc=task.cc or (),
        reply_to=task.reply_to,
        headers=[tuple(h) for h in task.headers or ()],
        attachments=attachments_of(task.attachments, attachment_data),
        bcc=tuple(task.bcc or ()),
    )
