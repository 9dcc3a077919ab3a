"""Test connection: talk to a user's SMTP server as a send would, up to AUTH, and send nothing.

``POST /api/v1/user/{id}/smtp-check`` connects to the stored account's server, waits for the greeting,
says EHLO, secures the session (STARTTLS or implicit TLS, verified as for sending), logs in with one AUTH
command, and says QUIT; the answer lists every step with its reply and time, the extensions the server
offers, the TLS session and the certificate, and the AUTH result. No MAIL FROM is ever said.

The server is as untrusted as when mail is sent: the same vetted addresses (shared.hosts), the same
guarded client (shared.delivery.smtp: capped replies, one deadline on the whole check), the same
words for a failure (shared.delivery.failures) with the password scrubbed from every reply shown.
"""

from __future__ import annotations

import logging
import smtplib
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
import sqlalchemy as sa

from shared import ratelimit
from shared.context import Context
from shared.deadline import Watchdog
from shared.delivery.failures import classify, reply_text, scrub
from shared.delivery.smtp import PinnedSMTP, PinnedSMTPSSL, SmtpAccount, hang_up
from shared.domain import SmtpSecurity
from shared.errors import DependencyUnavailable, HostError, NotFound, SmtpError
from shared.hosts import PRIVATE_HOST_REFUSED, vet
from shared.models import users

log = logging.getLogger(__name__)

# The whole check, greeting to QUIT, ends within this many seconds: well inside the function's own
# 30 s request timeout (deployment/gen_gateway.py), whatever the server does.
CHECK_SECONDS = 20.0

_watchdog: Watchdog | None = None
_watchdog_lock = threading.Lock()


def _shared_watchdog() -> Watchdog:
    global _watchdog
    with _watchdog_lock:
        if _watchdog is None:
            _watchdog = Watchdog(time.monotonic)
        return _watchdog


def smtp_check(
    ctx: Context,
    caller_id: int,
    user_id: int,
    *,
    ssl_context_factory: Callable[[], ssl.SSLContext] = ssl.create_default_context,
) -> dict[str, Any]:
    """Check the caller's own stored SMTP account (another user's id is "not found")."""
    if caller_id != user_id:
        raise NotFound(f"User {user_id} not found.")
    try:
        ratelimit.hit(ctx.redis, "smtp-check:user", str(user_id), ctx.settings.smtp_check_rate_per_user)
    except redis.RedisError:
        raise DependencyUnavailable("redis") from None
    columns = (users.c.smtp_host, users.c.smtp_port, users.c.smtp_username, users.c.smtp_password_enc)
    with ctx.engine.connect() as conn:
        row = conn.execute(
            sa.select(*columns, users.c.smtp_security).where(users.c.id == user_id)
        ).one_or_none()
    if row is None:
        raise NotFound(f"User {user_id} not found.")
    security = SmtpSecurity(row.smtp_security)
    try:
        password = ctx.box.decrypt(row.smtp_password_enc)
    except Exception:
        log.warning(
            "smtp-check: user %d's stored SMTP password cannot be decrypted with the configured keys", user_id
        )
        return _answer(
            f"{row.smtp_host}:{row.smtp_port}",
            security,
            [],
            error="the stored SMTP password cannot be read with this deployment's keys: set it again "
            "(PATCH /api/v1/user/{id} with smtp-password)",
        )
    account = SmtpAccount(row.smtp_host, row.smtp_port, row.smtp_username, password, security)
    return check_connection(
        account,
        allow_private=ctx.settings.smtp_allow_private_hosts,
        timeout=ctx.settings.smtp_timeout,
        ssl_context_factory=ssl_context_factory,
    )


def check_connection(
    account: SmtpAccount,
    *,
    allow_private: bool,
    timeout: float,
    ssl_context_factory: Callable[[], ssl.SSLContext] = ssl.create_default_context,
    seconds: float = CHECK_SECONDS,
    watchdog: Watchdog | None = None,
) -> dict[str, Any]:
    """Greet, secure, log in and say goodbye; what each step saw, and the first failure in the words a
    send would have used."""
    where = f"{account.host}:{account.port}"
    steps: list[dict[str, Any]] = []
    try:
        addresses = vet(account.host, account.port, allow_private=allow_private, what="SMTP host")
    except HostError as exc:
        # As at register: a name that resolves to a refused address is not told which address.
        reason = PRIVATE_HOST_REFUSED if exc.refused else exc.message
        return _answer(where, account.security, steps, error=f"{where}: {reason}")
    watchdog = watchdog or _shared_watchdog()
    guard = watchdog.start(time.monotonic() + seconds)
    context = None if account.security == SmtpSecurity.NONE else ssl_context_factory()
    if account.security == SmtpSecurity.TLS:
        smtp: PinnedSMTP = PinnedSMTPSSL(timeout=timeout, context=context)
    else:
        smtp = PinnedSMTP(timeout=timeout)
    smtp.addresses, smtp.guard, smtp._host = addresses, guard, account.host
    seen: dict[str, Any] = {"extensions": [], "tls": None, "auth": "not reached"}
    stage, started = "connect", time.monotonic()

    def passed(name: str, code: int | None = None, reply: bytes | str | None = None) -> None:
        nonlocal started
        step: dict[str, Any] = {"step": name, "ok": True, "ms": round((time.monotonic() - started) * 1000, 1)}
        if code is not None:
            step["code"], step["reply"] = code, scrub(reply_text(reply or b""), account)[:500]
        steps.append(step)
        started = time.monotonic()

    try:
        smtp.sock = smtp._get_socket(account.host, account.port, timeout)
        passed("connect")
        if account.security == SmtpSecurity.TLS:
            seen["tls"] = _tls(smtp)
        stage = "greeting"
        code, reply = smtp.getreply()
        if code != 220:
            raise smtplib.SMTPConnectError(code, reply)
        passed("greeting", code, reply)
        stage = "EHLO"
        code, reply = smtp.ehlo()
        if code != 250:
            raise smtplib.SMTPHeloError(code, reply)
        passed("EHLO", code, reply)
        if account.security == SmtpSecurity.STARTTLS:
            if not smtp.has_extn("starttls"):
                raise smtplib.SMTPNotSupportedError(
                    "the server does not offer STARTTLS; mail would not be sent in plaintext"
                )
            stage = "STARTTLS"
            code, reply = smtp.starttls(context=context)
            seen["tls"] = _tls(smtp)
            passed("STARTTLS", code, reply)
            stage = "EHLO"
            code, reply = smtp.ehlo()
            if code != 250:
                raise smtplib.SMTPHeloError(code, reply)
            passed("EHLO", code, reply)
        seen["extensions"] = _extensions(smtp)
        if not account.username:
            seen["auth"] = "not asked (no SMTP username)"
        else:
            if not smtp.has_extn("auth"):
                raise smtplib.SMTPNotSupportedError(
                    f"the server offers no AUTH; cannot log in as {account.username!r}"
                )
            stage = "AUTH"
            seen["auth"] = "refused"
            code, reply = smtp.login_once(account.username, account.password)
            seen["auth"] = "accepted"
            passed("AUTH", code, reply)
        stage = "QUIT"
        code, reply = smtp.docmd("QUIT")
        passed("QUIT", code, reply)
        smtp.close()
    except (SmtpError, smtplib.SMTPException, OSError) as exc:
        failure = classify(exc, stage, account, lambda: guard.expired)
        failed: dict[str, Any] = {
            "step": stage,
            "ok": False,
            "ms": round((time.monotonic() - started) * 1000, 1),
        }
        if isinstance(exc, smtplib.SMTPResponseException):
            failed["code"] = exc.smtp_code
            failed["reply"] = scrub(reply_text(exc.smtp_error), account)[:500]
        steps.append(failed)
        hang_up(smtp)
        return _answer(where, account.security, steps, error=str(failure), **seen)
    finally:
        watchdog.stop(guard)
    return _answer(where, account.security, steps, **seen)


def _extensions(smtp: PinnedSMTP) -> list[str]:
    features = smtp.esmtp_features
    return [f"{name.upper()} {value}".strip()[:200] for name, value in list(features.items())[:50]]


def _tls(smtp: PinnedSMTP) -> dict[str, Any] | None:
    sock = smtp.sock
    if not isinstance(sock, ssl.SSLSocket):
        return None
    cert = sock.getpeercert() or {}
    cipher = sock.cipher()
    return {
        "version": sock.version(),
        "cipher": cipher[0] if cipher else None,
        "certificate_subject": _name(cert.get("subject", ())),
        "certificate_issuer": _name(cert.get("issuer", ())),
        "certificate_expires": cert.get("notAfter"),
    }


def _name(rdns: Any) -> str:
    parts = [f"{key}={value}" for rdn in rdns for key, value in rdn]
    return ", ".join(parts)[:300]


def _answer(
    where: str, security: SmtpSecurity, steps: list, *, error: str | None = None, **seen: Any
) -> dict[str, Any]:
    return {
        "ok": error is None,
        "server": where,
        "security": security.value,
        "steps": steps,
        "extensions": seen.get("extensions", []),
        "tls": seen.get("tls"),
        "auth": seen.get("auth", "not reached"),
        "error": error,
    }
