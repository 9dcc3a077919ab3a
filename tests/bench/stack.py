"""The local stack a benchmark run drives: embedded PostgreSQL and Redis, and every child process.

Each child runs in its own session, so stopping it stops its whole process group (gunicorn's and
Celery's workers included); ``Stack.close()`` stops everything it started, whatever went wrong.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import sqlalchemy as sa

from shared import queue
from shared.accounts import users
from shared.config import Settings
from shared.context import Context, make_redis
from shared.crypto import SecretBox, generate_key
from shared.db import dispose_engines, engine_for, migrate
from shared.local.embedded import EmbeddedPostgres, EmbeddedRedis, die_with_parent, free_port

ROOT = Path(__file__).resolve().parents[2]
MAIN_SOURCE = ROOT / "functions" / "main.py"
TRIVIAL_SOURCE = Path(__file__).resolve().with_name("trivial.py")
CELERY_DB = 1  # the Celery peer's broker lives in its own Redis database on the same server
# The SMTP accounts the sink accepts (it requires AUTH): the benchmark's user, and a second tenant.
SMTP_ACCOUNTS = {"bench": "bench-smtp-password", "tenant-b": "tenant-b-smtp-password"}
SMTP_USER = "bench"


# The single-tenant scenarios' account declares this many SMTP connections, as a user of a relay that
# allows them would (issue 20); scenario 2 also shows a run at the default an account that declares
# nothing gets (Settings().smtp_max_connections_per_account, 3).
DECLARED_CONNECTIONS = 16


def default_senders() -> int:
    """What `mailq dev` runs: one sender process per core."""
    return os.cpu_count() or 1


# The settings a production pod runs with (deployment/base/config.env), except those that only make
# sense with TLS and public hosts: the sink is plaintext on 127.0.0.1.
PRODUCTION_LIKE = {
    "MAILQ_ENV": "development",
    "LOG_LEVEL": "INFO",
    "QUEUE_CONSUMER_COUNT": "4",
    "WORKER_COUNT": "4",
    "MAX_TRY_COUNT": "3",
    "TASK_LEASE_SECONDS": "120",
    "WORKER_HEARTBEAT_TTL": "30",
    "SWEEP_LEAK_WINDOW": "300",
    "SWEEP_BATCH": "1000",
    "BCRYPT_ROUNDS": "4",  # only register/login use it, and the benchmark measures neither
    "RATE_LIMIT_PER_EMAIL": "100000",
    "RATE_LIMIT_PER_CLIENT": "100000",
}


class Child:
    """One child process in its own session, its output in a log file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path):
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                args,
                env=env,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stop() reaches its workers too
                preexec_fn=die_with_parent,  # noqa: PLW1509 - a killed benchmark leaves no orphans
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def check(self) -> None:
        if not self.alive():
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM to the group (a graceful stop), SIGKILL to whatever is left after ``timeout``."""
        if self.proc.returncode is not None and not _group_alive(self.proc.pid):
            return
        _signal_group(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + 2.0
        while _group_alive(self.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        _signal_group(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def wait_for_port(port: int, child: Child | None = None, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child is not None:
            child.check()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f}s")


def wait_for_http(url: str, child: Child, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        child.check()
        try:
            with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - loopback only
                if 200 <= response.status < 300:
                    return
        except (OSError, urllib.error.HTTPError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{child.name} did not answer {url} within {timeout:.0f}s:\n{child.tail()}")


_PG_KINDS = ("autovacuum worker", "autovacuum launcher", "checkpointer", "background writer", "walwriter")


def _postgres_kind(title: str) -> str:
    """A PostgreSQL child's kind from its process title ("postgres: checkpointer", "postgres: user db
    [local] idle", ...)."""
    return next((kind for kind in _PG_KINDS if kind in title), "sessions")


@dataclass
class CpuMeter:
    """CPU seconds each component used between ``start()`` and ``stop()`` (children included).

    A child that ends in between is counted too: its parent reaps it and its CPU moves into the
    parent's children times, which are part of each process's figure here. (PostgreSQL forks an
    autovacuum worker per run; counting only live processes missed all of that work.)
    """

    groups: dict[str, list[int]]  # component -> root pids
    before: dict[str, dict[int, float]] = field(default_factory=dict)  # component -> pid -> seconds
    result: dict[str, float] = field(default_factory=dict)
    # PostgreSQL's CPU by kind of process (sessions, autovacuum, checkpointer, ...), from stop(): where
    # the database's share goes.
    postgres_kinds: dict[str, float] = field(default_factory=dict)
    _pg_before: dict[str, float] = field(default_factory=dict)

    def _group(self, name: str) -> dict[int, float]:
        return {child: seconds for pid in self.groups[name] for child, seconds in self._tree(pid).items()}

    @staticmethod
    def _tree(pid: int) -> dict[int, float]:
        # The driver is every child's parent: count only its own process for it.
        driver = pid == os.getpid()
        try:
            root = psutil.Process(pid)
            procs = [root] if driver else [root, *root.children(recursive=True)]
        except psutil.Error:
            return {}
        times = {}
        for p in procs:
            try:
                t = p.cpu_times()
                times[p.pid] = t.user + t.system + (0.0 if driver else t.children_user + t.children_system)
            except psutil.Error:
                continue
        return times

    machine_before: float = 0.0

    @staticmethod
    def _machine_busy() -> float:
        t = psutil.cpu_times()
        return sum(t) - t.idle - getattr(t, "iowait", 0.0)

    def _postgres_by_kind(self) -> dict[str, float]:
        kinds: dict[str, float] = {}
        for root in self.groups.get("postgres", []):
            try:
                postmaster = psutil.Process(root)
                t = postmaster.cpu_times()
                kinds["postmaster"] = t.user + t.system
                # Ended in between: autovacuum workers (one per table and run), closed sessions.
                kinds["ended processes"] = t.children_user + t.children_system
                children = postmaster.children(recursive=True)
            except psutil.Error:
                continue
            for p in children:
                try:
                    title, t = " ".join(p.cmdline()), p.cpu_times()
                except psutil.Error:
                    continue
                kind = _postgres_kind(title)
                kinds[kind] = kinds.get(kind, 0.0) + t.user + t.system + t.children_user + t.children_system
        return kinds

    def start(self) -> CpuMeter:
        self.before = {name: self._group(name) for name in self.groups}
        self._pg_before = self._postgres_by_kind()
        self.machine_before = self._machine_busy()
        return self

    def stop(self) -> dict[str, float]:
        """CPU seconds per component, and "other": what processes outside the benchmark used meanwhile."""
        busy = self._machine_busy() - self.machine_before
        for name in self.groups:
            before, after = self.before[name], self._group(name)
            # A process gone since start is in its parent's children times now, with all of its life:
            # what it had used before start is taken off with the rest of ``before``.
            self.result[name] = sum(after.values()) - sum(before.values())
        self.result["other"] = max(0.0, busy - sum(self.result.values()))
        after = self._postgres_by_kind()
        # A process that ended moves from its kind to "ended processes", so a kind can come out negative
        # by what such a process had used before start: small, and only for the kinds that end.
        self.postgres_kinds = {k: after.get(k, 0.0) - self._pg_before.get(k, 0.0) for k in after}
        return self.result


class Stack:
    """Embedded PostgreSQL and Redis in a scratch directory, one user, and the processes we start."""

    def __init__(self, work_dir: Path | None = None, log_level: str = "INFO"):
        # Not under a 0700 directory: pgserver runs postgres as another user when we are root.
        self.base = Path(work_dir or tempfile.mkdtemp(prefix="mailq-bench-")).resolve()
        self.base.mkdir(parents=True, exist_ok=True)
        self.base.chmod(0o755)
        self.owns_base = work_dir is None
        self.logs = self.base / "logs"
        self.logs.mkdir(exist_ok=True)
        self.log_level = log_level
        self.postgres: EmbeddedPostgres | None = None
        self.redis_server: EmbeddedRedis | None = None
        self.children: list[Child] = []
        self.sink_port = free_port()
        self.user = None
        self.token = ""
        self.ctx: Context | None = None
        self._settings: Settings | None = None
        self._names: dict[str, int] = {}
        self._tenants: dict[str, tuple[object, str]] = {}
        self._declared: int | None = None  # the accounts' smtp_max_connections (declare_connections)
        self._account: dict = {}

    # --- lifecycle ---

    def __enter__(self) -> Stack:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def start(self) -> None:
        self.postgres = EmbeddedPostgres(self.base / "postgres")
        database_url = self.postgres.start()
        self.redis_server = EmbeddedRedis(self.base / "redis")
        redis_url = self.redis_server.start()
        migrate(database_url)
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "REDIS_"))},
            **PRODUCTION_LIKE,
            "LOG_LEVEL": self.log_level,
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "JWT_SECRET": "bench-" + "x" * 40,
            "MAILQ_ENCRYPTION_KEYS": generate_key(),
            "MAILQ_HEARTBEAT_FILE": str(self.base / "heartbeat"),
            "PYTHONUNBUFFERED": "1",
        }
        self._settings = Settings.from_env(self.env)
        s = self._settings
        self.ctx = Context(
            settings=s,
            engine=engine_for(s.database_url, pool_size=4),
            redis=make_redis(s.redis_url, socket_timeout=60),
            box=SecretBox(s.encryption_keys),
        )
        account = {
            "email": "bench@example.com",
            "password": "bench password",
            "smtp_host": "127.0.0.1",
            "smtp_port": self.sink_port,
            "smtp-username": SMTP_USER,
            "smtp-password": SMTP_ACCOUNTS[SMTP_USER],
            "smtp_security": "none",
        }
        users.register(self.ctx, account, "bench")
        self.token = users.login(self.ctx, account, "bench")["token"]
        self.user = users.authenticate(self.ctx, "Bearer " + self.token)
        self._account = account

    def tenant(self, smtp_username: str) -> tuple[object, str]:
        """Another user (registered once) sending through its own account on the same sink:
        (user, token)."""
        if smtp_username not in self._tenants:
            account = {
                **self._account,
                "email": f"{smtp_username}@example.com",
                "smtp-username": smtp_username,
                "smtp-password": SMTP_ACCOUNTS[smtp_username],
            }
            users.register(self.ctx, account, "bench")
            token = users.login(self.ctx, account, "bench")["token"]
            user = users.authenticate(self.ctx, "Bearer " + token)
            self._tenants[smtp_username] = (user, token)
            if self._declared is not None:
                users.update_smtp(self.ctx, user.id, user.id, {"smtp_max_connections": self._declared})
        return self._tenants[smtp_username]

    def close(self) -> None:
        for child in reversed(self.children):
            with contextlib.suppress(Exception):  # keep stopping the others
                child.stop()
        self.children.clear()
        if self.ctx is not None:
            self.ctx.redis.close()
        dispose_engines()
        if self.redis_server is not None:
            self.redis_server.stop()
        if self.postgres is not None:
            self.postgres.stop()
        if self.owns_base:
            shutil.rmtree(self.base, ignore_errors=True)

    @property
    def settings(self) -> Settings:
        assert self._settings is not None, "start() first"
        return self._settings

    @property
    def celery_broker(self) -> str:
        return f"redis://127.0.0.1:{self.redis_server.port}/{CELERY_DB}"

    def postgres_pid(self) -> int | None:
        try:
            return int((self.base / "postgres" / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def service_pids(self) -> dict[str, list[int]]:
        pids = {"driver": [os.getpid()]}
        if (pg := self.postgres_pid()) is not None:
            pids["postgres"] = [pg]
        if self.redis_server is not None and self.redis_server.process is not None:
            pids["redis"] = [self.redis_server.process.pid]
        return pids

    # --- state ---

    def reset(self) -> None:
        """Empty the tasks table and both Redis databases; the user stays."""
        with self.ctx.engine.begin() as conn:
            conn.execute(sa.text("TRUNCATE tasks RESTART IDENTITY CASCADE"))  # and their webhook events
        self.ctx.redis.flushdb()
        celery = make_redis(self.celery_broker)
        try:
            celery.flushdb()
        finally:
            celery.close()

    def empty_tasks(self) -> None:
        """Empty the tasks table only, while workers run (Redis, their registrations, stay)."""
        with self.ctx.engine.begin() as conn:
            conn.execute(sa.text("TRUNCATE tasks CASCADE"))

    def scratch(self, name: str) -> Path:
        """A new, empty directory for one scenario (a sink's mailbox, say)."""
        return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.base))

    def registered_workers(self) -> int:
        return self.ctx.redis.hlen(queue.WORKERS)

    # --- children ---

    def _unique(self, name: str) -> str:
        self._names[name] = self._names.get(name, 0) + 1
        return f"{name}-{self._names[name]}"

    def spawn(self, name: str, args: list[str], **extra_env: str) -> Child:
        child = Child(self._unique(name), args, {**self.env, **extra_env}, self.logs)
        self.children.append(child)
        return child

    def stop(self, *children: Child) -> None:
        for child in children:
            child.stop()
            if child in self.children:
                self.children.remove(child)

    def start_sink(self, data_dir: Path) -> Child:
        """The SMTP sink in its own process on the users' SMTP port: `mailq sink`'s mailbox behind AUTH
        (tests/bench/authsink.py), accepting each tenant's account and nothing else.

        It stands in for the SMTP server, which is not what we measure: at WARNING it skips
        aiosmtpd's five INFO lines per mail, which cost it about 15 % of a core.
        """
        child = self.spawn(
            "sink",
            [sys.executable, "-m", "tests.bench.authsink", str(data_dir), str(self.sink_port)],
            BENCH_SINK_ACCOUNTS=json.dumps(SMTP_ACCOUNTS),
        )  # fmt: skip
        wait_for_port(self.sink_port, child)
        return child

    def declare_connections(self, n: int) -> None:
        """From now on the benchmark's accounts declare ``n`` SMTP connections at once: each account's
        own ``smtp_max_connections``, set as a user sets it (``PATCH /api/v1/user/{id}``); the
        operator's default for accounts that declare none stays as deployed."""
        self._declared = n
        for user in [self.user, *(u for u, _ in self._tenants.values())]:
            users.update_smtp(self.ctx, user.id, user.id, {"smtp_max_connections": n})

    @property
    def connections(self) -> int:
        """SMTP conversations at once the benchmark's accounts may have (see declare_connections)."""
        return (
            self._declared if self._declared is not None else self.settings.smtp_max_connections_per_account
        )

    def start_workers(self, senders: int, **extra_env: str) -> list[Child]:
        """One consumer and ``senders`` sender processes (``extra_env`` added to their environment);
        returns once all have registered."""
        before = self.registered_workers()
        children = [self.spawn("consumer", [sys.executable, "-m", "functions.cli", "consumer"], **extra_env)]
        children += [
            self.spawn("sender", [sys.executable, "-m", "functions.cli", "sender"], **extra_env)
            for _ in range(senders)
        ]
        deadline = time.monotonic() + 60
        while self.registered_workers() < before + len(children):
            for child in children:
                child.check()
            if time.monotonic() > deadline:
                raise RuntimeError("the workers did not register within 60s")
            time.sleep(0.05)
        return children

    def start_function(self, source: Path, target: str, workers: int, threads: int) -> tuple[Child, int]:
        """functions-framework serving one target under gunicorn, as the Knative container runs it."""
        child, port = self.spawn_function(source, target, workers, threads)
        wait_for_http(f"http://127.0.0.1:{port}/healthz/live", child)
        return child, port

    def spawn_function(self, source: Path, target: str, workers: int, threads: int) -> tuple[Child, int]:
        """``start_function`` without waiting for it to answer (start several at once, then wait)."""
        port = free_port()
        child = self.spawn(
            f"fn-{target}",
            [sys.executable, "-m", "functions_framework", "--source", str(source), "--target", target,
             "--host", "127.0.0.1", "--port", str(port)],
            WORKERS=str(workers),
            THREADS=str(threads),
        )  # fmt: skip
        return child, port
