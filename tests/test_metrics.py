"""The workers' metrics: each outcome counted once and only when it landed, bounded labels, and a
/metrics endpoint on METRICS_PORT. Workers are driven step by step (tests/pipeline.py)."""

from __future__ import annotations

import time
import urllib.request

import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from shared import metrics, queue
from shared.domain import CancelReason, Status
from shared.local.embedded import free_port
from shared.workers import Outcome
from tests.pipeline import Pipeline
from tests.smtp_servers import ScriptedSmtpServer


@pytest.fixture()
def pipe(ctx):
    ctx.settings = ctx.settings.replace(
        retry_backoff_base=0.05, retry_backoff_max=0.1, lease_seconds=2, heartbeat_ttl=2
    )
    p = Pipeline(ctx)
    yield p
    p.close()


def value(m: metrics.WorkerMetrics, name: str, **labels) -> float:
    found = m.registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def test_each_outcome_is_counted_once_with_its_class_and_reason(pipe):
    with ScriptedSmtpServer() as smtp:
        smtp.script(
            "250 ok", "451 4.7.1 later", "550 5.1.1 no such user", "451 4.7.1 later", "451 4.7.1 later"
        )
        user = pipe.user(smtp)
        sent = pipe.enqueue(user)
        pipe.pump()  # 250
        retried = pipe.enqueue(user)
        rejected = pipe.enqueue(user)
        pipe.pump()  # 451, then 550
        time.sleep(0.15)
        pipe.sweep()
        pipe.pump()  # the retry: 451 again
        with pipe.ctx.engine.begin() as conn:  # its last try, which fails too
            conn.execute(sa.text("UPDATE tasks SET try_count = 2 WHERE id = :id"), {"id": retried})
        time.sleep(0.15)
        pipe.sweep()
        pipe.pump()
    statuses = pipe.statuses()
    assert statuses == {sent: "sent", retried: "cancelled", rejected: "cancelled"}
    s, c = pipe.sender.metrics, pipe.consumer.metrics
    assert value(s, "mailq_mails_sent_total") == 1
    assert value(s, "mailq_mails_failed_total", **{"class": "transient"}) == 3
    assert value(s, "mailq_mails_failed_total", **{"class": "permanent"}) == 1
    assert value(s, "mailq_mails_cancelled_total", reason="permanent_failure") == 1
    assert value(s, "mailq_mails_cancelled_total", reason="tries_exhausted") == 1
    assert value(s, "mailq_claims_total") == value(s, "mailq_smtp_send_seconds_count") == 5
    assert value(s, "mailq_enqueue_to_sent_seconds_count") == 1
    assert value(c, "mailq_envelopes_total", outcome="handed_off") == 3  # the sweep routes retries itself


def test_a_stale_outcome_is_counted_as_stale_and_not_as_sent(pipe):
    with ScriptedSmtpServer() as smtp:
        task_id = pipe.enqueue(pipe.user(smtp))
        pipe.ctx.redis.delete(queue.TASK_LIST)
        stale = pipe.sender.claim(task_id)
        time.sleep(2.1)
        pipe.sweep()
        pipe.pump()  # sent by the second claim
    assert pipe.sender.record(stale, Status.SENT, None) == Outcome.STALE  # the SMTP 250 came too late
    s = pipe.sender.metrics
    assert value(s, "mailq_stale_outcomes_total") == 1
    assert value(s, "mailq_mails_sent_total") == 1


def test_the_sweep_reports_a_lost_last_try_as_lost_in_flight(pipe):
    with ScriptedSmtpServer() as smtp:
        task_id = pipe.enqueue(pipe.user(smtp))
    with pipe.ctx.engine.begin() as conn:
        conn.execute(sa.text("UPDATE tasks SET try_count = 2 WHERE id = :id"), {"id": task_id})
    pipe.ctx.redis.delete(queue.TASK_LIST)
    assert pipe.sender.claim(task_id).try_count == 3  # its last try; then the sender is lost
    time.sleep(2.1)
    report = pipe.sweep()
    assert (report.cancelled, report.lost_in_flight) == (1, 1)
    m = metrics.WorkerMetrics()
    m.record_sweep(report)
    assert value(m, "mailq_mails_cancelled_total", reason="lost_in_flight") == 1
    assert value(m, "mailq_mails_cancelled_total", reason="tries_exhausted") == 0


def test_the_labels_are_fixed_words_and_every_reason_exists_from_the_start():
    families = {f.name: f for f in text_string_to_metric_families(_exposition(metrics.WorkerMetrics()))}
    cancelled = {
        s.labels["reason"] for s in families["mailq_mails_cancelled"].samples if s.name.endswith("_total")
    }
    assert cancelled == {r.value for r in CancelReason}
    label_names = {name for f in families.values() for s in f.samples for name in s.labels}
    assert label_names == {"class", "reason", "outcome", "le"}


def test_a_worker_serves_its_metrics_on_its_port_and_zero_turns_it_off(pipe):
    assert metrics.serve(pipe.sender.metrics, 0, "127.0.0.1") is None
    pipe.sender.metrics.watch_busy(lambda: 7, 32)
    port = free_port()
    server = metrics.serve(pipe.sender.metrics, port, "127.0.0.1")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
        assert "mailq_worker_busy_threads 7.0" in text and "mailq_worker_threads 32.0" in text
        assert metrics.serve(metrics.WorkerMetrics(), port, "127.0.0.1") is None  # taken: logged, not fatal
    finally:
        server.shutdown()
        server.server_close()


def _exposition(m: metrics.WorkerMetrics) -> str:
    from prometheus_client import generate_latest

    return generate_latest(m.registry).decode()
