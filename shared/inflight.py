"""How much mail a sender holds in memory at once: small mails pass, a large one waits for room.

A sender runs WORKER_COUNT (32) conversations; with 10 MiB attachments, 32 at once would not fit its
pod. A mail whose content (text, HTML and attachments) is at most INLINE_BYTES comes with its claim
and is never counted: 32 of them at the peak below stay under 60 MiB. A larger mail's content is read
only after the sender has reserved room for it, WEIGHT times its content out of SENDER_CONTENT_MEMORY;
when there is none, it waits (first come, first served), and a wait longer than the caller allows
gives the claim back without spending a try.

WEIGHT is measured, not guessed: reading a 10 MiB attachment from PostgreSQL, building the message,
flattening it and dot-stuffing it for DATA holds about 6.6 times the content at the peak (base64 is
4/3, and the message, its wire form and smtplib's stuffed copy live at once).
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

INLINE_BYTES = 256 * 1024
WEIGHT = 7

# The rest of a large mail, read once there is room for it.
CONTENT_SQL = sa.text(
    """
    SELECT t.body, c.html, c.attachment_data
      FROM tasks AS t LEFT JOIN task_contents AS c ON c.task_id = t.id
     WHERE t.id = :id
    """
)


class ByteBudget:
    """A counting semaphore over bytes, fair to the first waiter (a large request is not starved by a
    stream of smaller ones). A request larger than the whole budget waits until it is all free."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.in_use = 0
        self._lock = threading.Condition()
        self._waiting: collections.deque[object] = collections.deque()

    def acquire(self, amount: int, timeout: float) -> int | None:
        """Reserve ``amount`` (at most the capacity); return what was reserved, or None after timeout."""
        amount = min(amount, self.capacity)
        ticket = object()
        deadline = time.monotonic() + timeout
        with self._lock:
            self._waiting.append(ticket)
            try:
                while self._waiting[0] is not ticket or self.in_use + amount > self.capacity:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return None
                    self._lock.wait(left)
                self.in_use += amount
                return amount
            finally:
                self._waiting.remove(ticket)
                self._lock.notify_all()

    def release(self, amount: int) -> None:
        with self._lock:
            self.in_use -= amount
            self._lock.notify_all()


class Inflight:
    """The room large mails take in one sender process."""

    def __init__(self, engine: Engine, capacity: int):
        self.engine = engine
        self.budget = ByteBudget(capacity)

    def enter(self, claim: Any, wait: float) -> tuple[Any, int] | None:
        """Reserve room for a large claimed mail and read its content; return (the claim with its
        content, the bytes to give back with leave()), or None when no room came within ``wait``."""
        reserved = self.budget.acquire(WEIGHT * claim.content_bytes, wait)
        if reserved is None:
            return None
        try:
            with self.engine.connect() as conn:
                row = conn.execute(CONTENT_SQL, {"id": claim.id}).one()
        except BaseException:
            self.budget.release(reserved)
            raise
        full = dataclasses.replace(
            claim, body=row.body, html=row.html, attachment_data=row.attachment_data, loaded=True
        )
        return full, reserved

    def leave(self, reserved: int) -> None:
        self.budget.release(reserved)
