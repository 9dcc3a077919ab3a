"""What every long-running worker shares: identity, heartbeat, liveness, threads and shutdown.

A worker registers itself in ``mailq:workers`` (with the list its processing list drains back
into) and keeps a heartbeat key with a TTL; when the key is gone the sweep returns whatever is left
in the worker's processing list. The consumer (``shared.delivery.consumer``), the sender
(``shared.delivery.sender``) and the webhook worker (``shared.webhooks.worker``) build on this; tests
drive their ``step()`` directly.
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
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path

import redis
from sqlalchemy.engine import Engine

from shared import logs, queue
from shared.config import Settings
from shared.db import is_unavailable
from shared.metrics import WorkerMetrics

log = logging.getLogger("mailq.worker")

BLOCK_SECONDS = 1  # how long one blocking read waits; bounds how fast a worker notices SIGTERM


class Outcome(Enum):
    DROPPED = "dropped"  # nothing to do for this envelope (unknown, terminal, not due, taken)
    HANDED_OFF = "handed_off"  # consumer: passed on to the senders
    SENT = "sent"
    FAILED = "failed"  # transient failure, will be retried
    CANCELLED = "cancelled"  # permanent failure or tries used up
    STALE = "stale"  # the outcome lost the fencing check: someone else claimed the task since
    RELEASED = "released"  # given back without spending a try (a worker fault, or shutting down)
    PAUSED = "paused"  # the account cannot send until its settings change: the mail waits
    WAITING = "waiting"  # the account's relay refused it (it backs off): given back, no try spent


def utcnow() -> datetime:
    return datetime.now(UTC)


def backoff_seconds(
    try_count: int, base: float, cap: float, rng: Callable[[], float] = random.random
) -> float:
    """Delay before try ``try_count + 1``: base doubled per try, capped, with equal jitter."""
    delay = min(cap, base * (2 ** max(0, try_count - 1)))
    return min(cap, delay / 2 + rng() * delay / 2)


def dependency_of(exc: BaseException) -> str | None:
    """ "Redis" or "PostgreSQL" when ``exc`` means that dependency is unavailable, else None."""
    if isinstance(exc, redis.RedisError):
        return "Redis"
    if is_unavailable(exc):
        return "PostgreSQL"
    return None


class Worker:
    """Identity, processing list, heartbeat, liveness and shutdown; subclasses do the work."""

    role = "worker"
    source = ""  # where the sweep returns this worker's processing list if it dies

    def __init__(self, settings: Settings, engine: Engine, client: redis.Redis, *, now=utcnow):
        self.settings = settings
        self.engine = engine
        self.redis = client
        self.now = now
        self.id = f"{self.role}:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.processing = queue.processing_list(self.id)
        self.stopping = threading.Event()
        self.heartbeat_file = Path(settings.heartbeat_file)
        self.metrics = WorkerMetrics()  # served on METRICS_PORT by the process's entry point
        self._progress = time.monotonic()  # when a work loop last went round (liveness)

    # --- Redis bookkeeping ---

    def register(self) -> None:
        self.beat()

    def beat(self) -> None:
        """Say we are alive; registering again each time survives a Redis that restarted empty."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(queue.WORKERS, self.id, self.source)
        pipe.set(queue.heartbeat_key(self.id), "1", ex=self.settings.heartbeat_ttl)
        pipe.execute()

    def wait_for_redis(self) -> bool:
        """Register, retrying with backoff while Redis is down; False if told to stop meanwhile."""
        delay = 0.5
        while not self.stopping.is_set():
            self.mark_progress()  # waiting for Redis is not being wedged:
            self._touch_liveness_file()  # the liveness probe must not restart us for Redis's outage
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

    # --- liveness ---

    def mark_progress(self) -> None:
        """Called by each work loop every time round: the process is not wedged."""
        self._progress = time.monotonic()

    def wedged(self) -> bool:
        """True when no work loop went round for two heartbeat TTLs (every loop blocks for at most
        BLOCK_SECONDS plus a socket timeout, so a healthy one never comes close)."""
        return time.monotonic() - self._progress > 2 * self.settings.heartbeat_ttl

    def _touch_liveness_file(self) -> None:
        try:
            self.heartbeat_file.touch()
        except OSError:
            pass

    # --- running ---

    def loops(self) -> list[tuple[str, Callable[[], None]]]:
        """(thread name, body) of the threads that do the work; each returns once stopping is set."""
        raise NotImplementedError

    def run(self) -> None:
        """Run the work loops until ``stopping`` is set, then hand back what is held and exit."""
        logs.bind_worker(self.id)
        if not self.wait_for_redis():
            return
        loops = self.loops()
        threads = [
            threading.Thread(target=self._labelled(body), name=name, daemon=True) for name, body in loops
        ]
        log.info("%s started with %d thread(s)", self.id, len(threads))
        for t in threads:
            t.start()
        beat_every = max(1.0, self.settings.heartbeat_ttl / 3)
        try:
            while True:
                # Liveness means "this process is not wedged", not "Redis is up": the file is touched
                # whenever the work loops go round, whether or not Redis took the heartbeat.
                if not self.wedged():
                    self._touch_liveness_file()
                try:
                    self.beat()
                except redis.RedisError as exc:
                    log.warning("%s heartbeat failed: %s", self.id, type(exc).__name__)
                if self.stopping.wait(beat_every):
                    break
        finally:
            self.stopping.set()
            for t in threads:
                t.join()
            self.shutdown()

    def _labelled(self, body: Callable[[], None]) -> Callable[[], None]:
        """The thread body, with this worker's id on every line it logs."""

        def run() -> None:
            logs.bind_worker(self.id)
            body()

        return run

    def shutdown(self) -> None:
        """After the loops ended: hand back whatever is left and leave the registry."""
        try:
            returned = self.return_all()
            self.unregister()
            log.info("%s stopped; returned %d envelope(s)", self.id, returned)
        except redis.RedisError as exc:
            log.warning("%s could not hand back its envelopes (%s); the sweep will", self.id, exc)
        self.close()

    def close(self) -> None:
        """Release what the worker holds (connections)."""
