"""One attempt at one task, the sender's core: claim it just before its SMTP attempt, build the
mail, send it within a deadline, and record the outcome behind the fencing token.

- **A try counts when its attempt starts.** A task is claimed (``try_count + 1``) by the thread about
  to talk to its server, right before it does; nothing waits in a claimed batch behind a slow
  server, so nothing spends a try it never used.
- **A live sender keeps its lease.** The whole conversation must end within ``smtp_deadline`` (0.8 of
  the lease) after the claim; the mailer enforces it by shutting the socket down.
- **The try count is the fencing token.** The outcome lands only while nobody has claimed the task
  since (``WHERE try_count = <ours>``); a user's retry and a worker fault raise the separate budget
  (``budget_base``) instead of ever lowering the count.
- **Worker faults are not mail faults.** A missing decryption key or an unavailable PostgreSQL gives
  the task back without spending a try, and this sender backs off; a refused SMTP login pauses the
  account (its mail waits for new credentials) instead of letting every queued mail try again.

The Sender (shared.delivery.sender) takes the envelopes and runs the threads; ``Attempt`` is the part
of it that makes one try.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime

import redis
import sqlalchemy as sa

from shared.db import on_the_row
from shared.delivery.inflight import INLINE_BYTES
from shared.delivery.message import compose
from shared.delivery.smtp import SmtpAccount
from shared.domain import CancelReason, SmtpSecurity, Status
from shared.errors import ConfigError, PermanentSmtpError, SmtpAuthError, SmtpError, TransientSmtpError
from shared.fairqueue import Taken
from shared.prepared import alone, run_alone
from shared.tasks import events
from shared.tasks.storage import attachments_of
from shared.workers import Outcome, backoff_seconds, dependency_of

log = logging.getLogger("mailq.sender")


@dataclass(frozen=True)
class Claim:
    id: int
    user_id: int
    try_count: int
    budget_base: int
    recipient_email: str
    subject: str
    body: str | None
    message_id: str
    created_at: datetime
    sender_email: str
    smtp_host: str
    smtp_port: int
    smtp_username: str
    smtp_password_enc: str
    smtp_security: str
    account_version: datetime  # users.updated_at: a pause applies only to the credentials we used
    # What the mail carries beyond the seed's fields (task_contents). A large mail (content_bytes over
    # shared.delivery.inflight.INLINE_BYTES) comes without its body, HTML and attachment bytes: they are read
    # once this sender has room for them (not loaded yet).
    content_bytes: int = 0
    loaded: bool = True
    html: str | None = None
    from_name: str | None = None
    recipient_name: str | None = None
    cc: list[str] | None = None
    bcc: list[str] | None = None
    reply_to: str | None = None
    headers: list[list[str]] | None = None
    attachments: list[dict] | None = None  # filename, content_type, size
    attachment_data: bytes | None = None
    hooked: bool = False  # the user had an enabled webhook endpoint at the claim
    claimed_at: float = 0.0  # the sender's clock at the claim: the conversation's deadline counts from it

    @property
    def tries_used(self) -> int:
        return self.try_count - self.budget_base


# The claim is the start of an attempt: it spends a try and takes the lease, only while the task is
# queued (a duplicate envelope finds nothing), has a try left, and its account is not paused. It
# brings the mail's content along in the same statement (a plain mail has no task_contents row),
# except a large mail's body, HTML and attachment bytes (shared.delivery.inflight).
_CONTENT_BYTES = (
    "(COALESCE(octet_length(t.body), 0) + COALESCE(octet_length(c.html), 0)"
    " + COALESCE(octet_length(c.attachment_data), 0))"
)
_CLAIM_SQL = alone(
    sa.text(
        f"""
    UPDATE tasks AS t
       SET status = 'processing',
           try_count = t.try_count + 1,
           lease_until = now() + make_interval(secs => :lease),
           updated_at = now()
      FROM users AS u LEFT JOIN task_contents AS c ON c.task_id = :id
     WHERE t.id = :id AND {on_the_row("t.status = 'queued' AND t.try_count - t.budget_base < :max_tries")}
       AND u.id = t.user_id AND u.smtp_paused_at IS NULL
 RETURNING t.id, t.user_id, t.try_count, t.budget_base, t.recipient_email, t.subject,
           t.message_id, t.created_at, u.email AS sender_email, u.smtp_host, u.smtp_port,
           u.smtp_username, u.smtp_password_enc, u.smtp_security, u.updated_at AS account_version,
           {_CONTENT_BYTES} AS content_bytes, {_CONTENT_BYTES} <= :inline AS loaded,
           CASE WHEN {_CONTENT_BYTES} <= :inline THEN t.body END AS body,
           CASE WHEN {_CONTENT_BYTES} <= :inline THEN c.html END AS html,
           c.from_name, c.recipient_name, c.cc, c.bcc, c.reply_to, c.headers, c.attachments,
           CASE WHEN {_CONTENT_BYTES} <= :inline THEN c.attachment_data END AS attachment_data,
           {events.has_endpoint("t")} AS hooked
    """  # noqa: S608 - _CONTENT_BYTES is a constant
    )
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
"""
_OUTCOME_SQL = sa.text(f"{_OUTCOME_UPDATE} RETURNING id, {events.hooked()}")
# The common case, a user without webhook endpoints, in one statement that is its own transaction
# (shared.prepared): there is no event to write with it, and the condition makes sure of that at the
# moment of the write. No row means an endpoint appeared since the claim or the outcome is stale:
# _OUTCOME_SQL in a transaction then tells which, and writes the event.
_QUIET_OUTCOME_SQL = alone(
    sa.text(f"{_OUTCOME_UPDATE}   AND NOT {events.has_endpoint()}\n    RETURNING id")  # noqa: S608 - constants
)

# Gives a claim back without spending a try: the budget moves up by one (the count never goes down).
_REFUND_SQL = sa.text(
    f"""
    UPDATE tasks SET status = 'queued', budget_base = budget_base + 1, lease_until = NULL,
                     last_error = COALESCE(CAST(:reason AS text), last_error),
                     next_attempt_at = now(), updated_at = now()
     WHERE id = :id AND {on_the_row("try_count = :try_count AND status IN ('processing', 'queued')")}
    """
)

# Only if the credentials are still the ones that were refused (the user may have fixed them since).
_PAUSE_SQL = sa.text(
    """
    UPDATE users SET smtp_paused_at = COALESCE(smtp_paused_at, now()), smtp_paused_reason = :reason
     WHERE id = :user_id AND updated_at = :version
    """
)


class Attempt:
    """Claim, send and record one task. A part of the Sender: it uses the worker's engine, settings,
    clocks, rng, metrics, mailer, secret box, memory budget (inflight), fair queue and outbox, and its
    envelope handling (``done``, ``fault``, ``_give_back_quietly``)."""

    def claim(self, task_id: int) -> Claim | None:
        """Spend a try and take the lease, if the task is still queued with a try left."""
        params = {
            "id": task_id,
            "lease": self.settings.lease_seconds,
            "max_tries": self.settings.max_try_count,
            "inline": INLINE_BYTES,
        }
        rows = run_alone(self.engine, _CLAIM_SQL, params)  # one statement: its own transaction
        return Claim(**rows[0]._asdict(), claimed_at=self.clock()) if rows else None

    def attempt(self, claim: Claim, item: Taken | None = None) -> Outcome:
        """Send a claimed task and record what happened; no transaction is open while SMTP talks.

        ``item`` is the envelope it came with, given back on a worker fault or a pause."""
        if not claim.loaded:  # a large mail: it waits for room in this sender, then reads its content
            return self._attempt_in_room(claim, item)
        deadline = (claim.claimed_at or self.clock()) + self.settings.smtp_deadline
        try:
            password = self.box.decrypt(claim.smtp_password_enc)  # decrypted here, only for this send
        except ConfigError as exc:
            log.error(
                "%s: WORKER FAULT: %s (account %d); task %d given back without spending a try",
                self.id,
                exc,
                claim.user_id,
                claim.id,
            )
            return self._give_back_claim(claim, item, None)
        try:
            outgoing = compose(
                sender=claim.sender_email,
                recipient=claim.recipient_email,
                subject=claim.subject,
                body=claim.body,
                message_id=claim.message_id,
                date=claim.created_at,  # the mail's origination date: the same on every try (delivery/raw.py)
                html=claim.html,
                from_name=claim.from_name,
                recipient_name=claim.recipient_name,
                cc=claim.cc or (),
                reply_to=claim.reply_to,
                headers=[tuple(h) for h in claim.headers or ()],
                attachments=attachments_of(claim.attachments, claim.attachment_data),
                bcc=tuple(claim.bcc or ()),
            )
        except PermanentSmtpError as exc:  # no From or To address to put on the envelope
            return self.record(claim, Status.CANCELLED, _reason(exc), cause=CancelReason.PERMANENT_FAILURE)
        except Exception as exc:  # the task's own content: no try will do better
            reason = f"the mail cannot be built: {exc}"[:1000]
            return self.record(claim, Status.CANCELLED, reason, cause=CancelReason.PERMANENT_FAILURE)
        account = SmtpAccount(
            host=claim.smtp_host,
            port=claim.smtp_port,
            username=claim.smtp_username,
            password=password,
            security=SmtpSecurity(claim.smtp_security),
        )
        try:
            with self.metrics.smtp_seconds.time():
                accepted = self.mailer.send(account, outgoing, deadline=deadline)
        except SmtpAuthError as exc:
            return self._pause(claim, item, _reason(exc))
        except TransientSmtpError as exc:
            return self._transient(claim, _reason(exc), exc.code)
        except (PermanentSmtpError, SmtpError) as exc:
            return self.record(
                claim, Status.CANCELLED, _reason(exc), code=exc.code, cause=CancelReason.PERMANENT_FAILURE
            )
        except Exception as exc:  # a bug must not loop forever: a try spent, bounded by the budget
            log.exception("%s: task %d could not be sent", self.id, claim.id)
            return self._transient(claim, f"internal error: {type(exc).__name__}")
        return self.record(claim, Status.SENT, _refused(accepted))

    def _attempt_in_room(self, claim: Claim, item: Taken | None) -> Outcome:
        # Half the conversation's time at most; the other half is left for SMTP.
        wait = max(0.0, claim.claimed_at + self.settings.smtp_deadline / 2 - self.clock())
        try:
            entered = self.inflight.enter(claim, wait)
        except Exception as exc:  # PostgreSQL gone while reading the content: a worker fault
            log.warning("%s: reading task %d's content failed (%s)", self.id, claim.id, type(exc).__name__)
            return self._give_back_claim(claim, item, None)
        if entered is None:
            log.info(
                "%s: no room for task %d (%d bytes) in time; given back",
                self.id,
                claim.id,
                claim.content_bytes,
            )
            return self._give_back_claim(claim, item, None, fault=False)
        full, reserved = entered
        try:
            return self.attempt(full, item)
        finally:
            self.inflight.leave(reserved)

    def _transient(self, claim: Claim, reason: str, code: int | None = None) -> Outcome:
        if claim.tries_used >= self.settings.max_try_count:
            error = f"{reason} (gave up after {claim.tries_used} tries)"
            return self.record(claim, Status.CANCELLED, error, code=code, cause=CancelReason.TRIES_EXHAUSTED)
        s = self.settings
        delay = backoff_seconds(claim.tries_used, s.retry_backoff_base, s.retry_backoff_max, self.rng)
        return self.record(claim, Status.FAILED, reason, delay=delay, code=code)

    def _give_back_claim(
        self, claim: Claim, item: Taken | None, reason: str | None, *, fault: bool = True
    ) -> Outcome:
        """A worker fault: the claim goes back without spending a try, and this sender backs off."""
        try:
            with self.engine.begin() as conn:
                conn.execute(_REFUND_SQL, {"id": claim.id, "try_count": claim.try_count, "reason": reason})
        except Exception as exc:  # noqa: BLE001 - the lease gives it back otherwise
            log.warning("%s: could not give task %d back (%s)", self.id, claim.id, type(exc).__name__)
        if item is not None:
            self._give_back_quietly(item, claim.id)
        if fault:
            self.fault()
        return Outcome.RELEASED

    def _pause(self, claim: Claim, item: Taken | None, reason: str) -> Outcome:
        """The server refused the account's login: pause the account; this mail waits with the rest."""
        text = f"the SMTP server refused the account's credentials: {reason}"
        with self.engine.begin() as conn:
            paused = conn.execute(
                _PAUSE_SQL, {"user_id": claim.user_id, "version": claim.account_version, "reason": text}
            ).rowcount
            wait = f"waiting for new SMTP credentials ({text})" if paused else None
            conn.execute(_REFUND_SQL, {"id": claim.id, "try_count": claim.try_count, "reason": wait})
        log.warning("%s: account %d paused: %s", self.id, claim.user_id, reason)
        try:
            if item is not None:
                self.sendq.give_back(self.processing, item, claim.id, pause=bool(paused))
            elif paused:
                self.sendq.pause(claim.user_id)
        except redis.RedisError:
            pass  # the envelope stays in our processing list; shutdown or the sweep returns it
        return Outcome.PAUSED

    def record(
        self,
        claim: Claim,
        status: Status,
        error: str | None,
        *,
        delay: float = 0.0,
        code: int | None = None,
        cause: CancelReason | None = None,
    ) -> Outcome:
        """Write the outcome, and the event reporting it, behind the fencing token; a short PostgreSQL
        outage is waited out. ``code`` is the SMTP reply code; ``cause`` why a cancellation happened
        (the event's reason and the metrics' label)."""
        event_type, event_reason = events.outcome_event(status, cause)
        report = events.Report(claim.id, event_type, event_reason, code)
        params = {
            "id": claim.id,
            "try_count": claim.try_count,
            "status": status.value,
            "last_error": error,
            "delay": delay,
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


def _refused(accepted) -> str | None:
    """What a sent task's last_error says when the server refused some of its recipients (5xx)."""
    refused = getattr(accepted, "refused", ())
    return (
        f"sent, but the server refused {len(refused)} recipient(s): {'; '.join(refused)}"[:1000]
        if refused
        else None
    )


def _reason(exc: SmtpError) -> str:
    return str(exc)[:1000]  # the mailer's messages start with the reply code, once, and hold no secret
