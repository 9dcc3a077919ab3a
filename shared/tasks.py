"""Use cases for tasks: enqueue one, read one, list a user's queue.

Enqueue follows the outbox rule of the data path: the row is committed first, the wake-up
envelope pushed after. A failed push loses nothing; the sweep pushes the row later.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import uuid
from typing import Any

import redis
import sqlalchemy as sa

from shared import queue
from shared.db import tasks
from shared.domain import FAILURES, PENDING, Status
from shared.errors import NotFound, PayloadTooLarge, Unauthorized, ValidationFailed
from shared.services import Context
from shared.validation import Fields

log = logging.getLogger("mailq.tasks")

MAX_SUBJECT = 998  # RFC 5322's line limit
MAX_IDEMPOTENCY_KEY = 255
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
)


def _iso(value) -> str | None:
    return value.isoformat() if value is not None else None


def tries_left(row: Any, max_tries: int) -> int | None:
    """Attempts the task may still make (MAX_TRY_COUNT - tries of the current budget); None once it
    is sent or cancelled. A retry starts a new budget, so this is what the user sees it gave them."""
    if row.status in ("sent", "cancelled"):
        return None
    return max(0, max_tries - (row.try_count - row.budget_base))


def task_view(row: Any, *, max_tries: int, with_body: bool = False) -> dict[str, Any]:
    """The public form of a task (the columns of VIEW_COLUMNS; the body only when asked)."""
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
    }
    if with_body:
        view["body"] = row.body
    return view


def request_limit(ctx: Context) -> int:
    """Largest enqueue request accepted before parsing: room for a JSON-escaped body at the limit.

    JSON may spell any character as a six-byte ``\\uXXXX`` escape, and an ASCII or control character
    is one byte of the body: a full-size body can arrive six times its size. The 64 KiB are for the
    other fields. The cluster's gateway takes its client_max_body_size from this function
    (deployment/gen_gateway.py), so the two limits cannot disagree.
    """
    return 6 * ctx.settings.max_body_bytes + 64 * 1024


def _idempotency_key(header: str | None) -> str | None:
    if header is None:
        return None
    key = header.strip()
    if not key or len(key) > MAX_IDEMPOTENCY_KEY or not key.isascii() or not key.isprintable():
        raise ValidationFailed(
            {"Idempotency-Key": f"must be 1 to {MAX_IDEMPOTENCY_KEY} printable ASCII characters"}
        )
    return key


def _request_hash(body: dict[str, Any]) -> str:
    fields = {k: body.get(k) for k in ("recipient_email", "subject", "body", "scheduled_at")}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def enqueue(
    ctx: Context, user_id: int, body: dict[str, Any], idempotency_header: str | None
) -> tuple[dict, bool]:
    """Store a mail for ``user_id`` and wake a consumer. Returns (result, created).

    One statement both checks that the user still exists and inserts the row (the user's email
    gives the Message-ID its domain), so an enqueue costs a single round trip to PostgreSQL.
    """
    key = _idempotency_key(idempotency_header)
    f = Fields(body)
    recipient = f.email("recipient_email")
    subject = f.string("subject", max_len=MAX_SUBJECT, allow_empty=True)
    text = body.get("body")
    if text is None:
        f.fail("body", "is required")
    elif not isinstance(text, str):
        f.fail("body", "must be a string")
    elif "\x00" in text:
        f.fail("body", "must not contain NUL characters")
    elif len(text.encode("utf-8", "surrogatepass")) > ctx.settings.max_body_bytes:
        raise PayloadTooLarge(f"The mail body must be at most {ctx.settings.max_body_bytes} bytes.")
    scheduled_at = f.timestamp("scheduled_at")  # absent or in the past: now, on PostgreSQL's clock
    if f.errors:
        raise ValidationFailed(f.errors)

    params = {
        "user_id": user_id,
        "recipient_email": recipient,
        "subject": subject,
        "body": text,
        "at": scheduled_at,
        "token": uuid.uuid4().hex,
        "idempotency_key": key,
        "request_hash": _request_hash(body) if key else None,
    }
    with ctx.engine.begin() as conn:
        row = conn.execute(_INSERT_SQL, params).one_or_none()
        created = row is not None
        if not created:
            row = conn.execute(
                sa.select(tasks.c.id, tasks.c.status, tasks.c.scheduled_at, tasks.c.request_hash).where(
                    tasks.c.user_id == user_id, tasks.c.idempotency_key == key
                )
            ).one_or_none()
            if row is None:  # no conflict, so nothing was inserted because the user is gone
                raise Unauthorized("The token's user does not exist.")
            if row.request_hash != params["request_hash"]:
                raise ValidationFailed(
                    {"Idempotency-Key": "was already used with a different request body"},
                    "This Idempotency-Key belongs to another request.",
                )
    if created and row.status == Status.QUEUED:
        push(ctx.redis, [row.id])
    result = {"task_id": row.id, "status": row.status, "scheduled_at": row.scheduled_at.isoformat()}
    return result, created


# The Message-ID is fixed for the task's life, so a duplicate after a lost SMTP reply is recognisable.
# Whether the task is due yet is decided on PostgreSQL's clock, the one the sweep and senders use.
_INSERT_SQL = sa.text(
    """
    INSERT INTO tasks (user_id, recipient_email, subject, body, status, scheduled_at, next_attempt_at,
                       message_id, idempotency_key, request_hash)
    SELECT u.id, :recipient_email, :subject, :body,
           CASE WHEN CAST(:at AS timestamptz) > now() THEN 'scheduled' ELSE 'queued' END,
           GREATEST(COALESCE(CAST(:at AS timestamptz), now()), now()),
           GREATEST(COALESCE(CAST(:at AS timestamptz), now()), now()),
           '<mailq.' || :token || '@' || CASE WHEN split_part(u.email, '@', 2) ~ '^[A-Za-z0-9.-]+$'
                                              THEN lower(split_part(u.email, '@', 2))
                                              ELSE 'mailq.invalid' END || '>',
           :idempotency_key, :request_hash
      FROM users AS u
     WHERE u.id = :user_id
        ON CONFLICT (user_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING id, status, scheduled_at, request_hash
    """
)


def push(client: redis.Redis, task_ids: list[int]) -> bool:
    """Wake consumers for these tasks; False if Redis refused (the sweep will push them later)."""
    if not task_ids:
        return True
    try:
        client.lpush(queue.TASK_LIST, *(queue.encode(i) for i in task_ids))
        return True
    except redis.RedisError as exc:
        log.warning("could not push %d envelope(s) (%s); the sweep will", len(task_ids), type(exc).__name__)
        return False


def get_task(ctx: Context, caller_id: int, task_id: int) -> dict[str, Any]:
    columns = (*VIEW_COLUMNS, tasks.c.body)
    with ctx.engine.connect() as conn:
        row = conn.execute(
            sa.select(*columns).where(tasks.c.id == task_id, tasks.c.user_id == caller_id)
        ).one_or_none()
    if row is None:
        raise NotFound("No such task.")
    return task_view(row, max_tries=ctx.settings.max_try_count, with_body=True)


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
) -> dict[str, Any]:
    """One page of the caller's tasks in ``statuses`` (and to ``recipient``, when given), oldest
    first, keyset-paginated on id."""
    query = list_query(caller_id, statuses, limit + 1, _decode_cursor(cursor), recipient)
    with ctx.engine.connect() as conn:
        rows = conn.execute(query).all()
    items = [task_view(r, max_tries=ctx.settings.max_try_count) for r in rows[:limit]]
    next_cursor = _encode_cursor(rows[limit - 1].id) if len(rows) > limit else None
    return {"items": items, "next_cursor": next_cursor}


def list_query(
    caller_id: int, statuses: tuple[str, ...], limit: int, after: int, recipient: str | None = None
) -> sa.Select:
    """The list statement (tests EXPLAIN it): each filter is served by an index of shared.db."""
    query = (
        sa.select(*VIEW_COLUMNS)
        .where(tasks.c.user_id == caller_id, tasks.c.id > after)
        .order_by(tasks.c.id)
        .limit(limit)
    )
    if recipient is not None:
        query = query.where(tasks.c.recipient_email == recipient)
    if len(statuses) == 1:
        query = query.where(tasks.c.status == statuses[0])
    else:
        # Literal values (validated constants) let PostgreSQL match the partial index for this
        # exact status set even under a generic plan.
        assert all(s in STATUS_CHOICES for s in statuses)
        query = query.where(sa.text(f"status IN ({', '.join(repr(s) for s in statuses)})"))
    return query


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
