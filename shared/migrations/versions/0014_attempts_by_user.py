"""the attempt log by user and time: the dashboard's per-minute figures count attempts

GET /api/v1/task/stats counts, per minute of the last hour, the attempts that ended sent, deferred or
cancelled (shared/tasks/stats.py). task_attempts learns its task's ``user_id`` (every writer fills it,
shared/delivery/record.py; the existing rows are filled from their tasks here) and the index
``task_attempts_user_finished`` (user_id, finished_at) INCLUDE (outcome): the hour reads only the
window's entries of one user, from the index alone. ``tasks_user_outcome_at``, which served the hour
when it counted tasks by their latest outcome, is read by nothing now: dropped, so an outcome no longer
writes an entry in it. Retention is unchanged: the lines go with their
task (ON DELETE CASCADE), so there is no foreign key to users to check on every insert.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("task_attempts", sa.Column("user_id", sa.BigInteger(), nullable=True))
    op.execute("UPDATE task_attempts AS a SET user_id = t.user_id FROM tasks AS t WHERE t.id = a.task_id")
    op.alter_column("task_attempts", "user_id", existing_type=sa.BigInteger(), nullable=False)
    op.create_index(
        "task_attempts_user_finished",
        "task_attempts",
        ["user_id", "finished_at"],
        postgresql_include=["outcome"],
    )
    op.drop_index("tasks_user_outcome_at", table_name="tasks")


def downgrade() -> None:
    op.create_index(
        "tasks_user_outcome_at",
        "tasks",
        ["user_id", "updated_at"],
        postgresql_include=["status"],
        postgresql_where=sa.text("status IN ('sent', 'failed', 'cancelled')"),
    )
    op.drop_index("task_attempts_user_finished", table_name="task_attempts")
    op.drop_column("task_attempts", "user_id")
