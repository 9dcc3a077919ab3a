"""Use cases for a user's control over a task: cancel it, move it in time, retry it (one task, or
many at once: shared.tasks.bulk uses the same statements).

Each is one conditional ``UPDATE ... WHERE id = … AND user_id = … AND status IN (…) RETURNING``, so
the status it was decided on is the status it changed: there is no read before the write for
another writer to slip into. The sender's claim is conditional too (``status = 'queued'``), and
PostgreSQL re-checks both conditions on the row's newest version, so a cancel and a claim of the
same task cannot both win: a cancel that answers 200 has left nothing for any sender to claim,
whatever envelopes of the task are still in Redis. The allowed statuses come from
``shared.domain``; a refused change is a ``Conflict`` (409) naming the status the task is in.

A task that becomes due now is pushed after the commit, as enqueue does (the row is its own outbox:
a failed push leaves it for the sweep). A reschedule or retry that would leave the mail due after its
``expires_at`` gives it a fresh MAX_QUEUE_LIFETIME from its new due time (``_lifetime``).
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from shared import bounds
from shared.context import Context
from shared.domain import CANCELLABLE, RESCHEDULABLE, RETRYABLE, Status
from shared.errors import Conflict, NotFound, ValidationFailed
from shared.models import tasks, webhook_endpoints
from shared.tasks import enqueue, events, views
from shared.validation import Fields

CANCELLED_BY_USER = "cancelled by the user"


def _mine(caller_id: int, task_ids: list[int], allowed: tuple[Status, ...]) -> sa.Update:
    """The UPDATE of the caller's tasks among ``task_ids``, each only while it is in ``allowed``."""
    return (
        sa.update(tasks)
        .where(
            tasks.c.id == sa.any_(sa.bindparam("task_ids", task_ids, type_=sa.ARRAY(sa.BigInteger))),
            tasks.c.user_id == caller_id,
            tasks.c.status.in_([s.value for s in allowed]),
        )
        .returning(*views.VIEW_COLUMNS)
    )


def _refusal(conn: Connection, caller_id: int, task_id: int, action: str, allowed: tuple[Status, ...]):
    """Why an UPDATE of ``_mine`` changed nothing: 404 if the task is not the caller's, else 409."""
    status = conn.execute(
        sa.select(tasks.c.status).where(tasks.c.id == task_id, tasks.c.user_id == caller_id)
    ).scalar_one_or_none()
    if status is None:
        return NotFound("No such task.")
    names = ", ".join(s.value for s in allowed[:-1]) + f" or {allowed[-1].value}"
    now = "being sent right now (processing)" if status == Status.PROCESSING else status
    return Conflict(f"The task is {now}; only a {names} task can be {action}.")


def _lifetime(ctx: Context, due) -> sa.ColumnElement:
    """expires_at after a reschedule or retry to ``due``: kept, unless it would come first; then
    MAX_QUEUE_LIFETIME from ``due`` (the user asked for this mail to go out then)."""
    fresh = due + sa.func.make_interval(0, 0, 0, 0, 0, 0, ctx.settings.max_queue_lifetime)
    return sa.case((tasks.c.expires_at <= due, fresh), else_=tasks.c.expires_at)


def _view(ctx: Context, row: Any) -> dict[str, Any]:
    return views.task_view(row, max_tries=ctx.settings.max_try_count)


def cancel_many(conn: Connection, caller_id: int, task_ids: list[int]) -> tuple[list[Any], list]:
    """Cancel those of the caller's ``task_ids`` that are scheduled, queued or failed, in the caller's
    transaction, with their task.cancelled events (reason "user"). Returns the cancelled rows and the
    new webhook deliveries, for ``events.Outbox.wake()`` after the commit."""
    statement = (
        _mine(caller_id, task_ids, CANCELLABLE)
        .values(
            status=Status.CANCELLED.value,
            last_error=CANCELLED_BY_USER,
            lease_until=None,
            next_attempt_at=sa.func.now(),
            updated_at=sa.func.now(),
        )
        .returning(
            # events.hooked(), in SQLAlchemy's words: does the user have an enabled endpoint?
            sa.exists()
            .where(webhook_endpoints.c.user_id == tasks.c.user_id, webhook_endpoints.c.enabled)
            .label("hooked")
        )
    )
    rows = conn.execute(statement).all()
    reports = [events.Report(r.id, events.CANCELLED, events.USER) for r in rows if r.hooked]
    return rows, events.write(conn, reports) if reports else []


def cancel(ctx: Context, caller_id: int, task_id: int) -> dict[str, Any]:
    """Cancel a scheduled, queued or failed task. Once this returns, no attempt of it starts."""
    with ctx.engine.begin() as conn:
        rows, created = cancel_many(conn, caller_id, [task_id])
        if not rows:
            raise _refusal(conn, caller_id, task_id, "cancelled", CANCELLABLE)
    events.Outbox(ctx.redis).wake(created)
    return _view(ctx, rows[0])


def reschedule(ctx: Context, caller_id: int, task_id: int, body: dict[str, Any]) -> dict[str, Any]:
    """Move a scheduled, queued or failed task to ``scheduled_at``: ``scheduled`` when that is later
    than now on PostgreSQL's clock, else ``queued`` and due now (and pushed), as enqueue decides."""
    if "scheduled_at" not in body:
        raise ValidationFailed({"scheduled_at": "is required (null or a past time: now)"})
    f = Fields(body)
    at = f.timestamp("scheduled_at")
    if f.errors:
        raise ValidationFailed(f.errors)
    requested = sa.cast(sa.bindparam("at", at), sa.DateTime(timezone=True))
    due = sa.func.greatest(sa.func.coalesce(requested, sa.func.now()), sa.func.now())
    statement = _mine(caller_id, [task_id], RESCHEDULABLE).values(
        # A sender claims only a queued row: moved to later, an envelope still in Redis finds nothing.
        status=sa.case((requested > sa.func.now(), Status.SCHEDULED.value), else_=Status.QUEUED.value),
        scheduled_at=due,
        next_attempt_at=due,
        expires_at=_lifetime(ctx, due),
        lease_until=None,
        updated_at=sa.func.now(),
    )
    with ctx.engine.begin() as conn:
        row = conn.execute(statement).one_or_none()
        if row is None:
            raise _refusal(conn, caller_id, task_id, "rescheduled", RESCHEDULABLE)
    if row.status == Status.QUEUED:
        enqueue.push(ctx.redis, [row.id])
    return _view(ctx, row)


def retry_many(ctx: Context, conn: Connection, caller_id: int, task_ids: list[int]) -> list[Any]:
    """Queue again those of the caller's ``task_ids`` that are failed or cancelled, due now (also one
    cancelled before its scheduled time), each with a fresh budget of MAX_TRY_COUNT tries, in the
    caller's transaction; push the returned rows' envelopes after the commit, with the admission
    ``admit_again`` took for them.

    The try count keeps counting (it is the senders' fencing token and never goes down); the new
    budget begins at it (``budget_base``)."""
    statement = _mine(caller_id, task_ids, RETRYABLE).values(
        status=Status.QUEUED.value,
        budget_base=tasks.c.try_count,
        scheduled_at=sa.func.least(tasks.c.scheduled_at, sa.func.now()),  # one cancelled before its time
        next_attempt_at=sa.func.now(),
        expires_at=_lifetime(ctx, sa.func.now()),
        lease_until=None,
        updated_at=sa.func.now(),
    )
    return conn.execute(statement).all()


def retry(ctx: Context, caller_id: int, task_id: int) -> dict[str, Any]:
    """Queue a failed or cancelled task again, due now, with a fresh budget (``retry_many``). A
    cancelled task is pending again: it counts against the tenant's bounds like a new mail
    (shared.bounds; 429 past them)."""
    with ctx.engine.connect() as conn:
        admitted = admit_again(ctx, conn, caller_id, [task_id])
    try:
        with ctx.engine.begin() as conn:
            rows = retry_many(ctx, conn, caller_id, [task_id])
            if not rows:
                raise _refusal(conn, caller_id, task_id, "retried", RETRYABLE)
    except Exception:
        enqueue.push(ctx.redis, [], admitted)
        raise
    enqueue.push(ctx.redis, [rows[0].id], admitted)
    return _view(ctx, rows[0])


# The cancelled ones among a caller's tasks, and their content bytes, the way shared.bounds counts them.
_CANCELLED_SIZE = sa.text(
    """
    SELECT count(*) AS tasks,
           COALESCE(sum(COALESCE(octet_length(t.body), 0) + COALESCE(octet_length(c.html), 0)
                        + COALESCE(octet_length(c.attachment_data), 0)), 0) AS size
      FROM tasks AS t LEFT JOIN task_contents AS c ON c.task_id = t.id
     WHERE t.id = ANY(:ids) AND t.user_id = :user_id AND t.status = 'cancelled'
    """
).bindparams(sa.bindparam("ids", type_=sa.ARRAY(sa.BigInteger)))


def admit_again(ctx: Context, conn: Connection, caller_id: int, task_ids: list[int]) -> bounds.Ticket | None:
    """Count the cancelled ones among ``task_ids`` against the tenant's bounds, all or none (429);
    the ticket is settled by the push after the retry's commit (or with nothing, when it failed)."""
    row = conn.execute(_CANCELLED_SIZE, {"ids": task_ids, "user_id": caller_id}).one()
    if row.tasks == 0:
        return None
    return bounds.admit(ctx.settings, ctx.engine, ctx.redis, caller_id, None, row.tasks, int(row.size))
