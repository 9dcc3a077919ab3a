"""The sender's view of an account: what it needs to open a connection before it claims any mail.

A sender opens (or takes from its pool) the account's connection *before* it claims a task, so that
whatever the relay says about the account (cannot connect, 421, AUTH refused) never touches a task. It
reads the account for that from a cache, per sender process: the read is one primary-key lookup, made
again whenever a new connection is opened (so every AUTH uses the credentials as they are now), and
every claim returns the account's version (``users.updated_at``), so a cached entry that fell behind a
change is replaced as soon as the next claim shows it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from shared import pace
from shared.config import Settings
from shared.prepared import alone, run_alone

MAX_CACHED = 10_000  # accounts one sender remembers; the least recently read go first

_READ_SQL = alone(
    sa.text(
        """
    SELECT id, email, smtp_host, smtp_port, smtp_username, smtp_password_enc, smtp_security,
           updated_at AS version, smtp_paused_at IS NOT NULL AS paused, smtp_max_connections,
           smtp_send_limits, smtp_backoff_since IS NOT NULL AS backing_off
      FROM users WHERE id = :id
    """
    )
)


@dataclass(frozen=True)
class Account:
    id: int
    email: str
    host: str
    port: int
    username: str
    password_enc: str = field(repr=False)
    security: str
    version: datetime  # users.updated_at: a claim with another version means the account changed since
    paused: bool
    max_connections: int  # declared, or the deployment's SMTP_MAX_CONNECTIONS_PER_ACCOUNT
    limits: str  # the declared send windows, as shared.pace encodes them ('' for none)
    backing_off: bool  # PostgreSQL's mirror says a backoff episode is open


class Accounts:
    """Accounts by user id, read once and kept until a claim shows they changed."""

    def __init__(self, engine: Engine, settings: Settings):
        self.engine = engine
        self.settings = settings
        self._cache: dict[int, Account] = {}
        self._lock = threading.Lock()

    def get(self, user_id: int) -> Account | None:
        """The cached account, or a fresh read."""
        with self._lock:
            account = self._cache.get(user_id)
        return account if account is not None else self.read(user_id)

    def read(self, user_id: int) -> Account | None:
        """The account as PostgreSQL has it now (None: the user is gone); cached."""
        rows = run_alone(self.engine, _READ_SQL, {"id": user_id})
        if not rows:
            self.forget(user_id)
            return None
        account = self._account(rows[0])
        with self._lock:
            if len(self._cache) >= MAX_CACHED:
                self._cache.pop(next(iter(self._cache)))
            self._cache[user_id] = account
        return account

    def check(self, user_id: int, version: datetime) -> None:
        """A claim saw the account at ``version``: forget a cached entry of another one."""
        with self._lock:
            cached = self._cache.get(user_id)
            if cached is not None and cached.version != version:
                del self._cache[user_id]

    def forget(self, user_id: int) -> None:
        with self._lock:
            self._cache.pop(user_id, None)

    def _account(self, row: Any) -> Account:
        declared = row.smtp_max_connections or self.settings.smtp_max_connections_per_account
        return Account(
            id=row.id,
            email=row.email,
            host=row.smtp_host,
            port=row.smtp_port,
            username=row.smtp_username,
            password_enc=row.smtp_password_enc,
            security=row.smtp_security,
            version=row.version,
            paused=row.paused,
            max_connections=min(declared, self.settings.smtp_max_connections_per_account_limit),
            limits=pace.encode_limits(row.smtp_send_limits or []),
            backing_off=row.backing_off,
        )
