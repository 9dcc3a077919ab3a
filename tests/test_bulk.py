"""POST /api/v1/task/bulk: retry or cancel what a search finds, bounded per request, idempotent with an
Idempotency-Key, by the single-task rules (real PostgreSQL and Redis)."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from shared import queue
from shared.db import engine_for
from shared.tasks import bulk, control, pages, search
from tests.conftest import auth_header, login, register_user
from tests.test_accounts_api import assert_problem

BULK = "/api/v1/task/bulk"


@pytest.fixture()
def two(api):
    register_user(api, "ada@example.com")
    register_user(api, "grace@example.com")
    return auth_header(login(api, "ada@example.com")), auth_header(login(api, "grace@example.com"))


def enqueue(api, headers, **fields) -> int:
    mail = {"recipient_email": "bob@example.org", "subject": "Hello", "body": "Hi", **fields}
    response = api.post("/api/v1/task/enqueue", json=mail, headers=headers)
    assert response.status_code == 202, response.get_json()
    return response.get_json()["task_id"]


def run_sql(pg_url, sql: str, **params):
    with engine_for(pg_url).begin() as conn:
        result = conn.execute(sa.text(sql), params)
        return result.all() if result.returns_rows else None


def statuses(pg_url) -> dict[int, str]:
    return dict(run_sql(pg_url, "SELECT id, status FROM tasks ORDER BY id"))


def fail(pg_url, *task_ids, status="failed", tries=3):
    run_sql(
        pg_url,
        "UPDATE tasks SET status = :s, try_count = :t, last_error = '451 try later' WHERE id = ANY(:ids)",
        s=status,
        t=tries,
        ids=list(task_ids),
    )


def test_bulk_retry_queues_every_failed_and_cancelled_match_with_a_fresh_budget(api, two, pg_url, redis_url):
    import redis

    ada, _ = two
    failed = [enqueue(api, ada, tags={"run": "7"}) for _ in range(3)]
    cancelled = enqueue(api, ada, tags={"run": "7"})
    sent = enqueue(api, ada, tags={"run": "7"})
    other_run = enqueue(api, ada, tags={"run": "8"})
    fail(pg_url, *failed, other_run)
    fail(pg_url, cancelled, status="cancelled")
    fail(pg_url, sent, status="sent", tries=1)
    client = redis.Redis.from_url(redis_url)
    client.delete(queue.TASK_LIST)
    response = api.post(BULK, json={"action": "retry", "tag": "run:7"}, headers=ada)
    assert response.status_code == 200, response.get_json()
    assert response.get_json() == {"action": "retry", "changed": 4, "unchanged": 0, "next_cursor": None}
    now = statuses(pg_url)
    assert [now[i] for i in (*failed, cancelled)] == ["queued"] * 4
    assert now[sent] == "sent" and now[other_run] == "failed"
    budgets = run_sql(pg_url, "SELECT budget_base FROM tasks WHERE id = ANY(:ids)", ids=failed)
    assert {b for (b,) in budgets} == {3}  # a fresh budget: the try count keeps counting
    assert sorted(queue.decode(e) for e in client.lrange(queue.TASK_LIST, 0, -1)) == sorted(
        [*failed, cancelled]
    )
    client.close()


def test_bulk_cancel_cancels_what_is_waiting_and_reports_it_to_webhooks(api, two, pg_url):
    ada, _ = two
    api.post("/api/v1/webhooks", json={"url": "https://hooks.example.com/x"}, headers=ada)
    later = [enqueue(api, ada, subject="Spring sale", scheduled_at="2999-01-01T00:00:00Z") for _ in range(2)]
    other = enqueue(api, ada, subject="Receipt", scheduled_at="2999-01-01T00:00:00Z")
    body = {"action": "cancel", "status": "scheduled", "subject": "spring"}
    answer = api.post(BULK, json=body, headers=ada).get_json()
    assert answer == {"action": "cancel", "changed": 2, "unchanged": 0, "next_cursor": None}
    now = statuses(pg_url)
    assert [now[i] for i in later] == ["cancelled", "cancelled"] and now[other] == "scheduled"
    reported = run_sql(
        pg_url,
        "SELECT e.task_id, e.data->>'reason' FROM webhook_events AS e"
        " JOIN webhook_deliveries AS d ON d.event_id = e.id ORDER BY e.task_id",
    )
    assert [tuple(r) for r in reported] == [(later[0], "user"), (later[1], "user")]


def test_one_request_changes_at_most_bulk_max_tasks_and_says_where_to_go_on(api, two, pg_url):
    ada, _ = two
    enqueue(api, ada)  # user 1
    run_sql(
        pg_url,
        """INSERT INTO tasks (user_id, recipient_email, subject, body, status, try_count, scheduled_at,
                              next_attempt_at, message_id)
           SELECT 1, 'bob@example.org', 'Hi', 'b', 'failed', 3, now(), now(), '<f' || g || '@x>'
             FROM generate_series(1, :n) AS g""",
        n=2 * bulk.BULK_MAX + 3,
    )
    answers, cursor = [], None
    while True:
        body = {"action": "retry", "status": "failed", **({"cursor": cursor} if cursor else {})}
        answer = api.post(BULK, json=body, headers=ada).get_json()
        answers.append(answer["changed"])
        cursor = answer["next_cursor"]
        if cursor is None:
            break
    assert answers == [bulk.BULK_MAX, bulk.BULK_MAX, 3]
    assert "failed" not in statuses(pg_url).values()


def test_bulk_never_touches_another_users_tasks(api, two, pg_url):
    ada, grace = two
    mine = enqueue(api, ada)
    theirs = enqueue(api, grace)
    fail(pg_url, mine, theirs)
    answer = api.post(BULK, json={"action": "retry", "id": theirs}, headers=ada).get_json()
    assert answer["changed"] == 0
    answer = api.post(BULK, json={"action": "retry"}, headers=ada).get_json()
    assert answer["changed"] == 1
    assert statuses(pg_url) == {mine: "queued", theirs: "failed"}


def test_a_task_that_changed_since_it_was_found_is_left_alone_by_the_conditional_update(
    api, two, pg_url, ctx
):
    """What bulk reads and what it changes are two statements; a sender may claim a task between them.
    The UPDATE re-checks each row's status, as the single-task retry and cancel do."""
    ada, _ = two
    found = [enqueue(api, ada) for _ in range(3)]
    fail(pg_url, *found)
    with ctx.engine.connect() as conn:
        page = pages.read(conn, 1, search.Search(("failed",)), bulk.BULK_MAX, None)
    assert [r.id for r in page.items] == found
    fail(pg_url, found[0], status="processing")  # claimed meanwhile
    fail(pg_url, found[1], status="sent")  # and sent
    with ctx.engine.begin() as conn:
        retried = control.retry_many(ctx, conn, 1, found)
        cancelled, _ = control.cancel_many(conn, 1, found[:2])
    assert [r.id for r in retried] == [found[2]] and cancelled == []
    assert statuses(pg_url) == {found[0]: "processing", found[1]: "sent", found[2]: "queued"}


def test_an_idempotency_key_answers_a_retried_request_again_without_acting_twice(api, two, pg_url):
    ada, _ = two
    first = enqueue(api, ada)
    fail(pg_url, first)
    keyed = {**ada, "Idempotency-Key": "retry-all-1"}
    answer = api.post(BULK, json={"action": "retry"}, headers=keyed).get_json()
    assert answer["changed"] == 1
    fail(pg_url, first)  # it failed again since
    again = api.post(BULK, json={"action": "retry"}, headers=keyed)
    assert again.status_code == 200 and again.get_json() == answer
    assert statuses(pg_url)[first] == "failed"  # the replay did not act
    problem = assert_problem(api.post(BULK, json={"action": "cancel"}, headers=keyed), 422)
    assert "Idempotency-Key" in problem["errors"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "action"),
        ({"action": "delete"}, "action"),
        ({"action": "retry", "status": "sent"}, "status"),
        ({"action": "retry", "status": "queued"}, "status"),
        ({"action": "cancel", "status": "processing"}, "status"),
        ({"action": "cancel", "status": "cancelled"}, "status"),
        ({"action": "retry", "status": 7}, "status"),
        ({"action": "retry", "subject": ["x"]}, "subject"),
        ({"action": "retry", "tag": 5}, "tag"),
        ({"action": "retry", "cursor": 12}, "cursor"),
        ({"action": "retry", "cursor": "nope"}, "cursor"),
        ({"action": "retry", "created_from": "tomorrow"}, "created_from"),
        ({"action": "cancel", "created_to": "", "status": ""}, "created_to"),  # make fuzz found it: a 200
        ({"action": "retry", "subject": None}, "subject"),
    ],
)
def test_a_bad_bulk_request_is_a_422_naming_the_member_and_changes_nothing(api, two, pg_url, body, field):
    ada, _ = two
    task_id = enqueue(api, ada)
    fail(pg_url, task_id)
    problem = assert_problem(api.post(BULK, json=body, headers=ada), 422)
    assert field in problem["errors"], problem
    assert statuses(pg_url) == {task_id: "failed"}


def test_bulk_needs_a_token(api, two):
    assert_problem(api.post(BULK, json={"action": "retry"}), 401)
