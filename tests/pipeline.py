"""A test harness for the data path: enqueue, consumer, sender and sweep driven step by step
against the real PostgreSQL, Redis and an aiosmtpd server."""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa

from shared.accounts import users
from shared.context import Context
from shared.delivery.consumer import Consumer
from shared.delivery.mailer import Mailer
from shared.delivery.sender import Sender
from shared.maintenance.sweep import sweep_once
from shared.tasks import enqueue
from shared.workers import Outcome


class Pipeline:
    def __init__(self, ctx: Context, **mailer_kwargs):
        self.ctx = ctx
        s = ctx.settings
        self.consumer = Consumer(s, ctx.engine, ctx.redis)
        self.mailer = Mailer(s, **mailer_kwargs)
        self.sender = Sender(s, ctx.engine, ctx.redis, self.mailer, ctx.box)

    def close(self) -> None:
        self.mailer.close()

    def user(self, server, email: str = "ada@example.com", **extra) -> Any:
        body = {
            "email": email,
            "password": "correct horse",
            "smtp_host": server.host,
            "smtp_port": server.port,
            "smtp-username": "",
            "smtp-password": "",
            "smtp_security": "none",
            **extra,
        }
        users.register(self.ctx, body, "test-client")
        token = users.login(self.ctx, body, "test-client")["token"]
        return users.authenticate(self.ctx, "Bearer " + token)

    def enqueue(self, user, key: str | None = None, **fields) -> int:
        body = {
            "recipient_email": "bob@example.org",
            "subject": "Hello",
            "body": "Hi Bob,\nit works.\n",
            **fields,
        }
        result, _ = enqueue.enqueue(self.ctx, user.id, body, key)
        return result["task_id"]

    def established(self, user) -> None:
        """One mail sent: the account has had its first success (a new account probes with one
        conversation until then, shared.pace) and may use all it declares; its connection is pooled."""
        self.enqueue(user, subject="first")
        assert Outcome.SENT in self.pump()

    def hand_off(self, timeout: float = 0.05) -> list[Outcome]:
        """Run the consumer until its list is empty: every envelope waits at the senders."""
        outcomes = []
        while step := self.consumer.step(timeout):
            outcomes += step
        return outcomes

    def pump(self, timeout: float = 0.05) -> list[Outcome]:
        """Run the consumer, then the sender, until both lists are empty."""
        outcomes = self.hand_off(timeout)
        while step := self.sender.step(timeout):
            outcomes += step
        return outcomes

    def sweep(self):
        return sweep_once(self.ctx.settings, self.ctx.engine, self.ctx.redis)

    def task(self, task_id: int) -> Any:
        with self.ctx.engine.connect() as conn:
            return conn.execute(sa.text("SELECT * FROM tasks WHERE id = :id"), {"id": task_id}).one()

    def statuses(self) -> dict[int, str]:
        with self.ctx.engine.connect() as conn:
            return dict(conn.execute(sa.text("SELECT id, status FROM tasks ORDER BY id")).all())

    def run_until_settled(self, timeout: float = 20.0) -> dict[int, str]:
        """Pump and sweep until every task is sent or cancelled."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.pump()
            statuses = self.statuses()
            if all(s in ("sent", "cancelled") for s in statuses.values()):
                return statuses
            self.sweep()
            time.sleep(0.05)
        raise AssertionError(f"not settled within {timeout}s: {self.statuses()}")
