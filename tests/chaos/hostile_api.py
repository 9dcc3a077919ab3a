"""The "hostile API" fault run: one tenant attacks the API itself beside a well-behaved tenant.

The hostile tenant sends, all at once and for as long as the well-behaved tenant enqueues: expansion
requests (a single enqueue the size of the request limit whose unknown member holds ``[{},{},…]``, which
cost the worker 28 times its size before the parse was bounded) and a flood of ordinary enqueues from
several clients (mail for the year 2999, the shape that once grew the database unbounded). The run
checks that:

- every expansion request is refused with a 413 problem, and nothing answers 500;
- the well-behaved tenant's mails are all accepted and delivered exactly once (the usual audit), and its
  enqueue p99 stays under a budget;
- the API processes' resident memory (psutil, every 0.25 s) stays under the bound the pods are sized
  from: a warm process plus REQUEST_MEMORY_MULTIPLE x (LARGE_REQUEST_SLOTS x the request limit + the
  other threads x LARGE_BODY) (functions/http.py, deployment/gen_gateway.py).
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections import Counter
from urllib.parse import urlparse

import psutil

from functions import http as fhttp
from shared.config import Settings
from shared.tasks import content
from tests.chaos.client import Client, make_accounts
from tests.chaos.scenarios import Result, Run
from tests.chaos.tenants import RssSampler

MiB = 1024 * 1024
WARM_PROCESS_MIB = 192  # deployment/gen_gateway.py's BASE_MEMORY_MIB


def expansion_body(size: int) -> bytes:
    mail = {"recipient_email": "x@example.org", "subject": "x", "body": "x", "x": []}
    head = json.dumps(mail).encode()[:-2]
    n = (size - len(head) - 2) // 3
    return head + b"{}," * (n - 1) + b"{}]}"


def memory_bound_mib(threads: int) -> float:
    """What one API process may hold: a warm process and its requests at the multiple."""
    limit = content.request_limit(Settings.from_env({}))
    large = min(fhttp.LARGE_REQUEST_SLOTS, threads)
    bodies = fhttp.REQUEST_MEMORY_MULTIPLE * (large * limit + (threads - large) * fhttp.LARGE_BODY)
    return WARM_PROCESS_MIB + bodies / MiB


class Attack:
    """The hostile tenant's threads: expansion requests and an enqueue flood, until stopped."""

    def __init__(self, base_url: str, token: str, *, expanders: int, flooders: int, size: int):
        self.base_url, self.token, self.size = base_url, token, size
        self.answers: dict[str, Counter] = {"expansion": Counter(), "flood": Counter()}
        self.bad: list[str] = []
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._expand, daemon=True) for _ in range(expanders)]
        self._threads += [threading.Thread(target=self._flood, daemon=True) for _ in range(flooders)]

    def start(self) -> Attack:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        for t in self._threads:
            t.join(60)

    def _note(self, kind: str, status: int, body: object) -> None:
        with self._lock:
            self.answers[kind][status] += 1
            if status >= 500 and status != 503:
                self.bad.append(f"{kind}: {status} {body!r:.200}")

    def _expand(self) -> None:
        raw = expansion_body(self.size)
        url = urlparse(self.base_url)
        while not self.stopping.is_set():
            conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
            try:
                conn.request(
                    "POST",
                    "/api/v1/task/enqueue",
                    body=raw,
                    headers={"Content-Type": "application/json", "Authorization": f"Bearer {self.token}"},
                )
                response = conn.getresponse()
                self._note("expansion", response.status, response.read(300))
            except (OSError, http.client.HTTPException):
                self._note("expansion", 0, None)  # the server may close on a refused body: fine
            finally:
                conn.close()

    def _flood(self) -> None:
        client = Client(self.base_url)
        n = 0
        try:
            while not self.stopping.is_set():
                n += 1
                body = {"recipient_email": "flood@example.org", "subject": f"flood {n}", "body": "x"}
                body["scheduled_at"] = "2999-01-01T00:00:00Z"
                reply = client.call("POST", "/api/v1/task/enqueue", body, self.token)
                self._note("flood", reply.status, reply.body)
                if reply.status == 429:
                    time.sleep(min(float(reply.headers.get("retry-after", "1")), 1.0))
        finally:
            client.close()


def hostile_api(
    stack,
    tasks: int = 2000,
    *,
    rate: float = 50.0,
    expanders: int = 2,
    flooders: int = 4,
    p99_budget_ms: float = 2000.0,
    seed: int = 21,
) -> Result:
    """The well-behaved tenant's ``tasks`` mails at ``rate`` a second while the hostile tenant's
    ``expanders`` and ``flooders`` threads run; see the module's docstring for what is checked."""
    run = Run(stack, "hostile-api", tasks, users=1, clients=2, rate=rate, seed=seed)
    (hostile,) = make_accounts(stack.base_url, run.server.port, 1, run.tag, first=90)
    api = psutil.Process(stack.api.pid)
    rss = RssSampler([api.pid, *(c.pid for c in api.children(recursive=True))]).start()
    size = content.request_limit(Settings.from_env({})) - 1024
    attack = Attack(stack.base_url, hostile.token, expanders=expanders, flooders=flooders, size=size).start()
    run.enqueuer.start()
    try:
        run.enqueuer.join(600)
    finally:
        attack.stop()
        rss.stop()
    result = run.finish(
        f"{expanders} clients sending {size / MiB:.1f} MiB expansion requests and {flooders} flooding "
        "enqueues, one hostile tenant beside a well-behaved one"
    )
    peak = max(rss.mib(rss.peak.values()), default=0)
    first = max(rss.mib(rss.first.values()), default=0)
    bound = round(memory_bound_mib(stack.api_threads), 1)
    expansion, flood = attack.answers["expansion"], attack.answers["flood"]
    p99 = result.figures["enqueue p99 ms"]
    result.problems += attack.bad[:10]
    if set(expansion) - {413, 503, 0} or not expansion.get(413):
        result.problems.append(f"expansion requests answered {dict(expansion)} (each must be a 413)")
    if peak > bound:
        result.problems.append(f"an API process's RSS peaked at {peak} MiB (bound {bound} MiB)")
    if p99 > p99_budget_ms:
        result.problems.append(f"the well-behaved tenant's enqueue p99 {p99} ms > {p99_budget_ms:g} ms")
    result.figures.update(
        {
            "expansion answers": dict(expansion),
            "flood answers": dict(flood),
            "API RSS at start MiB": first,
            "API RSS peak MiB": peak,
            "API RSS bound MiB": bound,
        }
    )
    result.notes.append(
        f"expansion requests: {dict(expansion)}; flood: {dict(flood)}; well-behaved tenant's enqueue p99 "
        f"{p99} ms (budget {p99_budget_ms:g}); API RSS peak {peak} MiB per process (from {first}, "
        f"bound {bound})"
    )
    return result
