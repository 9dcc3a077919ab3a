"""Tenant isolation (issue 9): a slow, hostile or busy tenant cannot hurt anyone else's mail.

Real PostgreSQL, Redis and SMTP servers (aiosmtpd, and the raw-socket hostile servers of
tests/hostile_smtp.py). Workers are driven step by step where that proves the point, and run with
their threads where the point is about threads.
"""

from __future__ import annotations

import collections
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from shared import queue
from shared.accounts import keys, users
from shared.context import make_redis
from shared.crypto import SecretBox, generate_key
from shared.db import is_unavailable, make_engine
from shared.delivery.mailer import Mailer
from shared.delivery.sender import Sender
from shared.domain import PauseReason, Status
from shared.fairqueue import SendQueue
from shared.tasks import enqueue
from shared.workers import Outcome
from tests.hostile_smtp import SlowGoodbyeServer, TricklingServer
from tests.pipeline import Pipeline
from tests.smtp_servers import ScriptedSmtpServer


@pytest.fixture()
def fast_ctx(ctx):
    """A 2 s lease (so a conversation gets 1.6 s), short backoff, leak window and heartbeat."""
    ctx.settings = ctx.settings.replace(
        lease_seconds=2,
        smtp_timeout=1,
        retry_backoff_base=0.2,
        retry_backoff_max=1.0,
        sweep_leak_window=1,
        heartbeat_ttl=2,
    )
    return ctx


@pytest.fixture()
def pipe(fast_ctx):
    p = Pipeline(fast_ctx)
    yield p
    p.close()


def envelopes_in_redis(client) -> collections.Counter:
    """Every envelope Redis holds, wherever it waits (lists and tenants' queues), with its count."""
    found: collections.Counter = collections.Counter()
    for key in client.scan_iter("mailq:*"):
        kind = client.type(key).decode()
        values = (
            client.lrange(key, 0, -1)
            if kind == "list"
            else client.zrange(key, 0, -1)
            if kind == "zset"
            else []
        )
        found.update(v for v in values if v.startswith(b'{"v":1'))
    return found


def run_in_thread(target) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def wait_for(condition, timeout: float = 10.0, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


# --- 1. a whole conversation has a deadline inside the lease ----------------------------------------


def test_a_trickling_server_cannot_hold_a_send_past_its_lease_nor_get_the_mail_twice(pipe, fast_ctx):
    """Each byte comes within SMTP_TIMEOUT, so only a deadline on the whole conversation stops it.
    Before: the send outlived the lease, the sweep gave the task to a second sender, two copies."""
    fast_ctx.settings = fast_ctx.settings.replace(retry_backoff_base=30, retry_backoff_max=60)
    pipe.sender.settings = fast_ctx.settings
    # The connection opens at full speed (before the claim); the reply to the mail's DATA crawls.
    with TricklingServer(delay=0.6, only=("DATA",)) as server:
        user = pipe.user(server)
        task_id = pipe.enqueue(user)
        pipe.consumer.step(0.1)
        took = []

        def send():
            started = time.monotonic()
            pipe.sender.step()
            took.append(time.monotonic() - started)

        first = run_in_thread(send)
        time.sleep(fast_ctx.settings.lease_seconds + 0.2)  # the lease would have run out by now
        pipe.sweep()
        second = Pipeline(fast_ctx)
        second.sender.step(0.2)  # another sender looks for work meanwhile
        first.join(20)
        second.close()
        copies = len(server.messages)
    assert took[0] < fast_ctx.settings.lease_seconds  # cut at the deadline (1.6 s), inside the lease
    assert copies <= 1
    row = pipe.task(task_id)
    assert row.try_count == 1 and row.status == "failed" and "deadline" in row.last_error


def test_an_outcome_still_lands_when_nobody_claimed_the_task_since_its_lease_ran_out(pipe, smtp_server):
    user = pipe.user(smtp_server)
    task_id = pipe.enqueue(user)
    claim = pipe.sender.claim(task_id)
    time.sleep(pipe.ctx.settings.lease_seconds + 0.1)
    assert pipe.sweep().requeued == 1 and pipe.task(task_id).status == "queued"
    # What the server said is still the truth: nobody else has tried since.
    assert pipe.sender.record(claim, Status.SENT, None) == Outcome.SENT
    assert pipe.task(task_id).status == "sent"
    pipe.pump()  # the sweep's envelope finds nothing to claim
    assert smtp_server.data_attempts == 0 and pipe.task(task_id).try_count == 1


# --- 2. a try counts when its attempt starts --------------------------------------------------------


def test_a_slow_tenant_does_not_spend_another_tenants_tries(pipe, fast_ctx):
    """B's mails, each on its last try, wait while A's server trickles every reply (each byte well
    within SMTP_TIMEOUT). Before: they were claimed with A's in one batch, their tries spent, and once
    the lease ran out behind A the sweep cancelled them ("the worker sending the last try was lost")
    although their server never saw a byte."""
    with TricklingServer(delay=0.03, only=("MAIL", "RCPT", "DATA")) as slow, ScriptedSmtpServer() as fine:
        a = pipe.user(slow, email="a@example.com")
        b = pipe.user(fine, email="b@example.com")
        pipe.enqueue(a, subject="A")
        b_ids = [pipe.enqueue(b, subject=f"B{i}") for i in range(3)]
        with pipe.ctx.engine.begin() as conn:  # each of B's mails has one try left
            conn.execute(sa.text("UPDATE tasks SET try_count = 2 WHERE id = ANY(:ids)"), {"ids": b_ids})
        pipe.hand_off()
        started = time.monotonic()
        stepping = run_in_thread(pipe.sender.step)
        time.sleep(0.5)  # A's conversation is under way
        assert [pipe.task(i).try_count for i in b_ids] == [2, 2, 2]  # not claimed: no try spent
        time.sleep(max(0.0, fast_ctx.settings.lease_seconds + 0.1 - (time.monotonic() - started)))
        report = pipe.sweep()
        stepping.join(20)
        pipe.run_until_settled()
        assert report.cancelled == 0
        assert [pipe.task(i).status for i in b_ids] == ["sent"] * 3
        assert [pipe.task(i).try_count for i in b_ids] == [3, 3, 3]
        assert sorted(m["Subject"] for m in fine.messages) == ["B0", "B1", "B2"]


def test_the_sweep_requeues_a_lost_envelope_of_a_task_whose_last_try_never_started(pipe, smtp_server):
    """Only a try whose attempt started can be lost in flight: a queued task with one try left whose
    envelope was lost gets that try, it is not cancelled as exhausted."""
    user = pipe.user(smtp_server)
    task_id = pipe.enqueue(user)
    with pipe.ctx.engine.begin() as conn:
        conn.execute(sa.text("UPDATE tasks SET try_count = 2 WHERE id = :id"), {"id": task_id})
    pipe.ctx.redis.delete(queue.TASK_LIST)  # its envelope is lost
    time.sleep(pipe.ctx.settings.sweep_leak_window + 0.05)
    report = pipe.sweep()
    assert (report.requeued, report.cancelled) == (1, 0)
    pipe.pump()
    row = pipe.task(task_id)
    assert row.status == "sent" and row.try_count == 3 == pipe.ctx.settings.max_try_count


def test_a_thread_is_not_held_by_one_tenant_while_another_tenants_mail_waits(fast_ctx):
    """Before: a thread sent its claimed batch one mail after another, so B's mails waited behind A's
    stuck send (here until SMTP_TIMEOUT, 5 s) while the other threads were free."""
    settings = fast_ctx.settings.replace(worker_count=4, lease_seconds=10, smtp_timeout=5)
    with ScriptedSmtpServer() as slow, ScriptedSmtpServer() as fine:
        pipe = Pipeline(fast_ctx)
        a = pipe.user(slow, email="a@example.com")
        b = pipe.user(fine, email="b@example.com")
        pipe.enqueue(a, subject="A")
        b_ids = [pipe.enqueue(b, subject=f"B{i}") for i in range(5)]
        slow.gate.clear()
        pipe.hand_off()
        sender = Sender(settings, fast_ctx.engine, fast_ctx.redis, Mailer(settings), fast_ctx.box)
        running = run_in_thread(sender.run)
        try:
            # The server has a mail before the sender reads its 250 and records it: wait for both.
            wait_for(
                lambda: len(fine.messages) == 5 and {pipe.task(i).status for i in b_ids} == {"sent"},
                what="B's five mails, sent and recorded",
            )
            assert slow.in_data == 1  # A's mail is still hanging in DATA
        finally:
            slow.gate.set()
            sender.stopping.set()
            running.join(20)
            pipe.close()


# --- 3. nothing a server does can block the heartbeat ----------------------------------------------


def test_the_heartbeat_keeps_beating_while_a_server_drags_out_its_goodbye(fast_ctx):
    """Before: idle connections were closed on the heartbeat thread, politely waiting for the reply
    to QUIT; a trickled 221- held it for seconds and the heartbeat key expired."""
    settings = fast_ctx.settings.replace(smtp_idle_seconds=0.2, worker_count=2, heartbeat_ttl=2)
    with SlowGoodbyeServer(delay=0.2) as server:
        pipe = Pipeline(fast_ctx)
        user = pipe.user(server)
        pipe.enqueue(user)
        pipe.consumer.step(0.1)
        sender = Sender(settings, fast_ctx.engine, fast_ctx.redis, Mailer(settings), fast_ctx.box)
        running = run_in_thread(sender.run)
        try:
            wait_for(lambda: len(server.messages) == 1, what="the mail")
            key = queue.heartbeat_key(sender.id)
            ttls = []
            for _ in range(25):  # 5 s: the pooled connection goes idle and is closed meanwhile
                ttls.append(fast_ctx.redis.ttl(key))
                time.sleep(0.2)
            assert min(ttls) > 0, ttls
            assert server.count("QUIT") == 1  # the idle connection was closed (without waiting)
        finally:
            sender.stopping.set()
            running.join(20)
            pipe.close()


# --- 4. a settings change leaves every task on a path to a final state -----------------------------


def test_lowering_max_try_count_ends_tasks_that_have_no_try_left(pipe, smtp_server):
    """Before: a failed or queued task with try_count >= the new maximum was pushed every leak
    window, dropped by every sender, never sent and never cancelled."""
    user = pipe.user(smtp_server)
    failed, queued = pipe.enqueue(user), pipe.enqueue(user)
    with pipe.ctx.engine.begin() as conn:
        conn.execute(
            sa.text(
                "UPDATE tasks SET status = 'failed', try_count = 2, next_attempt_at = now() WHERE id = :id"
            ),
            {"id": failed},
        )
        conn.execute(sa.text("UPDATE tasks SET try_count = 2 WHERE id = :id"), {"id": queued})
    pipe.ctx.settings = pipe.ctx.settings.replace(max_try_count=2)
    pipe.consumer.settings = pipe.sender.settings = pipe.ctx.settings
    report = pipe.sweep()
    pipe.pump()
    assert report.cancelled == 1
    for task_id in (failed, queued):
        row = pipe.task(task_id)
        assert row.status == "cancelled" and "no tries left" in row.last_error
    assert smtp_server.data_attempts == 0


# --- 5. a worker fault is not a mail fault ----------------------------------------------------------


def test_a_password_no_key_decrypts_pauses_its_account_until_a_key_does(pipe, smtp_server):
    """Before: a sender without the key that encrypted the SMTP password cancelled the mail on try 1
    ("internal error: ConfigError"); later it gave the claim back and stopped taking anyone's work for
    a while (issue 21: one such account slowed every tenant). Now the account pauses (nothing claimed,
    no try spent, the sender not faulted), and the sweep, which has the deployment's keys, resumes it
    once a key decrypts the password again (a key restored, or a sender that had lost it)."""
    user = pipe.user(smtp_server)
    task_id = pipe.enqueue(user)
    pipe.consumer.step(0.1)
    keyless = Sender(
        pipe.ctx.settings, pipe.ctx.engine, pipe.ctx.redis, pipe.mailer, SecretBox((generate_key(),))
    )
    assert keyless.step(0.1) == [Outcome.PAUSED]
    row = pipe.task(task_id)
    assert row.status == "queued" and (row.try_count, row.budget_base) == (0, 0)  # nothing claimed
    assert not keyless.faulted()  # the account's condition, not the sender's
    me = users.get_user(pipe.ctx, user.id, user.id)
    assert me["smtp_state"]["state"] == "paused" and me["smtp_state"]["reason"] == "key"
    assert pipe.sender.step(0.1) == []  # paused for every sender
    assert pipe.sweep().resumed == 1  # this deployment's keys read it: resumed
    assert pipe.sender.step(0.1) == [Outcome.SENT]
    assert len(smtp_server.received) == 1 and pipe.task(task_id).try_count == 1


def test_rotate_keys_re_encrypts_every_smtp_password_so_the_old_key_can_go(pipe, smtp_server):
    old_key, new_key = pipe.ctx.settings.encryption_keys[0], generate_key()
    owners = [
        pipe.user(smtp_server, email=f"u{i}@example.com", **{"smtp-password": f"pw{i}"}) for i in range(3)
    ]
    both = SecretBox((new_key, old_key))
    assert keys.rotate_keys(pipe.ctx.engine, both).rewritten == 3
    assert keys.rotate_keys(pipe.ctx.engine, both).rewritten == 0  # nothing left to do the second time
    only_new = SecretBox((new_key,))
    with pipe.ctx.engine.connect() as conn:
        stored = dict(conn.execute(sa.text("SELECT id, smtp_password_enc FROM users")).all())
    assert {only_new.decrypt(stored[u.id]) for u in owners} == {"pw0", "pw1", "pw2"}


# --- 6. the sweep does not multiply a backlog ------------------------------------------------------


def test_sweeping_a_long_backlog_does_not_multiply_it(pipe, smtp_server):
    """Before: each pass pushed every queued task older than the leak window again, although its
    envelope was still waiting: 100 -> 200 -> 300 -> 400 (and KEDA scaled to its maximum)."""
    user = pipe.user(smtp_server)
    ids = [pipe.enqueue(user) for _ in range(100)]
    pipe.hand_off()  # every envelope waits for a sender that is not running
    assert sum(envelopes_in_redis(pipe.ctx.redis).values()) == 100
    for _ in range(3):
        time.sleep(pipe.ctx.settings.sweep_leak_window + 0.05)
        assert pipe.sweep().requeued == 100  # they are old enough to be pushed again...
        counts = envelopes_in_redis(pipe.ctx.redis)
        assert sum(counts.values()) == 100 and set(counts) == {queue.encode(i) for i in ids}  # ...but once


# --- 7. PostgreSQL refusing connections is "unavailable" ------------------------------------------


class TcpToUnix:
    """Forwards 127.0.0.1:<port> to PostgreSQL's unix socket, so a client talks to it over TCP as in
    production (over a unix socket pg8000 meets a refused connection as a broken pipe before it
    reads the server's 53300, which the old code already took for "unavailable")."""

    def __init__(self, unix_path: str):
        import socket

        self.unix_path = unix_path
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        run_in_thread(self._accept)

    def _accept(self) -> None:
        import socket

        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.socket(socket.AF_UNIX)
            server.connect(self.unix_path)
            for a, b in ((client, server), (server, client)):
                run_in_thread(lambda a=a, b=b: self._pump(a, b))

    @staticmethod
    def _pump(source, target) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                try:
                    sock.shutdown(2)
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()


@pytest.fixture()
def limited_url(pg_url):
    """A role allowed one connection, reached over TCP: the second connection meets SQLSTATE 53300,
    as a server at max_connections answers."""
    engine = make_engine(pg_url)
    with engine.begin() as conn:
        conn.execute(sa.text("DROP ROLE IF EXISTS mailq_limited"))
        conn.execute(sa.text("CREATE ROLE mailq_limited LOGIN CONNECTION LIMIT 1"))
        conn.execute(sa.text("GRANT ALL ON ALL TABLES IN SCHEMA public TO mailq_limited"))
        conn.execute(sa.text("GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO mailq_limited"))
    forwarder = TcpToUnix(pg_url.split("unix_sock=", 1)[1])
    yield f"postgresql+pg8000://mailq_limited@127.0.0.1:{forwarder.port}/postgres"
    forwarder.close()
    with engine.begin() as conn:
        conn.execute(
            sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'mailq_limited'")
        )
        conn.execute(sa.text("REVOKE ALL ON ALL TABLES IN SCHEMA public FROM mailq_limited"))
        conn.execute(sa.text("REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM mailq_limited"))
        conn.execute(sa.text("DROP ROLE mailq_limited"))
    engine.dispose()


def test_too_many_connections_is_a_503_not_a_500(api, env, limited_url, monkeypatch, user_token):
    """Before: 53300 was not "unavailable": the API answered 500 and a sender gave up recording."""
    from functions import http

    _, token = user_token
    holder = make_engine(limited_url)
    with holder.connect() as held:  # the role's one connection is taken
        held.execute(sa.text("SELECT 1"))
        with pytest.raises(sa.exc.DBAPIError) as refused:
            with make_engine(limited_url).connect():
                pass
        assert "53300" in str(refused.value.orig)  # the real refusal, as production sees it
        assert is_unavailable(refused.value)  # the sender's record() retries exactly these
        monkeypatch.setenv("DATABASE_URL", limited_url)
        http.reset_context()
        response = api.post(
            "/api/v1/task/enqueue",
            json={"recipient_email": "bob@example.org", "subject": "s", "body": "b"},
            headers={"Authorization": f"Bearer {token}"},
        )
    holder.dispose()
    http.reset_context()
    assert response.status_code == 503, response.get_json()
    assert response.get_json()["dependency"] == "postgresql" and response.headers["Retry-After"]


# --- 8. clocks -----------------------------------------------------------------------------------


def pg_now(ctx) -> datetime:
    with ctx.engine.connect() as conn:
        return conn.execute(sa.text("SELECT now()")).scalar_one()


def test_whether_a_mail_is_due_is_decided_on_postgresqls_clock(pipe):
    """Before: the API's clock decided: an API pod an hour ahead queued a mail scheduled in 30 min."""
    with ScriptedSmtpServer() as server:
        user = pipe.user(server)
        pipe.ctx.now = lambda: datetime.now(UTC) + timedelta(hours=1)  # this pod's clock runs ahead
        at = pg_now(pipe.ctx) + timedelta(minutes=30)
        result, _ = enqueue.enqueue(
            pipe.ctx,
            user.id,
            {"recipient_email": "b@example.org", "subject": "s", "body": "b", "scheduled_at": at.isoformat()},
            None,
        )
    assert result["status"] == "scheduled"
    assert pipe.task(result["task_id"]).next_attempt_at == at


def test_a_retry_time_comes_from_postgresqls_clock_not_the_senders(pipe):
    """Before: next_attempt_at = the sender's clock + backoff: a sender an hour behind made the retry
    due at once (and one ahead postponed it by an hour)."""
    with ScriptedSmtpServer(["451 4.3.0 later"]) as server:
        user = pipe.user(server)
        task_id = pipe.enqueue(user)
        pipe.sender.now = lambda: datetime.now(UTC) - timedelta(hours=1)  # this pod's clock is behind
        pipe.pump()
        before = pg_now(pipe.ctx)
    row = pipe.task(task_id)
    assert row.status == "failed"
    s = pipe.ctx.settings
    assert (
        before - timedelta(seconds=1)
        <= row.next_attempt_at
        <= before + timedelta(seconds=s.retry_backoff_max)
    )


# --- 11. refused credentials pause the account ----------------------------------------------------


def test_refused_credentials_pause_the_account_until_its_smtp_settings_change(pipe, api, env):
    """Before: every queued mail of the account tried to log in again (two AUTHs each) and was
    cancelled; providers lock accounts and block the sending IP other tenants share after such runs."""
    with ScriptedSmtpServer(auth=lambda u, p: p == "right") as server:
        from tests.conftest import auth_header, login, register_user

        user = register_user(api, smtp_host=server.host, smtp_port=server.port, **{"smtp-password": "wrong"})
        token = login(api)
        ids = [
            api.post(
                "/api/v1/task/enqueue",
                json={"recipient_email": "b@example.org", "subject": f"s{i}", "body": "b"},
                headers=auth_header(token),
            ).get_json()["task_id"]
            for i in range(3)
        ]
        outcomes = pipe.pump()
        assert outcomes.count(Outcome.PAUSED) >= 1 and Outcome.CANCELLED not in outcomes
        assert len(server.logins) == 1  # one refused login for the whole account, not one per mail
        me = api.get(f"/api/v1/user/{user['id']}", headers=auth_header(token)).get_json()
        assert me["smtp_paused_at"] and "535" in me["smtp_paused_reason"]
        assert "wrong" not in me["smtp_paused_reason"]
        for task_id in ids:
            row = pipe.task(task_id)
            assert row.status == "queued" and row.try_count - row.budget_base == 0
        assert ids[0] in [
            t["id"] for t in api.get("/api/v1/task/queue", headers=auth_header(token)).get_json()["items"]
        ]
        time.sleep(pipe.ctx.settings.sweep_leak_window + 0.05)
        pipe.sweep()
        assert pipe.pump() == [] and len(server.logins) == 1  # still paused: nobody tries again

        fixed = api.patch(
            f"/api/v1/user/{user['id']}", json={"smtp-password": "right"}, headers=auth_header(token)
        )
        assert fixed.status_code == 200 and fixed.get_json()["smtp_paused_at"] is None
        pipe.pump()
        assert sorted(m["Subject"] for m in server.messages) == ["s0", "s1", "s2"]
        assert {pipe.task(i).status for i in ids} == {"sent"}


def test_a_pause_from_the_old_credentials_does_not_stick_to_new_ones(pipe, smtp_server):
    """A send with the old password is refused after the user already fixed it: no pause."""
    user = pipe.user(smtp_server)
    task_id = pipe.enqueue(user)
    account = pipe.sender.accounts.read(user.id)  # as the send that is refused knew it
    claim = pipe.sender.claim(task_id)
    users.update_smtp(pipe.ctx, user.id, user.id, {"smtp-username": "changed"})
    outcome = pipe.sender.pause_account(
        account, PauseReason.CREDENTIALS, "535 refused", None, task_id, claim=claim
    )
    assert outcome == Outcome.PAUSED
    with pipe.ctx.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT smtp_paused_at FROM users")).scalar_one() is None
    assert pipe.ctx.redis.sismember(queue.PAUSED, user.id) == 0


def test_the_sweep_resumes_an_account_whose_resume_did_not_reach_redis(pipe, smtp_server):
    """PostgreSQL says resumed (the PATCH committed) but Redis kept the pause: the sweep lets go of it."""
    user = pipe.user(smtp_server)
    task_id = pipe.enqueue(user)
    SendQueue(pipe.ctx.redis).pause(user.id)  # what a PATCH whose resume found Redis down leaves behind
    assert pipe.pump() == [Outcome.HANDED_OFF]  # the mail waits behind the stale pause
    assert pipe.sweep().resumed == 1
    assert pipe.pump() == [Outcome.SENT] and pipe.task(task_id).status == "sent"


# --- fairness and the per-account cap ---------------------------------------------------------------


def test_a_quiet_tenants_mail_is_not_queued_behind_another_tenants_backlog(pipe, fast_ctx):
    """Before: one FIFO for everybody: B's single mail waited until A's backlog had drained."""
    pipe.sender.settings = fast_ctx.settings.replace(worker_count=4)
    with ScriptedSmtpServer() as a_server, ScriptedSmtpServer() as b_server:
        a = pipe.user(a_server, email="a@example.com")
        b = pipe.user(b_server, email="b@example.com")
        pipe.established(a)
        for _ in range(60):
            pipe.enqueue(a)
        b_task = pipe.enqueue(b, subject="password reset")
        pipe.hand_off()
        outcomes = pipe.sender.step(0.1)
        assert len(outcomes) == 4  # A's turn (its three slots) and B's turn
        assert pipe.task(b_task).status == "sent" and len(b_server.messages) == 1


def test_an_account_never_has_more_conversations_than_its_cap_across_senders(fast_ctx):
    """Mails arrive one by one while two senders with eight threads each are idle: without the cap
    each new mail would start a conversation of its own (before: six at once)."""
    settings = fast_ctx.settings.replace(worker_count=8, lease_seconds=10)
    assert settings.smtp_max_connections_per_account == 3
    with ScriptedSmtpServer() as server:
        server.delay = 0.3
        pipe = Pipeline(fast_ctx)
        user = pipe.user(server)
        senders = [
            Sender(settings, fast_ctx.engine, fast_ctx.redis, Mailer(settings), fast_ctx.box)
            for _ in range(2)
        ]
        threads = [run_in_thread(s.run) for s in senders]
        try:
            for _ in range(12):
                pipe.enqueue(user)
                pipe.consumer.step(0.05)
                time.sleep(0.05)
            wait_for(lambda: len(server.messages) == 12, timeout=20, what="twelve mails")
        finally:
            for s in senders:
                s.stopping.set()
            for t in threads:
                t.join(20)
            pipe.close()
    assert server.max_in_data == 3  # sixteen threads free, three conversations: the cap, fully used


def test_the_slot_of_a_killed_sender_frees_itself(pipe, smtp_server):
    user = pipe.user(smtp_server)
    pipe.established(user)
    for _ in range(4):
        pipe.enqueue(user)
    pipe.hand_off()
    held = pipe.sender.take(10)
    assert len(held) == 3  # the cap; and then this sender "dies" holding all three slots
    other = Pipeline(pipe.ctx)
    assert other.sender.take(10) == []
    time.sleep(pipe.ctx.settings.lease_seconds + 0.1)  # a slot lives no longer than the lease
    [taken] = other.sender.take(10)
    assert other.sender.handle(taken) == Outcome.SENT
    other.close()


def test_a_finished_conversation_frees_its_slot_at_once(pipe, smtp_server):
    user = pipe.user(smtp_server)
    pipe.established(user)
    for _ in range(4):
        pipe.enqueue(user)
    pipe.hand_off()
    assert pipe.sender.step(0) == [Outcome.SENT] * 3  # the cap: the fourth waits for a slot...
    assert pipe.sender.step(0) == [Outcome.SENT]  # ...freed by the three finished ones, not their lease


def test_redis_holds_tenant_ids_and_envelopes_only(pipe, smtp_server):
    user = pipe.user(smtp_server)
    pipe.enqueue(user, body="a secret body", subject="a secret subject")
    pipe.consumer.step(0.1)
    pipe.sender.take(1)
    dump = repr({k: pipe.ctx.redis.dump(k) for k in pipe.ctx.redis.scan_iter("*")})
    assert "secret" not in dump and "example" not in dump and "127.0.0.1" not in dump
    assert f"mailq:slots:{user.id}" in dump


@pytest.fixture()
def smtp_server():
    with ScriptedSmtpServer() as server:
        yield server


# --- what a failure leaves behind ------------------------------------------------------------------


def test_envelopes_not_yet_started_are_given_back_when_a_step_fails_part_way(pipe, smtp_server, monkeypatch):
    """Issue 15's survivor: a step that fails after its first mail must not leave the others in its
    processing list (holding their slots) until the sweep or a restart."""
    users = [pipe.user(smtp_server, email=f"t{i}@example.com") for i in range(3)]
    ids = [pipe.enqueue(u) for u in users]
    pipe.hand_off()
    real_handle, calls = pipe.sender.handle, []

    def handle_then_fail(item):  # a fault no server can provoke: the step itself breaks
        calls.append(item)
        if len(calls) == 2:
            raise RuntimeError("the step broke")
        return real_handle(item)

    monkeypatch.setattr(pipe.sender, "handle", handle_then_fail)
    with pytest.raises(RuntimeError):
        pipe.sender.step(0.1)
    processing = pipe.ctx.redis.lrange(pipe.sender.processing, 0, -1)
    assert processing == [calls[1].raw]  # only the one that broke is still held
    third = next(i for i in ids if queue.encode(i) not in (calls[0].raw, calls[1].raw))
    waiting = pipe.ctx.redis.zrange(queue.send_queue(pipe.task(third).user_id), 0, -1)
    assert waiting == [queue.encode(third)] and pipe.task(third).try_count == 0


def test_a_paused_account_is_not_claimed_even_when_redis_forgot_the_pause(pipe):
    """PostgreSQL is the source of truth: a Redis that restarted empty must not let a paused
    account's mail try the refused credentials again."""
    with ScriptedSmtpServer(auth=lambda u, p: p == "right") as server:
        user = pipe.user(server, **{"smtp-username": "ada", "smtp-password": "wrong"})
        first, second = pipe.enqueue(user), pipe.enqueue(user)
        pipe.pump()
        assert len(server.logins) == 1
        pipe.ctx.redis.flushall()  # the pause (and every envelope) is gone from Redis
        time.sleep(pipe.ctx.settings.sweep_leak_window + 0.05)
        pipe.sweep()
        assert Outcome.PAUSED in pipe.pump()
        assert len(server.logins) == 1 and pipe.ctx.redis.sismember(queue.PAUSED, user.id)
        assert {pipe.task(first).status, pipe.task(second).status} == {"queued"}


def test_a_claim_refused_for_a_pause_the_sender_did_not_know_of_leaves_the_mail_queued(pipe, smtp_server):
    """The sender's cached account and pooled connection say "go", PostgreSQL says "paused" (the pause
    came from another sender): the claim refuses, and the mail, with all its tries left, waits."""
    user = pipe.user(smtp_server)
    pipe.enqueue(user)
    assert Outcome.SENT in pipe.pump()  # the account cached, its connection pooled
    task_id = pipe.enqueue(user)
    with pipe.ctx.engine.begin() as conn:
        conn.execute(sa.text("UPDATE users SET smtp_paused_at = now() WHERE id = :u"), {"u": user.id})
    assert Outcome.PAUSED in pipe.pump()
    row = pipe.task(task_id)
    assert row.status == "queued" and row.try_count == 0, row.last_error
    assert len(smtp_server.received) == 1


def test_a_worker_fault_never_lowers_the_try_count(pipe, smtp_server):
    """The try count is the fencing token: a claim given back raises the budget instead."""
    user = pipe.user(smtp_server)
    task_id = pipe.enqueue(user)
    pipe.consumer.step(0.1)
    claim = pipe.sender.claim(task_id)  # and then the sender meets a fault of its own (PostgreSQL gone)
    assert pipe.sender._give_back_claim(claim, None, None) == Outcome.RELEASED  # noqa: SLF001
    row = pipe.task(task_id)
    assert (row.try_count, row.budget_base) == (1, 1)
    assert pipe.sender.faulted()  # a worker fault: this sender backs off
    pipe.sender._fault_until = 0.0  # noqa: SLF001 - and is over it
    pipe.sender.step(0.1)
    row = pipe.task(task_id)
    assert row.status == "sent" and (row.try_count, row.budget_base) == (2, 1)


def test_another_users_smtp_settings_cannot_be_changed(api, env):
    from tests.conftest import auth_header, login, register_user

    ada = register_user(api)
    bob = register_user(api, email="bob@example.com")
    token = login(api, email="bob@example.com")
    answer = api.patch(
        f"/api/v1/user/{ada['id']}", json={"smtp_host": "evil.example"}, headers=auth_header(token)
    )
    assert answer.status_code == 404
    moved = {"smtp_port": 2525, "smtp-password": "smtp-secret-pw"}  # a move takes the password along
    mine = api.patch(f"/api/v1/user/{bob['id']}", json=moved, headers=auth_header(token))
    assert mine.status_code == 200 and mine.get_json()["smtp_port"] == 2525
    assert (
        api.get(f"/api/v1/user/{ada['id']}", headers=auth_header(login(api))).get_json()["smtp_host"]
        == "127.0.0.1"
    )


def test_a_worker_stays_live_while_redis_refuses_its_heartbeat(fast_ctx, tmp_path):
    """Liveness means "this process is not wedged", not "Redis is up": a Redis that refuses every
    command (here: a password it starts requiring) must not stop the liveness file's updates."""
    from shared.delivery.consumer import Consumer

    settings = fast_ctx.settings.replace(heartbeat_ttl=3, heartbeat_file=str(tmp_path / "beat"))
    consumer = Consumer(settings, fast_ctx.engine, make_redis(settings.redis_url))
    running = run_in_thread(consumer.run)
    beat = tmp_path / "beat"
    try:
        wait_for(beat.exists, what="the first heartbeat")
        fast_ctx.redis.config_set("requirepass", "now-you-need-this")
        # A password binds only new connections: the worker's are cut, so every command it sends from
        # here on is refused (its connections from before would otherwise go on being served).
        fast_ctx.redis.client_kill_filter(_type="normal", skipme=True)
        time.sleep(0.1)  # a heartbeat that got through before the cut is over
        before = beat.stat().st_mtime
        time.sleep(2.5)  # more than two heartbeats (every TTL/3 = 1 s)
        assert beat.stat().st_mtime > before
    finally:
        import redis

        admin = redis.Redis.from_url(settings.redis_url, password="now-you-need-this")
        admin.config_set("requirepass", "")
        admin.close()
        consumer.stopping.set()
        running.join(20)


def test_a_worker_waiting_for_redis_at_start_stays_live(fast_ctx, tmp_path):
    """The probe reads the liveness file: a worker that starts while Redis is down must keep touching
    it, or the probe restarts the pod over and over for another service's outage."""
    from shared.delivery.consumer import Consumer
    from shared.local.embedded import free_port

    beat = tmp_path / "beat"
    nowhere = make_redis(f"redis://127.0.0.1:{free_port()}/0", socket_timeout=0.5)
    consumer = Consumer(fast_ctx.settings.replace(heartbeat_file=str(beat)), fast_ctx.engine, nowhere)
    running = run_in_thread(consumer.run)
    try:
        wait_for(beat.exists, timeout=3, what="the liveness file")
        first = beat.stat().st_mtime_ns
        wait_for(lambda: beat.stat().st_mtime_ns > first, timeout=3, what="the liveness file touched again")
        assert running.is_alive()  # still waiting for Redis
    finally:
        consumer.stopping.set()
        running.join(20)
