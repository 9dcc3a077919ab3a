"""The webhook worker: takes deliveries endpoint by endpoint, POSTs each within WEBHOOK_TIMEOUT, and
records what the receiver said behind the fencing token (the delivery's ``attempts``).

- **Fair share and a cap per endpoint**, from the senders' fair queue under its own keys
  (``queue.WEBHOOK_KEYS``): one delivery per endpoint per turn of the ring, at most
  WEBHOOK_MAX_CONCURRENCY_PER_ENDPOINT requests in flight to one receiver across all workers, so a slow
  or dead receiver holds a few threads for WEBHOOK_TIMEOUT each, never the worker; and at most
  WEBHOOK_MAX_CONCURRENCY_PER_USER to all of one user's endpoints (fairqueue.GroupCap), however many.
- **Reliable hand-off**, as for the senders: a taken envelope sits in this worker's processing list
  until its outcome is recorded; a dead worker's list is rescued by the sweep (to WEBHOOK_RETURNED,
  then back into the endpoints' queues), a delivery whose worker died is taken back when its lease
  runs out, and a delivery whose envelope was lost is pushed again after SWEEP_LEAK_WINDOW.
- **Outcomes**: 2xx → delivered; 410 → the endpoint is disabled and its waiting deliveries fail;
  anything else, a timeout or a connection error → retried after WEBHOOK_RETRY_SCHEDULE's next delay
  (or the receiver's Retry-After, if longer), then failed (a user can replay it).
- **Retries due** are queued again by ``requeue_due`` — run by the sweep and, every second, by each
  running webhook worker — from partial indexes, like the task sweep.

``step()`` takes and handles work in the calling thread (tests drive it); ``run()`` runs a dispatcher
and WEBHOOK_WORKER_COUNT request threads.
"""

from __future__ import annotations

import logging
import queue as stdqueue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import redis
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from shared import queue
from shared.config import Settings
from shared.crypto import SecretBox
from shared.errors import ConfigError, EnvelopeDecodeError
from shared.fairqueue import GroupCap, SendQueue, Taken
from shared.tasks import events
from shared.webhooks.receiver import Answer, Receiver
from shared.webhooks.requeue import requeue_due, reroute_returned
from shared.workers import BLOCK_SECONDS, Worker, dependency_of, utcnow

log = logging.getLogger("mailq.webhooks")

DUE_EVERY = 1.0  # seconds between a running worker's looks for retries that came due
DISABLED_BY_410 = "the receiver answered 410 Gone: the endpoint was disabled"

# Outcomes of handle(), for tests and logs.
DELIVERED, RETRYING, FAILED, DROPPED, STALE, RELEASED = (
    "delivered",
    "retrying",
    "failed",
    "dropped",
    "stale",
    "released",
)


@dataclass(frozen=True)
class Claim:
    id: int
    attempts: int
    endpoint_id: int
    user_id: int
    url: str
    enabled: bool
    secret_enc: str
    previous_secret_enc: str | None  # only while the rotation's overlap lasts
    event_id: int
    type: str
    data: dict[str, Any]
    created_at: datetime


# An attempt starts here: it counts, and the lease keeps the sweep off a delivery in flight.
_CLAIM_SQL = sa.text(
    """
    UPDATE webhook_deliveries AS d
       SET state = 'sending', attempts = d.attempts + 1,
           lease_until = now() + make_interval(secs => :lease), updated_at = now()
      FROM webhook_endpoints AS w, webhook_events AS e
     WHERE d.id = :id AND d.state = 'queued' AND w.id = d.endpoint_id AND e.id = d.event_id
 RETURNING d.id, d.attempts, d.endpoint_id, w.user_id, w.url, w.enabled, w.secret_enc,
           CASE WHEN w.previous_secret_until > now() THEN w.previous_secret_enc END AS previous_secret_enc,
           e.id AS event_id, e.type, e.data, e.created_at
    """
)

# Fenced on attempts: a late outcome of an attempt the sweep took back (and someone retried) is dropped.
_OUTCOME_SQL = sa.text(
    """
    UPDATE webhook_deliveries
       SET state = :state, last_status = :status, last_error = :error,
           next_attempt_at = now() + make_interval(secs => :delay), lease_until = NULL,
           delivered_at = CASE WHEN CAST(:state AS text) = 'delivered' THEN now() END,
           updated_at = now()
     WHERE id = :id AND attempts = :attempts AND state IN ('sending', 'queued')
    """
)

# 410 Gone: nothing more goes to this endpoint; what waits for it ends now, still replayable.
_DISABLE_SQL = sa.text(
    """
    WITH w AS (
        UPDATE webhook_endpoints SET enabled = false, disabled_reason = :reason, updated_at = now()
         WHERE id = :endpoint_id
    )
    UPDATE webhook_deliveries
       SET state = 'failed', last_error = :reason, lease_until = NULL, next_attempt_at = now(),
           updated_at = now()
     WHERE endpoint_id = :endpoint_id AND state IN ('scheduled', 'queued')
    """
)


class WebhookWorker(Worker):
    """Sends webhook deliveries, endpoint by endpoint, each request within WEBHOOK_TIMEOUT."""

    role = "webhooks"
    source = queue.WEBHOOK_RETURNED

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        client: redis.Redis,
        box: SecretBox,
        *,
        now=utcnow,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        receiver: Receiver | None = None,
    ):
        super().__init__(settings, engine, client, now=now)
        self.box = box
        self.wall = wall  # webhook-timestamp: Unix seconds of the attempt
        self.fairq = SendQueue(client, queue.WEBHOOK_KEYS)
        # Per user as well as per endpoint: ten slow endpoints of one user hold this many threads, not 20.
        self.per_user = GroupCap(
            queue.WEBHOOK_OWNERS, queue.WEBHOOK_USER_SLOTS_PREFIX, settings.webhook_max_concurrency_per_user
        )
        self.receiver = receiver or Receiver(
            timeout=settings.webhook_timeout,
            allow_http=settings.webhook_allow_http,
            allow_private=settings.webhook_allow_private_hosts,
            clock=clock,
        )
        self._holder = f"{self.id}:"
        self._work: stdqueue.Queue[Taken] = stdqueue.Queue()
        self._idle = threading.Semaphore(settings.webhook_worker_count)
        self._dispatching = threading.Event()
        self._next_due = 0.0

    # --- taking work ---

    def take(self, count: int) -> list[Taken]:
        s = self.settings
        return self.fairq.take(
            self.processing,
            self._holder,
            count,
            s.webhook_max_concurrency_per_endpoint,
            s.webhook_lease_seconds * 1000,
            self.per_user,
        )

    def due(self, force: bool = False) -> None:
        """At most every DUE_EVERY seconds: queue the retries that came due (and anything stranded)."""
        if force or time.monotonic() >= self._next_due:
            self._next_due = time.monotonic() + DUE_EVERY
            reroute_returned(self.fairq)
            requeue_due(self.settings, self.engine, self.fairq)

    def step(self, timeout: float = 0.0, count: int | None = None) -> list[str]:
        """Queue what is due, take up to ``count`` deliveries (waiting up to ``timeout`` for one) and
        handle each in turn."""
        self.due(force=True)
        count = count or self.settings.webhook_worker_count
        taken = self.take(count)
        if not taken and timeout > 0 and self.fairq.wait(timeout):
            taken = self.take(count)
        return [self.handle(item) for item in taken]

    # --- one delivery ---

    def handle(self, item: Taken) -> str:
        """Claim, send and record one taken envelope; every path lets go of it before returning."""
        try:
            delivery_id, _ = queue.decode_delivery(item.raw)
        except EnvelopeDecodeError as exc:
            log.warning("%s dropped a malformed envelope: %s", self.id, exc)
            self.done(item)
            return DROPPED
        owner = None
        try:
            with self.engine.begin() as conn:
                row = conn.execute(
                    _CLAIM_SQL, {"id": delivery_id, "lease": self.settings.webhook_lease_seconds}
                ).one_or_none()
        except Exception as exc:
            log.warning("%s: claiming delivery %d failed (%s)", self.id, delivery_id, type(exc).__name__)
            self._give_back(item, delivery_id)
            if dependency_of(exc) is None:
                raise
            self.stopping.wait(1.0)  # PostgreSQL is away: this thread backs off instead of spinning
            return RELEASED
        try:
            if row is None:  # a duplicate envelope, or the delivery is no longer waiting: nothing to send
                return DROPPED
            owner = row.user_id
            return self.attempt(Claim(**row._asdict()))
        finally:
            # Let go on every path, a failed record too: the claim's lease and fencing keep it safe.
            self.done(item, owner)

    def attempt(self, claim: Claim) -> str:
        """POST the delivery and record the answer; no transaction is open while the receiver talks."""
        if not claim.enabled:
            return self.record(claim, "failed", None, "the endpoint is disabled")
        try:
            secrets = [self.box.decrypt(s) for s in (claim.secret_enc, claim.previous_secret_enc) if s]
        except ConfigError as exc:  # a worker fault: the lease gives the delivery back
            log.error("%s: WORKER FAULT: %s (endpoint %d)", self.id, exc, claim.endpoint_id)
            return RELEASED
        msg_id = events.webhook_id(claim.event_id)
        payload = events.body(claim.type, claim.created_at, claim.data)
        headers = events.headers(msg_id, int(self.wall()), payload, secrets)
        started = time.monotonic()
        answer = self.receiver.post(claim.url, payload, headers)
        self.metrics.webhook_seconds.observe(time.monotonic() - started)
        outcome = self._conclude(claim, answer)
        self.metrics.webhooks.labels(outcome).inc()
        return outcome

    def _conclude(self, claim: Claim, answer: Answer) -> str:
        if answer.status is not None and 200 <= answer.status < 300:
            return self.record(claim, "delivered", answer.status, None)
        if answer.status == 410:
            return self.record(claim, "failed", 410, DISABLED_BY_410, disable=True)
        return self._retry(claim, answer)

    def _retry(self, claim: Claim, answer: Answer) -> str:
        error = answer.error or f"the receiver answered {answer.status}"
        schedule = self.settings.webhook_retry_schedule
        if claim.attempts > len(schedule):
            return self.record(
                claim, "failed", answer.status, f"{error} (gave up after {claim.attempts} attempts)"
            )
        delay = schedule[claim.attempts - 1]
        if answer.retry_after is not None:  # honoured when it asks for longer, up to the longest delay
            delay = max(delay, min(answer.retry_after, max(schedule)))
        return self.record(claim, "scheduled", answer.status, error, delay=delay)

    def record(
        self,
        claim: Claim,
        state: str,
        status: int | None,
        error: str | None,
        *,
        delay: float = 0.0,
        disable: bool = False,
    ) -> str:
        """Write the outcome behind the fencing token (and disable the endpoint on a 410)."""
        params = {
            "id": claim.id,
            "attempts": claim.attempts,
            "state": state,
            "status": status,
            "error": error[:1000] if error else None,
            "delay": delay,
        }
        with self.engine.begin() as conn:
            updated = conn.execute(_OUTCOME_SQL, params).rowcount
            if updated and disable:
                conn.execute(_DISABLE_SQL, {"endpoint_id": claim.endpoint_id, "reason": DISABLED_BY_410})
        if not updated:
            log.warning("%s: delivery %d outcome %s discarded: taken back since", self.id, claim.id, state)
            return STALE
        level = logging.DEBUG if state == "delivered" else logging.INFO
        log.log(
            level,
            "delivery %d attempt %d -> %s%s",
            claim.id,
            claim.attempts,
            state,
            f" ({error})" if error else "",
        )
        return {"delivered": DELIVERED, "scheduled": RETRYING}.get(state, FAILED)

    # --- letting go ---

    def done(self, item: Taken, owner: int | None = None) -> None:
        try:
            self.fairq.release_group(self.per_user, item, owner)  # first: done() may wake a taker
            self.fairq.done(self.processing, item)
        except redis.RedisError:
            pass  # it stays in our processing list: shutdown or the sweep puts it back; its claim is fenced

    def _give_back(self, item: Taken, delivery_id: int) -> None:
        try:
            self.fairq.release_group(self.per_user, item, None)
            self.fairq.give_back(self.processing, item, delivery_id)
        except redis.RedisError:
            pass

    # --- running ---

    def loops(self):
        self._dispatching.set()
        requests = [(f"webhooks-{i}", self._request_loop) for i in range(self.settings.webhook_worker_count)]
        return [("webhooks-dispatch", self._dispatch), *requests]

    def _dispatch(self) -> None:
        """Take work for idle request threads, fairly; sleep on the bell when there is none."""
        try:
            while not self.stopping.is_set():
                self.mark_progress()
                try:
                    self.due()
                except Exception as exc:  # noqa: BLE001 - the next round (or the sweep) does it
                    log.warning("%s: queueing due deliveries failed (%s)", self.id, type(exc).__name__)
                if not self._idle.acquire(timeout=BLOCK_SECONDS):
                    continue
                free = 1
                while free < self.settings.webhook_worker_count and self._idle.acquire(blocking=False):
                    free += 1
                try:
                    taken = [] if self.stopping.is_set() else self.take(free)
                except Exception as exc:  # noqa: BLE001
                    taken = []
                    log.warning("%s: taking work failed (%s)", self.id, type(exc).__name__)
                    self.stopping.wait(1.0)
                for item in taken:
                    self._work.put(item)
                for _ in range(free - len(taken)):
                    self._idle.release()
                if not taken and not self.stopping.is_set():
                    try:
                        self.fairq.wait(BLOCK_SECONDS)
                    except redis.RedisError:
                        self.stopping.wait(1.0)
        finally:
            self._dispatching.clear()

    def _request_loop(self) -> None:
        while True:
            try:
                item = self._work.get(timeout=0.2)
            except stdqueue.Empty:
                if self.stopping.is_set() and not self._dispatching.is_set():
                    return
                continue
            try:
                if self.stopping.is_set():
                    self._give_back(item, _delivery_id_or_zero(item))  # not started: give it back
                else:
                    self.handle(item)
            except Exception:  # handle() lets go of the envelope on every path it knows
                log.exception("%s: unexpected error", self.id)
            finally:
                self._idle.release()

    def shutdown(self) -> None:
        while True:  # anything the dispatcher took after the threads were gone
            try:
                item = self._work.get_nowait()
            except stdqueue.Empty:
                break
            self._give_back(item, _delivery_id_or_zero(item))
        super().shutdown()  # what is left goes to WEBHOOK_RETURNED ...
        try:
            reroute_returned(self.fairq)  # ... and from there straight back into its endpoint's queue
        except redis.RedisError:
            pass  # the sweep does it

    def close(self) -> None:
        self.receiver.close()


def _delivery_id_or_zero(item: Taken) -> int:
    try:
        return queue.decode_delivery(item.raw)[0]
    except EnvelopeDecodeError:
        return 0
