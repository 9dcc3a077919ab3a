"""The "hostile tenants" fault run: one well-behaved tenant beside five whose SMTP servers misbehave.

The well-behaved tenant sends to the `mailq sink`; the others to the servers of tests/chaos/hostile.py
(a trickled banner, trickled replies, an endless EHLO reply, silence after the final dot, 421 throttling),
all at once and interleaved, through the usual consumers and senders. The run checks that:

- every mail of the well-behaved tenant arrives exactly once (by Message-ID at its sink), and reports its
  enqueue-to-inbox latency (PostgreSQL's created_at to the sink's arrival time, one machine, one clock);
- every mail of a hostile tenant reached its server at most once, or ended with a reason in last_error
  that says why more copies are possible (a server that never answers the final dot may have kept each
  try's copy: the one duplicate SMTP cannot rule out);
- a server that never lets a conversation open (a banner trickled past the deadline, an endless EHLO
  reply) is the account's condition, not its mails': the account backs off and its mail spends no try,
  until it expires (their mails have a short expires_at for that);
- the senders' memory stays bounded (RSS sampled with psutil while the flood goes on).
"""

from __future__ import annotations

import re
import threading
from collections import Counter, defaultdict
from datetime import datetime

import psutil
import sqlalchemy as sa

from shared.config import DEADLINE_SHARE_OF_LEASE
from shared.local.sink import read_mailbox
from tests.chaos import hostile
from tests.chaos.client import make_accounts
from tests.chaos.scenarios import Result, Run

MAY_HAVE_ACCEPTED = "may have accepted the message"
# Kinds whose server never gets as far as a message: any copy there is a bug.
NEVER_STORES = ("trickle-banner", "flood")
# Kinds whose server refuses the account (not the mail): their mail waits without a try until it expires.
WAIT_FOR_EXPIRY = (*NEVER_STORES, "throttle-421")


class RssSampler:
    """Samples the resident memory of some processes every ``every`` seconds, in the background."""

    def __init__(self, pids: list[int], every: float = 0.25):
        self.procs = [psutil.Process(pid) for pid in pids]
        self.every = every
        self.first: dict[int, int] = {}
        self.peak: Counter = Counter()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> RssSampler:
        self._sample()
        self._thread.start()
        return self

    def _sample(self) -> None:
        for proc in self.procs:
            try:
                rss = proc.memory_info().rss
            except psutil.Error:
                continue  # gone (stopped at the end of the run)
            self.first.setdefault(proc.pid, rss)
            self.peak[proc.pid] = max(self.peak[proc.pid], rss)
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._sample()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def mib(self, values) -> list[float]:
        return [round(v / 2**20, 1) for v in values]


class TenantsRun(Run):
    """The frame of the run: the sink and the hostile servers, one account on each, interleaved."""

    def __init__(self, stack, tasks: int, *, hostile_each: int, lease: float, **kwargs):
        self.hostile_each, self.lease = hostile_each, lease
        super().__init__(stack, "hostile-tenants", tasks, TASK_LEASE_SECONDS=lease, **kwargs)

    def start_servers(self, flaky, seed):
        deadline = DEADLINE_SHARE_OF_LEASE * self.lease
        return [self.stack.start_sink(), hostile.start(self.stack, deadline, seed)]

    def make_accounts(self, users: int):
        sink, servers = self.servers
        self.good = make_accounts(self.stack.base_url, sink.port, 1, self.tag)[0]
        hostiles = []
        self.kinds: dict[int, str] = {}  # user id -> the kind of its server
        for i, kind in enumerate(hostile.KINDS, start=1):
            account = make_accounts(self.stack.base_url, servers.ports[kind], 1, self.tag, first=i)[0]
            hostiles.append(account)
            self.kinds[account.id] = kind
        # The enqueuer takes accounts round robin: about hostile_each mails per hostile tenant, spread
        # over the whole run between the well-behaved tenant's, which get the rest.
        per_round = max(len(hostiles) + 1, round(self.tasks / self.hostile_each))
        return [self.good] * (per_round - len(hostiles)) + hostiles

    def copies(self) -> Counter:
        sink, servers = self.servers
        return sink.counts() + servers.counts()


def hostile_tenants(
    stack,
    tasks: int = 3000,
    *,
    hostile_each: int = 40,
    rate: float | None = 50.0,
    lease: float = 4,
    max_tries: int = 3,
    memory_limit_mib: float | None = None,
    alone: bool = False,
    lifetime: int = 90,
    seed: int = 18,
    settings: dict | None = None,
) -> Result:
    """Five hostile tenants beside a well-behaved one; see the module's docstring for what is checked.

    ``memory_limit_mib``: fail the run when a sender's resident memory passes it (the short test sets a
    generous bound; the full run only reports the figure). ``alone``: afterwards, run the well-behaved
    tenant's mails again, same count and pace, without the hostile tenants, for a latency to compare
    with (on a shared machine the tail comes and goes with the neighbours' load)."""
    settings = {"MAX_TRY_COUNT": max_tries, **(settings or {})}
    run = TenantsRun(stack, tasks, hostile_each=hostile_each, lease=lease, rate=rate, seed=seed, **settings)
    # The mails of the servers that never (or seldom) let a conversation begin expire after ``lifetime``
    # (their expires_at: the API's MAX_QUEUE_LIFETIME is the stack's); the others' mails keep theirs.
    run.enqueuer.lifetimes = {i: lifetime for i, kind in run.kinds.items() if kind in WAIT_FOR_EXPIRY}
    rss = RssSampler([p.pid for p in run.workers.senders]).start()
    run.enqueuer.start()
    try:
        result = run.finish(
            f"{len(run.kinds)} hostile tenants ({', '.join(hostile.KINDS)}) beside one well-behaved "
            "tenant, their mails interleaved"
        )
    finally:
        rss.stop()
    rows = _rows(stack, set(result.enqueue.task_ids.values()))
    copies = run.copies()
    good = _judge_good(run, rows, copies, result)
    per_kind = _judge_hostile(run, rows, copies, result)
    if alone:
        count = sum(1 for r in rows if r.user_id == run.good.id)
        good += "; " + _alone(stack, count, rate and rate * count / len(rows), lease, settings, result)

    first, peak = max(rss.mib(rss.first.values()), default=0), max(rss.mib(rss.peak.values()), default=0)
    if memory_limit_mib is not None and peak > memory_limit_mib:
        result.problems.append(f"a sender's RSS peaked at {peak} MiB (bound: {memory_limit_mib:g} MiB)")
    result.figures.update({"sender RSS at start MiB": first, "sender RSS peak MiB": peak})
    silent = per_kind["silent-data"]
    result.notes.append(
        f"well-behaved tenant: {good}; hostile tenants: "
        + ", ".join(f"{k} {v['sent']} sent / {v['cancelled']} cancelled" for k, v in per_kind.items())
        + "; every duplicate is a copy the silent server kept of a try it never answered "
        f"({silent['copies']} copies of {silent['tasks']} mails, each cancelled with "
        f'"{MAY_HAVE_ACCEPTED}"); sender RSS peak {peak} MiB (from {first} MiB at start)'
    )
    return result


def _judge_good(run: TenantsRun, rows: list, copies: Counter, result: Result) -> str:
    """Every mail of the well-behaved tenant exactly once at its sink; its latency. Returns a summary."""
    good = [r for r in rows if r.user_id == run.good.id]
    once = [r for r in good if r.status == "sent" and copies.get(r.message_id) == 1]
    if len(once) != len(good):
        bad = sorted({r.id for r in good} - {r.id for r in once})
        result.problems.append(f"{len(bad)} well-behaved mail(s) not sent exactly once: {bad[:5]}")
    latencies = _latencies(once, run.servers[0].data_dir)
    p50, p99 = _percentile(latencies, 50), _percentile(latencies, 99)
    result.figures.update(
        {
            "well-behaved tenant sent exactly once": f"{len(once)} of {len(good)}",
            "its enqueue-to-inbox p50 ms": round(p50 * 1000),
            "p99 ms": round(p99 * 1000),
            "max ms": round(max(latencies, default=0) * 1000),
        }
    )
    return (
        f"{len(once)} of {len(good)} sent exactly once, enqueue-to-inbox p50 {p50 * 1000:.0f} ms, "
        f"p99 {p99 * 1000:.0f} ms"
    )


def _alone(stack, count: int, rate: float | None, lease: float, settings: dict, result: Result) -> str:
    """The well-behaved tenant's mails by themselves: their latency (and the usual audit)."""
    run = Run(stack, "hostile-tenants-alone", count, users=1, rate=rate, TASK_LEASE_SECONDS=lease, **settings)
    run.enqueuer.start()
    alone = run.finish("the well-behaved tenant alone")
    result.problems += [f"alone: {p}" for p in alone.problems]
    rows = _rows(stack, set(alone.enqueue.task_ids.values()))
    latencies = _latencies(rows, run.server.data_dir)
    p50, p99 = _percentile(latencies, 50), _percentile(latencies, 99)
    result.figures.update({"alone p50 ms": round(p50 * 1000), "alone p99 ms": round(p99 * 1000)})
    return f"the same mails alone, right after: p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms"


def _judge_hostile(run: TenantsRun, rows: list, copies: Counter, result: Result) -> dict[str, Counter]:
    """At most one copy of each hostile tenant's mail at its server, or a reason that says why there may
    be more; never a copy at a server that cannot get that far. Returns the counts per kind."""
    per_kind: dict[str, Counter] = {kind: Counter() for kind in hostile.KINDS}
    reasons: dict[str, Counter] = defaultdict(Counter)
    duplicated: Counter = Counter()
    for r in rows:
        n = copies.get(r.message_id, 0)
        kind = run.kinds.get(r.user_id)
        if kind is None:
            duplicated["well-behaved"] += n > 1
            continue
        duplicated[kind] += n > 1
        per_kind[kind].update({"tasks": 1, r.status: 1, "copies": n})
        if r.status == "cancelled":
            reasons[kind][_reason(r.last_error)] += 1
            if not r.last_error:
                result.problems.append(f"{kind}: task {r.id} cancelled without a reason")
        if n > 1 and (r.status == "sent" or MAY_HAVE_ACCEPTED not in (r.last_error or "")):
            result.problems.append(f"{kind}: task {r.id} reached its server {n} times ({r.last_error!r})")
        if n and kind in NEVER_STORES:
            result.problems.append(f"{kind}: task {r.id} reached a server that never gets that far")
        if kind in NEVER_STORES and r.try_count - r.budget_base:
            result.problems.append(f"{kind}: task {r.id} spent a try on a relay that never let it begin")
    if +duplicated and set(+duplicated) != {"silent-data"}:
        result.problems.append(f"duplicates beyond the silent server's: {dict(+duplicated)}")
    for kind, counts in per_kind.items():
        result.figures[kind] = dict(counts)
        if reasons[kind]:
            result.figures[f"{kind} cancelled because"] = dict(reasons[kind].most_common(3))
    return per_kind


def _rows(stack, ids: set[int]) -> list:
    with stack.engine.connect() as conn:
        result = conn.execute(
            sa.text(
                "SELECT id, user_id, status, try_count, budget_base, message_id, last_error, created_at "
                "FROM tasks WHERE id = ANY(CAST(:ids AS bigint[])) ORDER BY id"
            ),
            {"ids": sorted(ids)},
        )
        return list(result)


def _latencies(rows: list, data_dir) -> list[float]:
    """Seconds from each task's creation (PostgreSQL's clock) to its first arrival at the sink, sorted."""
    arrived = _first_arrivals(data_dir)
    return sorted(arrived[r.message_id] - r.created_at.timestamp() for r in rows if r.message_id in arrived)


def _first_arrivals(data_dir) -> dict[str, float]:
    """Message-ID -> when it first arrived at the sink (epoch seconds)."""
    first: dict[str, float] = {}
    for record in read_mailbox(data_dir, limit=10**9):
        at = datetime.fromisoformat(record["received_at"]).timestamp()
        first.setdefault(record.get("message_id"), at)
    return first


def _percentile(ordered: list[float], p: float) -> float:
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def _reason(error: str | None) -> str:
    """last_error without the address, the port and the try count, so equal causes count together."""
    text = re.sub(r"127\.0\.0\.1:\d+: ", "", error or "")
    text = re.sub(r"127\.0\.0\.1:\d+", "server", text)
    return re.sub(r"\d+ tries", "N tries", text)[:120]
