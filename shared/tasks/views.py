"""What a user sees of a task: its public form, and one task with its content. The pages of a user's
queue, and searching it, are shared.tasks.search.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from shared.accounts import standing
from shared.context import Context
from shared.domain import Status
from shared.errors import NotFound
from shared.models import task_contents, tasks
from shared.tasks import storage

DEFAULT_PAGE, MAX_PAGE = 50, 500
MAX_ID = 2**63 - 1  # ids are bigint
STATUS_CHOICES = tuple(s.value for s in Status)

VIEW_COLUMNS = (
    tasks.c.id,
    tasks.c.status,
    tasks.c.recipient_email,
    tasks.c.subject,
    tasks.c.scheduled_at,
    tasks.c.next_attempt_at,
    tasks.c.try_count,
    tasks.c.budget_base,
    tasks.c.last_error,
    tasks.c.message_id,
    tasks.c.created_at,
    tasks.c.updated_at,
    tasks.c.sent_at,
    tasks.c.tags,
    tasks.c.expires_at,
)


def _iso(value) -> str | None:
    return value.isoformat() if value is not None else None


def tries_left(row: Any, max_tries: int) -> int | None:
    """Attempts the task may still make (MAX_TRY_COUNT - tries of the current budget); None once it
    is sent or cancelled. A retry starts a new budget, so this is what the user sees it gave them."""
    if row.status in ("sent", "cancelled"):
        return None
    return max(0, max_tries - (row.try_count - row.budget_base))


def task_view(
    row: Any, *, max_tries: int, with_body: bool = False, waiting: str | None = None
) -> dict[str, Any]:
    """The public form of a task (the columns of VIEW_COLUMNS; the body only when asked). ``waiting``:
    why its account's queued mail waits (shared.accounts.standing), shown on a queued task only."""
    final = row.status in ("sent", "cancelled")
    view = {
        "id": row.id,
        "status": row.status,
        "recipient_email": row.recipient_email,
        "subject": row.subject,
        "scheduled_at": _iso(row.scheduled_at),
        "next_attempt_at": _iso(row.next_attempt_at) if row.status not in ("sent", "cancelled") else None,
        "try_count": row.try_count,
        "tries_left": tries_left(row, max_tries),
        "last_error": row.last_error,
        "message_id": row.message_id,
        "created_at": _iso(row.created_at),
        "updated_at": _iso(row.updated_at),
        "sent_at": _iso(row.sent_at),
        "tags": row.tags,
        "expires_at": None if final else _iso(row.expires_at),
        "waiting": waiting if row.status == "queued" else None,
    }
    if with_body:
        view["body"] = row.body
        view.update(storage.content_view(row))
    return view


_CONTENT_COLUMNS = tuple(
    c
    for c in task_contents.c
    if c.name in ("html", "from_name", "recipient_name", "cc", "bcc", "reply_to", "headers", "attachments")
)  # everything but the attachments' bytes


def get_task(ctx: Context, caller_id: int, task_id: int) -> dict[str, Any]:
    columns = (*VIEW_COLUMNS, tasks.c.body, *_CONTENT_COLUMNS)
    with ctx.engine.connect() as conn:
        row = conn.execute(
            sa.select(*columns)
            .select_from(tasks.outerjoin(task_contents, task_contents.c.task_id == tasks.c.id))
            .where(tasks.c.id == task_id, tasks.c.user_id == caller_id)
        ).one_or_none()
    if row is None:
        raise NotFound("No such task.")
    waiting = standing.waiting(ctx, caller_id) if row.status == "queued" else None
    return task_view(row, max_tries=ctx.settings.max_try_count, with_body=True, waiting=waiting)
