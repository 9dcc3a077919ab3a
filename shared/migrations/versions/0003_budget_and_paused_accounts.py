"""tenant isolation: a try budget apart from the fencing token; accounts paused after a refused login

``tasks.budget_base`` is the try count at which the task's current budget of MAX_TRY_COUNT tries
began: 0 at enqueue, the try count at a user's retry, one more for each claim a worker fault gave
back. The try count itself only ever grows (it is the fencing token).

``users.smtp_paused_at`` / ``smtp_paused_reason``: set when the SMTP server refused the account's
credentials; the account's mail waits until the user updates the SMTP settings.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("tasks", sa.Column("budget_base", sa.Integer(), server_default="0", nullable=False))
    op.add_column("users", sa.Column("smtp_paused_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("users", sa.Column("smtp_paused_reason", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("users", "smtp_paused_reason")
    op.drop_column("users", "smtp_paused_at")
    op.drop_column("tasks", "budget_base")
