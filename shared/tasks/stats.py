"""A user's task figures for the dashboard: how many tasks in each status, and the last hour's outcomes.

Both queries are bounded and served by an index, however many tasks the user has: a count stops at
``COUNT_CAP`` (index-only scans of ``tasks_user_status_id``), and the hour reads only the rows whose
latest outcome falls in it (``tasks_user_outcome_at``). tests/test_stats.py checks the plans.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import sqlalchemy as sa

from shared.context import Context
from shared.domain import Status
from shared.models import OUTCOME_SQL_LIST, OUTCOME_STATUSES

COUNT_CAP = 10_000  # a status with more tasks than this reports COUNT_CAP and is listed in "capped"
WINDOW_MINUTES = 60
OUTCOMES = tuple(s.value for s in OUTCOME_STATUSES)

_STATUS_VALUES = ", ".join(f"('{s.value}')" for s in Status)  # constants, never input

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

# A task's updated_at is the time of its latest change; for a task in an outcome status that is the
# outcome's time. PostgreSQL's clock draws the minute boundaries, as it stamps updated_at.
_HOUR_SQL = sa.text(
    f"""
    WITH window_start AS (
        SELECT date_trunc('minute', now()) - make_interval(mins => :minutes - 1) AS since
    )
    SELECT w.since, date_trunc('minute', t.updated_at) AS minute, t.status, count(*) AS n
      FROM window_start AS w
      LEFT JOIN tasks AS t
        ON t.user_id = :user_id AND t.status IN ({OUTCOME_SQL_LIST}) AND t.updated_at >= w.since
     GROUP BY w.since, 2, t.status
    """  # noqa: S608 - OUTCOME_SQL_LIST is a constant of shared.models
)


def task_stats(ctx: Context, user_id: int) -> dict[str, Any]:
    """Counts per status (each at most COUNT_CAP) and, per minute of the last hour, how many of the
    user's tasks reached sent, failed or cancelled in that minute (by their latest outcome)."""
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
        if row.minute is None:  # the LEFT JOIN's empty row: no outcome in the window
            continue
        index = int((row.minute - since).total_seconds() // 60)
        if 0 <= index < WINDOW_MINUTES:
            minutes[index][row.status] += row.n
    return {
        "counts": counts,
        "capped": capped,
        "since": since.isoformat(),
        "minutes": minutes,
    }
