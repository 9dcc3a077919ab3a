"""One SMTP connection to a server we do not trust: pinned addresses, a deadline, capped replies.

smtplib trusts its peer: a socket timeout bounds each read but not a reply trickled a byte at a time,
and a multi-line reply is kept whole however long it grows. ``PinnedSMTP`` gives every socket operation
the time left before the conversation's deadline (at most SMTP_TIMEOUT), caps every reply, and lets a
``Watchdog`` (shared.deadline) shut its socket down when the deadline passes, which wakes whatever the
sending thread is blocked in: a read, a write, a connect or a TLS handshake. The Mailer
(shared/delivery/mailer.py) decides what to send and how to classify failures; this module only makes
sure a server cannot hold a thread or grow its memory.
"""

from __future__ import annotations

import re
import select
import smtplib
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from shared.deadline import Guard
from shared.domain import SmtpSecurity

# A reply longer than this is a hostile or broken server, not a chatty one: real EHLO replies have
# 10-20 lines of well under 100 bytes. The caps bound what one reply can make a sender keep.
MAX_REPLY_LINES = 100
MAX_REPLY_BYTES = 64 * 1024
_MAX_LINE = 8192  # smtplib's own limit for one line (RFC 5321 asks for 512)
_LEADING_DOT = re.compile(rb"(?m)^\.")  # a line of the message that must be dot-stuffed (RFC 5321 4.5.2)


@dataclass(frozen=True)
class SmtpAccount:
    """Where and as whom a user's mail goes out; the password never appears in repr()."""

    host: str
    port: int
    username: str
    password: str = field(repr=False)
    security: SmtpSecurity


class ReplyTooLarge(smtplib.SMTPException):
    """The server's reply passed MAX_REPLY_LINES or MAX_REPLY_BYTES; the connection has been closed."""


class DeadlinePassed(smtplib.SMTPException):
    """No time is left for the next operation of the conversation."""


class PinnedSMTP(smtplib.SMTP):
    """smtplib.SMTP that connects only to vetted addresses, keeps every operation within the guard's
    deadline and caps replies; TLS still verifies the name the user gave (``_host``)."""

    addresses: list[tuple[int, tuple]] = []
    guard: Guard | None = None
    clock: Callable[[], float] = staticmethod(time.monotonic)
    reset_pending: bool = False  # the next transaction starts with an RSET (reset_later)

    def budget(self) -> float:
        """Seconds the next socket operation may take: SMTP_TIMEOUT, or less when the deadline is nearer."""
        if self.guard is None:
            return self.timeout
        left = self.guard.deadline - self.clock()
        if left <= 0 or self.guard.expired:
            raise DeadlinePassed("the deadline passed")
        return min(self.timeout, left)

    def _get_socket(self, host, port, timeout):
        error: OSError = OSError(f"no address to connect to for {host}")
        for family, sockaddr in self.addresses:
            budget = self.budget()
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                if self.guard is not None:
                    self.guard.watch(sock)
                sock.settimeout(budget)
                sock.connect(sockaddr)
                return sock
            except OSError as exc:
                sock.close()
                error = exc
        raise error

    def _arm(self) -> None:
        if self.sock is None:
            raise smtplib.SMTPServerDisconnected("not connected")
        self.sock.settimeout(self.budget())

    def send(self, s) -> None:
        """smtplib's send, within the deadline, and a timeout stays a timeout (not "not connected")."""
        self._arm()
        if isinstance(s, str):
            s = s.encode(self.command_encoding)
        try:
            self.sock.sendall(s)
        except TimeoutError:
            self.close()
            raise
        except OSError:
            self.close()
            raise smtplib.SMTPServerDisconnected("Server not connected") from None

    def getreply(self) -> tuple[int, bytes]:
        """smtplib's getreply, within the deadline and capped in lines and bytes."""
        self._arm()
        if self.file is None:
            self.file = self.sock.makefile("rb")
        lines: list[bytes] = []
        size = 0
        while True:
            try:
                line = self.file.readline(_MAX_LINE + 1)
            except TimeoutError:
                self.close()
                raise
            except OSError as exc:
                self.close()
                raise smtplib.SMTPServerDisconnected(f"Connection unexpectedly closed: {exc}") from None
            if not line:
                self.close()
                raise smtplib.SMTPServerDisconnected("Connection unexpectedly closed")
            size += len(line)
            if len(line) > _MAX_LINE or len(lines) == MAX_REPLY_LINES or size > MAX_REPLY_BYTES:
                self.close()
                raise ReplyTooLarge(f"exceeded {MAX_REPLY_LINES} lines or {MAX_REPLY_BYTES} bytes")
            lines.append(line[4:].strip(b" \t\r\n"))
            try:
                code = int(line[:3])
            except ValueError:
                return -1, b"\n".join(lines)
            if line[3:4] != b"-":
                return code, b"\n".join(lines)

    def send_group(self, lines: Sequence[str]) -> None:
        """Several commands in one write (RFC 2920 PIPELINING); their replies come back in order."""
        for line in lines:
            if "\r" in line or "\n" in line:  # as smtplib's putcmd: a line break would start a command
                raise ValueError(f"command contains a line break: {line[:100]!r}")
        self.send("".join(f"{line}\r\n" for line in lines))

    def send_message(self, data: bytes) -> None:
        """The message after a 354, as smtplib's data() sends it: dot-stuffed, then the final dot."""
        stuffed = _LEADING_DOT.sub(b"..", data)
        if not stuffed.endswith(b"\r\n"):
            stuffed += b"\r\n"
        self.send(stuffed + b".\r\n")

    def reset_later(self) -> None:
        """After a refused mail: the next transaction on this session starts with RSET, in the same
        write as its own commands where the server offers PIPELINING, so the reset costs no round trip
        of its own; meanwhile the idle session says nothing (shared.delivery.transaction)."""
        self.reset_pending = True

    def login_once(self, username: str, password: str) -> tuple[int, bytes]:
        """Exactly one AUTH command: PLAIN when offered, else LOGIN.

        login() would try every mechanism offered in turn, so one wrong password became two or three
        refused logins per mail, which providers answer by locking the account or blocking our IP.
        """
        offered = self.esmtp_features.get("auth", "").upper().split()
        mechanism = next((m for m in ("PLAIN", "LOGIN") if m in offered), None)
        if mechanism is None:
            raise smtplib.SMTPException(
                f"the server offers no AUTH mechanism we use (PLAIN or LOGIN), only {' '.join(offered)[:100]}"
            )
        self.user, self.password = username, password
        try:
            return self.auth(mechanism, self.auth_plain if mechanism == "PLAIN" else self.auth_login)
        finally:
            self.password = ""  # a pooled connection has no reason to keep it


class PinnedSMTPSSL(smtplib.SMTP_SSL, PinnedSMTP):
    """Implicit TLS: SMTP_SSL wraps the socket that PinnedSMTP connected."""


def hang_up(smtp: smtplib.SMTP) -> None:
    """Say QUIT if the socket takes it at once, then close: never wait for the server's answer."""
    sock = smtp.sock
    if sock is not None:
        try:
            sock.setblocking(False)
            sock.send(b"QUIT\r\n")
        except OSError:  # includes ssl.SSLWantWriteError: the goodbye is a courtesy
            pass
    smtp.close()


def still_open(smtp: smtplib.SMTP) -> bool:
    """Whether an idle connection is still usable, without a round trip: an idle SMTP server says
    nothing until spoken to, so a socket with something to read was closed (EOF, a reset) or carries
    an unsolicited reply (a 421 before closing). Checked before a pooled connection is handed out, so
    a relay that went away is found before a mail is claimed for it."""
    sock = smtp.sock
    if sock is None:
        return False
    if getattr(sock, "pending", lambda: 0)():  # TLS: a record already decrypted and waiting
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return False
    return not readable


def size_limit(smtp: smtplib.SMTP) -> int | None:
    """The largest message the server takes (its EHLO SIZE), or None when it states no limit."""
    try:
        limit = int(smtp.esmtp_features.get("size", "").split()[0])
    except (ValueError, IndexError):
        return None
    return limit or None  # "SIZE 0" means no fixed limit (RFC 1870)
