"""Batch enqueue: up to MAX_BATCH mails in one request, stored all or nothing, woken in one push.

Each mail follows the rules of a single enqueue (shared.tasks.content). ``strict`` validation (the default)
stores nothing when any item is wrong and answers 422 with the errors keyed by item
(``tasks[3].recipient_email``); ``permissive`` stores the valid items and answers each item in input
order, either ``{task_id, status, scheduled_at}`` or ``{errors}``. One INSERT per table writes the
batch (shared.tasks.storage), one LPUSH wakes it. An Idempotency-Key covers the whole batch:
``task_batches`` keeps the request's hash and the ids it stored, so the same key with the same body
answers the same items again, and with another body is refused.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import sqlalchemy as sa

from shared import bounds
from shared.context import Context
from shared.domain import Status
from shared.errors import RateLimited, Unauthorized, ValidationFailed
from shared.models import task_batches, tasks
from shared.tasks import content, storage
from shared.tasks.enqueue import TOKEN_NOT_CURRENT, content_bytes, first_use, idempotency_key, push

MODES = ("strict", "permissive")

# Takes the key for this request, only while the user exists; a concurrent request with the same key
# waits here until this one commits, then finds the key taken.
_CLAIM_KEY_SQL = sa.text(
    """
    INSERT INTO task_batches (user_id, idempotency_key, request_hash, task_ids)
    SELECT id, :key, :hash, CAST(:ids AS bigint[]) FROM users
     WHERE id = :user_id
       AND (CAST(:generation AS integer) IS NULL OR token_generation = CAST(:generation AS integer))
        ON CONFLICT (user_id, idempotency_key) DO NOTHING
    RETURNING user_id
    """
)


def request_limit(ctx: Context) -> int:
    """Largest batch request accepted before parsing (the gateway's limit for the batch route)."""
    return ctx.settings.max_batch_bytes


def max_values(ctx: Context) -> int:
    """JSON values a batch request may hold, counted before it is parsed: MAX_BATCH mails at their
    most (shared.tasks.content.MAX_VALUES), and its own few members."""
    return ctx.settings.max_batch * content.MAX_VALUES + 16


def validation_mode(param: str | None) -> str:
    if param is None or param == "":
        return "strict"
    if param not in MODES:
        raise ValidationFailed({"validation": "must be strict or permissive"})
    return param


def enqueue_batch(
    ctx: Context,
    user_id: int,
    body: dict[str, Any],
    idempotency_header: str | None,
    mode: str,
    generation: int | None = None,
) -> tuple[dict[str, Any], bool]:
    """Store the batch's valid mails (all of them, in strict mode) and wake consumers; nothing unless
    ``generation`` (the token's; None: no token) is the user's current one.
    Returns ({"items": [...]}, created)."""
    key = idempotency_key(idempotency_header)
    items = body.get("tasks")
    if not isinstance(items, list) or not items:
        raise ValidationFailed({"tasks": "is required: an array of 1 or more enqueue bodies"})
    if len(items) > ctx.settings.max_batch:
        raise ValidationFailed({"tasks": f"must hold at most {ctx.settings.max_batch} mails (MAX_BATCH)"})
    errors: list[dict[str, str]] = []
    mails = []
    for item in items:
        if not isinstance(item, dict):
            errors.append({"item": "must be an object (an enqueue body)"})
            mails.append(None)
            continue
        parsed = content.parse(item, ctx.settings)
        errors.append({**parsed.errors, **parsed.too_large})
        mails.append(parsed.mail)
    if mode == "strict" and any(errors):
        raise ValidationFailed(
            {
                f"tasks[{i}]" + ("" if name == "item" else f".{name}"): message
                for i, item_errors in enumerate(errors)
                for name, message in item_errors.items()
            },
            "One or more mails are invalid; none was stored.",
        )
    request_hash = _request_hash(items, mode) if key else None
    valid = [m for m in mails if m is not None]
    admitted = None
    if valid:  # all the batch's mails or none of them, against the tenant's bounds (shared.bounds)
        size = sum(content_bytes(m) for m in valid)
        try:
            admitted = bounds.admit(
                ctx.settings, ctx.engine, ctx.redis, user_id, generation, len(valid), size
            )
        except RateLimited:
            if key is None or not _key_used(ctx, user_id, key):
                raise  # a retry of a stored batch is answered below, whatever the bounds
    try:
        return _store(ctx, user_id, (key, request_hash, generation), mails, errors, admitted)
    except Exception:
        push(ctx.redis, [], admitted)  # nothing stored: nothing of it in flight any more
        raise


def _store(
    ctx: Context, user_id: int, request: tuple, mails: list, errors: list, admitted
) -> tuple[dict, bool]:
    """Insert the valid mails (and claim the Idempotency-Key) in one transaction, then push them."""
    key, request_hash, generation = request
    valid = [m for m in mails if m is not None]
    with ctx.engine.begin() as conn:
        if key is not None:
            params = {
                "user_id": user_id,
                "generation": generation,
                "key": key,
                "hash": request_hash,
                "ids": [],
            }
            if conn.execute(_CLAIM_KEY_SQL, params).one_or_none() is None:
                answer = _replay(conn, user_id, key, request_hash, errors)
                push(ctx.redis, [], admitted)
                return answer, False
        rows = storage.insert(conn, user_id, valid, generation=generation) if valid else []
        if len(rows) != len(valid):  # nothing inserted: the token's user is gone, or the token revoked
            raise Unauthorized(TOKEN_NOT_CURRENT)
        stored = iter(rows)
        results = [None if m is None else next(stored) for m in mails]
        if key is not None:
            conn.execute(
                sa.update(task_batches)
                .where(task_batches.c.user_id == user_id, task_batches.c.idempotency_key == key)
                .values(task_ids=[r.id if r else None for r in results])
            )
    push(ctx.redis, [r.id for r in rows if r.status == Status.QUEUED], admitted)
    return {"items": _answer(results, errors)}, True


def _key_used(ctx: Context, user_id: int, key: str) -> bool:
    with ctx.engine.connect() as conn:
        found = conn.execute(
            sa.select(task_batches.c.user_id).where(
                task_batches.c.user_id == user_id, task_batches.c.idempotency_key == key
            )
        ).first()
    return found is not None


def _request_hash(items: list[Any], mode: str) -> str:
    """Every field of every item as sent, and the validation mode."""
    return hashlib.sha256(
        json.dumps({"tasks": items, "validation": mode}, sort_keys=True).encode()
    ).hexdigest()


def _replay(conn, user_id: int, key: str, request_hash: str, errors: list[dict[str, str]]) -> dict[str, Any]:
    """The answer of the batch that first used ``key``, with each task's current status."""
    row = first_use(
        conn.execute(
            sa.select(task_batches.c.request_hash, task_batches.c.task_ids).where(
                task_batches.c.user_id == user_id, task_batches.c.idempotency_key == key
            )
        ).one_or_none(),
        request_hash,
    )
    ids = [i for i in row.task_ids if i is not None]
    found = {
        r.id: r
        for r in conn.execute(
            sa.select(tasks.c.id, tasks.c.status, tasks.c.scheduled_at).where(
                tasks.c.user_id == user_id, tasks.c.id.in_(ids)
            )
        )
    }
    # The same body gives the same errors, so the invalid items answer as they did the first time.
    return {"items": _answer([found.get(i) if i else None for i in row.task_ids], errors)}


def _answer(results: list[Any], errors: list[dict[str, str]]) -> list[dict[str, Any]]:
    items = []
    for result, item_errors in zip(results, errors, strict=True):
        if item_errors:
            items.append({"errors": item_errors})
        elif result is None:  # stored once, since removed (retention)
            items.append({"errors": {"task_id": "the task stored for this item no longer exists"}})
        else:
            items.append(
                {
                    "task_id": result.id,
                    "status": result.status,
                    "scheduled_at": result.scheduled_at.isoformat(),
                }
            )
    return items
