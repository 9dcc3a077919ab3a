"""Account events: what happened to an account's standing with its relay, reported by webhook like a
task's events (``shared.tasks.events``: the same outbox tables, delivery worker and signature).

- ``account.paused``: its mail waits until its settings change (credentials refused, a password no key
  decrypts, a server that cannot be used as configured); ``data.reason`` says which.
- ``account.resumed``: new settings (or a key found again) let its mail go out again.
- ``account.backing_off``: its relay refused the account (unreachable, throttling, a quota); sent once
  per episode, at its start; ``data.until`` is the first retry. A success ends the episode.

The event row names the user (``webhook_events.user_id``, no task) and is written, with one delivery per
enabled endpoint subscribed to its type, in the transaction that changes the account; ``wake`` queues
the deliveries after the commit (the sweep does it later when Redis refuses).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import redis
import sqlalchemy as sa

from shared import queue
from shared.fairqueue import SendQueue

log = logging.getLogger("mailq.events")

PAUSED, RESUMED, BACKING_OFF = "account.paused", "account.resumed", "account.backing_off"
TYPES = (PAUSED, RESUMED, BACKING_OFF)

_WRITE_SQL = sa.text(
    """
    WITH e AS (
        INSERT INTO webhook_events (user_id, type, data)
        SELECT :user_id, :type, CAST(:data AS jsonb)
         WHERE EXISTS (SELECT 1 FROM webhook_endpoints AS w
                        WHERE w.user_id = :user_id AND w.enabled AND :type = ANY(w.events))
        RETURNING id, type
    )
    INSERT INTO webhook_deliveries (event_id, endpoint_id, state)
    SELECT e.id, w.id, 'queued'
      FROM e JOIN webhook_endpoints AS w ON w.user_id = :user_id AND w.enabled AND e.type = ANY(w.events)
    RETURNING id, endpoint_id
    """
)


def data(user_id: int, state: str, reason: str | None, detail: str | None, **times: datetime | None) -> dict:
    """An account event's ``data``: the account, its state, why, and when (``since``, ``until``)."""
    body: dict[str, Any] = {"user_id": user_id, "state": state, "reason": reason, "detail": detail}
    for name, moment in times.items():
        body[name] = _iso(moment)
    return body


def write(conn, user_id: int, event_type: str, body: dict[str, Any]) -> list[tuple[int, int]]:
    """Write one account event and its deliveries in the caller's transaction; returns (delivery id,
    endpoint id) of the deliveries for ``wake`` after the commit (none without a subscribed endpoint)."""
    params = {"user_id": user_id, "type": event_type, "data": json.dumps(body)}
    return [(r.id, r.endpoint_id) for r in conn.execute(_WRITE_SQL, params)]


def wake(client: redis.Redis, created: Sequence[tuple[int, int]]) -> None:
    """Queue the deliveries' envelopes (after the commit); if Redis refuses, the sweep pushes them."""
    if not created:
        return
    try:
        SendQueue(client, queue.WEBHOOK_KEYS).route(
            (endpoint, delivery, queue.encode_delivery(delivery, endpoint)) for delivery, endpoint in created
        )
    except redis.RedisError as exc:
        log.warning("could not queue %d account event delivery(ies) (%s)", len(created), type(exc).__name__)


def _iso(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
