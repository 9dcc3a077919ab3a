"""Why an account's queued mail waits, in one line, derived when asked (never written into its rows:
a backoff of an account with 100,000 queued mails rewrites nothing).

From the user record (paused, or backing off: ``smtp_state``) and from the account's pace in Redis (held
by its declared send limit). The task views show it as ``waiting`` on each queued task of the account.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import redis
import sqlalchemy as sa

from shared import pace
from shared.context import Context
from shared.domain import AccountReason
from shared.models import users

WORDS = {
    AccountReason.UNREACHABLE: "relay unreachable",
    AccountReason.THROTTLED: "the relay is throttling the account",
    AccountReason.QUOTA: "the account's quota at the relay is used up",
    AccountReason.UNAVAILABLE: "the relay is temporarily unavailable",
}


def waiting(ctx: Context, user_id: int) -> str | None:
    """What keeps the user's queued mail waiting right now, or None when nothing does."""
    with ctx.engine.connect() as conn:
        row = conn.execute(
            sa.select(
                users.c.smtp_paused_at,
                users.c.smtp_paused_reason,
                users.c.smtp_backoff_since,
                users.c.smtp_backoff_until,
                users.c.smtp_backoff_code,
                users.c.smtp_backoff_reason,
                users.c.smtp_send_limits,
            ).where(users.c.id == user_id)
        ).one_or_none()
    if row is None:
        return None
    if row.smtp_paused_at is not None:
        return f"waiting: the account is paused since {_iso(row.smtp_paused_at)} ({row.smtp_paused_reason})"
    if row.smtp_backoff_since is not None:
        words = WORDS.get(row.smtp_backoff_code, "the relay refused the account")
        detail = f" ({row.smtp_backoff_reason})" if row.smtp_backoff_reason else ""
        return (
            f"waiting: {words}{detail} since {_iso(row.smtp_backoff_since)}, "
            f"next attempt at {_iso(row.smtp_backoff_until)}"
        )
    if row.smtp_send_limits:
        return _over_limit(ctx, user_id, row.smtp_send_limits)
    return None


def _over_limit(ctx: Context, user_id: int, windows: list[dict[str, Any]]) -> str | None:
    try:
        state = pace.Pace(ctx.redis).state(user_id)
    except redis.RedisError:
        return None
    held = state.get("held_until")
    if state.get("hold") != "limit" or held is None or held <= datetime.now(UTC).timestamp() * 1000:
        return None
    until = datetime.fromtimestamp(held / 1000, UTC)
    return (
        f"waiting: over the account's send limits ({pace.describe_limits(windows)}), "
        f"next attempt at {_iso(until)}"
    )


def _iso(moment: datetime | None) -> str | None:
    return moment.astimezone(UTC).isoformat(timespec="seconds") if moment else None
