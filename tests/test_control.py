"""Cancel, reschedule and retry (shared/tasks/control.py) through the functions, against real PostgreSQL,
Redis and an aiosmtpd server; the consumer and sender are driven step by step (tests/pipeline.py),
and in the race test a sender claims in one thread while the API cancels in another."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from shared import queue
from shared.domain import CANCELLABLE, RESCHEDULABLE, RETRYABLE, Status, can_move
from shared.tasks import control
from shared.workers import Outcome
from tests.conftest import auth_header, login, register_user
from tests.smtp_servers import ScriptedSmtpServer
from tests.test_accounts_api import assert_problem


@pytest.fixture()
def ada(api, pipe, smtp):
    """A user whose mail goes to ``smtp``, and her Authorization header for the API."""
    user = pipe.user(smtp)
    return user, auth_header(login(api))


def later(days: float = 1) -> str:
    return (datetime.now(UTC) + timedelta(days=days)).isoformat()


def pg_now(pipe) -> datetime:
    with pipe.ctx.engine.connect() as conn:
        return conn.execute(sa.text("SELECT now()")).scalar_one()


def make_status(pipe, task_id: int, status: str, **columns) -> None:
    """Put a task in a status the way the data path leaves it (the states the workers produce are
    tested in test_pipeline; here they are the starting point)."""
    sets = ", ".join(f"{name} = :{name}" for name in columns)
    with pipe.ctx.engine.begin() as conn:
        conn.execute(
            sa.text(f"UPDATE tasks SET status = :status{', ' + sets if sets else ''} WHERE id = :id"),
            {"id": task_id, "status": status, **columns},
        )


# --- the rules -----------------------------------------------------------------------------------------


def test_every_change_a_user_may_make_is_a_transition_of_the_domain():
    assert all(can_move(s, Status.CANCELLED) for s in CANCELLABLE)
    assert all(can_move(s, Status.SCHEDULED) and can_move(s, Status.QUEUED) for s in RESCHEDULABLE)
    assert all(can_move(s, Status.QUEUED) for s in RETRYABLE)
    assert Status.PROCESSING not in CANCELLABLE + RESCHEDULABLE + RETRYABLE


# --- cancel ------------------------------------------------------------------------------------------


def test_a_cancelled_task_answers_200_and_its_envelope_finds_nothing_to_claim(api, pipe, ada, smtp):
    user, headers = ada
    keep, drop = pipe.enqueue(user, subject="keep"), pipe.enqueue(user, subject="drop")
    assert pipe.consumer.step(0.05) == [Outcome.HANDED_OFF] * 2  # both envelopes wait at the senders
    response = api.post(f"/api/v1/task/{drop}/cancel", headers=headers)
    assert response.status_code == 200
    task = response.get_json()
    assert task["status"] == "cancelled" and task["last_error"] == control.CANCELLED_BY_USER
    assert task["tries_left"] is None and task["next_attempt_at"] is None
    outcomes = []  # a new account sends one at a time until its first success (shared.pace)
    while step := pipe.sender.step(0.05):
        outcomes += step
    assert Counter(outcomes) == Counter([Outcome.SENT, Outcome.DROPPED])
    assert [m.message["Subject"] for m in smtp.received] == ["keep"]
    assert pipe.task(drop).try_count == 0 and pipe.task(keep).status == "sent"
    pipe.sweep()
    assert pipe.pump() == [] and pipe.task(drop).status == "cancelled"


@pytest.mark.parametrize("status", ["scheduled", "failed"])
def test_a_scheduled_or_failed_task_can_be_cancelled_and_the_sweep_leaves_it(api, pipe, ada, status):
    user, headers = ada
    task_id = pipe.enqueue(user)
    make_status(pipe, task_id, status)  # due now: the sweep would queue it
    assert api.post(f"/api/v1/task/{task_id}/cancel", headers=headers).get_json()["status"] == "cancelled"
    assert pipe.sweep().requeued == 0 and pipe.task(task_id).status == "cancelled"


@pytest.mark.parametrize("status", ["processing", "sent", "cancelled"])
def test_cancel_is_a_409_while_being_sent_or_once_sent_or_cancelled(api, pipe, ada, status):
    user, headers = ada
    task_id = pipe.enqueue(user)
    make_status(pipe, task_id, status)
    problem = assert_problem(api.post(f"/api/v1/task/{task_id}/cancel", headers=headers), 409)
    assert status in problem["detail"]
    assert pipe.task(task_id).status == status and pipe.task(task_id).last_error is None


def test_every_control_answers_404_for_someone_elses_task_and_changes_nothing(api, pipe, ada, smtp):
    user, _ = ada
    task_id = pipe.enqueue(user)
    make_status(pipe, task_id, "failed")
    register_user(api, "eve@example.com")
    eve = auth_header(login(api, "eve@example.com"))
    for response in (
        api.post(f"/api/v1/task/{task_id}/cancel", headers=eve),
        api.post(f"/api/v1/task/{task_id}/retry", headers=eve),
        api.patch(f"/api/v1/task/{task_id}", json={"scheduled_at": later()}, headers=eve),
        api.post("/api/v1/task/999999/cancel", headers=eve),
    ):
        assert assert_problem(response, 404)["detail"] == "No such task."
    assert pipe.task(task_id).status == "failed"
    assert_problem(api.post(f"/api/v1/task/{task_id}/cancel"), 401)


# --- the race: a 200 to cancel means no attempt starts afterwards -------------------------------------

RACES = 150


def test_cancel_racing_a_sender_either_wins_before_the_claim_or_answers_409(api, pipe, ada, smtp):
    """Each round hands one task to the sender, then a sender thread (take, claim, SMTP, outcome) and
    a thread cancelling through the API start at a barrier, each after a seeded jitter (the sender's
    up to 6 ms, the cancel's up to 3 ms: its way to the UPDATE is the longer one), so either may go
    first. Whoever wins, the answer and what the SMTP server saw must agree."""
    user, headers = ada
    rng = random.Random(20261128)
    answers: dict[int, int] = {}
    for round_ in range(1, RACES + 1):
        task_id = pipe.enqueue(user, subject="race")
        assert pipe.consumer.step(0.05) == [Outcome.HANDED_OFF]
        start = threading.Barrier(2)
        delays = (rng.uniform(0, 0.006), rng.uniform(0, 0.003))
        outcome: list[Outcome] = []

        def send(delay=delays[0], start=start, outcome=outcome):
            start.wait()
            time.sleep(delay)
            outcome.extend(pipe.sender.step(0))

        sender = threading.Thread(target=send)
        sender.start()
        start.wait()
        time.sleep(delays[1])
        answers[task_id] = api.post(f"/api/v1/task/{task_id}/cancel", headers=headers).status_code
        sender.join(10)
        assert not sender.is_alive()
        row = pipe.task(task_id)
        seen = [m for m in smtp.received if m.message["Message-ID"] == row.message_id]
        found = (answers[task_id], row.status, row.try_count, len(seen), outcome)
        if answers[task_id] == 200:
            assert found == (200, "cancelled", 0, 0, [Outcome.DROPPED]), f"round {round_}: {found}"
        else:
            assert found == (409, "sent", 1, 1, [Outcome.SENT]), f"round {round_}: {found}"
    # Both sides won some rounds, so the rounds really raced (the jitter spans both orders).
    assert set(answers.values()) == {200, 409}, answers
    assert len(smtp.received) == list(answers.values()).count(409)
    assert pipe.ctx.redis.llen(queue.TASK_LIST) == 0


# --- reschedule --------------------------------------------------------------------------------------


def test_a_queued_task_moved_later_is_not_sent_by_its_old_envelope(api, pipe, ada, smtp):
    user, headers = ada
    task_id = pipe.enqueue(user)
    at = later(days=2)
    response = api.patch(f"/api/v1/task/{task_id}", json={"scheduled_at": at}, headers=headers)
    assert response.status_code == 200
    task = response.get_json()
    assert task["status"] == "scheduled" and task["tries_left"] == 3
    assert datetime.fromisoformat(task["scheduled_at"]) == datetime.fromisoformat(at)
    assert task["next_attempt_at"] == task["scheduled_at"]
    assert pipe.pump() == [Outcome.DROPPED]  # the envelope pushed at enqueue
    assert pipe.sweep().requeued == 0 and smtp.received == []


@pytest.mark.parametrize("status", ["scheduled", "failed"])
def test_a_task_moved_to_the_past_is_due_now_on_postgresqls_clock_and_sent(api, pipe, ada, smtp, status):
    user, headers = ada
    task_id = pipe.enqueue(user, scheduled_at=later())
    make_status(pipe, task_id, status)
    before = pg_now(pipe)
    for at in ("2000-01-01T00:00:00Z", None):  # a past time and null both mean now
        pipe.ctx.redis.delete(queue.TASK_LIST)
        task = api.patch(f"/api/v1/task/{task_id}", json={"scheduled_at": at}, headers=headers).get_json()
        assert task["status"] == "queued"
        assert before <= datetime.fromisoformat(task["scheduled_at"]) <= pg_now(pipe)
        assert pipe.ctx.redis.lrange(queue.TASK_LIST, 0, -1) == [queue.encode(task_id)]  # a sender woken
    assert pipe.pump() == [Outcome.HANDED_OFF, Outcome.SENT] and len(smtp.received) == 1


@pytest.mark.parametrize("status", ["processing", "sent", "cancelled"])
def test_reschedule_is_a_409_unless_scheduled_queued_or_failed(api, pipe, ada, status):
    user, headers = ada
    task_id = pipe.enqueue(user)
    make_status(pipe, task_id, status)
    assert_problem(api.patch(f"/api/v1/task/{task_id}", json={"scheduled_at": later()}, headers=headers), 409)
    assert pipe.task(task_id).status == status


@pytest.mark.parametrize("body", [{}, {"scheduled_at": "tomorrow"}, {"scheduled_at": 42}])
def test_reschedule_without_a_valid_scheduled_at_is_a_422(api, pipe, ada, body):
    user, headers = ada
    task_id = pipe.enqueue(user)
    problem = assert_problem(api.patch(f"/api/v1/task/{task_id}", json=body, headers=headers), 422)
    assert "scheduled_at" in problem["errors"]
    assert pipe.task(task_id).status == "queued"


# --- retry -------------------------------------------------------------------------------------------


def test_a_task_that_used_up_its_tries_gets_a_fresh_budget_and_the_try_count_keeps_counting(api, pipe):
    with ScriptedSmtpServer(["451 4.3.0 try later"] * 3) as flaky:
        user = pipe.user(flaky)
        headers = auth_header(login(api))
        task_id = pipe.enqueue(user)
        for _ in range(3):
            pipe.pump()
            due = datetime(2000, 1, 1, tzinfo=UTC)  # the backoff is over
            make_status(pipe, task_id, pipe.task(task_id).status, next_attempt_at=due)
            pipe.sweep()
        row = pipe.task(task_id)
        assert (row.status, row.try_count) == ("cancelled", 3) and "gave up after 3 tries" in row.last_error

        task = api.post(f"/api/v1/task/{task_id}/retry", headers=headers).get_json()
        assert (task["status"], task["try_count"], task["tries_left"]) == ("queued", 3, 3)
        assert pipe.task(task_id).budget_base == 3
        assert pipe.pump() == [Outcome.HANDED_OFF, Outcome.SENT]
        row = pipe.task(task_id)
        assert (row.status, row.try_count, len(flaky.received)) == ("sent", 4, 1)


def test_a_task_the_user_cancelled_can_be_retried_and_is_sent_once(api, pipe, ada, smtp):
    user, headers = ada
    task_id = pipe.enqueue(user)
    api.post(f"/api/v1/task/{task_id}/cancel", headers=headers)
    enqueued_at = pipe.task(task_id).scheduled_at
    response = api.post(f"/api/v1/task/{task_id}/retry", headers=headers)
    assert response.status_code == 200 and response.get_json()["status"] == "queued"
    assert response.get_json()["scheduled_at"] == enqueued_at.isoformat()  # a past due time stays
    # Two envelopes (enqueue's and retry's), one mail.
    assert Counter(pipe.pump()) == Counter([Outcome.HANDED_OFF, Outcome.DROPPED, Outcome.SENT])
    assert len(smtp.received) == 1 and pipe.task(task_id).try_count == 1


def test_a_mail_cancelled_before_its_time_is_due_now_when_retried(api, pipe, ada, smtp):
    user, headers = ada
    task_id = pipe.enqueue(user, scheduled_at=later(days=30))
    api.post(f"/api/v1/task/{task_id}/cancel", headers=headers)
    before = pg_now(pipe)
    task = api.post(f"/api/v1/task/{task_id}/retry", headers=headers).get_json()
    assert before <= datetime.fromisoformat(task["scheduled_at"]) <= pg_now(pipe)
    assert pipe.pump() == [Outcome.HANDED_OFF, Outcome.SENT]


@pytest.mark.parametrize("status", ["sent", "processing", "queued", "scheduled"])
def test_retry_is_a_409_unless_failed_or_cancelled(api, pipe, ada, status):
    user, headers = ada
    task_id = pipe.enqueue(user)
    make_status(pipe, task_id, status)
    problem = assert_problem(api.post(f"/api/v1/task/{task_id}/retry", headers=headers), 409)
    assert "only a failed or cancelled task can be retried" in problem["detail"]
    assert pipe.task(task_id).status == status and pipe.task(task_id).budget_base == 0
