"""POST /api/v1/task/enqueue/batch: many mails in one request, stored all or nothing, with real
PostgreSQL, Redis and an aiosmtpd server."""

from __future__ import annotations

import base64

import pytest
import sqlalchemy as sa

from shared import queue
from shared.db import engine_for
from shared.tasks import batch
from tests.conftest import auth_header, login, register_user
from tests.pipeline import Pipeline
from tests.smtp_servers import ScriptedSmtpServer
from tests.test_accounts_api import assert_problem

BATCH = "/api/v1/task/enqueue/batch"
MAIL = {"recipient_email": "bob@example.org", "subject": "Hi", "body": "Hello Bob"}


def mails(n: int, **fields) -> list[dict]:
    return [{**MAIL, "subject": f"mail {i}", **fields} for i in range(n)]


def counts(pg_url, redis_client) -> tuple[int, int, int, int]:
    with engine_for(pg_url).connect() as conn:
        rows = [
            conn.execute(sa.text(f"SELECT count(*) FROM {t}")).scalar_one()  # noqa: S608
            for t in ("tasks", "task_contents", "task_tags")
        ]
    return (*rows, redis_client.llen(queue.TASK_LIST))


@pytest.fixture()
def alice(api):
    user = register_user(api)
    return user, auth_header(login(api))


def test_a_batch_is_stored_in_input_order_and_woken_with_one_push(api, alice, ctx, pg_url):
    _, headers = alice
    lpush_before = _lpush_calls(ctx.redis)
    body = {
        "tasks": [*mails(2), {**MAIL, "html": "<p>x</p>", "tags": {"k": "v"}, "scheduled_at": "2999-01-01"}]
    }
    response = api.post(BATCH, json=body, headers=headers)
    assert response.status_code == 202, response.get_json()
    items = response.get_json()["items"]
    assert [i["status"] for i in items] == ["queued", "queued", "scheduled"]
    ids = [i["task_id"] for i in items]
    assert ids == sorted(ids)
    subjects = [api.get(f"/api/v1/task/{i}", headers=headers).get_json()["subject"] for i in ids]
    assert subjects == ["mail 0", "mail 1", "Hi"]
    assert counts(pg_url, ctx.redis) == (3, 1, 1, 2)  # the scheduled one waits for the sweep
    assert _lpush_calls(ctx.redis) - lpush_before == 1


def _lpush_calls(client) -> int:
    return int(client.info("commandstats").get("cmdstat_lpush", {}).get("calls", 0))


def test_one_statement_writes_the_whole_batch(ctx, alice):
    user, _ = alice
    statements = []

    def record(conn, cursor, statement, *args):
        statements.append(statement)

    sa.event.listen(ctx.engine, "before_cursor_execute", record)
    try:
        body = {
            "tasks": mails(
                50, html="<p>x</p>", tags={"k": "v"}, attachments=[{"filename": "a", "content": ""}]
            )
        }
        result, created = batch.enqueue_batch(ctx, user["id"], body, None, "strict")
    finally:
        sa.event.remove(ctx.engine, "before_cursor_execute", record)
    assert created and len(result["items"]) == 50
    writes = [s for s in statements if s.lstrip().upper().startswith(("INSERT", "WITH", "UPDATE"))]
    assert (
        len(writes) == 1 and "INSERT INTO task_contents" in writes[0] and "INSERT INTO task_tags" in writes[0]
    )


def test_strict_validation_stores_nothing_and_names_each_item_and_field(api, alice, ctx, pg_url):
    _, headers = alice
    body = {"tasks": [MAIL, {**MAIL, "recipient_email": "nobody"}, "not a mail", {**MAIL, "cc": ["x"]}]}
    problem = assert_problem(api.post(BATCH, json=body, headers=headers), 422)
    assert problem["errors"] == {
        "tasks[1].recipient_email": problem["errors"]["tasks[1].recipient_email"],
        "tasks[2]": "must be an object (an enqueue body)",
        "tasks[3].cc[0]": problem["errors"]["tasks[3].cc[0]"],
    }
    assert counts(pg_url, ctx.redis) == (0, 0, 0, 0)


def test_permissive_validation_stores_the_valid_mails_and_answers_every_item_in_order(
    api, alice, ctx, pg_url
):
    _, headers = alice
    body = {"tasks": [MAIL, {**MAIL, "subject": "a\nb"}, {**MAIL, "tags": {"k": "v"}}]}
    response = api.post(BATCH + "?validation=permissive", json=body, headers=headers)
    assert response.status_code == 202
    first, bad, third = response.get_json()["items"]
    assert first["status"] == third["status"] == "queued" and third["task_id"] > first["task_id"]
    assert list(bad) == ["errors"] and "subject" in bad["errors"]
    assert counts(pg_url, ctx.redis) == (2, 0, 1, 2)


def test_an_attachment_over_the_limit_is_that_items_error_in_a_batch(api, alice, monkeypatch):
    from functions import http

    monkeypatch.setenv("MAX_ATTACHMENT_BYTES", "10")
    http.reset_context()
    _, headers = alice
    big = {**MAIL, "attachments": [{"filename": "a.bin", "content": base64.b64encode(b"x" * 11).decode()}]}
    problem = assert_problem(api.post(BATCH, json={"tasks": [MAIL, big]}, headers=headers), 422)
    assert list(problem["errors"]) == ["tasks[1].attachments"]


def test_one_idempotency_key_covers_the_whole_batch(api, alice, ctx, pg_url):
    _, headers = alice
    keyed = {**headers, "Idempotency-Key": "newsletter-7"}
    body = {"tasks": [MAIL, {**MAIL, "subject": "a\nb"}, {**MAIL, "tags": {"k": "v"}}]}
    url = BATCH + "?validation=permissive"
    first = api.post(url, json=body, headers=keyed)
    before = counts(pg_url, ctx.redis)
    again = api.post(url, json=body, headers=keyed)
    assert first.status_code == again.status_code == 202
    assert again.get_json() == first.get_json() and counts(pg_url, ctx.redis) == before
    changed = {"tasks": [MAIL, {**MAIL, "subject": "fixed"}, {**MAIL, "tags": {"k": "v"}}]}
    assert "Idempotency-Key" in assert_problem(api.post(url, json=changed, headers=keyed), 422)["errors"]
    assert counts(pg_url, ctx.redis) == before
    # The validation mode is part of the request.
    valid = {**headers, "Idempotency-Key": "newsletter-8"}
    assert api.post(url, json={"tasks": [MAIL]}, headers=valid).status_code == 202
    assert (
        "Idempotency-Key"
        in assert_problem(api.post(BATCH, json={"tasks": [MAIL]}, headers=valid), 422)["errors"]
    )
    # Batch and single enqueue keep their keys apart.
    single = api.post("/api/v1/task/enqueue", json=MAIL, headers=keyed)
    assert single.status_code == 202 and single.get_json()["task_id"] not in {
        i.get("task_id") for i in first.get_json()["items"]
    }


def test_a_batch_is_all_or_nothing_in_postgresql(ctx, alice, pg_url):
    """The statement fails on the third mail (a constraint added for the test): no row of any mail stays."""
    user, _ = alice
    with engine_for(pg_url).begin() as conn:
        conn.execute(
            sa.text("ALTER TABLE tasks ADD CONSTRAINT test_no_boom CHECK (subject <> 'boom') NOT VALID")
        )
    try:
        body = {"tasks": [*mails(2, tags={"k": "v"}, html="<p>x</p>"), {**MAIL, "subject": "boom"}]}
        with pytest.raises(sa.exc.DBAPIError, match="test_no_boom"):
            batch.enqueue_batch(ctx, user["id"], body, "key-1", "strict")
    finally:
        with engine_for(pg_url).begin() as conn:
            conn.execute(sa.text("ALTER TABLE tasks DROP CONSTRAINT test_no_boom"))
    assert counts(pg_url, ctx.redis) == (0, 0, 0, 0)
    with engine_for(pg_url).connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM task_batches")).scalar_one() == 0  # key free again


@pytest.mark.parametrize(
    ("body", "query", "key"),
    [
        ({}, "", "tasks"),
        ({"tasks": []}, "", "tasks"),
        ({"tasks": {"0": MAIL}}, "", "tasks"),
        ({"tasks": [MAIL]}, "?validation=lenient", "validation"),
    ],
)
def test_a_malformed_batch_is_a_422(api, alice, body, query, key):
    _, headers = alice
    assert key in assert_problem(api.post(BATCH + query, json=body, headers=headers), 422)["errors"]


def test_more_than_max_batch_mails_are_a_422(api, alice, monkeypatch):
    from functions import http

    monkeypatch.setenv("MAX_BATCH", "3")
    http.reset_context()
    _, headers = alice
    assert api.post(BATCH, json={"tasks": mails(3)}, headers=headers).status_code == 202
    problem = assert_problem(api.post(BATCH, json={"tasks": mails(4)}, headers=headers), 422)
    assert "at most 3" in problem["errors"]["tasks"]


def test_a_batch_over_max_batch_bytes_is_a_413_before_parsing(api, alice, ctx, pg_url, monkeypatch):
    from functions import http

    monkeypatch.setenv("MAX_BATCH_BYTES", "4096")
    http.reset_context()
    _, headers = alice
    assert_problem(
        api.post(BATCH, data=b"{" + b" " * 5000 + b"}", content_type="application/json", headers=headers), 413
    )
    assert counts(pg_url, ctx.redis) == (0, 0, 0, 0)


def test_a_batch_needs_a_token(api, pg_url, ctx):
    assert_problem(api.post(BATCH, json={"tasks": [MAIL]}), 401)


def test_a_batch_with_a_deleted_users_token_is_401_and_writes_nothing(api, alice, ctx, pg_url):
    _, headers = alice
    with engine_for(pg_url).begin() as conn:
        conn.execute(sa.text("DELETE FROM users"))
    assert_problem(api.post(BATCH, json={"tasks": [MAIL]}, headers=headers), 401)
    assert_problem(api.post(BATCH, json={"tasks": [MAIL]}, headers={**headers, "Idempotency-Key": "k"}), 401)
    assert counts(pg_url, ctx.redis) == (0, 0, 0, 0)


def test_a_batchs_mails_arrive_each_with_its_own_content(api, ctx):
    pipe = Pipeline(ctx)
    try:
        with ScriptedSmtpServer() as server:
            credentials = {"smtp-username": "", "smtp-password": ""}
            register_user(api, smtp_host=server.host, smtp_port=server.port, **credentials)
            headers = auth_header(login(api))
            body = {
                "tasks": [
                    {
                        **MAIL,
                        "recipient_email": f"r{i}@example.org",
                        "html": f"<p>{i}</p>",
                        "bcc": ["b@example.org"],
                    }
                    for i in range(3)
                ]
            }
            assert api.post(BATCH, json=body, headers=headers).status_code == 202
            pipe.pump()
            received = sorted(server.received, key=lambda r: r.rcpt_tos[0])
    finally:
        pipe.close()
    assert [r.rcpt_tos for r in received] == [[f"r{i}@example.org", "b@example.org"] for i in range(3)]
    assert [r.message.get_body(("html",)).get_content().strip() for r in received] == [
        "<p>0</p>",
        "<p>1</p>",
        "<p>2</p>",
    ]
