"""users and tasks

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

PENDING = "'scheduled', 'queued', 'processing', 'failed'"


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("email", sa.Text, nullable=False),
        sa.Column("password_hash", sa.Text, nullable=False),
        sa.Column("smtp_host", sa.Text, nullable=False),
        sa.Column("smtp_port", sa.Integer, nullable=False),
        sa.Column("smtp_username", sa.Text, nullable=False),
        sa.Column("smtp_password_enc", sa.Text, nullable=False),
        sa.Column("smtp_security", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.CheckConstraint("smtp_security IN ('starttls', 'tls', 'none')", name="users_smtp_security_check"),
        sa.CheckConstraint("smtp_port BETWEEN 1 AND 65535", name="users_smtp_port_check"),
    )
    op.create_index("users_email_lower_key", "users", [sa.text("lower(email)")], unique=True)

    op.create_table(
        "tasks",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("user_id", sa.BigInteger, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("recipient_email", sa.Text, nullable=False),
        sa.Column("subject", sa.Text, nullable=False),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("try_count", sa.Integer, server_default="0", nullable=False),
        sa.Column("scheduled_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("message_id", sa.Text, nullable=False),
        sa.Column("idempotency_key", sa.Text, nullable=True),
        sa.Column("request_hash", sa.Text, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "status IN ('scheduled', 'queued', 'processing', 'sent', 'failed', 'cancelled')",
            name="tasks_status_check",
        ),
    )
    op.create_index(
        "tasks_user_idempotency_key",
        "tasks",
        ["user_id", "idempotency_key"],
        unique=True,
        postgresql_where=sa.text("idempotency_key IS NOT NULL"),
    )
    op.create_index(
        "tasks_user_pending_id",
        "tasks",
        ["user_id", "id"],
        postgresql_where=sa.text(f"status IN ({PENDING})"),
    )
    op.create_index("tasks_user_status_id", "tasks", ["user_id", "status", "id"])
    op.create_index(
        "tasks_user_fail_id",
        "tasks",
        ["user_id", "id"],
        postgresql_where=sa.text("status IN ('failed', 'cancelled')"),
    )
    op.create_index(
        "tasks_sweep_due",
        "tasks",
        ["next_attempt_at"],
        postgresql_where=sa.text("status IN ('scheduled', 'queued', 'failed')"),
    )
    op.create_index(
        "tasks_sweep_lease", "tasks", ["lease_until"], postgresql_where=sa.text("status = 'processing'")
    )


def downgrade() -> None:
    op.drop_table("tasks")
    op.drop_table("users")
