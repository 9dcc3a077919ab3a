"""tenant bounds and token revocation: per-account limit overrides, a token generation per user

users.max_pending_tasks, max_pending_bytes, enqueue_rate and enqueue_burst override the deployment's
MAX_PENDING_PER_USER, MAX_PENDING_BYTES_PER_USER, ENQUEUE_RATE_PER_USER and ENQUEUE_BURST_PER_USER for one
account (null: the deployment's value; `mailq account limits` sets them). users.token_generation is
written into every token at login; a password change or a logout-all raises it, and a token of an older
generation is refused everywhere. Constant defaults: PostgreSQL 11+ adds the columns without rewriting.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("users", sa.Column("token_generation", sa.Integer(), server_default="0", nullable=False))
    op.add_column("users", sa.Column("max_pending_tasks", sa.BigInteger(), nullable=True))
    op.add_column("users", sa.Column("max_pending_bytes", sa.BigInteger(), nullable=True))
    op.add_column("users", sa.Column("enqueue_rate", sa.Float(), nullable=True))
    op.add_column("users", sa.Column("enqueue_burst", sa.Integer(), nullable=True))
    op.create_check_constraint(
        "users_limits_check",
        "users",
        "max_pending_tasks >= 0 AND max_pending_bytes >= 0 AND enqueue_rate > 0 AND enqueue_burst >= 1",
    )


def downgrade() -> None:
    op.drop_constraint("users_limits_check", "users")
    for column in (
        "enqueue_burst",
        "enqueue_rate",
        "max_pending_bytes",
        "max_pending_tasks",
        "token_generation",
    ):
        op.drop_column("users", column)
