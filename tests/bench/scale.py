"""Scenario 11: the same service with a million tasks in the table.

The rows are copied in (history first, then the live queued/processing rows so they are fresh),
spread round-robin over users of USER_ROWS tasks each, then ``VACUUM ANALYZE`` — what autovacuum
would have done by the time a table grew this big. Then, with nothing else running:
one sweep pass (and an idle one right after), the ``/task/queue`` page of one of those users, a
Prometheus scrape of the ``metrics`` function (the queue gauges), and the enqueue API again.
"""

from __future__ import annotations

import base64
import random
import time
from dataclasses import dataclass, field

import sqlalchemy as sa

from shared.delivery.attempt import _CLAIM_SQL  # the sender's own statement, timed as it is
from shared.delivery.inflight import INLINE_BYTES
from shared.maintenance.sweep import SweepReport, sweep_once
from tests.bench import seed
from tests.bench.api import Sizing, enqueue_load, knative_sizing
from tests.bench.load import LoadResult, build_request, closed_loop
from tests.bench.stack import MAIN_SOURCE, CpuMeter, Stack, wait_for_http

QUEUE_PATH = "/api/v1/task/queue"
METRICS_PATH = "/metrics"


@dataclass
class Meanwhile:
    """What each process used while a timed loop ran, in cores (CPU seconds per second of wall time):
    the function serving the loop, PostgreSQL (and its share by kind of process), Redis, the benchmark
    itself (the load generator) and processes outside the benchmark. A tail that waits on something
    else -- a checkpoint, an autovacuum worker, another program -- shows up here."""

    wall_seconds: float
    cpu_seconds: dict[str, float]
    postgres_seconds: dict[str, float]

    def cores(self, name: str) -> float:
        return self.cpu_seconds.get(name, 0.0) / self.wall_seconds if self.wall_seconds else 0.0

    def postgres_cores(self) -> dict[str, float]:
        if not self.wall_seconds:
            return {}
        return {kind: s / self.wall_seconds for kind, s in self.postgres_seconds.items()}


def metered(stack: Stack, function_pid: int, loop) -> tuple[LoadResult, Meanwhile]:
    meter = CpuMeter({"function": [function_pid], **stack.service_pids()}).start()
    started = time.perf_counter()
    result = loop()
    wall = time.perf_counter() - started
    cpu = meter.stop()
    return result, Meanwhile(wall, dict(cpu), dict(meter.postgres_kinds))


@dataclass
class ScaleResult:
    rows: int
    user_rows: int
    counts: dict[str, int]
    load_seconds: float
    sweep_seconds: float
    sweep: SweepReport
    idle_sweep_seconds: float
    page: LoadResult
    enqueue: LoadResult
    sizing: Sizing
    due: int = 0
    metrics: LoadResult | None = None  # GET /metrics, one scraper at a time
    claim: LoadResult | None = None  # the sender's claim statement on queued rows (rolled back)
    page_meanwhile: Meanwhile | None = None
    metrics_meanwhile: Meanwhile | None = None
    notes: list[str] = field(default_factory=list)


def cursor_for(last_id: int) -> str:
    # The format shared.tasks.views hands out ("v1:<id>", URL-safe base64 without padding).
    return base64.urlsafe_b64encode(f"v1:{last_id}".encode()).decode().rstrip("=")


def _vacuum(stack: Stack) -> None:
    raw = stack.ctx.engine.raw_connection()
    try:
        raw.rollback()
        driver = raw.driver_connection
        driver.autocommit = True  # VACUUM refuses to run inside a transaction block
        try:
            cursor = driver.cursor()
            cursor.execute("VACUUM ANALYZE tasks")
            cursor.execute("ANALYZE users")
            # The seeding wrote gigabytes: flush them now, or the checkpoint that does it lands in the
            # timed part and its writes stall the reads being timed (a 5M-row run saw page and metrics
            # p99 double that way).
            cursor.execute("CHECKPOINT")
        finally:
            driver.autocommit = False
    finally:
        raw.close()


def _note(progress, text: str) -> None:
    note = getattr(progress, "note", None)
    if note is not None:
        note(text)


def _timed_claims(stack: Stack, samples: int = 200) -> LoadResult:
    """The sender's claim (``UPDATE … WHERE id = … AND status = 'queued' … RETURNING`` the mail and its
    account) on queued rows spread over the table, each in its own transaction, rolled back so the
    table stays as it was."""
    settings = stack.settings
    with stack.ctx.engine.connect() as conn:
        ids = [
            r.id
            for r in conn.execute(
                sa.text("SELECT id FROM tasks WHERE status = 'queued' ORDER BY mod(id, 997), id LIMIT :k"),
                {"k": samples},
            )
        ]
        conn.rollback()
        result = LoadResult(0, 0, 0.0)
        for task_id in ids:
            params = {"id": task_id, "lease": settings.lease_seconds, "max_tries": settings.max_try_count,
                      "inline": INLINE_BYTES}  # fmt: skip
            # Open the transaction first: a statement the sender runs on its own (shared.prepared's
            # alone(), once merged) would otherwise commit by itself, and the rollback would undo nothing.
            conn.execute(sa.text("SELECT 1"))
            started = time.perf_counter()
            row = conn.execute(_CLAIM_SQL, params).one_or_none()
            elapsed = time.perf_counter() - started
            conn.rollback()
            result.seconds += elapsed
            if row is None:
                result.errors += 1
            else:
                result.requests += 1
                result.latencies_ms.append(elapsed * 1000)
    return result


def _timed_sweep(stack: Stack) -> tuple[float, SweepReport]:
    started = time.perf_counter()
    report = sweep_once(stack.settings, stack.ctx.engine, stack.ctx.redis)
    return time.perf_counter() - started, report


def scale(
    stack: Stack,
    *,
    rows: int,
    user_rows: int,
    live_rows: int | None = None,
    clients: int,
    seconds: float,
    page_seconds: float,
    warmup: float | None = None,
    progress=lambda n: None,
) -> ScaleResult:
    warmup = min(1.0, seconds / 2) if warmup is None else warmup
    stack.reset()
    # The three functions start while the table fills (idle until their load): their imports overlap
    # the seeding instead of adding to it.
    servers = {
        target: stack.spawn_function(MAIN_SOURCE, target, sizing.workers, sizing.threads)
        for target in ("task_queue", "metrics", "enqueue")
        for sizing in [knative_sizing(target)]
    }
    try:
        return _measure(stack, servers, rows, user_rows, live_rows, clients, seconds, page_seconds, warmup,
                        progress)  # fmt: skip
    finally:
        stack.stop(*(child for child, _ in servers.values()))


def _measure(stack, servers, rows, user_rows, live_rows, clients, seconds, page_seconds, warmup, progress):
    engine = stack.ctx.engine
    users = max(1, rows // user_rows)
    user_ids = [stack.user.id, *seed.extra_users(engine, stack.user.id, users - 1)]
    started = time.perf_counter()
    counts = seed.scale_table(engine, user_ids, rows, progress, live_rows=live_rows)
    _note(progress, "VACUUM ANALYZE")
    _vacuum(stack)
    load_seconds = time.perf_counter() - started
    due = counts.get("failed-due", 0) + counts.get("scheduled-due", 0)

    for child, port in servers.values():  # booted by now; nothing else runs while the sweep is timed
        wait_for_http(f"http://127.0.0.1:{port}/healthz/live", child)

    # The sweep first, while the live rows are seconds old: not leaked, leases running.
    _note(progress, "sweep")
    sweep_seconds, report = _timed_sweep(stack)
    idle_sweep_seconds, _ = _timed_sweep(stack)
    _note(progress, "claims")
    claim = _timed_claims(stack)
    with engine.connect() as conn:
        processing = conn.execute(sa.text("SELECT count(*) FROM tasks WHERE status = 'processing'")).scalar()
    if processing != counts.get("processing", 0):
        raise RuntimeError(f"timing the claims changed the table: {processing} rows processing")

    _note(progress, "/task/queue pages")
    port = servers["task_queue"][1]
    with engine.connect() as conn:
        low, high = conn.execute(
            sa.text("SELECT min(id), max(id) FROM tasks WHERE user_id = :u"), {"u": stack.user.id}
        ).one()
    rng = random.Random(7)
    headers = {"Authorization": f"Bearer {stack.token}"}
    # Half the requests ask for the first page, half for a page further in (a random cursor).
    pages = [
        build_request(
            "GET",
            QUEUE_PATH if i % 2 == 0 else f"{QUEUE_PATH}?cursor={cursor_for(rng.randint(low, high))}",
            port,
            headers=headers,
        )
        for i in range(200)
    ]
    page, page_meanwhile = metered(
        stack,
        servers["task_queue"][0].pid,
        lambda: closed_loop(
            port, lambda i: pages[i % len(pages)], clients=1, seconds=page_seconds, warmup=warmup
        ),
    )

    _note(progress, "/metrics scrapes")
    port = servers["metrics"][1]
    scrape = build_request("GET", METRICS_PATH, port)
    metrics, metrics_meanwhile = metered(
        stack,
        servers["metrics"][0].pid,
        lambda: closed_loop(port, lambda i: scrape, clients=1, seconds=page_seconds, warmup=warmup),
    )

    _note(progress, "enqueue API")
    enqueue = enqueue_load(stack, servers["enqueue"][1], clients=clients, seconds=seconds, warmup=warmup)
    enqueue_sizing = knative_sizing("enqueue")
    return ScaleResult(
        rows, rows // users, counts, load_seconds, sweep_seconds, report, idle_sweep_seconds, page, enqueue,
        enqueue_sizing, due, metrics=metrics, claim=claim, page_meanwhile=page_meanwhile,
        metrics_meanwhile=metrics_meanwhile,
    )  # fmt: skip
