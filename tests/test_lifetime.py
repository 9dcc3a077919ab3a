"""A mail is not kept forever (issue 20): MAX_QUEUE_LIFETIME after it is due, or its own expires_at; never
attempted after it, cancelled as ``expired`` (webhook task.cancelled, reason expired; the metrics' label).
Real PostgreSQL, Redis and an aiosmtpd server."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from shared.pending import pending_work_sql
from shared.tasks import batch, control, views
from shared.workers import Outcome
from tests.conftest import auth_header, login, register_user
from tests.pipeline import Pipeline
from tests.smtp_servers import ScriptedSmtpServer


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat()


@pytest.fixture()
def smtp():
    with ScriptedSmtpServer() as server:
        yield server


def test_a_mail_expires_max_queue_lifetime_after_it_is_due_unless_it_says_sooner(pipe):
    user = pipe.user(_Nowhere())
    now = datetime.now(UTC)
    plain = pipe.enqueue(user)
    later = pipe.enqueue(user, scheduled_at=iso(now + timedelta(days=2)))
    own = pipe.enqueue(user, expires_at=iso(now + timedelta(hours=1)))
    lifetime = timedelta(seconds=pipe.ctx.settings.max_queue_lifetime)
    assert lifetime == timedelta(days=5)
    assert abs(pipe.task(plain).expires_at - (now + lifetime)) < timedelta(seconds=30)
    assert abs(pipe.task(later).expires_at - (now + timedelta(days=2) + lifetime)) < timedelta(seconds=30)
    assert abs(pipe.task(own).expires_at - (now + timedelta(hours=1))) < timedelta(seconds=1)
    mails = [
        {
            "recipient_email": "b@example.org",
            "subject": "s",
            "body": "b",
            "expires_at": iso(now + timedelta(minutes=5)),
        },
        {"recipient_email": "c@example.org", "subject": "s", "body": "b"},
    ]
    result, _ = batch.enqueue_batch(pipe.ctx, user.id, {"tasks": mails}, None, "strict")  # the same rules
    first, second = (pipe.task(i["task_id"]) for i in result["items"])
    assert abs(first.expires_at - (now + timedelta(minutes=5))) < timedelta(seconds=1)
    assert abs(second.expires_at - (now + lifetime)) < timedelta(seconds=30)


class _Nowhere:
    host, port = "127.0.0.1", 9  # nothing is sent in this test


@pytest.mark.parametrize(
    ("expires_at", "message"),
    [
        ("2001-01-01T00:00:00Z", "must be in the future"),
        ("next week", "ISO 8601"),
        (12, "ISO 8601"),
        ("PAST_SCHEDULED", "after scheduled_at"),
        ("TOO_LATE", "MAX_QUEUE_LIFETIME"),
    ],
)
def test_an_expires_at_that_cannot_be_kept_is_a_422_and_nothing_is_stored(api, expires_at, message):
    register_user(api)
    headers = auth_header(login(api))
    now = datetime.now(UTC)
    body = {"recipient_email": "b@example.org", "subject": "s", "body": "b", "expires_at": expires_at}
    if expires_at == "PAST_SCHEDULED":
        body.update(scheduled_at=iso(now + timedelta(days=2)), expires_at=iso(now + timedelta(days=1)))
    if expires_at == "TOO_LATE":
        body["expires_at"] = iso(now + timedelta(days=5, hours=1))
    for path, payload in (("/api/v1/task/enqueue", body), ("/api/v1/task/enqueue/batch", {"tasks": [body]})):
        response = api.post(path, json=payload, headers=headers)
        assert response.status_code == 422, response.get_json()
        problem = response.get_json()
        assert response.mimetype == "application/problem+json"
        assert any(message in text for text in problem["errors"].values()), problem
    assert api.get("/api/v1/task/queue", headers=headers).get_json()["items"] == []


def test_an_expired_mail_is_never_attempted_and_the_sweep_cancels_it_as_expired(pipe, smtp, ctx):
    user = pipe.user(smtp)
    soon = pipe.enqueue(user, subject="login code", expires_at=iso(datetime.now(UTC) + timedelta(seconds=1)))
    kept = pipe.enqueue(user, subject="newsletter")
    pipe.hand_off()
    time.sleep(1.1)  # its time passes while it waits behind a slow relay, say
    assert pipe.sender.claim(soon) is None  # the claim refuses it
    with ctx.engine.connect() as conn:
        waiting = conn.execute(sa.text(pending_work_sql(300, 30))).scalar_one()
    assert waiting >= 1  # KEDA's trigger counts it: a sweep is started for it
    report = pipe.sweep()
    assert report.expired == 1
    row = pipe.task(soon)
    assert row.status == "cancelled" and row.last_error.startswith("expired") and row.try_count == 0
    assert Outcome.SENT in pipe.pump()
    assert [m["Subject"] for m in smtp.messages] == ["newsletter"] and pipe.task(kept).status == "sent"
    assert pipe.sweep().expired == 0  # a cancelled one is not found again


def test_a_sender_that_meets_an_expired_mail_cancels_it_at_once(pipe, smtp):
    user = pipe.user(smtp)
    task_id = pipe.enqueue(user, expires_at=iso(datetime.now(UTC) + timedelta(seconds=0.5)))
    pipe.hand_off()
    time.sleep(0.6)
    assert pipe.sender.step(0.05) == [Outcome.CANCELLED]
    assert pipe.task(task_id).status == "cancelled" and smtp.messages == []
    assert pipe.sender.metrics.cancelled.labels("expired")._value.get() == 1  # noqa: SLF001


def test_a_retry_or_a_reschedule_past_its_expiry_gives_the_mail_a_fresh_lifetime(pipe, smtp, ctx):
    user = pipe.user(smtp)
    task_id = pipe.enqueue(user, expires_at=iso(datetime.now(UTC) + timedelta(seconds=0.5)))
    time.sleep(0.6)
    pipe.sweep()
    assert pipe.task(task_id).status == "cancelled"
    retried = control.retry(ctx, user.id, task_id)
    assert datetime.fromisoformat(retried["expires_at"]) > datetime.now(UTC) + timedelta(days=4)
    keep = pipe.enqueue(user, expires_at=iso(datetime.now(UTC) + timedelta(hours=2)))
    moved = control.reschedule(
        ctx, user.id, keep, {"scheduled_at": iso(datetime.now(UTC) + timedelta(hours=1))}
    )
    assert datetime.fromisoformat(moved["expires_at"]) < datetime.now(UTC) + timedelta(
        hours=3
    )  # still its own
    past = control.reschedule(
        ctx, user.id, keep, {"scheduled_at": iso(datetime.now(UTC) + timedelta(hours=3))}
    )
    assert datetime.fromisoformat(past["expires_at"]) > datetime.now(UTC) + timedelta(
        days=5
    )  # would be due after it
    assert Outcome.SENT in pipe.pump() and pipe.task(task_id).status == "sent"


def test_the_task_view_shows_expires_at_until_the_task_is_final(pipe, smtp, ctx):
    user = pipe.user(smtp)
    task_id = pipe.enqueue(user)
    assert views.get_task(ctx, user.id, task_id)["expires_at"] is not None
    pipe.pump()
    assert views.get_task(ctx, user.id, task_id)["expires_at"] is None


@pytest.fixture()
def pipe(ctx):
    p = Pipeline(ctx)
    yield p
    p.close()
