"""dashboard: tasks by recipient, and the last hour's outcomes per user

GET /api/v1/task/queue?recipient=… pages one recipient's tasks on (user_id, recipient_email, id);
GET /api/v1/task/stats reads a user's outcomes of the last hour from (user_id, updated_at) alone.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("tasks_user_recipient_id", "tasks", ["user_id", "recipient_email", "id"])
    op.create_index(
        "tasks_user_outcome_at",
        "tasks",
        ["user_id", "updated_at"],
        postgresql_include=["status"],
        postgresql_where=sa.text("status IN ('sent', 'failed', 'cancelled')"),
    )


def downgrade() -> None:
    op.drop_index("tasks_user_outcome_at", table_name="tasks")
    op.drop_index("tasks_user_recipient_id", table_name="tasks")
