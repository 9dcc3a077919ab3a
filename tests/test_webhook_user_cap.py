"""Webhook concurrency is capped per user as well as per endpoint (issue 21 item 9): a tenant with many
silent endpoints holds at most WEBHOOK_MAX_CONCURRENCY_PER_USER of the worker's threads, so another
tenant's deliveries go on. Real PostgreSQL, Redis, SMTP and HTTP receivers; the worker's own threads.
"""

from __future__ import annotations

import threading

import pytest

from shared import queue
from shared.webhooks.worker import WebhookWorker
from tests.pipeline import Pipeline
from tests.smtp_servers import ScriptedSmtpServer
from tests.test_webhooks import deliveries, subscribe
from tests.webhook_receiver import SILENT, WebhookReceiver


@pytest.fixture()
def pipe(ctx):
    ctx.settings = ctx.settings.replace(retry_backoff_base=0.0, retry_backoff_max=0.0)
    p = Pipeline(ctx)
    yield p
    p.close()


def test_many_silent_endpoints_of_one_user_hold_at_most_the_per_user_cap_of_threads(pipe, tmp_path):
    settings = pipe.ctx.settings.replace(
        webhook_timeout=4.0,
        webhook_worker_count=6,
        webhook_max_concurrency_per_endpoint=2,
        webhook_max_concurrency_per_user=2,
        webhook_retry_schedule=(60,),
        heartbeat_file=str(tmp_path / "beat"),
    )
    worker = WebhookWorker(settings, pipe.ctx.engine, pipe.ctx.redis, pipe.ctx.box)
    with (
        ScriptedSmtpServer() as smtp,
        WebhookReceiver(default=SILENT) as dead,
        WebhookReceiver() as alive,
    ):
        hostile, quiet = pipe.user(smtp, email="mallory@example.com"), pipe.user(smtp)
        silent = [subscribe(pipe, hostile, dead, url=f"{dead.url}?n={n}")["id"] for n in range(4)]
        subscribe(pipe, quiet, alive)
        for i in range(8):
            pipe.enqueue(hostile, subject=f"h{i}")
        pipe.pump()  # 32 deliveries to four silent endpoints of one user, queued first
        running = threading.Thread(target=worker.run)
        running.start()
        try:
            dead.wait_for(2)
            for i in range(3):
                pipe.enqueue(quiet, subject=f"q{i}")
            pipe.pump()
            alive.wait_for(3, timeout=3.5)  # within one hostile timeout: no quiet delivery waited for one
        finally:
            worker.stopping.set()
            running.join(30)
        started = sum(1 for r in deliveries(pipe) if r.endpoint_id in silent and r.attempts > 0)
        assert dead.max_in_flight <= 2, f"one user's endpoints had {dead.max_in_flight} requests at once"
        assert started <= 4, f"{started} hostile attempts started in one timeout"
    # Every slot was let go: none of the user's is left held.
    assert pipe.ctx.redis.zcard(f"{queue.WEBHOOK_USER_SLOTS_PREFIX}{hostile.id}") == 0
    assert pipe.ctx.redis.hget(queue.WEBHOOK_OWNERS, silent[0]) == str(hostile.id).encode()
