"""A transient failure is retried after its backoff, read from the recorded ``next_attempt_at`` rather
than from gaps between polls. The base is long (100 s), so the window each try must land in (equal
jitter: half to all of base * 2^(try-1)) is far wider than anything the test itself takes; the clock
is moved forward by making the failed row due, not by waiting."""

from __future__ import annotations

from datetime import timedelta

import pytest
import sqlalchemy as sa

from shared.workers import Outcome
from tests.pipeline import Pipeline
from tests.smtp_servers import ScriptedSmtpServer

BASE, CAP = 100.0, 1000.0
SLACK = timedelta(seconds=1)  # the worker's and PostgreSQL's clocks are the same machine's


@pytest.fixture()
def pipe(ctx):
    ctx.settings = ctx.settings.replace(retry_backoff_base=BASE, retry_backoff_max=CAP, max_try_count=3)
    p = Pipeline(ctx)
    yield p
    p.close()


def db_now(pipe):
    with pipe.ctx.engine.connect() as conn:
        return conn.execute(sa.text("SELECT now()")).scalar_one()


def test_each_retry_waits_its_exponential_backoff_and_not_a_moment_less(pipe):
    with ScriptedSmtpServer(["451 4.3.0 busy", "451 4.3.0 busy", "250 OK"]) as smtp:
        user = pipe.user(smtp)
        task_id = pipe.enqueue(user)
        for try_count in (1, 2):
            before = db_now(pipe)
            assert Outcome.FAILED in pipe.pump()
            after = db_now(pipe)
            row = pipe.task(task_id)
            assert row.status == "failed" and row.try_count == try_count
            delay = BASE * 2 ** (try_count - 1)
            earliest, latest = before + timedelta(seconds=delay / 2), after + timedelta(seconds=delay)
            assert earliest - SLACK <= row.next_attempt_at <= latest + SLACK, (try_count, row.next_attempt_at)
            assert pipe.sweep().requeued == 0  # not due: nothing goes back early
            with pipe.ctx.engine.begin() as conn:  # the clock jumps to the retry time
                conn.execute(
                    sa.text("UPDATE tasks SET next_attempt_at = now() WHERE id = :id"), {"id": task_id}
                )
            assert pipe.sweep().requeued == 1
        assert pipe.pump()[-1] == Outcome.SENT
        assert smtp.data_attempts == 3 and len(smtp.received) == 1
