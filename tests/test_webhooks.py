"""Webhooks end to end through the real pipeline: PostgreSQL, Redis, an aiosmtpd server and a real HTTP
receiver; every delivery verified with the Standard Webhooks reference library.

The webhook worker is driven step by step (``step()``), with a retry schedule of zeros so that a retry
is due at once; the senders and the sweep come from tests/pipeline.py.
"""

from __future__ import annotations

import base64
import threading
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from shared import queue
from shared.tasks import events
from shared.webhooks import endpoints
from shared.webhooks.worker import DELIVERED, FAILED, RETRYING, WebhookWorker
from shared.webhooks.worker import Claim as DeliveryClaim
from tests.pipeline import Pipeline
from tests.smtp_servers import ScriptedSmtpServer
from tests.webhook_receiver import SILENT, TRICKLE, WebhookReceiver


@pytest.fixture()
def pipe(ctx):
    ctx.settings = ctx.settings.replace(
        webhook_retry_schedule=(0, 0, 0), webhook_timeout=1.0, retry_backoff_base=0.0, retry_backoff_max=0.0
    )
    p = Pipeline(ctx)
    p.hooks = WebhookWorker(ctx.settings, ctx.engine, ctx.redis, ctx.box)
    yield p
    p.hooks.close()
    p.close()


def subscribe(pipe, user, receiver, **body) -> dict:
    return endpoints.create(pipe.ctx, user.id, {"url": receiver.url, **body})


def deliver(pipe, rounds: int = 10) -> list[str]:
    """Step the webhook worker until nothing is left to take."""
    outcomes = []
    for _ in range(rounds):
        step = pipe.hooks.step()
        if not step:
            break
        outcomes += step
    return outcomes


def deliveries(pipe) -> list:
    with pipe.ctx.engine.connect() as conn:
        return conn.execute(
            sa.text(
                "SELECT d.*, e.type, e.task_id FROM webhook_deliveries d"
                " JOIN webhook_events e ON e.id = d.event_id ORDER BY d.id"
            )
        ).all()


def event_rows(pipe) -> list:
    with pipe.ctx.engine.connect() as conn:
        return conn.execute(sa.text("SELECT * FROM webhook_events ORDER BY id")).all()


# --- every event type, verified ----------------------------------------------------------------------


def test_a_sent_mail_is_reported_by_a_signed_task_sent_event(pipe):
    with ScriptedSmtpServer() as smtp, WebhookReceiver() as receiver:
        user = pipe.user(smtp)
        endpoint = subscribe(pipe, user, receiver)
        task_id = pipe.enqueue(user)
        pipe.pump()
        assert deliver(pipe) == [DELIVERED]
        (request,) = receiver.requests
        event = request.verified(endpoint["secret"])
        task = pipe.task(task_id)
        assert event["type"] == "task.sent"
        assert datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")) <= datetime.now(UTC)
        assert event["data"] == {
            "task_id": task_id,
            "status": "sent",
            "recipient_email": "bob@example.org",
            "message_id": task.message_id,
            "try_count": 1,
            "last_error": None,
            "smtp_code": None,
            "next_attempt_at": None,
            "tags": {},
        }
        assert request.headers["webhook-id"] == events.webhook_id(event_rows(pipe)[0].id)
        assert request.headers["content-type"] == "application/json"
        assert "Hi Bob" not in request.body.decode() and len(request.body) < 20 * 1024  # never the mail body
        (row,) = deliveries(pipe)
        assert (row.state, row.attempts, row.last_status) == ("delivered", 1, 200)


def test_a_transient_failure_is_task_deferred_and_a_permanent_one_task_cancelled(pipe):
    with ScriptedSmtpServer() as smtp, WebhookReceiver() as receiver:
        user = pipe.user(smtp)
        endpoint = subscribe(pipe, user, receiver)
        smtp.script("451 4.3.0 mailbox busy", "550 5.1.1 no such user")
        task_id = pipe.enqueue(user)
        pipe.pump()  # 451: failed, to be retried
        pipe.sweep()  # due at once (no backoff in this test)
        pipe.pump()  # 550: cancelled
        assert deliver(pipe) == [DELIVERED, DELIVERED]
        deferred, cancelled = (r.verified(endpoint["secret"]) for r in receiver.requests)
        assert deferred["type"] == "task.deferred"
        assert deferred["data"]["status"] == "failed" and deferred["data"]["smtp_code"] == 451
        assert deferred["data"]["try_count"] == 1 and deferred["data"]["last_error"].startswith("451")
        assert deferred["data"]["next_attempt_at"] is not None
        assert cancelled["type"] == "task.cancelled" and cancelled["data"]["reason"] == "permanent_failure"
        assert cancelled["data"]["smtp_code"] == 550 and cancelled["data"]["try_count"] == 2
        assert cancelled["data"]["next_attempt_at"] is None
        assert "reason" not in deferred["data"]
        assert pipe.task(task_id).status == "cancelled"


def test_the_last_transient_failure_is_task_cancelled_with_tries_exhausted(pipe):
    with ScriptedSmtpServer() as smtp, WebhookReceiver() as receiver:
        user = pipe.user(smtp)
        endpoint = subscribe(pipe, user, receiver, events=["task.cancelled"])
        smtp.script(*["451 4.7.1 greylisted"] * 3)
        pipe.enqueue(user)
        pipe.run_until_settled()
        assert deliver(pipe) == [DELIVERED]  # only the subscribed type: no task.deferred
        (event,) = (r.verified(endpoint["secret"]) for r in receiver.requests)
        assert event["type"] == "task.cancelled" and event["data"]["reason"] == "tries_exhausted"
        assert event["data"]["try_count"] == 3
        assert [r.type for r in event_rows(pipe)] == ["task.cancelled"]


def test_a_task_whose_last_try_was_lost_in_flight_is_cancelled_by_the_sweep_with_an_event(pipe):
    pipe.ctx.settings = pipe.ctx.settings.replace(max_try_count=1)
    with ScriptedSmtpServer() as smtp, WebhookReceiver() as receiver:
        user = pipe.user(smtp)
        endpoint = subscribe(pipe, user, receiver)
        task_id = pipe.enqueue(user)
        pipe.consumer.step(0.1)
        sender = pipe.sender.__class__(
            pipe.ctx.settings, pipe.ctx.engine, pipe.ctx.redis, pipe.mailer, pipe.ctx.box
        )
        assert sender.claim(task_id) is not None  # its worker dies here: the lease runs out
        with pipe.ctx.engine.begin() as conn:
            conn.execute(sa.text("UPDATE tasks SET lease_until = now() - interval '1 second'"))
        report = pipe.sweep()
        assert report.cancelled == 1
        assert deliver(pipe) == [DELIVERED]
        event = receiver.requests[0].verified(endpoint["secret"])
        assert event["type"] == "task.cancelled" and event["data"]["reason"] == "lost_in_flight"
        assert event["data"]["status"] == "cancelled" and "lost" in event["data"]["last_error"]


def test_a_queued_task_left_without_tries_is_cancelled_by_the_sender_with_an_event(pipe):
    """MAX_TRY_COUNT lowered under a queued task: the sender's claim finds no try left and cancels it."""
    with ScriptedSmtpServer() as smtp, WebhookReceiver() as receiver:
        user = pipe.user(smtp)
        endpoint = subscribe(pipe, user, receiver)
        task_id = pipe.enqueue(user)
        with pipe.ctx.engine.begin() as conn:
            conn.execute(sa.text("UPDATE tasks SET try_count = 3"))  # three tries spent before the change
        pipe.pump()
        assert pipe.task(task_id).status == "cancelled" and smtp.received == []
        assert deliver(pipe) == [DELIVERED]
        event = receiver.requests[0].verified(endpoint["secret"])
        assert (event["type"], event["data"]["reason"]) == ("task.cancelled", "tries_exhausted")


def test_a_user_cancel_reports_itself_in_its_transaction(pipe):
    from shared.errors import Conflict
    from shared.tasks import control

    with ScriptedSmtpServer() as smtp, WebhookReceiver() as receiver:
        user = pipe.user(smtp)
        endpoint = subscribe(pipe, user, receiver)
        task_id = pipe.enqueue(user, scheduled_at=(datetime.now(UTC) + timedelta(days=1)).isoformat())
        assert control.cancel(pipe.ctx, user.id, task_id)["status"] == "cancelled"
        with pytest.raises(Conflict):  # a second cancel is a 409 and reports nothing more
            control.cancel(pipe.ctx, user.id, task_id)
        assert deliver(pipe) == [DELIVERED]
        assert len(receiver.requests) == 1
        event = receiver.requests[0].verified(endpoint["secret"])
        assert (event["type"], event["data"]["reason"], event["data"]["status"]) == (
            "task.cancelled",
            "user",
            "cancelled",
        )


def test_a_user_without_endpoints_gets_no_event_rows(pipe):
    with ScriptedSmtpServer() as smtp, WebhookReceiver() as receiver:
        quiet = pipe.user(smtp)
        other = pipe.user(smtp, email="eve@example.com")
        subscribe(pipe, other, receiver)
        pipe.enqueue(quiet)
        pipe.pump()
        assert event_rows(pipe) == [] and deliver(pipe) == [] and receiver.requests == []


def test_a_stale_sender_outcome_reports_nothing_and_the_real_one_exactly_once(pipe):
    """Sender A's lease runs out mid-send; the sweep requeues, sender B sends and records; then A's
    server says 250 and A records: it loses the fencing check, so no second task.sent."""
    with ScriptedSmtpServer() as smtp, WebhookReceiver() as receiver:
        user = pipe.user(smtp)
        endpoint = subscribe(pipe, user, receiver)
        task_id = pipe.enqueue(user)
        pipe.consumer.step(0.1)
        late = pipe.sender.claim(task_id)  # A: try 1
        with pipe.ctx.engine.begin() as conn:  # A's lease runs out (the clock moves on)
            conn.execute(sa.text("UPDATE tasks SET lease_until = now() - interval '1 second'"))
        pipe.sweep()
        pipe.pump()  # B: try 2, sent and recorded
        assert pipe.sender.attempt(late).value == "stale"  # A: the server took it, the record is fenced off
        assert len(smtp.received) == 2  # the one duplicate nobody can rule out (same Message-ID)
        assert [(r.type, r.data["try_count"]) for r in event_rows(pipe)] == [("task.sent", 2)]
        assert deliver(pipe) == [DELIVERED]
        (request,) = receiver.requests
        assert request.verified(endpoint["secret"])["data"]["try_count"] == 2


# --- retries, 410, timeouts ----------------------------------------------------------------------------


def test_500_500_200_is_one_delivery_three_attempts_and_one_webhook_id(pipe):
    with ScriptedSmtpServer() as smtp, WebhookReceiver(script=[500, 500]) as receiver:
        user = pipe.user(smtp)
        endpoint = subscribe(pipe, user, receiver)
        pipe.enqueue(user)
        pipe.pump()
        assert deliver(pipe) == [RETRYING, RETRYING, DELIVERED]
        assert len({r.headers["webhook-id"] for r in receiver.requests}) == 1
        assert len({r.body for r in receiver.requests}) == 1
        for request in receiver.requests:
            request.verified(endpoint["secret"])
        (row,) = deliveries(pipe)
        assert (row.state, row.attempts, row.last_status) == ("delivered", 3, 200)
        delivered = {"outcome": "delivered"}
        assert pipe.hooks.metrics.registry.get_sample_value("mailq_webhook_deliveries_total", delivered) == 1


def test_retries_wait_for_the_schedule_and_for_a_longer_retry_after(pipe):
    pipe.hooks.settings = pipe.ctx.settings.replace(webhook_retry_schedule=(5, 300))
    with (
        ScriptedSmtpServer() as smtp,
        WebhookReceiver(script=[500, (503, {"Retry-After": "120"})]) as receiver,
    ):
        user = pipe.user(smtp)
        subscribe(pipe, user, receiver)
        pipe.enqueue(user)
        pipe.pump()
        assert deliver(pipe) == [RETRYING]
        (row,) = deliveries(pipe)
        assert row.state == "scheduled" and 4 < (row.next_attempt_at - row.updated_at).total_seconds() <= 5
        with pipe.ctx.engine.begin() as conn:  # the clock moves on
            conn.execute(sa.text("UPDATE webhook_deliveries SET next_attempt_at = now()"))
        pipe.hooks.settings = pipe.ctx.settings.replace(webhook_retry_schedule=(5, 30, 300))
        assert deliver(pipe) == [RETRYING]
        (row,) = deliveries(pipe)
        assert row.last_status == 503 and 119 < (row.next_attempt_at - row.updated_at).total_seconds() <= 120


def test_a_delivery_that_keeps_failing_ends_failed_after_the_schedule(pipe):
    with ScriptedSmtpServer() as smtp, WebhookReceiver(default=500) as receiver:
        user = pipe.user(smtp)
        subscribe(pipe, user, receiver)
        pipe.enqueue(user)
        pipe.pump()
        assert deliver(pipe) == [RETRYING, RETRYING, RETRYING, FAILED]
        (row,) = deliveries(pipe)
        assert (row.state, row.attempts, row.last_status) == ("failed", 4, 500)
        assert "gave up after 4 attempts" in row.last_error
        assert len(receiver.requests) == 4
        metric = pipe.hooks.metrics.registry.get_sample_value
        assert metric("mailq_webhook_deliveries_total", {"outcome": "retrying"}) == 3
        assert metric("mailq_webhook_deliveries_total", {"outcome": "failed"}) == 1
        assert metric("mailq_webhook_deliveries_total", {"outcome": "delivered"}) == 0
        assert metric("mailq_webhook_request_seconds_count") == 4


def test_410_disables_the_endpoint_and_nothing_more_is_sent_to_it(pipe):
    with ScriptedSmtpServer() as smtp, WebhookReceiver(script=[410]) as receiver:
        user = pipe.user(smtp)
        endpoint = subscribe(pipe, user, receiver)
        first = pipe.enqueue(user)
        second = pipe.enqueue(user, subject="second")
        pipe.pump()  # two task.sent events, two deliveries waiting
        pipe.hooks.settings = pipe.ctx.settings.replace(webhook_max_concurrency_per_endpoint=1)
        assert pipe.hooks.step(count=1) == [FAILED]
        assert deliver(pipe) == ["dropped"]  # the second delivery failed with the endpoint, unsent
        assert len(receiver.requests) == 1
        rows = deliveries(pipe)
        assert [(r.task_id, r.state, r.last_status) for r in rows] == [
            (first, "failed", 410),
            (second, "failed", None),
        ]
        (listed,) = endpoints.list_endpoints(pipe.ctx, user.id)["items"]
        assert (
            listed["id"] == endpoint["id"]
            and listed["enabled"] is False
            and "410" in listed["disabled_reason"]
        )
        pipe.enqueue(user, subject="third")
        pipe.pump()
        assert deliver(pipe) == [] and len(receiver.requests) == 1
        assert len(event_rows(pipe)) == 2  # no enabled endpoint: no event for the third mail


def test_a_receiver_that_never_answers_times_out_and_is_retried(pipe):
    with ScriptedSmtpServer() as smtp, WebhookReceiver(script=[SILENT]) as receiver:
        user = pipe.user(smtp)
        endpoint = subscribe(pipe, user, receiver)
        pipe.enqueue(user)
        pipe.pump()
        assert deliver(pipe) == [RETRYING, DELIVERED]
        first = receiver.requests[0]
        assert first.headers["webhook-id"] == receiver.requests[1].headers["webhook-id"]
        receiver.requests[1].verified(endpoint["secret"])
        (row,) = deliveries(pipe)
        assert row.state == "delivered" and row.attempts == 2


def test_a_receiver_trickling_its_answer_is_cut_off_by_the_deadline_on_the_whole_request(pipe):
    """Bytes keep coming (no read ever times out), so only a deadline on the whole request ends it."""
    with ScriptedSmtpServer() as smtp, WebhookReceiver(script=[TRICKLE], default=500) as receiver:
        user = pipe.user(smtp)
        subscribe(pipe, user, receiver)
        pipe.enqueue(user)
        pipe.pump()
        assert pipe.hooks.step() == [RETRYING]
        (row,) = deliveries(pipe)
        assert row.last_status is None and "WEBHOOK_TIMEOUT" in row.last_error, row.last_error


def test_a_stale_outcome_records_nothing(pipe):
    with ScriptedSmtpServer() as smtp, WebhookReceiver() as receiver:
        user = pipe.user(smtp)
        subscribe(pipe, user, receiver)
        pipe.enqueue(user)
        pipe.pump()
        (taken,) = pipe.hooks.take(1)
        delivery_id, _ = queue.decode_delivery(taken.raw)
        with (
            pipe.ctx.engine.begin() as conn
        ):  # as if the sweep took the lease back and another worker claimed
            conn.execute(sa.text("UPDATE webhook_deliveries SET attempts = 5, state = 'sending'"))
        row = deliveries(pipe)[0]
        stale = DeliveryClaim(
            id=delivery_id,
            attempts=1,
            endpoint_id=row.endpoint_id,
            user_id=user.id,
            url=receiver.url,
            enabled=True,
            secret_enc=pipe.ctx.box.encrypt(events.new_secret()),
            previous_secret_enc=None,
            event_id=row.event_id,
            type=row.type,
            data={},
            created_at=row.created_at,
        )
        assert pipe.hooks.attempt(stale) == "stale"  # the receiver got it; the record is fenced off
        assert deliveries(pipe)[0].state == "sending" and len(receiver.requests) == 1


def test_https_verifies_the_receivers_certificate_for_the_name_in_the_url(tmp_path):
    """The socket connects to the vetted address, and TLS checks the certificate against the URL's name."""
    import ssl

    from shared.webhooks.receiver import Receiver
    from tests.smtp_servers import make_ca, make_self_signed_context

    ca = make_ca(tmp_path / "ca")
    receiver = Receiver(
        timeout=2.0,
        allow_http=False,
        allow_private=True,
        ssl_context_factory=lambda: ssl.create_default_context(cafile=str(ca.ca_path)),
    )
    payload = b'{"type":"task.sent"}'
    headers = events.headers("msg_1", 1, payload, [events.new_secret()])
    try:
        with WebhookReceiver(tls=ca.server_context()) as trusted:
            assert receiver.post(trusted.url, payload, headers).status == 200
            assert trusted.requests[0].body == payload
        with WebhookReceiver(tls=make_self_signed_context(tmp_path / "self")) as stranger:
            answer = receiver.post(stranger.url, payload, headers)
            assert answer.status is None and "TLS failed" in answer.error, answer
            assert stranger.requests == []
        plain = receiver.post("http://localhost/hooks", payload, headers)
        assert plain.status is None and "https" in plain.error
    finally:
        receiver.close()


# --- rotation ------------------------------------------------------------------------------------------


def test_during_the_rotation_overlap_both_secrets_verify_and_afterwards_only_the_new_one(pipe):
    with ScriptedSmtpServer() as smtp, WebhookReceiver() as receiver:
        user = pipe.user(smtp)
        old = subscribe(pipe, user, receiver)["secret"]
        new = endpoints.rotate(
            pipe.ctx, user.id, endpoints.list_endpoints(pipe.ctx, user.id)["items"][0]["id"]
        )
        assert new["secret"] != old and new["previous_secret_expires_at"]
        pipe.enqueue(user)
        pipe.pump()
        deliver(pipe)
        (during,) = receiver.requests
        assert len(during.headers["webhook-signature"].split(" ")) == 2
        assert during.verified(old) == during.verified(new["secret"])
        with pipe.ctx.engine.begin() as conn:  # the overlap ends
            conn.execute(sa.text("UPDATE webhook_endpoints SET previous_secret_until = now()"))
        pipe.enqueue(user, subject="after")
        pipe.pump()
        deliver(pipe)
        after = receiver.requests[1]
        assert len(after.headers["webhook-signature"].split(" ")) == 1
        after.verified(new["secret"])
        with pytest.raises(Exception, match="No matching signature"):
            after.verified(old)


def test_the_secret_is_32_random_bytes_and_stored_encrypted(pipe):
    with WebhookReceiver() as receiver, ScriptedSmtpServer() as smtp:
        user = pipe.user(smtp)
        secret = subscribe(pipe, user, receiver)["secret"]
        assert secret.startswith("whsec_") and len(base64.b64decode(secret[6:], validate=True)) == 32
        with pipe.ctx.engine.connect() as conn:
            stored = conn.execute(sa.text("SELECT secret_enc FROM webhook_endpoints")).scalar_one()
        assert secret not in stored and secret[6:] not in stored
        assert pipe.ctx.box.decrypt(stored) == secret


# --- isolation -----------------------------------------------------------------------------------------


def test_a_dead_receiver_of_one_user_never_delays_another_users_webhooks_or_mail(pipe, tmp_path):
    """The worker's own threads (run()): a hostile user's receiver never answers; another user's
    deliveries, queued after the hostile ones, all arrive while the hostile ones still wait, and the
    hostile receiver never has more requests at once than the per-endpoint cap."""
    settings = pipe.ctx.settings.replace(
        webhook_timeout=5.0,  # the dead receiver holds each request this long: a round of two every 5 s
        webhook_worker_count=4,
        webhook_max_concurrency_per_endpoint=2,
        heartbeat_file=str(tmp_path / "beat"),
    )
    worker = WebhookWorker(settings, pipe.ctx.engine, pipe.ctx.redis, pipe.ctx.box)
    with (
        ScriptedSmtpServer() as smtp,
        WebhookReceiver(default=SILENT) as dead,
        WebhookReceiver() as alive,
    ):
        hostile, quiet = pipe.user(smtp, email="mallory@example.com"), pipe.user(smtp)
        hostile_endpoint = subscribe(pipe, hostile, dead)["id"]
        secret = subscribe(pipe, quiet, alive)["secret"]
        for i in range(20):
            pipe.enqueue(hostile, subject=f"h{i}")
        pipe.pump()  # 20 deliveries to the dead receiver, queued first
        running = threading.Thread(target=worker.run)
        running.start()
        try:
            dead.wait_for(2)  # the worker is stuck on the hostile endpoint now
            for i in range(5):
                pipe.enqueue(quiet, subject=f"q{i}")
            pipe.pump()  # mail goes out meanwhile: the senders never wait on a receiver
            assert sum(1 for r in pipe.statuses().values() if r == "sent") == 25
            alive.wait_for(5)
            waiting = sum(
                1 for r in deliveries(pipe) if r.endpoint_id == hostile_endpoint and r.attempts == 0
            )
        finally:
            worker.stopping.set()
            running.join(30)
        # Fewer than three rounds of hostile attempts started: the quiet ones did not wait for theirs.
        assert waiting >= 14, "the quiet user's webhooks waited behind the hostile ones"
        assert dead.max_in_flight <= 2
        for request in alive.requests:
            request.verified(secret)


def test_rotate_keys_re_encrypts_webhook_secrets_and_deliveries_still_verify(pipe):
    from shared.accounts import keys
    from shared.crypto import SecretBox, generate_key

    old_key, new_key = pipe.ctx.settings.encryption_keys[0], generate_key()
    with ScriptedSmtpServer() as smtp, WebhookReceiver() as receiver:
        user = pipe.user(smtp)
        first = subscribe(pipe, user, receiver)
        rotated = endpoints.rotate(pipe.ctx, user.id, first["id"])  # a previous secret in its overlap too
        both = SecretBox((new_key, old_key))
        assert keys.rotate_keys(pipe.ctx.engine, both).rewritten == 3  # the SMTP password and two secrets
        assert keys.rotate_keys(pipe.ctx.engine, both).rewritten == 0
        only_new = SecretBox((new_key,))
        pipe.hooks.box = pipe.sender.box = only_new  # the old key is retired
        pipe.enqueue(user)
        pipe.pump()
        assert deliver(pipe) == [DELIVERED]
        (request,) = receiver.requests
        assert request.verified(rotated["secret"]) == request.verified(first["secret"])


def test_due_deliveries_are_found_from_their_indexes(pipe):
    """EXPLAIN on 20k deliveries (mostly delivered): the sweep's and the workers' queries read the
    partial indexes, never the whole table."""
    from shared.pending import pending_work_sql
    from shared.webhooks.requeue import _requeue_sql

    with ScriptedSmtpServer() as smtp, WebhookReceiver() as receiver:
        user = pipe.user(smtp)
        endpoint = subscribe(pipe, user, receiver)["id"]
        task_id = pipe.enqueue(user)
    settings = pipe.ctx.settings
    with pipe.ctx.engine.connect() as conn:
        tx = conn.begin()  # rolled back: the rows and the statistics go with it
        event = conn.execute(
            sa.text(
                "INSERT INTO webhook_events (task_id, type, data) VALUES (:t, 'task.sent', '{}') RETURNING id"
            ),
            {"t": task_id},
        ).scalar_one()
        conn.execute(
            sa.text(
                "INSERT INTO webhook_deliveries (event_id, endpoint_id, state, next_attempt_at, lease_until)"
                " SELECT CAST(:ev AS bigint), CAST(:e AS bigint),"
                "        (ARRAY['scheduled', 'queued', 'sending', 'failed'])[mod(g, 100) + 1],"
                "        now() + (mod(g, 7) - 3) * interval '1 hour',"
                "        now() + (mod(g, 3) - 1) * interval '1 minute'"
                "   FROM generate_series(1, 20000) AS g WHERE mod(g, 100) < 4"
                " UNION ALL SELECT CAST(:ev AS bigint), CAST(:e AS bigint), 'delivered', now(), NULL"
                " FROM generate_series(1, 19000)"
            ),
            {"ev": event, "e": endpoint},
        )
        conn.execute(sa.text("ANALYZE webhook_deliveries"))
        count = pending_work_sql(settings.sweep_leak_window).split(
            " + (SELECT count(*) FROM webhook_deliveries", 1
        )
        deliveries_sql = "SELECT (SELECT count(*) FROM webhook_deliveries" + count[1]
        plans = []
        for seqscan in ("on", "off"):
            conn.execute(sa.text(f"SET LOCAL enable_seqscan = {seqscan}"))
            plans.append(conn.execute(sa.text("EXPLAIN " + deliveries_sql)).scalars().all())
            requeue = _requeue_sql(settings).text
            plans.append(
                conn.execute(
                    sa.text("EXPLAIN " + requeue),
                    {"batch": 1000, "max_attempts": settings.webhook_max_attempts},
                )
                .scalars()
                .all()
            )
        tx.rollback()
    for plan in plans:
        text = "\n".join(plan)
        assert "Seq Scan on webhook_deliveries" not in text, text
        for index in ("webhook_deliveries_due", "webhook_deliveries_queued", "webhook_deliveries_lease"):
            assert index in text, text


# --- changing an endpoint: re-enable after a 410, a new URL ------------------------------------------


def test_an_endpoint_disabled_by_a_410_is_enabled_again_with_its_secret_and_gets_the_next_events(pipe):
    """Before PATCH an endpoint disabled by a 410 could only be deleted and created again, with a new
    secret every receiver had to learn."""
    with ScriptedSmtpServer() as smtp, WebhookReceiver(script=[410]) as receiver:
        user = pipe.user(smtp)
        endpoint = subscribe(pipe, user, receiver)
        pipe.enqueue(user)
        pipe.pump()
        assert deliver(pipe) == [FAILED]
        assert endpoints.list_endpoints(pipe.ctx, user.id)["items"][0]["enabled"] is False
        enabled = endpoints.update(pipe.ctx, user.id, endpoint["id"], {"enabled": True})
        assert enabled["enabled"] is True and enabled["disabled_reason"] is None
        second = pipe.enqueue(user, subject="second")
        pipe.pump()
        assert deliver(pipe) == [DELIVERED]
        event = receiver.requests[-1].verified(endpoint["secret"])  # the same secret as before
        assert event["data"]["task_id"] == second


def test_a_new_url_takes_the_deliveries_not_yet_sent_and_a_disabled_endpoint_gets_nothing(pipe):
    with (
        ScriptedSmtpServer() as smtp,
        WebhookReceiver() as old,
        WebhookReceiver() as new,
    ):
        user = pipe.user(smtp)
        endpoint = subscribe(pipe, user, old)
        pipe.enqueue(user)
        pipe.pump()  # one delivery waiting for the old URL
        moved = endpoints.update(pipe.ctx, user.id, endpoint["id"], {"url": new.url})
        assert moved["url"] == new.url
        assert deliver(pipe) == [DELIVERED]
        assert (len(old.requests), len(new.requests)) == (0, 1)
        endpoints.update(pipe.ctx, user.id, endpoint["id"], {"enabled": False})
        (listed,) = endpoints.list_endpoints(pipe.ctx, user.id)["items"]
        assert listed["enabled"] is False and listed["disabled_reason"] == endpoints.DISABLED_BY_USER
        pipe.enqueue(user, subject="not reported")
        pipe.pump()
        assert deliver(pipe) == [] and len(new.requests) == 1
