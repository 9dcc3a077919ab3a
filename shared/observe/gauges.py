"""The queue gauges: how much is waiting, how long the oldest has waited, who is alive to send it.

Computed on demand (a scrape of the ``metrics`` function, ``mailq status``) from PostgreSQL and
Redis, every figure from an index or an O(1) Redis read, so a scrape costs milliseconds whatever the
table's size (``make bench`` measures it at a million rows; tests/test_gauges.py checks the plans):

- **pending statuses, exact**: scheduled, queued, processing and failed are counted from
  ``tasks_pending_status``, a partial index holding only the rows still to go out (the table's
  history is never read);
- **terminal statuses, exact up to a cap**: sent and cancelled are counted exactly while there are at
  most FINISHED_CAP of them together (one pass over at most that many entries of ``tasks_retention``,
  the finished rows' index, stopped by a LIMIT), so right after the first mails went out the figures
  say so; beyond the cap an exact count would read the whole history (a million rows is ~100 ms) and
  ``finished`` is left empty;
- **terminal statuses, estimated**: from the planner's statistics (``pg_class``'s row count less the
  exact pending ones, split by ``pg_stats``' frequencies), as fresh as the last ANALYZE (autovacuum's:
  minutes after a burst, nothing at all before a small table's first). The workers' counters are the
  exact rates.
- **the oldest due**: the earliest of (a) the oldest queued first try's ``scheduled_at`` (when it
  became due), (b) the oldest queued task's ``next_attempt_at`` (when it was last pushed: a retry's
  due time, reset when the sweep re-pushes a task waiting past SWEEP_LEAK_WINDOW), (c) the oldest
  due scheduled/failed task the sweep has not put back yet. Paused accounts' mail is left out: it
  waits for its user's new credentials, not for us (``mailq_paused_accounts`` shows them). Each
  queued part looks at the OLDEST_SCAN oldest candidates at most.
- **Redis**: the task list and the senders' ring (LLEN), the mail waiting in tenants' queues (one
  script summing ZCARD over the ring and the paused set, skipped beyond MAX_TENANTS), the envelopes
  held in workers' processing lists, and the workers whose heartbeat is alive, by role.

No label is ever a user id, an address or a host: statuses, list names and roles are fixed words.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import redis
import sqlalchemy as sa
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy.engine import Engine

from shared import queue
from shared.config import Settings
from shared.domain import PENDING, Status
from shared.pending import FINAL_STATUSES, pending_work_sql
from shared.tasks.stats import COUNT_CAP

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # Prometheus's text exposition format
ESTIMATED = (Status.SENT, Status.CANCELLED)
FINISHED_CAP = COUNT_CAP  # sent and cancelled tasks counted exactly, at most (the dashboard's cap)
ROLES = ("consumer", "sender")  # reported even at zero; another role appears once one registers
OLDEST_SCAN = 200  # candidates the oldest-due query looks at past paused accounts' mail, at most
MAX_TENANTS = 10_000  # tenant queues summed at most by one scrape; beyond, send_queues is left out
MAX_WORKERS = 1000  # registered workers looked at, at most
LISTS = ("tasks", "send_ready", "send_queues", "processing")

_OLDEST_QUEUED = """(SELECT min(c.at) FROM (
            SELECT {column} AS at, user_id FROM tasks WHERE {where} ORDER BY {column} LIMIT :scan
        ) AS c JOIN users AS u ON u.id = c.user_id WHERE u.smtp_paused_at IS NULL)"""


def _tasks_sql(settings: Settings) -> sa.TextClause:
    # One pass over tasks_pending_status, already in status order. "scheduled_at IS NOT NULL" is always
    # true (a NOT NULL column); the index's predicate carries it so that only this query, which says it
    # too, ever picks that index -- never the sweep's queries, which have their own.
    pending = ", ".join(f"'{s.value}'" for s in PENDING)
    counts = f"""(SELECT json_object_agg(c.status, c.n) FROM (
            SELECT status, count(*) AS n FROM tasks
             WHERE status IN ({pending}) AND scheduled_at IS NOT NULL GROUP BY status
        ) AS c) AS counts"""  # noqa: S608 - enum constants
    # At most FINISHED_CAP + 1 entries of tasks_retention (its predicate is exactly this condition),
    # in its order: more than the cap means "too many to count".
    finished = f"""(SELECT json_object_agg(f.status, f.n) FROM (
            SELECT status, count(*) AS n FROM (
                SELECT status FROM tasks WHERE {FINAL_STATUSES} ORDER BY updated_at LIMIT :finished_scan
            ) AS capped GROUP BY status
        ) AS f) AS finished"""  # noqa: S608 - a constant of shared.pending
    first_try = _OLDEST_QUEUED.format(column="scheduled_at", where="status = 'queued' AND try_count = 0")
    pushed = _OLDEST_QUEUED.format(column="next_attempt_at", where="status = 'queued'")
    return sa.text(
        f"""
        SELECT {counts},
               {finished},
               GREATEST(0, EXTRACT(EPOCH FROM now() - LEAST(
                   {first_try},
                   {pushed},
                   (SELECT min(next_attempt_at) FROM tasks
                     WHERE status IN ('scheduled', 'failed') AND next_attempt_at <= now())
               ))) AS oldest_due,
               ({pending_work_sql(settings.sweep_leak_window, settings.task_retention_days)}) AS sweep_pending
        """  # noqa: S608 - statuses are enum constants, the leak window an integer setting
    )


# The planner's view of the table: its row count and how often each status appears (last ANALYZE).
_STATISTICS_SQL = sa.text(
    """
    SELECT c.reltuples,
           CAST(CAST(s.most_common_vals AS text) AS text[]) AS statuses,
           s.most_common_freqs AS freqs
      FROM pg_class AS c
      LEFT JOIN pg_stats AS s
        ON s.schemaname = current_schema() AND s.tablename = 'tasks' AND s.attname = 'status'
     WHERE c.oid = CAST('tasks' AS regclass)
    """
)

# KEYS: ring, paused.  ARGV: queue prefix, tenant cap. The mail waiting in every tenant's queue
# (a tenant with mail is in the ring, or paused); -1 when there are more tenants than the cap.
_SEND_QUEUES = """
local cap = tonumber(ARGV[2])
if redis.call('LLEN', KEYS[1]) + redis.call('SCARD', KEYS[2]) > cap then return -1 end
local total = 0
for _, tenant in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do
  total = total + redis.call('ZCARD', ARGV[1] .. tenant)
end
for _, tenant in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  total = total + redis.call('ZCARD', ARGV[1] .. tenant)
end
return total
"""


@dataclass
class Gauges:
    tasks: dict[str, int]  # pending statuses, exact
    estimated: dict[str, int]  # terminal statuses, from the planner's statistics ({} before an ANALYZE)
    oldest_due_seconds: float
    sweep_pending: int  # what the next sweep would put back (the KEDA ScaledJob's query)
    lists: dict[str, int]  # LISTS; send_queues is absent beyond MAX_TENANTS
    paused_accounts: int
    workers_alive: dict[str, int] = field(default_factory=dict)
    # sent and cancelled, exact; {} when there are more than FINISHED_CAP of them (see ``estimated``)
    finished: dict[str, int] = field(default_factory=dict)
    # Accounts whose mail cannot go out now, "state:reason" -> how many (paused: until their settings
    # change; backing_off: their relay refused them); from the users' partial indexes.
    accounts_waiting: dict[str, int] = field(default_factory=dict)


_ACCOUNTS_SQL = sa.text(
    """
    SELECT 'paused' AS state, COALESCE(smtp_paused_code, 'credentials') AS reason, count(*) AS n
      FROM users WHERE smtp_paused_at IS NOT NULL GROUP BY 2
    UNION ALL
    SELECT 'backing_off', smtp_backoff_code, count(*)
      FROM users WHERE smtp_backoff_since IS NOT NULL GROUP BY 2
    """
)

STATISTICS_TTL = 60.0  # seconds a process reuses the planner's statistics (they change at ANALYZE only)
_statistics: dict[str, tuple[float, Any]] = {}


def read(
    settings: Settings, engine: Engine, client: redis.Redis, *, statistics_ttl: float = STATISTICS_TTL
) -> Gauges:
    """Every gauge, now: two PostgreSQL round trips (and one a minute for the statistics), two to Redis."""
    with engine.connect() as conn:
        row = conn.execute(
            _tasks_sql(settings), {"scan": OLDEST_SCAN, "finished_scan": FINISHED_CAP + 1}
        ).one()
        accounts = {f"{r.state}:{r.reason}": int(r.n) for r in conn.execute(_ACCOUNTS_SQL)}
        key = settings.database_url
        cached = _statistics.get(key)
        if cached is None or time.monotonic() - cached[0] >= statistics_ttl:
            cached = _statistics[key] = (time.monotonic(), conn.execute(_STATISTICS_SQL).one())
        stats = cached[1]
    counts = row.counts if isinstance(row.counts, dict) else json.loads(row.counts or "{}")
    pending = {s.value: int(counts.get(s.value, 0)) for s in PENDING}
    done = row.finished if isinstance(row.finished, dict) else json.loads(row.finished or "{}")
    exact = sum(done.values()) <= FINISHED_CAP
    gauges = Gauges(
        tasks=pending,
        finished={s.value: int(done.get(s.value, 0)) for s in ESTIMATED} if exact else {},
        estimated=_estimates(stats, sum(pending.values())),
        oldest_due_seconds=float(row.oldest_due or 0),
        sweep_pending=int(row.sweep_pending),
        lists={},
        paused_accounts=0,
        accounts_waiting=accounts,
    )
    _read_redis(client, gauges)
    return gauges


def _estimates(stats, pending: int) -> dict[str, int]:
    if stats.reltuples is None or stats.reltuples < 0 or not stats.statuses:  # never analysed yet
        return {}
    freqs = dict(zip(stats.statuses, stats.freqs, strict=False))
    terminal = {s.value: freqs.get(s.value, 0.0) for s in ESTIMATED}
    share = sum(terminal.values())
    rows = max(0.0, float(stats.reltuples) - pending)
    return {s: round(rows * f / share) if share else 0 for s, f in terminal.items()}


def _read_redis(client: redis.Redis, gauges: Gauges) -> None:
    pipe = client.pipeline(transaction=False)
    pipe.llen(queue.TASK_LIST)
    pipe.llen(queue.SEND_READY)
    pipe.scard(queue.PAUSED)
    pipe.eval(_SEND_QUEUES, 2, queue.SEND_READY, queue.PAUSED, queue.SEND_QUEUE_PREFIX, MAX_TENANTS)
    pipe.hkeys(queue.WORKERS)
    tasks, ready, paused, waiting, workers = pipe.execute()
    ids = [w.decode() for w in workers[:MAX_WORKERS]]
    pipe = client.pipeline(transaction=False)
    for worker_id in ids:
        pipe.exists(queue.heartbeat_key(worker_id))
        pipe.llen(queue.processing_list(worker_id))
    answers = pipe.execute() if ids else []
    alive = dict.fromkeys(ROLES, 0)
    for worker_id, beating in zip(ids, answers[0::2], strict=True):
        role = worker_id.split(":", 1)[0]
        if beating and role.isalpha():  # roles are code constants; anything else is not counted
            alive[role] = alive.get(role, 0) + 1
    gauges.lists = {"tasks": tasks, "send_ready": ready, "processing": sum(answers[1::2])}
    if waiting >= 0:
        gauges.lists["send_queues"] = waiting
    gauges.paused_accounts = paused
    gauges.workers_alive = alive


class _Collector:
    def __init__(self, gauges: Gauges):
        self.gauges = gauges

    def collect(self):
        g = self.gauges
        yield _labelled("mailq_tasks", "Tasks still to go out, by status (exact).", "status", g.tasks)
        yield _labelled(
            "mailq_tasks_finished",
            f"Tasks in a final status, exact while there are at most {FINISHED_CAP} of them together "
            "(absent beyond: see mailq_tasks_estimated).",
            "status",
            g.finished,
        )
        yield _labelled(
            "mailq_tasks_estimated",
            "Tasks in a final status, estimated from PostgreSQL's statistics (as of the last ANALYZE).",
            "status",
            g.estimated,
        )
        yield GaugeMetricFamily(
            "mailq_oldest_due_seconds",
            "Age of the oldest task that is due and not yet sent (paused accounts left out).",
            value=g.oldest_due_seconds,
        )
        yield GaugeMetricFamily(
            "mailq_sweep_pending",
            "Tasks the next sweep would put back (the sweep's KEDA trigger).",
            value=g.sweep_pending,
        )
        yield _labelled(
            "mailq_list_length",
            "Envelopes in mailq's Redis lists: tasks (to the consumers), send_ready (tenants with mail "
            "to take), send_queues (mail waiting in tenants' queues), processing (held by workers).",
            "list",
            g.lists,
        )
        yield GaugeMetricFamily(
            "mailq_paused_accounts",
            "Accounts whose SMTP login was refused (their mail waits).",
            value=g.paused_accounts,
        )
        yield _labelled(
            "mailq_workers_alive", "Workers whose heartbeat is alive, by role.", "role", g.workers_alive
        )
        waiting = GaugeMetricFamily(
            "mailq_accounts_waiting",
            "Accounts whose mail cannot go out now: paused (until their settings change) or backing off "
            "(their relay refused them), by reason.",
            labels=["state", "reason"],
        )
        for key, n in g.accounts_waiting.items():
            waiting.add_metric(key.split(":", 1), n)
        yield waiting


def _labelled(name: str, documentation: str, label: str, values: dict[str, float]) -> GaugeMetricFamily:
    """A gauge family with one series per key of ``values``."""
    family = GaugeMetricFamily(name, documentation, labels=[label])
    for key, n in values.items():
        family.add_metric([key], n)
    return family


def render(gauges: Gauges) -> bytes:
    """The gauges in Prometheus's text format."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(gauges))
    return generate_latest(registry)
