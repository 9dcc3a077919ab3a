"""Real `mailq sender` / `mailq consumer` processes: SIGKILL after a claim, SIGTERM mid-run."""

from __future__ import annotations

import collections
import signal
import subprocess
import sys
import time

import pytest
import sqlalchemy as sa

from shared import queue
from tests.hostile_smtp import SilentServer
from tests.pipeline import Pipeline
from tests.smtp_servers import ScriptedSmtpServer

WORKER_ENV = {"TASK_LEASE_SECONDS": "2", "WORKER_HEARTBEAT_TTL": "2", "LOG_LEVEL": "WARNING"}


def start(command: str, env: dict, tmp_path, **extra) -> subprocess.Popen:
    full = {**env, **WORKER_ENV, "MAILQ_HEARTBEAT_FILE": str(tmp_path / f"{command}.beat"), **extra}
    full["PATH"] = "/usr/bin:/bin"
    return subprocess.Popen([sys.executable, "-m", "functions.cli", command], env=full)


def wait_for(predicate, timeout: float = 15.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture()
def pipe(ctx):
    ctx.settings = ctx.settings.replace(lease_seconds=2, heartbeat_ttl=2, sweep_leak_window=1)
    p = Pipeline(ctx)
    yield p
    p.close()


def test_a_sender_killed_after_claiming_is_recovered_by_the_sweep(pipe, base_env, tmp_path):
    # The server greets and answers EHLO (the sender opens the connection before it claims), then goes quiet
    # at MAIL FROM: the sender is stuck mid-send with the task claimed.
    silent = SilentServer("MAIL").start()
    with ScriptedSmtpServer() as smtp:
        user = pipe.user(silent)
        task_id = pipe.enqueue(user)
        pipe.consumer.step(0.1)  # handed to the senders
        sender = start("sender", base_env, tmp_path)
        try:
            wait_for(lambda: pipe.task(task_id).status == "processing", what="the claim")
            sender.send_signal(signal.SIGKILL)
            sender.wait(10)
        finally:
            if sender.poll() is None:
                sender.kill()
        silent.stop()
        with pipe.ctx.engine.begin() as conn:  # the account's server is reachable again
            conn.execute(sa.text("UPDATE users SET smtp_port = :p"), {"p": smtp.port})
        time.sleep(2.2)  # past the lease and the heartbeat TTL
        report = pipe.sweep()
        assert report.requeued == 1 and report.rescued == 1 and report.dead_workers == 1
        pipe.pump()
        row = pipe.task(task_id)
        assert row.status == "sent" and row.try_count == 2
        assert len(smtp.received) == 1


def test_sigterm_stops_a_busy_sender_cleanly_and_loses_nothing(pipe, base_env, tmp_path):
    with ScriptedSmtpServer() as smtp:
        user = pipe.user(smtp)
        ids = [pipe.enqueue(user, subject=f"m{i}") for i in range(600)]
        pipe.hand_off()
        sender = start("sender", base_env, tmp_path, WORKER_COUNT="4")
        try:
            wait_for(lambda: len(smtp.received) >= 30, what="the sender to get going")
            sender.send_signal(signal.SIGTERM)
            assert sender.wait(20) == 0
        finally:
            if sender.poll() is None:
                sender.kill()
        statuses = pipe.statuses()
        assert set(statuses.values()) <= {"sent", "queued"}, collections.Counter(statuses.values())
        unsent = sorted(i for i, s in statuses.items() if s == "queued")
        assert unsent, "the sender finished everything before SIGTERM; the test proves nothing"
        # everything it did not send waits in its tenant's queue, and it left nothing registered
        back = sorted(queue.decode(e) for e in pipe.ctx.redis.zrange(queue.send_queue(user.id), 0, -1))
        assert back == unsent
        assert all(pipe.task(i).try_count == 0 for i in unsent)  # no try spent on what was not sent
        assert pipe.ctx.redis.zcard(queue.slots(user.id)) == 0  # and it kept no conversation slot
        assert pipe.ctx.redis.hlen(queue.WORKERS) == 0
        assert not [k for k in pipe.ctx.redis.keys("mailq:processing:*")]
        pipe.pump()
        assert set(pipe.statuses().values()) == {"sent"}
        counts = collections.Counter(m["Message-ID"] for m in smtp.messages)
        assert len(counts) == len(ids) and max(counts.values()) == 1


def test_sigterm_stops_an_idle_consumer_with_exit_code_0(base_env, tmp_path, clean):
    consumer = start("consumer", base_env, tmp_path)
    try:
        wait_for(lambda: (tmp_path / "consumer.beat").exists(), what="the first heartbeat")
        consumer.send_signal(signal.SIGTERM)
        assert consumer.wait(10) == 0
    finally:
        if consumer.poll() is None:
            consumer.kill()


def test_the_sweep_command_runs_one_pass_and_exits(base_env, tmp_path, clean):
    result = subprocess.run(
        [sys.executable, "-m", "functions.cli", "sweep"],
        env={**base_env, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("requeued 0, rescued 0")
