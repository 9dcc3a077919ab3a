"""A `mailq` command that cannot run says why in one line, never with a traceback: a setting missing for
the long-running processes (as `mailq migrate` does), PostgreSQL or Redis unreachable for `mailq status`."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from functions.cli import main
from shared.local.embedded import free_port
from tests.conftest import ROOT

RUNTIME = ("DATABASE_URL", "REDIS_URL", "JWT_SECRET", "MAILQ_ENCRYPTION_KEYS")


@pytest.fixture()
def bare_env(monkeypatch):
    for name in (*RUNTIME, "MAILQ_ENV"):
        monkeypatch.delenv(name, raising=False)


def one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # a click error, not a traceback
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


@pytest.mark.parametrize("command", ["sender", "consumer", "webhooks", "sweep", "serve"])
def test_a_worker_or_server_without_its_settings_says_what_is_missing_in_one_line(bare_env, command):
    line = one_line_error(CliRunner().invoke(main, [command]))
    assert "missing DATABASE_URL, REDIS_URL, JWT_SECRET, MAILQ_ENCRYPTION_KEYS" in line


def test_the_real_process_prints_one_line_and_exits_1(bare_env):
    env = {k: v for k, v in os.environ.items() if k not in RUNTIME}
    done = subprocess.run(
        [sys.executable, "-m", "functions.cli", "sender"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "Error: mailq refuses to start: missing DATABASE_URL, REDIS_URL, JWT_SECRET, MAILQ_ENCRYPTION_KEYS"
    ]


def test_status_with_postgresql_unreachable_says_so_in_one_line(bare_env, monkeypatch, redis_url):
    port = free_port()
    monkeypatch.setenv("DATABASE_URL", f"postgresql+pg8000://mailq:hunter2@127.0.0.1:{port}/mailq")
    monkeypatch.setenv("REDIS_URL", redis_url)
    line = one_line_error(CliRunner().invoke(main, ["status"]))
    assert f"PostgreSQL at 127.0.0.1:{port} cannot be reached" in line and "DATABASE_URL" in line
    assert "hunter2" not in line


def test_status_with_redis_unreachable_says_so_in_one_line(bare_env, monkeypatch, pg_url):
    port = free_port()
    monkeypatch.setenv("DATABASE_URL", pg_url)
    monkeypatch.setenv("REDIS_URL", f"redis://:hunter2@127.0.0.1:{port}/0")
    line = one_line_error(CliRunner().invoke(main, ["status"]))
    assert f"Redis at 127.0.0.1:{port} cannot be reached" in line and "REDIS_URL" in line
    assert "hunter2" not in line
