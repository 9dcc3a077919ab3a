"""Bulk actions: retry or cancel what a search finds, at most BULK_MAX tasks per request.

``POST /api/v1/task/bulk {"action": "retry" | "cancel", <the list's search>, "cursor"?}``

- The search is the list's (shared.tasks.search: status, recipient, tag, subject, message_id, id,
  created_from, created_to), narrowed to the statuses the action applies to (retry: failed and
  cancelled; cancel: scheduled, queued and failed); an absent ``status`` means all of those, and a
  status the action cannot change is a 422.
- Up to BULK_MAX of the tasks it finds are read through the same pages as the list (bounded reads, the
  same cursor) and changed by the single-task statements of shared.tasks.control: one conditional
  UPDATE per rule, the status re-checked on each row's newest version, the cancel's events in the same
  transaction. A task that changed since it was found (a sender claimed it) is counted as unchanged.
- The answer counts what happened and says where to go on: ``next_cursor`` (call again with it and
  the same search) or null (nothing more matched).
- With an ``Idempotency-Key`` the answer is kept (task_bulk_requests, as long as a batch's key): the
  same request again gets the same answer without acting twice; another body with the key is a 422.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import sqlalchemy as sa

from shared.context import Context
from shared.domain import CANCELLABLE, RETRYABLE
from shared.errors import ValidationFailed
from shared.models import task_bulk_requests
from shared.tasks import control, events, pages, search
from shared.tasks.enqueue import first_use, idempotency_key, push

BULK_MAX = 500  # tasks one request changes at most; the answer's next_cursor goes on
ACTIONS = {"retry": RETRYABLE, "cancel": CANCELLABLE}
_DONE = {"retry": "retried", "cancel": "cancelled"}

# Takes the key for this request, only while the user exists; a concurrent request with the same key
# waits here until this one commits, then finds the key taken (and its answer).
_CLAIM_KEY_SQL = sa.text(
    """
    INSERT INTO task_bulk_requests (user_id, idempotency_key, request_hash)
    SELECT id, :key, :hash FROM users WHERE id = :user_id
        ON CONFLICT (user_id, idempotency_key) DO NOTHING
    RETURNING user_id
    """
)


def parse(body: dict[str, Any]) -> tuple[str, search.Search, str | None]:
    """(action, search, cursor) of a bulk request; 422 naming every bad member."""
    errors: dict[str, str] = {}
    action = body.get("action")
    if action not in ACTIONS:
        errors["action"] = "is required: retry or cancel"
    cursor = body.get("cursor")
    if cursor is not None and not isinstance(cursor, str):
        errors["cursor"] = "must be a string (a next_cursor this endpoint returned)"
    for name in search.PARAMETERS:  # unlike a query string, a body leaves out what it does not ask for
        if name in body and body[name] in (None, ""):
            errors[name] = "must not be empty or null (leave the member out to ask for any)"
    allowed = tuple(s.value for s in ACTIONS.get(action, ()))
    try:
        found = search.parse(body, allowed or search.STATUSES)
    except ValidationFailed as exc:
        errors.update(exc.errors)
        found = None
    if found is not None and allowed:
        statuses = tuple(s for s in found.statuses if s in allowed)
        if not statuses:
            errors["status"] = (
                f"a {found.statuses[0]} task cannot be {_DONE[action]}; {action} applies to "
                + " and ".join(allowed)
            )
        found = dataclasses.replace(found, statuses=statuses)
    if errors:
        raise ValidationFailed(errors)
    return action, found, cursor or None


def request_hash(body: dict[str, Any]) -> str:
    """What an Idempotency-Key is compared with: the action, the search and the cursor as sent."""
    members = {k: body.get(k) for k in ("action", "cursor", *search.PARAMETERS) if body.get(k) is not None}
    return hashlib.sha256(json.dumps(members, sort_keys=True).encode()).hexdigest()


def run(ctx: Context, user_id: int, body: dict[str, Any], idempotency_header: str | None) -> dict[str, Any]:
    """Retry or cancel up to BULK_MAX of the caller's tasks that the request's search finds."""
    key = idempotency_key(idempotency_header)
    action, found, cursor = parse(body)
    digest = request_hash(body)
    changed: list[Any] = []
    created: list = []
    admitted = None  # the tenant-bounds admission of the cancelled tasks a retry makes pending again
    try:
        with ctx.engine.begin() as conn:
            if key is not None:
                params = {"user_id": user_id, "key": key, "hash": digest}
                if conn.execute(_CLAIM_KEY_SQL, params).one_or_none() is None:
                    return _replay(conn, user_id, key, digest)
            page = pages.read(conn, user_id, found, BULK_MAX, cursor)
            task_ids = [row.id for row in page.items]
            if task_ids:
                if action == "retry":
                    # All or none against the tenant's bounds: a 429 rolls the request back, key included.
                    admitted = control.admit_again(ctx, conn, user_id, task_ids)
                    changed = control.retry_many(ctx, conn, user_id, task_ids)
                else:
                    changed, created = control.cancel_many(conn, user_id, task_ids)
            answer = {
                "action": action,
                "changed": len(changed),
                "unchanged": len(task_ids) - len(changed),
                "next_cursor": page.next_cursor,
            }
            if key is not None:
                mine = task_bulk_requests.c.user_id == user_id
                keyed = task_bulk_requests.c.idempotency_key == key
                conn.execute(sa.update(task_bulk_requests).where(mine, keyed).values(answer=answer))
    except Exception:
        if admitted is not None:
            push(ctx.redis, [], admitted)  # nothing was stored: end the admission's flight
        raise
    if action == "retry":
        push(ctx.redis, [row.id for row in changed], admitted)
    else:
        events.Outbox(ctx.redis).wake(created)
    return answer


def _replay(conn, user_id: int, key: str, digest: str) -> dict[str, Any]:
    """The answer of the request that first used ``key`` (422 if it was another request)."""
    row = first_use(
        conn.execute(
            sa.select(task_bulk_requests.c.request_hash, task_bulk_requests.c.answer).where(
                task_bulk_requests.c.user_id == user_id, task_bulk_requests.c.idempotency_key == key
            )
        ).one_or_none(),
        digest,
    )
    return row.answer
