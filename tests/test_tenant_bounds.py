"""Per-tenant bounds (issue 21, item 4): mails not yet final, their bytes, and an enqueue rate with a burst,
each a 429 problem with Retry-After, a batch all or nothing, exact under concurrency, rebuilt from
PostgreSQL when Redis forgets, and raised for one account by an operator (`mailq account limits`)."""

from __future__ import annotations

import threading
import time

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from functions.cli import main
from shared import queue
from shared.errors import RateLimited
from shared.tasks import batch, enqueue
from tests.conftest import auth_header, login, register_user
from tests.test_accounts_api import assert_problem

ENQUEUE = "/api/v1/task/enqueue"
BATCH = "/api/v1/task/enqueue/batch"
MAIL = {"recipient_email": "bob@example.org", "subject": "Hi", "body": "Hello Bob"}


@pytest.fixture()
def bounded(env, monkeypatch):
    """Set tenant bounds for the API (small, so a test reaches them in a few requests)."""
    from functions import http

    def apply(**values):
        for name, value in values.items():
            monkeypatch.setenv(name, str(value))
        http.reset_context()

    return apply


def pending(pg_url_engine, user_id: int) -> int:
    with pg_url_engine.connect() as conn:
        return conn.execute(
            sa.text("SELECT count(*) FROM tasks WHERE user_id = :u AND status NOT IN ('sent', 'cancelled')"),
            {"u": user_id},
        ).scalar_one()


def assert_limited(response, limit: str) -> dict:
    problem = assert_problem(response, 429)
    assert problem["limit"] == limit and int(response.headers["Retry-After"]) >= 1
    return problem


def test_a_tenant_cannot_store_more_pending_mails_than_its_limit(api, bounded, ctx):
    bounded(MAX_PENDING_PER_USER=5)
    ada = register_user(api)
    headers = auth_header(login(api))
    for _ in range(5):
        assert api.post(ENQUEUE, json=MAIL, headers=headers).status_code == 202
    problem = assert_limited(api.post(ENQUEUE, json=MAIL, headers=headers), "pending_tasks")
    assert "limit is 5" in problem["detail"]
    assert pending(ctx.engine, ada["id"]) == 5
    register_user(api, email="eve@example.com")  # another tenant is not bounded by ada's mail
    assert api.post(ENQUEUE, json=MAIL, headers=auth_header(login(api, "eve@example.com"))).status_code == 202


def test_pending_bytes_are_bounded_too(api, bounded, ctx):
    bounded(MAX_PENDING_BYTES_PER_USER=100)
    ada = register_user(api)
    headers = auth_header(login(api))
    assert api.post(ENQUEUE, json={**MAIL, "body": "x" * 60}, headers=headers).status_code == 202
    assert_limited(api.post(ENQUEUE, json={**MAIL, "html": "<p>" + "y" * 50 + "</p>"}, headers=headers),
                   "pending_bytes")  # fmt: skip
    assert api.post(ENQUEUE, json={**MAIL, "body": "z" * 40}, headers=headers).status_code == 202  # fits
    assert pending(ctx.engine, ada["id"]) == 2


def test_the_enqueue_rate_allows_a_burst_then_refuses_until_the_bucket_refills(api, bounded):
    bounded(ENQUEUE_RATE_PER_USER=4, ENQUEUE_BURST_PER_USER=3, MAX_BATCH=3)
    register_user(api)
    headers = auth_header(login(api))
    answers = [api.post(ENQUEUE, json=MAIL, headers=headers).status_code for _ in range(3)]
    assert answers == [202, 202, 202]
    problem = assert_limited(api.post(ENQUEUE, json=MAIL, headers=headers), "enqueue_rate")
    assert "4 mails per second" in problem["detail"]
    time.sleep(0.6)  # 4 per second: more than two mails' worth
    assert api.post(ENQUEUE, json=MAIL, headers=headers).status_code == 202


def test_a_batch_is_all_or_nothing_against_the_bounds(api, bounded, ctx):
    bounded(MAX_PENDING_PER_USER=5)
    ada = register_user(api)
    headers = auth_header(login(api))
    assert api.post(BATCH, json={"tasks": [MAIL] * 3}, headers=headers).status_code == 202
    assert_limited(api.post(BATCH, json={"tasks": [MAIL] * 3}, headers=headers), "pending_tasks")
    assert pending(ctx.engine, ada["id"]) == 3  # none of the second batch
    # Permissive: only the valid items count (two of three here), and they fit.
    mixed = {"tasks": [MAIL, {"recipient_email": "nobody"}, MAIL]}
    answer = api.post(f"{BATCH}?validation=permissive", json=mixed, headers=headers)
    assert answer.status_code == 202 and pending(ctx.engine, ada["id"]) == 5


def test_a_batch_larger_than_the_accounts_burst_is_refused_as_invalid_not_told_to_wait(api, bounded, ctx):
    bounded(MAX_BATCH=3, ENQUEUE_BURST_PER_USER=3)
    ada = register_user(api)
    assert CliRunner().invoke(main, ["account", "limits", ada["email"], "--burst", "3"]).exit_code == 0
    bounded(MAX_BATCH=5, ENQUEUE_BURST_PER_USER=5)  # the deployment's batches grew; this account's burst not
    headers = auth_header(login(api))
    problem = assert_problem(api.post(BATCH, json={"tasks": [MAIL] * 4}, headers=headers), 422)
    assert "more than this account may enqueue at once (3)" in problem["errors"]["tasks"]
    assert pending(ctx.engine, ada["id"]) == 0


def test_concurrent_requests_cannot_both_take_the_last_place(ctx):
    ctx.settings = ctx.settings.replace(max_pending_per_user=10)
    user = _user(ctx)
    for _ in range(9):
        enqueue.enqueue(ctx, user, MAIL, None)
    answers = _at_once(20, lambda: enqueue.enqueue(ctx, user, MAIL, None))
    assert answers.count("stored") == 1 and answers.count(429) == 19
    assert pending(ctx.engine, user) == 10


def test_concurrent_batches_cannot_both_fit_where_one_does(ctx):
    ctx.settings = ctx.settings.replace(max_pending_per_user=10)
    user = _user(ctx)
    body = {"tasks": [MAIL] * 3}
    answers = _at_once(6, lambda: batch.enqueue_batch(ctx, user, body, None, "strict"))
    assert answers.count("stored") == 3 and pending(ctx.engine, user) == 9


def _user(ctx) -> int:
    from shared.accounts import users

    body = {
        "email": "ada@example.com",
        "password": "correct horse",
        "smtp_host": "127.0.0.1",
        "smtp_port": 25,
        "smtp-username": "",
        "smtp-password": "",
        "smtp_security": "none",
    }
    return users.register(ctx, body, "test")["id"]


def _at_once(n: int, call) -> list:
    """Call ``call`` from n threads released together; "stored" or the HTTP status of each refusal."""
    start, answers, lock = threading.Barrier(n), [], threading.Lock()

    def run():
        start.wait()
        try:
            call()
            answer = "stored"
        except RateLimited:
            answer = 429
        with lock:
            answers.append(answer)

    threads = [threading.Thread(target=run) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return answers


def test_sent_mail_makes_room_again_after_a_recount(ctx):
    ctx.settings = ctx.settings.replace(max_pending_per_user=3, pending_recount_seconds=0.3)
    user = _user(ctx)
    for _ in range(3):
        enqueue.enqueue(ctx, user, MAIL, None)
    with ctx.engine.begin() as conn:
        conn.execute(sa.text("UPDATE tasks SET status = 'sent' WHERE user_id = :u"), {"u": user})
    enqueue.enqueue(ctx, user, MAIL, None)  # at the estimate's limit: counted again, 1 pending
    enqueue.enqueue(ctx, user, MAIL, None)
    enqueue.enqueue(ctx, user, MAIL, None)
    with pytest.raises(RateLimited) as refused:  # 3 pending now, really
        enqueue.enqueue(ctx, user, MAIL, None)
    assert refused.value.retry_after == 1 and refused.value.extra["limit"] == "pending_tasks"
    assert pending(ctx.engine, user) == 3


def test_the_bounds_are_rebuilt_exactly_from_postgresql_when_redis_forgets_them(ctx):
    ctx.settings = ctx.settings.replace(max_pending_per_user=3)
    user = _user(ctx)
    for _ in range(3):
        enqueue.enqueue(ctx, user, MAIL, None)
    ctx.redis.delete(queue.tenant_key(user))  # Redis restarted empty, or the hash expired
    with pytest.raises(RateLimited):
        enqueue.enqueue(ctx, user, MAIL, None)
    assert pending(ctx.engine, user) == 3


def test_without_redis_the_bounds_are_not_enforced_and_mail_is_still_stored(ctx, caplog, monkeypatch):
    from shared import bounds
    from shared.context import make_redis
    from shared.local.embedded import free_port

    monkeypatch.setattr(bounds, "_last_warning", 0.0)
    ctx.settings = ctx.settings.replace(max_pending_per_user=1)
    user = _user(ctx)
    enqueue.enqueue(ctx, user, MAIL, None)
    ctx.redis = make_redis(f"redis://127.0.0.1:{free_port()}/0", socket_timeout=0.5)
    result, created = enqueue.enqueue(ctx, user, MAIL, None)
    assert created and pending(ctx.engine, user) == 2  # the sweep pushes it when Redis is back
    assert "tenant bounds not enforced: Redis cannot be reached" in caplog.text


def test_a_retry_of_a_stored_request_is_answered_even_at_the_limit(api, bounded):
    bounded(MAX_PENDING_PER_USER=1)
    register_user(api)
    headers = {**auth_header(login(api)), "Idempotency-Key": "k1"}
    first = api.post(ENQUEUE, json=MAIL, headers=headers)
    again = api.post(ENQUEUE, json=MAIL, headers=headers)
    assert first.status_code == again.status_code == 202
    assert again.get_json()["task_id"] == first.get_json()["task_id"]
    batch_headers = {**headers, "Idempotency-Key": "b1"}
    assert_limited(api.post(BATCH, json={"tasks": [MAIL]}, headers=batch_headers), "pending_tasks")


def test_retrying_a_cancelled_task_counts_against_the_pending_limit(api, bounded, ctx):
    bounded(MAX_PENDING_PER_USER=1, PENDING_RECOUNT_SECONDS=0.2)
    register_user(api)
    headers = auth_header(login(api))
    task_id = api.post(ENQUEUE, json=MAIL, headers=headers).get_json()["task_id"]
    assert api.post(f"/api/v1/task/{task_id}/cancel", headers=headers).status_code == 200
    with ctx.engine.begin() as conn:  # the estimate is counted again only when it reaches the limit
        conn.execute(sa.text("UPDATE tasks SET status = 'queued' WHERE id = :id"), {"id": task_id})
    assert api.post(ENQUEUE, json=MAIL, headers=headers).status_code == 429
    with ctx.engine.begin() as conn:
        conn.execute(sa.text("UPDATE tasks SET status = 'cancelled' WHERE id = :id"), {"id": task_id})
    time.sleep(0.3)  # PENDING_RECOUNT_SECONDS since the last count
    second = api.post(ENQUEUE, json=MAIL, headers=headers)
    assert second.status_code == 202  # the cancelled one made room (recounted)
    assert_limited(api.post(f"/api/v1/task/{task_id}/retry", headers=headers), "pending_tasks")


# --- the operator's override -------------------------------------------------------------------------------


def test_an_operator_raises_the_limits_of_one_account_and_sees_them(api, bounded, ctx, monkeypatch):
    bounded(MAX_PENDING_PER_USER=2)
    ada = register_user(api)
    register_user(api, email="eve@example.com")
    headers, eve = auth_header(login(api)), auth_header(login(api, "eve@example.com"))
    for _ in range(2):
        api.post(ENQUEUE, json=MAIL, headers=headers)
    assert_limited(api.post(ENQUEUE, json=MAIL, headers=headers), "pending_tasks")
    monkeypatch.setenv("MAX_PENDING_PER_USER", "2")  # the CLI reads the same environment as the API

    raised = CliRunner().invoke(
        main, ["account", "limits", "ADA@example.com", "--max-pending", "4", "--rate", "50"]
    )
    assert raised.exit_code == 0, raised.output
    assert "max pending mails      4 (set for this account; deployment: 2)" in raised.output
    assert "enqueue rate           50 mails/s (set for this account; deployment: 1000)" in raised.output
    assert "pending now            2 mails" in raised.output
    assert [api.post(ENQUEUE, json=MAIL, headers=headers).status_code for _ in range(3)] == [202, 202, 429]
    for _ in range(2):
        api.post(ENQUEUE, json=MAIL, headers=eve)
    assert_limited(api.post(ENQUEUE, json=MAIL, headers=eve), "pending_tasks")  # eve keeps the default

    shown = CliRunner().invoke(main, ["account", "limits", "ada@example.com"])
    assert shown.exit_code == 0 and "4 (set for this account" in shown.output
    reset = CliRunner().invoke(main, ["account", "limits", "ada@example.com", "--max-pending", "default"])
    assert "max pending mails      2 (deployment default)" in reset.output
    with ctx.engine.connect() as conn:
        assert conn.execute(
            sa.text("SELECT max_pending_tasks, enqueue_rate FROM users WHERE id = :u"), {"u": ada["id"]}
        ).one() == (None, 50.0)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nobody@example.com"], "no account with the email nobody@example.com"),
        (["ada@example.com", "--max-pending", "-1"], "--max-pending"),
        (["ada@example.com", "--rate", "0"], "--rate"),
        (["ada@example.com", "--burst", "2"], "at least MAX_BATCH"),
    ],
)
def test_the_limits_command_refuses_what_it_cannot_do_in_one_line(api, env, args, message):
    register_user(api)
    result = CliRunner().invoke(main, ["account", "limits", *args])
    assert result.exit_code != 0 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_bulk_retry_counts_the_cancelled_tasks_it_makes_pending_all_or_none(api, bounded, ctx):
    bounded(MAX_PENDING_PER_USER=3, PENDING_RECOUNT_SECONDS=0.2)
    ada = register_user(api)
    headers = auth_header(login(api))
    ids = [api.post(ENQUEUE, json=MAIL, headers=headers).get_json()["task_id"] for _ in range(3)]
    for task_id in ids:
        assert api.post(f"/api/v1/task/{task_id}/cancel", headers=headers).status_code == 200
    time.sleep(0.3)  # PENDING_RECOUNT_SECONDS since the last count
    assert api.post(ENQUEUE, json=MAIL, headers=headers).status_code == 202  # one pending again
    retry_all = {"action": "retry", "status": "cancelled"}
    assert_limited(api.post("/api/v1/task/bulk", json=retry_all, headers=headers), "pending_tasks")
    assert pending(ctx.engine, ada["id"]) == 1  # none of the three: all or none
    bounded(MAX_PENDING_PER_USER=4, PENDING_RECOUNT_SECONDS=0.2)
    answer = api.post("/api/v1/task/bulk", json=retry_all, headers=headers)
    assert answer.status_code == 200 and answer.get_json()["changed"] == 3
    assert pending(ctx.engine, ada["id"]) == 4
