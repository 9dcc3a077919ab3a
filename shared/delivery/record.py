"""What an attempt came to, written behind the fencing token, with its line in the attempt log
(``task_attempts``) in the same statement.

- **The try count is the fencing token.** An outcome lands only while nobody has claimed the task since
  (``WHERE try_count = <ours>``); a stale one writes nothing, its log line included.
- **A plain sent mail is still one statement** (shared.prepared): the outcome's UPDATE and the log
  line's INSERT are one statement (a CTE), as the UPDATE alone was.
- **A claim given back spends no try**: the budget moves up by one instead (the count never goes down);
  when the relay refused the account after the claim, its log line says so (``waiting``, not spent).
- **A wait before any claim** (the relay refused the account while the connection opened) is logged on
  the task the sender held, once per task and episode: the same line counts the repeats.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa

from shared.db import on_the_row
from shared.domain import CancelReason, Status
from shared.prepared import alone, run_alone
from shared.tasks import events
from shared.workers import Outcome, dependency_of

log = logging.getLogger("mailq.sender")

MAX_REPLY = 500  # characters of a server's reply kept in the log line (last_error keeps 1000)

_LOG_COLUMNS = (
    "task_id, user_id, try_count, spent, started_at, finished_at, duration_ms, server, stage, smtp_code, "
    "reply, refused, outcome, reason"
)
_LOG_VALUES = (
    "COALESCE(CAST(:started AS timestamptz), now()), now(), :duration, :server, :stage, :code, :reply, "
    "CAST(:refused AS jsonb), :outcome, :account_reason"
)

# The try count is the fencing token: an outcome lands only while nobody has claimed the task since.
# 'queued' is allowed too: had the sweep taken a lease back without anyone claiming the task again,
# what the server said is still the truth. Times come from PostgreSQL's clock. The event reporting the
# outcome is written in the same transaction, only when the UPDATE changed the row (shared.tasks.events).
_OUTCOME_UPDATE = f"""
    UPDATE tasks
       SET status = :status, last_error = :last_error,
           next_attempt_at = now() + make_interval(secs => :delay),
           lease_until = NULL,
           sent_at = CASE WHEN CAST(:status AS text) = 'sent' THEN now() END,
           updated_at = now()
     WHERE id = :id AND {on_the_row("try_count = :try_count AND status IN ('processing', 'queued')")}
"""  # noqa: S608 - constants
_OUTCOME_SQL = sa.text(
    f"""
    WITH o AS ({_OUTCOME_UPDATE} RETURNING id, user_id, try_count, {events.hooked()}),
    logged AS (INSERT INTO task_attempts ({_LOG_COLUMNS})
               SELECT id, user_id, try_count, true, {_LOG_VALUES} FROM o)
    SELECT id, hooked FROM o
    """  # noqa: S608 - constants
)
# The common case, a user without webhook endpoints, in one statement that is its own transaction
# (shared.prepared): there is no event to write with it, and the condition makes sure of that at the
# moment of the write. No row means an endpoint appeared since the claim or the outcome is stale:
# _OUTCOME_SQL in a transaction then tells which, and writes the event.
_QUIET_OUTCOME_SQL = alone(
    sa.text(
        f"""
    WITH o AS ({_OUTCOME_UPDATE}   AND NOT {events.has_endpoint()}
    RETURNING id, user_id, try_count)
    INSERT INTO task_attempts ({_LOG_COLUMNS}) SELECT id, user_id, try_count, true, {_LOG_VALUES} FROM o
    RETURNING task_id AS id
    """  # noqa: S608 - constants
    )
)

# Gives a claim back without spending a try: the budget moves up by one (the count never goes down).
_REFUND_UPDATE = f"""
    UPDATE tasks SET status = 'queued', budget_base = budget_base + 1, lease_until = NULL,
                     last_error = COALESCE(CAST(:reason AS text), last_error),
                     next_attempt_at = now(), updated_at = now()
     WHERE id = :id AND {on_the_row("try_count = :try_count AND status IN ('processing', 'queued')")}
    """  # noqa: S608 - constants
_REFUND_SQL = sa.text(_REFUND_UPDATE)
# ... and, when the relay refused the account after the claim, its line in the log (no try spent).
_REFUND_LOGGED_SQL = sa.text(
    f"""
    WITH o AS ({_REFUND_UPDATE} RETURNING id, user_id, try_count)
    INSERT INTO task_attempts ({_LOG_COLUMNS}) SELECT id, user_id, try_count, false, {_LOG_VALUES} FROM o
    """  # noqa: S608 - constants
)

# A wait met before any claim: one line per task and episode (``since``), counting its repeats.
_WAIT_SQL = sa.text(
    f"""
    WITH open AS (
        UPDATE task_attempts
           SET finished_at = now(), repeats = repeats + 1, server = :server, stage = :stage,
               smtp_code = :code, reply = :reply, reason = :account_reason
         WHERE id = (SELECT id FROM task_attempts
                      WHERE task_id = :id AND try_count IS NULL AND outcome = :outcome
                        AND started_at >= CAST(:since AS timestamptz)
                      ORDER BY id DESC LIMIT 1)
        RETURNING id
    )
    INSERT INTO task_attempts ({_LOG_COLUMNS})
    SELECT t.id, t.user_id, NULL, false, now(), now(), NULL, :server, :stage, :code, :reply, NULL, :outcome,
           :account_reason
      FROM tasks AS t
     WHERE t.id = :id AND t.status = 'queued' AND NOT EXISTS (SELECT 1 FROM open)
    """  # noqa: S608 - constants
)

_REFUSED = re.compile(r"^<(?P<recipient>[^>]*)> (?P<code>\d{3}) ?(?P<reply>.*)$")


@dataclass(frozen=True)
class Seen:
    """What one conversation got to, for its line in the attempt log."""

    server: str | None = None  # host:port
    stage: str | None = None  # how far it got: connect, greeting, EHLO, STARTTLS, AUTH, MAIL FROM, …
    code: int | None = None  # the server's last reply code
    reply: str | None = None  # and its text (no secret: the mailer's messages hold none)
    refused: tuple[str, ...] = ()  # recipients refused for good while the others got it
    reason: str | None = None  # an account's reason (AccountReason, PauseReason) when it waits

    def params(self, started: datetime | None, duration: float | None, outcome: str) -> dict:
        refused = [m.groupdict() | {"code": int(m["code"])} for r in self.refused if (m := _REFUSED.match(r))]
        return {
            "started": started,
            "duration": None if duration is None else int(duration * 1000),
            "server": self.server,
            "stage": self.stage,
            "code": self.code,
            "reply": (self.reply or "")[:MAX_REPLY] or None,
            "refused": json.dumps(refused) if refused else None,
            "outcome": outcome,
            "account_reason": self.reason,
        }


_LOGGED_AS = {Status.SENT: "sent", Status.FAILED: "deferred", Status.CANCELLED: "cancelled"}


class Record:
    """Writing outcomes. A part of the Sender (its engine, settings, clocks, metrics, outbox, stopping)."""

    def record(
        self,
        claim,
        status: Status,
        error: str | None,
        *,
        delay: float = 0.0,
        code: int | None = None,
        cause: CancelReason | None = None,
        seen: Seen | None = None,
    ) -> Outcome:
        """Write the outcome, the event reporting it and its line in the attempt log, behind the fencing
        token; a short PostgreSQL outage is waited out. ``code`` is the SMTP reply code; ``cause`` why a
        cancellation happened (the event's reason and the metrics' label)."""
        event_type, event_reason = events.outcome_event(status, cause)
        report = events.Report(claim.id, event_type, event_reason, code)
        seen = seen or Seen(code=code, reply=error)
        params = {
            "id": claim.id,
            "try_count": claim.try_count,
            "status": status.value,
            "last_error": error,
            "delay": delay,
            **seen.params(claim.started, self._took(claim), _LOGGED_AS[status]),
        }
        # A lost "sent" means a resend, so keep trying while PostgreSQL is briefly unavailable; the
        # fencing token keeps a late write harmless.
        deadline = time.monotonic() + max(30.0, self.settings.lease_seconds)
        while True:
            try:
                row, created = None, []
                if not claim.hooked:
                    quiet = run_alone(self.engine, _QUIET_OUTCOME_SQL, params)
                    row = quiet[0] if quiet else None
                if row is None:
                    with self.engine.begin() as conn:
                        row = conn.execute(_OUTCOME_SQL, params).one_or_none()
                        created = events.write(conn, [report]) if row is not None and row.hooked else []
                break
            except Exception as exc:
                if not dependency_of(exc) or time.monotonic() > deadline or self.stopping.is_set():
                    raise
                log.warning(
                    "%s: recording task %d failed (%s); retrying", self.id, claim.id, type(exc).__name__
                )
                time.sleep(0.5)
        if row is None:
            self.metrics.stale.inc()
            log.warning("%s: task %d outcome %s discarded: claimed again since", self.id, claim.id, status)
            return Outcome.STALE
        self.outbox.wake(created)
        self.metrics.record_outcome(status, cause, claim.created_at, self.now())
        # A success per mail is DEBUG (it is the hot path); anything else is worth a line.
        level = logging.DEBUG if status == Status.SENT else logging.INFO
        log.log(
            level, "task %d try %d -> %s%s", claim.id, claim.try_count, status, f" ({error})" if error else ""
        )
        return Outcome(status.value)

    def refund(
        self, claim, reason: str | None, *, seen: Seen | None = None, outcome: str = "waiting"
    ) -> None:
        """Give the claim back without spending a try (its log line too, when ``seen``)."""
        params = {"id": claim.id, "try_count": claim.try_count, "reason": reason}
        try:
            with self.engine.begin() as conn:
                if seen is None:
                    conn.execute(_REFUND_SQL, params)
                else:
                    params |= seen.params(claim.started, self._took(claim), outcome)
                    conn.execute(_REFUND_LOGGED_SQL, params)
        except Exception as exc:  # noqa: BLE001 - the lease gives it back otherwise
            log.warning("%s: could not give task %d back (%s)", self.id, claim.id, type(exc).__name__)

    def note_wait(self, task_id: int, since: datetime, seen: Seen, outcome: str = "waiting") -> None:
        """The task this sender held waits for its account (nothing claimed): its line in the log,
        one per episode."""
        params = {"id": task_id, "since": since, **seen.params(None, None, outcome)}
        try:
            with self.engine.begin() as conn:
                conn.execute(_WAIT_SQL, params)
        except Exception as exc:  # noqa: BLE001 - a line of the log, not the mail's fate
            log.warning("%s: could not log task %d's wait (%s)", self.id, task_id, type(exc).__name__)

    def _took(self, claim) -> float | None:
        return None if not claim.claimed_at else max(0.0, self.clock() - claim.claimed_at)
