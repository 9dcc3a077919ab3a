"""Enqueue, read and list tasks through the functions, with real PostgreSQL and Redis."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from shared import queue
from shared.db import engine_for
from tests.conftest import auth_header, login, register_user
from tests.test_accounts_api import assert_problem

MAIL = {"recipient_email": "bob@example.org", "subject": "Hi", "body": "Hello Bob", "scheduled_at": None}


@pytest.fixture()
def alice(api):
    user = register_user(api)
    return user, auth_header(login(api))


def task_count(pg_url) -> int:
    with engine_for(pg_url).connect() as conn:
        return conn.execute(sa.text("SELECT count(*) FROM tasks")).scalar_one()


def test_enqueue_answers_202_with_the_task_and_a_location(api, alice, redis_url):
    _, headers = alice
    response = api.post("/api/v1/task/enqueue", json=MAIL, headers=headers)
    assert response.status_code == 202
    body = response.get_json()
    assert body["status"] == "queued" and isinstance(body["task_id"], int)
    assert response.headers["Location"] == f"/api/v1/task/{body['task_id']}"
    task = api.get(response.headers["Location"], headers=headers).get_json()
    assert task["recipient_email"] == "bob@example.org" and task["body"] == "Hello Bob"
    assert task["message_id"].startswith("<mailq.") and task["message_id"].endswith("@example.com>")


def test_the_seed_example_body_is_accepted(api, alice):
    _, headers = alice
    seed = {**MAIL, "scheduled_at": "2024-04-15T12:00:00"}
    response = api.post("/api/v1/task/enqueue", json=seed, headers=headers)
    assert response.status_code == 202 and response.get_json()["status"] == "queued"


def test_a_future_scheduled_at_is_stored_as_scheduled_in_utc(api, alice):
    _, headers = alice
    at = (datetime.now(UTC) + timedelta(days=1)).replace(microsecond=0)
    response = api.post(
        "/api/v1/task/enqueue",
        json={**MAIL, "scheduled_at": at.replace(tzinfo=None).isoformat()},
        headers=headers,
    )
    body = response.get_json()
    assert body["status"] == "scheduled"
    assert datetime.fromisoformat(body["scheduled_at"]) == at


def test_an_offset_in_scheduled_at_is_honoured(api, alice):
    _, headers = alice
    response = api.post(
        "/api/v1/task/enqueue", json={**MAIL, "scheduled_at": "2999-01-01T12:00:00+02:00"}, headers=headers
    )
    assert datetime.fromisoformat(response.get_json()["scheduled_at"]) == datetime(2999, 1, 1, 10, tzinfo=UTC)


def test_enqueue_needs_a_token(api, pg_url):
    assert_problem(api.post("/api/v1/task/enqueue", json=MAIL), 401)
    assert task_count(pg_url) == 0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("recipient_email", "nobody"),
        ("recipient_email", "bob@example.org\r\nBcc: eve@example.org"),
        ("recipient_email", None),
        ("subject", "x" * 999),
        ("subject", "Hi\r\nBcc: eve@example.org"),
        ("subject", "Hi\nthere"),
        ("subject", "nul\x00"),
        ("subject", 5),
        ("body", 5),
        ("body", None),
        ("body", "nul\x00byte"),
        ("scheduled_at", "tomorrow"),
        ("scheduled_at", 1713182400),
        ("scheduled_at", "2024-13-45T99:00:00"),
    ],
)
def test_each_invalid_enqueue_field_is_a_422_and_nothing_is_written(
    api, alice, pg_url, redis_url, field, value
):
    _, headers = alice
    body = assert_problem(api.post("/api/v1/task/enqueue", json={**MAIL, field: value}, headers=headers), 422)
    assert field in body["errors"]
    assert task_count(pg_url) == 0


def test_a_subject_of_998_characters_is_accepted(api, alice):
    _, headers = alice
    assert (
        api.post("/api/v1/task/enqueue", json={**MAIL, "subject": "x" * 998}, headers=headers).status_code
        == 202
    )


def test_a_body_over_the_limit_is_a_413(api, alice, pg_url, monkeypatch):
    from functions import http

    monkeypatch.setenv("MAX_BODY_BYTES", "1000")
    http.reset_context()
    _, headers = alice
    assert (
        api.post("/api/v1/task/enqueue", json={**MAIL, "body": "é" * 501}, headers=headers).status_code == 413
    )
    assert (
        api.post("/api/v1/task/enqueue", json={**MAIL, "body": "x" * 1000}, headers=headers).status_code
        == 202
    )
    assert task_count(pg_url) == 1


def test_the_default_body_limit_is_one_mebibyte(api, alice):
    _, headers = alice
    big = "x" * (1024 * 1024)
    assert api.post("/api/v1/task/enqueue", json={**MAIL, "body": big}, headers=headers).status_code == 202
    assert_problem(api.post("/api/v1/task/enqueue", json={**MAIL, "body": big + "x"}, headers=headers), 413)


def test_the_same_idempotency_key_and_body_return_the_first_task(api, alice, pg_url, redis_url):
    from shared.context import make_redis

    _, headers = alice
    keyed = {**headers, "Idempotency-Key": "order-42"}
    first = api.post("/api/v1/task/enqueue", json=MAIL, headers=keyed)
    again = api.post("/api/v1/task/enqueue", json=MAIL, headers=keyed)
    assert first.status_code == again.status_code == 202
    assert first.get_json() == again.get_json()
    assert task_count(pg_url) == 1
    assert make_redis(redis_url).llen(queue.TASK_LIST) == 1  # one envelope: no second mail


def test_the_same_idempotency_key_with_another_body_is_refused(api, alice, pg_url):
    _, headers = alice
    keyed = {**headers, "Idempotency-Key": "order-42"}
    api.post("/api/v1/task/enqueue", json=MAIL, headers=keyed)
    body = assert_problem(
        api.post("/api/v1/task/enqueue", json={**MAIL, "subject": "Other"}, headers=keyed), 422
    )
    assert "Idempotency-Key" in body["errors"]
    assert task_count(pg_url) == 1


def test_idempotency_keys_belong_to_one_user(api, alice, pg_url):
    _, headers = alice
    register_user(api, email="bob@example.com")
    bob = auth_header(login(api, email="bob@example.com"))
    api.post("/api/v1/task/enqueue", json=MAIL, headers={**headers, "Idempotency-Key": "k"})
    api.post("/api/v1/task/enqueue", json=MAIL, headers={**bob, "Idempotency-Key": "k"})
    assert task_count(pg_url) == 2


def test_an_unprintable_idempotency_key_is_refused(api, alice):
    _, headers = alice
    assert_problem(
        api.post("/api/v1/task/enqueue", json=MAIL, headers={**headers, "Idempotency-Key": "k" * 300}), 422
    )


def test_a_task_of_another_user_is_not_found(api, alice):
    _, headers = alice
    task_id = api.post("/api/v1/task/enqueue", json=MAIL, headers=headers).get_json()["task_id"]
    register_user(api, email="eve@example.com")
    eve = auth_header(login(api, email="eve@example.com"))
    assert_problem(api.get(f"/api/v1/task/{task_id}", headers=eve), 404)
    assert api.get("/api/v1/task/queue", headers=eve).get_json()["items"] == []
    assert api.get("/api/v1/task/queue?status=queued", headers=eve).get_json()["items"] == []


def test_the_queue_lists_what_is_still_to_go_out_oldest_first_with_keyset_pages(api, alice, pg_url):
    _, headers = alice
    ids = [
        api.post("/api/v1/task/enqueue", json=MAIL, headers=headers).get_json()["task_id"] for _ in range(7)
    ]
    with engine_for(pg_url).begin() as conn:
        conn.execute(sa.text("UPDATE tasks SET status = 'sent' WHERE id = :id"), {"id": ids[2]})
        conn.execute(sa.text("UPDATE tasks SET status = 'failed' WHERE id = :id"), {"id": ids[3]})
    seen, cursor = [], None
    while True:
        url = "/api/v1/task/queue?limit=2" + (f"&cursor={cursor}" if cursor else "")
        page = api.get(url, headers=headers).get_json()
        assert len(page["items"]) <= 2
        seen += [t["id"] for t in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [i for i in ids if i != ids[2]]
    sent = api.get("/api/v1/task/queue?status=sent", headers=headers).get_json()["items"]
    assert [t["id"] for t in sent] == [ids[2]]


def test_the_fail_list_shows_failed_and_cancelled_with_their_errors(api, alice, pg_url):
    _, headers = alice
    ids = [
        api.post("/api/v1/task/enqueue", json=MAIL, headers=headers).get_json()["task_id"] for _ in range(3)
    ]
    with engine_for(pg_url).begin() as conn:
        conn.execute(
            sa.text(
                "UPDATE tasks SET status = 'failed', try_count = 1, last_error = '451 busy' WHERE id = :id"
            ),
            {"id": ids[0]},
        )
        conn.execute(
            sa.text(
                "UPDATE tasks SET status = 'cancelled', try_count = 1, last_error = '550 no' WHERE id = :id"
            ),
            {"id": ids[2]},
        )
    items = api.get("/api/v1/task/queue/fail", headers=headers).get_json()["items"]
    assert [(t["id"], t["status"], t["last_error"], t["try_count"]) for t in items] == [
        (ids[0], "failed", "451 busy", 1),
        (ids[2], "cancelled", "550 no", 1),
    ]


@pytest.mark.parametrize(
    "query", ["limit=0", "limit=501", "limit=x", "status=lost", "cursor=zzz", "cursor=djE6eA"]
)
def test_bad_list_parameters_are_422(api, alice, query):
    _, headers = alice
    assert_problem(api.get(f"/api/v1/task/queue?{query}", headers=headers), 422)


def test_list_pages_hold_at_most_500(api, alice):
    _, headers = alice
    assert api.get("/api/v1/task/queue?limit=500", headers=headers).status_code == 200


def test_enqueue_answers_503_not_500_when_postgresql_is_down(api, alice, monkeypatch, tmp_path):
    from functions import http

    _, headers = alice
    http.context()  # the token was issued with the working context's secret
    monkeypatch.setenv(
        "DATABASE_URL", f"postgresql+pg8000://postgres@/postgres?unix_sock={tmp_path}/.s.PGSQL.5432"
    )
    http.reset_context()
    body = assert_problem(api.post("/api/v1/task/enqueue", json=MAIL, headers=headers), 503)
    assert body["dependency"] == "postgresql"
    assert api.get("/api/v1/task/queue", headers=headers).status_code == 503


def test_a_cursor_beyond_bigint_is_422(api, alice):
    import base64

    _, headers = alice
    cursor = base64.urlsafe_b64encode(b"v1:99999999999999999999").decode().rstrip("=")
    assert_problem(api.get(f"/api/v1/task/queue?cursor={cursor}", headers=headers), 422)


def test_a_lone_surrogate_in_a_mail_is_a_400(api, alice, pg_url):
    _, headers = alice
    data = '{"recipient_email": "bob@example.org", "subject": "\\udc80", "body": "x"}'
    assert_problem(
        api.post("/api/v1/task/enqueue", data=data, content_type="application/json", headers=headers), 400
    )
    assert task_count(pg_url) == 0


def test_enqueue_with_a_token_of_a_deleted_user_is_401_and_writes_nothing(api, alice, pg_url):
    _, headers = alice
    with engine_for(pg_url).begin() as conn:
        conn.execute(sa.text("DELETE FROM users"))
    assert_problem(api.post("/api/v1/task/enqueue", json=MAIL, headers=headers), 401)
    assert_problem(
        api.post("/api/v1/task/enqueue", json=MAIL, headers={**headers, "Idempotency-Key": "k"}), 401
    )
    assert task_count(pg_url) == 0
