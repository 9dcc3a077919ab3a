"""Events: what happened to a task, written in the same transaction as the status change it reports.

Every UPDATE of tasks that makes a reportable change (the sender's outcome, its no-tries-left cancel,
the sweep's cancellations, a user's cancel) returns ``hooked()``: whether the task's user has an
enabled endpoint. For those rows, and only those, ``write()`` runs in the same transaction and
writes the event (if an endpoint is subscribed to its type) and one delivery per such endpoint, so the
outbox row exists exactly when the status change committed. A stale outcome that loses the fencing
check updates no row, so it reports nothing; a user without endpoints pays one index probe.

After the commit, ``Outbox.wake()`` puts the new deliveries' envelopes in their endpoints' queues; if
Redis refuses, the sweep pushes them later (the row is its own outbox, as with tasks). This module
also renders a delivery the way the Standard Webhooks spec says: the body, ``webhook-id``,
``webhook-timestamp`` and ``webhook-signature``.

    with engine.begin() as conn:
        row = conn.execute("UPDATE tasks … RETURNING id, " + hooked()).one_or_none()
        created = write(conn, [Report(row.id, CANCELLED, USER)]) if row and row.hooked else []
    Outbox(redis).wake(created)
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import secrets as random_secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis
import sqlalchemy as sa

from shared import queue
from shared.accounts import events as account_events
from shared.domain import CancelReason, Status
from shared.fairqueue import SendQueue

log = logging.getLogger("mailq.events")

SENT, DEFERRED, CANCELLED = "task.sent", "task.deferred", "task.cancelled"
# Every type an endpoint may subscribe to (shared.models checks the same list): a task's, and an
# account's (shared.accounts.events: paused, resumed, backing off).
EVENT_TYPES = (SENT, DEFERRED, CANCELLED, *account_events.TYPES)
# data.reason of task.cancelled: the one vocabulary the metrics' reason label uses too.
PERMANENT_FAILURE = CancelReason.PERMANENT_FAILURE.value
TRIES_EXHAUSTED = CancelReason.TRIES_EXHAUSTED.value
USER = CancelReason.USER.value
LOST_IN_FLIGHT = CancelReason.LOST_IN_FLIGHT.value
EXPIRED = CancelReason.EXPIRED.value
CANCEL_REASONS = tuple(r.value for r in CancelReason)
MAX_PAYLOAD_BYTES = 20 * 1024  # the promise; last_error is cut to MAX_ERROR in the event
MAX_ERROR = 2000
SECRET_PREFIX = "whsec_"


def tags_sql(task: str = "t") -> str:
    """The task's tags as the event reports them."""
    return f"{task}.tags"


def hooked(task: str = "tasks") -> str:
    """A RETURNING column for an UPDATE of tasks: does the task's user have an enabled endpoint? Only
    then is write() called, so a user without endpoints pays one index probe and nothing else."""
    return f"{has_endpoint(task)} AS hooked"


def has_endpoint(task: str = "tasks") -> str:
    """The condition behind ``hooked()``: the task's user has an enabled endpoint."""
    return f"EXISTS (SELECT 1 FROM webhook_endpoints AS w WHERE w.user_id = {task}.user_id AND w.enabled)"


@dataclass(frozen=True)
class Report:
    """One status change to report: which task, as which event type, why, with what SMTP code."""

    task_id: int
    type: str
    reason: str | None = None
    smtp_code: int | None = None


# The events of the reported tasks, as their rows are now (in the transaction that changed them), for
# users with an enabled endpoint subscribed to the type; one delivery per such endpoint.
_WRITE_SQL = sa.text(
    f"""
    WITH x AS (
        SELECT t.id, t.user_id, v.type,
               jsonb_build_object(
                   'task_id', t.id, 'status', t.status, 'recipient_email', t.recipient_email,
                   'message_id', t.message_id, 'try_count', t.try_count,
                   'last_error', left(t.last_error, {MAX_ERROR}), 'smtp_code', v.code,
                   'next_attempt_at', CASE WHEN t.status = 'failed' THEN t.next_attempt_at END,
                   'tags', {tags_sql("t")})
               || CASE WHEN v.reason IS NULL THEN CAST('{{}}' AS jsonb)
                       ELSE jsonb_build_object('reason', v.reason) END AS data
          FROM unnest(CAST(:ids AS bigint[]), CAST(:types AS text[]), CAST(:reasons AS text[]),
                      CAST(:codes AS integer[])) AS v(id, type, reason, code)
          JOIN tasks AS t ON t.id = v.id
         WHERE EXISTS (SELECT 1 FROM webhook_endpoints AS w
                        WHERE w.user_id = t.user_id AND w.enabled AND v.type = ANY(w.events))
    ),
    e AS (
        INSERT INTO webhook_events (task_id, type, data)
        SELECT id, type, data FROM x
        RETURNING id, task_id, type
    )
    INSERT INTO webhook_deliveries (event_id, endpoint_id, state)
    SELECT e.id, w.id, 'queued'
      FROM e JOIN x ON x.id = e.task_id
      JOIN webhook_endpoints AS w ON w.user_id = x.user_id AND w.enabled AND e.type = ANY(w.events)
    RETURNING id, endpoint_id
    """
)


def write(conn, reports: Sequence[Report]) -> list[tuple[int, int]]:
    """Write the events of ``reports`` and their deliveries in the caller's transaction: the one whose
    UPDATE made the status changes (and returned ``hooked`` true for these tasks). A stale outcome
    updated nothing, so it has nothing to report. Returns (delivery id, endpoint id) of the new
    deliveries, for Outbox.wake() after the commit."""
    if not reports:
        return []
    params = {
        "ids": [r.task_id for r in reports],
        "types": [r.type for r in reports],
        "reasons": [r.reason for r in reports],
        "codes": [r.smtp_code for r in reports],
    }
    return [(r.id, r.endpoint_id) for r in conn.execute(_WRITE_SQL, params)]


def outcome_event(status: Status, reason: str | None = None) -> tuple[str | None, str | None]:
    """(event type, data.reason) of a sender's outcome; a cancellation is a permanent failure unless
    the caller says otherwise."""
    if status == Status.SENT:
        return SENT, None
    if status == Status.FAILED:
        return DEFERRED, None
    if status == Status.CANCELLED:
        return CANCELLED, str(reason) if reason else PERMANENT_FAILURE
    return None, None


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
