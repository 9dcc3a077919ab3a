"""Retention: tasks in a final state older than TASK_RETENTION_DAYS are deleted, in bounded batches.

A table that only grows is a slow outage: every index, every vacuum and every backup pays for mail
sent long ago. Mail services keep 30 to 45 days. The sweep runs one purge per pass (its KEDA trigger
counts expired rows too, so the job runs while any are left); each pass deletes at most
MAX_BATCHES_PER_PASS x SWEEP_BATCH rows, oldest first, from the ``tasks_retention`` index, with
``SKIP LOCKED`` so two sweeps never wait on each other. A task's content, tags, events and
deliveries and its attempt log go with it (foreign keys ON DELETE CASCADE); so does its
Idempotency-Key, which lives on the row; a batch enqueue's key (task_batches), a bulk action's
(task_bulk_requests) and an account's events (account.*, with their deliveries) expire after the same
number of days.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from shared.config import Settings
from shared.pending import FINAL_STATUSES

MAX_BATCHES_PER_PASS = 10  # a pass stays short; the next one (30 s later) goes on

# A batch enqueue's Idempotency-Key (task_batches) expires with the age of its tasks.
_PURGE_BATCHES_SQL = sa.text(
    """
    DELETE FROM task_batches
     WHERE ctid = ANY(ARRAY(SELECT ctid FROM task_batches
                             WHERE created_at < now() - make_interval(days => :days)
                             ORDER BY created_at LIMIT :batch FOR UPDATE SKIP LOCKED))
    """
)

# So does a bulk action's (task_bulk_requests).
_PURGE_BULK_SQL = sa.text(
    """
    DELETE FROM task_bulk_requests
     WHERE ctid = ANY(ARRAY(SELECT ctid FROM task_bulk_requests
                             WHERE created_at < now() - make_interval(days => :days)
                             ORDER BY created_at LIMIT :batch FOR UPDATE SKIP LOCKED))
    """
)

# Account events (no task to go with) expire with the age of tasks, from their own partial index.
_PURGE_ACCOUNT_EVENTS_SQL = sa.text(
    """
    DELETE FROM webhook_events
     WHERE id = ANY(ARRAY(SELECT id FROM webhook_events
                           WHERE task_id IS NULL AND created_at < now() - make_interval(days => :days)
                           ORDER BY created_at LIMIT :batch FOR UPDATE SKIP LOCKED))
    """
)

_PURGE_SQL = sa.text(
    f"""
    DELETE FROM tasks
     WHERE id = ANY(ARRAY(SELECT id FROM tasks
                           WHERE {FINAL_STATUSES} AND updated_at < now() - make_interval(days => :days)
                           ORDER BY updated_at LIMIT :batch FOR UPDATE SKIP LOCKED))
    """
)


def purge_once(settings: Settings, engine: Engine) -> int:
    """Delete up to MAX_BATCHES_PER_PASS batches of expired tasks; return how many were deleted."""
    days = settings.task_retention_days
    if days <= 0:
        return 0
    deleted = 0
    params = {"days": days, "batch": settings.sweep_batch}
    for _ in range(MAX_BATCHES_PER_PASS):
        with engine.begin() as conn:
            count = conn.execute(_PURGE_SQL, params).rowcount
        deleted += count
        if count < settings.sweep_batch:
            break
    with engine.begin() as conn:
        conn.execute(_PURGE_BATCHES_SQL, params)
        conn.execute(_PURGE_BULK_SQL, params)
        conn.execute(_PURGE_ACCOUNT_EVENTS_SQL, params)
    return deleted
