"""The attempt log: every attempt at a task, what it came to and what the server said (the table; the
sender writes it with each outcome, shared/delivery/record.py; the API reads it, shared/tasks/attempts.py).
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy import orm
from sqlalchemy.dialects.postgresql import JSONB

from shared.modelbase import Base

# What became of one attempt: a try (spent: sent, deferred to be tried again, or cancelled: refused for
# good, its last try, or not sendable), or the account's relay refusing before or during it (no try
# spent: the account waits, backing off or over a send limit, or is paused).
TRY_OUTCOMES = ("sent", "deferred", "cancelled")
WAIT_OUTCOMES = ("waiting", "paused")
ATTEMPT_OUTCOMES = TRY_OUTCOMES + WAIT_OUTCOMES


class TaskAttempt(Base):
    """Every attempt at a task, written by the statement that records its outcome; an account condition
    met before any claim (the relay down, throttling) is one row per task and backoff episode."""

    __tablename__ = "task_attempts"

    id: orm.Mapped[int] = orm.mapped_column(sa.BigInteger, sa.Identity(), primary_key=True)
    task_id: orm.Mapped[int] = orm.mapped_column(
        sa.BigInteger, sa.ForeignKey("tasks.id", ondelete="CASCADE"), nullable=False
    )
    # The task's owner, written with the line: the per-minute figures read one user's lines by time.
    # No foreign key to users: the line goes with its task (retention, a user's deletion) by task_id.
    user_id: orm.Mapped[int] = orm.mapped_column(sa.BigInteger, nullable=False)
    try_count: orm.Mapped[int | None] = orm.mapped_column(sa.Integer, nullable=True)  # null: not claimed
    spent: orm.Mapped[bool] = orm.mapped_column(sa.Boolean, nullable=False)  # counted against MAX_TRY_COUNT
    started_at = orm.mapped_column(sa.DateTime(timezone=True), nullable=False)
    finished_at = orm.mapped_column(sa.DateTime(timezone=True), nullable=False)
    duration_ms: orm.Mapped[int | None] = orm.mapped_column(sa.Integer, nullable=True)
    server: orm.Mapped[str | None] = orm.mapped_column(sa.Text, nullable=True)  # host:port
    stage: orm.Mapped[str | None] = orm.mapped_column(sa.Text, nullable=True)  # how far it got
    smtp_code: orm.Mapped[int | None] = orm.mapped_column(sa.Integer, nullable=True)
    reply: orm.Mapped[str | None] = orm.mapped_column(sa.Text, nullable=True)  # capped, without secrets
    refused = orm.mapped_column(JSONB, nullable=True)  # [{"recipient", "code", "reply"}] refused for good
    outcome: orm.Mapped[str] = orm.mapped_column(sa.Text, nullable=False)
    reason: orm.Mapped[str | None] = orm.mapped_column(sa.Text, nullable=True)  # an account's reason
    repeats: orm.Mapped[int] = orm.mapped_column(sa.Integer, server_default="1", nullable=False)

    __table_args__ = (
        sa.CheckConstraint(
            f"outcome IN ({', '.join(repr(o) for o in ATTEMPT_OUTCOMES)})", name="task_attempts_outcome_check"
        ),
        # GET /task/{id}/attempts, keyset on id; retention deletes them with their task.
        sa.Index("task_attempts_task_id", "task_id", "id"),
        # GET /task/stats: one user's attempts of the last hour by outcome, from the index alone.
        sa.Index("task_attempts_user_finished", "user_id", "finished_at", postgresql_include=["outcome"]),
    )


task_attempts = TaskAttempt.__table__
