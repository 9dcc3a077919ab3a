"""What every use case is handed: the ``Context`` of one process (settings, engine, Redis, the secret
box, the clock), built once by the entry point and passed in, never reached for.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import redis
from sqlalchemy.engine import Engine

from shared.config import Settings
from shared.crypto import SecretBox


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class Context:
    """Everything a use case needs, passed in (never reached for)."""

    settings: Settings
    engine: Engine
    redis: redis.Redis
    box: SecretBox
    now: Callable[[], datetime] = field(default=utcnow)


def make_redis(url: str, *, socket_timeout: float | None = 5.0) -> redis.Redis:
    """A Redis client with timeouts, so a dead Redis answers 503 instead of hanging a request."""
    return redis.Redis.from_url(
        url, socket_timeout=socket_timeout, socket_connect_timeout=3, health_check_interval=30
    )
