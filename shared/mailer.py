"""SMTP delivery: building a message, refusing unsafe hosts, sending over pooled connections.

ARCHITECTURE.md ("SMTP rules") has the why: verified TLS always, never a plaintext fallback, a timeout
on every socket operation, one reconnect for a pooled connection found closed, every failure classified.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import ipaddress
import logging
import re
import secrets
import smtplib
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from email.generator import BytesGenerator
from email.headerregistry import HeaderRegistry
from email.message import EmailMessage
from email.policy import default as default_policy
from email.utils import format_datetime

from shared.config import Settings
from shared.domain import SmtpSecurity
from shared.errors import PermanentSmtpError, SmtpAuthError, SmtpError, TransientSmtpError
from shared.validation import LINE_BREAKS

log = logging.getLogger(__name__)

_DOT_ATOM = re.compile(r"^[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*$")
# Both are link-local or unique-local anyway; named so the refusal message says what they are.
_METADATA_ADDRESSES = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}


class _CachedHeaderRegistry(HeaderRegistry):
    """The default header registry, except that each header class is made once.

    ``HeaderRegistry.__getitem__`` builds a new class with ``type()`` on every header it parses; in a
    sender that is the largest single cost of a message (profiled: ~12 % of the sender's CPU).
    """

    def __init__(self):
        super().__init__()
        self._classes: dict[str, type] = {}

    def __getitem__(self, name: str) -> type:
        key = name.lower()
        cls = self._classes.get(key)
        if cls is None:
            cls = self._classes[key] = super().__getitem__(name)
        return cls


# email.policy.default in every rule; only the header classes are cached.
POLICY = default_policy.clone(header_factory=_CachedHeaderRegistry())


@dataclass(frozen=True)
class SmtpAccount:
    """Where and as whom a user's mail goes out; the password never appears in repr()."""

    host: str
    port: int
    username: str
    password: str = field(repr=False)
    security: SmtpSecurity


def build_message(
    *, sender: str, recipient: str, subject: str, body: str, message_id: str, date: datetime
) -> EmailMessage:
    """A plain-text message under the default policy; raise ValueError for CR, LF or NUL in a header."""
    headers = {"From": sender, "To": recipient, "Subject": subject, "Message-ID": message_id}
    for name, value in headers.items():
        if LINE_BREAKS.search(value):
            # The API refuses these with a 422 already; this keeps a header injection out if it slips through.
            raise ValueError(f"{name} must not contain CR, LF or NUL (or another line break)")
    message = EmailMessage(policy=POLICY)
    for name, value in headers.items():
        message[name] = value
    message["Date"] = format_datetime(date)  # a naive datetime is written as UTC with "-0000"
    # quoted-printable keeps non-ASCII bodies 7-bit clean for servers without 8BITMIME.
    message.set_content(body, cte=None if body.isascii() else "quoted-printable")
    return message


def message_id_for(task_id: int, sender_email: str) -> str:
    """The task's Message-ID, the same on every retry so a duplicate delivery can be recognised."""
    _, at, domain = sender_email.rpartition("@")
    domain = domain.strip().lower() if at else ""
    try:
        domain = domain.encode("idna").decode("ascii")
    except UnicodeError:
        domain = ""
    if not _DOT_ATOM.match(domain):
        domain = "mailq.invalid"
    digest = hashlib.sha256(f"{task_id}:{sender_email.lower()}".encode()).hexdigest()[:12]
    return f"<mailq.{task_id}.{digest}@{domain}>"


def _refusal(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip in _METADATA_ADDRESSES:
        return "a cloud metadata address"
    for what in ("unspecified", "loopback", "link-local", "multicast", "private", "reserved"):
        if getattr(ip, "is_" + what.replace("-", "_")):
            return f"a {what} address"
    # Catches shared address space (100.64.0.0/10, where Alibaba's metadata service lives) and the like.
    return None if ip.is_global else "not a globally routable address"


def _resolve_checked(host: str, port: int, *, allow_private: bool) -> list[tuple[int, tuple]]:
    """Resolve once and vet every address; the caller connects to exactly these (no second lookup)."""
    if not host or not 0 < port < 65536:
        raise PermanentSmtpError(f"invalid SMTP host or port: {host!r}:{port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        # A resolver that is down says EAI_AGAIN; that is worth retrying, a name that does not exist is not.
        error = TransientSmtpError if getattr(exc, "errno", None) == socket.EAI_AGAIN else PermanentSmtpError
        raise error(f"SMTP host {host!r} cannot be resolved: {reason}") from None
    addresses = [(family, sockaddr) for family, _, _, _, sockaddr in infos]
    if not allow_private:
        for _, sockaddr in addresses:
            reason = _refusal(ipaddress.ip_address(sockaddr[0].split("%", 1)[0]))
            if reason:
                raise PermanentSmtpError(f"SMTP host {host!r} resolves to {sockaddr[0]}, {reason}; refused")
    return addresses


def check_host_allowed(host: str, port: int, *, allow_private: bool) -> None:
    """Raise PermanentSmtpError when the host does not resolve or points somewhere we must not connect."""
    _resolve_checked(host, port, allow_private=allow_private)


def host_refusal_reason(host: str, port: int, *, allow_private: bool) -> str | None:
    """Why the host is refused, in words fit for a 422, or None when it is acceptable."""
    try:
        _resolve_checked(host, port, allow_private=allow_private)
    except SmtpError as exc:
        return exc.message
    return None


class _PinnedSMTP(smtplib.SMTP):
    """Connects to addresses vetted beforehand while TLS still verifies the name the user gave."""

    addresses: list[tuple[int, tuple]] = []

    def _get_socket(self, host, port, timeout):
        error: OSError = OSError(f"no address to connect to for {host}")
        for family, sockaddr in self.addresses:
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.settimeout(timeout)
                sock.connect(sockaddr)
                return sock
            except OSError as exc:
                sock.close()
                error = exc
        raise error


class _PinnedSMTPSSL(smtplib.SMTP_SSL, _PinnedSMTP):
    """Implicit TLS: SMTP_SSL wraps the socket that _PinnedSMTP connected."""


@dataclass(eq=False)
class _Connection:
    smtp: smtplib.SMTP
    last_used: float


_NOT_ACCEPTED_YET = ("MAIL FROM", "RCPT TO")  # stages after which nothing can have been delivered
_TLS_MISMATCH = {"WRONG_VERSION_NUMBER", "UNSUPPORTED_PROTOCOL", "TLSV1_ALERT_PROTOCOL_VERSION"}


class Mailer:
    """Sends messages over pooled SMTP connections; one instance may be shared by many threads."""

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
        self._idle: dict[tuple, list[_Connection]] = {}
        self._local_hostname: str | None = None  # socket.getfqdn() can be slow; ask once per Mailer
        self._key_salt = secrets.token_bytes(16)

    def __enter__(self) -> Mailer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def send(self, account: SmtpAccount, message: EmailMessage, *, deadline: float | None = None) -> str:
        """Deliver one message from its From to its To; return the server's acceptance, e.g. "250 OK"."""
        if account.security == SmtpSecurity.NONE and not self._settings.smtp_allow_insecure:
            raise PermanentSmtpError("plaintext SMTP (security none) is not allowed by this deployment")
        outgoing = _Outgoing.of(message)
        key = self._key(account)
        connection = self._take(key)
        if connection is not None:
            try:
                return self._deliver(connection, key, account, outgoing, reused=True)
            except _StaleConnection:
                log.debug(
                    "pooled SMTP connection to %s:%d was closed; reconnecting", account.host, account.port
                )
        return self._deliver(self._open(account), key, account, outgoing, reused=False)

    def close_idle(self) -> int:
        """Close connections idle longer than smtp_idle_seconds; return how many were closed."""
        stale: list[_Connection] = []
        with self._lock:
            for key in list(self._idle):
                stale += self._split_stale(key)
        for connection in stale:
            _quit(connection)
        return len(stale)

    def close(self) -> None:
        """QUIT every idle connection; call it after the threads using this Mailer have stopped."""
        with self._lock:
            connections = [c for idle in self._idle.values() for c in idle]
            self._idle.clear()
        for connection in connections:
            _quit(connection)

    # --- the pool ---

    def _key(self, account: SmtpAccount) -> tuple:
        # The password is part of the key: otherwise a tenant who registers someone else's host and
        # username with any password would ride on that user's authenticated connection.
        secret = hmac.new(self._key_salt, account.password.encode(), hashlib.sha256).digest()
        return (account.host.lower(), account.port, account.username, account.security, secret)

    def _split_stale(self, key: tuple) -> list[_Connection]:
        """Remove and return the connections of key idle for too long; the caller holds the lock."""
        now, limit = self._clock(), self._settings.smtp_idle_seconds
        idle = self._idle.pop(key, [])
        fresh = [c for c in idle if now - c.last_used <= limit]
        if fresh:
            self._idle[key] = fresh
        return [c for c in idle if now - c.last_used > limit]

    def _take(self, key: tuple) -> _Connection | None:
        with self._lock:
            stale = self._split_stale(key)
            idle = self._idle.get(key)
            connection = idle.pop() if idle else None  # the most recently used: the others may expire
            if idle == []:
                del self._idle[key]
        for old in stale:
            _quit(old)
        return connection

    def _give_back(self, key: tuple, connection: _Connection) -> None:
        connection.last_used = self._clock()
        with self._lock:
            self._idle.setdefault(key, []).append(connection)

    # --- talking SMTP ---

    def _open(self, account: SmtpAccount) -> _Connection:
        """Connect, secure, greet and log in; any failure closes the socket and raises an SmtpError."""
        # Checked on every new connection, not only at registration: DNS may point elsewhere by now.
        addresses = _resolve_checked(
            account.host, account.port, allow_private=self._settings.smtp_allow_private_hosts
        )
        timeout = self._settings.smtp_timeout
        context = None if account.security == SmtpSecurity.NONE else self._ssl_context_factory()
        if account.security == SmtpSecurity.TLS:
            smtp: _PinnedSMTP = _PinnedSMTPSSL(
                local_hostname=self._local_hostname, timeout=timeout, context=context
            )
        else:
            smtp = _PinnedSMTP(local_hostname=self._local_hostname, timeout=timeout)
        self._local_hostname = smtp.local_hostname
        smtp.addresses = addresses
        smtp._host = account.host  # smtplib sets it only in __init__; TLS verifies the name against it
        stage = "connect"
        try:
            code, reply = smtp.connect(account.host, account.port)
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
                smtp.login(account.username, account.password)
        except (SmtpError, smtplib.SMTPException, OSError) as exc:
            smtp.close()
            raise self._classify(exc, stage, account) from None
        log.debug("opened SMTP connection to %s:%d (%s)", account.host, account.port, account.security)
        return _Connection(smtp, self._clock())

    def _deliver(
        self, connection: _Connection, key: tuple, account: SmtpAccount, outgoing: _Outgoing, *, reused: bool
    ) -> str:
        smtp = connection.smtp
        if outgoing.options and not smtp.has_extn("smtputf8"):
            self._give_back(key, connection)
            raise PermanentSmtpError("the addresses need SMTPUTF8, which the server does not offer")
        stage = "MAIL FROM"
        try:
            code, reply = smtp.mail(outgoing.sender, outgoing.options)
            if code != 250:
                raise smtplib.SMTPResponseException(code, reply)
            stage = "RCPT TO"
            code, reply = smtp.rcpt(outgoing.recipient)
            if code not in (250, 251):
                raise smtplib.SMTPResponseException(code, reply)
            # From here on the server may have accepted the message, so nothing below is ever retried.
            stage = "DATA"
            code, reply = smtp.data(outgoing.data)
            if code != 250:
                raise smtplib.SMTPResponseException(code, reply)
        except (smtplib.SMTPException, OSError) as exc:
            error = self._classify(exc, stage, account)
            answered = isinstance(exc, smtplib.SMTPResponseException) and error.code != 421
            if answered and _reset(smtp):
                self._give_back(key, connection)  # a refused message leaves a healthy connection
            else:
                smtp.close()
                # A pooled connection the server closed while idle fails on its first command.
                if reused and stage in _NOT_ACCEPTED_YET and not answered:
                    raise _StaleConnection from exc
            raise error from None
        self._give_back(key, connection)
        return f"{code} {_text(reply)}".strip()

    def _classify(self, exc: BaseException, stage: str, account: SmtpAccount) -> SmtpError:
        """Turn whatever smtplib or the socket raised into a transient or permanent SmtpError."""
        where = f"{account.host}:{account.port}"
        if isinstance(exc, SmtpError):
            return exc
        if isinstance(exc, smtplib.SMTPResponseException):  # includes SMTPAuthenticationError
            code, text = exc.smtp_code, _scrub(_text(exc.smtp_error), account.password)
            # 4xx (including 454 "temporary authentication failure") is worth retrying; so is a reply
            # that is not a reply code at all (-1: the server hung up mid-answer).
            kind = PermanentSmtpError if 500 <= code < 600 else TransientSmtpError
            if kind is PermanentSmtpError and stage == "AUTH":
                kind = SmtpAuthError
            return kind(f"{where} answered {stage} with {code} {text}".rstrip(), code)
        if isinstance(exc, smtplib.SMTPServerDisconnected):
            maybe = " (the server may have accepted the message)" if stage == "DATA" else ""
            return TransientSmtpError(f"{where}: connection lost during {stage}: {exc}{maybe}")
        if isinstance(exc, smtplib.SMTPException):  # e.g. no AUTH mechanism in common
            return PermanentSmtpError(f"{where}: {stage} failed: {_scrub(str(exc), account.password)}")
        if isinstance(exc, ssl.SSLCertVerificationError):
            return PermanentSmtpError(f"{where}: TLS certificate verification failed: {exc.verify_message}")
        if isinstance(exc, ssl.SSLError):
            # A protocol mismatch (say, implicit TLS against a STARTTLS port) fails the same way on every
            # try; any other TLS error is most likely a handshake cut short by the network.
            kind = PermanentSmtpError if exc.reason in _TLS_MISMATCH else TransientSmtpError
            return kind(f"{where}: TLS error during {stage}: {exc.reason or exc}")
        if isinstance(exc, TimeoutError):
            return TransientSmtpError(f"{where}: timed out during {stage}")
        if isinstance(exc, OSError):
            return TransientSmtpError(f"{where}: {exc.strerror or exc} during {stage}")
        return TransientSmtpError(f"{where}: {type(exc).__name__} during {stage}")


class _StaleConnection(Exception):
    """A reused connection was found closed before the server accepted anything: reconnect once."""


@dataclass(frozen=True)
class _Outgoing:
    """The envelope and the wire bytes of one message, computed once however often we connect."""

    sender: str
    recipient: str
    data: bytes
    options: tuple[str, ...]

    @classmethod
    def of(cls, message: EmailMessage) -> _Outgoing:
        sender, recipient = _address(message, "From"), _address(message, "To")
        international = not (sender + recipient).isascii()
        buffer = io.BytesIO()
        policy = message.policy.clone(linesep="\r\n", utf8=international)
        BytesGenerator(buffer, policy=policy).flatten(message)
        options = ("SMTPUTF8", "BODY=8BITMIME") if international else ()
        return cls(sender, recipient, buffer.getvalue(), options)


def _address(message: EmailMessage, name: str) -> str:
    addresses = getattr(message[name], "addresses", ())
    if len(addresses) != 1 or not addresses[0].addr_spec:
        raise PermanentSmtpError(f"the message needs exactly one {name} address")
    return addresses[0].addr_spec


def _text(reply: bytes | str) -> str:
    text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else str(reply)
    return " ".join(text.split())


def _scrub(text: str, password: str) -> str:
    return text.replace(password, "***") if password else text


def _reset(smtp: smtplib.SMTP) -> bool:
    try:
        return smtp.rset()[0] == 250
    except (smtplib.SMTPException, OSError):
        return False


def _quit(connection: _Connection) -> None:
    smtp = connection.smtp
    try:
        if smtp.sock is not None:
            smtp.sock.settimeout(min(2.0, smtp.timeout))  # a polite QUIT must not hold up shutdown
        smtp.quit()
    except (smtplib.SMTPException, OSError):
        smtp.close()
