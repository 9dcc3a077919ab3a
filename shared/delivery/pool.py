"""The Mailer's pool of open SMTP connections, per account: kept between mails, reused, retired.

A connection goes back to the pool after a mail the server accepted or refused for good (a healthy
session), and is closed when idle longer than SMTP_IDLE_SECONDS, worn out (SMTP_CONNECTION_MAX_MESSAGES,
SMTP_CONNECTION_MAX_AGE) or found closed by the server. Each connection has a number unique in its
Mailer: a sender counts every open connection of an account across all senders (an idle one holds an
idle slot in the fair queue, shared.fairqueue), so it reuses the one its take handed over and hears of
each one the pool closes (``on_close``).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass

from shared.deadline import Guard
from shared.delivery.smtp import PinnedSMTP, SmtpAccount, hang_up, still_open


@dataclass(eq=False)
class Connection:
    smtp: PinnedSMTP
    opened: float
    last_used: float
    messages: int = 0  # accepted over this connection
    id: int = 0  # unique in its Mailer: a sender names a pooled connection by it (Mailer.pooled)
    pooled: bool = False  # idle in the pool right now
    tag: object = None  # whoever keeps count of the connection (the sender: its idle slot), for on_close


@dataclass(eq=False)
class Session:
    """A connection ready for the account's next mail, held by one thread (``Mailer.connect``)."""

    connection: Connection  # the one the conversation used last (send() may have replaced it)
    key: tuple
    tenant: int | None = None  # whose connection (the sender's)


class Pool:
    """The pool part of the Mailer (its settings, clock, lock, watchdog and key salt)."""

    _idle: dict[tuple, list[Connection]]
    on_close: Callable[[Connection], None] | None

    def pooled(self, account: SmtpAccount, want: int | None = None) -> Session | None:
        """A pooled connection of the account the server has not closed, if there is one (no I/O):
        ``want`` if it is there (the one whose idle slot the sender's take handed over), else the most
        recently used."""
        key = self._key(account)
        connection = self._take(key, want)
        return None if connection is None else Session(connection, key)

    def discard(self, want: int) -> None:
        """Close the pooled connection ``want`` if it is still there (its idle slot was handed to a
        mail that will not use it: no slot counts it any more)."""
        if not want:
            return
        found = None
        with self._lock:
            for key, idle in list(self._idle.items()):
                found = next((c for c in idle if c.id == want), None)
                if found is not None:
                    idle.remove(found)
                    if not idle:
                        del self._idle[key]
                    break
        if found is not None:
            self._close_pooled(found)

    def release(self, session: Session) -> None:
        """Give back a session that carried no mail (the claim found nothing): pooled for the next."""
        session.connection.last_used = self._clock()
        session.connection.pooled = True
        with self._lock:
            self._idle.setdefault(session.key, []).append(session.connection)

    def close_idle(self) -> int:
        """Close connections idle or open too long; return how many. Never waits on a server."""
        stale: list[Connection] = []
        with self._lock:
            for key in list(self._idle):
                stale += self._split_stale(key)
        for connection in stale:
            self._close_pooled(connection)
        return len(stale)

    def close(self) -> None:
        """Close every idle connection without waiting on a server; call it after the senders stopped."""
        with self._lock:
            connections = [c for idle in self._idle.values() for c in idle]
            self._idle.clear()
        for connection in connections:
            self._close_pooled(connection)
        self._watchdog.close()

    def _close_pooled(self, connection: Connection) -> None:
        hang_up(connection.smtp)
        connection.pooled = False
        if self.on_close is not None and connection.tag is not None:
            self.on_close(connection)

    def _key(self, account: SmtpAccount) -> tuple:
        # The password is part of the key: otherwise a tenant who registers someone else's host and
        # username with any password would ride on that user's authenticated connection.
        secret = hmac.new(self._key_salt, account.password.encode(), hashlib.sha256).digest()
        return (account.host.lower(), account.port, account.username, account.security, secret)

    def _worn_out(self, connection: Connection, now: float) -> bool:
        # Long-lived sessions are where servers keep per-session limits and where a half-open
        # connection hides; retiring them bounds both.
        return (
            connection.messages >= self._settings.smtp_connection_max_messages
            or now - connection.opened >= self._settings.smtp_connection_max_age
        )

    def _split_stale(self, key: tuple) -> list[Connection]:
        """Remove and return the connections of key idle or open too long; the caller holds the lock."""
        now, limit = self._clock(), self._settings.smtp_idle_seconds
        idle = self._idle.pop(key, [])
        fresh = [c for c in idle if now - c.last_used <= limit and not self._worn_out(c, now)]
        if fresh:
            self._idle[key] = fresh
        return [c for c in idle if c not in fresh]

    def _take(self, key: tuple, want: int | None = None) -> Connection | None:
        """An idle connection of ``key`` that the server has not closed: ``want`` if it is there, else
        the most recently used (the others may expire)."""
        while True:
            with self._lock:
                stale = self._split_stale(key)
                idle = self._idle.get(key)
                connection = next((c for c in idle if c.id == want), None) if idle and want else None
                if connection is not None:
                    idle.remove(connection)
                elif idle:
                    connection = idle.pop()
                if idle == []:
                    del self._idle[key]
                if connection is not None:
                    connection.pooled = False
            for old in stale:
                self._close_pooled(old)
            if connection is None or still_open(connection.smtp):
                return connection
            self._close_pooled(connection)

    def _finish(self, key: tuple, connection: Connection, guard: Guard, *, healthy: bool) -> None:
        """Pool the connection if it is healthy and still young, else hang up."""
        if healthy:
            self._watchdog.stop(guard)  # from here on the watchdog cannot shut a pooled socket down
            now = self._clock()
            if not guard.expired and not self._worn_out(connection, now):
                connection.last_used = now
                connection.pooled = True
                with self._lock:
                    self._idle.setdefault(key, []).append(connection)
                return
        hang_up(connection.smtp)
