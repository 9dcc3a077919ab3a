"""What a worker process counts, and the /metrics endpoint it serves them on (Prometheus text format).

Each worker holds its own ``WorkerMetrics`` (its own registry, never the library's global one), so
two workers in one test process count apart. A worker process serves it on METRICS_PORT
(``serve``); 0 disables it. Counters only ever grow within a process; Prometheus's ``rate()``
handles the reset when a pod restarts or scales to zero.

Labels are bounded sets written here: a failure class, a cancellation reason, an envelope outcome.
Never a user id, an address, a host or a task id -- those would make one series per tenant or mail.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from shared.domain import AccountReason, CancelReason, Status

log = logging.getLogger("mailq.metrics")

TRANSIENT = "transient"
PERMANENT = "permanent"
FAILURE_CLASSES = (TRANSIENT, PERMANENT)
ENVELOPE_OUTCOMES = ("handed_off", "dropped")
# What became of one webhook request (shared.webhooks.worker's outcomes of an attempt that reached the
# receiver).
WEBHOOK_OUTCOMES = ("delivered", "retrying", "failed", "stale")

# One SMTP conversation: tens of milliseconds to a local relay, seconds to a slow one, at most the
# deadline (0.8 x TASK_LEASE_SECONDS, 240 s by default).
SMTP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 240.0)
# Enqueue to the server's "250": sub-second when idle, minutes in a backlog, hours across retries.
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0)


class WorkerMetrics:
    """The counters, histograms and gauges of one worker process (every family, all at zero)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.sent = Counter("mailq_mails_sent", "Mails the SMTP server accepted (recorded).", registry=r)
        self.failed = Counter(
            "mailq_mails_failed",
            "Attempts that failed: transient (4xx, timeout, lost connection) or permanent (5xx, unbuildable)",
            ["class"],
            registry=r,
        )
        self.cancelled = Counter(
            "mailq_mails_cancelled", "Tasks cancelled, by reason.", ["reason"], registry=r
        )
        self.claims = Counter("mailq_claims", "Tasks claimed for an attempt (a try spent).", registry=r)
        self.stale = Counter(
            "mailq_stale_outcomes",
            "Outcomes discarded by the fencing check (the task was claimed again since).",
            registry=r,
        )
        self.smtp_seconds = Histogram(
            "mailq_smtp_send_seconds",
            "Duration of one SMTP conversation, whatever its result.",
            buckets=SMTP_BUCKETS,
            registry=r,
        )
        self.enqueue_to_sent = Histogram(
            "mailq_enqueue_to_sent_seconds",
            "From enqueue (the task's created_at) to its recorded sent outcome.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.envelopes = Counter(
            "mailq_envelopes",
            "Envelopes the consumer took, by what it did with them.",
            ["outcome"],
            registry=r,
        )
        self.requeued = Counter("mailq_sweep_requeued", "Tasks the sweep put back in the queue.", registry=r)
        self.rescued = Counter(
            "mailq_sweep_rescued",
            "Envelopes the sweep returned from dead workers' processing lists.",
            registry=r,
        )
        self.webhooks = Counter(
            "mailq_webhook_deliveries",
            "Webhook requests a worker made, by what became of the delivery.",
            ["outcome"],
            registry=r,
        )
        self.webhook_seconds = Histogram(
            "mailq_webhook_request_seconds",
            "Duration of one webhook request, whatever its answer.",
            buckets=SMTP_BUCKETS,
            registry=r,
        )
        self.account_backoffs = Counter(
            "mailq_account_backoffs",
            "Steps of an account's backoff: its relay refused the account (no mail's try spent), by reason.",
            ["reason"],
            registry=r,
        )
        self.send_limit_waits = Counter(
            "mailq_send_limit_waits",
            "Times an account's declared send limit held its mail back (untaken until its window has room).",
            registry=r,
        )
        self.busy = Gauge("mailq_worker_busy_threads", "Conversation threads at work right now.", registry=r)
        self.threads = Gauge("mailq_worker_threads", "Conversation threads this process holds.", registry=r)
        # Every labelled series exists from the start, so rate() and absent() work before the first event.
        for name in FAILURE_CLASSES:
            self.failed.labels(name)
        for reason in CancelReason:
            self.cancelled.labels(reason.value)
        for outcome in ENVELOPE_OUTCOMES:
            self.envelopes.labels(outcome)
        for outcome in WEBHOOK_OUTCOMES:
            self.webhooks.labels(outcome)
        for reason in AccountReason:
            self.account_backoffs.labels(reason.value)

    # --- the sender ---

    def record_outcome(
        self, status: Status, reason: CancelReason | None, created_at: datetime, now: datetime
    ) -> None:
        """An outcome that passed the fencing check: what the attempt's result means for the counters."""
        if status == Status.SENT:
            self.sent.inc()
            self.enqueue_to_sent.observe(max(0.0, (now - created_at).total_seconds()))
        elif status == Status.FAILED:
            self.failed.labels(TRANSIENT).inc()
        elif status == Status.CANCELLED:
            transient = reason == CancelReason.TRIES_EXHAUSTED  # the last of its tries failed transiently
            self.failed.labels(TRANSIENT if transient else PERMANENT).inc()
            self.cancel(reason or CancelReason.PERMANENT_FAILURE)

    def cancel(self, reason: CancelReason, count: int = 1) -> None:
        if count:
            self.cancelled.labels(CancelReason(reason).value).inc(count)

    def watch_busy(self, busy: Callable[[], int], threads: int) -> None:
        """Read the busy-thread count on every scrape (the sender's ``busy()``)."""
        self.busy.set_function(busy)
        self.threads.set(threads)

    # --- the consumer and the sweep ---

    def count_envelopes(self, outcomes: Iterable) -> None:
        for outcome in outcomes:
            name = getattr(outcome, "value", outcome)
            if name in ENVELOPE_OUTCOMES:
                self.envelopes.labels(name).inc()

    def record_sweep(self, report) -> None:
        """One sweep pass (a ``shared.maintenance.sweep.SweepReport``)."""
        self.requeued.inc(report.requeued)
        self.rescued.inc(report.rescued)
        self.cancel(CancelReason.LOST_IN_FLIGHT, report.lost_in_flight)
        self.cancel(CancelReason.TRIES_EXHAUSTED, report.cancelled - report.lost_in_flight)
        self.cancel(CancelReason.EXPIRED, getattr(report, "expired", 0))


def bind_address(production: bool) -> str:
    """Every interface in a pod (Prometheus scrapes the pod's address); loopback only on a laptop."""
    return "0.0.0.0" if production else "127.0.0.1"


def serve(metrics: WorkerMetrics, port: int, address: str):
    """Serve ``metrics`` on http://address:port/metrics in a daemon thread; None when port is 0.

    A port that cannot be bound is logged, not fatal: mail must not stop because a scrape cannot happen.
    """
    if port == 0:
        return None
    try:
        server, _thread = start_http_server(port, addr=address, registry=metrics.registry)
    except OSError as exc:
        log.error("metrics: cannot listen on %s:%d (%s); this process serves no /metrics", address, port, exc)
        return None
    log.info("metrics on http://%s:%d/metrics", address, server.server_address[1])
    return server
