"""The per-mail statements of shared.prepared, seen at the driver against a real PostgreSQL: each is
one exchange of a statement prepared once, in no transaction of ours, and the pool's pre-ping does
not open one in front of it."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from shared.accounts import users
from shared.db import engine_for
from shared.tasks import enqueue

MAIL = {"recipient_email": "bob@example.org", "subject": "Hi", "body": "Hello Bob"}


@pytest.fixture()
def user(ctx):
    account = {
        "email": "ada@example.com",
        "password": "correct horse",
        "smtp_host": "127.0.0.1",
        "smtp_port": 2525,
        "smtp-username": "ada",
        "smtp-password": "smtp secret",
        "smtp_security": "none",
    }
    users.register(ctx, account, "test")
    return users.authenticate(ctx, "Bearer " + users.login(ctx, account, "test")["token"])


@pytest.fixture()
def exchanges(ctx, monkeypatch):
    """What the engine's driver connections are asked to run, in order: (method, SQL text)."""
    with ctx.engine.connect() as conn:
        driver_class = type(conn.connection.driver_connection)
    calls: list[tuple[str, str]] = []
    for method in ("execute_simple", "execute_unnamed", "execute_named"):
        original = getattr(driver_class, method)

        def spy(self, *args, _original=original, _method=method, **kwargs):
            statement = args[-1] if _method == "execute_named" else args[0]
            calls.append((_method, " ".join(str(statement).split())))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(driver_class, method, spy)
    return calls


def test_the_pools_pre_ping_leaves_no_transaction_open(settings, clean):
    engine = engine_for(settings.database_url)  # pre_ping=True, as the HTTP functions use it
    with engine.connect() as conn:
        conn.exec_driver_sql("SELECT 1")
    with engine.connect() as conn:  # a pooled connection: checked with a ping first
        assert not conn.connection.driver_connection._in_transaction  # noqa: SLF001


def test_a_plain_enqueue_is_one_prepared_statement_in_a_transaction_of_its_own(ctx, user, exchanges):
    enqueue.enqueue(ctx, user.id, MAIL, None)  # the first prepares the statement on its connection
    exchanges.clear()
    result, created = enqueue.enqueue(ctx, user.id, MAIL, None)
    assert created
    sent = [(method, sql) for method, sql in exchanges if sql]  # the pre-ping is an empty query
    assert [method for method, _ in sent] == ["execute_named"], sent
    assert sent[0][1].startswith("INSERT INTO tasks")
    # Its own transaction, committed by PostgreSQL: another connection sees the row at once.
    with engine_for(ctx.settings.database_url, pool_size=1).connect() as other:
        status = other.execute(sa.text("SELECT status FROM tasks WHERE id = :id"), {"id": result["task_id"]})
        assert status.scalar_one() == "queued"


def test_a_replayed_idempotency_key_still_answers_with_the_first_task(ctx, user):
    first, created = enqueue.enqueue(ctx, user.id, MAIL, "key-1")
    again, created_again = enqueue.enqueue(ctx, user.id, MAIL, "key-1")
    assert created and not created_again and again == first


def _plans(conn, statement, params) -> list[str]:
    lines = conn.execute(sa.text("EXPLAIN " + statement.text), params).scalars().all()
    return [line.strip() for line in lines if " on tasks" in line]


def test_the_per_task_statements_go_by_primary_key_even_when_statistics_say_nothing_is_queued(ctx, user):
    """After an ANALYZE taken while every task was sent, the planner believed the partial index of queued
    tasks empty and scanned it, filtered by id, for every claim: each claim read every queued row."""
    from shared.delivery.attempt import _CLAIM_SQL
    from shared.delivery.consumer import _QUEUED_SQL
    from shared.delivery.record import _OUTCOME_SQL, _QUIET_OUTCOME_SQL, _REFUND_SQL, Seen
    from shared.delivery.unclaimable import _EXHAUSTED_SQL

    with ctx.engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE tasks SET (autovacuum_enabled = false)"))  # no ANALYZE in between
    try:
        with ctx.engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO tasks (user_id, recipient_email, subject, body, status, scheduled_at,"
                    " next_attempt_at, message_id, sent_at)"
                    " SELECT :u, 'bob@example.org', 'hi', 'body', 'sent', now(), now(),"
                    " '<mailq.' || i || '@example.com>', now() FROM generate_series(1, 5000) AS i"
                ),
                {"u": user.id},
            )
            conn.execute(sa.text("ANALYZE tasks"))
            conn.execute(sa.text("UPDATE tasks SET status = 'queued', sent_at = NULL"))  # a burst
            task_id = conn.execute(sa.text("SELECT max(id) FROM tasks")).scalar_one()
            one = {"id": task_id, "try_count": 1}
            logged = {**one, **Seen().params(None, None, "sent")}  # the outcome's line in the attempt log
            plans = {
                "claim": _plans(conn, _CLAIM_SQL, {"id": task_id, "lease": 300, "max_tries": 3, "inline": 1}),
                "consumer": _plans(conn, _QUEUED_SQL, {"ids": [task_id, task_id - 1]}),
                "outcome": _plans(
                    conn, _QUIET_OUTCOME_SQL, {**logged, "status": "sent", "last_error": None, "delay": 0}
                ),
                "outcome with events": _plans(
                    conn, _OUTCOME_SQL, {**logged, "status": "sent", "last_error": None, "delay": 0}
                ),
                "refund": _plans(conn, _REFUND_SQL, {**one, "reason": None}),
                "exhausted": _plans(conn, _EXHAUSTED_SQL, {**one, "reason": "x"}),
            }
    finally:
        with ctx.engine.begin() as conn:
            conn.execute(sa.text("ALTER TABLE tasks RESET (autovacuum_enabled)"))
    scans = {name: [line for line in lines if "Scan" in line] for name, lines in plans.items()}
    assert all(lines and all("tasks_pkey" in line for line in lines) for lines in scans.values()), scans
