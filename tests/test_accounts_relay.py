"""What the user sees and hears of their account's standing with its relay (issue 20 items 4 and 6, issue
22 item 1): the declared limits on the user record, ``smtp_state``, ``waiting`` on queued mail, the
attempt log (``GET /api/v1/task/{id}/attempts``), the account.* webhook events, the worker metrics.
Real PostgreSQL, Redis, SMTP servers (aiosmtpd and raw sockets) and an HTTP receiver."""

from __future__ import annotations

import socket
import time

import pytest
import sqlalchemy as sa

from shared.accounts import users
from shared.tasks import pages, search, views
from shared.webhooks import endpoints
from shared.webhooks.worker import DELIVERED, WebhookWorker
from shared.workers import Outcome
from tests.conftest import auth_header, login, register_user
from tests.pipeline import Pipeline
from tests.relays.throttling_relay import ThrottlingRelay
from tests.smtp_servers import ScriptedSmtpServer
from tests.webhook_receiver import WebhookReceiver


@pytest.fixture()
def pipe(ctx):
    ctx.settings = ctx.settings.replace(
        account_backoff_base=0.2, account_backoff_max=0.4, webhook_timeout=2.0
    )
    p = Pipeline(ctx)
    p.hooks = WebhookWorker(ctx.settings, ctx.engine, ctx.redis, ctx.box)
    yield p
    p.hooks.close()
    p.close()


def refused_port() -> int:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        return closed.getsockname()[1]  # bound, never listening: every connection is refused


class Nowhere:
    host, port = "127.0.0.1", refused_port()


# --- the declared limits on the user record ------------------------------------------------------------


def test_register_and_patch_take_the_declared_limits_and_the_record_shows_them(api):
    user = register_user(api, smtp_max_connections=8, smtp_send_limits=[{"max": 10, "per": "second"}])
    assert user["smtp_max_connections"] == 8
    assert user["smtp_send_limits"] == [{"max": 10, "per": "second", "count": "messages"}]
    assert user["smtp_state"] == {
        "state": "active",
        "reason": None,
        "detail": None,
        "since": None,
        "until": None,
    }
    headers = auth_header(login(api))
    changed = api.patch(
        f"/api/v1/user/{user['id']}",
        json={
            "smtp_max_connections": None,
            "smtp_send_limits": [{"max": 500, "per": "day", "count": "recipients"}],
        },
        headers=headers,
    ).get_json()
    assert changed["smtp_max_connections"] == 3  # the deployment's default
    assert changed["smtp_send_limits"] == [{"max": 500, "per": "day", "count": "recipients"}]
    assert changed["smtp_host"] == user["smtp_host"]  # the SMTP settings are left as they were


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("smtp_max_connections", 0, "smtp_max_connections"),
        ("smtp_max_connections", 17, "smtp_max_connections"),
        ("smtp_max_connections", "3", "smtp_max_connections"),
        ("smtp_send_limits", {"max": 1}, "smtp_send_limits"),
        ("smtp_send_limits", [{"max": 1, "per": "fortnight"}], "smtp_send_limits[0].per"),
        ("smtp_send_limits", [{"max": 1, "per": "day"}] * 5, "smtp_send_limits"),
    ],
)
def test_a_limit_out_of_bounds_is_a_422_and_nothing_changes(api, field, value, error):
    response = api.post("/api/v1/register", json={**register_body(), field: value})
    assert response.status_code == 422 and error in response.get_json()["errors"]
    user = register_user(api)
    headers = auth_header(login(api))
    response = api.patch(f"/api/v1/user/{user['id']}", json={field: value}, headers=headers)
    assert response.status_code == 422 and error in response.get_json()["errors"]
    assert api.get(f"/api/v1/user/{user['id']}", headers=headers).get_json() == user


def register_body() -> dict:
    return {
        "email": "zoe@example.com",
        "password": "correct horse",
        "smtp_host": "127.0.0.1",
        "smtp_port": 1025,
        "smtp-username": "",
        "smtp-password": "",
        "smtp_security": "none",
    }


# --- backing off: the user record, the waiting mail, the log, the event --------------------------------


def test_a_relay_that_cannot_be_reached_shows_as_backing_off_and_the_mail_says_why(pipe):
    with WebhookReceiver() as receiver:
        user = pipe.user(Nowhere())
        hook = endpoints.create(pipe.ctx, user.id, {"url": receiver.url})
        ids = [pipe.enqueue(user, subject=f"s{i}") for i in range(3)]
        assert pipe.pump() == [Outcome.HANDED_OFF] * 3 + [Outcome.WAITING]
        state = users.get_user(pipe.ctx, user.id, user.id)["smtp_state"]
        assert state["state"] == "backing_off" and state["reason"] == "unreachable"
        assert "Connection refused" in state["detail"] and state["until"] > state["since"]
        for task_id in ids:
            task = views.get_task(pipe.ctx, user.id, task_id)
            assert task["status"] == "queued" and task["try_count"] == 0 and task["last_error"] is None
            assert (
                task["waiting"].startswith("waiting: relay unreachable (")
                and "next attempt at" in task["waiting"]
            )
        page = pages.list_tasks(pipe.ctx, user.id, search.Search(("queued",)), 10, None)
        assert {t["waiting"] for t in page["items"]} == {task["waiting"]}
        for _ in range(3):  # it comes due again and is refused again: more steps, one event, one log line
            time.sleep(0.5)
            pipe.pump()
        assert [d for d in deliver(pipe)] == [DELIVERED]
        (request,) = receiver.requests
        event = request.verified(hook["secret"])
    assert event["type"] == "account.backing_off"
    assert event["data"]["user_id"] == user.id and event["data"]["reason"] == "unreachable"
    assert event["data"]["until"] and event["data"]["since"]
    log = attempts_of(pipe, ids[0])
    assert [a["outcome"] for a in log] == ["waiting"] and log[0]["repeats"] >= 2
    assert log[0]["try_count"] is None and log[0]["spent"] is False and log[0]["stage"] == "connect"
    assert all(attempts_of(pipe, i) == [] for i in ids[1:])  # only the mail the sender held was touched
    assert pipe.sender.metrics.account_backoffs.labels("unreachable")._value.get() >= 3  # noqa: SLF001


def test_the_first_success_ends_the_episode_on_the_record_too(pipe):
    with ThrottlingRelay() as relay:
        user = pipe.user(relay)
        relay.go_down("refuse")
        task_id = pipe.enqueue(user)
        pipe.pump()
        assert users.get_user(pipe.ctx, user.id, user.id)["smtp_state"]["state"] == "backing_off"
        relay.come_up()
        time.sleep(0.5)
        assert Outcome.SENT in pipe.pump()
    assert users.get_user(pipe.ctx, user.id, user.id)["smtp_state"]["state"] == "active"
    assert views.get_task(pipe.ctx, user.id, task_id)["status"] == "sent"
    assert [a["outcome"] for a in attempts_of(pipe, task_id)] == ["waiting", "sent"]


def test_a_throttled_mail_after_its_claim_is_given_back_without_a_try_and_logged(pipe):
    with ThrottlingRelay(max_rate=1, rate_window=5) as relay:
        user = pipe.user(relay)
        first, second = pipe.enqueue(user), pipe.enqueue(user)
        outcomes = pipe.pump()
        assert Outcome.SENT in outcomes and Outcome.WAITING in outcomes
    row = pipe.task(second)
    assert row.status == "queued" and row.try_count - row.budget_base == 0 and row.try_count == 1
    assert row.last_error.startswith("waiting: 454 4.7.0 Throttling failure")
    [logged] = attempts_of(pipe, second)
    assert logged["outcome"] == "waiting" and logged["spent"] is False and logged["reason"] == "throttled"
    assert logged["smtp_code"] == 454 and logged["stage"] == "MAIL FROM" and logged["try_count"] == 1
    state = users.get_user(pipe.ctx, user.id, user.id)["smtp_state"]
    assert state["state"] == "backing_off" and state["reason"] == "throttled"
    assert attempts_of(pipe, first)[0]["outcome"] == "sent"


# --- pausing and resuming: the events ------------------------------------------------------------------


def test_refused_credentials_pause_the_account_and_new_ones_resume_it_each_said_by_webhook(pipe):
    with ThrottlingRelay(credentials=("ada", "right")) as relay, WebhookReceiver() as receiver:
        user = pipe.user(relay, **{"smtp-username": "ada", "smtp-password": "wrong"})
        hook = endpoints.create(
            pipe.ctx, user.id, {"url": receiver.url, "events": ["account.paused", "account.resumed"]}
        )
        task_id = pipe.enqueue(user)
        assert Outcome.PAUSED in pipe.pump()
        state = users.get_user(pipe.ctx, user.id, user.id)["smtp_state"]
        assert state["state"] == "paused" and state["reason"] == "credentials" and "535" in state["detail"]
        assert views.get_task(pipe.ctx, user.id, task_id)["waiting"].startswith(
            "waiting: the account is paused"
        )
        users.update_smtp(pipe.ctx, user.id, user.id, {"smtp-password": "right"})
        assert Outcome.SENT in pipe.pump()
        deliver(pipe)
        events = [r.verified(hook["secret"]) for r in receiver.wait_for(2)]
    assert [e["type"] for e in events] == ["account.paused", "account.resumed"]
    assert events[0]["data"]["reason"] == "credentials" and "right" not in str(events)
    assert events[1]["data"]["state"] == "active" and events[1]["data"]["reason"] == "credentials"
    assert relay.stats().auth_failures == 1


def test_changing_only_the_declared_limits_resumes_nothing(pipe):
    with ThrottlingRelay(credentials=("ada", "right")) as relay:
        user = pipe.user(relay, **{"smtp-username": "ada", "smtp-password": "wrong"})
        pipe.enqueue(user)
        assert Outcome.PAUSED in pipe.pump()
        record = users.update_smtp(pipe.ctx, user.id, user.id, {"smtp_max_connections": 2})
        assert record["smtp_state"]["state"] == "paused" and record["smtp_max_connections"] == 2
        assert pipe.pump() == [] and relay.stats().auth_failures == 1  # the wrong password is not tried again


# --- the attempt log, through the API ------------------------------------------------------------------


def test_every_attempt_is_logged_and_the_api_pages_it_for_its_owner_only(api, ctx):
    ctx.settings = ctx.settings.replace(retry_backoff_base=0, retry_backoff_max=0)
    pipe = Pipeline(ctx)
    try:
        with ScriptedSmtpServer(["451 4.3.0 try later", "250 OK"]) as server:
            register_user(
                api,
                smtp_host=server.host,
                smtp_port=server.port,
                **{"smtp-username": "", "smtp-password": ""},
            )
            headers = auth_header(login(api))
            task_id = api.post(
                "/api/v1/task/enqueue",
                json={"recipient_email": "b@example.org", "subject": "s", "body": "b"},
                headers=headers,
            ).get_json()["task_id"]
            pipe.run_until_settled()
    finally:
        pipe.close()
    first = api.get(f"/api/v1/task/{task_id}/attempts?limit=1", headers=headers).get_json()
    assert first["next_cursor"] and len(first["items"]) == 1
    rest = api.get(
        f"/api/v1/task/{task_id}/attempts?cursor={first['next_cursor']}", headers=headers
    ).get_json()
    log = first["items"] + rest["items"]
    assert rest["next_cursor"] is None
    assert [(a["try_count"], a["outcome"], a["smtp_code"], a["spent"]) for a in log] == [
        (1, "deferred", 451, True),
        (2, "sent", 250, True),
    ]
    assert log[0]["stage"] == "DATA" and "451 4.3.0 try later" in log[0]["reply"]
    assert log[1]["server"] == f"127.0.0.1:{server.port}" and log[1]["duration_ms"] >= 0
    assert log[0]["started_at"] <= log[0]["finished_at"] <= log[1]["started_at"]
    register_user(api, email="eve@example.com")
    eve = auth_header(login(api, email="eve@example.com"))
    assert api.get(f"/api/v1/task/{task_id}/attempts", headers=eve).status_code == 404
    assert api.get(f"/api/v1/task/{task_id}/attempts").status_code == 401
    assert api.get(f"/api/v1/task/{task_id}/attempts?cursor=bogus", headers=headers).status_code == 422
    assert api.get(f"/api/v1/task/{task_id}/attempts?limit=0", headers=headers).status_code == 422


def test_a_refused_recipient_is_in_the_log_line_of_the_mail_the_others_got(pipe):
    with ScriptedSmtpServer() as server:
        server.refuse["nobody@example.org"] = "550 5.1.1 no such user"
        user = pipe.user(server)
        task_id = pipe.enqueue(user, cc=["nobody@example.org"])
        assert Outcome.SENT in pipe.pump()
    [line] = attempts_of(pipe, task_id)
    assert line["refused"] == [
        {"recipient": "nobody@example.org", "code": 550, "reply": "5.1.1 no such user"}
    ]


def test_the_log_goes_with_its_task_by_retention(pipe):
    with ScriptedSmtpServer() as server:
        user = pipe.user(server)
        task_id = pipe.enqueue(user)
        pipe.pump()
    with pipe.ctx.engine.begin() as conn:
        conn.execute(sa.text("UPDATE tasks SET updated_at = now() - interval '400 days'"))
    assert pipe.sweep().purged == 1
    with pipe.ctx.engine.connect() as conn:
        assert (
            conn.execute(
                sa.text("SELECT count(*) FROM task_attempts WHERE task_id = :id"), {"id": task_id}
            ).scalar_one()
            == 0
        )


# --- helpers --------------------------------------------------------------------------------------------


def attempts_of(pipe, task_id: int) -> list[dict]:
    from shared.tasks import attempts

    with pipe.ctx.engine.connect() as conn:
        user_id = conn.execute(
            sa.text("SELECT user_id FROM tasks WHERE id = :id"), {"id": task_id}
        ).scalar_one()
    return attempts.list_attempts(pipe.ctx, user_id, task_id, 200, None)["items"]


def deliver(pipe) -> list[str]:
    outcomes = []
    for _ in range(10):
        step = pipe.hooks.step()
        if not step:
            break
        outcomes += step
    return outcomes
