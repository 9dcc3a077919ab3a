"""The `mailq` command: migrations, the long-running processes, the operator's view; the local
stack's commands come from functions/dev.py."""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path

import click

from functions import dev
from functions.settings import load_settings
from shared.config import Settings, configure_logging
from shared.errors import ConfigError

SENDER_POOL = 5  # PostgreSQL connections per sender process (as many again under load, as overflow)
WEBHOOK_POOL = 5  # the same for a webhook worker


@click.group()
@click.version_option(package_name="mailq", prog_name="mailq")  # the installed package's metadata
def main() -> None:
    """mailq: a mail queue. `mailq dev` runs everything on this machine."""


@main.command()
def migrate() -> None:
    """Bring the database schema to the newest version (idempotent)."""
    from shared.db import migrate as run_migrations

    settings = load_settings()
    if not settings.database_url:
        raise click.ClickException("DATABASE_URL is not set")
    run_migrations(settings.database_url)
    click.echo("schema is up to date")


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True, type=int)
@click.option("--workers", default=2, show_default=True, type=int, help="gunicorn worker processes")
@click.option("--threads", default=8, show_default=True, type=int, help="threads per worker")
def serve(host: str, port: int, workers: int, threads: int) -> None:
    """Serve every HTTP function on one port (gunicorn), for local use."""
    from functions.devserver import serve as run

    settings = load_settings()
    settings.require_runtime()
    configure_logging(settings)
    run(host, port, workers, threads)


# --- workers ------------------------------------------------------------------------------------


def _worker_deps(settings: Settings, block_timeout: float, pool: int):
    from shared.context import make_redis
    from shared.db import engine_for

    settings.require_runtime()
    configure_logging(settings)
    # pool connections (and as many again under overflow); a thread waits for one when all are busy
    engine = engine_for(
        settings.database_url,
        pool_size=pool,
        pre_ping=False,
        socket_timeout=settings.database_socket_timeout,
    )
    # Blocking reads wait BLOCK_SECONDS; the socket timeout must be longer than that.
    client = make_redis(settings.redis_url, socket_timeout=block_timeout + 10)
    return engine, client


def _serve_metrics(settings: Settings, metrics):
    """The process's /metrics on METRICS_PORT (nothing when it is 0)."""
    from shared.metrics import bind_address, serve

    return serve(metrics, settings.metrics_port, bind_address(settings.is_production))


def _run_worker(worker) -> None:
    def stop(signum, frame):
        worker.stopping.set()

    if hasattr(worker, "busy"):
        worker.metrics.watch_busy(worker.busy, worker.settings.worker_count)
    _serve_metrics(worker.settings, worker.metrics)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    worker.run()


@main.command()
def consumer() -> None:
    """Hand live tasks from the task list to the senders (runs until SIGTERM)."""
    from shared.delivery.consumer import Consumer
    from shared.workers import BLOCK_SECONDS

    settings = load_settings()
    engine, client = _worker_deps(settings, BLOCK_SECONDS, settings.queue_consumer_count + 2)
    _run_worker(Consumer(settings, engine, client))


@main.command()
def sender() -> None:
    """Send mail over each user's SMTP account, tenant by tenant (runs until SIGTERM)."""
    from shared.crypto import SecretBox
    from shared.delivery.mailer import Mailer
    from shared.delivery.sender import Sender
    from shared.workers import BLOCK_SECONDS

    settings = load_settings()
    # Conversations hold a connection only to claim and to record, so a few serve many threads.
    engine, client = _worker_deps(settings, BLOCK_SECONDS, min(settings.worker_count, SENDER_POOL))
    _run_worker(Sender(settings, engine, client, Mailer(settings), SecretBox(settings.encryption_keys)))


@main.command()
def webhooks() -> None:
    """Deliver webhook events to users' endpoints, endpoint by endpoint (runs until SIGTERM)."""
    from shared.crypto import SecretBox
    from shared.webhooks.worker import WebhookWorker
    from shared.workers import BLOCK_SECONDS

    settings = load_settings()
    # Request threads hold a connection only to claim and to record, so a few serve many threads.
    engine, client = _worker_deps(settings, BLOCK_SECONDS, min(settings.webhook_worker_count, WEBHOOK_POOL))
    _run_worker(WebhookWorker(settings, engine, client, SecretBox(settings.encryption_keys)))


@main.command("rotate-keys")
def rotate_keys() -> None:
    """Re-encrypt every stored secret (SMTP passwords, webhook secrets) with the first encryption key."""
    from shared.accounts.users import rotate_keys as rotate
    from shared.crypto import SecretBox
    from shared.db import engine_for

    settings = load_settings()
    if not settings.database_url or not settings.encryption_keys:
        raise click.ClickException("rotate-keys needs DATABASE_URL and MAILQ_ENCRYPTION_KEYS")
    configure_logging(settings)
    try:
        count = rotate(engine_for(settings.database_url), SecretBox(settings.encryption_keys))
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"re-encrypted {count} secret(s) with the first key; the other keys can be retired")


@main.command()
@click.option("--every", type=float, default=None, help="loop, one pass every SECONDS (local use)")
def sweep(every: float | None) -> None:
    """One pass putting back tasks that fell through the cracks, then exit (or loop with --every)."""
    from shared.maintenance.sweep import sweep_once
    from shared.metrics import WorkerMetrics

    settings = load_settings()
    engine, client = _worker_deps(settings, 0, 2)
    # A Job's pass is short, so Prometheus sees its counters only while a long pass runs (docs/operations.md).
    metrics = WorkerMetrics()
    _serve_metrics(settings, metrics)
    if every is None:
        report = sweep_once(settings, engine, client)
        metrics.record_sweep(report)
        click.echo(
            f"requeued {report.requeued}, rescued {report.rescued} envelope(s) "
            f"from {report.dead_workers} dead worker(s), cancelled {report.cancelled}"
        )
        return
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    while not stopping.is_set():
        try:
            metrics.record_sweep(sweep_once(settings, engine, client))
        except Exception as exc:  # a dependency blip must not end the local loop
            logging.getLogger("mailq.sweep").warning("sweep pass failed: %s", type(exc).__name__)
        stopping.wait(every)


@main.command()
@click.option("--data-dir", default=".mailq", show_default=True, type=click.Path(path_type=Path))
@click.option("--cluster", is_flag=True, help="the cluster's view, with the kubernetes client (kubeconfig)")
@click.option("--context", default=None, help="kubeconfig context [default: the current one]")
@click.option("--namespace", default="mailq", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="one JSON document, for scripts")
def status(data_dir: Path, cluster: bool, context: str | None, namespace: str, as_json: bool) -> None:
    """Tasks per status, Redis lists, the oldest due mail, live workers -- here or on the cluster."""
    import json

    try:
        from functions import status as view  # with rich: not in the cluster image (.dockerignore)
    except ModuleNotFoundError as exc:
        raise click.ClickException(
            f"mailq status runs from a checkout with the ops extra, not in the cluster image ({exc.name} "
            "is missing): pip install -e '.[ops]'"
        ) from None
    console = view.Console()
    if cluster:
        from functions.cluster import read_cluster

        seen = read_cluster(context, namespace)
        figures = view.figures_from_exposition(seen.metrics) if seen.metrics else None
        if as_json:
            click.echo(json.dumps({"cluster": seen.as_dict(), "figures": figures}, indent=2))
        else:
            view.print_cluster(console, seen, figures)
        return
    try:
        source = view.local_source(data_dir, os.environ)
    except view.NoStack as exc:
        raise click.ClickException(str(exc)) from None
    settings = load_settings(
        {**os.environ, "DATABASE_URL": source["database_url"], "REDIS_URL": source["redis_url"]}
    )
    figures = view.local_figures(settings)
    if as_json:
        public = {k: v for k, v in source.items() if k not in ("database_url", "redis_url")}
        click.echo(json.dumps({"source": public, "figures": figures}, indent=2))
    else:
        view.print_local(console, source, figures)


main.add_command(dev.dev)
main.add_command(dev.sink)
main.add_command(dev.mailbox)


if __name__ == "__main__":
    main()
