"""Retention (issue 13): finished tasks older than TASK_RETENTION_DAYS are deleted by the sweep, in
bounded batches from an index; nothing else is touched; their Idempotency-Keys expire with them."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa

from shared.maintenance import retention
from shared.maintenance.sweep import pending_work
from tests.pipeline import Pipeline
from tests.smtp_servers import ScriptedSmtpServer


@pytest.fixture()
def pipe(ctx):
    ctx.settings = ctx.settings.replace(task_retention_days=30, sweep_batch=7, sweep_leak_window=3600)
    p = Pipeline(ctx)
    yield p
    p.close()


def age(pipe, task_id: int, days: int, status: str | None = None) -> None:
    with pipe.ctx.engine.begin() as conn:
        conn.execute(
            sa.text(
                "UPDATE tasks SET updated_at = now() - make_interval(days => :days),"
                " status = COALESCE(:status, status) WHERE id = :id"
            ),
            {"days": days, "status": status, "id": task_id},
        )


def test_only_finished_tasks_past_the_retention_period_are_deleted(pipe):
    with ScriptedSmtpServer() as server:
        user = pipe.user(server)
        old_sent, old_cancelled, young_sent, old_failed, old_scheduled = (
            pipe.enqueue(user) for _ in range(5)
        )
        age(pipe, old_sent, 31, "sent")
        age(pipe, old_cancelled, 45, "cancelled")
        age(pipe, young_sent, 29, "sent")
        age(pipe, old_failed, 90, "failed")  # still to go out: never deleted, whatever its age
        age(pipe, old_scheduled, 90, "scheduled")
        with pipe.ctx.engine.begin() as conn:  # not due yet: the sweep's requeue leaves them as they are
            conn.execute(
                sa.text("UPDATE tasks SET next_attempt_at = now() + interval '1 day' WHERE id = ANY(:ids)"),
                {"ids": [old_failed, old_scheduled]},
            )
        assert pending_work(pipe.ctx.settings, pipe.ctx.engine) >= 1  # the sweep's trigger sees it
        report = pipe.sweep()
    assert report.purged == 2
    assert set(pipe.statuses()) == {young_sent, old_failed, old_scheduled}


def test_zero_days_keeps_everything(pipe):
    with ScriptedSmtpServer() as server:
        user = pipe.user(server)
        task_id = pipe.enqueue(user)
        age(pipe, task_id, 3650, "sent")
    settings = pipe.ctx.settings.replace(task_retention_days=0)
    assert retention.purge_once(settings, pipe.ctx.engine) == 0
    assert set(pipe.statuses()) == {task_id}


def test_a_pass_deletes_a_bounded_number_of_batches_and_the_next_goes_on(pipe):
    with ScriptedSmtpServer() as server:
        user = pipe.user(server)
    with pipe.ctx.engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO tasks (user_id, recipient_email, subject, body, status, scheduled_at,"
                " next_attempt_at, message_id, updated_at)"
                " SELECT :u, 'r@example.org', 's', 'b', 'sent', now(), now(), 'm' || g,"
                " now() - interval '60 days'"
                " FROM generate_series(1, 100) AS g"
            ),
            {"u": user.id},
        )
    first = retention.purge_once(pipe.ctx.settings, pipe.ctx.engine)
    assert first == retention.MAX_BATCHES_PER_PASS * pipe.ctx.settings.sweep_batch == 70
    assert retention.purge_once(pipe.ctx.settings, pipe.ctx.engine) == 30
    assert pipe.statuses() == {}


def test_an_idempotency_key_expires_with_its_task(pipe):
    with ScriptedSmtpServer() as server:
        user = pipe.user(server)
        first = pipe.enqueue(user, key="monthly-report")
        assert pipe.enqueue(user, key="monthly-report") == first  # the same answer while it lives
        age(pipe, first, 31, "sent")
        pipe.sweep()
        second = pipe.enqueue(user, key="monthly-report")
    assert second != first and set(pipe.statuses()) == {second}


def test_the_purge_is_served_by_the_retention_index(pg_url, clean):
    engine = sa.create_engine(pg_url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            tx = conn.begin()  # rolled back with its rows and statistics
            user_id = conn.execute(
                sa.text(
                    "INSERT INTO users (email, password_hash, smtp_host, smtp_port, smtp_username,"
                    " smtp_password_enc, smtp_security)"
                    " VALUES ('r@example.com', 'x', 'h', 25, '', 'x', 'none')"
                    " RETURNING id"
                )
            ).scalar_one()
            conn.execute(
                sa.text(
                    "INSERT INTO tasks (user_id, recipient_email, subject, body, status, scheduled_at,"
                    " next_attempt_at, message_id, updated_at)"
                    " SELECT :u, 'r@example.org', 's', 'b',"
                    " CASE WHEN mod(g, 20) = 0 THEN 'queued' ELSE 'sent' END, now(), now(), 'm' || g,"
                    " now() - mod(g, 40) * interval '1 day' FROM generate_series(1, 50000) AS g"
                ),
                {"u": user_id},
            )
            conn.execute(sa.text("ANALYZE tasks"))
            select = str(retention._PURGE_SQL.text).split("ARRAY(", 1)[1].rsplit("))", 1)[0]
            plan = conn.execute(
                sa.text("EXPLAIN (FORMAT JSON) " + select.replace("FOR UPDATE SKIP LOCKED", "")),
                {"days": 30, "batch": 1000},
            ).scalar_one()
            tx.rollback()
    finally:
        engine.dispose()
    text = json.dumps(plan)
    assert "tasks_retention" in text and "Seq Scan" not in text, text


def test_a_batch_idempotency_key_expires_after_the_retention_period(pipe):
    from shared.tasks import batch

    with ScriptedSmtpServer() as server:
        user = pipe.user(server)
    body = {"tasks": [{"recipient_email": "b@example.org", "subject": "s", "body": "b"}]}
    first = batch.enqueue_batch(pipe.ctx, user.id, body, "nightly", "strict")
    with pipe.ctx.engine.begin() as conn:
        conn.execute(sa.text("UPDATE task_batches SET created_at = now() - interval '31 days'"))
    retention.purge_once(pipe.ctx.settings, pipe.ctx.engine)
    with pipe.ctx.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM task_batches")).scalar_one() == 0
    again = batch.enqueue_batch(pipe.ctx, user.id, body, "nightly", "strict")
    assert again[0]["items"][0]["task_id"] != first[0]["items"][0]["task_id"]
