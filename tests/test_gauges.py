"""The queue gauges (the `metrics` function, `mailq status`): what they count, what they leave out,
and that PostgreSQL answers them from indexes at a realistic size (EXPLAIN, as tests/test_stats.py)."""

from __future__ import annotations

import json

import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from shared import queue
from shared.domain import AccountReason, PauseReason
from shared.observe import gauges
from tests.smtp_servers import ScriptedSmtpServer
from tests.test_stats import SEED_TASKS, SEED_USERS, _plan_nodes


def execute(pipe, sql: str, **params) -> None:
    with pipe.ctx.engine.begin() as conn:
        conn.execute(sa.text(sql), params)


def read(pipe) -> gauges.Gauges:
    return gauges.read(pipe.ctx.settings, pipe.ctx.engine, pipe.ctx.redis, statistics_ttl=0)


def test_the_gauges_count_pending_tasks_lists_and_live_workers(pipe):
    with ScriptedSmtpServer() as smtp:
        user = pipe.user(smtp)
        queued = [pipe.enqueue(user) for _ in range(3)]
        pipe.enqueue(user, scheduled_at="2999-01-01T00:00:00Z")
        failed = pipe.enqueue(user)
    execute(pipe, "UPDATE tasks SET status = 'failed', next_attempt_at = now() WHERE id = :id", id=failed)
    pipe.consumer.register()
    pipe.sender.register()
    pipe.ctx.redis.hset(queue.WORKERS, "sender:gone:1:deadbeef", queue.TASK_LIST)  # no heartbeat: dead

    before = read(pipe)
    assert before.tasks == {"scheduled": 1, "queued": 3, "processing": 0, "failed": 1}
    assert before.sweep_pending == 1  # the due failed task
    assert before.lists == {"tasks": 4, "send_ready": 0, "send_queues": 0, "processing": 0}
    assert before.workers_alive == {"consumer": 1, "sender": 1}

    assert pipe.consumer.step(0.1)  # three live envelopes go to the tenant's queue
    after = read(pipe)
    assert after.lists == {"tasks": 0, "send_ready": 1, "send_queues": len(queued), "processing": 0}


def test_the_oldest_due_is_the_longest_wait_outside_paused_accounts(pipe):
    with ScriptedSmtpServer() as smtp:
        ada = pipe.user(smtp)
        bob = pipe.user(smtp, email="bob@example.com")
        waiting = pipe.enqueue(ada)
        retried = pipe.enqueue(ada)
        paused = pipe.enqueue(bob)
    assert read(pipe).oldest_due_seconds < 60
    execute(pipe, "UPDATE tasks SET scheduled_at = now() - interval '10 minutes' WHERE id = :id", id=waiting)
    assert 595 < read(pipe).oldest_due_seconds < 660
    # A retry waits since it was pushed again; a paused account's mail waits for its user, not for us.
    execute(
        pipe,
        "UPDATE tasks SET try_count = 1, scheduled_at = now() - interval '2 days',"
        " next_attempt_at = now() - interval '20 minutes' WHERE id = :id",
        id=retried,
    )
    execute(pipe, "UPDATE tasks SET scheduled_at = now() - interval '5 hours' WHERE id = :id", id=paused)
    execute(pipe, "UPDATE users SET smtp_paused_at = now() WHERE id = :id", id=bob.id)
    assert 1195 < read(pipe).oldest_due_seconds < 1260
    execute(pipe, "UPDATE tasks SET status = 'sent' WHERE user_id = :id", id=ada.id)
    assert read(pipe).oldest_due_seconds == 0


def test_terminal_statuses_are_estimated_from_the_statistics(pipe):
    with ScriptedSmtpServer() as smtp:
        user = pipe.user(smtp)
        ids = [pipe.enqueue(user) for _ in range(10)]
    execute(pipe, "UPDATE tasks SET status = 'sent' WHERE id = ANY(:ids)", ids=ids[:7])
    execute(pipe, "UPDATE tasks SET status = 'cancelled' WHERE id = ANY(:ids)", ids=ids[7:9])
    execute(pipe, "ANALYZE tasks")  # a table this small is read whole: the "estimate" is exact
    figures = read(pipe)
    assert figures.estimated == {"sent": 7, "cancelled": 2}
    assert figures.tasks["queued"] == 1


def test_the_exposition_has_fixed_words_for_labels_and_no_tenant_data(pipe):
    with ScriptedSmtpServer() as smtp:
        user = pipe.user(smtp, email="carol@example.com")
        pipe.enqueue(user, recipient_email="dave@example.org")
    pipe.consumer.register()
    assert pipe.consumer.step(0.1)
    with pipe.ctx.engine.begin() as conn:  # the account backing off: counted by reason, never named
        conn.execute(
            sa.text(
                "UPDATE users SET smtp_backoff_since = now(), smtp_backoff_code = 'throttled' WHERE id = :id"
            ),
            {"id": user.id},
        )
    text = gauges.render(read(pipe)).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["mailq_accounts_waiting"].samples[0].labels == {
        "state": "backing_off",
        "reason": "throttled",
    }
    assert set(families) == {
        "mailq_tasks",
        "mailq_tasks_estimated",
        "mailq_tasks_finished",
        "mailq_oldest_due_seconds",
        "mailq_sweep_pending",
        "mailq_list_length",
        "mailq_paused_accounts",
        "mailq_workers_alive",
        "mailq_accounts_waiting",
    }
    allowed = {
        "status": {"scheduled", "queued", "processing", "failed", "sent", "cancelled"},
        "list": set(gauges.LISTS),
        "role": set(gauges.ROLES),
        "state": {"paused", "backing_off"},
        "reason": {r.value for r in (*AccountReason, *PauseReason)},
    }
    for family in families.values():
        for sample in family.samples:
            for name, value in sample.labels.items():
                assert value in allowed[name], (sample.name, name, value)
    assert "example" not in text and "carol" not in text and "dave" not in text


# --- the plans ----------------------------------------------------------------------------------------


def test_the_gauges_are_read_from_indexes(pg_url, clean, settings):
    engine = sa.create_engine(pg_url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            tx = conn.begin()  # rolled back: the rows and ANALYZE's statistics vanish with it
            conn.execute(sa.text(SEED_USERS))
            conn.execute(sa.text(SEED_TASKS))
            # A few first tries in the queue (the seed's are retries), and one paused account.
            conn.execute(sa.text("UPDATE tasks SET try_count = 0 WHERE status = 'queued' AND mod(id, 7) = 0"))
            conn.execute(
                sa.text("UPDATE users SET smtp_paused_at = now() WHERE id = (SELECT min(id) FROM users)")
            )
            conn.execute(sa.text("ANALYZE tasks"))
            conn.execute(sa.text("ANALYZE users"))
            plans = {}
            for seqscan in ("on", "off"):
                conn.execute(sa.text(f"SET LOCAL enable_seqscan = {seqscan}"))
                plans[seqscan] = conn.execute(
                    sa.text("EXPLAIN (FORMAT JSON) " + gauges._tasks_sql(settings).text),
                    {"scan": gauges.OLDEST_SCAN, "finished_scan": gauges.FINISHED_CAP + 1},
                ).scalar_one()
            statistics = conn.execute(
                sa.text("EXPLAIN (FORMAT JSON) " + gauges._STATISTICS_SQL.text)
            ).scalar_one()
            tx.rollback()
    finally:
        engine.dispose()
    for seqscan, plan in plans.items():
        nodes = list(_plan_nodes(plan))
        seq = [n for n in nodes if n["Node Type"] == "Seq Scan" and n.get("Relation Name") == "tasks"]
        assert not seq, f"sequential scan on tasks (enable_seqscan={seqscan}): {json.dumps(plan)}"
        used = {n.get("Index Name") for n in nodes}
        # The counts from the pending rows' index, the oldest from the ordered ones.
        assert {"tasks_queued_first_try", "tasks_sweep_queued"} <= used, used
        on_tasks = [n for n in nodes if n.get("Relation Name") == "tasks"]
        assert all(n.get("Index Name") or n["Node Type"] == "Bitmap Heap Scan" for n in on_tasks), on_tasks
        assert "tasks_pending_status" in used, used  # the counts, never the table's history
        assert "tasks_retention" in used, used  # the finished ones, at most FINISHED_CAP + 1 entries
    assert "tasks" not in {n.get("Relation Name") for n in _plan_nodes(statistics)}


def test_finished_tasks_are_counted_exactly_up_to_the_cap_and_then_only_estimated(pipe, monkeypatch):
    with ScriptedSmtpServer() as smtp:
        user = pipe.user(smtp)
        ids = [pipe.enqueue(user) for _ in range(6)]
    execute(pipe, "UPDATE tasks SET status = 'sent' WHERE id = ANY(:ids)", ids=ids[:4])
    execute(pipe, "UPDATE tasks SET status = 'cancelled' WHERE id = :id", id=ids[4])
    assert read(pipe).finished == {"sent": 4, "cancelled": 1}  # no ANALYZE needed
    monkeypatch.setattr(gauges, "FINISHED_CAP", 4)
    assert read(pipe).finished == {}  # five: more than the cap, so no exact count is claimed
