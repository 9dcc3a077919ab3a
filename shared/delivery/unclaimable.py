"""What a sender does with an envelope whose claim found nothing: a duplicate, a task no longer queued,
one past its expires_at or without tries left (ended here: the sweep would, later), one whose account
was paused meanwhile (back to its queue, the tenant paused).
"""

from __future__ import annotations

import sqlalchemy as sa

from shared.db import on_the_row
from shared.domain import CancelReason, Status
from shared.fairqueue import Taken
from shared.tasks import events
from shared.workers import Outcome

# Why a claim found nothing (the rare path: duplicate envelope, no tries left, expired, account paused).
_WHY_SQL = sa.text(
    """
    SELECT t.status, t.try_count, t.try_count - t.budget_base >= :max_tries AS exhausted,
           t.expires_at <= now() AS expired, u.smtp_paused_at IS NOT NULL AS paused
      FROM tasks AS t JOIN users AS u ON u.id = t.user_id
     WHERE t.id = :id
    """
)


def _cancel_queued(condition: str) -> sa.TextClause:
    """Cancel the task while it is queued and ``condition`` holds (a constant of this module)."""
    return sa.text(
        f"""
    UPDATE tasks SET status = 'cancelled', last_error = :reason, lease_until = NULL,
                     next_attempt_at = now(), updated_at = now()
     WHERE id = :id AND {on_the_row(f"status = 'queued' AND {condition}")}
    RETURNING id, {events.hooked()}
    """
    )


# A queued task past its expires_at ends here (the sweep would, a little later).
_EXPIRED_SQL = _cancel_queued("expires_at <= now()")
EXPIRED = "expired: not sent before its expires_at"

# A queued task without tries left (MAX_TRY_COUNT was lowered) ends here instead of waiting forever.
_EXHAUSTED_SQL = _cancel_queued("try_count = :try_count")


class Unclaimable:
    """A part of the Sender: its engine, settings, metrics, outbox, fair queue and ``done``."""

    def _unclaimable(self, item: Taken, task_id: int) -> Outcome:
        cause, created = None, []
        with self.engine.begin() as conn:
            row = conn.execute(
                _WHY_SQL, {"id": task_id, "max_tries": self.settings.max_try_count}
            ).one_or_none()
            queued = row is not None and row.status == Status.QUEUED
            if queued and (row.expired or row.exhausted):
                if row.expired:
                    cause, statement, params = (
                        CancelReason.EXPIRED,
                        _EXPIRED_SQL,
                        {"id": task_id, "reason": EXPIRED},
                    )
                else:
                    reason = f"no tries left (MAX_TRY_COUNT is {self.settings.max_try_count})"
                    params = {"id": task_id, "try_count": row.try_count, "reason": reason}
                    cause, statement = CancelReason.TRIES_EXHAUSTED, _EXHAUSTED_SQL
                done = conn.execute(statement, params).one_or_none()
                if done is None:
                    cause = None
                elif done.hooked:
                    created = events.write(conn, [events.Report(task_id, events.CANCELLED, cause.value)])
        if cause is not None:
            self.metrics.cancel(cause)
            self.outbox.wake(created)
            self.done(item)
            return Outcome.CANCELLED
        if queued and row.paused:
            self.sendq.give_back(self.processing, item, task_id, pause=True)
            return Outcome.PAUSED
        self.done(item)  # a duplicate envelope, or a task that is no longer queued: nothing to send
        return Outcome.DROPPED
