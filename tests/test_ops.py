"""/ops: the operator's read-only view of the queues and workers, behind OPS_TOKEN (real PostgreSQL and
Redis): absent without the token, 401 without or with another token, figures that move right after
mail goes out, and the token in no log line and no answer."""

from __future__ import annotations

import logging

import pytest

from functions import http
from shared.config import Settings
from shared.errors import ConfigError
from tests.conftest import auth_header, login, register_user

TOKEN = "ops-" + "t0k3n" * 10


@pytest.fixture()
def operator(api, monkeypatch):
    monkeypatch.setenv("OPS_TOKEN", TOKEN)
    http.reset_context()
    return api


def test_without_ops_token_there_is_no_operator_view(api):
    for path in ("/ops", "/ops/status"):
        response = api.get(path, headers=auth_header(TOKEN))
        assert response.status_code == 404 and response.mimetype == "application/problem+json"


def test_the_figures_need_the_operator_token_and_nothing_else_opens_them(operator):
    assert operator.get("/ops/status").status_code == 401
    assert operator.get("/ops/status", headers=auth_header(TOKEN + "x")).status_code == 401
    assert operator.get("/ops/status", headers=auth_header(TOKEN[:-1])).status_code == 401
    assert operator.get("/ops/status", headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401
    register_user(operator)
    user_token = login(operator)  # a user's token is no operator's
    assert operator.get("/ops/status", headers=auth_header(user_token)).status_code == 401
    response = operator.get("/ops/status", headers=auth_header(TOKEN))
    assert response.status_code == 200 and response.headers["Cache-Control"] == "no-store"


def test_the_figures_follow_the_queue_at_once(operator):
    register_user(operator)
    headers = auth_header(login(operator))
    mail = {"recipient_email": "bob@example.org", "subject": "Hi", "body": "Hi"}
    ids = [
        operator.post("/api/v1/task/enqueue", json=mail, headers=headers).get_json()["task_id"]
        for _ in range(3)
    ]
    operator.post(f"/api/v1/task/{ids[0]}/cancel", headers=headers)
    figures = operator.get("/ops/status", headers=auth_header(TOKEN)).get_json()
    assert figures["tasks"]["queued"] == 2
    assert figures["finished"] == {"sent": 0, "cancelled": 1}
    assert figures["lists"]["tasks"] == 3  # the cancelled one's envelope is dropped by a consumer later
    assert "example" not in str(figures)  # totals and fixed words: no user, address or host


def test_the_operator_token_is_in_no_log_line_and_no_answer(operator, caplog):
    caplog.set_level(logging.DEBUG)
    answers = [operator.get(path, headers=auth_header(TOKEN)) for path in ("/ops", "/ops/status")]
    answers.append(operator.get("/ops/status", headers=auth_header("wrong")))
    assert TOKEN not in caplog.text
    for answer in answers:
        assert TOKEN not in answer.get_data(as_text=True) and TOKEN not in str(answer.headers)


def test_production_refuses_a_short_operator_token():
    base = {
        "MAILQ_ENV": "production",
        "JWT_SECRET": "j" * 40,
        "MAILQ_ENCRYPTION_KEYS": "k",
        "DATABASE_URL": "postgresql+pg8000://x@db/x",
        "REDIS_URL": "redis://r:6379/0",
    }
    with pytest.raises(ConfigError, match="OPS_TOKEN is too short"):
        Settings.from_env({**base, "OPS_TOKEN": "short"})
    assert Settings.from_env({**base, "OPS_TOKEN": "o" * 32}).ops_token == "o" * 32
    assert "o" * 32 not in repr(Settings.from_env({**base, "OPS_TOKEN": "o" * 32}))
