"""One SMTP connection to a server we do not trust: pinned addresses, a deadline, capped replies.

smtplib trusts its peer: a socket timeout bounds each read but not a reply trickled a byte at a time,
and a multi-line reply is kept whole however long it grows. ``PinnedSMTP`` gives every socket operation
the time left before the conversation's deadline (at most SMTP_TIMEOUT), caps every reply, and lets a
``Watchdog`` shut its socket down when the deadline passes, which wakes whatever the sending thread is
blocked in: a read, a write, a connect or a TLS handshake. The Mailer (shared/mailer.py) decides what
to send and how to classify failures; this module only makes sure a server cannot hold a thread or
grow its memory.
"""

from __future__ import annotations

import math
import smtplib
import socket
import threading
import time
from collections.abc import Callable

# A reply longer than this is a hostile or broken server, not a chatty one: real EHLO replies have
# 10-20 lines of well under 100 bytes. The caps bound what one reply can make a sender keep.
MAX_REPLY_LINES = 100
MAX_REPLY_BYTES = 64 * 1024
_MAX_LINE = 8192  # smtplib's own limit for one line (RFC 5321 asks for 512)
# The watchdog looks at the clock at least this often: a clock other than time.monotonic (tests) may
# jump, and a guard due then must not wait for the next one to be added.
_WATCHDOG_TICK = 1.0


class ReplyTooLarge(smtplib.SMTPException):
    """The server's reply passed MAX_REPLY_LINES or MAX_REPLY_BYTES; the connection has been closed."""


class DeadlinePassed(smtplib.SMTPException):
    """No time is left for the next operation of the conversation."""


class Guard:
    """The deadline of one send and the socket it is using; the Watchdog expires it at the deadline.

    It keeps its own duplicate of the socket's descriptor: shutting that down ends the connection for
    the sending thread too (TLS included), and it can never hit another socket that reused a number the
    sending thread closed meanwhile.
    """

    def __init__(self, deadline: float):
        self.deadline = deadline
        self.expired = False
        self._lock = threading.Lock()
        self._watched: socket.socket | None = None

    def watch(self, sock: socket.socket) -> None:
        """From now on the deadline applies to sock (the descriptor is duplicated: works for SSLSockets)."""
        duplicate = socket.fromfd(sock.fileno(), sock.family, sock.type)
        with self._lock:
            previous, self._watched = self._watched, duplicate
            if self.expired:
                _shutdown(duplicate)
        if previous is not None:
            previous.close()

    def expire(self) -> None:
        with self._lock:
            self.expired = True
            if self._watched is not None:
                _shutdown(self._watched)

    def release(self) -> None:
        with self._lock:
            watched, self._watched = self._watched, None
        if watched is not None:
            watched.close()


class Watchdog:
    """One thread per Mailer (not one per send) that expires the guards whose deadline has passed."""

    def __init__(self, clock: Callable[[], float]):
        self._clock = clock
        self._changed = threading.Condition()
        self._guards: set[Guard] = set()
        self._thread: threading.Thread | None = None  # the thread that should be running, if any
        # When the waiting thread looks at the clock next; -inf while it is not waiting (it looks at
        # every guard before it waits again, so no one needs to wake it).
        self._wakeup = -math.inf

    def start(self, deadline: float) -> Guard:
        """Watch a new conversation that must be over by deadline (on the clock given)."""
        guard = Guard(deadline)
        with self._changed:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="smtp-watchdog", daemon=True)
                self._thread.start()
            self._guards.add(guard)
            if deadline < self._wakeup:  # otherwise the thread wakes up early enough already
                self._changed.notify()
        return guard

    def stop(self, guard: Guard) -> None:
        """Stop watching: the guard's socket can no longer be shut down (idempotent)."""
        with self._changed:
            self._guards.discard(guard)
        guard.release()

    def close(self) -> None:
        """End the thread (a later start() begins a new one)."""
        with self._changed:
            thread, self._thread = self._thread, None
            self._changed.notify_all()
        if thread is not None:
            thread.join()

    def _run(self) -> None:
        with self._changed:
            while self._thread is threading.current_thread():
                now = self._clock()
                for guard in [g for g in self._guards if g.deadline <= now]:
                    self._guards.discard(guard)
                    guard.expire()
                if self._guards:
                    wait = min(min(g.deadline for g in self._guards) - now, _WATCHDOG_TICK)
                    self._wakeup = now + wait
                    self._changed.wait(wait)
                else:
                    self._wakeup = math.inf
                    self._changed.wait()
                self._wakeup = -math.inf


class PinnedSMTP(smtplib.SMTP):
    """smtplib.SMTP that connects only to vetted addresses, keeps every operation within the guard's
    deadline and caps replies; TLS still verifies the name the user gave (``_host``)."""

    addresses: list[tuple[int, tuple]] = []
    guard: Guard | None = None
    clock: Callable[[], float] = staticmethod(time.monotonic)

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

    def login_once(self, username: str, password: str) -> None:
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
            self.auth(mechanism, self.auth_plain if mechanism == "PLAIN" else self.auth_login)
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


def size_limit(smtp: smtplib.SMTP) -> int | None:
    """The largest message the server takes (its EHLO SIZE), or None when it states no limit."""
    try:
        limit = int(smtp.esmtp_features.get("size", "").split()[0])
    except (ValueError, IndexError):
        return None
    return limit or None  # "SIZE 0" means no fixed limit (RFC 1870)


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # not connected yet, or already gone
