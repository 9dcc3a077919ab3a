"""The sweep: one idempotent pass that puts back whatever fell through the cracks.

It re-enqueues due ``scheduled`` and ``failed`` tasks, ``queued`` tasks older than the leak
window, and ``processing`` tasks whose lease ran out; and it returns envelopes stranded in the
processing lists of workers whose heartbeat is gone. Two sweeps at once double nothing: rows are
taken with ``FOR UPDATE SKIP LOCKED`` and leave the due set as they are updated, and each stranded
envelope is moved by one atomic LMOVE.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import redis
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from shared import queue
from shared.config import Settings
from shared.sweep_sql import conditions, pending_work_sql
from shared.tasks import push

log = logging.getLogger("mailq.sweep")


@dataclass
class SweepReport:
    requeued: int = 0  # rows put back to queued (and pushed)
    cancelled: int = 0  # rows whose last try's worker died: no tries left
    rescued: int = 0  # envelopes returned from dead workers' processing lists
    dead_workers: int = 0
    push_failed: bool = False


def _requeue_sql(settings: Settings) -> sa.TextClause:
    # Each kind of due work is picked from its own index, oldest first, and locked; SKIP LOCKED lets
    # a second sweep take other rows instead of waiting. A processing row whose lease ran out on its
    # last allowed try has no tries left: it is cancelled here rather than sent an extra time.
    picks = " || ".join(
        f"ARRAY(SELECT id FROM tasks WHERE {where} ORDER BY {column} LIMIT :batch FOR UPDATE SKIP LOCKED)"
        for column, where in conditions(settings.sweep_leak_window)
    )
    return sa.text(
        f"""
        UPDATE tasks AS t
           SET status = CASE WHEN t.status = 'processing' AND t.try_count >= :max_tries
                             THEN 'cancelled' ELSE 'queued' END,
               last_error = CASE WHEN t.status = 'processing' AND t.try_count >= :max_tries
                                 THEN 'the worker sending the last try was lost (the mail may have gone out)'
                                 ELSE t.last_error END,
               next_attempt_at = now(),
               lease_until = NULL,
               updated_at = now()
         WHERE t.id = ANY({picks})
        RETURNING t.id, t.status
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


def sweep_once(settings: Settings, engine: Engine, client: redis.Redis) -> SweepReport:
    report = SweepReport()
    try:
        report.rescued, report.dead_workers = rescue_stranded(client)
    except redis.RedisError as exc:
        log.warning("sweep could not check workers: %s", type(exc).__name__)
        report.push_failed = True
    statement = _requeue_sql(settings)
    params = {"batch": settings.sweep_batch, "max_tries": settings.max_try_count}
    while True:
        with engine.begin() as conn:
            rows = conn.execute(statement, params).all()
        queued = [r.id for r in rows if r.status == "queued"]
        report.requeued += len(queued)
        report.cancelled += len(rows) - len(queued)
        if queued and not push(client, queued):
            # The rows stay queued; the next sweep after the leak window pushes them again.
            report.push_failed = True
            break
        if not rows:  # a put-back row never matches again, so this ends
            break
    if report.requeued or report.rescued or report.cancelled:
        log.info(
            "sweep: requeued %d, rescued %d envelope(s) from %d dead worker(s), cancelled %d",
            report.requeued,
            report.rescued,
            report.dead_workers,
            report.cancelled,
        )
    return report


def pending_work(settings: Settings, engine: Engine) -> int:
    """How many rows the next sweep would put back (the same query the KEDA ScaledJob runs)."""
    with engine.connect() as conn:
        return conn.execute(sa.text(pending_work_sql(settings.sweep_leak_window))).scalar_one()
