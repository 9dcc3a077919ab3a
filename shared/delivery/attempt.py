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
- **Only what the server said about this mail spends a try** (shared.delivery.failures). What it said
  about the account after the claim (421, throttling, a quota, the connection lost before DATA) gives
  the claim back without spending one and holds the account (shared.delivery.relay); refused
  credentials pause it. An unavailable PostgreSQL is a worker fault: the claim goes back, this sender
  backs off.
- **Never after its time.** A task past its ``expires_at`` is not claimed (the sweep cancels it).

The Sender (shared.delivery.sender) takes the envelopes, gets the account's connection ready before
any claim (shared.delivery.relay) and runs the threads; ``Attempt`` is the part of it that makes one
try, and ``Record`` (shared.delivery.record) the part that writes what it came to.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa

from shared.db import on_the_row
from shared.delivery.accounts import Account
from shared.delivery.inflight import INLINE_BYTES
from shared.delivery.raw import DATED_AT, compose_task
from shared.delivery.record import Seen
from shared.delivery.relay import KEY_LOST, reason_of
from shared.delivery.smtp import SmtpAccount, hang_up
from shared.domain import CancelReason, PauseReason, SmtpSecurity, Status
from shared.errors import (
    AccountPausedError,
    AccountSmtpError,
    ConfigError,
    PermanentSmtpError,
    SmtpError,
    TransientSmtpError,
)
from shared.fairqueue import Taken
from shared.prepared import alone, run_alone
from shared.tasks import events
from shared.workers import Outcome, backoff_seconds

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
    dated_at: datetime  # the Date header: when the mail became due (shared.delivery.raw.DATED_AT)
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
    started: datetime | None = None  # the wall clock at the claim: when the attempt started (its log)

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
       AND {on_the_row("t.expires_at > now()")}
       AND u.id = t.user_id AND u.smtp_paused_at IS NULL
 RETURNING t.id, t.user_id, t.try_count, t.budget_base, t.recipient_email, t.subject,
           t.message_id, t.created_at, {DATED_AT} AS dated_at, u.email AS sender_email,
           u.smtp_host, u.smtp_port,
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


class Attempt:
    """Claim, send and record one task. A part of the Sender: it uses the worker's engine, settings,
    clocks, rng, metrics, mailer, secret box, accounts, memory budget (inflight), fair queue and
    outbox, its envelope handling (``done``, ``fault``, ``_give_back_quietly``), ``Record`` and
    ``Relay``."""

    _turn = threading.local()  # per conversation thread: did the relay answer the last attempt?

    def claim(self, task_id: int) -> Claim | None:
        """Spend a try and take the lease, if the task is still queued with a try left, before its
        expiry, and its account is not paused."""
        params = {
            "id": task_id,
            "lease": self.settings.lease_seconds,
            "max_tries": self.settings.max_try_count,
            "inline": INLINE_BYTES,
        }
        rows = run_alone(self.engine, _CLAIM_SQL, params)  # one statement: its own transaction
        if not rows:
            return None
        return Claim(**rows[0]._asdict(), claimed_at=self.clock(), started=self.now())

    def attempt(
        self, claim: Claim, item: Taken | None = None, *, account: Account | None = None, session=None
    ) -> Outcome:
        """Send a claimed task over ``session`` (the account's connection, opened before the claim)
        and record what happened; no transaction is open while SMTP talks.

        ``item`` is the envelope it came with, given back when the account waits or pauses, or on a
        worker fault."""
        self._turn.answered = False
        if not claim.loaded:  # a large mail: it waits for room in this sender, then reads its content
            return self._attempt_in_room(claim, item, account, session)
        account = account or self.accounts.get(claim.user_id)
        deadline = (claim.claimed_at or self.clock()) + self.settings.smtp_deadline
        try:
            password = self.box.decrypt(claim.smtp_password_enc)  # decrypted here, only for this send
        except ConfigError:
            self._hang_up(session)
            return self.pause_account(account, PauseReason.KEY, KEY_LOST, item, claim.id, claim=claim)
        try:
            outgoing = compose_task(claim, claim.attachment_data)
        except PermanentSmtpError as exc:  # no From or To address to put on the envelope
            self._release(session)
            return self.record(claim, Status.CANCELLED, reason_of(exc), cause=CancelReason.PERMANENT_FAILURE)
        except Exception as exc:  # the task's own content: no try will do better
            self._release(session)
            reason = f"the mail cannot be built: {exc}"[:1000]
            return self.record(claim, Status.CANCELLED, reason, cause=CancelReason.PERMANENT_FAILURE)
        held = self._recipients_allowed(claim, account, len(outgoing.recipients), item, session)
        if held is not None:
            return held
        smtp = SmtpAccount(
            host=claim.smtp_host,
            port=claim.smtp_port,
            username=claim.smtp_username,
            password=password,
            security=SmtpSecurity(claim.smtp_security),
        )
        server = f"{claim.smtp_host}:{claim.smtp_port}"
        try:
            with self.metrics.smtp_seconds.time():
                accepted = self.mailer.send(smtp, outgoing, deadline=deadline, session=session)
        except AccountPausedError as exc:  # credentials refused when a pooled connection was reopened
            return self.pause_account(
                account, exc.reason, reason_of(exc), item, claim.id, claim=claim, error=exc
            )
        except AccountSmtpError as exc:  # the relay refused the account, not this mail: no try spent
            return self.back_off(account, exc, item, claim.id, claim=claim)
        except TransientSmtpError as exc:
            self._turn.answered = exc.code is not None
            return self._transient(claim, reason_of(exc), exc.code, _seen(server, exc))
        except (PermanentSmtpError, SmtpError) as exc:
            self._turn.answered = exc.code is not None
            return self.record(
                claim,
                Status.CANCELLED,
                reason_of(exc),
                code=exc.code,
                cause=CancelReason.PERMANENT_FAILURE,
                seen=_seen(server, exc),
            )
        except Exception as exc:  # a bug must not loop forever: a try spent, bounded by the budget
            log.exception("%s: task %d could not be sent", self.id, claim.id)
            return self._transient(claim, f"internal error: {type(exc).__name__}")
        self._turn.answered = True
        code = int(accepted[:3]) if accepted[:3].isdigit() else None
        seen = Seen(server, "DATA", code, str(accepted), getattr(accepted, "refused", ()))
        return self.record(claim, Status.SENT, _refused(accepted), seen=seen)

    def _recipients_allowed(self, claim: Claim, account, recipients: int, item, session) -> Outcome | None:
        """A mail with several recipients under a declared recipients window: the take counted one of
        them; the rest now. Over the window, the claim goes back (no try) and the account is held."""
        if recipients <= 1 or account is None or ":r" not in account.limits:
            return None
        free = self.pace.acquire(claim.user_id, 0, recipients - 1)
        if free == 0:
            return None
        self._release(session)
        if free < 0:  # more recipients than a window allows: no wait will do
            reason = (
                f"the mail has {recipients} recipients, more than the account's send limits allow at once"
            )
            return self.record(claim, Status.CANCELLED, reason, cause=CancelReason.PERMANENT_FAILURE)
        self.metrics.send_limit_waits.inc()
        text = "waiting: over the account's send limits (recipients)"
        self.refund(claim, text, seen=Seen(reply=text, reason="send_limit"))
        if item is not None:
            self._give_back_quietly(item, claim.id)
        return Outcome.WAITING

    def answered(self) -> bool:
        """Whether the relay answered this thread's last attempt about its mail (sent, or refused
        with a reply): the account works, whatever the mail's fate."""
        return getattr(self._turn, "answered", False)

    def _attempt_in_room(self, claim: Claim, item: Taken | None, account, session) -> Outcome:
        # Half the conversation's time at most; the other half is left for SMTP.
        wait = max(0.0, claim.claimed_at + self.settings.smtp_deadline / 2 - self.clock())
        try:
            entered = self.inflight.enter(claim, wait)
        except Exception as exc:  # PostgreSQL gone while reading the content: a worker fault
            log.warning("%s: reading task %d's content failed (%s)", self.id, claim.id, type(exc).__name__)
            self._release(session)
            return self._give_back_claim(claim, item, None)
        if entered is None:
            log.info(
                "%s: no room for task %d (%d bytes) in time; given back",
                self.id,
                claim.id,
                claim.content_bytes,
            )
            self._release(session)
            return self._give_back_claim(claim, item, None, fault=False)
        full, reserved = entered
        try:
            return self.attempt(full, item, account=account, session=session)
        finally:
            self.inflight.leave(reserved)

    def _transient(
        self, claim: Claim, reason: str, code: int | None = None, seen: Seen | None = None
    ) -> Outcome:
        if claim.tries_used >= self.settings.max_try_count:
            error = f"{reason} (gave up after {claim.tries_used} tries)"
            return self.record(
                claim, Status.CANCELLED, error, code=code, cause=CancelReason.TRIES_EXHAUSTED, seen=seen
            )
        s = self.settings
        delay = backoff_seconds(claim.tries_used, s.retry_backoff_base, s.retry_backoff_max, self.rng)
        return self.record(claim, Status.FAILED, reason, delay=delay, code=code, seen=seen)

    def _give_back_claim(
        self, claim: Claim, item: Taken | None, reason: str | None, *, fault: bool = True
    ) -> Outcome:
        """A worker fault: the claim goes back without spending a try, and this sender backs off."""
        self.refund(claim, reason)
        if item is not None:
            self._give_back_quietly(item, claim.id)
        if fault:
            self.fault()
        return Outcome.RELEASED

    def _hang_up(self, session) -> None:
        if session is not None:
            hang_up(session.connection.smtp)  # opened with the credentials that can no longer be read


def _seen(server: str, exc: SmtpError) -> Seen:
    return Seen(server, exc.stage, exc.code, reason_of(exc))


def _refused(accepted) -> str | None:
    """What a sent task's last_error says when the server refused some of its recipients (5xx)."""
    refused = getattr(accepted, "refused", ())
    return (
        f"sent, but the server refused {len(refused)} recipient(s): {'; '.join(refused)}"[:1000]
        if refused
        else None
    )
