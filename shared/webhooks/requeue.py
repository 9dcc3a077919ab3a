"""Webhook deliveries that fell through the cracks, put back: the sweep's share of webhooks, which
every running webhook worker also does once a second (so a retry is not late by a sweep's interval).

- retries that came due (``scheduled`` past ``next_attempt_at``) are queued;
- ``queued`` deliveries whose envelope was lost (older than SWEEP_LEAK_WINDOW) are pushed again, into
  their endpoint's queue, where an envelope still waiting is not added twice;
- ``sending`` deliveries whose worker died (lease run out) are queued again, or failed when that was
  their last attempt;
- envelopes a stopped or dead worker left in WEBHOOK_RETURNED go back into their endpoints' queues.

Each kind is read from its own partial index (shared.pending), locked with SKIP LOCKED: two passes
at once take different rows, and a row put back never matches again.
"""

from __future__ import annotations

import logging

import redis
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from shared import queue
from shared.config import Settings
from shared.errors import EnvelopeDecodeError
from shared.fairqueue import SendQueue
from shared.pending import delivery_conditions

log = logging.getLogger("mailq.webhooks")


def _requeue_sql(settings: Settings) -> sa.TextClause:
    """Retries due, envelopes lost, leases run out: queued again (or failed when no attempt is left),
    each kind from its own partial index, locked so two sweeps take different rows."""
    picks = " || ".join(
        "ARRAY(SELECT id FROM webhook_deliveries"
        f" WHERE {where} ORDER BY {column} LIMIT :batch FOR UPDATE SKIP LOCKED)"
        for column, where in delivery_conditions(settings.sweep_leak_window)
    )
    spent = "d.state = 'sending' AND d.attempts >= :max_attempts"
    return sa.text(
        f"""
        UPDATE webhook_deliveries AS d
           SET state = CASE WHEN {spent} THEN 'failed' ELSE 'queued' END,
               last_error = CASE WHEN d.state = 'sending'
                                 THEN 'the webhook worker was lost during the attempt'
                                 ELSE d.last_error END,
               next_attempt_at = now(), lease_until = NULL, updated_at = now()
         WHERE d.id = ANY({picks})
        RETURNING d.id, d.endpoint_id, d.state
        """
    )


def requeue_due(settings: Settings, engine: Engine, fairq: SendQueue) -> int:
    """Queue every delivery that is due again (see _requeue_sql); returns how many rows it changed.

    Idempotent and safe to run from several processes at once (the sweep and every webhook worker)."""
    statement = _requeue_sql(settings)
    params = {"batch": settings.sweep_batch, "max_attempts": settings.webhook_max_attempts}
    changed = 0
    while True:
        with engine.begin() as conn:
            rows = conn.execute(statement, params).all()
        changed += len(rows)
        queued = [
            (r.endpoint_id, r.id, queue.encode_delivery(r.id, r.endpoint_id))
            for r in rows
            if r.state == "queued"
        ]
        if queued:
            fairq.route(queued)  # a RedisError leaves them queued: pushed again after the leak window
        if not rows:  # a queued-again row never matches again, so this ends
            return changed


def reroute_returned(fairq: SendQueue, batch: int = 500) -> int:
    """Put the envelopes in WEBHOOK_RETURNED (a stopped or dead worker's) back in their endpoints'
    queues; each batch is moved by one atomic script. Returns how many."""
    moved = 0
    while raws := fairq.redis.lrange(queue.WEBHOOK_RETURNED, 0, batch - 1):
        items = []
        for raw in raws:
            try:
                delivery, endpoint = queue.decode_delivery(raw)
            except EnvelopeDecodeError:
                continue  # released below with the rest: a malformed envelope is dropped
            items.append((endpoint, delivery, raw))
        fairq.route(items, processing=queue.WEBHOOK_RETURNED, release=raws)
        moved += len(items)
    return moved


def sweep_deliveries(settings: Settings, engine: Engine, client: redis.Redis) -> int:
    """The sweep's share of webhooks: rescued envelopes back in their queues, due deliveries queued."""
    fairq = SendQueue(client, queue.WEBHOOK_KEYS)
    try:
        reroute_returned(fairq)
    except redis.RedisError as exc:
        log.warning("sweep could not put webhook envelopes back: %s", type(exc).__name__)
    try:
        return requeue_due(settings, engine, fairq)
    except redis.RedisError as exc:
        log.warning("sweep could not queue due webhook deliveries: %s", type(exc).__name__)
        return 0
