"""A user's task figures for the dashboard: how many tasks in each status, and the last hour's attempts.

Both queries are bounded and served by an index, however many tasks the user has: a count stops at
``COUNT_CAP`` (index-only scans of ``tasks_user_status_id``), and the hour reads only the user's lines
of the attempt log that finished in it (``task_attempts_user_finished``, the outcome included).
tests/test_stats.py checks the plans.

The hour counts tries, not tasks: a mail deferred twice and then sent is two deferrals and one sent,
each in the minute it happened. The account's waits (backing off, over a send limit, paused) are not
tries and are left out: no try is spent, nothing happened to a mail, and a wait met before any claim is
one line per task and episode whose finished time moves on with each repeat, so it would show in the
current minute only; the account's state says it (GET /api/v1/user/{id}, the dashboard's banner).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import sqlalchemy as sa

from shared.attempt_log import TRY_OUTCOMES
from shared.context import Context
from shared.domain import Status

COUNT_CAP = 10_000  # a status with more tasks than this reports COUNT_CAP and is listed in "capped"
WINDOW_MINUTES = 60
OUTCOMES = TRY_OUTCOMES  # sent, deferred, cancelled: each minute's series
# ``failed`` was the series before the hour counted attempts; it stays, the same number as ``deferred``.
ALIASES = {"failed": "deferred"}

_STATUS_VALUES = ", ".join(f"('{s.value}')" for s in Status)  # constants, never input
_OUTCOME_LIST = ", ".join(f"'{o}'" for o in OUTCOMES)

# One bounded count per status, each an index-only scan of (user_id, status, id) that stops early.
_COUNTS_SQL = sa.text(
    f"""
    SELECT s.status,
           (SELECT count(*) FROM (SELECT 1 FROM tasks AS t
                                   WHERE t.user_id = :user_id AND t.status = s.status
                                   LIMIT :cap_plus_one) AS capped) AS n
      FROM (VALUES {_STATUS_VALUES}) AS s(status)
    """  # noqa: S608 - the VALUES list is built from the Status enum
)

# An attempt's finished_at is stamped by the statement that records its outcome, on PostgreSQL's
# clock, which draws the minute boundaries too.
_HOUR_SQL = sa.text(
    f"""
    WITH window_start AS (
        SELECT date_trunc('minute', now()) - make_interval(mins => :minutes - 1) AS since
    )
    SELECT w.since, date_trunc('minute', a.finished_at) AS minute, a.outcome, count(*) AS n
      FROM window_start AS w
      LEFT JOIN task_attempts AS a
        ON a.user_id = :user_id AND a.finished_at >= w.since AND a.outcome IN ({_OUTCOME_LIST})
     GROUP BY w.since, 2, a.outcome
    """  # noqa: S608 - _OUTCOME_LIST is built from shared.attempt_log's constants
)


def task_stats(ctx: Context, user_id: int) -> dict[str, Any]:
    """Counts per status (each at most COUNT_CAP) and, per minute of the last hour, how many of the
    user's attempts ended sent, deferred or cancelled in that minute."""
    with ctx.engine.connect() as conn:
        counted = conn.execute(_COUNTS_SQL, {"user_id": user_id, "cap_plus_one": COUNT_CAP + 1}).all()
        rows = conn.execute(_HOUR_SQL, {"user_id": user_id, "minutes": WINDOW_MINUTES}).all()
    counts = {status: min(n, COUNT_CAP) for status, n in counted}
    capped = [status for status, n in counted if n > COUNT_CAP]
    since = rows[0].since
    minutes = [
        {"start": (since + timedelta(minutes=i)).isoformat(), **dict.fromkeys(OUTCOMES, 0)}
        for i in range(WINDOW_MINUTES)
    ]
    for row in rows:
        if row.minute is None:  # the LEFT JOIN's empty row: no attempt in the window
            continue
        index = int((row.minute - since).total_seconds() // 60)
        if 0 <= index < WINDOW_MINUTES:
            minutes[index][row.outcome] += row.n
    for minute in minutes:
        for alias, series in ALIASES.items():
            minute[alias] = minute[series]
    return {
        "counts": counts,
        "capped": capped,
        "since": since.isoformat(),
        "minutes": minutes,
    }
