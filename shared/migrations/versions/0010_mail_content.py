"""mail content: HTML, cc/bcc, reply-to, headers, attachments, tags; batch enqueue's idempotency

task_contents holds what a mail carries beyond the seed's fields (one row per such task, none for a
plain mail), so status UPDATEs on tasks never copy it and the lists never read it. tasks.tags is read
with the row; task_tags is the index behind ?tag=. task_batches remembers a keyed batch's answer.
tasks.body becomes nullable: an HTML-only mail has no text part. Every new row goes with its task or
user (ON DELETE CASCADE), so retention deleting tasks needs nothing else.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.alter_column("tasks", "body", existing_type=sa.Text(), nullable=True)
    # A constant default: PostgreSQL 11+ adds the column without rewriting the table.
    op.add_column("tasks", sa.Column("tags", JSONB(), server_default=sa.text("'{}'::jsonb"), nullable=False))
    op.create_table(
        "task_contents",
        sa.Column(
            "task_id", sa.BigInteger(), sa.ForeignKey("tasks.id", ondelete="CASCADE"), primary_key=True
        ),
        sa.Column("html", sa.Text(), nullable=True),
        sa.Column("from_name", sa.Text(), nullable=True),
        sa.Column("recipient_name", sa.Text(), nullable=True),
        sa.Column("cc", JSONB(), server_default=sa.text("'[]'::jsonb"), nullable=False),
        sa.Column("bcc", JSONB(), server_default=sa.text("'[]'::jsonb"), nullable=False),
        sa.Column("reply_to", sa.Text(), nullable=True),
        sa.Column("headers", JSONB(), server_default=sa.text("'[]'::jsonb"), nullable=False),
        sa.Column("attachments", JSONB(), server_default=sa.text("'[]'::jsonb"), nullable=False),
        sa.Column("attachment_data", sa.LargeBinary(), nullable=True),
    )
    # Attachments are mostly compressed already (PDF, images, archives), and the sender reads large
    # ones in slices: out of line and uncompressed, a slice is read without the rest of the value.
    op.execute("ALTER TABLE task_contents ALTER COLUMN attachment_data SET STORAGE EXTERNAL")
    op.create_table(
        "task_tags",
        sa.Column("task_id", sa.BigInteger(), sa.ForeignKey("tasks.id", ondelete="CASCADE"), nullable=False),
        sa.Column("tag", sa.Text(), nullable=False),
        sa.Column("user_id", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("task_id", "tag"),
    )
    op.create_index("task_tags_user_tag_task", "task_tags", ["user_id", "tag", "task_id"])
    op.create_table(
        "task_batches",
        sa.Column("user_id", sa.BigInteger(), sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("idempotency_key", sa.Text(), nullable=False),
        sa.Column("request_hash", sa.Text(), nullable=False),
        sa.Column("task_ids", sa.ARRAY(sa.BigInteger()), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("user_id", "idempotency_key"),
    )
    # Retention expires a batch's Idempotency-Key with the age of its tasks.
    op.create_index("task_batches_created_at", "task_batches", ["created_at"])


def downgrade() -> None:
    op.drop_index("task_batches_created_at", table_name="task_batches")
    op.drop_table("task_batches")
    op.drop_index("task_tags_user_tag_task", table_name="task_tags")
    op.drop_table("task_tags")
    op.drop_table("task_contents")
    op.drop_column("tasks", "tags")
    op.execute("UPDATE tasks SET body = '' WHERE body IS NULL")
    op.alter_column("tasks", "body", existing_type=sa.Text(), nullable=False)
