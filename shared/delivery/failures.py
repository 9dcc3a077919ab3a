"""What an SMTP failure means, in one place: about *this mail*, or about *the account's relay*.

- **The mail** (``TransientSmtpError``, worth another try later; ``PermanentSmtpError``, no try will do
  better): a reply to MAIL FROM, RCPT TO or DATA about this message, or the connection lost or timed
  out after DATA began (the server may have accepted it). Only these spend one of MAX_TRY_COUNT.
- **The account** (``AccountSmtpError``: it backs off, the mail spends nothing): no connection (refused,
  reset, timed out, the name not found), the connection lost before DATA, a 421 at any stage, a
  temporary failure of the greeting, EHLO, STARTTLS or AUTH, and the throttling and quota replies of
  shared.delivery.replies at any stage.
- **The account, until its settings change** (``AccountPausedError``: it pauses): credentials refused
  (5xx to AUTH: ``SmtpAuthError``), and a server that cannot be used as configured (a certificate that
  does not verify, TLS against a plaintext port, no STARTTLS, no AUTH or no mechanism we use, plaintext
  refused by the deployment, a host that points somewhere we may not connect).

Every message names the server and the stage, starts with the reply code when there is one, and
never holds the password (not even as AUTH sent it, in base64).
"""

from __future__ import annotations

import base64
import smtplib
import ssl
from collections.abc import Callable

from shared.delivery import replies
from shared.delivery.smtp import MAX_REPLY_BYTES, MAX_REPLY_LINES, ReplyTooLarge, SmtpAccount
from shared.domain import AccountReason, PauseReason
from shared.errors import (
    AccountPausedError,
    AccountSmtpError,
    HostError,
    PermanentSmtpError,
    SmtpAuthError,
    SmtpError,
    TransientSmtpError,
)

_TLS_MISMATCH = {"WRONG_VERSION_NUMBER", "UNSUPPORTED_PROTOCOL", "TLSV1_ALERT_PROTOCOL_VERSION"}
# Opening the connection: nothing of any mail has been said yet.
OPENING = ("resolve", "connect", "greeting", "EHLO", "STARTTLS", "AUTH")
# Nothing of this mail can have been delivered before DATA: a connection lost up to here is the relay
# going away, not anything the server said about the mail.
# "RSET": the reset a refused mail left pending, sent ahead of this mail's MAIL FROM (pipelining).
BEFORE_DATA = (*OPENING, "RSET", "MAIL FROM", "RCPT TO")

UNREACHABLE, THROTTLED = AccountReason.UNREACHABLE, AccountReason.THROTTLED
UNAVAILABLE = AccountReason.UNAVAILABLE
CONFIGURATION = PauseReason.CONFIGURATION


def classify(
    exc: BaseException, stage: str, account: SmtpAccount, out_of_time: Callable[[], bool]
) -> SmtpError:
    """Turn whatever smtplib, the socket or the host check raised during ``stage`` into the SmtpError
    that says whose failure it is (see the module's docstring); ``out_of_time()`` says whether the
    conversation's deadline has passed."""
    error = _classify(exc, stage, account, out_of_time)
    if error.stage is None:
        error.stage = stage
    return error


def _classify(
    exc: BaseException, stage: str, account: SmtpAccount, out_of_time: Callable[[], bool]
) -> SmtpError:
    where = f"{account.host}:{account.port}"
    before_data = stage in BEFORE_DATA
    maybe = " (the server may have accepted the message)" if stage == "DATA" else ""
    if isinstance(exc, SmtpError):
        return _ours(exc, stage)
    if isinstance(exc, HostError):
        if exc.refused:
            return AccountPausedError(exc.message, reason=CONFIGURATION, stage=stage)
        return AccountSmtpError(exc.message, reason=UNREACHABLE, stage=stage)
    if out_of_time():
        text = f"{where}: the deadline for the conversation passed during {stage}{maybe}"
        return _account(text, UNREACHABLE, stage) if before_data else TransientSmtpError(text)
    if isinstance(exc, smtplib.SMTPResponseException):  # includes SMTPAuthenticationError
        return _reply(exc.smtp_code, _scrub(reply_text(exc.smtp_error), account), stage, where)
    if isinstance(exc, ReplyTooLarge):
        text = (
            f"{where}: the reply to {stage} exceeded {MAX_REPLY_LINES} lines or {MAX_REPLY_BYTES} bytes; "
            "connection closed"
        )
        return _account(text, UNAVAILABLE, stage) if before_data else TransientSmtpError(text)
    if isinstance(exc, smtplib.SMTPServerDisconnected):
        text = f"{where}: connection lost during {stage}: {exc}{maybe}"
        return _account(text, UNREACHABLE, stage) if before_data else TransientSmtpError(text)
    if isinstance(exc, smtplib.SMTPException):  # e.g. no AUTH mechanism in common
        text = f"{where}: {stage} failed: {_scrub(str(exc), account)}"
        if stage in OPENING:
            return AccountPausedError(text, reason=CONFIGURATION, stage=stage)
        return PermanentSmtpError(text)
    if isinstance(exc, ssl.SSLCertVerificationError):
        text = f"{where}: TLS certificate verification failed: {exc.verify_message}"
        return AccountPausedError(text, reason=CONFIGURATION, stage=stage)
    if isinstance(exc, ssl.SSLError):
        # A protocol mismatch (say, implicit TLS against a STARTTLS port) fails the same way on every
        # try; any other TLS error is most likely a handshake cut short by the network.
        text = f"{where}: TLS error during {stage}: {exc.reason or exc}"
        if exc.reason in _TLS_MISMATCH:
            return AccountPausedError(text, reason=CONFIGURATION, stage=stage)
        return _account(text, UNAVAILABLE, stage) if before_data else TransientSmtpError(text)
    if isinstance(exc, TimeoutError):
        waiting = "waiting for the greeting" if stage == "greeting" else f"during {stage}"
        text = f"{where}: timed out {waiting}{maybe}"
        return _account(text, UNREACHABLE, stage) if before_data else TransientSmtpError(text)
    if isinstance(exc, OSError):
        text = f"{where}: {exc.strerror or exc} during {stage}{maybe}"
        if before_data:
            # A refused connection is the relay saying "not now" to the whole account: fewer at once.
            return _account(text, UNREACHABLE, stage, shrink=isinstance(exc, ConnectionRefusedError))
        return TransientSmtpError(text)
    text = f"{where}: {type(exc).__name__} during {stage}{maybe}"
    return _account(text, UNAVAILABLE, stage) if before_data else TransientSmtpError(text)


def _reply(code: int, text: str, stage: str, where: str) -> SmtpError:
    """A reply the server gave: the table of known replies first, then 421, then the stage decides."""
    if code < 100:  # -1: a line that does not start with a reply code
        message = f"{where}: unreadable reply to {stage}: {text[:200]}"
        return _account(message, UNAVAILABLE, stage) if stage in BEFORE_DATA else TransientSmtpError(message)
    context = "as its greeting" if stage == "greeting" else f"in reply to {stage}"
    message = f"{code} {text} ({where}, {context})"
    row = replies.known(code, text)
    if row is not None:
        return AccountSmtpError(
            message,
            code,
            reason=row.reason,
            wait=replies.asked_wait(text) or row.wait,
            shrink=row.reason == THROTTLED,
            stage=stage,
        )
    if code == 421:  # "service not available, closing transmission channel": the relay, at any stage
        return AccountSmtpError(
            message, code, reason=THROTTLED, wait=replies.asked_wait(text), shrink=True, stage=stage
        )
    if stage in OPENING or stage == "RSET":  # RSET: about the session, nothing of this mail said yet
        if stage == "AUTH" and 500 <= code < 600:
            return SmtpAuthError(message, code, reason=PauseReason.CREDENTIALS, stage=stage)
        # 4xx (454 "temporary authentication failure", 4xx greetings) and a refused greeting or EHLO
        # (a 554 banner usually means our address is blocked for now): the account waits.
        return AccountSmtpError(message, code, reason=UNAVAILABLE, wait=replies.asked_wait(text), stage=stage)
    if 500 <= code < 600:
        return PermanentSmtpError(message, code)
    return TransientSmtpError(message, code)


def _ours(exc: SmtpError, stage: str) -> SmtpError:
    """An SmtpError raised on purpose (the mailer's own checks): while the connection opens, whatever
    refuses it is the account's."""
    if isinstance(exc, AccountSmtpError) or stage not in OPENING:
        return exc
    if isinstance(exc, PermanentSmtpError):
        return AccountPausedError(exc.message, exc.code, reason=CONFIGURATION, stage=stage)
    return AccountSmtpError(exc.message, exc.code, reason=UNAVAILABLE, stage=stage)


def _account(text: str, reason: AccountReason, stage: str, *, shrink: bool = False) -> AccountSmtpError:
    return AccountSmtpError(text, reason=reason, stage=stage, shrink=shrink)


def reply_text(reply: bytes | str) -> str:
    """A reply as one line of text."""
    text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else str(reply)
    return " ".join(text.split())


def _scrub(text: str, account: SmtpAccount) -> str:
    """The text without the password, also in the base64 forms AUTH sent it in (a server may echo them)."""
    if not account.password:
        return text
    plain = f"\0{account.username}\0{account.password}"
    for secret in (account.password, *(_b64(s) for s in (account.password, plain))):
        text = text.replace(secret, "***")
    return text


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode("ascii")


def scrub(text: str, account: SmtpAccount) -> str:
    """A server's reply made safe to show: the account's password removed, also as AUTH encoded it."""
    return _scrub(text, account)
