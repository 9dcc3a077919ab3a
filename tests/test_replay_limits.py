"""Replay is no HTTP flood for hire (issue 21, item 8): at most one delivery of an event to an endpoint in
flight at a time (a second replay meanwhile is a 409 naming the pending one, also when two arrive at
once), and at most REPLAY_RATE_PER_USER replays a minute per user (429 with Retry-After)."""

from __future__ import annotations

import threading

import pytest

from shared.errors import Conflict, RateLimited
from shared.webhooks import endpoints
from shared.webhooks.worker import WebhookWorker
from tests.pipeline import Pipeline
from tests.smtp_servers import ScriptedSmtpServer
from tests.webhook_receiver import WebhookReceiver

REPLAYS = 20


@pytest.fixture()
def delivered(ctx):
    """A user with one endpoint at a real receiver and one delivery already delivered to it."""
    ctx.settings = ctx.settings.replace(webhook_retry_schedule=(0,), replay_rate_per_user=1000)
    pipe = Pipeline(ctx)
    hooks = WebhookWorker(ctx.settings, ctx.engine, ctx.redis, ctx.box)
    with ScriptedSmtpServer() as smtp, WebhookReceiver() as receiver:
        user = pipe.user(smtp)
        endpoint = endpoints.create(ctx, user.id, {"url": receiver.url})
        pipe.enqueue(user)
        pipe.pump()
        while hooks.step():
            pass
        [delivery] = endpoints.list_deliveries(ctx, user.id, endpoint["id"], 10, None)["items"]
        assert delivery["state"] == "delivered" and len(receiver.requests) == 1
        yield ctx, hooks, receiver, user, endpoint["id"], delivery["id"]
    hooks.close()
    pipe.close()


def test_a_replay_flood_puts_one_delivery_in_flight_and_the_receiver_gets_one_request(delivered):
    ctx, hooks, receiver, user, endpoint_id, delivery_id = delivered
    answers = []
    for _ in range(REPLAYS):
        try:
            endpoints.replay(ctx, user.id, endpoint_id, delivery_id)
            answers.append(202)
        except Conflict as exc:
            answers.append(409)
            assert "still pending (delivery" in exc.detail
    while hooks.step():
        pass
    assert len(receiver.requests) == 2  # the original and one replay; before: 1 + REPLAYS
    assert answers == [202] + [409] * (REPLAYS - 1)
    # Once the replay has ended, the event may be replayed again.
    endpoints.replay(ctx, user.id, endpoint_id, delivery_id)


def test_two_replays_at_once_cannot_both_find_nothing_in_flight(delivered):
    ctx, _, _, user, endpoint_id, delivery_id = delivered
    start, answers, lock = threading.Barrier(8), [], threading.Lock()

    def replay():
        start.wait()
        try:
            endpoints.replay(ctx, user.id, endpoint_id, delivery_id)
            answer = 202
        except Conflict:
            answer = 409
        with lock:
            answers.append(answer)

    threads = [threading.Thread(target=replay) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(answers) == [202] + [409] * 7


def test_replays_past_the_users_rate_are_refused_with_retry_after(delivered):
    ctx, hooks, _, user, endpoint_id, delivery_id = delivered
    ctx.settings = ctx.settings.replace(replay_rate_per_user=3)
    endpoints.replay(ctx, user.id, endpoint_id, delivery_id)
    for _ in range(2):  # refused ones count too: each costs us a lookup
        with pytest.raises(Conflict):
            endpoints.replay(ctx, user.id, endpoint_id, delivery_id)
    while hooks.step():
        pass
    with pytest.raises(RateLimited) as refused:  # nothing in flight now, but the minute's three are spent
        endpoints.replay(ctx, user.id, endpoint_id, delivery_id)
    assert refused.value.extra == {"limit": "replay_rate"} and 1 <= refused.value.retry_after <= 61


def test_the_rate_answers_429_through_the_api(api, env, monkeypatch):
    from functions import http
    from tests.conftest import auth_header, login, register_user
    from tests.test_accounts_api import assert_problem

    monkeypatch.setenv("REPLAY_RATE_PER_USER", "2")
    http.reset_context()
    register_user(api)
    headers = auth_header(login(api))
    path = "/api/v1/webhooks/1/deliveries/1/replay"
    assert [api.post(path, headers=headers).status_code for _ in range(2)] == [404, 404]
    response = api.post(path, headers=headers)
    problem = assert_problem(response, 429)
    assert problem["limit"] == "replay_rate" and int(response.headers["Retry-After"]) >= 1
