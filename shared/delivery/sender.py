"""The sender: takes work tenant by tenant and hands each envelope to a conversation thread, which
makes one attempt at its task (shared.delivery.attempt) and lets go of the envelope.

- **Fair share and each account's pace** come from the queue (``shared.fairqueue``, ``shared.pace``):
  one envelope per tenant per turn, no more conversations at once than the account may have, none
  while it is held (backing off, over its declared send limit).
- **The account's connection first, then the claim** (``shared.delivery.relay``): whatever the relay
  says about the account while the connection opens touches no task.
- **Worker faults are not mail faults.** After one (PostgreSQL or Redis unavailable) this sender stops
  taking work for a while, doubling the pause while the faults go on. An account's condition (its
  relay, a password no key decrypts) is never one: it holds or pauses that account only.

``step()`` takes and handles work in the calling thread (tests drive it); ``run()`` runs one
dispatcher thread taking work for WORKER_COUNT conversation threads, and a thread that finishes a
mail takes its next one itself in the same Redis step that lets go of the last.
"""

from __future__ import annotations

import logging
import queue as stdqueue
import random
import threading
import time
from collections.abc import Callable

import redis
from sqlalchemy.engine import Engine

from shared import logs
from shared.config import Settings
from shared.crypto import SecretBox
from shared.delivery.accounts import Accounts
from shared.delivery.attempt import Attempt
from shared.delivery.inflight import Inflight
from shared.delivery.parking import PARK_MARGIN, Parking
from shared.delivery.record import Record
from shared.delivery.relay import Relay, reuse_of
from shared.delivery.unclaimable import Unclaimable
from shared.errors import EnvelopeDecodeError
from shared.fairqueue import SendQueue, Taken
from shared.pace import Pace
from shared.tasks import events
from shared.workers import BLOCK_SECONDS, Outcome, Worker, dependency_of, utcnow

log = logging.getLogger("mailq.sender")

MAX_FAULT_BACKOFF = 60.0  # seconds a sender waits at most after a worker fault before taking again
IDLE_CHECK_SECONDS = 1.0  # how often the dispatcher closes idle SMTP connections


class Sender(Attempt, Parking, Unclaimable, Record, Relay, Worker):
    """Claims tasks one at a time, just before each attempt, and sends them over each user's account."""

    role = "sender"
    source = "mailq:tasks"  # a dead sender's envelopes go back through the consumer, which re-routes them

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        client: redis.Redis,
        mailer,
        box: SecretBox,
        *,
        now=utcnow,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
    ):
        super().__init__(settings, engine, client, now=now)
        self.mailer = mailer
        self.box = box
        self.clock = clock
        self.rng = rng
        self.sendq = SendQueue(client)
        self.pace = Pace(client)
        self.accounts = Accounts(engine, settings)
        self.outbox = events.Outbox(client)
        self._holder = f"{self.id}:"
        self._fault_until = 0.0
        self._fault_delay = 0.0
        self._unacked: list[Taken] = []  # done() calls Redis refused; retried by the dispatcher
        self._lock = threading.Lock()
        self._work: stdqueue.Queue[Taken] = stdqueue.Queue()
        self._idle = threading.Semaphore(settings.worker_count)
        # A conversation thread's next envelope, taken by done() in the same step as it let go of the
        # last one (only when the thread asked for it: see _converse).
        self._chain = threading.local()
        self._busy = 0  # conversation threads at work right now (a gauge)
        self._dispatching = threading.Event()
        self.inflight = Inflight(engine, settings.sender_content_memory)
        # A connection idle in the pool keeps its slot (shared.fairqueue) a little longer than the pool
        # keeps it (close_idle runs every IDLE_CHECK_SECONDS), and no longer if this sender dies.
        self._parked_ms = int((settings.smtp_idle_seconds + IDLE_CHECK_SECONDS + PARK_MARGIN) * 1000)
        mailer.on_close = self._unpark

    # --- taking work ---

    def take(self, count: int) -> list[Taken]:
        """Up to ``count`` envelopes, fairly, each with a conversation slot of its account."""
        s = self.settings
        took = self.sendq.take(
            self.processing,
            self._holder,
            count,
            s.smtp_max_connections_per_account_limit,
            s.lease_seconds * 1000,
        )
        if took.limit_waits:
            self.metrics.send_limit_waits.inc(took.limit_waits)
        return took

    def step(self, timeout: float = BLOCK_SECONDS, count: int | None = None) -> list[Outcome]:
        """Take up to ``count`` envelopes (waiting up to ``timeout`` for one) and handle each in turn."""
        self.retry_unacked()
        if self.faulted():
            return []
        count = count or self.settings.worker_count
        taken = self.take(count)
        if not taken and timeout > 0:
            self.sendq.wait(min(timeout, _until(taken)), self._holder)  # a bell, or a hold's end
            taken = self.take(count)
        outcomes: list[Outcome] = []
        for i, item in enumerate(taken):
            try:
                outcomes.append(self.handle(item))
            except BaseException:
                # Nothing of the rest has started: give it back now rather than leave it in our
                # processing list (and its slots held) until the sweep or a restart.
                for rest in taken[i + 1 :]:
                    self._give_back_quietly(rest, _task_id_or_zero(rest))
                raise
        return outcomes

    # --- one envelope ---

    def handle(self, item: Taken) -> Outcome:
        """Get the account's connection ready, claim, send and record one taken envelope; every path
        lets go of it before returning."""
        try:
            task_id = item.task_id
        except EnvelopeDecodeError as exc:
            log.warning("%s dropped a malformed envelope: %s", self.id, exc)
            self.done(item)
            return Outcome.DROPPED
        logs.bind_task(task_id)
        session = None
        try:
            ready = self.ready(item, task_id)  # the account's connection: before any claim
            if isinstance(ready, Outcome):
                self.mailer.discard(reuse_of(item))  # the idle connection the take handed over, unused
                return ready
            account, _, session = ready
            claim = self.claim(task_id)
            self._recovered()
            if claim is None:
                self._release(session)
                return self._unclaimable(item, task_id)
        except Exception as exc:
            self._hang_up(session)  # no slot of ours counts it any more
            which = dependency_of(exc)
            if which is None:
                log.exception("%s: claiming task %d failed", self.id, task_id)
            else:
                log.warning("%s: %s unavailable while claiming (%s)", self.id, which, type(exc).__name__)
            self._give_back_quietly(item, task_id)
            self.fault()
            return Outcome.RELEASED
        self.metrics.claims.inc()
        self.accounts.check(claim.user_id, claim.account_version)
        outcome = self.attempt(claim, item, account=account, session=session)
        if outcome not in (Outcome.RELEASED, Outcome.PAUSED, Outcome.WAITING):  # those gave the envelope back
            answered = self.answered()
            success = account.max_connections if answered else None
            ended = self.done(item, success=success, parked=self._parked(session))
            if answered:
                self.recovered(account, ended)
        return outcome

    # --- letting go ---

    def done(self, item: Taken, *, success: int | None = None, parked: str = "") -> bool:
        """Let go of the envelope (and take this thread's next one in the same step, when it wants
        one). ``success``: the relay answered, so the account's pace hears of it (its declared
        maximum); returns whether that ended the account's backoff episode. ``parked``: the idle slot
        of the conversation's connection, back in the pool (``_parked``)."""
        try:
            if getattr(self._chain, "wanted", False) and not self.stopping.is_set() and not self.faulted():
                s = self.settings
                cap, slot_ms = s.smtp_max_connections_per_account_limit, s.lease_seconds * 1000
                took = self.sendq.done_and_take(
                    self.processing,
                    item,
                    self._holder,
                    1,
                    cap,
                    slot_ms,
                    success=success,
                    parked=parked,
                    parked_ms=self._parked_ms,
                )
                self._chain.next = took
                if took.limit_waits:
                    self.metrics.send_limit_waits.inc(took.limit_waits)
                return took.ended
            return self.sendq.done(
                self.processing, item, success=success, parked=parked, parked_ms=self._parked_ms
            )
        except redis.RedisError:
            with self._lock:
                self._unacked.append(item)
            return False

    def retry_unacked(self) -> None:
        with self._lock:
            pending, self._unacked = self._unacked, []
        for i, item in enumerate(pending):
            try:
                self.sendq.done(self.processing, item)
            except redis.RedisError:
                with self._lock:
                    self._unacked.extend(pending[i:])
                return

    def _give_back_quietly(self, item: Taken, task_id: int) -> None:
        try:
            self.sendq.give_back(self.processing, item, task_id)
        except redis.RedisError:
            pass  # it stays in our processing list; shutdown or the sweep returns it

    def fault(self) -> None:
        """A worker fault: stop taking work for a while (1 s, doubling to MAX_FAULT_BACKOFF while the
        faults go on, back to 1 s once work goes through). The conversation threads that meet one
        outage at once are one fault, not one doubling each: that paused a sender for the whole
        MAX_FAULT_BACKOFF after a blip of a few seconds."""
        with self._lock:
            now = self.clock()
            if now < self._fault_until:
                return
            self._fault_delay = min(MAX_FAULT_BACKOFF, max(1.0, self._fault_delay * 2))
            self._fault_until = now + self._fault_delay

    def faulted(self) -> bool:
        with self._lock:
            if self._fault_until and self.clock() >= self._fault_until:
                self._fault_until = 0.0
            return bool(self._fault_until)

    def _recovered(self) -> None:
        """A claim went through: the next fault pauses for 1 s again."""
        if self._fault_delay:
            with self._lock:
                self._fault_delay = 0.0

    # --- running ---

    def busy(self) -> int:
        """Conversation threads at work right now."""
        return self._busy

    def loops(self):
        self._dispatching.set()
        conversations = [(f"sender-{i}", self._converse) for i in range(self.settings.worker_count)]
        return [("sender-dispatch", self._dispatch), *conversations]

    def _dispatch(self) -> None:
        """Take work for idle conversation threads, fairly; sleep on the bell when there is none."""
        next_idle_check = 0.0
        try:
            while not self.stopping.is_set():
                self.mark_progress()
                if time.monotonic() >= next_idle_check:
                    self.mailer.close_idle()
                    next_idle_check = time.monotonic() + IDLE_CHECK_SECONDS
                self.retry_unacked()
                if self.faulted():
                    self.stopping.wait(0.5)
                    continue
                if not self._idle.acquire(timeout=BLOCK_SECONDS):
                    continue
                free = 1
                while free < self.settings.worker_count and self._idle.acquire(blocking=False):
                    free += 1
                try:
                    taken = [] if self.stopping.is_set() else self.take(free)
                except Exception as exc:
                    taken = []
                    log.warning("%s: taking work failed (%s)", self.id, type(exc).__name__)
                    self.stopping.wait(1.0)
                for item in taken:
                    self._work.put(item)
                for _ in range(free - len(taken)):
                    self._idle.release()
                # Fewer than asked for: nothing more is takeable now (every tenant with mail is at its
                # cap, or none has mail), so wait for the bell (a slot came free, new mail) instead
                # of asking again at once: with one busy tenant that was an empty take per mail.
                if len(taken) < free and not self.stopping.is_set():
                    try:
                        self.sendq.wait(_until(taken), self._holder)
                    except redis.RedisError:
                        self.stopping.wait(1.0)
        finally:
            self._dispatching.clear()

    def _converse(self) -> None:
        # A thread that finishes a mail takes its next one itself, in the step that lets go of the
        # last (done_and_take): no bell, no dispatcher round trip, no hand-off between threads per
        # mail. It goes back to the dispatcher's queue only when that finds nothing.
        self._chain.wanted = True
        while True:
            try:
                item = self._work.get(timeout=0.2)
            except stdqueue.Empty:
                if self.stopping.is_set() and not self._dispatching.is_set():
                    return
                continue
            with self._lock:
                self._busy += 1
            try:
                while item is not None:
                    self._chain.next = []
                    try:
                        if self.stopping.is_set():
                            self._give_back_quietly(item, _task_id_or_zero(item))  # not started: give it back
                        else:
                            self.handle(item)
                    except Exception:  # handle() lets go of the envelope on every path it knows
                        log.exception("%s: unexpected error", self.id)
                    finally:
                        logs.bind_task(None)
                    item = self._chain.next[0] if self._chain.next else None
            finally:
                with self._lock:
                    self._busy -= 1
                self._idle.release()

    def shutdown(self) -> None:
        while True:  # anything the dispatcher took after the threads were gone
            try:
                item = self._work.get_nowait()
            except stdqueue.Empty:
                break
            self._give_back_quietly(item, _task_id_or_zero(item))
        self.retry_unacked()
        super().shutdown()

    def close(self) -> None:
        self.mailer.close()


def _until(took) -> float:
    """How long to wait on the bell after a take that found nothing more: at most until the first
    held account it saw may be taken (no bell rings when a hold passes)."""
    wake = getattr(took, "wake", None)
    return BLOCK_SECONDS if wake is None else min(BLOCK_SECONDS, wake + 0.002)


def _task_id_or_zero(item: Taken) -> int:
    try:
        return item.task_id
    except EnvelopeDecodeError:
        return 0
