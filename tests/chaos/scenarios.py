"""One function per fault. Each resets the stack, starts its workers and SMTP server, enqueues over HTTP
while it breaks something, waits for every task to settle, audits, and returns a Result.

Sizes are arguments: `make chaos` runs thousands of tasks, tests/test_chaos.py hundreds.
"""

from __future__ import annotations

import random
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import sqlalchemy as sa

from tests.chaos.audit import (
    Audit,
    audit_against_server_log,
    audit_delivery,
    count_status,
    rows,
    secrets_found,
)
from tests.chaos.client import Enqueuer, EnqueueRun, make_accounts
from tests.chaos.smtpd import STORED
from tests.chaos.stack import Stack, WorkerSet
from tests.chaos.webhooks import Hooks

SETTLE_TIMEOUT = 240.0


@dataclass
class Result:
    """What one scenario did and what the audit found."""

    name: str
    injected: str  # the fault, in words, with how often it landed
    tasks: int  # tasks accepted by the API
    audit: Audit
    enqueue: EnqueueRun
    seconds: float
    notes: list[str] = field(default_factory=list)  # why the duplicates, what recovered it
    figures: dict[str, object] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # anything that breaks a guarantee

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        a = self.audit
        return (
            f"{self.name}: {self.tasks} tasks, sent {a.sent}, cancelled {a.cancelled}, lost {a.lost}, "
            f"duplicates {a.duplicates}; {self.injected}; {'; '.join(self.notes)}"
            + (f"; PROBLEMS: {self.problems}" if self.problems else "")
        )


# --- shared steps -----------------------------------------------------------------------------------


class Run:
    """The common frame of a scenario: fresh state, an SMTP server, accounts (each with a webhook endpoint
    at one receiver), workers (a webhook worker among them), an enqueuer.

    A scenario with other servers, accounts or worker settings overrides ``start_servers``,
    ``make_accounts`` or ``worker_settings``; ``before_stop`` runs once everything settled, before the
    workers are stopped."""

    def __init__(
        self,
        stack: Stack,
        name: str,
        tasks: int,
        *,
        users: int = 4,
        clients: int = 4,
        rate: float | None = None,
        flaky: dict[str, float] | None = None,
        seed: int = 1,
        consumers: int = 1,
        senders: int = 2,
        **settings,
    ):
        self.stack, self.name, self.tasks = stack, name, tasks
        self.started = time.monotonic()
        self.tag = f"{name}-{int(time.time())}"
        stack.reset()
        self.servers = self.start_servers(flaky, seed)  # each with a .proc, stopped by finish()
        self.server = self.servers[0]
        self.settings = settings
        self.workers: WorkerSet = stack.workers(**self.worker_settings(settings)).start(
            consumers=consumers, senders=senders, webhooks=1
        )
        self.accounts = self.make_accounts(users)
        self.hooks = Hooks(stack.base_url, self.accounts)
        self.enqueuer = Enqueuer(stack.base_url, self.accounts, tasks, self.tag, clients=clients, rate=rate)
        self.problems: list[str] = []
        self.notes: list[str] = []
        self.figures: dict[str, object] = {}

    def start_servers(self, flaky: dict[str, float] | None, seed: int) -> list:
        return [self.stack.start_flaky_smtp(flaky, seed) if flaky else self.stack.start_sink()]

    def make_accounts(self, users: int) -> list:
        return make_accounts(self.stack.base_url, self.server.port, users, self.tag)

    def worker_settings(self, settings: dict) -> dict:
        return settings

    def before_stop(self) -> None:
        pass

    def copies(self) -> Counter:
        """Message-ID -> copies the SMTP server holds."""
        if hasattr(self.server, "counts"):
            return self.server.counts()
        return Counter(r["message_id"] for r in self.server.records() if r["fate"] in STORED)

    def answered_250(self) -> Counter:
        """Message-ID -> times the server stored it and answered 250 (a drop after the dot excluded)."""
        if hasattr(self.server, "counts"):
            return self.server.counts()
        return Counter(r["message_id"] for r in self.server.records() if r["fate"] == "250")

    def wait_accepted(self, fraction: float, timeout: float = 120.0) -> None:
        """Block until the API has accepted ``fraction`` of the tasks."""
        deadline = time.monotonic() + timeout
        while self.enqueuer.done < fraction * self.tasks and time.monotonic() < deadline:
            time.sleep(0.05)

    def delivered(self) -> int:
        return sum(1 for n in self.copies().values() if n)

    def wait_delivered(self, fraction: float, timeout: float = 120.0) -> None:
        """Block until ``fraction`` of the tasks have arrived at least once."""
        deadline = time.monotonic() + timeout
        while self.delivered() < fraction * self.tasks and time.monotonic() < deadline:
            time.sleep(0.2)

    def finish(
        self,
        injected: str,
        *,
        audit: Callable[[dict], Audit] | None = None,
        attempts: Callable[[], dict[str, list[str]]] | None = None,
        timeout: float = SETTLE_TIMEOUT,
    ) -> Result:
        """Settle, audit, stop. ``attempts`` (Message-ID -> the server's fate of each attempt) makes the
        webhook audit count the task.deferred events a run without kills must have sent."""
        enqueue = self.enqueuer.join(timeout)
        accepted = list(enqueue.task_ids.values())
        db = _wait_settled(self.stack, accepted, timeout)
        time.sleep(1.0)  # a late duplicate would arrive now
        db = rows(self.stack.engine)
        result_audit = audit(db) if audit else audit_delivery(db, accepted, self.copies())
        hooks = self.hooks.audit(self.stack.engine, db, accepted, attempts() if attempts else None)
        self.hooks.close()
        self.problems += hooks.problems[:10]
        self.notes.append(hooks.summary())
        self.figures["webhook events"] = dict(hooks.by_type)
        self.figures["webhook repeats"] = hooks.repeats
        dead = [f"{p.name} (exit {p.popen.returncode})" for p in self.workers.dead()]
        if dead:
            self.problems.append(f"worker(s) died on their own: {dead}")
        sweep_log = "".join(p.log.read_text(errors="replace") for p in self.workers.sweeps)
        self.figures["sweep requeued"] = _sum(r"requeued (\d+), rescued", sweep_log)
        self.figures["sweep rescued envelopes"] = _sum(r"rescued (\d+) envelope", sweep_log)
        self.before_stop()
        codes = self.workers.stop()
        unclean = {k: v for k, v in codes.items() if v != 0}
        if unclean:
            self.problems.append(f"worker(s) did not stop cleanly on SIGTERM: {unclean}")
        for server in self.servers:
            self.stop_server(server)
        self.problems += result_audit.failures()
        self.problems += enqueue.bad[:10]
        if enqueue.gave_up:
            self.problems.append(f"{len(enqueue.gave_up)} enqueue request(s) never accepted")
        if len(accepted) != self.tasks:
            self.problems.append(
                f"{self.tasks - len(accepted)} of {self.tasks} enqueue request(s) not accepted"
            )
        leaked = secrets_found(self.stack.all_logs(), self._secrets())
        if leaked:
            self.problems.append(f"secret(s) in the logs: {leaked}")
        self.figures["enqueue p50 ms"] = round(enqueue.percentile(50) * 1000, 1)
        self.figures["enqueue p99 ms"] = round(enqueue.percentile(99) * 1000, 1)
        return Result(
            self.name,
            injected,
            len(accepted),
            result_audit,
            enqueue,
            time.monotonic() - self.started,
            self.notes,
            self.figures,
            self.problems,
        )

    def stop_server(self, server) -> None:
        """Stop one of the run's SMTP servers (a process here; a run with in-process servers overrides it)."""
        self.stack.terminate(server.proc)

    def _secrets(self) -> dict[str, str]:
        found = {"JWT secret": self.stack.jwt_secret, "encryption key": self.stack.encryption_key}
        for a in self.accounts:
            found[f"password of {a.email}"] = a.password
            found[f"SMTP password of {a.email}"] = a.smtp_password
            found[f"token of {a.email}"] = a.token
        for user_id, secret in self.hooks.secrets.items():
            found[f"webhook secret of user {user_id}"] = secret
        return found


def _wait_settled(stack: Stack, accepted: list[int], timeout: float) -> dict:
    from tests.chaos.audit import wait_settled

    return wait_settled(stack.engine, accepted, timeout)


def lost_status_writes(procs) -> int:
    """Log entries of senders whose outcome write raised something Sender.record does not retry."""
    lost = 0
    for proc in procs:
        if proc.name != "sender":
            continue
        text = proc.log.read_text(errors="replace")
        for entry in re.split(r"\n(?=\d{4}-\d\d-\d\d )", text):
            if "unexpected error" in entry and ", in record" in entry:
                lost += 1
    return lost


def _sum(pattern: str, text: str) -> int:
    return sum(int(m) for m in re.findall(pattern, text))


class KillProbe:
    """Counts the kills that landed between the SMTP server's acceptance and the status write.

    Right after a SIGKILL it notes the tasks in `processing`; a moment later, the ones still in
    `processing` with the same try count belonged to the dead sender (live senders finish in
    milliseconds; the lease keeps the sweep away for seconds). Of those, the ones whose mail the server
    already holds were accepted but never recorded: each will be sent once more after its lease runs out.
    """

    def __init__(self, stack: Stack, copies: Callable[[], Counter], settle: float = 1.5):
        self.stack, self.copies, self.settle = stack, copies, settle
        self.kills = 0
        self.kills_in_window = 0
        self.tasks_in_window = 0
        self.orphans = 0
        self._seen: set[tuple[int, int]] = set()
        self.attributed: Counter = Counter()  # Message-ID -> kills between its 250 and the status write
        self._lock = threading.Lock()
        self._timers: list[threading.Timer] = []

    def _processing(self) -> dict[int, tuple[int, str]]:
        with self.stack.engine.connect() as conn:
            result = conn.execute(
                sa.text("SELECT id, try_count, message_id FROM tasks WHERE status = 'processing'")
            )
            return {r.id: (r.try_count, r.message_id) for r in result}

    def killed(self) -> None:
        """Call right after a SIGKILL of a sender."""
        self.kills += 1
        before = self._processing()
        timer = threading.Timer(self.settle, self._check, (before,))
        timer.daemon = True
        self._timers.append(timer)
        timer.start()

    def _check(self, before: dict[int, tuple[int, str]], attempts: int = 10) -> None:
        try:
            after = self._processing()
        except sa.exc.DBAPIError:  # PostgreSQL restarting (everything-at-once): look again shortly
            if attempts:
                time.sleep(1.0)
                self._check(before, attempts - 1)
            return
        held = {i: v for i, v in before.items() if after.get(i) == v}
        copies = self.copies()
        with self._lock:
            hits = 0
            for task_id, (tries, message_id) in held.items():
                if (task_id, tries) in self._seen:
                    continue  # an orphan of an earlier kill
                self._seen.add((task_id, tries))
                self.orphans += 1
                if copies.get(message_id, 0) > self.attributed[message_id]:
                    self.attributed[message_id] += 1
                    hits += 1
            self.tasks_in_window += hits
            self.kills_in_window += 1 if hits else 0

    def join(self) -> None:
        for timer in self._timers:
            timer.join()


def _kill_loop(
    run: Run,
    role: str,
    every: tuple[float, float],
    rng: random.Random,
    until: Callable[[], bool],
    probe: KillProbe | None = None,
    max_kills: int | None = None,
) -> int:
    """SIGKILL a random worker of ``role`` every few seconds (replacing it at once) until ``until()``."""
    kills = 0
    while not until() and (max_kills is None or kills < max_kills):
        time.sleep(rng.uniform(*every))
        if until():
            break
        group = run.workers.senders if role == "sender" else run.workers.consumers
        victim = rng.choice(group)
        run.workers.replace(victim)
        kills += 1
        if probe is not None:
            probe.killed()
    return kills


def _nearly_done(run: Run, fraction: float = 0.97) -> Callable[[], bool]:
    def check() -> bool:
        return (
            run.enqueuer.done >= run.tasks and count_status(run.stack.engine, "sent") >= fraction * run.tasks
        )

    return check


# --- the scenarios ------------------------------------------------------------------------------------


def sender_kills(
    stack: Stack,
    tasks: int = 5000,
    *,
    senders: int = 3,
    every=(2.0, 4.0),
    max_kills=None,
    rate: float | None = None,
    seed: int = 11,
    settings: dict | None = None,
) -> Result:
    """SIGKILL a random sender every few seconds; duplicates must not exceed the kills that landed
    between the server's acceptance and the status write."""
    run = Run(stack, "sender-kills", tasks, senders=senders, rate=rate, seed=seed, **(settings or {}))
    run.enqueuer.start()
    probe = KillProbe(stack, run.answered_250)
    kills = _kill_loop(run, "sender", every, random.Random(seed), _nearly_done(run), probe, max_kills)
    probe.join()
    result = run.finish(f"SIGKILL of a random sender every {every[0]:g}–{every[1]:g} s: {kills} kills")
    result.figures.update(
        kills=kills,
        **{
            "kills between acceptance and status write": probe.kills_in_window,
            "tasks accepted by SMTP but not recorded": probe.tasks_in_window,
            "claims orphaned by kills": probe.orphans,
        },
    )
    if result.audit.duplicates > probe.tasks_in_window:
        result.problems.append(
            f"{result.audit.duplicates} duplicates but only {probe.tasks_in_window} kill(s) landed "
            "between acceptance and status write"
        )
    result.notes.append(
        f"{probe.kills_in_window} of {kills} kills landed between the server's 250 and the status write "
        f"({probe.tasks_in_window} task(s)); each such task is sent again when its lease runs out"
    )
    return result


def consumer_kills(
    stack: Stack,
    tasks: int = 5000,
    *,
    consumers: int = 2,
    every=(2.0, 4.0),
    max_kills=None,
    rate: float | None = None,
    seed: int = 12,
    settings: dict | None = None,
) -> Result:
    """SIGKILL a random consumer every few seconds: what it held comes back through the sweep."""
    run = Run(stack, "consumer-kills", tasks, consumers=consumers, rate=rate, seed=seed, **(settings or {}))
    run.enqueuer.start()
    kills = _kill_loop(run, "consumer", every, random.Random(seed), _nearly_done(run), None, max_kills)
    result = run.finish(f"SIGKILL of a random consumer every {every[0]:g}–{every[1]:g} s: {kills} kills")
    result.figures["kills"] = kills
    if result.audit.duplicates:
        result.problems.append(f"{result.audit.duplicates} duplicate(s) without any sender dying")
    result.notes.append(
        f"the sweep returned {result.figures['sweep rescued envelopes']} envelope(s) from killed consumers; "
        "a consumer never sends, so no duplicate is possible"
    )
    return result


def redis_restart(
    stack: Stack,
    tasks: int = 5000,
    *,
    at: float = 0.3,
    downtime: float = 2.0,
    rate: float | None = None,
    leak_window: int = 5,
    seed: int = 13,
    settings: dict | None = None,
) -> Result:
    """Redis killed and restarted empty mid-run: every envelope, heartbeat and registration is gone;
    the sweep re-enqueues the queued rows after the leak window."""
    run = Run(
        stack, "redis-restart", tasks, rate=rate, seed=seed, SWEEP_LEAK_WINDOW=leak_window, **(settings or {})
    )
    run.enqueuer.start()
    run.wait_delivered(at)
    queued = count_status(stack.engine, "queued")
    envelopes = stack.redis.llen("mailq:tasks") + sum(
        stack.redis.zcard(key) for key in stack.redis.scan_iter("mailq:send:q:*")
    )
    restarted = time.monotonic()
    stack.restart_redis_empty(downtime)
    stack.redis.connection_pool.disconnect()
    result = run.finish(
        f"redis-server SIGKILLed at {at:.0%} delivered, its data deleted, "
        f"restarted empty after {downtime:g} s"
    )
    result.figures.update(
        {
            "queued tasks at the restart": queued,
            "envelopes destroyed": envelopes,
            "recovered in s": round(time.monotonic() - restarted, 1),
        }
    )
    if result.audit.duplicates:
        result.problems.append(f"{result.audit.duplicates} duplicate(s) although no sender died")
    result.notes.append(
        f"{envelopes} envelope(s) destroyed; the sweep put the rows back after the {leak_window} s leak "
        f"window ({result.figures['sweep requeued']} re-pushes in all: a row is pushed again every "
        f"{leak_window} s it waits; a push of an envelope still in its tenant's queue adds nothing)"
    )
    return result


def postgres_restart(
    stack: Stack,
    tasks: int = 5000,
    *,
    at: float = 0.3,
    downtime: float = 5.0,
    rate: float | None = None,
    lease: int = 20,
    leak_window: int = 10,
    seed: int = 14,
    settings: dict | None = None,
) -> Result:
    """PostgreSQL stopped (`pg_ctl stop -m fast`) mid-run and started again after ``downtime``: enqueue
    answers 503 problem details meanwhile, never 500; the workers reconnect by themselves."""
    run = Run(
        stack,
        "postgres-restart",
        tasks,
        rate=rate,
        seed=seed,
        TASK_LEASE_SECONDS=lease,
        SWEEP_LEAK_WINDOW=leak_window,
        **(settings or {}),
    )
    run.enqueuer.start()
    run.wait_accepted(at)  # requests must still be coming when it goes down
    before = Counter(run.enqueuer.result.statuses)
    stack.stop_postgres()
    time.sleep(downtime)
    during = Counter(run.enqueuer.result.statuses) - before
    stack.start_postgres()
    back = time.monotonic()
    result = run.finish(
        f"PostgreSQL stopped (pg_ctl -m fast) at {at:.0%} enqueued, started again after {downtime:g} s"
    )
    result.figures.update(
        {
            "answers while down": dict(sorted(during.items())),
            "recovered in s": round(time.monotonic() - back, 1),
        }
    )
    if during.get(500) or any(s >= 500 and s != 503 for s in during):
        result.problems.append(f"5xx other than 503 while PostgreSQL was down: {dict(during)}")
    if during.get(0):
        result.problems.append(f"{during[0]} enqueue request(s) got no HTTP answer while PostgreSQL was down")
    if not during.get(503):
        result.problems.append("no request saw the outage (no 503): the fault did not land")
    lost_writes = lost_status_writes(run.workers.history)
    result.figures["status writes lost (sender errors in record)"] = lost_writes
    if result.audit.duplicates and result.audit.duplicates <= lost_writes:
        result.problems.append(
            f"bug: {lost_writes} status write(s) after the server's 250 failed on an error the sender "
            f"does not retry (57P03 / connection reset) -> {result.audit.duplicates} duplicate(s)"
        )
    elif result.audit.duplicates:
        result.problems.append(f"{result.audit.duplicates} duplicate(s) although no sender died")
    result.notes.append(
        f"{during.get(503, 0)} enqueue answers were 503 problem details while it was down (retried with "
        "the same Idempotency-Key); the workers reconnected without a restart"
    )
    return result


DEFAULT_MIX = {"250": 0.55, "451": 0.15, "550": 0.1, "drop_before": 0.1, "drop_after": 0.1}


def flaky_smtp(
    stack: Stack,
    tasks: int = 2000,
    *,
    mix: dict[str, float] | None = None,
    max_tries: int = 3,
    rate: float | None = None,
    seed: int = 15,
    settings: dict | None = None,
) -> Result:
    """An SMTP server answering 250, 451, 550 at random or hanging up before or after the final dot:
    every task must end in the state its attempts in the server's log justify."""
    mix = mix or DEFAULT_MIX
    run = Run(
        stack,
        "flaky-smtp",
        tasks,
        rate=rate,
        seed=seed,
        flaky=mix,
        MAX_TRY_COUNT=max_tries,
        **(settings or {}),
    )
    run.enqueuer.start()
    accepted = lambda: list(run.enqueuer.result.task_ids.values())  # noqa: E731

    def audit(db):
        return audit_against_server_log(db, accepted(), run.server.records(), max_tries)

    def attempts():
        fates: dict[str, list[str]] = {}
        for record in run.server.records():
            fates.setdefault(record.get("message_id"), []).append(record["fate"])
        return fates

    result = run.finish(
        "DATA answered at random: " + ", ".join(f"{k} {v:.0%}" for k, v in mix.items()),
        audit=audit,
        attempts=attempts,
    )
    fates = Counter(r["fate"] for r in run.server.records())
    result.figures["server answers"] = dict(fates)
    result.figures["cancel reasons"] = dict(result.audit.cancel_reasons)
    result.notes.append(
        f"{fates.get('drop_after', 0)} lost final replies (server stored the mail, then hung up): a retry "
        "of such a task is a duplicate"
        + ("; every final state matched the server's log" if not result.audit.unjustified else "")
    )
    return result


def enqueue_load(
    stack: Stack,
    tasks: int = 5000,
    *,
    clients: int = 32,
    budget_ms: float = 1000.0,
    seed: int = 16,
    settings: dict | None = None,
) -> Result:
    """Many enqueue clients at once while the workers deliver at full speed: no request may fail."""
    run = Run(stack, "enqueue-load", tasks, clients=clients, seed=seed, **(settings or {}))
    run.enqueuer.start()
    result = run.finish(f"{clients} concurrent enqueue clients, no pacing, workers at full speed")
    e = result.enqueue
    result.figures.update(
        {
            "clients": clients,
            "requests/s": round(len(e.latencies) / e.seconds, 1) if e.seconds else 0,
            "enqueue max ms": round(max(e.latencies, default=0) * 1000, 1),
            "budget p99 ms": budget_ms,
        }
    )
    failed = sum(n for status, n in e.statuses.items() if status != 202)
    if failed:
        result.problems.append(f"{failed} enqueue request(s) failed: {dict(e.statuses)}")
    if result.figures["enqueue p99 ms"] > budget_ms:
        result.problems.append(f"p99 {result.figures['enqueue p99 ms']} ms over the {budget_ms:g} ms budget")
    if result.audit.duplicates:
        result.problems.append(f"{result.audit.duplicates} duplicate(s) without any fault")
    result.notes.append(
        f"no request failed; p99 {result.figures['enqueue p99 ms']} ms (budget {budget_ms:g} ms)"
    )
    return result


SCENARIOS: dict[str, Callable[..., Result]] = {
    "sender-kills": sender_kills,
    "consumer-kills": consumer_kills,
    "redis-restart": redis_restart,
    "postgres-restart": postgres_restart,
    "flaky-smtp": flaky_smtp,
    "enqueue-load": enqueue_load,
}


def everything_at_once(
    stack: Stack,
    tasks: int = 5000,
    *,
    every=(3.0, 6.0),
    mix: dict[str, float] | None = None,
    max_tries: int = 5,
    seed: int = 17,
    settings: dict | None = None,
) -> Result:
    """The faults in combination: senders and consumers SIGKILLed at random against a flaky SMTP server,
    with Redis restarted empty once and PostgreSQL restarted once along the way."""
    mix = mix or {"250": 0.7, "451": 0.1, "550": 0.05, "drop_before": 0.075, "drop_after": 0.075}
    run = Run(
        stack,
        "everything-at-once",
        tasks,
        flaky=mix,
        consumers=2,
        senders=3,
        seed=seed,
        MAX_TRY_COUNT=max_tries,
        SWEEP_LEAK_WINDOW=10,
        TASK_LEASE_SECONDS=10,
        **(settings or {}),
    )
    rng = random.Random(seed)
    run.enqueuer.start()
    probe = KillProbe(stack, run.answered_250)
    done = _nearly_done(run, 0.9)
    kills = Counter()
    restarts = []
    plan = ["redis", "postgres"]
    started = time.monotonic()
    while not done():
        time.sleep(rng.uniform(*every))
        if done():
            break
        role = rng.choice(["sender", "consumer"])
        group = run.workers.senders if role == "sender" else run.workers.consumers
        run.workers.replace(rng.choice(group))
        kills[role] += 1
        if role == "sender":
            probe.killed()
        if plan and time.monotonic() - started > (15 if plan[0] == "redis" else 35):
            fault = plan.pop(0)
            if fault == "redis":
                stack.restart_redis_empty(1.0)
                stack.redis.connection_pool.disconnect()
            else:
                stack.stop_postgres()
                time.sleep(3.0)
                stack.start_postgres()
            restarts.append(fault)
    probe.join()

    def audit(db):
        accepted = list(run.enqueuer.result.task_ids.values())
        return audit_against_server_log(
            db, accepted, run.server.records(), max_tries, kills=True, in_window=probe.attributed
        )

    result = run.finish(
        f"{kills['sender']} sender and {kills['consumer']} consumer SIGKILLs, restarts of "
        f"{' and '.join(restarts) or 'nothing'}, SMTP answering at random",
        audit=audit,
    )
    fates = Counter(r["fate"] for r in run.server.records())
    result.figures.update(
        {
            "sender kills": kills["sender"],
            "consumer kills": kills["consumer"],
            "restarts": restarts,
            "kills between acceptance and status write": probe.kills_in_window,
            "tasks accepted by SMTP but not recorded": probe.tasks_in_window,
            "server answers": dict(fates),
            "cancel reasons": dict(result.audit.cancel_reasons),
        }
    )
    lost_writes = lost_status_writes(run.workers.history)
    result.figures["status writes lost (sender errors in record)"] = lost_writes
    if lost_writes:
        result.problems.append(
            f"bug: {lost_writes} status write(s) failed on an error the sender does not retry (57P03 / "
            "connection reset): each such mail goes out again after its lease"
        )
    allowed = fates.get("drop_after", 0) + probe.tasks_in_window + lost_writes
    if result.audit.duplicates > allowed:
        result.problems.append(
            f"{result.audit.duplicates} duplicates > {fates.get('drop_after', 0)} lost final replies + "
            f"{probe.tasks_in_window} kills between acceptance and status write + {lost_writes} lost writes"
        )
    result.notes.append(
        f"duplicates come from {fates.get('drop_after', 0)} lost final replies and "
        f"{probe.tasks_in_window} kill(s) between the 250 and the status write"
        + ("; every final state matched the server's log" if not result.audit.unjustified else "")
    )
    return result


SCENARIOS["everything-at-once"] = everything_at_once
