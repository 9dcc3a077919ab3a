"""The account's standing with its relay, as a sender meets it: the connection opened before any
claim, and what the sender does when the relay refuses the account.

- **Open the connection before claiming.** The sender reads the account (``shared.delivery.accounts``)
  and gets a pooled or new connection for it first; only then does it claim a task. A relay that
  cannot be reached, says 421, refuses the login or throttles while the connection opens never
  touches a task: no try, no refund, the envelope goes back to its tenant's queue.
- **Back off** (``AccountSmtpError``): the account is held across every sender (``shared.pace``), its
  episode mirrored on the user record (``smtp_backoff_*``) and reported once (``account.backing_off``);
  a claim already made is given back without spending a try. The first success ends the episode.
- **Pause** (``AccountPausedError``: credentials refused, a password no key decrypts, a server that
  cannot be used as configured): the account's mail waits until its settings change (the user record
  says why; ``account.paused``). Only while the account's settings are still the ones that failed.

A condition of the account is never the sender's: the sender itself never backs off for one (issue
21: one account whose password no key decrypts made every sender stop taking work).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import redis
import sqlalchemy as sa

from shared.accounts import events as account_events
from shared.delivery.accounts import Account
from shared.delivery.record import Seen
from shared.delivery.smtp import SmtpAccount
from shared.domain import AccountReason, PauseReason, SmtpSecurity
from shared.errors import AccountPausedError, AccountSmtpError, ConfigError, SmtpError
from shared.fairqueue import Taken
from shared.workers import Outcome

log = logging.getLogger("mailq.sender")

# A throttle at these stages refused a mail for the account's rate (not its connections): the account
# learns the rate from it (shared.pace).
RATE_STAGES = ("MAIL FROM", "RCPT TO", "DATA")

KEY_LOST = (
    "the stored SMTP password cannot be decrypted with any key of MAILQ_ENCRYPTION_KEYS; set it again "
    "(PATCH /api/v1/user/{id} with smtp-password), or the operator restores the key it was stored with"
)

# The episode's start is kept; the next attempt and the relay's words are the latest.
_BACKOFF_SQL = sa.text(
    """
    UPDATE users SET smtp_backoff_since = COALESCE(smtp_backoff_since, CAST(:since AS timestamptz)),
                     smtp_backoff_until = CAST(:until AS timestamptz), smtp_backoff_code = :code,
                     smtp_backoff_reason = :reason
     WHERE id = :user_id
    """
)
_RECOVERED_SQL = sa.text(
    """
    UPDATE users SET smtp_backoff_since = NULL, smtp_backoff_until = NULL, smtp_backoff_code = NULL,
                     smtp_backoff_reason = NULL
     WHERE id = :user_id AND smtp_backoff_since IS NOT NULL
    """
)
# Only if the settings are still the ones that failed (the user may have fixed them since); ``new``
# says this pause began now (the event is written once).
_PAUSE_SQL = sa.text(
    """
    UPDATE users SET smtp_paused_at = COALESCE(smtp_paused_at, now()), smtp_paused_reason = :reason,
                     smtp_paused_code = :code
     WHERE id = :user_id AND updated_at = :version
    RETURNING smtp_paused_at, smtp_paused_at = now() AS new
    """
)


class Relay:
    """The account side of an attempt. A part of the Sender: its accounts, mailer, box, pace, engine,
    settings, clocks, rng, metrics, and envelope handling (``done``, ``sendq``, ``processing``)."""

    def ready(self, item: Taken, task_id: int) -> tuple[Account, SmtpAccount, object] | Outcome:
        """The account of ``item`` and a connection ready for its next mail, or the Outcome of not
        getting one (the envelope is let go of or given back, nothing claimed)."""
        tenant = item.tenant
        account = self.accounts.get(tenant)
        session = None
        if account is not None and not account.paused:
            try:
                smtp = self.smtp_account(account)
                session = self.mailer.pooled(smtp, reuse_of(item))
            except ConfigError:
                session = None  # read it again below: the password may have been changed since
        if session is None:
            account = self.accounts.read(tenant)  # every new connection logs in as the account is now
            if account is None:  # the user is gone: so are its tasks
                self.done(item)
                return Outcome.DROPPED
            self._configure(account)
            if account.paused:
                self.sendq.give_back(self.processing, item, task_id, pause=True)
                return Outcome.PAUSED
            try:
                smtp = self.smtp_account(account)
            except ConfigError:
                return self.pause_account(account, PauseReason.KEY, KEY_LOST, item, task_id)
            try:
                session = self.mailer.connect(
                    smtp, deadline=self.clock() + self.settings.smtp_deadline, want=reuse_of(item)
                )
            except AccountPausedError as exc:
                return self.pause_account(account, exc.reason, reason_of(exc), item, task_id, error=exc)
            except AccountSmtpError as exc:
                return self.back_off(account, exc, item, task_id)
            except SmtpError as exc:  # not classified as the account's: still, nothing of a mail was said
                wrapped = AccountSmtpError(exc.message, exc.code, reason=AccountReason.UNAVAILABLE)
                return self.back_off(account, wrapped, item, task_id)
        self.counted(session, tenant, reuse_of(item))
        if not item.reuse and account.limits:  # the take did not count it: see shared.fairscripts
            free = self.pace.acquire(tenant, 1, 1)
            if free:
                self.metrics.send_limit_waits.inc()
                self._release(session)  # open, idle: the next mail of the window goes over it
                self._give_back_quietly(item, task_id)
                return Outcome.WAITING
        return account, smtp, session

    def smtp_account(self, account: Account) -> SmtpAccount:
        """Where and as whom; the password decrypted here, for this conversation (ConfigError: no key)."""
        return SmtpAccount(
            host=account.host,
            port=account.port,
            username=account.username,
            password=self.box.decrypt(account.password_enc),
            security=SmtpSecurity(account.security),
        )

    def _configure(self, account: Account) -> None:
        """The declared maximum and send limits where every sender's take sees them (the API writes
        them too; this covers a Redis that restarted empty)."""
        try:
            self.pace.configure(account.id, account.max_connections, account.limits)
        except redis.RedisError:
            pass  # the take goes on with what Redis has

    # --- the relay refused the account ---

    def back_off(
        self, account: Account, exc: AccountSmtpError, item: Taken | None, task_id: int, *, claim=None
    ) -> Outcome:
        """Hold the account across every sender; give back the claim (no try spent) and the envelope."""
        text = reason_of(exc)
        seen = Seen(f"{account.host}:{account.port}", exc.stage, exc.code, text, reason=exc.reason)
        s = self.settings
        try:
            step = self.pace.pushback(
                account.id,
                reason=exc.reason,
                declared_max=account.max_connections,
                base=s.account_backoff_base,
                cap=_backoff_cap(s, exc.reason),
                jitter=self.rng(),
                shrink=exc.shrink,
                wait=exc.wait,
                learn=exc.reason == AccountReason.THROTTLED and exc.stage in RATE_STAGES,
            )
        except redis.RedisError as err:
            log.warning("%s: could not hold account %d (%s)", self.id, account.id, type(err).__name__)
            if claim is not None:
                self.refund(claim, f"waiting: {text}", seen=seen)
            if item is not None:
                self._give_back_quietly(item, task_id)
            self.fault()  # Redis is the sender's own dependency
            return Outcome.RELEASED
        since, until = _moment(step.since_ms), _moment(step.until_ms)
        if step.stepped:
            self.metrics.account_backoffs.labels(str(exc.reason)).inc()
            log.warning(
                "%s: account %d backs off until %s (%s, step %d): %s",
                self.id,
                account.id,
                until.isoformat(timespec="seconds"),
                exc.reason,
                step.level,
                text,
            )
            self._mirror_backoff(account, exc, text, step.new, since, until)
        if claim is not None:
            self.refund(
                claim, f"waiting: {text}; next attempt at {until.isoformat(timespec='seconds')}", seen=seen
            )
        else:
            self.note_wait(task_id, since, seen)
        if item is not None:
            self._give_back_quietly(item, task_id)
        return Outcome.WAITING

    def _mirror_backoff(
        self, account: Account, exc: AccountSmtpError, text: str, new: bool, since: datetime, until: datetime
    ) -> None:
        params = {
            "user_id": account.id,
            "since": since,
            "until": until,
            "code": str(exc.reason),
            "reason": text,
        }
        created = []
        try:
            with self.engine.begin() as conn:
                conn.execute(_BACKOFF_SQL, params)
                if new:
                    body = account_events.data(
                        account.id, "backing_off", str(exc.reason), text, since=since, until=until
                    )
                    created = account_events.write(conn, account.id, account_events.BACKING_OFF, body)
        except Exception as err:  # noqa: BLE001 - the record is a mirror; Redis holds the account
            log.warning(
                "%s: could not record account %d's backoff (%s)", self.id, account.id, type(err).__name__
            )
        account_events.wake(self.redis, created)

    def recovered(self, account: Account | None, ended: bool) -> None:
        """The relay accepted the account again: its backoff episode ends on the user record too."""
        if account is None or not (ended or account.backing_off):
            return
        try:
            with self.engine.begin() as conn:
                cleared = conn.execute(_RECOVERED_SQL, {"user_id": account.id}).rowcount
        except Exception as err:  # noqa: BLE001 - the next success clears it
            log.warning(
                "%s: could not clear account %d's backoff (%s)", self.id, account.id, type(err).__name__
            )
            return
        if account.backing_off:
            self.accounts.forget(account.id)
        if cleared:
            log.info("%s: account %d: its relay accepts mail again; backoff ended", self.id, account.id)

    # --- the account cannot send until its settings change ---

    def pause_account(
        self,
        account: Account,
        reason: str,
        text: str,
        item: Taken | None,
        task_id: int,
        *,
        claim=None,
        error: SmtpError | None = None,
    ) -> Outcome:
        """Pause the account (while its settings are the ones that failed); its mail waits, this one too."""
        reason = PauseReason(reason)
        words = {
            PauseReason.CREDENTIALS: "the SMTP server refused the account's credentials",
            PauseReason.KEY: "the SMTP password cannot be read",
            PauseReason.CONFIGURATION: "the SMTP server cannot be used as configured",
        }[reason]
        full = (
            f"{words}: {text}"[:1000] if reason != PauseReason.KEY else text.replace("{id}", str(account.id))
        )
        created, row = [], None
        with self.engine.begin() as conn:
            params = {"user_id": account.id, "version": account.version, "reason": full, "code": reason.value}
            row = conn.execute(_PAUSE_SQL, params).one_or_none()
            if row is not None and row.new:
                body = account_events.data(account.id, "paused", reason.value, full, since=row.smtp_paused_at)
                created = account_events.write(conn, account.id, account_events.PAUSED, body)
        account_events.wake(self.redis, created)
        self.accounts.forget(account.id)
        log.warning("%s: account %d paused (%s): %s", self.id, account.id, reason.value, full)
        wait = f"waiting for new SMTP settings ({full})" if row is not None else None
        seen = Seen(
            f"{account.host}:{account.port}",
            getattr(error, "stage", None),
            getattr(error, "code", None),
            full,
            reason=reason.value,
        )
        if claim is not None:
            self.refund(claim, wait, seen=seen, outcome="paused")
        elif row is not None:
            self.note_wait(task_id, row.smtp_paused_at, seen, outcome="paused")
        try:
            if item is not None:
                self.sendq.give_back(self.processing, item, task_id, pause=row is not None)
            elif row is not None:
                self.sendq.pause(account.id)
        except redis.RedisError:
            pass  # the envelope stays in our processing list; shutdown or the sweep returns it
        return Outcome.PAUSED


def _backoff_cap(settings, reason: str) -> float:
    """The longest backoff step: shorter while the relay cannot be reached at all (trying to connect
    costs it nothing, and the mail should go out soon after the relay is back)."""
    if reason == AccountReason.UNREACHABLE:
        return min(settings.account_backoff_max, settings.account_unreachable_backoff_max)
    return settings.account_backoff_max


def reuse_of(item: Taken) -> int:
    """The pooled connection whose idle slot the take handed to this envelope (0: none)."""
    return int(item.reuse) if item.reuse.isdigit() else 0


def reason_of(exc: SmtpError) -> str:
    return str(exc)[:1000]  # the mailer's messages start with the reply code, once, and hold no secret


def _moment(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)
