"""finding mail: a user's tasks by creation time, by subject prefix, by Message-ID; bulk actions' keys

GET /api/v1/task/queue and /fail learn ``created_from``/``created_to``, ``status=all``, ``subject``
(a prefix), ``message_id`` and ``id``; POST /api/v1/task/bulk retries or cancels what such a search
finds. Each list reads a page's worth through one of these (shared/tasks/search.py says which):

- ``tasks_user_status_created`` (user_id, status, created_at, id): a date range within one status, and
  for a set of statuses (still to go out, failed or cancelled, all) one such range per status, merged
  in order (a Merge Append of index scans that stops when the page is full);
- ``tasks_user_subject`` (user_id, left(lower(subject) COLLATE "C", 64), id): a case-insensitive
  subject prefix is one range of it (byte order, so LIKE 'prefix%' becomes an index condition
  whatever the database's collation); only the first 64 characters are indexed, to keep its entries
  (and the cursor that carries one) small;
- ``tasks_user_message_id`` (user_id, message_id): the exact Message-ID.

task_bulk_requests remembers a bulk action made with an Idempotency-Key: its request's hash and its
answer, so a retried request answers the same counts without acting twice (kept like a batch's key).

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("tasks_user_status_created", "tasks", ["user_id", "status", "created_at", "id"])
    op.create_index(
        "tasks_user_subject",
        "tasks",
        ["user_id", sa.text('"left"((lower(subject) COLLATE "C"), 64)'), "id"],
    )
    op.create_index("tasks_user_message_id", "tasks", ["user_id", "message_id"])
    op.create_table(
        "task_bulk_requests",
        sa.Column("user_id", sa.BigInteger(), sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("idempotency_key", sa.Text(), nullable=False),
        sa.Column("request_hash", sa.Text(), nullable=False),
        sa.Column("answer", JSONB(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("user_id", "idempotency_key"),
    )
    op.create_index("task_bulk_requests_created_at", "task_bulk_requests", ["created_at"])


def downgrade() -> None:
    op.drop_index("task_bulk_requests_created_at", table_name="task_bulk_requests")
    op.drop_table("task_bulk_requests")
    op.drop_index("tasks_user_message_id", table_name="tasks")
    op.drop_index("tasks_user_subject", table_name="tasks")
    op.drop_index("tasks_user_status_created", table_name="tasks")
