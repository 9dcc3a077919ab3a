"""relay accounts: declared limits and the backoff mirror on users, expires_at, the attempt log,
account events

users gain what an account declares of its relay (smtp_max_connections, smtp_send_limits), why it is
paused in one word (smtp_paused_code), and its backoff episode as the senders see it in Redis
(smtp_backoff_*). tasks gain expires_at: added with a constant default (no rewrite), then set for the
mail still to go out (MAX_QUEUE_LIFETIME's default after it was due), and the default becomes five
days from the insert; final rows keep 'infinity' and never show it. task_attempts logs every attempt
(its rows go with their task). webhook_events may name an account instead of a task (account.paused,
account.resumed, account.backing_off).

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

_TASK_EVENTS = "'task.sent', 'task.deferred', 'task.cancelled'"
_ALL_EVENTS = _TASK_EVENTS + ", 'account.paused', 'account.resumed', 'account.backing_off'"
_OUTCOMES = "'sent', 'deferred', 'cancelled', 'waiting', 'paused'"


def upgrade() -> None:
    op.add_column("users", sa.Column("smtp_paused_code", sa.Text(), nullable=True))
    op.add_column("users", sa.Column("smtp_max_connections", sa.Integer(), nullable=True))
    op.add_column(
        "users",
        sa.Column("smtp_send_limits", JSONB(), server_default=sa.text("'[]'::jsonb"), nullable=False),
    )
    op.add_column("users", sa.Column("smtp_backoff_since", sa.DateTime(timezone=True), nullable=True))
    op.add_column("users", sa.Column("smtp_backoff_until", sa.DateTime(timezone=True), nullable=True))
    op.add_column("users", sa.Column("smtp_backoff_code", sa.Text(), nullable=True))
    op.add_column("users", sa.Column("smtp_backoff_reason", sa.Text(), nullable=True))
    op.create_check_constraint("users_smtp_max_connections_check", "users", "smtp_max_connections >= 1")
    op.execute("UPDATE users SET smtp_paused_code = 'credentials' WHERE smtp_paused_at IS NOT NULL")
    op.create_index(
        "users_smtp_backing_off",
        "users",
        ["smtp_backoff_code"],
        postgresql_where=sa.text("smtp_backoff_since IS NOT NULL"),
    )
    op.create_index(
        "users_smtp_paused",
        "users",
        ["smtp_paused_code"],
        postgresql_where=sa.text("smtp_paused_at IS NOT NULL"),
    )

    op.add_column(
        "tasks",
        sa.Column(
            "expires_at", sa.DateTime(timezone=True), server_default=sa.text("'infinity'"), nullable=False
        ),
    )
    op.execute(
        "UPDATE tasks SET expires_at = GREATEST(scheduled_at, now()) + interval '5 days'"
        " WHERE status IN ('scheduled', 'queued', 'processing', 'failed')"
    )
    # From now on a row gets its expiry at enqueue (MAX_QUEUE_LIFETIME); the default (the setting's
    # default) only serves rows written some other way.
    op.alter_column("tasks", "expires_at", server_default=sa.text("(now() + '5 days'::interval)"))
    op.create_index(
        "tasks_sweep_expired",
        "tasks",
        ["expires_at"],
        # The always-true "expires_at IS NOT NULL" keeps the due and leaked queries (which do not state
        # it) on their own indexes: they would otherwise scan this one, whose statuses include theirs.
        postgresql_where=sa.text("status IN ('scheduled', 'queued', 'failed') AND expires_at IS NOT NULL"),
    )

    op.create_table(
        "task_attempts",
        sa.Column("id", sa.BigInteger(), sa.Identity(), primary_key=True),
        sa.Column("task_id", sa.BigInteger(), sa.ForeignKey("tasks.id", ondelete="CASCADE"), nullable=False),
        sa.Column("try_count", sa.Integer(), nullable=True),
        sa.Column("spent", sa.Boolean(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("duration_ms", sa.Integer(), nullable=True),
        sa.Column("server", sa.Text(), nullable=True),
        sa.Column("stage", sa.Text(), nullable=True),
        sa.Column("smtp_code", sa.Integer(), nullable=True),
        sa.Column("reply", sa.Text(), nullable=True),
        sa.Column("refused", JSONB(), nullable=True),
        sa.Column("outcome", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("repeats", sa.Integer(), server_default="1", nullable=False),
        sa.CheckConstraint(f"outcome IN ({_OUTCOMES})", name="task_attempts_outcome_check"),
    )
    op.create_index("task_attempts_task_id", "task_attempts", ["task_id", "id"])

    op.alter_column("webhook_events", "task_id", existing_type=sa.BigInteger(), nullable=True)
    op.add_column(
        "webhook_events",
        sa.Column("user_id", sa.BigInteger(), sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=True),
    )
    op.create_check_constraint(
        "webhook_events_subject_check", "webhook_events", "task_id IS NOT NULL OR user_id IS NOT NULL"
    )
    op.drop_constraint("webhook_events_type_check", "webhook_events")
    op.create_check_constraint("webhook_events_type_check", "webhook_events", f"type IN ({_ALL_EVENTS})")
    op.create_index(
        "webhook_events_account_created",
        "webhook_events",
        ["created_at"],
        postgresql_where=sa.text("task_id IS NULL"),
    )


def downgrade() -> None:
    op.drop_index("webhook_events_account_created", table_name="webhook_events")
    op.execute("DELETE FROM webhook_events WHERE task_id IS NULL")
    op.drop_constraint("webhook_events_type_check", "webhook_events")
    op.create_check_constraint("webhook_events_type_check", "webhook_events", f"type IN ({_TASK_EVENTS})")
    op.drop_constraint("webhook_events_subject_check", "webhook_events")
    op.drop_column("webhook_events", "user_id")
    op.alter_column("webhook_events", "task_id", existing_type=sa.BigInteger(), nullable=False)
    op.drop_index("task_attempts_task_id", table_name="task_attempts")
    op.drop_table("task_attempts")
    op.drop_index("tasks_sweep_expired", table_name="tasks")
    op.drop_column("tasks", "expires_at")
    op.drop_index("users_smtp_paused", table_name="users")
    op.drop_index("users_smtp_backing_off", table_name="users")
    op.drop_constraint("users_smtp_max_connections_check", "users")
    for column in (
        "smtp_backoff_reason",
        "smtp_backoff_code",
        "smtp_backoff_until",
        "smtp_backoff_since",
        "smtp_send_limits",
        "smtp_max_connections",
        "smtp_paused_code",
    ):
        op.drop_column("users", column)
