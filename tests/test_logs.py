"""LOG_FORMAT=json: one JSON object per line, with the worker and task they concern, and never a secret
(tests/test_security.py greps a whole `mailq dev` run in the text format)."""

from __future__ import annotations

import io
import json
import logging
import threading
import time

import pytest

from shared import logs
from shared.config import Settings
from shared.errors import ConfigError
from tests.chaos.audit import secrets_found
from tests.pipeline import Pipeline
from tests.smtp_servers import ScriptedSmtpServer


def test_production_logs_json_and_development_text_unless_told_otherwise():
    production = {
        "MAILQ_ENV": "production",
        "JWT_SECRET": "x" * 40,
        "MAILQ_ENCRYPTION_KEYS": "k",
        "DATABASE_URL": "postgresql://db",
        "REDIS_URL": "redis://r",
    }
    assert Settings.from_env(production).log_format == "json"
    assert Settings.from_env({}).log_format == "text"
    assert Settings.from_env({"LOG_FORMAT": "JSON"}).log_format == "json"
    with pytest.raises(ConfigError, match="LOG_FORMAT"):
        Settings.from_env({"LOG_FORMAT": "xml"})
    with pytest.raises(ConfigError, match="METRICS_PORT"):
        Settings.from_env({"METRICS_PORT": "70000"})
    assert Settings.from_env({"METRICS_PORT": "0"}).metrics_port == 0


def _capture() -> tuple[io.StringIO, logging.Handler]:
    logs.bind_worker(None)  # this thread's context: a test driving a sender's step() may have bound a task
    logs.bind_task(None)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    return stream, handler


def test_a_record_is_one_line_with_its_context_and_nothing_from_extra():
    stream, handler = _capture()
    try:
        log = logging.getLogger("mailq.test")
        seen = {}

        def in_a_thread():
            logs.bind_worker("sender:host:1:abcdef01")
            logs.bind_task(42)
            try:
                raise ValueError("boom\nsecond line")
            except ValueError:
                log.exception("it failed", extra={"password": "hunter2-secret"})
            seen["done"] = True

        thread = threading.Thread(target=in_a_thread)
        thread.start()
        thread.join()
        log.warning("elsewhere")  # another thread: no worker, no task
    finally:
        logging.getLogger().removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and seen
    first, second = (json.loads(line) for line in lines)
    assert first["message"] == "it failed" and first["level"] == "ERROR" and first["logger"] == "mailq.test"
    assert first["worker_id"] == "sender:host:1:abcdef01" and first["task_id"] == 42
    assert "ValueError: boom" in first["exc"] and "hunter2" not in lines[0]
    assert set(second) == {"ts", "level", "logger", "message"}


def test_a_sender_run_logs_json_lines_with_its_id_and_the_task_and_no_secret(ctx):
    smtp_password = "smtp-Pw-for-json-7731"
    stream, handler = _capture()
    pipe = Pipeline(ctx)
    try:
        with ScriptedSmtpServer(auth=lambda user, password: password == smtp_password) as smtp:
            user = pipe.user(smtp, **{"smtp-username": "ada", "smtp-password": smtp_password})
            task_id = pipe.enqueue(user)
            worker = threading.Thread(target=pipe.sender.run)
            worker.start()
            try:
                pipe.consumer.step(0.1)
                deadline = time.monotonic() + 10
                while pipe.task(task_id).status != "sent" and time.monotonic() < deadline:
                    time.sleep(0.05)
            finally:
                pipe.sender.stopping.set()
                worker.join(10)
        assert pipe.task(task_id).status == "sent"
    finally:
        logging.getLogger().removeHandler(handler)
        logging.getLogger().setLevel(logging.WARNING)
        pipe.close()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    ours = [line for line in lines if line.get("worker_id") == pipe.sender.id]
    assert any("started" in line["message"] for line in ours)
    (outcome,) = [line for line in ours if line["message"].startswith(f"task {task_id} try 1 -> sent")]
    assert outcome["task_id"] == task_id and outcome["level"] == "DEBUG"
    secrets = {
        "SMTP password": smtp_password,
        "encryption key": ctx.settings.encryption_keys[0],
        "JWT secret": ctx.settings.jwt_secret,
    }
    assert secrets_found(stream.getvalue(), secrets) == []
