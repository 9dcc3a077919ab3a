"""Fault runs, short: hundreds of tasks through real mailq processes while workers are SIGKILLed, Redis and
PostgreSQL restart and the SMTP server misbehaves; then the audit (tests/chaos/audit.py). `make chaos` runs
the same scenarios with thousands of tasks. The last tests pin down bugs the fault runs found."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from urllib.parse import parse_qs, urlparse

import pytest
import sqlalchemy as sa

from shared import queue
from shared.config import Settings
from shared.context import Context, make_redis
from shared.crypto import SecretBox
from shared.db import is_unavailable, make_engine
from shared.delivery.sender import Sender
from shared.local.embedded import EmbeddedRedis, free_port
from shared.workers import Outcome
from tests.chaos import faultproxy, hostile_api, network, relays, scenarios, tenants
from tests.chaos.audit import wait_settled
from tests.chaos.client import Client, Enqueuer, make_accounts
from tests.chaos.stack import Stack, wait_beat
from tests.conftest import TEST_ENV
from tests.pipeline import Pipeline
from tests.smtp_servers import ScriptedSmtpServer

MAIL = {"recipient_email": "bob@example.org", "subject": "Hi", "body": "Hello Bob"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    import tempfile
    from pathlib import Path

    # Not under pytest's tmp dir (mode 0700): pgserver runs postgres as another user when we are root.
    workdir = Path(tempfile.mkdtemp(prefix="mailq-chaos-test-"))
    s = Stack(workdir, api_workers=2, api_threads=4)
    try:
        s.start()
        yield s
    finally:
        s.close()
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)


def assert_clean(result: scenarios.Result, ignore: tuple[str, ...] = ()) -> None:
    problems = [p for p in result.problems if not p.startswith(ignore)]
    assert not problems, result.summary()
    assert result.tasks == result.audit.accepted and result.audit.lost == 0
    assert result.audit.sent + result.audit.cancelled == result.tasks


# --- the scenarios, short ----------------------------------------------------------------------------


def test_sigkilled_senders_lose_nothing_and_duplicate_only_what_a_kill_cut_off(stack):
    # Paced enqueue (80/s): unpaced, 250 tasks can drain before a second kill lands.
    result = scenarios.sender_kills(
        stack, 250, every=(0.6, 1.0), max_kills=4, rate=80, settings={"WORKER_COUNT": 2}
    )
    assert_clean(result)
    assert result.figures["kills"] >= 2
    assert result.audit.duplicates <= result.figures["tasks accepted by SMTP but not recorded"]
    assert result.audit.sent == result.tasks


def test_sigkilled_consumers_lose_nothing_and_duplicate_nothing(stack):
    result = scenarios.consumer_kills(
        stack, 250, every=(0.5, 0.9), max_kills=3, rate=80, settings={"QUEUE_CONSUMER_COUNT": 2}
    )
    assert_clean(result)
    assert result.figures["kills"] >= 2
    assert result.audit.duplicates == 0 and result.audit.sent == result.tasks


def test_redis_restarted_empty_mid_run_loses_nothing(stack):
    result = scenarios.redis_restart(stack, 250, at=0.2, downtime=1.0, settings={"WORKER_COUNT": 1})
    assert_clean(result)
    assert result.figures["sweep requeued"] > 0  # the sweep, not luck, brought the work back
    assert result.audit.duplicates == 0 and result.audit.sent == result.tasks


def test_postgresql_restarted_mid_run_answers_503_and_loses_nothing(stack):
    result = scenarios.postgres_restart(
        stack, 250, at=0.3, downtime=2.0, rate=60, leak_window=5, settings={"WORKER_COUNT": 2}
    )
    assert_clean(result)
    assert result.figures["answers while down"].get(503, 0) > 0
    assert result.audit.duplicates == 0
    assert result.audit.sent == result.tasks


def test_every_task_ends_as_the_flaky_servers_log_justifies(stack):
    result = scenarios.flaky_smtp(stack, 200)
    assert_clean(result)
    answers = result.figures["server answers"]
    assert all(answers.get(f, 0) > 0 for f in ("250", "451", "550", "drop_before", "drop_after")), answers
    assert result.audit.cancelled > 0 and result.audit.sent > 0
    # assert_clean included the webhook audit: each task's events exactly as the server's log implies.
    events = result.figures["webhook events"]
    assert events["task.sent"] == result.audit.sent and events["task.cancelled"] == result.audit.cancelled
    assert events["task.deferred"] > 0


def test_many_enqueue_clients_at_once_all_get_202(stack):
    result = scenarios.enqueue_load(stack, 300, clients=16, budget_ms=10_000)
    assert_clean(result)
    assert set(result.enqueue.statuses) == {202}
    assert result.figures["enqueue p50 ms"] > 0 and result.figures["enqueue p99 ms"] > 0


def test_hostile_tenants_neither_hurt_a_well_behaved_one_nor_get_a_mail_twice(stack):
    result = tenants.hostile_tenants(
        stack, 200, hostile_each=5, rate=40, max_tries=2, memory_limit_mib=256, lifetime=15
    )
    assert_clean(result)  # includes: the well-behaved tenant's mails exactly once, memory under the bound
    f = result.figures
    assert f["trickle-replies"] == {"tasks": 5, "sent": 5, "copies": 5}  # slow, inside the deadline
    for never in ("trickle-banner", "flood"):  # the account backs off: no try, expired at the end
        assert f[never] == {"tasks": 5, "cancelled": 5, "copies": 0}, f
        assert "expired" in str(f[f"{never} cancelled because"]), f
    assert f["silent-data"] == {"tasks": 5, "cancelled": 5, "copies": 10}  # one copy per try, explained
    assert f["throttle-421"]["tasks"] == 5 and f["throttle-421"]["copies"] == f["throttle-421"].get("sent", 0)
    assert result.audit.duplicates == 5


def test_a_hostile_api_tenant_neither_balloons_the_api_nor_slows_a_well_behaved_one(stack):
    """Expansion requests and an enqueue flood beside a well-behaved tenant: every expansion a 413, no
    500, the API's memory under the bound its pods are sized from, the well-behaved tenant's p99 bounded
    (generously: the machine is shared) and its mails delivered exactly once."""
    result = hostile_api.hostile_api(stack, 150, rate=30, expanders=2, flooders=2, p99_budget_ms=5000)
    assert_clean(result)
    f = result.figures
    assert f["expansion answers"].get(413, 0) >= 2 and f["flood answers"].get(202, 0) > 0, f
    assert f["API RSS peak MiB"] <= f["API RSS bound MiB"], f


def test_a_bad_network_loses_nothing_and_every_half_open_connection_is_given_up(stack):
    result = network.bad_network(
        stack, 250, rate=10, warmup=2, latency_for=3, blackhole=4, gap=12, settings={"SWEEP_LEAK_WINDOW": 5}
    )
    assert_clean(result)  # includes: every duplicate explained, every half-open connection in use given up
    f = result.figures
    assert f["postgresql: half-open connections"]["in use"] > 0
    assert f["redis: half-open connections"]["in use"] > 0
    assert f["first mail after the blackhole s"] is not None and f["first mail after the reset s"] is not None
    assert f["connections reset"] > 0


def test_a_relay_down_longer_than_the_retry_budget_loses_nothing_and_spends_no_try(stack):
    # 3 tries 0.5 s and 1 s apart: an outage of 6 s outlasts the whole budget four times.
    short = {"RETRY_BACKOFF_BASE": 0.5, "RETRY_BACKOFF_MAX": 1, "ACCOUNT_BACKOFF_MAX": 2}
    result = relays.relay_outage(stack, 120, downtime=6, settings=short)
    assert_clean(result)  # includes: nothing cancelled, no try spent, the webhook audit
    assert result.audit.sent == result.tasks and result.audit.duplicates == 0
    assert result.figures["try_count of the tasks"] == {1: result.tasks}
    assert result.figures["statuses while down"] == {"queued": result.tasks}
    assert result.figures["backoff steps (sender logs)"] > 0


def test_throttling_relays_cancel_nothing_and_refuse_a_bounded_number_of_times(stack):
    result = relays.throttling_relay(stack, 120, settings={"ACCOUNT_BACKOFF_MAX": 5})
    assert_clean(result)  # includes: refusals within about one per rate window, the webhook audit
    assert result.audit.sent == result.tasks and result.audit.cancelled == 0
    assert result.figures["undeclared: refusals"] > 0  # the undeclared relay had to say so, boundedly
    # The declared rate is kept (a 454 only for a MAIL FROM that lagged its take past the allowance on a
    # loaded machine: at most one, or one per hundred mails); a 421 at connect can come from the two sender
    # processes' pooled connections together (docs/relays.md).
    throttled = int(result.figures["declared: 454 throttled / 421 at connect"].split(" / ")[0])
    assert throttled <= max(1, result.tasks // 200), result.figures


# --- bugs the fault runs found -------------------------------------------------------------------------


@contextlib.contextmanager
def postgresql_shutting_down(stack: Stack):
    """PostgreSQL in the middle of a shutdown: new connections get 57P03 "the database system is shutting
    down", and every existing session but ours has been terminated (as a fast shutdown does)."""
    admin = sa.create_engine(stack.database_url, poolclass=sa.pool.NullPool).connect()
    try:
        stack._pg_ctl("-m", "smart", "-W", "stop")  # waits for our session: the shutdown stays pending
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                sa.create_engine(stack.database_url, poolclass=sa.pool.NullPool).connect().close()
            except sa.exc.DBAPIError:
                break
            time.sleep(0.05)
        admin.execute(
            sa.text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'"
            )
        )
        yield
    finally:
        admin.close()
        deadline = time.monotonic() + 30
        while stack.postgres_running() and time.monotonic() < deadline:
            time.sleep(0.1)
        stack.start_postgres()
        stack.engine.dispose()


def test_enqueue_answers_503_not_500_while_postgresql_shuts_down(stack):
    stack.reset()
    account = make_accounts(stack.base_url, 2525, 1, "pg-shutdown")[0]
    client = Client(stack.base_url)
    try:
        with postgresql_shutting_down(stack):
            # A dead pooled connection fails its pre-ping as InterfaceError (503); the reconnect that
            # follows meets 57P03 (500). Twelve requests see both kinds however the pool is laid out.
            replies = [client.call("POST", "/api/v1/task/enqueue", MAIL, account.token) for _ in range(12)]
    finally:
        client.close()
    assert [r.status for r in replies] == [503] * 12, [(r.status, r.body) for r in replies]
    assert all(r.headers["content-type"] == "application/problem+json" for r in replies)


@pytest.fixture()
def pipe_on_stack(stack):
    """The in-process pipeline harness bound to the stack's own PostgreSQL and Redis."""
    stack.reset()
    settings = Settings.from_env(
        {
            **TEST_ENV,
            "DATABASE_URL": stack.database_url,
            "REDIS_URL": stack.redis_url,
            "TASK_LEASE_SECONDS": "2",
        }
    )
    engine = make_engine(stack.database_url)
    ctx = Context(settings, engine, make_redis(stack.redis_url), SecretBox(settings.encryption_keys))
    p = Pipeline(ctx)
    yield p
    p.close()
    ctx.redis.close()
    engine.dispose()


def test_a_sender_records_its_outcome_through_a_postgresql_shutdown(stack, pipe_on_stack):
    pipe = pipe_on_stack
    with ScriptedSmtpServer() as smtp:
        user = pipe.user(smtp)
        real_send = pipe.mailer.send
        comeback: list[threading.Timer] = []

        def send_then_lose_postgresql(account, message, **kwargs):
            reply = real_send(account, message, **kwargs)  # the server has accepted the mail
            outage = postgresql_shutting_down(stack)
            outage.__enter__()
            pipe.ctx.engine.dispose()  # the outcome write needs a new connection
            comeback.append(threading.Timer(2.0, outage.__exit__, (None, None, None)))  # back in ~2 s
            comeback[-1].start()
            return reply

        pipe.mailer.send = send_then_lose_postgresql
        # A connection attempt during the shutdown meets either 57P03 or a closed socket, at random;
        # three rounds make sure at least one write meets 57P03.
        for round_ in range(3):
            task_id = pipe.enqueue(user, subject=f"round {round_}")
            pipe.consumer.step(0.1)
            try:
                outcome = pipe.sender.step(0.5)
            finally:
                for timer in comeback:
                    timer.join()
            assert outcome == [Outcome.SENT]
            assert pipe.task(task_id).status == "sent"
        assert len(smtp.received) == 3


def test_envelopes_taken_while_postgresql_is_down_go_out_when_it_returns(stack):
    stack.reset()
    sink = stack.start_sink()
    workers = None
    try:
        accounts = make_accounts(stack.base_url, sink.port, 1, "stranded")
        enqueued = Enqueuer(stack.base_url, accounts, 30, "stranded").start().join(60)
        assert len(enqueued.task_ids) == 30
        stack.stop_postgres()
        try:
            # The default leak window (300 s): only the workers themselves can bring the work back in time.
            workers = stack.workers(SWEEP_LEAK_WINDOW=300).start(consumers=1, senders=1)
            time.sleep(3)  # every consumer thread takes an envelope, fails on PostgreSQL, takes the next
        finally:
            stack.start_postgres()
        db = wait_settled(stack.engine, enqueued.task_ids.values(), timeout=12)
        stuck = sorted(i for i in enqueued.task_ids.values() if db[i].status != "sent")
        held = sum(stack.redis.llen(k) for k in stack.redis.scan_iter("mailq:processing:*"))
        assert not stuck, f"{len(stuck)} task(s) still queued; {held} envelope(s) held by live workers"
    finally:
        if workers is not None:
            workers.stop()
        stack.terminate(sink.proc)


def test_workers_register_again_after_redis_restarts_empty(stack):
    stack.reset()
    workers = stack.workers(WORKER_HEARTBEAT_TTL=2).start(consumers=1, senders=1, sweep=False)

    def registered(timeout: float = 10.0) -> int:
        # The liveness file is touched before the first beat reaches Redis, so a started worker may
        # not be in the hash yet; beats come every second (a loaded machine may be late).
        deadline = time.monotonic() + timeout
        while stack.redis.hlen(queue.WORKERS) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        return stack.redis.hlen(queue.WORKERS)

    try:
        assert registered() == 2
        stack.restart_redis_empty(0.5)
        stack.redis.connection_pool.disconnect()
        assert registered() == 2
    finally:
        workers.stop()


def test_a_worker_started_while_redis_is_down_waits_for_it(stack, tmp_path):
    port = free_port()
    proc = stack.spawn("sender", ["sender"], REDIS_URL=f"redis://127.0.0.1:{port}/0")
    redis_server = EmbeddedRedis(tmp_path / "late-redis", port=port)
    try:
        time.sleep(3)
        redis_server.start()
        wait_beat(proc, timeout=10)
        assert proc.alive(), proc.log.read_text()[-2000:]
    finally:
        if proc.alive():
            proc.popen.send_signal(signal.SIGTERM)
        stack.terminate(proc)
        redis_server.stop()


@pytest.fixture()
def silent_pg(stack):
    """The in-process pipeline on the stack's Redis and PostgreSQL, its PostgreSQL reached through the
    fault proxy with a 0.5 s socket timeout; yields (pipeline, proxy)."""
    stack.reset()
    socket_path = parse_qs(urlparse(stack.database_url).query)["unix_sock"][0]
    proxy = faultproxy.start(stack, {"postgresql": f"unix:{socket_path}"})
    url = f"postgresql+pg8000://postgres@127.0.0.1:{proxy.ports['postgresql']}/postgres"
    settings = Settings.from_env(
        {**TEST_ENV, "DATABASE_URL": url, "REDIS_URL": stack.redis_url, "DATABASE_SOCKET_TIMEOUT": "0.5"}
    )
    engine = make_engine(url, pre_ping=False, socket_timeout=settings.database_socket_timeout)
    ctx = Context(settings, engine, make_redis(stack.redis_url), SecretBox(settings.encryption_keys))
    pipe = Pipeline(ctx)
    try:
        yield pipe, proxy
    finally:
        pipe.close()
        ctx.redis.close()
        engine.dispose()
        stack.terminate(proxy.proc)


def backend_pid(engine) -> int:
    with engine.begin() as conn:
        return conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()


def test_a_postgresql_connection_gone_silent_is_unavailable_and_never_used_again(silent_pg):
    # Found by the bad-network run: pg8000 raises a bare TimeoutError when a read times out, which
    # was not "PostgreSQL unavailable": the API answered 500 and a sender gave up recording its
    # outcome (so the mail went out again after the lease).
    pipe, proxy = silent_pg
    engine = pipe.ctx.engine
    first = backend_pid(engine)
    proxy.blackhole()  # no reset: the connection just stops answering
    with pytest.raises(Exception) as caught:
        backend_pid(engine)
    assert is_unavailable(caught.value), repr(caught.value)
    proxy.heal()  # new connections work again; the old one stays dead
    assert backend_pid(engine) != first


def test_a_sender_records_its_outcome_after_its_postgresql_connection_went_silent(silent_pg):
    pipe, proxy = silent_pg
    with ScriptedSmtpServer() as smtp:
        user = pipe.user(smtp)
        task_id = pipe.enqueue(user)
        pipe.consumer.step(0.1)
        real_send = pipe.mailer.send
        heal = threading.Timer(1.5, proxy.heal)

        def send_then_go_silent(account, message, **kwargs):
            reply = real_send(account, message, **kwargs)  # the server has accepted the mail
            proxy.blackhole()  # the outcome write meets a silent connection, then silent new ones
            heal.start()
            return reply

        pipe.mailer.send = send_then_go_silent
        try:
            assert pipe.sender.step(0.5) == [Outcome.SENT]
        finally:
            heal.join()
        assert pipe.task(task_id).status == "sent" and len(smtp.received) == 1


def test_an_outage_many_threads_meet_at_once_pauses_a_sender_once_and_a_success_starts_over(pipe_on_stack):
    # Found by the bad-network run: every conversation thread that met the outage doubled the pause,
    # so ten claims failing together paused the sender for the maximum 60 s (its first mail after a
    # 20 s blackhole went out 54 s after it lifted), and the pause never shrank after work went through.
    pipe = pipe_on_stack
    skew = [0.0]  # the sender's clock runs ahead of the real one by this much
    sender = Sender(
        pipe.ctx.settings,
        pipe.ctx.engine,
        pipe.ctx.redis,
        pipe.mailer,
        pipe.ctx.box,
        clock=lambda: time.monotonic() + skew[0],
    )
    for _ in range(10):
        sender.fault()  # ten conversation threads meet the same outage
    skew[0] += 1.0
    assert not sender.faulted()  # one pause of 1 s
    sender.fault()  # still failing after it: now the pause doubles
    skew[0] += 1.0
    assert sender.faulted()
    skew[0] += 1.0
    assert not sender.faulted()
    with ScriptedSmtpServer() as smtp:
        pipe.enqueue(pipe.user(smtp))
        pipe.consumer.step(0.1)
        assert sender.step(0.5) == [Outcome.SENT]  # work goes through again
    sender.fault()
    skew[0] += 1.0
    assert not sender.faulted()  # the pause starts over at 1 s
