"""A task's attempts, oldest first: what each came to, how far the conversation got, what the server
said (the log the sender writes with each outcome, shared/delivery/record.py). Keyset-paged on the
log's id; another tenant's task is not found.
"""

from __future__ import annotations

import base64
from typing import Any

import sqlalchemy as sa

from shared.context import Context
from shared.errors import NotFound, ValidationFailed
from shared.models import task_attempts, tasks

DEFAULT_PAGE, MAX_PAGE = 50, 200
MAX_ID = 2**63 - 1

COLUMNS = (
    task_attempts.c.id,
    task_attempts.c.try_count,
    task_attempts.c.spent,
    task_attempts.c.outcome,
    task_attempts.c.reason,
    task_attempts.c.started_at,
    task_attempts.c.finished_at,
    task_attempts.c.duration_ms,
    task_attempts.c.server,
    task_attempts.c.stage,
    task_attempts.c.smtp_code,
    task_attempts.c.reply,
    task_attempts.c.refused,
    task_attempts.c.repeats,
)


def attempt_view(row: Any) -> dict[str, Any]:
    return {
        "id": row.id,
        # The task's try count at this attempt (null: nothing was claimed, the account waited).
        "try_count": row.try_count,
        "spent": row.spent,  # one of MAX_TRY_COUNT used
        "outcome": row.outcome,  # sent, deferred, cancelled, waiting (the account's relay), paused
        "reason": row.reason,  # the account's reason when it waited or paused
        "started_at": _iso(row.started_at),
        "finished_at": _iso(row.finished_at),
        "duration_ms": row.duration_ms,
        "server": row.server,
        "stage": row.stage,  # how far it got: connect, greeting, EHLO, STARTTLS, AUTH, MAIL FROM, …, DATA
        "smtp_code": row.smtp_code,
        "reply": row.reply,
        "refused": row.refused or [],  # recipients refused for good while the others got it
        "repeats": row.repeats,  # a wait met again in the same backoff episode
    }


def list_attempts(
    ctx: Context, caller_id: int, task_id: int, limit: int, cursor: str | None
) -> dict[str, Any]:
    after = _decode_cursor(cursor)
    with ctx.engine.connect() as conn:
        mine = conn.execute(
            sa.select(tasks.c.id).where(tasks.c.id == task_id, tasks.c.user_id == caller_id)
        ).one_or_none()
        if mine is None:
            raise NotFound("No such task.")
        rows = conn.execute(
            sa.select(*COLUMNS)
            .where(task_attempts.c.task_id == task_id, task_attempts.c.id > after)
            .order_by(task_attempts.c.id)
            .limit(limit + 1)
        ).all()
    items = [attempt_view(r) for r in rows[:limit]]
    next_cursor = _encode_cursor(rows[limit - 1].id) if len(rows) > limit else None
    return {"items": items, "next_cursor": next_cursor}


def _iso(value) -> str | None:
    return value.isoformat() if value is not None else None


def _encode_cursor(last_id: int) -> str:
    return base64.urlsafe_b64encode(f"a1:{last_id}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str | None) -> int:
    if not cursor:
        return 0
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        version, _, number = text.partition(":")
        if version != "a1" or not number.isdigit() or int(number) > MAX_ID:
            raise ValueError
        return int(number)
    except ValueError:
        raise ValidationFailed({"cursor": "is not a cursor this API returned"}) from None
