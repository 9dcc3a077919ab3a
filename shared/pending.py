"""The one definition of "work waiting for the sweep".

The sweep's selection and the KEDA ScaledJob's postgresql trigger both come from here; a manifest
test renders PENDING_WORK_SQL with the ConfigMap's SWEEP_LEAK_WINDOW and compares it byte for byte
with the query in keda/, and checks with EXPLAIN that PostgreSQL answers it from the indexes.

Each kind of work is its own condition with its own partial index. One OR'ed condition looked
simpler but PostgreSQL over-estimates it and scans the table instead (measured at 1M rows: 119 ms
per statement against about 1 ms this way).
"""

from __future__ import annotations

# {leak} is SWEEP_LEAK_WINDOW in seconds, an integer rendered into the text because KEDA's trigger
# cannot bind parameters. (column ordering the selection, condition) per kind of work:
_CONDITIONS = (
    ("next_attempt_at", "status IN ('scheduled', 'failed') AND next_attempt_at <= now()"),  # tasks_due
    (
        "next_attempt_at",
        "status = 'queued' AND next_attempt_at <= now() - interval '{leak} seconds'",
    ),  # leaked
    ("lease_until", "status = 'processing' AND lease_until <= now()"),  # tasks_sweep_lease
)


# Mail not sent by its expires_at, cancelled as expired (tasks_sweep_expired). A processing task is left
# to its attempt's outcome: it was claimed before its time.
EXPIRED = ("expires_at", "status IN ('scheduled', 'queued', 'failed') AND expires_at <= now()")


# The same three kinds for webhook deliveries (shared/webhooks/worker.py), each from its partial index of
# webhook_deliveries: retries due, envelopes lost (queued past the leak window), leases run out.
_DELIVERY_CONDITIONS = (
    ("next_attempt_at", "state = 'scheduled' AND next_attempt_at <= now()"),  # webhook_deliveries_due
    (
        "next_attempt_at",
        "state = 'queued' AND next_attempt_at <= now() - interval '{leak} seconds'",
    ),  # webhook_deliveries_queued
    ("lease_until", "state = 'sending' AND lease_until <= now()"),  # webhook_deliveries_lease
)


def delivery_conditions(leak_window_seconds: int) -> list[tuple[str, str]]:
    """(order column, WHERE clause) for each kind of webhook delivery that is due again."""
    return [(column, where.format(leak=int(leak_window_seconds))) for column, where in _DELIVERY_CONDITIONS]


def conditions(leak_window_seconds: int) -> list[tuple[str, str]]:
    """(order column, WHERE clause) for each kind of task the sweep must put back."""
    return [(column, where.format(leak=int(leak_window_seconds))) for column, where in _CONDITIONS]


# Tasks past TASK_RETENTION_DAYS ({days}), served by the partial index tasks_retention (whose
# predicate is FINAL_STATUSES word for word).
FINAL_STATUSES = "status IN ('sent', 'cancelled')"
RETENTION_WHERE = FINAL_STATUSES + " AND updated_at < now() - interval '{days} days'"


def pending_work_sql(leak_window_seconds: int, retention_days: int = 0) -> str:
    """How many tasks and webhook deliveries the sweep would put back (or cancel as expired) now, plus 1
    while any task is past retention (the ScaledJob's query; counting every expired row would cost as
    much as deleting them)."""
    counts = [f"(SELECT count(*) FROM tasks WHERE {where})" for _, where in conditions(leak_window_seconds)]
    counts.append(f"(SELECT count(*) FROM tasks WHERE {EXPIRED[1]})")
    counts += [
        f"(SELECT count(*) FROM webhook_deliveries WHERE {where})"
        for _, where in delivery_conditions(leak_window_seconds)
    ]
    if retention_days > 0:
        expired = RETENTION_WHERE.format(days=int(retention_days))
        counts.append(f"(SELECT count(*) FROM (SELECT 1 FROM tasks WHERE {expired} LIMIT 1) AS expired)")
    return "SELECT " + " + ".join(counts)
