"""What a user sees of tasks: one task with its content, and a page of their queue (keyset-paged,
filtered by status, recipient and tag, each filter served by an index).
"""

from __future__ import annotations

import base64
from typing import Any

import sqlalchemy as sa

from shared.accounts import standing
from shared.context import Context
from shared.domain import FAILURES, PENDING, Status
from shared.errors import NotFound, ValidationFailed
from shared.models import task_contents, task_tags, tasks
from shared.tasks import storage
from shared.validation import Fields

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


def _encode_cursor(last_id: int) -> str:
    return base64.urlsafe_b64encode(f"v1:{last_id}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str | None) -> int:
    if not cursor:
        return 0
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        version, _, number = text.partition(":")
        if version != "v1" or not number.isdigit() or int(number) > MAX_ID:
            raise ValueError
        return int(number)
    except ValueError:
        raise ValidationFailed({"cursor": "is not a cursor this API returned"}) from None


def list_tasks(
    ctx: Context,
    caller_id: int,
    statuses: tuple[str, ...],
    limit: int,
    cursor: str | None,
    recipient: str | None = None,
    tag: str | None = None,
) -> dict[str, Any]:
    """One page of the caller's tasks in ``statuses`` (and to ``recipient``, with ``tag``, when
    given), oldest first, keyset-paginated on id."""
    query = list_query(caller_id, statuses, limit + 1, _decode_cursor(cursor), recipient, tag)
    with ctx.engine.connect() as conn:
        rows = conn.execute(query).all()
    page = rows[:limit]
    waiting = standing.waiting(ctx, caller_id) if any(r.status == "queued" for r in page) else None
    items = [task_view(r, max_tries=ctx.settings.max_try_count, waiting=waiting) for r in page]
    next_cursor = _encode_cursor(rows[limit - 1].id) if len(rows) > limit else None
    return {"items": items, "next_cursor": next_cursor}


def _only(column: sa.Column, user_id: int) -> sa.ColumnElement[bool]:
    """``column = ANY('{user_id}')``: the same selectivity estimate as ``column = user_id``, but not an
    equality the planner folds into a constant, so ``ORDER BY user_id, id`` stays an order only an
    index led by ``user_id`` provides (with ``user_id = …`` the planner drops ``user_id`` from the
    ORDER BY as constant, and walking the primary key in id order, filtering, satisfies it too)."""
    return column == sa.any_(sa.literal([int(user_id)], sa.ARRAY(sa.BigInteger)))


def list_query(
    caller_id: int,
    statuses: tuple[str, ...],
    limit: int,
    after: int,
    recipient: str | None = None,
    tag: str | None = None,
) -> sa.Select:
    """The list statement (tests EXPLAIN it): each filter is served by an index of shared.models.

    A user's tasks still to go out are its newest, after all of its history in id order; the planner
    assumes matching rows are spread evenly over the ids, so for a table with few users it would read
    a page by walking the primary key and filtering -- through the user's whole history first (a
    page of a 200,000-row table read 90,000 rows). Every statement here is shaped so that its index
    is the only way to the order it asks for (tests/test_queue_plans.py)."""
    if len(statuses) == 1:
        status = tasks.c.status == statuses[0]
    else:
        # Literal values (validated constants) let PostgreSQL match the partial index for this
        # exact status set even under a generic plan.
        assert all(s in STATUS_CHOICES for s in statuses)
        status = sa.text(f"tasks.status IN ({', '.join(repr(s) for s in statuses)})")
    where = [status, *([tasks.c.recipient_email == recipient] if recipient is not None else [])]
    if tag is None:
        return (
            sa.select(*VIEW_COLUMNS)
            .where(_only(tasks.c.user_id, caller_id), tasks.c.id > after, *where)
            .order_by(tasks.c.user_id, tasks.c.id)
            .limit(limit)
        )
    # The tag's rows in task id order (task_tags_user_tag_task), each task then looked up by its key
    # (LATERAL: one lookup per tag row, in that order, until the page is full). As a plain join, the
    # planner may merge it with the tasks walked in primary-key order -- the whole history again.
    tagged = (
        sa.select(task_tags.c.task_id)
        .where(task_tags.c.user_id == caller_id, task_tags.c.tag == tag, task_tags.c.task_id > after)
        .subquery("tagged")
    )
    task = (
        sa.select(*VIEW_COLUMNS)
        .where(tasks.c.id == tagged.c.task_id, tasks.c.user_id == caller_id, *where)
        .limit(1)  # one row by its key anyway; a LIMIT keeps PostgreSQL from flattening it into a join
        .lateral("task")
    )
    return (
        sa.select(*task.c).select_from(tagged.join(task, sa.true())).order_by(tagged.c.task_id).limit(limit)
    )


def queue_statuses(status_param: str | None) -> tuple[str, ...]:
    if status_param is None or status_param == "":
        return tuple(s.value for s in PENDING)
    if status_param not in STATUS_CHOICES:
        raise ValidationFailed({"status": "must be one of " + ", ".join(STATUS_CHOICES)})
    return (status_param,)


FAIL_STATUSES = tuple(s.value for s in FAILURES)


def recipient_filter(param: str | None) -> str | None:
    """The ``recipient`` query parameter as enqueue stores addresses (normalized), or None if absent."""
    if param is None or param == "":
        return None
    f = Fields({"recipient": param})
    recipient = f.email("recipient")
    if f.errors:
        raise ValidationFailed(f.errors)
    return recipient
