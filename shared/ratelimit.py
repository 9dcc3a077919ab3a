"""Fixed-window rate limits in Redis, so a limit holds across every API process."""

from __future__ import annotations

import time

import redis

from shared import queue
from shared.errors import RateLimited

WINDOW_SECONDS = 60


def hit(client: redis.Redis, scope: str, subject: str, limit: int, now: float | None = None) -> None:
    """Count one attempt; RateLimited (with Retry-After seconds) once ``limit`` is exceeded."""
    now = time.time() if now is None else now
    window = int(now // WINDOW_SECONDS)
    key = queue.rate_limit_key(scope, subject, window)
    pipe = client.pipeline(transaction=False)
    pipe.incr(key)
    pipe.expire(key, WINDOW_SECONDS + 1)
    count, _ = pipe.execute()
    if count > limit:
        retry_after = max(1, int((window + 1) * WINDOW_SECONDS - now) + 1)
        raise RateLimited(retry_after)
