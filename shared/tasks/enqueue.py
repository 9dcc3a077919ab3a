"""Enqueue one mail: check it, store it, wake a consumer; an Idempotency-Key answers a retry with
the first task.

Enqueue follows the outbox rule of the data path: the row is committed first, the wake-up
envelope pushed after. A failed push loses nothing; the sweep pushes the row later.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
import sqlalchemy as sa

from shared import bounds, queue
from shared.context import Context
from shared.domain import Status
from shared.errors import PayloadTooLarge, RateLimited, Unauthorized, ValidationFailed
from shared.models import tasks
from shared.tasks import content, storage

log = logging.getLogger("mailq.tasks")

MAX_IDEMPOTENCY_KEY = 255
# The insert found no user of the token's id and generation: the user is gone, or the token was revoked.
TOKEN_NOT_CURRENT = (
    "The token is no longer valid (its user is gone, or its sessions were revoked); log in again."
)


def request_limit(ctx: Context) -> int:
    """Largest enqueue request accepted before parsing (shared.tasks.content.request_limit says why)."""
    return content.request_limit(ctx.settings)


def idempotency_key(header: str | None) -> str | None:
    """The Idempotency-Key header, trimmed; 422 unless 1 to 255 printable ASCII characters."""
    if header is None:
        return None
    key = header.strip()
    if not key or len(key) > MAX_IDEMPOTENCY_KEY or not key.isascii() or not key.isprintable():
        raise ValidationFailed(
            {"Idempotency-Key": f"must be 1 to {MAX_IDEMPOTENCY_KEY} printable ASCII characters"}
        )
    return key


def first_use(row: Any, request_hash: str):
    """The row that first used an Idempotency-Key an insert just ran into, checked against this request:
    none means nothing conflicted, so the insert wrote nothing because the user is gone (401); another
    request hash means the key belongs to another request (422)."""
    if row is None:
        raise Unauthorized(TOKEN_NOT_CURRENT)
    if row.request_hash != request_hash:
        raise ValidationFailed(
            {"Idempotency-Key": "was already used with a different request body"},
            "This Idempotency-Key belongs to another request.",
        )
    return row


def enqueue(
    ctx: Context,
    user_id: int,
    body: dict[str, Any],
    idempotency_header: str | None,
    generation: int | None = None,
) -> tuple[dict, bool]:
    """Store a mail for ``user_id`` and wake a consumer. Returns (result, created).

    One statement both checks that the user still exists and inserts the rows (the user's email
    gives the Message-ID its domain), so a plain enqueue costs a single round trip to PostgreSQL: a
    statement prepared once per connection and run as its own transaction (shared.prepared). The same
    statement checks ``generation``, the token's (None: a caller without a token).
    """
    key = idempotency_key(idempotency_header)
    parsed = content.parse(body, ctx.settings)
    if parsed.too_large:
        detail = next(iter(parsed.too_large.values()))
        raise PayloadTooLarge(detail[0].upper() + detail[1:] + ".")
    if parsed.errors:
        raise ValidationFailed(parsed.errors)
    request_hash = content.request_hash(body) if key else None
    try:
        admitted = bounds.admit(
            ctx.settings, ctx.engine, ctx.redis, user_id, generation, 1, content_bytes(parsed.mail)
        )
    except RateLimited:
        replayed = _first_answer(ctx, user_id, key, request_hash) if key else None
        if replayed is None:
            raise
        return replayed, False  # a retry of a request that was stored: its answer, whatever the bounds
    try:
        rows = storage.insert_one(
            ctx.engine, user_id, parsed.mail, idempotency_key=key, request_hash=request_hash,
            generation=generation,
        )  # fmt: skip
    except Exception:
        push(ctx.redis, [], admitted)  # nothing stored: nothing of it in flight any more
        raise
    if not rows:
        push(ctx.redis, [], admitted)
        # ON CONFLICT waited for the request that holds the key to end, so its row is committed.
        row = first_use(_keyed_row(ctx, user_id, key), request_hash)
        return _answer(row), False
    row = rows[0]
    push(ctx.redis, [row.id] if row.status == Status.QUEUED else [], admitted)
    return _answer(row), True


def _answer(row: Any) -> dict[str, Any]:
    return {"task_id": row.id, "status": row.status, "scheduled_at": row.scheduled_at.isoformat()}


def _keyed_row(ctx: Context, user_id: int, key: str | None) -> Any:
    with ctx.engine.connect() as conn:
        return conn.execute(
            sa.select(tasks.c.id, tasks.c.status, tasks.c.scheduled_at, tasks.c.request_hash).where(
                tasks.c.user_id == user_id, tasks.c.idempotency_key == key
            )
        ).one_or_none()


def _first_answer(ctx: Context, user_id: int, key: str, request_hash: str | None) -> dict[str, Any] | None:
    """The answer of the request that first used ``key``, if one was stored (checked like a replay)."""
    row = _keyed_row(ctx, user_id, key)
    return None if row is None else _answer(first_use(row, request_hash))


def content_bytes(mail: content.Mail) -> int:
    """What a mail adds to its tenant's pending bytes: its text, HTML and attachments (shared.bounds counts
    the same columns again from PostgreSQL)."""
    size = sum(len(t.encode("utf-8", "surrogatepass")) for t in (mail.body, mail.html) if t is not None)
    return size + sum(len(a.data) for a in mail.attachments)


def push(client: redis.Redis, task_ids: list[int], admitted: bounds.Ticket | None = None) -> bool:
    """Wake consumers for these tasks, and settle the admission that stored them (shared.bounds) in the
    same round trip; False if Redis refused (the sweep will push them later)."""
    if not task_ids and admitted is None:
        return True
    try:
        envelopes = [queue.encode(i) for i in task_ids]
        if admitted is None:
            client.lpush(queue.TASK_LIST, *envelopes)
        else:
            bounds.push_and_settle(client, queue.TASK_LIST, envelopes, admitted)
        return True
    except redis.RedisError as exc:
        log.warning("could not push %d envelope(s) (%s); the sweep will", len(task_ids), type(exc).__name__)
        return False
