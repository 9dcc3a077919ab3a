"""sweep: one partial index per kind of due work

PostgreSQL over-estimated the single OR'ed due condition and scanned the table at 1M rows; the sweep
now selects each kind of work on its own, each from its own partial index.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("tasks_sweep_due", table_name="tasks")
    op.create_index(
        "tasks_sweep_due",
        "tasks",
        ["next_attempt_at"],
        postgresql_where=sa.text("status IN ('scheduled', 'failed')"),
    )
    op.create_index(
        "tasks_sweep_queued", "tasks", ["next_attempt_at"], postgresql_where=sa.text("status = 'queued'")
    )


def downgrade() -> None:
    op.drop_index("tasks_sweep_queued", table_name="tasks")
    op.drop_index("tasks_sweep_due", table_name="tasks")
    op.create_index(
        "tasks_sweep_due",
        "tasks",
        ["next_attempt_at"],
        postgresql_where=sa.text("status IN ('scheduled', 'queued', 'failed')"),
    )
