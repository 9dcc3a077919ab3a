"""The webhook audit of `make chaos` catches what it is there to catch: each wrong event history below is
one the fault runs must report (the runs themselves only ever show it passing)."""

from __future__ import annotations

import pytest

from tests.chaos.audit import Row
from tests.chaos.webhooks import _judge


def row(status: str, try_count: int, last_error: str | None = None) -> Row:
    return Row(1, status, try_count, "<m@x>", "to@example.com", last_error)


def event(kind: str, try_count: int, reason: str | None = None) -> dict:
    data = {"task_id": 1, "try_count": try_count, **({"reason": reason} if reason else {})}
    return {"type": kind, "data": data}


def test_a_history_that_matches_the_servers_log_passes():
    history = [event("task.deferred", 1), event("task.sent", 2)]
    assert _judge(row("sent", 2), history, ["451", "250"]) is None
    exhausted = row("cancelled", 2, "451 busy (gave up after 2 tries)")
    history = [event("task.deferred", 1), event("task.cancelled", 2, "tries_exhausted")]
    assert _judge(exhausted, history, ["drop_before", "451"]) is None


@pytest.mark.parametrize(
    ("status", "tries", "events", "fates", "says"),
    [
        ("sent", 1, [], ["250"], "0 task.sent"),
        ("sent", 1, [event("task.sent", 1), event("task.sent", 1)], ["250"], "2 task.sent"),
        ("sent", 1, [event("task.sent", 1), event("task.cancelled", 1)], ["250"], "a task.cancelled"),
        ("sent", 2, [event("task.sent", 1)], None, "the row's outcome is try 2"),
        ("sent", 2, [event("task.sent", 2)], ["451", "250"], "the server's log implies 1"),
        ("sent", 2, [event("task.deferred", 1), event("task.sent", 2)], ["250"], "implies 0"),
        ("sent", 2, [event("task.deferred", 2), event("task.sent", 2)], None, "not before the final try"),
        ("sent", 3, [event("task.deferred", 1)] * 2 + [event("task.sent", 3)], None, "for one try"),
        ("cancelled", 2, [event("task.cancelled", 2, "permanent_failure")], None, "the row's error says"),
        (
            "cancelled",
            2,
            [event("task.cancelled", 2, "tries_exhausted"), event("task.sent", 2)],
            None,
            "a task.sent",
        ),
    ],
)
def test_a_wrong_event_history_is_reported(status, tries, events, fates, says):
    error = "451 busy (gave up after 2 tries)" if status == "cancelled" else None
    problem = _judge(row(status, tries, error), events, fates)
    assert problem is not None and says in problem, problem
