"""The data path against real PostgreSQL, Redis and aiosmtpd: delivered once, retried, cancelled,
recovered. Workers are driven one step at a time; the process tests are in test_worker_processes."""

from __future__ import annotations

import ssl
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from shared import queue
from shared.accounts import users
from shared.context import make_redis
from shared.fairqueue import Taken
from shared.workers import Outcome, backoff_seconds
from tests.pipeline import Pipeline
from tests.smtp_servers import ScriptedSmtpServer, make_ca, make_self_signed_context


@pytest.fixture()
def fast_ctx(ctx):
    """Short backoff, leak window and lease, so retries and recovery happen within a test."""
    ctx.settings = ctx.settings.replace(
        retry_backoff_base=0.2, retry_backoff_max=1.0, sweep_leak_window=1, lease_seconds=2, heartbeat_ttl=2
    )
    return ctx


@pytest.fixture()
def pipe(fast_ctx):
    p = Pipeline(fast_ctx)
    yield p
    p.close()


def test_a_mail_arrives_with_the_right_headers_and_the_task_ends_sent(pipe, smtp):
    user = pipe.user(smtp)
    task_id = pipe.enqueue(user, subject="Quarterly report", body="Numbers attached.\n")
    assert pipe.pump() == [Outcome.HANDED_OFF, Outcome.SENT]
    row = pipe.task(task_id)
    assert row.status == "sent" and row.try_count == 1 and row.sent_at is not None
    [received] = smtp.received
    m = received.message
    assert m["From"] == "ada@example.com" and m["To"] == "bob@example.org"
    assert m["Subject"] == "Quarterly report"
    assert m["Message-ID"] == row.message_id
    assert abs(m["Date"].datetime - datetime.now(UTC)) < timedelta(minutes=1)
    assert m.get_content().replace("\r\n", "\n") == "Numbers attached.\n"  # CRLF on the wire
    assert received.mail_from == "ada@example.com" and received.rcpt_tos == ["bob@example.org"]


def test_redis_carries_only_the_envelope(pipe, smtp):
    user = pipe.user(smtp)
    task_id = pipe.enqueue(user, body="secret body text")
    [raw] = pipe.ctx.redis.lrange(queue.TASK_LIST, 0, -1)
    assert raw == b'{"v":1,"task_id":%d}' % task_id


def test_a_future_scheduled_at_is_not_sent_before_its_time_and_is_sent_after(pipe, smtp):
    user = pipe.user(smtp)
    at = datetime.now(UTC) + timedelta(seconds=3)
    task_id = pipe.enqueue(user, scheduled_at=at.replace(tzinfo=None).isoformat())  # no offset: UTC
    assert pipe.task(task_id).status == "scheduled"
    assert pipe.ctx.redis.llen(queue.TASK_LIST) == 0
    pipe.sweep()
    pipe.pump()
    assert smtp.received == [] and pipe.task(task_id).status == "scheduled"
    time.sleep(max(0.0, (at - datetime.now(UTC)).total_seconds()) + 0.05)
    assert pipe.sweep().requeued == 1
    pipe.pump()
    assert pipe.task(task_id).status == "sent" and len(smtp.received) == 1
    assert pipe.task(task_id).sent_at >= at


def test_a_scheduled_at_in_the_past_means_now(pipe, smtp):
    user = pipe.user(smtp)
    task_id = pipe.enqueue(user, scheduled_at="2024-04-15T12:00:00")
    assert pipe.task(task_id).status == "queued"
    pipe.pump()
    assert pipe.task(task_id).status == "sent"


def test_451_twice_then_250_is_sent_on_the_third_try_with_backoff_between(pipe, smtp):
    smtp.script("451 4.3.0 mailbox busy", "451 4.3.0 mailbox busy", "250 OK")
    user = pipe.user(smtp)
    task_id = pipe.enqueue(user)
    attempts = []
    deadline = time.monotonic() + 15
    while pipe.task(task_id).status != "sent" and time.monotonic() < deadline:
        before = smtp.data_attempts
        pipe.pump()
        if smtp.data_attempts > before:
            attempts.append(time.monotonic())
            row = pipe.task(task_id)
            if row.status == "failed":
                assert row.last_error.startswith("451") and "mailbox busy" in row.last_error
                wait = (row.next_attempt_at - datetime.now(UTC)).total_seconds()
                assert wait <= 1.0  # RETRY_BACKOFF_MAX
                if wait > 0.05:  # (a stalled machine may already be past it)
                    assert pipe.sweep().requeued == 0  # not due yet: nothing goes back early
        pipe.sweep()
        time.sleep(0.02)
    row = pipe.task(task_id)
    assert row.status == "sent" and row.try_count == 3 and smtp.data_attempts == 3
    assert len(smtp.received) == 1
    # base 0.2 s with equal jitter: at least 0.1 s, then at least 0.2 s
    assert attempts[1] - attempts[0] >= 0.1 and attempts[2] - attempts[1] >= 0.2


def test_550_cancels_after_one_attempt_and_the_reason_is_listed_as_a_failure(pipe, smtp):
    smtp.script("550 5.1.1 no such user here")
    user = pipe.user(smtp)
    task_id = pipe.enqueue(user)
    pipe.run_until_settled()
    row = pipe.task(task_id)
    assert row.status == "cancelled" and row.try_count == 1 and smtp.data_attempts == 1
    assert "550" in row.last_error and "no such user here" in row.last_error
    from shared.tasks import pages, search

    page = pages.list_tasks(pipe.ctx, user.id, search.Search(search.FAIL_STATUSES), 50, None)
    assert [(t["id"], t["status"], t["try_count"]) for t in page["items"]] == [(task_id, "cancelled", 1)]
    assert "550" in page["items"][0]["last_error"]


def test_a_server_that_always_answers_451_gets_exactly_max_try_count_attempts(pipe, smtp):
    smtp.script(*["451 4.7.1 greylisted"] * 10)
    user = pipe.user(smtp)
    task_id = pipe.enqueue(user)
    pipe.run_until_settled()
    time.sleep(1.2)  # past any backoff: a further attempt would happen now if it were going to
    pipe.sweep()
    pipe.pump()
    row = pipe.task(task_id)
    assert smtp.data_attempts == pipe.ctx.settings.max_try_count == 3
    assert row.status == "cancelled" and row.try_count == 3
    assert "451" in row.last_error and "gave up after 3 tries" in row.last_error


def test_the_same_envelope_taken_twice_sends_one_mail(pipe, smtp):
    """The conditional claim, deterministically: a second copy of a sent task's envelope finds
    nothing to claim (the sender never relies on Redis holding one copy)."""
    user = pipe.user(smtp)
    task_id = pipe.enqueue(user)
    assert pipe.pump() == [Outcome.HANDED_OFF, Outcome.SENT]
    duplicate = Taken(user.id, queue.encode(task_id), "test:dup")
    pipe.ctx.redis.lpush(pipe.sender.processing, duplicate.raw)
    assert pipe.sender.handle(duplicate) == Outcome.DROPPED
    assert len(smtp.received) == 1 and pipe.task(task_id).try_count == 1
    assert pipe.ctx.redis.llen(pipe.sender.processing) == 0


def test_two_senders_racing_on_one_task_send_one_mail(fast_ctx, smtp):
    pipes = [Pipeline(fast_ctx) for _ in range(4)]
    user = pipes[0].user(smtp)
    task_ids = [pipes[0].enqueue(user, subject=f"race {i}") for i in range(20)]
    fast_ctx.redis.delete(queue.TASK_LIST)
    # Every sender holds a copy of every envelope, as if each had taken it.
    held = {p: [Taken(user.id, queue.encode(t), f"{p.sender.id}:{t}") for t in task_ids] for p in pipes}
    for p, items in held.items():
        fast_ctx.redis.lpush(p.sender.processing, *(item.raw for item in items))
    barrier = threading.Barrier(len(pipes))

    def run(p):
        barrier.wait()
        for item in held[p]:
            p.sender.handle(item)

    threads = [threading.Thread(target=run, args=(p,)) for p in pipes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for p in pipes:
        p.close()
    assert sorted(m["Subject"] for m in smtp.messages) == sorted(f"race {i}" for i in range(20))
    assert set(pipes[0].statuses().values()) == {"sent"}
    assert {pipes[0].task(t).try_count for t in task_ids} == {1}


def test_a_push_that_fails_at_enqueue_is_delivered_by_the_sweep(fast_ctx, smtp):
    from shared.local.embedded import free_port

    pipe = Pipeline(fast_ctx)
    user = pipe.user(smtp)
    working_redis = fast_ctx.redis
    fast_ctx.redis = make_redis(f"redis://127.0.0.1:{free_port()}/0", socket_timeout=0.5)
    task_id = pipe.enqueue(user)  # the row is committed; the push fails quietly
    fast_ctx.redis = working_redis
    assert pipe.task(task_id).status == "queued" and working_redis.llen(queue.TASK_LIST) == 0
    assert pipe.sweep().requeued == 0  # within the leak window a queued task is left alone
    time.sleep(1.1)
    assert pipe.sweep().requeued == 1
    pipe.pump()
    pipe.close()
    assert pipe.task(task_id).status == "sent" and len(smtp.received) == 1


def test_redis_flushed_with_tasks_in_flight_is_recovered_by_the_sweep(pipe, smtp):
    user = pipe.user(smtp)
    ids = [pipe.enqueue(user, subject=f"m{i}") for i in range(30)]
    # Some envelopes are with the senders, some still with the consumer, when Redis loses everything.
    for _ in range(10):
        pipe.consumer.step(0.05)
    pipe.ctx.redis.flushall()
    time.sleep(1.1)
    statuses = pipe.run_until_settled()
    assert all(statuses[i] == "sent" for i in ids)
    assert sorted(m["Subject"] for m in smtp.messages) == sorted(f"m{i}" for i in range(30))


def paused_for(pipe, user) -> dict:
    """The account's smtp_state as its user record shows it."""
    return users.get_user(pipe.ctx, user.id, user.id)["smtp_state"]


def test_a_server_without_starttls_gets_nothing_in_plaintext(pipe, smtp):
    """The account cannot send as configured: it pauses (its mail waits for new settings) instead of
    each mail being cancelled; nothing goes out in plaintext."""
    user = pipe.user(smtp, smtp_security="starttls")
    task_id = pipe.enqueue(user)
    assert pipe.pump() == [Outcome.HANDED_OFF, Outcome.PAUSED]
    row = pipe.task(task_id)
    assert row.status == "queued" and row.try_count == 0
    state = paused_for(pipe, user)
    assert state["state"] == "paused" and state["reason"] == "configuration" and "STARTTLS" in state["detail"]
    assert smtp.received == [] and smtp.data_attempts == 0


def test_a_self_signed_certificate_is_refused(fast_ctx, tmp_path):
    with ScriptedSmtpServer(tls_context=make_self_signed_context(tmp_path)) as server:
        pipe = Pipeline(fast_ctx)
        user = pipe.user(server, smtp_security="starttls")
        task_id = pipe.enqueue(user)
        assert Outcome.PAUSED in pipe.pump()
        pipe.close()
    row = pipe.task(task_id)
    assert row.status == "queued" and row.try_count == 0
    state = paused_for(pipe, user)
    assert state["state"] == "paused" and "certificate" in state["detail"].lower()
    assert server.received == []


def test_a_verified_starttls_server_gets_the_mail(fast_ctx, tmp_path):
    ca = make_ca(tmp_path)
    with ScriptedSmtpServer(tls_context=ca.server_context()) as server:
        pipe = Pipeline(
            fast_ctx, ssl_context_factory=lambda: ssl.create_default_context(cafile=str(ca.ca_path))
        )
        user = pipe.user(server, smtp_security="starttls")
        task_id = pipe.enqueue(user)
        pipe.run_until_settled()
        pipe.close()
    assert pipe.task(task_id).status == "sent" and len(server.received) == 1


def test_an_expired_lease_is_put_back_and_delivered(pipe, smtp):
    """A sender that claimed and then vanished: the lease runs out and the sweep re-queues."""
    user = pipe.user(smtp)
    task_id = pipe.enqueue(user)
    pipe.ctx.redis.delete(queue.TASK_LIST)
    assert pipe.sender.claim(task_id) is not None  # claimed, then the "sender" is gone
    assert pipe.sweep().requeued == 0
    time.sleep(2.1)
    assert pipe.sweep().requeued == 1
    pipe.pump()
    row = pipe.task(task_id)
    assert row.status == "sent" and row.try_count == 2 and len(smtp.received) == 1


def test_a_late_outcome_from_a_sender_whose_lease_was_taken_over_is_discarded(pipe, smtp):
    user = pipe.user(smtp)
    task_id = pipe.enqueue(user)
    pipe.ctx.redis.delete(queue.TASK_LIST)
    stale = pipe.sender.claim(task_id)
    time.sleep(2.1)
    pipe.sweep()
    pipe.pump()  # the task is sent by the new claim (try 2)
    assert (
        pipe.sender.record(stale, __import__("shared.domain").domain.Status.FAILED, "late") == Outcome.STALE
    )
    row = pipe.task(task_id)
    assert row.status == "sent" and row.try_count == 2 and row.last_error is None


def test_a_lost_worker_on_the_last_try_cancels_instead_of_trying_again(pipe, smtp):
    user = pipe.user(smtp)
    task_id = pipe.enqueue(user)
    with pipe.ctx.engine.begin() as conn:
        conn.execute(sa.text("UPDATE tasks SET try_count = 2 WHERE id = :id"), {"id": task_id})
    pipe.ctx.redis.delete(queue.TASK_LIST)
    assert pipe.sender.claim(task_id).try_count == 3
    time.sleep(2.1)
    report = pipe.sweep()
    assert report.cancelled == 1 and report.requeued == 0
    assert pipe.task(task_id).status == "cancelled" and smtp.received == []


def test_envelopes_of_a_dead_worker_go_back_to_their_list(pipe, smtp):
    user = pipe.user(smtp)
    task_id = pipe.enqueue(user)
    pipe.consumer.register()
    assert pipe.consumer.take_many(0.1) == [queue.encode(task_id)]  # in hand, then the worker dies
    pipe.ctx.redis.delete(queue.heartbeat_key(pipe.consumer.id))
    report = pipe.sweep()
    assert report.rescued == 1 and report.dead_workers == 1
    assert pipe.ctx.redis.llen(pipe.consumer.processing) == 0
    pipe.pump()
    assert pipe.task(task_id).status == "sent"


def test_a_live_workers_envelopes_are_left_alone(pipe, smtp):
    user = pipe.user(smtp)
    pipe.enqueue(user)
    pipe.consumer.register()
    pipe.consumer.take_many(0.1)
    assert pipe.sweep().rescued == 0
    assert pipe.ctx.redis.llen(pipe.consumer.processing) == 1


def test_two_sweeps_at_once_double_nothing(pipe, smtp):
    user = pipe.user(smtp)
    ids = [pipe.enqueue(user) for _ in range(300)]
    pipe.ctx.redis.delete(queue.TASK_LIST)
    with pipe.ctx.engine.begin() as conn:
        conn.execute(sa.text("UPDATE tasks SET next_attempt_at = now() - interval '1 hour'"))
    settings = pipe.ctx.settings.replace(sweep_batch=7)
    from shared.maintenance.sweep import sweep_once

    reports = []
    threads = [
        threading.Thread(target=lambda: reports.append(sweep_once(settings, pipe.ctx.engine, pipe.ctx.redis)))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r.requeued for r in reports) == 300
    envelopes = pipe.ctx.redis.zrange(queue.send_queue(user.id), 0, -1)
    assert sorted(queue.decode(e) for e in envelopes) == sorted(ids)


def test_the_pending_work_query_counts_what_the_sweep_would_do(pipe, smtp):
    from shared.maintenance.sweep import pending_work

    user = pipe.user(smtp)
    pipe.enqueue(user)
    pipe.enqueue(user, scheduled_at=(datetime.now(UTC) + timedelta(hours=1)).isoformat())
    assert pending_work(pipe.ctx.settings, pipe.ctx.engine) == 0
    time.sleep(1.1)  # the queued one is now past the 1 s leak window
    assert pending_work(pipe.ctx.settings, pipe.ctx.engine) == 1
    assert pipe.sweep().requeued == 1
    assert pending_work(pipe.ctx.settings, pipe.ctx.engine) == 0


def test_a_malformed_envelope_is_dropped(pipe):
    pipe.ctx.redis.lpush(queue.TASK_LIST, b"not json", b'{"v":2,"task_id":1}')
    assert pipe.pump() == [Outcome.DROPPED, Outcome.DROPPED]
    assert pipe.ctx.redis.llen(pipe.consumer.processing) == 0


def test_backoff_doubles_per_try_with_jitter_and_is_capped():
    assert backoff_seconds(1, 30, 3600, rng=lambda: 1.0) == 30
    assert backoff_seconds(2, 30, 3600, rng=lambda: 1.0) == 60
    assert backoff_seconds(3, 30, 3600, rng=lambda: 0.0) == 60  # equal jitter: at least half
    assert backoff_seconds(20, 30, 3600, rng=lambda: 1.0) == 3600


def test_duplicates_within_one_batch_send_one_mail(pipe, smtp):
    user = pipe.user(smtp)
    task_id = pipe.enqueue(user)
    pipe.ctx.redis.lpush(queue.TASK_LIST, *[queue.encode(task_id)] * 4)
    outcomes = pipe.pump()
    assert outcomes.count(Outcome.HANDED_OFF) == 1 and outcomes.count(Outcome.SENT) == 1
    assert len(smtp.received) == 1


def test_the_try_count_fences_a_stale_outcome_while_the_new_claim_is_in_flight(pipe, smtp):
    """The old sender's write arrives while the second claim is still processing: it must not land."""
    from shared.domain import Status

    user = pipe.user(smtp)
    task_id = pipe.enqueue(user)
    pipe.ctx.redis.delete(queue.TASK_LIST)
    stale = pipe.sender.claim(task_id)
    time.sleep(2.1)
    assert pipe.sweep().requeued == 1
    fresh = pipe.sender.claim(task_id)
    assert fresh.try_count == 2 and pipe.task(task_id).status == "processing"
    assert pipe.sender.record(stale, Status.SENT, None) == Outcome.STALE
    row = pipe.task(task_id)
    assert row.status == "processing" and row.try_count == 2 and row.sent_at is None
    assert pipe.sender.attempt(fresh) == Outcome.SENT
    assert pipe.task(task_id).status == "sent" and len(smtp.received) == 1


def test_the_consumer_takes_up_to_a_batch_in_order_and_holds_each_envelope_it_took(pipe):
    client, consumer = pipe.ctx.redis, pipe.consumer
    envelopes = [queue.encode(i) for i in range(1, consumer.batch + 6)]
    client.lpush(queue.TASK_LIST, *envelopes)  # LPUSH: the first pushed is the first taken
    taken = consumer.take_many(0.1)
    assert taken == envelopes[: consumer.batch]
    assert client.lrange(consumer.processing, 0, -1) == list(reversed(taken))  # held, not lost
    assert consumer.take_many(0.1) == envelopes[consumer.batch :]  # fewer left: stops at the first miss
    assert client.llen(queue.TASK_LIST) == 0 and consumer.take_many(0.1) == []
