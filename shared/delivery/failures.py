"""What an SMTP failure means: whatever smtplib or the socket raised, as a TransientSmtpError (worth
another try later), a PermanentSmtpError (no try will do better) or an SmtpAuthError (the server
refused the account's credentials), with a message that names the server and the stage, starts with
the reply code when there is one, and never holds the password (not even as AUTH sent it, in base64).
"""

from __future__ import annotations

import base64
import smtplib
import ssl
from collections.abc import Callable

from shared.delivery.smtp import MAX_REPLY_BYTES, MAX_REPLY_LINES, ReplyTooLarge, SmtpAccount
from shared.errors import PermanentSmtpError, SmtpAuthError, SmtpError, TransientSmtpError

_TLS_MISMATCH = {"WRONG_VERSION_NUMBER", "UNSUPPORTED_PROTOCOL", "TLSV1_ALERT_PROTOCOL_VERSION"}


def classify(
    exc: BaseException, stage: str, account: SmtpAccount, out_of_time: Callable[[], bool]
) -> SmtpError:
    """Turn whatever smtplib or the socket raised during ``stage`` into a transient or permanent
    SmtpError; ``out_of_time()`` says whether the conversation's deadline has passed.

    An error carrying a reply code starts with that code, once (last_error shows it as is).
    """
    where = f"{account.host}:{account.port}"
    maybe = " (the server may have accepted the message)" if stage == "DATA" else ""
    if isinstance(exc, SmtpError):
        return exc
    if out_of_time():
        return TransientSmtpError(f"{where}: the deadline for the conversation passed during {stage}{maybe}")
    if isinstance(exc, smtplib.SMTPResponseException):  # includes SMTPAuthenticationError
        code, text = exc.smtp_code, _scrub(reply_text(exc.smtp_error), account)
        if code < 100:  # -1: a line that does not start with a reply code
            return TransientSmtpError(f"{where}: unreadable reply to {stage}: {text[:200]}")
        # 4xx (including 454 "temporary authentication failure") is worth retrying.
        kind = TransientSmtpError
        if 500 <= code < 600:
            kind = SmtpAuthError if stage == "AUTH" else PermanentSmtpError
        context = "as its greeting" if stage == "greeting" else f"in reply to {stage}"
        return kind(f"{code} {text} ({where}, {context})", code)
    if isinstance(exc, ReplyTooLarge):
        return TransientSmtpError(
            f"{where}: the reply to {stage} exceeded {MAX_REPLY_LINES} lines or {MAX_REPLY_BYTES} bytes; "
            "connection closed"
        )
    if isinstance(exc, smtplib.SMTPServerDisconnected):
        return TransientSmtpError(f"{where}: connection lost during {stage}: {exc}{maybe}")
    if isinstance(exc, smtplib.SMTPException):  # e.g. no AUTH mechanism in common
        return PermanentSmtpError(f"{where}: {stage} failed: {_scrub(str(exc), account)}")
    if isinstance(exc, ssl.SSLCertVerificationError):
        return PermanentSmtpError(f"{where}: TLS certificate verification failed: {exc.verify_message}")
    if isinstance(exc, ssl.SSLError):
        # A protocol mismatch (say, implicit TLS against a STARTTLS port) fails the same way on every
        # try; any other TLS error is most likely a handshake cut short by the network.
        kind = PermanentSmtpError if exc.reason in _TLS_MISMATCH else TransientSmtpError
        return kind(f"{where}: TLS error during {stage}: {exc.reason or exc}")
    if isinstance(exc, TimeoutError):
        waiting = "waiting for the greeting" if stage == "greeting" else f"during {stage}"
        return TransientSmtpError(f"{where}: timed out {waiting}{maybe}")
    if isinstance(exc, OSError):
        return TransientSmtpError(f"{where}: {exc.strerror or exc} during {stage}{maybe}")
    return TransientSmtpError(f"{where}: {type(exc).__name__} during {stage}{maybe}")


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
