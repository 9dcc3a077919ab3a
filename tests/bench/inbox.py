"""Scenarios 5-7, 9 and 10: mail going in through the HTTP API while it goes out, as users feel it.

The `mailq dev`-like stack — the enqueue and batch functions under gunicorn as their Knative Services
are sized, one consumer and as many sender processes as the machine has cores — started once
(``Running``) and delivering into a fresh sink per scenario, which requires AUTH with each tenant's
own account.

5. N single enqueues by C clients back to back; the clock runs from the first request to the sink's
   arrival stamp of the N-th mail.
6. The same N mails through the batch endpoint, 100 per request.
10. Fairness: tenant A's burst of N mails (batches of 100) with nobody else, then again while
   tenant B enqueues one mail a second through the single endpoint until A's burst has arrived.
   B's latency runs from its enqueue call to the sink's stamp; A's throughput is compared with A
   alone, measured just before on the same processes.
7. Latency: single enqueues open-loop at half of 5's rate; from each request's due time to the
   sink's stamp of its mail.
9. Backlogs of several sizes drained as in scenario 2, on these warm processes.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from dataclasses import dataclass, field

import sqlalchemy as sa

from shared import queue
from tests.bench import seed
from tests.bench.api import ENQUEUE_PATH, LatencyResult, enqueue_requests, knative_sizing
from tests.bench.delivery import Delivery, _drain, _settled, _timeout
from tests.bench.load import Sent, build_request, closed_count, open_loop, percentile
from tests.bench.mailbox import MailboxTail, Verdict, verify
from tests.bench.stack import MAIN_SOURCE, Child, CpuMeter, Stack, wait_for_http

BATCH_PATH = "/api/v1/task/enqueue/batch"
BATCH_SIZE = 100
A_DOMAIN, B_DOMAIN = "example.org", "example.net"  # recipients of tenant A (seed.mail) and tenant B


class Running:
    """The `mailq dev`-like stack scenarios 5-7, 9 and 10 share: the enqueue and batch functions, one
    consumer and ``senders`` sender processes, started once and warm. ``fresh()`` gives each scenario
    an empty tasks table and a new, empty sink (the workers reconnect to it)."""

    def __init__(self, stack: Stack, senders: int, targets: tuple[str, ...] = ("enqueue", "enqueue_batch")):
        self.stack, self.senders, self.targets = stack, senders, targets
        self.ports: dict[str, int] = {}
        self.api: list[Child] = []
        self.workers: list[Child] = []
        self.sink: Child | None = None

    @property
    def children(self) -> list[Child]:
        return [*([self.sink] if self.sink else []), *self.api, *self.workers]

    def __enter__(self) -> Running:
        self.stack.reset()
        try:
            for target in self.targets:  # all starting at once: their imports overlap
                sizing = knative_sizing(target)
                child, self.ports[target] = self.stack.spawn_function(
                    MAIN_SOURCE, target, sizing.workers, sizing.threads
                )
                self.api.append(child)
            self.workers = self.stack.start_workers(self.senders)
            for child, port in zip(self.api, self.ports.values(), strict=True):
                wait_for_http(f"http://127.0.0.1:{port}/healthz/live", child)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.stack.stop(*reversed(self.children))

    def fresh(self, name: str) -> Running:
        """An empty tasks table and a new sink for the next scenario (nothing is in flight between)."""
        if self.sink is not None:
            self.stack.stop(self.sink)
            self.sink = None
        self.stack.empty_tasks()
        self.data_dir = self.stack.scratch(f"sink-{name}")
        self.sink = self.stack.start_sink(self.data_dir)
        self.tail = MailboxTail(self.data_dir)
        self._shown = 0  # arrivals already reported to the progress bar
        return self

    def meter(self) -> CpuMeter:
        return CpuMeter(
            {"sink": [self.sink.pid], "api": [c.pid for c in self.api], "consumer": [self.workers[0].pid],
             "senders": [w.pid for w in self.workers[1:]], **self.stack.service_pids()}
        ).start()  # fmt: skip

    def alive(self) -> None:
        for child in self.children:
            child.check()

    def wait(self, enough, timeout: float, progress=lambda n: None) -> None:
        """Poll the sink until ``enough(tail)`` or ``timeout``; a dead child raises."""
        deadline = time.monotonic() + timeout
        while True:
            count = self.tail.poll()
            progress(count - self._shown)
            self._shown = count
            if enough(self.tail) or time.monotonic() > deadline:
                return
            self.alive()
            time.sleep(0.05)

    def message_ids(self, user_id: int | None = None) -> dict[int, str]:
        sql = "SELECT id, message_id FROM tasks" + (" WHERE user_id = :u" if user_id else "")
        with self.stack.ctx.engine.connect() as conn:
            return dict(conn.execute(sa.text(sql), {"u": user_id}).all())


def batch_requests(token: str, port: int, size: int = BATCH_SIZE, variants: int = 4) -> list[bytes]:
    headers = {"Authorization": f"Bearer {token}"}
    requests = []
    for v in range(variants):
        tasks = []
        for i in range(v * size, (v + 1) * size):
            recipient, subject, body = seed.mail(i)
            tasks.append({"recipient_email": recipient, "subject": subject, "body": body})
        requests.append(build_request("POST", BATCH_PATH, port, body={"tasks": tasks}, headers=headers))
    return requests


def _task_ids(sent: list[Sent]) -> list[int]:
    ids = []
    for s in sent:
        if s.status != 202:
            continue
        answer = json.loads(s.body)
        if "items" in answer:
            ids += [item["task_id"] for item in answer["items"] if "task_id" in item]
        else:
            ids.append(answer["task_id"])
    return ids


def _burst(run: Running, n: int, clients: int, batch: int | None) -> tuple[threading.Thread, list[Sent]]:
    """Start N mails of tenant A going in (in a thread); returns the thread and its answers."""
    stack = run.stack
    if batch:
        port = run.ports["enqueue_batch"]
        requests, count = batch_requests(stack.token, port, batch), n // batch
    else:
        port = run.ports["enqueue"]
        requests, count = enqueue_requests(stack, port), n
    sent: list[Sent] = []

    def load() -> None:
        sent.extend(closed_count(port, lambda i: requests[i % len(requests)], clients=clients, count=count))

    loader = threading.Thread(target=load, name="burst", daemon=True)
    loader.start()
    return loader, sent


def api_to_inbox(
    run: Running, n: int, *, clients: int, batch: int | None = None, progress=lambda n: None
) -> Delivery:
    """N mails through the enqueue API (single, or ``batch`` per request) until the sink has all N."""
    stack, senders = run.stack, run.senders
    if batch:
        n = max(batch, n // batch * batch)
    run.fresh(f"inbox-{batch or 1}")
    meter = run.meter()
    loader, sent = _burst(run, n, clients, batch)
    run.wait(lambda t: t.count >= n or (not loader.is_alive() and t.count >= len(_task_ids(sent))),
             _timeout(n), progress)  # fmt: skip
    loader.join()
    run.tail.poll()
    cpu = meter.stop()
    started = min(s.due for s in sent)
    seconds = max(0.0, run.tail.last_arrival - started)
    ids = run.message_ids()
    verdict = verify(run.data_dir, ids.values())
    if len(ids) != n:  # a request failed: the mails it carried count as missing
        delivered = verdict.delivered
        verdict = Verdict(n, delivered, verdict.duplicates, n - delivered, verdict.unexpected)
    statuses = _settled(stack)
    errors = sum(1 for s in sent if s.status != 202)
    how = f"batches of {batch}" if batch else "single enqueues"
    note = f"{clients} clients, {how}, {senders} sender(s); {errors} failed requests"
    label = f"API to inbox, {how}"
    concurrency = senders * stack.settings.worker_count
    return Delivery(label, n, seconds, verdict, cpu, statuses, concurrency, note, meter.postgres_kinds)


@dataclass
class FairnessResult:
    n: int
    alone_seconds: float
    together_seconds: float
    verdict: Verdict
    b_sent: int
    b_accepted: int
    b_latencies_ms: list[float] = field(repr=False, default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    senders: int = 1

    @property
    def alone_rate(self) -> float:
        return self.n / self.alone_seconds if self.alone_seconds else 0.0

    @property
    def together_rate(self) -> float:
        return self.n / self.together_seconds if self.together_seconds else 0.0

    @property
    def ratio(self) -> float:
        return self.together_rate / self.alone_rate if self.alone_rate else 0.0

    @property
    def b_p50(self) -> float:
        return percentile(self.b_latencies_ms, 50)

    @property
    def b_p99(self) -> float:
        return percentile(self.b_latencies_ms, 99)

    @property
    def ok(self) -> bool:
        return self.verdict.exactly_once and set(self.statuses) <= {"sent"} and self.b_accepted == self.b_sent


def _quiet_tenant(port: int, token: str, stop: threading.Event, out: list[Sent]) -> None:
    """Tenant B: one enqueue a second (to its own domain) until ``stop``."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    begin, i = time.monotonic(), 0
    try:
        while not stop.wait(max(0.0, begin + i - time.monotonic())):
            body = json.dumps({"recipient_email": f"quiet{i}@{B_DOMAIN}", "subject": f"Reset code {i}",
                               "body": "Your password reset code is 123456.\n"})  # fmt: skip
            started = time.time()
            try:
                conn.request("POST", ENQUEUE_PATH, body, headers)
                response = conn.getresponse()
                out.append(Sent(started, time.time(), response.status, response.read()))
            except (OSError, http.client.HTTPException):
                conn.close()
                out.append(Sent(started, time.time(), 0, b""))
            i += 1
    finally:
        conn.close()


def fairness(
    run: Running, n: int, *, clients: int, batch: int = BATCH_SIZE, progress=lambda n: None
) -> FairnessResult:
    stack, senders = run.stack, run.senders
    n = max(batch, n // batch * batch)
    user_b, token_b = stack.tenant("tenant-b")
    run.fresh("fairness")
    # A alone.
    loader, sent = _burst(run, n, clients, batch)
    run.wait(lambda t: t.domains[A_DOMAIN] >= n, _timeout(n), progress)
    loader.join()
    alone = max(0.0, run.tail.last_arrival - min(s.due for s in sent))
    # A again, with B enqueueing one mail a second until A's burst has arrived.
    stop, quiet = threading.Event(), []
    b_thread = threading.Thread(
        target=_quiet_tenant, args=(run.ports["enqueue"], token_b, stop, quiet), daemon=True
    )
    loader, sent = _burst(run, n, clients, batch)
    b_thread.start()
    run.wait(lambda t: t.domains[A_DOMAIN] >= 2 * n, _timeout(n), progress)
    stop.set()
    b_thread.join()
    loader.join()
    a_ids = run.message_ids(stack.user.id)
    mine = [a_ids[t] for t in _task_ids(sent) if t in a_ids]
    run.tail.poll()
    last_a = max((run.tail.arrivals[m][0] for m in mine if m in run.tail.arrivals), default=0.0)
    together = max(0.0, last_a - min(s.due for s in sent))
    b_ids = run.message_ids(user_b.id)
    accepted = [(b_ids.get(t), s.due) for s in quiet if s.status == 202 for t in _task_ids([s])]
    run.wait(lambda t: t.domains[B_DOMAIN] >= len(accepted), 30.0)
    latencies = [(run.tail.arrivals[m][0] - due) * 1000 for m, due in accepted if m in run.tail.arrivals]
    verdict = verify(run.data_dir, run.message_ids().values())
    statuses = _settled(stack)
    return FairnessResult(
        n, alone, together, verdict, len(quiet), len(accepted), latencies, statuses, senders
    )


def latency(run: Running, *, rate: float, seconds: float, progress=lambda n: None) -> LatencyResult:
    """Open-loop single enqueues at ``rate`` for ``seconds`` while the pipeline delivers them."""
    stack = run.stack
    run.fresh("latency")
    port = run.ports["enqueue"]
    requests = enqueue_requests(stack, port)
    count = max(1, int(rate * seconds))
    meter = run.meter()
    sent = open_loop(port, lambda i: requests[i % len(requests)], rate=rate, count=count)
    due_by_task = {json.loads(s.body)["task_id"]: s.due for s in sent if s.status == 202}
    response_ms = [(s.answered - s.due) * 1000 for s in sent if s.status == 202]
    run.wait(lambda t: t.count >= len(due_by_task), _timeout(count), progress)
    cpu = meter.stop()
    ids = run.message_ids()
    verdict = verify(run.data_dir, ids.values())
    run.tail.poll()
    latencies = [
        (run.tail.arrivals[ids[task_id]][0] - due) * 1000
        for task_id, due in due_by_task.items()
        if ids.get(task_id) in run.tail.arrivals
    ]
    statuses = _settled(stack)
    return LatencyResult(
        rate, count, len(due_by_task), verdict, latencies, cpu, statuses, run.senders, response_ms
    )


def backlog(run: Running, n: int, progress=lambda n: None) -> Delivery:
    """Scenario 2's drain (N rows copied in, envelopes released at once) on the warm pipeline."""
    stack = run.stack
    run.fresh(f"backlog-{n}")
    rows = seed.queued_backlog(stack.ctx.engine, stack.user.id, n)
    seed.stage_envelopes(stack.ctx.redis, [task_id for task_id, _ in rows])
    meter = run.meter()
    seconds = _drain(
        stack, run.tail, n, run.children,
        lambda: seed.release(stack.ctx.redis, seed.HOLD, queue.TASK_LIST), progress,
    )  # fmt: skip
    cpu = meter.stop()
    verdict = verify(run.data_dir, (message_id for _, message_id in rows))
    statuses = _settled(stack)
    label = f"backlog of {n:,}, {run.senders} sender(s)"
    concurrency = run.senders * stack.settings.worker_count
    return Delivery(
        label, n, seconds, verdict, cpu, statuses, concurrency, postgres_kinds=meter.postgres_kinds
    )
