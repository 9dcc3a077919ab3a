"""metrics: exact counts of the pending statuses, and the oldest first try still waiting

The metrics function counts each pending status from ``tasks_pending_status`` (an index-only scan
over the rows still to go out, never the table's history), and reads the oldest queued first try
from ``tasks_queued_first_try`` (one index entry: the task due longest ago that has not been tried).

``tasks_pending_status``'s predicate also says ``scheduled_at IS NOT NULL``, which every row meets
(the column is NOT NULL) and only the metrics query states: PostgreSQL then never picks this index
for the sweep's queries, which keep their own indexes ordered by due time.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "tasks_pending_status",
        "tasks",
        ["status"],
        postgresql_where=sa.text(
            "status IN ('scheduled', 'queued', 'processing', 'failed') AND scheduled_at IS NOT NULL"
        ),
    )
    op.create_index(
        "tasks_queued_first_try",
        "tasks",
        ["scheduled_at"],
        postgresql_where=sa.text("status = 'queued' AND try_count = 0"),
    )


def downgrade() -> None:
    op.drop_index("tasks_queued_first_try", table_name="tasks")
    op.drop_index("tasks_pending_status", table_name="tasks")
