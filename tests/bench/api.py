"""Scenario 4: the enqueue function over HTTP, served as production serves it.

C keep-alive clients for T seconds against ``functions-framework --target enqueue`` under gunicorn
with the WORKERS/THREADS of its Knative Service, then the same against a trivial function on the
same stack: the ratio is what enqueue's own work costs. (``LatencyResult`` is scenario 7's, measured
by tests/bench/inbox.py.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tests.bench import seed
from tests.bench.load import LoadResult, build_request, closed_loop, percentile
from tests.bench.mailbox import Verdict
from tests.bench.stack import MAIN_SOURCE, ROOT, TRIVIAL_SOURCE, Stack

ENQUEUE_PATH = "/api/v1/task/enqueue"
DEFAULT_SIZING = (1, 8)  # WORKERS, THREADS when knative/ cannot be read


@dataclass(frozen=True)
class Sizing:
    workers: int
    threads: int
    source: str  # where the numbers came from

    def __str__(self) -> str:
        return f"WORKERS={self.workers} THREADS={self.threads} ({self.source})"


def knative_sizing(target: str) -> Sizing:
    """WORKERS and THREADS of ``target``'s Knative Service in knative/functions.yaml."""
    path = ROOT / "knative" / "functions.yaml"
    try:
        import yaml

        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") != "Service":
                continue
            if doc["metadata"].get("labels", {}).get("mailq.dev/function") != target:
                continue
            env = {e["name"]: e.get("value") for e in doc["spec"]["template"]["spec"]["containers"][0]["env"]}
            return Sizing(int(env["WORKERS"]), int(env["THREADS"]), "knative/functions.yaml")
    except (ImportError, OSError, KeyError, TypeError, ValueError):
        pass
    return Sizing(*DEFAULT_SIZING, "default: knative/functions.yaml not readable")


def enqueue_requests(stack: Stack, port: int, variants: int = 64) -> list[bytes]:
    """Pre-encoded enqueue requests (the client must cost less than the server)."""
    headers = {"Authorization": f"Bearer {stack.token}"}
    requests = []
    for i in range(variants):
        recipient, subject, body = seed.mail(i)
        payload = {"recipient_email": recipient, "subject": subject, "body": body}
        requests.append(build_request("POST", ENQUEUE_PATH, port, body=payload, headers=headers))
    return requests


@dataclass
class ApiResult:
    trivial: LoadResult
    enqueue: LoadResult
    sizing: Sizing
    clients: int

    @property
    def ratio(self) -> float:
        return self.enqueue.rps / self.trivial.rps if self.trivial.rps else 0.0


def measure_function(
    stack: Stack, source, target: str, sizing: Sizing, *, clients: int, seconds: float, warmup: float
) -> LoadResult:
    child, port = stack.start_function(source, target, sizing.workers, sizing.threads)
    try:
        return enqueue_load(stack, port, clients=clients, seconds=seconds, warmup=warmup)
    finally:
        stack.stop(child)


def enqueue_load(stack: Stack, port: int, *, clients: int, seconds: float, warmup: float) -> LoadResult:
    """``clients`` keep-alive clients enqueueing for ``seconds`` against the function on ``port``."""
    requests = enqueue_requests(stack, port)
    return closed_loop(
        port, lambda i: requests[i % len(requests)], clients=clients, seconds=seconds, warmup=warmup, ok=202
    )


def enqueue_api(
    stack: Stack, *, clients: int, seconds: float, warmup: float | None = None, on_done=lambda n: None
) -> ApiResult:
    warmup = min(1.0, seconds / 2) if warmup is None else warmup
    stack.reset()
    sizing = knative_sizing("enqueue")
    trivial = measure_function(
        stack, TRIVIAL_SOURCE, "trivial", sizing, clients=clients, seconds=seconds, warmup=warmup
    )
    on_done(1)
    enqueue = measure_function(
        stack, MAIN_SOURCE, "enqueue", sizing, clients=clients, seconds=seconds, warmup=warmup
    )
    on_done(1)
    return ApiResult(trivial, enqueue, sizing, clients)


@dataclass
class LatencyResult:
    rate: float  # requests per second offered
    sent: int
    accepted: int  # 202 answers
    verdict: Verdict
    latencies_ms: list[float] = field(repr=False, default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)
    statuses: dict[str, int] = field(default_factory=dict)
    senders: int = 1
    response_ms: list[float] = field(repr=False, default_factory=list)  # due -> the 202 answer

    @property
    def p50(self) -> float:
        return percentile(self.latencies_ms, 50)

    @property
    def p99(self) -> float:
        return percentile(self.latencies_ms, 99)

    @property
    def ok(self) -> bool:
        return self.accepted == self.sent and self.verdict.exactly_once and set(self.statuses) <= {"sent"}
