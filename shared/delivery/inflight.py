"""How much mail a sender holds in memory at once: small mails pass, a large one waits for room.

A sender runs WORKER_COUNT (32) conversations; with 10 MiB attachments, 32 at once would not fit its
384 MiB pod. A mail whose content (text, HTML and attachments) is at most INLINE_BYTES comes with its
claim and is never counted: 32 of them at the peak below stay under 15 MiB. A larger mail's content is
read only after the sender has reserved room for it, WEIGHT times its content out of
SENDER_CONTENT_MEMORY; when there is none, it waits (first come, first served), and a wait longer than
the caller allows gives the claim back without spending a try.

WEIGHT is measured, not guessed (tracemalloc around one sender step, the SMTP server out of the
count): a 10 MiB attachment peaks at 67 MiB while the message is flattened for the wire (the bytes, the
message with their base64, its wire form), and about 1 MiB of HTML and text at 6.3 MiB. The
attachments' bytes are read in slices: pg8000 reads bytea as hex text, which for a whole 10 MiB value
alone would hold about 70 MiB.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

INLINE_BYTES = 64 * 1024
WEIGHT = 7

# The rest of a large mail, read once there is room for it: the texts at once, the attachments' bytes
# in slices of SLICE_BYTES.
CONTENT_SQL = sa.text(
    """
    SELECT t.body, c.html, COALESCE(octet_length(c.attachment_data), 0) AS attachment_bytes
      FROM tasks AS t LEFT JOIN task_contents AS c ON c.task_id = t.id
     WHERE t.id = :id
    """
)
SLICE_SQL = sa.text(
    "SELECT substring(attachment_data FROM :start FOR :length) FROM task_contents WHERE task_id = :id"
)
SLICE_BYTES = 1024 * 1024


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
                data = bytearray()
                while len(data) < row.attachment_bytes:
                    params = {"id": claim.id, "start": len(data) + 1, "length": SLICE_BYTES}
                    data += conn.execute(SLICE_SQL, params).scalar_one()
        except BaseException:
            self.budget.release(reserved)
            raise
        full = dataclasses.replace(claim, body=row.body, html=row.html, attachment_data=data, loaded=True)
        return full, reserved

    def leave(self, reserved: int) -> None:
        self.budget.release(reserved)
