"""GET /api/v1/task/{id}/raw: the bytes a real SMTP server (aiosmtpd) received, byte for byte, on every
try; message/rfc822; another user's task is not found (real PostgreSQL, Redis and SMTP)."""

from __future__ import annotations

import base64

import sqlalchemy as sa

from tests.smtp_servers import DROP
from tests.test_accounts_api import assert_problem
from tests.test_content import BINARY, UNSUBSCRIBE, account, b64, enqueue

RICH = {
    "subject": "Quarterly report — Überblick",
    "body": "Hi Bob,\n\nthe report is attached.\n.\nA line with a single dot above.\n",
    "html": "<p>Hi <b>Bob</b>,</p><p>the report is attached.</p>",
    "from_name": "Ada Lovelace",
    "recipient_name": "Bob",
    "cc": ["carol@example.org"],
    "bcc": ["archive@example.com"],
    "reply_to": "support@example.com",
    "headers": {"X-Campaign": "q3", "List-Unsubscribe": UNSUBSCRIBE},
    "attachments": [{"filename": "report.bin", "content": b64(BINARY), "content_type": "application/pdf"}],
}


def handed_over_a_day_ago(pg_url, task_id: int) -> None:
    """The mail was handed to us a day before it is sent (it was scheduled, or its relay was busy): the
    sender's clock at the send is then not the mail's Date."""
    from shared.db import engine_for

    with engine_for(pg_url).begin() as conn:
        conn.execute(
            sa.text("UPDATE tasks SET created_at = created_at - interval '1 day' WHERE id = :id"),
            {"id": task_id},
        )


def raw(api, headers, task_id: int):
    return api.get(f"/api/v1/task/{task_id}/raw", headers=headers)


def test_the_raw_message_is_the_bytes_the_smtp_server_received(api, pipe, smtp, pg_url):
    headers = account(api, smtp)
    plain = enqueue(api, headers)  # one text part, short ASCII headers: the sender's direct path
    rich = enqueue(api, headers, **RICH)  # the email package's path
    for task_id in (plain, rich):
        handed_over_a_day_ago(pg_url, task_id)
    pipe.pump()
    assert [pipe.task(i).status for i in (plain, rich)] == ["sent", "sent"]
    received = {r.message["Message-ID"]: r.raw for r in smtp.received}
    for task_id in (plain, rich):
        response = raw(api, headers, task_id)
        assert response.status_code == 200
        assert response.mimetype == "message/rfc822"
        assert response.headers["Cache-Control"] == "no-store"
        message_id = pipe.task(task_id).message_id
        assert response.get_data() == received[message_id], task_id
    rich_raw = raw(api, headers, rich).get_data()
    assert b"archive@example.com" not in rich_raw  # Bcc is on the envelope only, as on the wire
    assert base64.b64encode(BINARY)[:60] in rich_raw.replace(b"\r\n", b"")


def test_a_retry_after_a_lost_reply_sends_the_same_bytes_and_the_raw_message_is_them(api, pipe, smtp, pg_url):
    pipe.ctx.settings = pipe.ctx.settings.replace(retry_backoff_base=1.1, retry_backoff_max=1.2)
    pipe.sender.settings = pipe.ctx.settings
    headers = account(api, smtp)
    smtp.script(DROP)  # accepted, but the reply never comes: the sender must try again
    task_id = enqueue(api, headers, **RICH)
    pipe.run_until_settled(timeout=30)
    first, second = (r.raw for r in smtp.received)
    assert pipe.task(task_id).try_count == 2
    assert first == second == raw(api, headers, task_id).get_data()


def test_another_users_task_has_no_raw_message_and_a_token_is_needed(api, smtp):
    ada = account(api, smtp)
    grace = account(api, smtp, email="grace@example.com")
    task_id = enqueue(api, ada)
    assert_problem(raw(api, grace, task_id), 404)
    assert_problem(raw(api, ada, 999_999), 404)
    assert_problem(api.get(f"/api/v1/task/{task_id}/raw"), 401)
    assert raw(api, ada, task_id).status_code == 200  # before it is sent, too: what will be sent


def test_a_mail_is_dated_when_it_became_due_not_when_it_was_handed_over(api, pipe, smtp, pg_url):
    """A mail enqueued days before it is due (scheduled) is dated at its due time: dated at its enqueue
    it would arrive days old (clients sort by Date; spam filters score a Date far in the past)."""
    from email.utils import parsedate_to_datetime

    from shared.db import engine_for

    headers = account(api, smtp)
    task_id = enqueue(api, headers)
    with engine_for(pg_url).begin() as conn:  # handed over three days ago, due now
        conn.execute(
            sa.text("UPDATE tasks SET created_at = created_at - interval '3 days' WHERE id = :id"),
            {"id": task_id},
        )
        due = conn.execute(
            sa.text("SELECT scheduled_at FROM tasks WHERE id = :id"), {"id": task_id}
        ).scalar_one()
    pipe.pump()
    assert pipe.task(task_id).status == "sent"
    (received,) = smtp.received
    dated = parsedate_to_datetime(received.message["Date"])
    assert abs((dated - due).total_seconds()) < 1, (dated, due)
    assert raw(api, headers, task_id).get_data() == received.raw  # the raw message says the same
