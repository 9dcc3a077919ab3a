"""Real processes: a `mailq webhooks` worker SIGKILLed mid-delivery, and a `mailq sender` SIGKILLed after
the SMTP server's 250 but before the outcome was recorded. Every delivery is verified with the Standard
Webhooks reference library."""

from __future__ import annotations

import signal
import time

import pytest
import sqlalchemy as sa

from shared.webhooks import endpoints
from shared.webhooks.worker import WebhookWorker
from tests.pipeline import Pipeline
from tests.smtp_servers import ScriptedSmtpServer
from tests.test_worker_processes import start, wait_for
from tests.webhook_receiver import WebhookReceiver

HOOK_ENV = {
    "WEBHOOK_TIMEOUT": "1",
    "WEBHOOK_WORKER_COUNT": "4",
    "WEBHOOK_MAX_CONCURRENCY_PER_ENDPOINT": "2",
    "WEBHOOK_RETRY_SCHEDULE": "0,0,0",
}


@pytest.fixture()
def pipe(ctx):
    ctx.settings = ctx.settings.replace(
        lease_seconds=2,
        heartbeat_ttl=2,
        sweep_leak_window=1,
        webhook_timeout=1.0,
        webhook_retry_schedule=(0, 0, 0),
    )
    p = Pipeline(ctx)
    p.hooks = WebhookWorker(ctx.settings, ctx.engine, ctx.redis, ctx.box)
    yield p
    p.hooks.close()
    p.close()


def states(pipe) -> dict[str, int]:
    with pipe.ctx.engine.connect() as conn:
        return dict(
            conn.execute(sa.text("SELECT state, count(*) FROM webhook_deliveries GROUP BY state")).all()
        )


def event_ids(pipe) -> set[str]:
    with pipe.ctx.engine.connect() as conn:
        return {f"msg_{i}" for i in conn.execute(sa.text("SELECT id FROM webhook_events")).scalars()}


def test_a_sigkilled_webhook_worker_loses_no_event(pipe, base_env, tmp_path):
    with ScriptedSmtpServer() as smtp, WebhookReceiver(delay=0.2) as receiver:
        user = pipe.user(smtp)
        secret = endpoints.create(pipe.ctx, user.id, {"url": receiver.url})["secret"]
        for i in range(30):
            pipe.enqueue(user, subject=f"m{i}")
        pipe.pump()  # 30 mails sent: 30 task.sent deliveries waiting
        worker = start("webhooks", base_env, tmp_path, **HOOK_ENV)
        try:
            wait_for(lambda: len(receiver.requests) >= 6, what="the worker to get going")
            worker.send_signal(signal.SIGKILL)
            worker.wait(10)
        finally:
            if worker.poll() is None:
                worker.kill()
        assert states(pipe).get("delivered", 0) < 30, "it finished before the kill; the test proves nothing"
        time.sleep(2.2)  # past the heartbeat TTL: the worker is dead
        with pipe.ctx.engine.begin() as conn:  # and past the leases of the requests it had in flight
            conn.execute(sa.text("UPDATE webhook_deliveries SET lease_until = now() WHERE state = 'sending'"))
        report = pipe.sweep()
        assert report.dead_workers == 1
        # Its per-endpoint slots free themselves when their lease would have ended, as a dead sender's do.
        wait_for(lambda: pipe.hooks.step() == [] and states(pipe) == {"delivered": 30}, 30, "every delivery")
        received = {r.headers["webhook-id"] for r in receiver.requests}
        assert received == event_ids(pipe) and len(received) == 30
        for request in receiver.requests:
            assert request.verified(secret)["type"] == "task.sent"


def test_a_sender_killed_after_the_250_before_recording_leaves_one_task_sent_from_the_real_outcome(
    pipe, base_env, tmp_path
):
    with ScriptedSmtpServer() as smtp, WebhookReceiver() as receiver:
        user = pipe.user(smtp)
        secret = endpoints.create(pipe.ctx, user.id, {"url": receiver.url})["secret"]
        task_id = pipe.enqueue(user)
        pipe.consumer.step(0.1)
        smtp.gate.clear()  # DATA is not answered until the test says so
        sender = start("sender", base_env, tmp_path)
        lock = pipe.ctx.engine.connect()
        try:
            wait_for(lambda: smtp.in_data == 1, what="the sender to reach DATA")
            tx = lock.begin()
            lock.execute(sa.text("SELECT 1 FROM tasks WHERE id = :id FOR UPDATE"), {"id": task_id})
            smtp.gate.set()  # 250: the sender goes on to record, and waits for the row lock
            wait_for(lambda: len(smtp.received) == 1 and waiting_on_a_lock(pipe), what="the record to wait")
            sender.send_signal(signal.SIGKILL)
            sender.wait(10)
            tx.rollback()
        finally:
            lock.close()
            if sender.poll() is None:
                sender.kill()
        time.sleep(2.2)  # the lease runs out
        assert pipe.task(task_id).status == "processing"  # the killed sender's outcome never committed
        pipe.sweep()
        pipe.pump()  # sent again (the duplicate nobody can rule out) and recorded: the real outcome
        row = pipe.task(task_id)
        assert row.status == "sent" and row.try_count == 2 and len(smtp.received) == 2
        while pipe.hooks.step():
            pass
        (request,) = receiver.requests
        event = request.verified(secret)
        assert event["type"] == "task.sent" and event["data"]["try_count"] == 2
        assert len(event_ids(pipe)) == 1


def waiting_on_a_lock(pipe) -> bool:
    with pipe.ctx.engine.connect() as conn:
        return bool(
            conn.execute(
                sa.text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'")
            ).scalar_one()
        )
