"""Events: what happened to a task, written in the same statement as the status change it reports.

``reported()`` wraps an ``UPDATE tasks … RETURNING {RETURNING}`` in one statement that also writes the
event (when the task's user has an enabled endpoint subscribed to its type) and one delivery per
such endpoint: the outbox row exists exactly when the status change committed. A stale outcome that
loses the fencing check updates no row, so it writes no event. A user without endpoints pays one
index probe of ``webhook_endpoints``.

After the commit, ``Outbox.wake()`` puts the new deliveries' envelopes in their endpoints' queues; if
Redis refuses, the sweep pushes them later (the row is its own outbox, as with tasks). This module
also renders a delivery the way the Standard Webhooks spec says: the body, ``webhook-id``,
``webhook-timestamp`` and ``webhook-signature``.

    outcome = UPDATE tasks … RETURNING {RETURNING}          (the sender, the sweep, a user's cancel)
    reported(outcome, type_sql=…, reason_sql=…)  ->  rows: the task's columns, delivery_id, endpoint_id
    Outbox(redis).wake(deliveries(rows))                     (after the commit)
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import secrets as random_secrets
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import redis
import sqlalchemy as sa

from shared import queue
from shared.domain import Status
from shared.sendqueue import SendQueue

log = logging.getLogger("mailq.events")

SENT, DEFERRED, CANCELLED = "task.sent", "task.deferred", "task.cancelled"
EVENT_TYPES = (SENT, DEFERRED, CANCELLED)  # shared.db checks the same list
# data.reason of task.cancelled.
PERMANENT_FAILURE, TRIES_EXHAUSTED, USER, LOST_IN_FLIGHT = (
    "permanent_failure",
    "tries_exhausted",
    "user",
    "lost_in_flight",
)
CANCEL_REASONS = (PERMANENT_FAILURE, TRIES_EXHAUSTED, USER, LOST_IN_FLIGHT)
MAX_PAYLOAD_BYTES = 20 * 1024  # the promise; last_error is cut to MAX_ERROR in the event
MAX_ERROR = 2000
SECRET_PREFIX = "whsec_"


def tags_sql() -> str:
    """The task's tags as the event reports them. tasks.tags arrives with migration 0005 (mail
    content + batch); until then every event says ``{}``. After it: ``return "tags"``."""
    return "CAST('{}' AS jsonb)"


# What an UPDATE of tasks returns for reported(): the task's columns its event needs.
RETURNING = (
    "id, user_id, status, recipient_email, message_id, try_count, last_error, next_attempt_at, "
    f"{tags_sql()} AS tags"
)


def reported(
    update: str, *, type_sql: str, reason_sql: str = "NULL", code_sql: str = "NULL"
) -> sa.TextClause:
    """One statement: ``update`` (an ``UPDATE tasks … RETURNING {RETURNING}``), the event of each row it
    changed, and that event's deliveries.

    ``type_sql``, ``reason_sql`` and ``code_sql`` are SQL expressions over the updated row ``t`` (or
    bound parameters): a NULL type means "no event for this row" (the sweep's requeues). The result
    has the updated row's columns plus ``delivery_id`` and ``endpoint_id``: one row per delivery, or
    one row with NULLs when nobody is told; no row at all when nothing was updated.
    """
    return sa.text(
        f"""
        WITH t AS ({update}),
        x AS (
            SELECT t.*, {type_sql} AS event_type, {reason_sql} AS event_reason, {code_sql} AS smtp_code
              FROM t
        ),
        e AS (
            INSERT INTO webhook_events (task_id, type, data)
            SELECT x.id, x.event_type,
                   jsonb_build_object(
                       'task_id', x.id, 'status', x.status, 'recipient_email', x.recipient_email,
                       'message_id', x.message_id, 'try_count', x.try_count,
                       'last_error', left(x.last_error, {MAX_ERROR}), 'smtp_code', x.smtp_code,
                       'next_attempt_at', CASE WHEN x.status = 'failed' THEN x.next_attempt_at END,
                       'tags', x.tags)
                   || CASE WHEN x.event_reason IS NULL THEN CAST('{{}}' AS jsonb)
                           ELSE jsonb_build_object('reason', x.event_reason) END
              FROM x
             WHERE x.event_type IS NOT NULL
               AND EXISTS (SELECT 1 FROM webhook_endpoints AS w
                            WHERE w.user_id = x.user_id AND w.enabled AND x.event_type = ANY(w.events))
            RETURNING id, task_id, type
        ),
        d AS (
            INSERT INTO webhook_deliveries (event_id, endpoint_id, state)
            SELECT e.id, w.id, 'queued'
              FROM e JOIN x ON x.id = e.task_id
              JOIN webhook_endpoints AS w
                ON w.user_id = x.user_id AND w.enabled AND e.type = ANY(w.events)
            RETURNING id, event_id, endpoint_id
        )
        SELECT x.*, d.id AS delivery_id, d.endpoint_id
          FROM x LEFT JOIN e ON e.task_id = x.id LEFT JOIN d ON d.event_id = e.id
        """
    )


def outcome_event(status: Status, reason: str | None = None) -> tuple[str | None, str | None]:
    """(event type, data.reason) of a sender's outcome; a cancellation is a permanent failure unless
    the caller says otherwise."""
    if status == Status.SENT:
        return SENT, None
    if status == Status.FAILED:
        return DEFERRED, None
    if status == Status.CANCELLED:
        return CANCELLED, reason or PERMANENT_FAILURE
    return None, None


def deliveries(rows: Iterable[Any]) -> list[tuple[int, int]]:
    """(delivery id, endpoint id) of the deliveries a reported() statement created."""
    return [(r.delivery_id, r.endpoint_id) for r in rows if r.delivery_id is not None]


class Outbox:
    """Wakes the webhook workers for new deliveries (after their transaction committed)."""

    def __init__(self, client: redis.Redis):
        self.queue = SendQueue(client, queue.WEBHOOK_KEYS)

    def wake(self, created: Sequence[tuple[int, int]]) -> bool:
        """Queue each delivery's envelope; False if Redis refused (the sweep pushes them later)."""
        if not created:
            return True
        try:
            self.queue.route(
                (endpoint, delivery, queue.encode_delivery(delivery, endpoint))
                for delivery, endpoint in created
            )
            return True
        except redis.RedisError as exc:
            log.warning(
                "could not queue %d webhook delivery(ies) (%s); the sweep will",
                len(created),
                type(exc).__name__,
            )
            return False


# --- what a receiver gets -------------------------------------------------------------------------------


def new_secret() -> str:
    """A signing secret as Standard Webhooks spells it: whsec_ + base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(random_secrets.token_bytes(32)).decode()


def webhook_id(event_id: int) -> str:
    """The ``webhook-id`` of an event: the same for every attempt, endpoint and replay."""
    return f"msg_{event_id}"


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def body(event_type: str, created_at: datetime, data: dict[str, Any]) -> bytes:
    """The JSON body: type, timestamp and the task's data (never its body, never a credential)."""
    payload = {"type": event_type, "timestamp": rfc3339(created_at), "data": data}
    encoded = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
    if len(encoded) > MAX_PAYLOAD_BYTES:  # only oversized tags can do that: they are left out
        payload["data"] = {**data, "tags": {}, "tags_omitted": True}
        encoded = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
    return encoded


def signature(secret: str, msg_id: str, timestamp: int, payload: bytes) -> str:
    """``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`` with the secret's key bytes."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + payload, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def headers(msg_id: str, timestamp: int, payload: bytes, secrets: Sequence[str]) -> dict[str, str]:
    """The Standard Webhooks headers; one signature per secret (two during a rotation's overlap)."""
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(signature(s, msg_id, timestamp, payload) for s in secrets),
    }
