"""The "bad network" fault run: a TCP fault proxy (tests/chaos/faultproxy.py) between every worker and
PostgreSQL, Redis and the SMTP server, while mail is enqueued at a steady pace (the API talks to
PostgreSQL and Redis directly, so enqueue goes on throughout):

1. 200 ms more per round trip, for a while;
2. a blackhole: nothing forwarded, no reset, sockets left open, for ``blackhole`` seconds; the
   connections caught in it stay dead afterwards (half-open for good), new ones work again;
3. every connection reset (RST on both sides).

Then the audit: nothing lost; every duplicate explained (an SMTP conversation cut after its final dot
went through, or a `sent` outcome that lost its fencing check because the lease ran out while the
write waited on the network); every half-open connection a worker was using given up by that worker
(the proxy sees it close), and how long that took per service; how long the pipeline took to deliver
again after each fault. The workers run with DATABASE_SOCKET_TIMEOUT=2 here (production's default is
60) so a half-open PostgreSQL connection is noticed within the run; Redis clients keep their own
timeouts (11 s for workers), SMTP the conversation's deadline and SMTP_TIMEOUT.
"""

from __future__ import annotations

import json
import re
import statistics
import time
from datetime import datetime
from urllib.parse import parse_qs, urlparse

import sqlalchemy as sa

from shared.local.sink import read_mailbox
from shared.workers import BLOCK_SECONDS
from tests.chaos import faultproxy
from tests.chaos.client import make_accounts
from tests.chaos.scenarios import Result, Run
from tests.chaos.stack import FAST_RECOVERY

ROUTES = ("postgresql", "redis", "smtp")
# The workers' Redis socket timeout: BLOCK_SECONDS + 10 (functions/cli.py, _worker_deps).
REDIS_WORKER_TIMEOUT = float(BLOCK_SECONDS + 10)
SLACK = 3.0  # seconds a loaded machine may add to a timeout before the harness calls it a hang


class NetworkRun(Run):
    def __init__(self, stack, tasks: int, **kwargs):
        super().__init__(stack, "bad-network", tasks, **kwargs)

    def start_servers(self, flaky, seed):
        sink = self.stack.start_sink()
        pg_socket = parse_qs(urlparse(self.stack.database_url).query)["unix_sock"][0]
        self.proxy = faultproxy.start(
            self.stack,
            {
                "postgresql": f"unix:{pg_socket}",
                "redis": f"127.0.0.1:{self.stack.redis_server.port}",
                "smtp": f"127.0.0.1:{sink.port}:smtp",
            },
        )
        return [sink, self.proxy]

    def worker_settings(self, settings: dict) -> dict:
        ports = self.proxy.ports
        return {
            **settings,
            "DATABASE_URL": f"postgresql+pg8000://postgres@127.0.0.1:{ports['postgresql']}/postgres",
            "REDIS_URL": f"redis://127.0.0.1:{ports['redis']}/0",
        }

    def make_accounts(self, users: int) -> list:
        return make_accounts(self.stack.base_url, self.proxy.ports["smtp"], users, self.tag)

    def before_stop(self) -> None:
        self.final_stats = self.proxy.stats()  # before the workers exit and close everything anyway
        (self.stack.workdir / f"{self.tag}-proxy.json").write_text(json.dumps(self.final_stats, indent=1))

    def arrivals(self) -> list[float]:
        """Arrival times at the sink (epoch seconds), in order."""
        return sorted(
            datetime.fromisoformat(r["received_at"]).timestamp()
            for r in read_mailbox(self.server.data_dir, limit=10**9)
        )

    def first_arrival_after(self, since: float, timeout: float = 120.0) -> float | None:
        """Seconds from ``since`` (epoch) to the first mail that arrived after it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            later = [t for t in self.arrivals() if t > since]
            if later:
                return later[0] - since
            time.sleep(0.2)
        return None


def bad_network(
    stack,
    tasks: int = 2000,
    *,
    rate: float = 20.0,
    latency: float = 0.2,
    warmup: float = 5.0,
    latency_for: float = 20.0,
    blackhole: float = 20.0,
    gap: float = 20.0,
    users: int = 8,
    seed: int = 19,
    settings: dict | None = None,
) -> Result:
    """Latency, then a blackhole, then resets between the workers and everything they talk to."""
    settings = {
        "TASK_LEASE_SECONDS": 15,
        "DATABASE_SOCKET_TIMEOUT": 2,
        "SWEEP_LEAK_WINDOW": 10,
        **(settings or {}),
    }
    run = NetworkRun(stack, tasks, rate=rate, users=users, seed=seed, **settings)
    proxy = run.proxy
    run.enqueuer.start()
    figures: dict[str, object] = {}

    time.sleep(warmup)
    before = _rate(run, warmup)
    proxy.latency(latency)
    time.sleep(latency_for)
    figures["mails/s before"] = before
    figures[f"mails/s with +{latency * 1000:.0f} ms"] = _rate(run, latency_for)
    proxy.latency(0)

    proxy.blackhole()
    time.sleep(blackhole)
    proxy.heal()
    healed = time.time()
    figures["first mail after the blackhole s"] = _round(run.first_arrival_after(healed))
    time.sleep(max(0.0, healed + gap - time.time()))

    reset_at = time.time()
    figures["connections reset"] = proxy.reset()
    figures["first mail after the reset s"] = _round(run.first_arrival_after(reset_at))

    result = run.finish(
        f"fault proxy between the workers and PostgreSQL, Redis and SMTP: +{latency * 1000:.0f} ms per round "
        f"trip for {latency_for:g} s, then a {blackhole:g} s blackhole (no reset; its connections left "
        f"half-open for good), then every connection reset"
    )
    result.figures.update(figures)
    caught_up = _caught_up(stack, result, healed), _caught_up(stack, result, reset_at)
    result.figures["every mail enqueued before the blackhole lifted settled after s"] = caught_up[0]
    result.figures["every mail enqueued before the reset settled after s"] = caught_up[1]
    detection = _detection(run, result)
    _explain_duplicates(run, result)
    result.notes.append(
        f"recovered: first mail {figures['first mail after the blackhole s']} s after the blackhole "
        f"lifted, {figures['first mail after the reset s']} s after the reset; every half-open "
        f"connection in use was given up by its worker ({detection})"
    )
    return result


def _rate(run: NetworkRun, seconds: float) -> float:
    now = time.time()
    return round(sum(1 for t in run.arrivals() if t > now - seconds) / seconds, 1)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _caught_up(stack, result: Result, since: float) -> float | None:
    """Seconds after ``since`` until the last task enqueued before it reached its final state."""
    ids = sorted(result.enqueue.task_ids.values())
    with stack.engine.connect() as conn:
        last = conn.execute(
            sa.text(
                "SELECT max(extract(epoch FROM updated_at)) FROM tasks "
                "WHERE id = ANY(CAST(:ids AS bigint[])) AND extract(epoch FROM created_at) < :since"
            ),
            {"ids": ids, "since": since},
        ).scalar_one()
    return None if last is None else round(float(last) - since, 1)


def _detection(run: NetworkRun, result: Result) -> str:
    """How the frozen connections ended, per service. A connection in use must be given up by its
    worker within that client's own timeout (plus some slack for a loaded machine); one the reset or
    the end of the run found still waiting after longer than that would have hung its thread.

    One kind cannot be judged here: a PostgreSQL connection whose startup the blackhole left unanswered
    (opened during it, or just before). pg8000 raises at its timeout but neither says goodbye nor
    closes the socket, which waits for Python's garbage collector (SQLAlchemy's exception chain holds
    it); the proxy sees it close at some later collection or at the reset. Those are counted apart."""
    stats, limits = run.final_stats, _timeouts(run.settings)
    summary = []
    for route in ROUTES:
        frozen = [c for c in stats["frozen"] if c["route"] == route]
        unjudged = [c for c in frozen if route == "postgresql" and not c["answered"]]
        used = [c for c in frozen if c["in_use_at"] is not None and c not in unjudged]
        waits = [c["gave_up_at"] - c["in_use_at"] for c in used if c["gave_up_at"] is not None]
        waiting = [c for c in used if c["gave_up_at"] is None]  # ended by the reset, or still open
        limit = limits[route] + SLACK
        hung = [c for c in waiting if (c["closed_at"] or stats["now"]) - c["in_use_at"] > limit]
        counts = {
            "frozen": len(frozen),
            "in use": len(used),
            "given up by the worker": len(waits),
            "after s (median, max)": (
                round(statistics.median(waits), 1) if waits else None,
                round(max(waits), 1) if waits else None,
            ),
            f"within its {limits[route]:g} s timeout when the reset came": len(waiting) - len(hung),
            "idle, never used again": len(frozen) - len(used) - len(unjudged),
        }
        if unjudged:
            counts["startup never answered (pg8000 leaves the socket to the garbage collector)"] = len(
                unjudged
            )
        result.figures[f"{route}: half-open connections"] = counts
        if hung:
            result.problems.append(
                f"{len(hung)} half-open {route} connection(s) in use that no worker gave up on within "
                f"{limit:g} s, e.g. {hung[:2]}"
            )
        if waits and max(waits) > limit:
            result.problems.append(f"a worker waited {max(waits):.1f} s on a half-open {route} connection")
        if waits:
            summary.append(f"{route} within {max(waits):.1f} s")
    result.figures["proxy counts"] = dict(stats["counts"])
    return ", ".join(summary)


def _timeouts(settings: dict) -> dict[str, float]:
    """The longest a worker should wait on a silent connection, per service, with these settings."""
    return {
        "postgresql": float(settings["DATABASE_SOCKET_TIMEOUT"]),
        "redis": REDIS_WORKER_TIMEOUT,
        "smtp": float(settings.get("SMTP_TIMEOUT", FAST_RECOVERY["SMTP_TIMEOUT"])),
    }


def _explain_duplicates(run: NetworkRun, result: Result) -> None:
    """Each duplicate needs a cause: a conversation cut after its final dot, a `sent` outcome that lost
    its fencing check (the lease ran out while the write waited), or a `sent` write that record() gave
    up on after retrying for its whole budget (max(30 s, the lease)) because PostgreSQL stayed out of
    reach. A write given up on for any other error is a bug."""
    cut = sum(n for k, n in run.final_stats["counts"].items() if k.endswith("cut after the final dot"))
    logs = "".join(p.log.read_text(errors="replace") for p in run.workers.history if p.name == "sender")
    stale = len(re.findall(r"outcome sent discarded", logs))
    out_of_budget, other = _given_up_writes(logs)
    result.figures.update(
        {
            "SMTP conversations cut after the final dot": cut,
            "sent outcomes discarded as stale": stale,
            "status writes given up after record's retry budget": out_of_budget,
            "status writes given up on another error": other,
        }
    )
    if other:
        result.problems.append(f"bug: {other} status write(s) given up on an error record() does not retry")
    explained = cut + stale + out_of_budget
    if result.audit.duplicates > explained:
        result.problems.append(
            f"{result.audit.duplicates} duplicates > {cut} conversations cut after the final dot + {stale} "
            f"stale sent outcomes + {out_of_budget} writes out of retry budget"
        )
    result.notes.append(
        f"{result.audit.duplicates} duplicate(s); possible causes: {cut} conversation(s) cut after the final "
        f"dot, {stale} sent outcome(s) that lost their fencing check, {out_of_budget} status write(s) that "
        "ran out of their retry budget while PostgreSQL was out of reach"
    )


# What record() retries: PostgreSQL out of reach (the names as a traceback's last line shows them).
_UNAVAILABLE_NAMES = re.compile(
    r"^(TimeoutError|Connection\w*Error|BrokenPipeError|\S*(InterfaceError|OperationalError))"
)


def _given_up_writes(logs: str) -> tuple[int, int]:
    """Outcome writes record() raised on: (PostgreSQL still unavailable at the end of its retry budget,
    any other error)."""
    budget = other = 0
    for entry in re.split(r"\n(?=\d{4}-\d\d-\d\d )", logs):
        if "unexpected error" not in entry or ", in record" not in entry:
            continue
        last = entry.strip().splitlines()[-1]
        if _UNAVAILABLE_NAMES.match(last):
            budget += 1
        else:
            other += 1
    return budget, other
