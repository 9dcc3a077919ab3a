"""The sweep: one idempotent pass that puts back whatever fell through the cracks.

It cancels mail not sent by its ``expires_at`` (reason ``expired``), re-enqueues due ``scheduled`` and
``failed`` tasks, ``queued`` tasks older than the leak window, and ``processing`` tasks whose lease ran
out, straight into their tenants' queues (where an
envelope that is still waiting is not added twice, so a long backlog is not multiplied); it ends
any task without a try left (also one a lowered MAX_TRY_COUNT left behind); it returns envelopes
stranded in the processing lists of workers whose heartbeat is gone; it lets go of Redis pauses
that PostgreSQL no longer has; and it does the same for webhook deliveries (``shared.webhooks.worker``:
retries due, envelopes lost, leases run out). A cancellation writes its ``task.cancelled`` event in
the transaction that cancels (``shared.tasks.events``). Two sweeps at once double nothing: rows are taken with
``FOR UPDATE SKIP LOCKED`` and leave the due set as they are updated, and each stranded envelope is
moved by one atomic LMOVE.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import redis
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from shared import pace, queue
from shared.accounts import events as account_events
from shared.config import Settings
from shared.crypto import SecretBox
from shared.errors import ConfigError
from shared.fairqueue import SendQueue
from shared.maintenance.retention import purge_once
from shared.pending import EXPIRED, conditions, pending_work_sql
from shared.tasks import events
from shared.webhooks import requeue

log = logging.getLogger("mailq.sweep")

LOST_IN_FLIGHT = "the worker sending the last try was lost (the mail may have gone out)"
EXPIRED_REASON = "expired: not sent before its expires_at"

# Mail past its expires_at, oldest first, from its own index; SKIP LOCKED as the requeue's picks.
_EXPIRE_SQL = sa.text(
    f"""
    UPDATE tasks AS t
       SET status = 'cancelled', last_error = :reason, lease_until = NULL, next_attempt_at = now(),
           updated_at = now()
     WHERE t.id = ANY(ARRAY(SELECT id FROM tasks WHERE {EXPIRED[1]}
                             ORDER BY expires_at LIMIT :batch FOR UPDATE SKIP LOCKED))
    RETURNING t.id, {events.hooked("t")}
    """
)


@dataclass
class SweepReport:
    requeued: int = 0  # rows put back to queued (and pushed)
    cancelled: int = 0  # rows with no try left (the last try's worker died, or MAX_TRY_COUNT lowered)
    expired: int = 0  # rows cancelled because their expires_at passed (not counted in cancelled)
    lost_in_flight: int = 0  # of those, the ones whose last try's worker died (the mail may have gone out)
    resumed: int = 0  # tenants paused in Redis but no longer in PostgreSQL
    purged: int = 0  # tasks past TASK_RETENTION_DAYS deleted
    rescued: int = 0  # envelopes returned from dead workers' processing lists
    dead_workers: int = 0
    push_failed: bool = False
    deliveries: int = 0  # webhook deliveries put back in their endpoints' queues (or failed for good)


def _requeue_sql(settings: Settings) -> sa.TextClause:
    # Each kind of due work is picked from its own index, oldest first, and locked; SKIP LOCKED lets
    # a second sweep take other rows instead of waiting. A row without a try left is cancelled here
    # rather than sent an extra time: a processing one whose worker died during its last try (a try
    # counts from its claim, made just before the attempt), or any row a lowered MAX_TRY_COUNT left
    # with none.
    picks = " || ".join(
        f"ARRAY(SELECT id FROM tasks WHERE {where} ORDER BY {column} LIMIT :batch FOR UPDATE SKIP LOCKED)"
        for column, where in conditions(settings.sweep_leak_window)
    )
    exhausted = "t.try_count - t.budget_base >= :max_tries"
    return sa.text(
        f"""
        UPDATE tasks AS t
           SET status = CASE WHEN {exhausted} THEN 'cancelled' ELSE 'queued' END,
               last_error = CASE
                   WHEN {exhausted} AND t.status = 'processing' THEN :lost
                   WHEN {exhausted}
                   THEN 'no tries left (MAX_TRY_COUNT is ' || CAST(:max_tries AS text) || ')'
                   ELSE t.last_error END,
               next_attempt_at = now(),
               lease_until = NULL,
               updated_at = now()
         WHERE t.id = ANY({picks})
        RETURNING t.id, t.user_id, t.status, t.last_error = :lost AS lost, {events.hooked("t")}
        """
    )


def rescue_stranded(client: redis.Redis) -> tuple[int, int]:
    """Return envelopes held by workers whose heartbeat expired. Returns (envelopes, workers)."""
    rescued = dead = 0
    for raw_id, raw_source in client.hgetall(queue.WORKERS).items():
        worker_id, source = raw_id.decode(), raw_source.decode()
        if client.exists(queue.heartbeat_key(worker_id)):
            continue
        dead += 1
        processing = queue.processing_list(worker_id)
        while client.lmove(processing, source, "LEFT", "RIGHT") is not None:
            rescued += 1
        client.hdel(queue.WORKERS, worker_id)
    return rescued, dead


def resume_unpaused(engine: Engine, sendq: SendQueue) -> int:
    """Resume tenants paused in Redis whose account PostgreSQL no longer has paused (the update that
    resumed them could not reach Redis). Returns how many."""
    paused = sendq.paused()
    if not paused:
        return 0
    with engine.connect() as conn:
        still = set(
            conn.execute(
                sa.text(
                    "SELECT id FROM users"
                    " WHERE id = ANY(CAST(:ids AS bigint[])) AND smtp_paused_at IS NOT NULL"
                ),
                {"ids": sorted(paused)},
            ).scalars()
        )
    for tenant in paused - still:
        sendq.resume(tenant)
    return len(paused - still)


_KEY_PAUSED_SQL = sa.text(
    "SELECT id, smtp_password_enc FROM users WHERE smtp_paused_at IS NOT NULL AND smtp_paused_code = 'key'"
    " ORDER BY id LIMIT 100"
)
# Only while the password is still the one that could not be read (the user may have set a new one).
_UNPAUSE_SQL = sa.text(
    """
    UPDATE users SET smtp_paused_at = NULL, smtp_paused_reason = NULL, smtp_paused_code = NULL
     WHERE id = :id AND smtp_paused_code = 'key' AND smtp_password_enc = :token
    RETURNING id, now() AS at
    """
)


def resume_decryptable(settings: Settings, engine: Engine, client: redis.Redis) -> int:
    """Resume accounts paused because no key decrypted their SMTP password, now that one does (an
    operator restored the key). Returns how many."""
    if not settings.encryption_keys:
        return 0
    box = SecretBox(settings.encryption_keys)
    with engine.connect() as conn:
        paused = conn.execute(_KEY_PAUSED_SQL).all()
    resumed = 0
    for row in paused:
        try:
            box.decrypt(row.smtp_password_enc)
        except ConfigError:
            continue
        with engine.begin() as conn:
            done = conn.execute(_UNPAUSE_SQL, {"id": row.id, "token": row.smtp_password_enc}).one_or_none()
            body = account_events.data(row.id, "active", "key", None, since=done.at) if done else None
            created = account_events.write(conn, row.id, account_events.RESUMED, body) if done else []
        if done is None:
            continue
        account_events.wake(client, created)
        pace.Pace(client).resume(row.id)
        SendQueue(client).resume(row.id)
        log.info("sweep: account %d resumed: its SMTP password can be decrypted again", row.id)
        resumed += 1
    return resumed


def sweep_once(settings: Settings, engine: Engine, client: redis.Redis) -> SweepReport:
    report = SweepReport()
    sendq = SendQueue(client)
    try:
        report.rescued, report.dead_workers = rescue_stranded(client)
        report.resumed = resume_unpaused(engine, sendq) + resume_decryptable(settings, engine, client)
    except redis.RedisError as exc:
        log.warning("sweep could not check workers: %s", type(exc).__name__)
        report.push_failed = True
    report.expired = expire(settings, engine, client)
    statement = _requeue_sql(settings)
    params = {"batch": settings.sweep_batch, "max_tries": settings.max_try_count, "lost": LOST_IN_FLIGHT}
    outbox = events.Outbox(client)
    while True:
        with engine.begin() as conn:
            rows = conn.execute(statement, params).all()
            # A cancellation's task.cancelled event, in the transaction that cancelled the task.
            reports = [
                events.Report(
                    r.id, events.CANCELLED, events.LOST_IN_FLIGHT if r.lost else events.TRIES_EXHAUSTED
                )
                for r in rows
                if r.status == "cancelled" and r.hooked
            ]
            created = events.write(conn, reports)
        outbox.wake(created)
        queued = [(r.user_id, r.id, queue.encode(r.id)) for r in rows if r.status == "queued"]
        report.requeued += len(queued)
        report.cancelled += len(rows) - len(queued)
        report.lost_in_flight += sum(r.status == "cancelled" and r.lost for r in rows)
        if queued:
            try:
                sendq.route(queued)  # an envelope still waiting in its tenant's queue is not added twice
            except redis.RedisError as exc:
                # The rows stay queued; the next sweep after the leak window pushes them again.
                log.warning("sweep could not push %d envelope(s): %s", len(queued), type(exc).__name__)
                report.push_failed = True
                break
        if not rows:  # a put-back row never matches again, so this ends
            break
    report.purged = purge_once(settings, engine)
    report.deliveries = requeue.sweep_deliveries(settings, engine, client)
    if (
        report.requeued
        or report.rescued
        or report.cancelled
        or report.resumed
        or report.purged
        or report.expired
    ):
        log.info(
            "sweep: requeued %d, rescued %d envelope(s) from %d dead worker(s), cancelled %d, expired %d, "
            "resumed %d, purged %d",
            report.requeued,
            report.rescued,
            report.dead_workers,
            report.cancelled,
            report.expired,
            report.resumed,
            report.purged,
        )
    return report


def expire(settings: Settings, engine: Engine, client: redis.Redis) -> int:
    """Cancel the mail past its expires_at (task.cancelled, reason expired); returns how many."""
    outbox, total = events.Outbox(client), 0
    while True:
        with engine.begin() as conn:
            rows = conn.execute(_EXPIRE_SQL, {"batch": settings.sweep_batch, "reason": EXPIRED_REASON}).all()
            reports = [events.Report(r.id, events.CANCELLED, events.EXPIRED) for r in rows if r.hooked]
            created = events.write(conn, reports)
        outbox.wake(created)
        total += len(rows)
        if len(rows) < settings.sweep_batch:
            return total


def pending_work(settings: Settings, engine: Engine) -> int:
    """How many rows the next sweep would put back (the same query the KEDA ScaledJob runs)."""
    with engine.connect() as conn:
        sql = pending_work_sql(settings.sweep_leak_window, settings.task_retention_days)
        return conn.execute(sa.text(sql)).scalar_one()
