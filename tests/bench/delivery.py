"""Scenarios 1-3: how fast a backlog of N mails reaches the sink.

1. the raw limit: one smtplib connection, messages built beforehand;
2. mailq: N queued rows, their envelopes released into the task list at once, one consumer and
   k sender processes already running;
3. Celery: N ``send_mail`` tasks published beforehand and released into the worker's queue at once.

For 2 and 3 the backlog is made before the clock starts and appears in one Redis RENAME, so both
pipelines start warm and the clock sees only delivery. Every scenario checks that each Message-ID
reached the sink exactly once.
"""

from __future__ import annotations

import contextlib
import smtplib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.policy import default as default_policy

import sqlalchemy as sa

from shared import queue
from shared.context import make_redis
from shared.delivery.message import build_message
from tests.bench import seed
from tests.bench.mailbox import MailboxTail, Verdict, verify
from tests.bench.stack import SMTP_ACCOUNTS, SMTP_USER, Child, CpuMeter, Stack

CELERY_HOLD = "bench-hold"  # the queue Celery tasks are published to before the clock starts
CELERY_QUEUE = "celery"  # the queue the worker consumes (Celery's default)

Progress = Callable[[int], None]
# Above this much foreign CPU (of the machine's cores) during a run, its figure is flagged as disturbed.
DISTURBED_CORES = 0.3
OWN_COMPONENTS = ("consumer", "senders", "postgres", "redis")  # what "mailq's own CPU" counts


@dataclass
class Delivery:
    label: str
    n: int
    seconds: float
    verdict: Verdict
    cpu: dict[str, float] = field(default_factory=dict)  # component -> CPU seconds during the run
    statuses: dict[str, int] = field(default_factory=dict)  # mailq only: task rows by status at the end
    concurrency: int = 1  # SMTP conversations at once
    note: str = ""
    postgres_kinds: dict[str, float] = field(default_factory=dict)  # PostgreSQL's CPU by kind of process

    @property
    def rate(self) -> float:
        return self.verdict.delivered / self.seconds if self.seconds > 0 else 0.0

    @property
    def ok(self) -> bool:
        return self.verdict.exactly_once and set(self.statuses) <= {"sent"}

    @property
    def own_ms(self) -> float:
        """mailq's own CPU per delivered mail: consumer, senders, PostgreSQL and Redis (not the sink, the
        enqueue function or the load generator), in milliseconds."""
        own = sum(self.cpu.get(c, 0.0) for c in OWN_COMPONENTS)
        return 1000 * own / self.verdict.delivered if self.verdict.delivered else 0.0

    @property
    def other_cores(self) -> float:
        """Cores that processes outside the benchmark kept busy meanwhile, on average."""
        return self.cpu.get("other", 0.0) / self.seconds if self.seconds > 0 else 0.0

    @property
    def disturbed(self) -> bool:
        return self.other_cores > DISTURBED_CORES


def _timeout(n: int) -> float:
    return 60.0 + n / 25  # far beyond any healthy run; a stuck pipeline fails instead of hanging


def raw_limit(stack: Stack, n: int, progress: Progress = lambda n: None) -> Delivery:
    """One smtplib connection pushing N prepared messages into the sink: this machine's ceiling."""
    data_dir = stack.scratch("sink-raw")
    sink = stack.start_sink(data_dir)
    try:
        policy = default_policy.clone(linesep="\r\n")
        sender, now = stack.user.email, time.time()
        prepared, ids = [], []
        for i in range(n):
            recipient, subject, body = seed.mail(i)
            message_id = seed.new_message_id()
            message = build_message(
                sender=sender, recipient=recipient, subject=subject, body=body, message_id=message_id,
                date=datetime.fromtimestamp(now, UTC),
            )  # fmt: skip
            prepared.append((recipient, message.as_bytes(policy=policy)))
            ids.append(message_id)
        meter = CpuMeter({"sink": [sink.pid], **stack.service_pids()}).start()
        started = time.perf_counter()
        with smtplib.SMTP("127.0.0.1", stack.sink_port, timeout=30) as smtp:
            smtp.login(SMTP_USER, SMTP_ACCOUNTS[SMTP_USER])
            for i, (recipient, data) in enumerate(prepared, 1):
                smtp.sendmail(sender, [recipient], data)
                if i % 250 == 0:
                    progress(250)
        seconds = time.perf_counter() - started  # the sink stores a message before it answers 250
        progress(n % 250)
        cpu = meter.stop()
        return Delivery("raw limit", n, seconds, verify(data_dir, ids), cpu)
    finally:
        stack.stop(sink)


def _statuses(stack: Stack) -> dict[str, int]:
    with stack.ctx.engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT status, count(*) AS n FROM tasks GROUP BY status")).all()
    return {r.status: r.n for r in rows}


def _settled(stack: Stack, timeout: float = 15.0) -> dict[str, int]:
    """Task statuses once every row left queued/processing (the sink hears of a mail first)."""
    deadline = time.monotonic() + timeout
    while True:
        statuses = _statuses(stack)
        if set(statuses) <= {"sent", "cancelled", "failed"} or time.monotonic() > deadline:
            return statuses
        time.sleep(0.1)


def _drain(
    stack: Stack, tail: MailboxTail, n: int, children: list[Child], release: Callable[[], None], progress
) -> float:
    """Start the clock, release the backlog, wait for N arrivals; return the seconds it took."""
    shown = 0

    def report(count: int) -> None:
        nonlocal shown
        progress(count - shown)
        shown = count

    def alive() -> None:
        for child in children:
            child.check()

    started = time.time()
    release()
    tail.wait_for(n, _timeout(n), alive=alive, progress=report)
    tail.poll()
    # The sink's own arrival stamp of the last mail, not the moment our poll noticed it.
    return max(0.0, tail.last_arrival - started) if tail.count else _timeout(n)


def mailq_delivery(
    stack: Stack, n: int, senders: int, progress: Progress = lambda n: None, *, profiler=None, label: str = ""
) -> Delivery:
    """N queued tasks drained by one consumer and ``senders`` sender processes, the account allowed
    ``stack.connections`` conversations at once."""
    stack.reset()
    data_dir = stack.scratch(f"sink-mailq-{senders}")
    sink = stack.start_sink(data_dir)
    workers: list[Child] = []
    try:
        backlog = seed.queued_backlog(stack.ctx.engine, stack.user.id, n)
        seed.stage_envelopes(stack.ctx.redis, [task_id for task_id, _ in backlog])
        workers = stack.start_workers(senders)
        if profiler is not None:
            profiler.attach("sink", sink.pid)
            for worker in workers:
                profiler.attach(worker.name, worker.pid)
        tail = MailboxTail(data_dir)
        meter = CpuMeter(
            {"sink": [sink.pid], "consumer": [workers[0].pid], "senders": [w.pid for w in workers[1:]],
             **stack.service_pids()}
        ).start()  # fmt: skip
        seconds = _drain(
            stack, tail, n, [sink, *workers],
            lambda: seed.release(stack.ctx.redis, seed.HOLD, queue.TASK_LIST), progress,
        )  # fmt: skip
        cpu = meter.stop()
        if profiler is not None:
            profiler.stop()
        verdict = verify(data_dir, (message_id for _, message_id in backlog))
        statuses = _settled(stack)
        concurrency = min(senders * stack.settings.worker_count, stack.connections)
        return Delivery(
            f"mailq, {senders} sender(s){label}", n, seconds, verdict, cpu, statuses, concurrency,
            postgres_kinds=meter.postgres_kinds,
        )  # fmt: skip
    finally:
        stack.stop(*workers, sink)


def celery_env(stack: Stack) -> dict[str, str]:
    return {
        "BENCH_CELERY_BROKER": stack.celery_broker,
        "MAIL_SERVER": "127.0.0.1",
        "MAIL_PORT": str(stack.sink_port),
        "MAIL_USERNAME": SMTP_USER,
        "MAIL_PASSWORD": SMTP_ACCOUNTS[SMTP_USER],
        "MAIL_DEFAULT_SENDER": stack.user.email,
    }


def _wait_ready(child: Child, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while " ready." not in child.tail(20000):
        child.check()
        if time.monotonic() > deadline:
            raise RuntimeError(f"the Celery worker did not become ready:\n{child.tail()}")
        time.sleep(0.1)


def celery_delivery(
    stack: Stack,
    n: int,
    concurrency: int,
    progress: Progress = lambda n: None,
    *,
    log_level: str = "INFO",
    profiler=None,
) -> Delivery:
    """N ``send_mail`` tasks drained by a Celery worker with ``concurrency`` prefork processes."""
    from tests.bench import peer_celery

    stack.reset()
    data_dir = stack.scratch("sink-celery")
    sink = stack.start_sink(data_dir)
    worker: Child | None = None
    broker = make_redis(stack.celery_broker)
    try:
        peer_celery.celery_app.conf.broker_url = stack.celery_broker
        ids = []
        with peer_celery.celery_app.producer_or_acquire() as producer:
            for i in range(n):
                recipient, subject, body = seed.mail(i)
                message_id = seed.new_message_id()
                ids.append(message_id)
                # What `send_mail.delay(...)` does, routed to a queue no worker reads yet.
                peer_celery.send_mail.apply_async(
                    (recipient, subject, body, message_id), queue=CELERY_HOLD, producer=producer
                )
        worker = stack.spawn(
            "celery",
            [sys.executable, "-m", "celery", "-A", "tests.bench.peer_celery", "worker", "--pool", "prefork",
             "--concurrency", str(concurrency), "--loglevel", log_level, "--hostname", "bench@%h"],
            **celery_env(stack),
        )  # fmt: skip
        _wait_ready(worker)
        if profiler is not None:
            profiler.attach("sink", sink.pid)
            profiler.attach("celery", worker.pid, subprocesses=True)
        tail = MailboxTail(data_dir)
        meter = CpuMeter({"sink": [sink.pid], "celery": [worker.pid], **stack.service_pids()}).start()
        seconds = _drain(
            stack, tail, n, [sink, worker], lambda: broker.rename(CELERY_HOLD, CELERY_QUEUE), progress
        )
        cpu = meter.stop()
        if profiler is not None:
            profiler.stop()
        verdict = verify(data_dir, ids)
        note = f"prefork pool, concurrency {concurrency}, a new SMTP connection per mail"
        return Delivery("Celery + Redis", n, seconds, verdict, cpu, {}, concurrency, note)
    finally:
        broker.close()
        stack.stop(*([worker] if worker else []), sink)
        with contextlib.suppress(Exception):  # only closing idle broker connections
            peer_celery.celery_app.pool.force_close_all()
