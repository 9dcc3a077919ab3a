"""`python -m tests.chaos`: run the fault scenarios at full size and print the reliability table.

    python -m tests.chaos                         # every scenario, thousands of tasks each (`make chaos`)
    python -m tests.chaos -s sender-kills -n 500  # one scenario, smaller
    python -m tests.chaos --report out.md --keep  # also write the table to a file; keep logs and databases

From the repository root (`tests` is not an installed package).

Exits 1 when any scenario broke a guarantee (a lost task, an unexplained duplicate, a 500, a crash).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from tests.chaos import hostile_api, network, relays, scenarios, tenants
from tests.chaos.scenarios import Result
from tests.chaos.stack import ROOT, Stack

SCENARIOS = {
    **scenarios.SCENARIOS,
    "hostile-tenants": tenants.hostile_tenants,
    "bad-network": network.bad_network,
    "hostile-api": hostile_api.hostile_api,
    **relays.SCENARIOS,
}

# The full-size runs: thousands of tasks; faults every few seconds. WORKER_COUNT (SMTP conversations per
# sender) is lowered where the fault must find a backlog waiting: Redis restarting empty has envelopes
# to destroy, PostgreSQL stopping has claims in flight.
FULL: dict[str, dict] = {
    "sender-kills": {"tasks": 5000, "senders": 3, "every": (2.0, 4.0)},
    "consumer-kills": {"tasks": 5000, "consumers": 2, "every": (2.0, 4.0)},
    "redis-restart": {"tasks": 5000, "at": 0.3, "downtime": 2.0, "settings": {"WORKER_COUNT": 4}},
    "postgres-restart": {"tasks": 5000, "at": 0.3, "downtime": 5.0, "settings": {"WORKER_COUNT": 4}},
    "flaky-smtp": {"tasks": 3000},
    "enqueue-load": {"tasks": 5000, "clients": 32, "budget_ms": 2000.0},
    "everything-at-once": {"tasks": 5000},
    "hostile-tenants": {"tasks": 3000, "hostile_each": 40, "rate": 50.0, "alone": True},
    "bad-network": {"tasks": 2000, "rate": 20.0},
    "hostile-api": {"tasks": 2000, "rate": 50.0, "expanders": 2, "flooders": 4},
    # The relay down for 10 minutes with production's retry settings (a whole retry budget is 90 s).
    "relay-outage": {"tasks": 2000, "downtime": 600.0},
    # 1000 mails for each of two tenants at 10 mails/s: about 100 s each, side by side.
    "throttling-relay": {"tasks": 2000},
}


def table(results: list[Result]) -> str:
    lines = [
        "| fault injected | tasks | sent | cancelled | lost | duplicates "
        "| why the duplicates / how it recovered |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        a = r.audit
        why = "; ".join(r.notes)
        if r.problems:
            why += " — **PROBLEMS: " + "; ".join(r.problems) + "**"
        lines.append(
            f"| **{r.name}**: {r.injected} | {r.tasks} | {a.sent} | {a.cancelled} | {a.lost} "
            f"| {a.duplicates} "
            f"| {why} |"
        )
    return "\n".join(lines)


def details(results: list[Result]) -> str:
    out = []
    for r in results:
        e = r.enqueue
        answers = ", ".join(f"{s or 'no answer'}: {n}" for s, n in sorted(e.statuses.items()))
        figures = "; ".join(f"{k}: {v}" for k, v in r.figures.items())
        out.append(f"- **{r.name}** ({r.seconds:.0f} s): enqueue answers {answers}; {figures}")
    return "\n".join(out)


def header(command: str) -> str:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except OSError:
        commit = "?"
    cpus = len(os.sched_getaffinity(0))
    return (
        f"Run {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, commit {commit}, `{command}`, "
        f"{platform.system()} {platform.machine()}, {cpus} CPU(s), Python {platform.python_version()}."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__.splitlines()[0])
    parser.add_argument("-s", "--scenario", action="append", choices=list(SCENARIOS), help="repeatable")
    parser.add_argument("-n", "--tasks", type=int, help="tasks per scenario (default: the full sizes)")
    parser.add_argument("--workdir", type=Path, help="where the databases and logs go (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory afterwards")
    parser.add_argument("--report", type=Path, help="also write the Markdown report here")
    args = parser.parse_args(argv)
    # Our own audit engine's pool logs a traceback for every connection PostgreSQL drops; that is the
    # fault working, not news.
    logging.getLogger("sqlalchemy.pool").setLevel(logging.CRITICAL)

    names = args.scenario or list(SCENARIOS)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mailq-chaos-"))
    command = "python -m tests.chaos " + " ".join(sys.argv[1:])
    if argv is None and len(sys.argv) == 1:
        command = "make chaos"
    results: list[Result] = []
    started = time.monotonic()
    print(f"fault runs in {workdir}", flush=True)
    stack = Stack(workdir)
    try:
        stack.start()
        for name in names:
            options = dict(FULL[name])
            if args.tasks:
                options["tasks"] = args.tasks
            print(f"\n== {name}: {options}", flush=True)
            result = SCENARIOS[name](stack, **options)
            results.append(result)
            print(("ok   " if result.ok else "FAIL ") + result.summary(), flush=True)
    finally:
        stack.close()
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    report = "\n\n".join(
        [header(command), table(results), details(results), f"Total {time.monotonic() - started:.0f} s."]
    )
    print("\n" + report)
    if args.report:
        args.report.write_text(report + "\n")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
