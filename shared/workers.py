"""Consumer and sender: the reliable hand-off from Redis to SMTP.

Each worker moves an envelope into its own processing list (BLMOVE), does the work, records it,
and only then removes the envelope. A heartbeat key with a TTL says the worker is alive; when it
is gone, the sweep returns whatever is left in the worker's processing list.

``process_one`` handles one envelope and returns — tests drive it directly. ``run`` is the loop
around it with threads, the heartbeat and SIGTERM handling.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import Enum
from pathlib import Path

import redis
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from shared import queue
from shared.config import Settings
from shared.crypto import SecretBox
from shared.db import tasks
from shared.domain import SmtpSecurity, Status
from shared.errors import EnvelopeDecodeError, PermanentSmtpError, SmtpError, TransientSmtpError

log = logging.getLogger("mailq.worker")

BLOCK_SECONDS = 1  # how long one BLMOVE waits; bounds how fast a worker notices SIGTERM


class Outcome(Enum):
    DROPPED = "dropped"  # nothing to do for this envelope (unknown, terminal, not due, taken)
    HANDED_OFF = "handed_off"  # consumer: passed on to the senders
    SENT = "sent"
    FAILED = "failed"  # transient failure, will be retried
    CANCELLED = "cancelled"  # permanent failure or tries used up
    STALE = "stale"  # the outcome lost the fencing check: the lease was taken over


def utcnow() -> datetime:
    return datetime.now(UTC)


def backoff_seconds(
    try_count: int, base: float, cap: float, rng: Callable[[], float] = random.random
) -> float:
    """Delay before try ``try_count + 1``: base doubled per try, capped, with equal jitter."""
    delay = min(cap, base * (2 ** max(0, try_count - 1)))
    return min(cap, delay / 2 + rng() * delay / 2)


class Worker:
    """What consumer and sender share: identity, processing list, heartbeat, shutdown."""

    role = "worker"
    source = ""

    def __init__(self, settings: Settings, engine: Engine, client: redis.Redis, *, now=utcnow):
        self.settings = settings
        self.engine = engine
        self.redis = client
        self.now = now
        self.id = f"{self.role}:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.processing = queue.processing_list(self.id)
        self.stopping = threading.Event()
        self.heartbeat_file = Path(settings.heartbeat_file)

    # --- Redis bookkeeping ---

    def register(self) -> None:
        pipe = self.redis.pipeline()
        pipe.hset(queue.WORKERS, self.id, self.source)
        pipe.set(queue.heartbeat_key(self.id), "1", ex=self.settings.heartbeat_ttl)
        pipe.execute()

    def beat(self) -> None:
        self.redis.set(queue.heartbeat_key(self.id), "1", ex=self.settings.heartbeat_ttl)
        try:
            self.heartbeat_file.touch()
        except OSError:
            pass

    def take(self, timeout: float = BLOCK_SECONDS) -> bytes | None:
        """Move the next envelope into our processing list (None when the list stayed empty)."""
        return self.redis.blmove(self.source, self.processing, timeout, "RIGHT", "LEFT")

    def ack(self, raw: bytes) -> None:
        self.redis.lrem(self.processing, 1, raw)

    def return_all(self) -> int:
        """Put every envelope we still hold back at the head of our source list."""
        moved = 0
        while self.redis.lmove(self.processing, self.source, "LEFT", "RIGHT") is not None:
            moved += 1
        return moved

    def unregister(self) -> None:
        pipe = self.redis.pipeline()
        pipe.hdel(queue.WORKERS, self.id)
        pipe.delete(queue.heartbeat_key(self.id))
        pipe.execute()

    # --- the work ---

    def process_one(self, raw: bytes) -> Outcome:
        raise NotImplementedError

    def step(self, timeout: float = BLOCK_SECONDS) -> Outcome | None:
        """Take one envelope, handle it, and let go of it. None when there was nothing to take."""
        raw = self.take(timeout)
        if raw is None:
            return None
        if self.stopping.is_set():
            return None  # taken during shutdown: return_all() hands it back
        try:
            task_id = queue.decode(raw)
        except EnvelopeDecodeError as exc:
            log.warning("%s dropped a malformed envelope: %s", self.id, exc)
            self.ack(raw)
            return Outcome.DROPPED
        outcome = self.handle(task_id, raw)
        return outcome

    def handle(self, task_id: int, raw: bytes) -> Outcome:
        raise NotImplementedError

    def idle(self) -> None:
        """Called by the heartbeat thread between beats."""

    def close(self) -> None:
        """Release what the worker holds (connections)."""

    def run(self) -> None:
        """Loop with ``threads`` workers until ``stopping`` is set, then hand back and exit."""
        threads_count = self.threads()
        self.register()
        self.beat()
        log.info("%s started with %d thread(s) on %s", self.id, threads_count, self.source)
        threads = [
            threading.Thread(target=self._loop, name=f"{self.role}-{i}", daemon=True)
            for i in range(threads_count)
        ]
        for t in threads:
            t.start()
        beat_every = max(1.0, self.settings.heartbeat_ttl / 3)
        try:
            while not self.stopping.wait(beat_every):
                try:
                    self.beat()
                    self.idle()
                except redis.RedisError as exc:
                    log.warning("%s heartbeat failed: %s", self.id, type(exc).__name__)
        finally:
            self.stopping.set()
            for t in threads:
                t.join()
            try:
                returned = self.return_all()
                self.unregister()
                log.info("%s stopped; returned %d envelope(s)", self.id, returned)
            except redis.RedisError as exc:
                log.warning("%s could not hand back its envelopes (%s); the sweep will", self.id, exc)
            self.close()

    def threads(self) -> int:
        return 1

    def _loop(self) -> None:
        while not self.stopping.is_set():
            try:
                self.step()
            except (redis.RedisError, sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
                # A dependency is down: wait and try again; the envelope stays in our processing list.
                log.warning("%s: %s; retrying in 1s", self.id, type(exc).__name__)
                self.stopping.wait(1.0)
            except Exception:
                log.exception("%s: unexpected error; continuing", self.id)
                self.stopping.wait(1.0)


class Consumer(Worker):
    """Checks each task and hands the live ones to the senders."""

    role = "consumer"
    source = queue.TASK_LIST

    def threads(self) -> int:
        return self.settings.queue_consumer_count

    def handle(self, task_id: int, raw: bytes) -> Outcome:
        with self.engine.connect() as conn:
            status = conn.execute(sa.select(tasks.c.status).where(tasks.c.id == task_id)).scalar_one_or_none()
        if status != Status.QUEUED:
            # Unknown, terminal, not yet due, or already with a sender: the sweep owns it now.
            self.ack(raw)
            return Outcome.DROPPED
        pipe = self.redis.pipeline(transaction=True)  # hand-off and release in one step
        pipe.lpush(queue.SEND_LIST, raw)
        pipe.lrem(self.processing, 1, raw)
        pipe.execute()
        return Outcome.HANDED_OFF


@dataclass(frozen=True)
class Claim:
    id: int
    try_count: int
    recipient_email: str
    subject: str
    body: str
    message_id: str
    created_at: datetime
    sender_email: str
    smtp_host: str
    smtp_port: int
    smtp_username: str
    smtp_password_enc: str
    smtp_security: str


_CLAIM_SQL = sa.text(
    """
    UPDATE tasks AS t
       SET status = 'processing',
           try_count = t.try_count + 1,
           lease_until = now() + make_interval(secs => :lease),
           updated_at = now()
      FROM users AS u
     WHERE t.id = :id AND t.status = 'queued' AND t.try_count < :max_tries AND u.id = t.user_id
 RETURNING t.id, t.try_count, t.recipient_email, t.subject, t.body, t.message_id, t.created_at,
           u.email AS sender_email, u.smtp_host, u.smtp_port, u.smtp_username, u.smtp_password_enc,
           u.smtp_security
    """
)

# The try count is the fencing token: a sender whose lease was taken over matches nothing here.
_OUTCOME_SQL = sa.text(
    """
    UPDATE tasks
       SET status = :status, last_error = :last_error, next_attempt_at = :next_attempt_at,
           lease_until = NULL, sent_at = :sent_at, updated_at = now()
     WHERE id = :id AND try_count = :try_count AND status = 'processing'
    """
)


class Sender(Worker):
    """Claims a task, sends it over the user's SMTP account, records the outcome."""

    role = "sender"
    source = queue.SEND_LIST

    def __init__(self, settings: Settings, engine: Engine, client: redis.Redis, mailer, box: SecretBox, **kw):
        super().__init__(settings, engine, client, **kw)
        self.mailer = mailer
        self.box = box

    def threads(self) -> int:
        return self.settings.worker_count

    def claim(self, task_id: int) -> Claim | None:
        with self.engine.begin() as conn:
            row = conn.execute(
                _CLAIM_SQL,
                {
                    "id": task_id,
                    "lease": self.settings.lease_seconds,
                    "max_tries": self.settings.max_try_count,
                },
            ).one_or_none()
        return Claim(**row._asdict()) if row is not None else None

    def handle(self, task_id: int, raw: bytes) -> Outcome:
        claim = self.claim(task_id)
        if claim is None:
            self.ack(raw)  # a duplicate envelope, or a task that is not queued: nothing to send
            return Outcome.DROPPED
        outcome = self.deliver(claim)
        self.ack(raw)
        return outcome

    def deliver(self, claim: Claim) -> Outcome:
        """Send a claimed task and record what happened; no transaction is open while SMTP talks."""
        from shared.mailer import SmtpAccount, build_message

        now = self.now()
        try:
            message = build_message(
                sender=claim.sender_email,
                recipient=claim.recipient_email,
                subject=claim.subject,
                body=claim.body,
                message_id=claim.message_id,
                date=now,
            )
            account = SmtpAccount(
                host=claim.smtp_host,
                port=claim.smtp_port,
                username=claim.smtp_username,
                password=self.box.decrypt(claim.smtp_password_enc),  # decrypted here, only for this send
                security=SmtpSecurity(claim.smtp_security),
            )
            self.mailer.send(account, message)
        except TransientSmtpError as exc:
            if claim.try_count >= self.settings.max_try_count:
                return self.record(
                    claim, Status.CANCELLED, f"{_reason(exc)} (gave up after {claim.try_count} tries)"
                )
            delay = backoff_seconds(
                claim.try_count, self.settings.retry_backoff_base, self.settings.retry_backoff_max
            )
            return self.record(
                claim, Status.FAILED, _reason(exc), next_attempt_at=now + timedelta(seconds=delay)
            )
        except (PermanentSmtpError, SmtpError) as exc:
            return self.record(claim, Status.CANCELLED, _reason(exc))
        except Exception as exc:  # a bug or bad data must not loop forever: cancel with the reason
            log.exception("%s: task %d could not be built or sent", self.id, claim.id)
            return self.record(claim, Status.CANCELLED, f"internal error: {type(exc).__name__}")
        return self.record(claim, Status.SENT, None, sent_at=self.now())

    def record(self, claim: Claim, status: Status, error: str | None, *, next_attempt_at=None, sent_at=None):
        params = {
            "id": claim.id,
            "try_count": claim.try_count,
            "status": status.value,
            "last_error": error,
            "next_attempt_at": next_attempt_at or self.now(),
            "sent_at": sent_at,
        }
        # The outcome must not be lost to a short PostgreSQL outage: a lost "sent" means a resend.
        deadline = time.monotonic() + max(30.0, self.settings.lease_seconds / 2)
        while True:
            try:
                with self.engine.begin() as conn:
                    updated = conn.execute(_OUTCOME_SQL, params).rowcount
                break
            except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
                if time.monotonic() > deadline:
                    raise
                log.warning(
                    "%s: recording task %d failed (%s); retrying", self.id, claim.id, type(exc).__name__
                )
                time.sleep(0.5)
        if updated == 0:
            log.warning("%s: task %d outcome %s discarded: lease was taken over", self.id, claim.id, status)
            return Outcome.STALE
        log.info("task %d try %d -> %s%s", claim.id, claim.try_count, status, f" ({error})" if error else "")
        return Outcome(status.value)

    def idle(self) -> None:
        self.mailer.close_idle()

    def close(self) -> None:
        self.mailer.close()


def _reason(exc: SmtpError) -> str:
    text = str(exc)
    if exc.code is not None and not text.startswith(str(exc.code)):
        text = f"{exc.code} {text}"
    return text[:1000]
