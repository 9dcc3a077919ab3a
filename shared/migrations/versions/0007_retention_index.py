"""retention: final tasks by age, for the sweep's bounded purge (TASK_RETENTION_DAYS)

Revision ID: 0007
Revises: 0004
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "tasks_retention",
        "tasks",
        ["updated_at"],
        postgresql_where=sa.text("status IN ('sent', 'cancelled')"),
    )


def downgrade() -> None:
    op.drop_index("tasks_retention", table_name="tasks")
