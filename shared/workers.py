"""Consumer and sender: the reliable hand-off from Redis to SMTP.

Each worker moves an envelope into its own processing list (BLMOVE), does the work, records it,
and only then removes the envelope. A heartbeat key with a TTL says the worker is alive; when it
is gone, the sweep returns whatever is left in the worker's processing list.

``step`` takes a batch of up to BATCH envelopes, handles them and returns their outcomes — tests
drive it directly. ``run`` is the loop around it with threads, the heartbeat and SIGTERM handling.
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
from shared.db import is_unavailable
from shared.domain import SmtpSecurity, Status
from shared.errors import EnvelopeDecodeError, PermanentSmtpError, SmtpError, TransientSmtpError

log = logging.getLogger("mailq.worker")

BLOCK_SECONDS = 1  # how long one BLMOVE waits; bounds how fast a worker notices SIGTERM
# Envelopes taken per step: one round trip to Redis and one to PostgreSQL serve the whole batch
# (measured: database CPU per mail halved). Each outcome is still recorded right after its send.
BATCH = 20


class Outcome(Enum):
    DROPPED = "dropped"  # nothing to do for this envelope (unknown, terminal, not due, taken)
    HANDED_OFF = "handed_off"  # consumer: passed on to the senders
    SENT = "sent"
    FAILED = "failed"  # transient failure, will be retried
    CANCELLED = "cancelled"  # permanent failure or tries used up
    STALE = "stale"  # the outcome lost the fencing check: the lease was taken over
    RELEASED = "released"  # claimed but never tried; given back to the queue


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

    def __init__(
        self, settings: Settings, engine: Engine, client: redis.Redis, *, now=utcnow, batch: int = BATCH
    ):
        self.settings = settings
        self.batch = batch
        self.engine = engine
        self.redis = client
        self.now = now
        self.id = f"{self.role}:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.processing = queue.processing_list(self.id)
        self.stopping = threading.Event()
        self._held = threading.local()  # the envelopes of the step a thread is in
        # Moves an envelope back only if it is still ours: one already acked is not pushed twice.
        self._give_back_script = client.register_script(
            "if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then "
            "redis.call('RPUSH', KEYS[2], ARGV[1]) return 1 end return 0"
        )
        self.heartbeat_file = Path(settings.heartbeat_file)

    # --- Redis bookkeeping ---

    def register(self) -> None:
        self.beat()

    def beat(self) -> None:
        """Say we are alive; registering again each time survives a Redis that restarted empty."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(queue.WORKERS, self.id, self.source)
        pipe.set(queue.heartbeat_key(self.id), "1", ex=self.settings.heartbeat_ttl)
        pipe.execute()
        try:
            self.heartbeat_file.touch()
        except OSError:
            pass

    def wait_for_redis(self) -> bool:
        """Register, retrying with backoff while Redis is down; False if told to stop meanwhile."""
        delay = 0.5
        while not self.stopping.is_set():
            try:
                self.register()
                return True
            except redis.RedisError as exc:
                log.warning(
                    "%s: Redis unavailable at start (%s); retrying in %.1fs",
                    self.id,
                    type(exc).__name__,
                    delay,
                )
                self.stopping.wait(delay)
                delay = min(delay * 2, 10.0)
        return False

    def take(self, timeout: float = BLOCK_SECONDS) -> bytes | None:
        """Move the next envelope into our processing list (None when the list stayed empty)."""
        return self.redis.blmove(self.source, self.processing, timeout, "RIGHT", "LEFT")

    def take_many(self, timeout: float = BLOCK_SECONDS) -> list[bytes]:
        """Block for one envelope, then take up to ``batch`` in all without waiting (one round trip)."""
        first = self.take(timeout)
        if first is None:
            return []
        if self.batch == 1:
            return [first]
        pipe = self.redis.pipeline(transaction=False)
        for _ in range(self.batch - 1):
            pipe.lmove(self.source, self.processing, "RIGHT", "LEFT")
        try:
            more = pipe.execute()
        except redis.RedisError:
            return [first]  # work with what we hold; anything moved meanwhile goes back at shutdown
        return [first, *(raw for raw in more if raw is not None)]

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

    def step(self, timeout: float = BLOCK_SECONDS) -> list[Outcome]:
        """Take a batch of envelopes, handle them, and let go of them. [] when there was nothing."""
        raws = self.take_many(timeout)
        if not raws or self.stopping.is_set():
            return []  # taken during shutdown: return_all() hands them back
        self._held.raws = raws  # if this step fails, _loop gives back whatever is still in our list
        outcomes: list[Outcome] = []
        envelopes: list[tuple[int, bytes]] = []
        for raw in raws:
            try:
                envelopes.append((queue.decode(raw), raw))
            except EnvelopeDecodeError as exc:
                log.warning("%s dropped a malformed envelope: %s", self.id, exc)
                self.ack(raw)
                outcomes.append(Outcome.DROPPED)
        if envelopes:
            outcomes += self.handle(envelopes)
        self._held.raws = []
        return outcomes

    def give_back(self, raws: list[bytes]) -> int:
        """Return to the source list those of ``raws`` still in our processing list (atomically each)."""
        returned = 0
        for raw in raws:
            returned += self._give_back_script(keys=[self.processing, self.source], args=[raw])
        return returned

    def handle(self, envelopes: list[tuple[int, bytes]]) -> list[Outcome]:
        """Do the work for (task id, envelope) pairs; every envelope is let go of before returning."""
        raise NotImplementedError

    def idle(self) -> None:
        """Called by the heartbeat thread between beats."""

    def close(self) -> None:
        """Release what the worker holds (connections)."""

    def run(self) -> None:
        """Loop with ``threads`` workers until ``stopping`` is set, then hand back and exit."""
        threads_count = self.threads()
        if not self.wait_for_redis():
            return
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
            except Exception as exc:
                if isinstance(exc, redis.RedisError) or is_unavailable(exc):
                    log.warning("%s: %s unavailable (%s); retrying", self.id, _which(exc), type(exc).__name__)
                else:
                    log.exception("%s: unexpected error; continuing", self.id)
                self._recover()

    def _recover(self) -> None:
        """After a failed step: wait, then hand back the envelopes that step still holds.

        Without this they would sit in a live worker's processing list until the sweep's leak
        window; handing them back is safe because every claim is conditional.
        """
        held = getattr(self._held, "raws", [])
        while not self.stopping.wait(1.0):
            try:
                self.give_back(held)
                break
            except redis.RedisError:
                continue  # Redis is down too; stopping or the next try will deal with them
        self._held.raws = []


def _which(exc: BaseException) -> str:
    return "Redis" if isinstance(exc, redis.RedisError) else "PostgreSQL"


class Consumer(Worker):
    """Checks each task and hands the live ones to the senders."""

    role = "consumer"
    source = queue.TASK_LIST

    def threads(self) -> int:
        return self.settings.queue_consumer_count

    def handle(self, envelopes: list[tuple[int, bytes]]) -> list[Outcome]:
        ids = list(dict.fromkeys(task_id for task_id, _ in envelopes))
        with self.engine.connect() as conn:
            live = set(conn.execute(_QUEUED_SQL, {"ids": ids}).scalars())
        outcomes, forward = [], []
        for task_id, raw in envelopes:
            # Unknown, terminal, not yet due, already with a sender, or a duplicate in this batch:
            # dropped here; the sweep owns anything that still needs to go.
            if task_id in live:
                live.discard(task_id)
                forward.append(raw)
                outcomes.append(Outcome.HANDED_OFF)
            else:
                outcomes.append(Outcome.DROPPED)
        pipe = self.redis.pipeline(transaction=True)  # hand-off and release in one step
        if forward:
            pipe.lpush(queue.SEND_LIST, *forward)
        for _, raw in envelopes:
            pipe.lrem(self.processing, 1, raw)
        pipe.execute()
        return outcomes


_QUEUED_SQL = sa.text("SELECT id FROM tasks WHERE id = ANY(CAST(:ids AS bigint[])) AND status = 'queued'")


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
     WHERE t.id = ANY(CAST(:ids AS bigint[])) AND t.status = 'queued' AND t.try_count < :max_tries
       AND u.id = t.user_id
 RETURNING t.id, t.try_count, t.recipient_email, t.subject, t.body, t.message_id, t.created_at,
           u.email AS sender_email, u.smtp_host, u.smtp_port, u.smtp_username, u.smtp_password_enc,
           u.smtp_security
    """
)

_RELEASE_SQL = sa.text(
    """
    UPDATE tasks SET status = 'queued', try_count = try_count - 1, lease_until = NULL, updated_at = now()
     WHERE id = :id AND try_count = :try_count AND status = 'processing'
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

    def claim_many(self, task_ids: list[int]) -> dict[int, Claim]:
        """Claim every task that is still queued, in one statement; only one sender can win each."""
        with self.engine.begin() as conn:
            rows = conn.execute(
                _CLAIM_SQL,
                {
                    "ids": task_ids,
                    "lease": self.settings.lease_seconds,
                    "max_tries": self.settings.max_try_count,
                },
            ).all()
        return {row.id: Claim(**row._asdict()) for row in rows}

    def claim(self, task_id: int) -> Claim | None:
        return self.claim_many([task_id]).get(task_id)

    def handle(self, envelopes: list[tuple[int, bytes]]) -> list[Outcome]:
        claims = self.claim_many(list(dict.fromkeys(task_id for task_id, _ in envelopes)))
        claimed_at = time.monotonic()
        outcomes: list[Outcome] = []
        try:
            self._send_batch(envelopes, claims, claimed_at, outcomes)
        except BaseException:
            # Claims never tried go back to queued now rather than wait for their lease.
            for claim in claims.values():
                try:
                    with self.engine.begin() as conn:
                        conn.execute(_RELEASE_SQL, {"id": claim.id, "try_count": claim.try_count})
                except Exception:  # noqa: BLE001 - best effort: the lease recovers it otherwise
                    break
            raise
        return outcomes

    def _send_batch(self, envelopes, claims: dict[int, Claim], claimed_at: float, outcomes: list[Outcome]):
        for task_id, raw in envelopes:
            claim = claims.pop(task_id, None)
            if claim is None:
                self.ack(raw)  # a duplicate envelope, or a task that is not queued: nothing to send
                outcomes.append(Outcome.DROPPED)
            elif self.stopping.is_set() or time.monotonic() - claimed_at > self.settings.lease_seconds / 2:
                # Not started: give it back rather than send it late (stopping, or the lease is
                # running short behind a slow server).
                outcomes.append(self.release(claim, raw))
            else:
                outcomes.append(self.deliver(claim))
                self.ack(raw)

    def release(self, claim: Claim, raw: bytes) -> Outcome:
        """Undo a claim that was never tried, and put its envelope back on the send list."""
        with self.engine.begin() as conn:
            conn.execute(_RELEASE_SQL, {"id": claim.id, "try_count": claim.try_count})
        pipe = self.redis.pipeline(transaction=True)
        pipe.rpush(self.source, raw)  # the head of the list: it is the next one taken
        pipe.lrem(self.processing, 1, raw)
        pipe.execute()
        return Outcome.RELEASED

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
            except Exception as exc:
                if not is_unavailable(exc) or time.monotonic() > deadline:
                    raise
                log.warning(
                    "%s: recording task %d failed (%s); retrying", self.id, claim.id, type(exc).__name__
                )
                time.sleep(0.5)
        if updated == 0:
            log.warning("%s: task %d outcome %s discarded: lease was taken over", self.id, claim.id, status)
            return Outcome.STALE
        # A success per mail is DEBUG (it is the hot path); anything else is worth a line.
        level = logging.DEBUG if status == Status.SENT else logging.INFO
        log.log(
            level, "task %d try %d -> %s%s", claim.id, claim.try_count, status, f" ({error})" if error else ""
        )
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
