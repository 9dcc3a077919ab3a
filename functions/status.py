"""`mailq status`: the operator's view, as tables (rich) or JSON (--json).

Without --cluster it reads the queue figures (``shared.observe.gauges``) straight from PostgreSQL and Redis:
DATABASE_URL/REDIS_URL when both are set, otherwise the running `mailq dev` that wrote
``<data dir>/dev.json``. With --cluster it shows what the `kubernetes` client sees
(``functions.cluster``) and then the same figures, as the cluster's own metrics function computes them.

Needs the `ops` extra (rich, kubernetes): left out of the cluster image like the local stack.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table

from functions.dev import DEV_STATE
from shared.config import Settings


class NoStack(Exception):
    """Nothing to look at: no URLs in the environment and no running `mailq dev` in the data directory."""


# --- where the figures come from --------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def local_source(data_dir: Path, environ) -> dict[str, Any]:
    """{database_url, redis_url, origin, metrics}: from the environment, or a running `mailq dev`."""
    if environ.get("DATABASE_URL") and environ.get("REDIS_URL"):
        return {
            "database_url": environ["DATABASE_URL"],
            "redis_url": environ["REDIS_URL"],
            "origin": "DATABASE_URL and REDIS_URL",
            "metrics": {},
        }
    path = Path(data_dir).resolve() / DEV_STATE
    if not path.exists():
        raise NoStack(
            f"no running `mailq dev` in {path.parent} (no {DEV_STATE}) and DATABASE_URL/REDIS_URL are not "
            "both set; start one with `make run`, pass --data-dir, or use --cluster"
        )
    state = json.loads(path.read_text())
    if not _alive(int(state.get("pid", 0))):
        raise NoStack(f"the `mailq dev` that wrote {path} (pid {state.get('pid')}) is no longer running")
    return {
        "database_url": state["database_url"],
        "redis_url": state["redis_url"],
        "origin": f"`mailq dev` at {state['api']} (pid {state['pid']})",
        "metrics": state.get("metrics", {}),
    }


def local_figures(settings: Settings) -> dict[str, Any]:
    """The queue figures, read now from the databases ``settings`` points at."""
    from shared.context import make_redis
    from shared.db import make_engine
    from shared.observe import gauges

    engine = make_engine(settings.database_url, pool_size=1, max_overflow=0)
    client = make_redis(settings.redis_url)
    try:
        return asdict(gauges.read(settings, engine, client))
    finally:
        client.close()
        engine.dispose()


def figures_from_exposition(text: str) -> dict[str, Any]:
    """The same figures, from the metrics function's Prometheus text."""
    figures: dict[str, Any] = {
        "tasks": {},
        "estimated": {},
        "finished": {},
        "oldest_due_seconds": None,
        "sweep_pending": None,
        "lists": {},
        "paused_accounts": None,
        "workers_alive": {},
        "accounts_waiting": {},
    }
    by_label = {
        "mailq_tasks": ("tasks", "status"),
        "mailq_tasks_estimated": ("estimated", "status"),
        "mailq_tasks_finished": ("finished", "status"),
        "mailq_list_length": ("lists", "list"),
        "mailq_workers_alive": ("workers_alive", "role"),
    }
    single = {
        "mailq_oldest_due_seconds": "oldest_due_seconds",
        "mailq_sweep_pending": "sweep_pending",
        "mailq_paused_accounts": "paused_accounts",
    }
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "mailq_accounts_waiting":
                key = f"{sample.labels['state']}:{sample.labels['reason']}"
                figures["accounts_waiting"][key] = int(sample.value)
            elif sample.name in by_label:
                key, label = by_label[sample.name]
                figures[key][sample.labels[label]] = int(sample.value)
            elif sample.name in single:
                value = sample.value
                figures[single[sample.name]] = value if sample.name.endswith("_seconds") else int(value)
    return figures


# --- printing ---------------------------------------------------------------------------------------------


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def print_figures(console: Console, figures: dict[str, Any]) -> None:
    tasks = Table(title="Tasks")
    tasks.add_column("status")
    tasks.add_column("count", justify="right")
    tasks.add_column("how")
    for status, n in figures["tasks"].items():
        tasks.add_row(status, f"{n:,}", "exact")
    finished = figures.get("finished") or {}
    for status, n in finished.items():
        tasks.add_row(status, f"{n:,}", "exact")
    for status, n in figures["estimated"].items():
        if status not in finished:  # beyond FINISHED_CAP finished tasks only the estimate is cheap
            tasks.add_row(status, f"~{n:,}", "estimate (last ANALYZE)")
    console.print(tasks)
    lists = Table(title="Redis")
    lists.add_column("list")
    lists.add_column("length", justify="right")
    for name, n in figures["lists"].items():
        lists.add_row(name, f"{n:,}")
    lists.add_row(
        "paused accounts",
        f"{figures['paused_accounts']:,}" if figures["paused_accounts"] is not None else "?",
    )
    console.print(lists)
    workers = Table(title="Live workers")
    workers.add_column("role")
    workers.add_column("alive", justify="right")
    for role, n in figures["workers_alive"].items():
        workers.add_row(role, str(n))
    console.print(workers)
    waiting = figures.get("accounts_waiting") or {}
    accounts = Table(title="Accounts waiting")
    accounts.add_column("state")
    accounts.add_column("reason")
    accounts.add_column("accounts", justify="right")
    for key, n in sorted(waiting.items()):
        state, reason = key.split(":", 1)
        accounts.add_row(state, reason, f"{n:,}")
    if not waiting:
        accounts.add_row("none", "every account with mail can send", "0")
    console.print(accounts)
    console.print(f"oldest due, not yet sent: [bold]{_age(figures['oldest_due_seconds'])}[/bold]")
    console.print(f"work waiting for the sweep: [bold]{figures['sweep_pending']}[/bold] task(s)")


def print_local(console: Console, source: dict[str, Any], figures: dict[str, Any]) -> None:
    console.print(f"mailq, read from {source['origin']}")
    print_figures(console, figures)
    if source["metrics"]:
        endpoints = Table(title="Worker metrics")
        endpoints.add_column("process")
        endpoints.add_column("/metrics")
        for name, url in source["metrics"].items():
            endpoints.add_row(name, url)
        console.print(endpoints)


def print_cluster(console: Console, view, figures: dict[str, Any] | None) -> None:
    console.print(f"mailq in namespace [bold]{view.namespace}[/bold] of context [bold]{view.context}[/bold]")
    services = Table(title="Knative Services")
    for column in ("service", "ready", "latest ready revision", "pods", "why not ready"):
        services.add_column(column)
    for s in view.services:
        pods = "scaled to zero" if s.pods == 0 else str(s.pods)
        services.add_row(s.name, s.ready, s.revision or "-", pods, s.reason)
    console.print(services)
    scalers = Table(title="KEDA")
    for column in ("kind", "name", "target", "ready", "active", "min/max", "replicas", "last Job", "why"):
        scalers.add_column(column)
    for s in view.scalers:
        replicas = "no HPA" if s.replicas is None else str(s.replicas)
        scalers.add_row(
            s.kind, s.name, s.target, s.ready, s.active, f"{s.min}/{s.max}", replicas, s.last_job, s.reason
        )
    console.print(scalers)
    if view.unready_pods:
        pods = Table(title="Pods not Ready")
        for column in ("pod", "phase", "reason"):
            pods.add_column(column)
        for p in view.unready_pods:
            pods.add_row(p.name, p.phase, p.reason)
        console.print(pods)
    else:
        console.print("every pod is Ready")
    if figures is None:
        console.print(f"[red]the metrics function did not answer[/red]: {view.metrics_error}")
    else:
        print_figures(console, figures)
