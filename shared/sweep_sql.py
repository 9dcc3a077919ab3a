"""The one definition of "work waiting for the sweep".

The sweep's selection and the KEDA ScaledJob's postgresql trigger both come from here; a manifest
test renders PENDING_WORK_SQL with the ConfigMap's SWEEP_LEAK_WINDOW and compares it byte for byte
with the query in keda/, and checks with EXPLAIN that PostgreSQL answers it from the indexes.
"""

from __future__ import annotations

# {leak} is SWEEP_LEAK_WINDOW in seconds, an integer rendered into the text because KEDA's trigger
# cannot bind parameters.
_DUE_CONDITION = (
    "(status IN ('scheduled', 'failed') AND next_attempt_at <= now())"
    " OR (status = 'queued' AND next_attempt_at <= now() - interval '{leak} seconds')"
    " OR (status = 'processing' AND lease_until <= now())"
)


def due_condition(leak_window_seconds: int) -> str:
    """The WHERE clause that selects tasks the sweep must put back."""
    return _DUE_CONDITION.format(leak=int(leak_window_seconds))


def pending_work_sql(leak_window_seconds: int) -> str:
    """How many tasks the sweep would put back now (the ScaledJob's query)."""
    return f"SELECT count(*) FROM tasks WHERE {due_condition(leak_window_seconds)}"
