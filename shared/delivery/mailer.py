"""SMTP delivery: sending over pooled connections within a deadline.

A sender gets the account's connection ready first (``connect``: pooled and still open, or opened and
logged in), claims a mail only then and sends it over that ``session``: what goes wrong while a
connection opens is the account's, and no mail has been touched yet.

docs/architecture.md ("SMTP: every server is treated as hostile") has the why: verified TLS always, never a
plaintext fallback, a deadline on the whole conversation, replies capped, one AUTH attempt, one
reconnect for a pooled connection found closed. Building the message is shared/delivery/message.py's job,
vetting the host shared/hosts.py's, keeping one connection to a hostile server in bounds
shared/delivery/smtp.py's, one mail's MAIL FROM, RCPT TO and DATA (pipelined when the server offers it)
shared/delivery/transaction.py's, saying what a failure means shared/delivery/failures.py's.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import smtplib
import ssl
import threading
import time
from collections.abc import Callable
from email.message import EmailMessage

from shared.config import Settings
from shared.deadline import Guard, Watchdog
from shared.delivery.failures import classify, reply_text
from shared.delivery.message import Outgoing
from shared.delivery.pool import Connection, Pool, Session
from shared.delivery.smtp import PinnedSMTP, PinnedSMTPSSL, SmtpAccount, hang_up, size_limit
from shared.delivery.transaction import Transaction
from shared.domain import PauseReason, SmtpSecurity
from shared.errors import AccountPausedError, HostError, PermanentSmtpError, SmtpError, TransientSmtpError
from shared.hosts import vet

log = logging.getLogger(__name__)


_NOT_ACCEPTED_YET = ("MAIL FROM", "RCPT TO")  # stages after which nothing can have been delivered


class Mailer(Pool):
    """Sends messages over pooled SMTP connections (shared.delivery.pool); one instance may be shared by
    many threads."""

    def __init__(
        self,
        settings: Settings,
        *,
        ssl_context_factory: Callable[[], ssl.SSLContext] = ssl.create_default_context,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._settings = settings
        self._ssl_context_factory = ssl_context_factory
        self._clock = clock
        self._lock = threading.Lock()
        self._idle: dict[tuple, list[Connection]] = {}
        self._local_hostname: str | None = None  # socket.getfqdn() can be slow; ask once per Mailer
        self._key_salt = secrets.token_bytes(16)
        self._watchdog = Watchdog(clock)
        self._ids = itertools.count(1)
        # Called with each pooled connection this Mailer closes (idle too long, worn out, found closed,
        # or at close()): a sender lets go of the connection's idle slot (shared.fairqueue).
        self.on_close: Callable[[Connection], None] | None = None

    def __enter__(self) -> Mailer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def connect(
        self, account: SmtpAccount, *, deadline: float | None = None, want: int | None = None
    ) -> Session:
        """A connection ready for the account's next mail: a pooled one the server has not closed (as
        ``pooled``), or a new one (resolve, connect, greeting, EHLO, STARTTLS, AUTH) opened by
        ``deadline`` (default: now + 0.8 × TASK_LEASE_SECONDS). Raises the SmtpError classified for the
        stage it failed at: anything at these stages is about the account (shared.delivery.failures),
        never about a mail."""
        self._allowed(account)
        session = self.pooled(account, want)
        if session is not None:
            return session
        guard = self._watchdog.start(
            self._clock() + self._settings.smtp_deadline if deadline is None else deadline
        )
        try:
            connection = self._open(account, guard)
        finally:
            self._watchdog.stop(guard)
        return Session(connection, self._key(account))

    def send(
        self,
        account: SmtpAccount,
        message: EmailMessage | Outgoing,
        *,
        deadline: float | None = None,
        bcc: tuple[str, ...] = (),
        session: Session | None = None,
    ) -> Acceptance:
        """Deliver one message from its From to its To and Cc, and to ``bcc`` (in the envelope only);
        an ``Outgoing`` (``shared.delivery.message.compose``) carries its envelope, bcc included, already.
        return the server's acceptance, e.g. "250 OK" (``.refused`` lists recipients refused with 5xx).

        Over ``session`` when given (``connect``), else a pooled or new connection. deadline is the
        instant on this Mailer's clock by which the whole conversation is over, a new connection's
        opening included (default: now + 0.8 × TASK_LEASE_SECONDS). Raises TransientSmtpError or
        PermanentSmtpError about this mail, AccountSmtpError about the account (shared.delivery.failures);
        the message never contains the password.
        """
        fresh = False  # only a connection opened now, not another pooled one (see pooled's want)
        if session is not None and session.key != self._key(account):
            hang_up(session.connection.smtp)  # opened with settings that changed since: not for this mail
            fresh = True
        self._allowed(account)
        now = self._clock()
        if deadline is None:
            deadline = now + self._settings.smtp_deadline
        elif deadline <= now:  # checked before taking a pooled connection that it would only spoil
            if session is not None:
                self.release(session)
            raise TransientSmtpError(
                f"{account.host}:{account.port}: the deadline passed before the send began"
            )
        outgoing = message if isinstance(message, Outgoing) else Outgoing.of(message, bcc)
        key = self._key(account)
        guard = self._watchdog.start(deadline)
        try:
            if fresh:
                connection = None
            else:
                connection = session.connection if session is not None else self._take(key)
            if connection is not None:
                try:
                    return self._deliver(connection, key, account, outgoing, guard, reused=True)
                except _StaleConnection:
                    log.debug(
                        "pooled SMTP connection to %s:%d was closed; reconnecting", account.host, account.port
                    )
            connection = self._open(account, guard)
            if session is not None:
                session.connection, session.key = connection, key
            return self._deliver(connection, key, account, outgoing, guard, reused=False)
        finally:
            self._watchdog.stop(guard)

    def _allowed(self, account: SmtpAccount) -> None:
        if account.security == SmtpSecurity.NONE and not self._settings.smtp_allow_insecure:
            raise AccountPausedError(
                "plaintext SMTP (security none) is not allowed by this deployment",
                reason=PauseReason.CONFIGURATION,
                stage="connect",
            )

    # --- the pool ---

    # --- talking SMTP ---

    def _open(self, account: SmtpAccount, guard: Guard) -> Connection:
        """Connect, secure, greet and log in; any failure closes the socket and raises an SmtpError."""
        # Checked on every new connection, not only at registration: DNS may point elsewhere by now.
        # The lookup itself is bounded by the resolver's timeouts, not by the deadline (checked next).
        try:
            addresses = vet(
                account.host,
                account.port,
                allow_private=self._settings.smtp_allow_private_hosts,
                what="SMTP host",
            )
        except HostError as exc:
            raise self._classify(exc, "resolve", account, guard) from None
        timeout = self._settings.smtp_timeout
        context = None if account.security == SmtpSecurity.NONE else self._ssl_context_factory()
        if account.security == SmtpSecurity.TLS:
            smtp: PinnedSMTP = PinnedSMTPSSL(
                local_hostname=self._local_hostname, timeout=timeout, context=context
            )
        else:
            smtp = PinnedSMTP(local_hostname=self._local_hostname, timeout=timeout)
        self._local_hostname = smtp.local_hostname
        smtp.addresses, smtp.guard, smtp.clock = addresses, guard, self._clock
        smtp._host = account.host  # smtplib sets it only in __init__; TLS verifies the name against it
        stage = "connect"
        try:
            smtp.sock = smtp._get_socket(account.host, account.port, timeout)
            stage = "greeting"
            code, reply = smtp.getreply()
            if code != 220:
                raise smtplib.SMTPConnectError(code, reply)
            stage = "EHLO"
            smtp.ehlo_or_helo_if_needed()
            if account.security == SmtpSecurity.STARTTLS:
                if not smtp.has_extn("starttls"):
                    raise PermanentSmtpError("server does not offer STARTTLS; refusing to send in plaintext")
                stage = "STARTTLS"
                smtp.starttls(context=context)
                stage = "EHLO"
                smtp.ehlo_or_helo_if_needed()
            if account.username:
                if not smtp.has_extn("auth"):
                    raise PermanentSmtpError(
                        f"server does not offer AUTH; cannot log in as {account.username!r}"
                    )
                stage = "AUTH"
                smtp.login_once(account.username, account.password)
        except (SmtpError, smtplib.SMTPException, OSError) as exc:
            smtp.close()
            raise self._classify(exc, stage, account, guard) from None
        log.debug("opened SMTP connection to %s:%d (%s)", account.host, account.port, account.security)
        now = self._clock()
        return Connection(smtp, opened=now, last_used=now, id=next(self._ids))

    def _deliver(
        self,
        connection: Connection,
        key: tuple,
        account: SmtpAccount,
        outgoing: Outgoing,
        guard: Guard,
        *,
        reused: bool,
    ) -> Acceptance:
        smtp = connection.smtp
        refusal = self._refuse_before_sending(smtp, account, outgoing)
        if refusal is not None:
            self._finish(key, connection, guard, healthy=True)  # nothing was said: the session is fine
            raise refusal
        # RFC 1870: declaring the size lets the server refuse before the upload instead of after it.
        options = outgoing.options + ((f"SIZE={len(outgoing.data)}",) if smtp.has_extn("size") else ())
        # MAIL FROM, RCPT TO… and DATA: pipelined when offered (shared.delivery.transaction). Once the
        # message is on its way the server may have accepted it, so nothing after that is ever retried.
        transaction = Transaction(smtp, outgoing.sender, outgoing.recipients, outgoing.data, options)
        try:
            if reused:  # a new connection is watched from its first byte on
                smtp.guard = guard
                guard.watch(smtp.sock)
            code, reply = transaction.run()
        except (smtplib.SMTPException, OSError) as exc:
            stage = transaction.stage
            error = self._classify(exc, stage, account, guard)
            # A 5xx to one message leaves a healthy session (reset by an RSET sent with the next mail's
            # commands); after a 4xx the server is throttling or unwell, so the retry gets a fresh
            # connection rather than the session that just refused.
            refused = isinstance(exc, smtplib.SMTPResponseException) and isinstance(error, PermanentSmtpError)
            healthy = refused and transaction.reusable
            if healthy:
                smtp.reset_later()
            self._finish(key, connection, guard, healthy=healthy)
            # A pooled connection the server closed while idle fails on its first command, or on the
            # RSET owed since its last mail.
            if reused and not self._out_of_time(guard):
                lost = isinstance(exc, smtplib.SMTPServerDisconnected) and stage in _NOT_ACCEPTED_YET
                if lost or stage == "RSET":
                    raise _StaleConnection from exc
            raise error from None
        connection.messages += 1
        self._finish(key, connection, guard, healthy=True)
        return Acceptance(
            f"{code} {reply_text(reply)}".strip(),
            tuple(f"<{a}> {c} {t}" for a, c, t in transaction.refused),
        )

    def _refuse_before_sending(
        self, smtp: PinnedSMTP, account: SmtpAccount, outgoing: Outgoing
    ) -> SmtpError | None:
        """What makes this message impossible on this server, known before saying anything."""
        if outgoing.options and not smtp.has_extn("smtputf8"):
            return PermanentSmtpError("the addresses need SMTPUTF8, which the server does not offer")
        limit = size_limit(smtp)
        if limit is not None and len(outgoing.data) > limit:
            return PermanentSmtpError(
                f"message of {len(outgoing.data)} bytes exceeds the server's limit of {limit} bytes "
                f"(SIZE of {account.host}:{account.port}); not sent"
            )
        return None

    def _out_of_time(self, guard: Guard) -> bool:
        return guard.expired or self._clock() >= guard.deadline

    def _classify(self, exc: BaseException, stage: str, account: SmtpAccount, guard: Guard) -> SmtpError:
        return classify(exc, stage, account, lambda: self._out_of_time(guard))


class Acceptance(str):
    """The server's reply to DATA; ``refused`` names the recipients it refused for good (5xx to RCPT),
    who did not get the mail while everyone else did."""

    refused: tuple[str, ...]

    def __new__(cls, reply: str, refused: tuple[str, ...] = ()) -> Acceptance:
        self = super().__new__(cls, reply)
        self.refused = refused
        return self


class _StaleConnection(Exception):
    """A reused connection was found closed before the server accepted anything: reconnect once."""
