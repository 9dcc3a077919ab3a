"""The schema as SQLAlchemy models: every table, its indexes and its checks, and the status lists
they are written with.

The schema is created only by Alembic migrations (``shared/migrations``); ``create_all`` appears
nowhere outside the test that checks the migrations match these models.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy import orm
from sqlalchemy.dialects.postgresql import JSONB

# The attempt log's table has a module of its own (this one would pass 400 lines); it is re-exported
# here with the others, on the same Base and metadata.
from shared.attempt_log import ATTEMPT_OUTCOMES, TaskAttempt, task_attempts  # noqa: F401
from shared.domain import Status
from shared.modelbase import Base
from shared.webhook_tables import (  # noqa: F401
    DELIVERY_STATES,
    EVENT_TYPES,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookEvent,
    webhook_deliveries,
    webhook_endpoints,
    webhook_events,
)

STATUS_VALUES = tuple(s.value for s in Status)
# Every index the pipeline's queries rely on is named here so tests can check EXPLAIN uses them.
PENDING_SQL_LIST = "'scheduled', 'queued', 'processing', 'failed'"
FAIL_SQL_LIST = "'failed', 'cancelled'"
# The subject as tasks_user_subject indexes it: a subject search compares exactly this expression.
SUBJECT_KEY_LENGTH = 64


def subject_key(subject: sa.ColumnElement[str]) -> sa.ColumnElement[str]:
    """left(lower(subject) COLLATE "C", 64): case-insensitive, in byte order, so LIKE 'x%' is a range of
    the index whatever the database's collation (the COLLATE sits inside the expression, where the
    index definition keeps it)."""
    return sa.func.left(sa.func.lower(subject).collate("C"), SUBJECT_KEY_LENGTH)


class User(Base):
    __tablename__ = "users"

    id: orm.Mapped[int] = orm.mapped_column(sa.BigInteger, sa.Identity(), primary_key=True)
    email: orm.Mapped[str] = orm.mapped_column(sa.Text)
    password_hash: orm.Mapped[str] = orm.mapped_column(sa.Text)
    smtp_host: orm.Mapped[str] = orm.mapped_column(sa.Text)
    smtp_port: orm.Mapped[int] = orm.mapped_column(sa.Integer)
    smtp_username: orm.Mapped[str] = orm.mapped_column(sa.Text)
    smtp_password_enc: orm.Mapped[str] = orm.mapped_column(sa.Text)  # Fernet token, never the clear text
    smtp_security: orm.Mapped[str] = orm.mapped_column(sa.Text)
    # Set when the SMTP server refused the credentials; the account's mail waits until they change.
    smtp_paused_at = orm.mapped_column(sa.DateTime(timezone=True), nullable=True)
    smtp_paused_reason: orm.Mapped[str | None] = orm.mapped_column(sa.Text, nullable=True)
    smtp_paused_code: orm.Mapped[str | None] = orm.mapped_column(sa.Text, nullable=True)
    # What the account declares of its relay (docs/relays.md): conversations at once (null: the
    # deployment's SMTP_MAX_CONNECTIONS_PER_ACCOUNT) and up to four send windows.
    smtp_max_connections: orm.Mapped[int | None] = orm.mapped_column(sa.Integer, nullable=True)
    smtp_send_limits = orm.mapped_column(JSONB, server_default=sa.text("'[]'::jsonb"), nullable=False)
    # The account's backoff episode as the senders see it in Redis (shared.pace), mirrored for the user
    # record: since when, the next attempt, why (shared.domain.AccountReason) and the relay's words.
    smtp_backoff_since = orm.mapped_column(sa.DateTime(timezone=True), nullable=True)
    smtp_backoff_until = orm.mapped_column(sa.DateTime(timezone=True), nullable=True)
    smtp_backoff_code: orm.Mapped[str | None] = orm.mapped_column(sa.Text, nullable=True)
    smtp_backoff_reason: orm.Mapped[str | None] = orm.mapped_column(sa.Text, nullable=True)
    created_at = orm.mapped_column(sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False)
    updated_at = orm.mapped_column(sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False)
    # Written into every token at login; a password change or a logout-all raises it, and a token of an
    # older generation is refused (shared.accounts.users.authenticate, and enqueue's insert itself).
    token_generation: orm.Mapped[int] = orm.mapped_column(sa.Integer, server_default="0", nullable=False)
    # An operator's overrides of the deployment's tenant bounds for this account (`mailq account limits`);
    # null: the deployment's MAX_PENDING_PER_USER, MAX_PENDING_BYTES_PER_USER, ENQUEUE_RATE_PER_USER and
    # ENQUEUE_BURST_PER_USER (shared.tasks.bounds).
    max_pending_tasks: orm.Mapped[int | None] = orm.mapped_column(sa.BigInteger, nullable=True)
    max_pending_bytes: orm.Mapped[int | None] = orm.mapped_column(sa.BigInteger, nullable=True)
    enqueue_rate: orm.Mapped[float | None] = orm.mapped_column(sa.Float, nullable=True)
    enqueue_burst: orm.Mapped[int | None] = orm.mapped_column(sa.Integer, nullable=True)

    __table_args__ = (
        sa.Index("users_email_lower_key", sa.func.lower(sa.column("email")), unique=True),
        sa.CheckConstraint(
            "max_pending_tasks >= 0 AND max_pending_bytes >= 0 AND enqueue_rate > 0 AND enqueue_burst >= 1",
            name="users_limits_check",
        ),
        sa.CheckConstraint("smtp_security IN ('starttls', 'tls', 'none')", name="users_smtp_security_check"),
        sa.CheckConstraint("smtp_port BETWEEN 1 AND 65535", name="users_smtp_port_check"),
        sa.CheckConstraint("smtp_max_connections >= 1", name="users_smtp_max_connections_check"),
        # `mailq status`: the accounts waiting, by reason (a few rows of a partial index each).
        sa.Index(
            "users_smtp_backing_off",
            "smtp_backoff_code",
            postgresql_where=sa.text("smtp_backoff_since IS NOT NULL"),
        ),
        sa.Index(
            "users_smtp_paused", "smtp_paused_code", postgresql_where=sa.text("smtp_paused_at IS NOT NULL")
        ),
    )


class Task(Base):
    __tablename__ = "tasks"

    id: orm.Mapped[int] = orm.mapped_column(sa.BigInteger, sa.Identity(), primary_key=True)
    user_id: orm.Mapped[int] = orm.mapped_column(
        sa.BigInteger, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False
    )
    recipient_email: orm.Mapped[str] = orm.mapped_column(sa.Text)
    subject: orm.Mapped[str] = orm.mapped_column(sa.Text)
    # The text part; null when the mail has only an HTML part (task_contents.html).
    body: orm.Mapped[str | None] = orm.mapped_column(sa.Text, nullable=True)
    status: orm.Mapped[str] = orm.mapped_column(sa.Text)
    # Claims so far: the fencing token, it only ever grows (never reset, never reused).
    try_count: orm.Mapped[int] = orm.mapped_column(sa.Integer, server_default="0")
    # The try count at which the current budget of MAX_TRY_COUNT tries began (a retry or a worker
    # fault raises it); tries left = MAX_TRY_COUNT - (try_count - budget_base).
    budget_base: orm.Mapped[int] = orm.mapped_column(sa.Integer, server_default="0", nullable=False)
    scheduled_at = orm.mapped_column(sa.DateTime(timezone=True), nullable=False)
    # When the task next needs attention: scheduled_at, the retry time, or (queued) when it was pushed.
    next_attempt_at = orm.mapped_column(sa.DateTime(timezone=True), nullable=False)
    lease_until = orm.mapped_column(sa.DateTime(timezone=True), nullable=True)
    last_error: orm.Mapped[str | None] = orm.mapped_column(sa.Text, nullable=True)
    message_id: orm.Mapped[str] = orm.mapped_column(sa.Text)
    idempotency_key: orm.Mapped[str | None] = orm.mapped_column(sa.Text, nullable=True)
    request_hash: orm.Mapped[str | None] = orm.mapped_column(sa.Text, nullable=True)
    created_at = orm.mapped_column(sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False)
    updated_at = orm.mapped_column(sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False)
    sent_at = orm.mapped_column(sa.DateTime(timezone=True), nullable=True)
    # Never attempted after this; the sweep cancels it as expired (its own expires_at, or
    # MAX_QUEUE_LIFETIME after it was due, which enqueue writes; the default only serves other writers).
    expires_at = orm.mapped_column(
        sa.DateTime(timezone=True), server_default=sa.text("(now() + '5 days'::interval)"), nullable=False
    )
    # The mail's tags ({"key": "value"}), read with the row by every view and webhook; the ?tag= filter
    # is served by task_tags.
    tags = orm.mapped_column(JSONB, server_default=sa.text("'{}'::jsonb"), nullable=False)

    __table_args__ = (
        sa.CheckConstraint(
            f"status IN ({', '.join(repr(s) for s in STATUS_VALUES)})", name="tasks_status_check"
        ),
        # Idempotency-Key is unique per user.
        sa.Index(
            "tasks_user_idempotency_key",
            "user_id",
            "idempotency_key",
            unique=True,
            postgresql_where=sa.text("idempotency_key IS NOT NULL"),
        ),
        # GET /task/queue (default: everything still to go out), keyset on id.
        sa.Index(
            "tasks_user_pending_id",
            "user_id",
            "id",
            postgresql_where=sa.text(f"status IN ({PENDING_SQL_LIST})"),
        ),
        # GET /task/queue?status=….
        sa.Index("tasks_user_status_id", "user_id", "status", "id"),
        # GET /task/queue/fail.
        sa.Index(
            "tasks_user_fail_id",
            "user_id",
            "id",
            postgresql_where=sa.text(f"status IN ({FAIL_SQL_LIST})"),
        ),
        # GET /task/queue?recipient=… (and /fail): one recipient's tasks, keyset on id.
        sa.Index("tasks_user_recipient_id", "user_id", "recipient_email", "id"),
        # The sweep: due scheduled/failed tasks (one index), queued tasks past the leak window (another).
        sa.Index(
            "tasks_sweep_due",
            "next_attempt_at",
            postgresql_where=sa.text("status IN ('scheduled', 'failed')"),
        ),
        sa.Index(
            "tasks_sweep_queued",
            "next_attempt_at",
            postgresql_where=sa.text("status = 'queued'"),
        ),
        # The sweep: mail not sent by its expires_at (shared.pending; processing runs to its outcome). The
        # always-true "expires_at IS NOT NULL" keeps the due and leaked queries on their own indexes.
        sa.Index(
            "tasks_sweep_expired",
            "expires_at",
            postgresql_where=sa.text(
                "status IN ('scheduled', 'queued', 'failed') AND expires_at IS NOT NULL"
            ),
        ),
        # Retention: final tasks by age (the predicate is shared.pending.FINAL_STATUSES).
        sa.Index(
            "tasks_retention",
            "updated_at",
            postgresql_where=sa.text("status IN ('sent', 'cancelled')"),
        ),
        # The sweep: processing tasks whose lease ran out.
        sa.Index(
            "tasks_sweep_lease",
            "lease_until",
            postgresql_where=sa.text("status = 'processing'"),
        ),
        # The metrics function: exact counts of the pending statuses (never the history's rows). Only
        # shared/observe/gauges.py states the always-true "scheduled_at IS NOT NULL", so the sweep's queries
        # never pick this index over their own (ordered by due time)...
        sa.Index(
            "tasks_pending_status",
            "status",
            postgresql_where=sa.text(f"status IN ({PENDING_SQL_LIST}) AND scheduled_at IS NOT NULL"),
        ),
        # ...and the oldest first try still waiting: its scheduled_at is when it became due.
        sa.Index(
            "tasks_queued_first_try",
            "scheduled_at",
            postgresql_where=sa.text("status = 'queued' AND try_count = 0"),
        ),
        # Finding mail (shared/tasks/search.py, migration 0013): a created-at range within each status
        # (merged across a set of statuses), a subject prefix (its first 64 characters, lowercased, in
        # byte order), the exact Message-ID.
        sa.Index("tasks_user_status_created", "user_id", "status", "created_at", "id"),
        sa.Index("tasks_user_subject", "user_id", subject_key(sa.column("subject")), "id"),
        sa.Index("tasks_user_message_id", "user_id", "message_id"),
    )


class TaskContent(Base):
    """What a mail carries beyond the seed's fields, one row per such task (plain mails have none).

    Kept out of ``tasks`` so the hot status UPDATEs never copy it and the list endpoints never read it.
    """

    __tablename__ = "task_contents"

    task_id: orm.Mapped[int] = orm.mapped_column(
        sa.BigInteger, sa.ForeignKey("tasks.id", ondelete="CASCADE"), primary_key=True
    )
    html: orm.Mapped[str | None] = orm.mapped_column(sa.Text, nullable=True)
    from_name: orm.Mapped[str | None] = orm.mapped_column(sa.Text, nullable=True)
    recipient_name: orm.Mapped[str | None] = orm.mapped_column(sa.Text, nullable=True)
    cc = orm.mapped_column(JSONB, server_default=sa.text("'[]'::jsonb"), nullable=False)  # addresses
    bcc = orm.mapped_column(JSONB, server_default=sa.text("'[]'::jsonb"), nullable=False)  # envelope only
    reply_to: orm.Mapped[str | None] = orm.mapped_column(sa.Text, nullable=True)
    # [[name, value], ...] in the order given.
    headers = orm.mapped_column(JSONB, server_default=sa.text("'[]'::jsonb"), nullable=False)
    # [{"filename", "content_type", "size"}] in order; their bytes, concatenated, in attachment_data.
    attachments = orm.mapped_column(JSONB, server_default=sa.text("'[]'::jsonb"), nullable=False)
    attachment_data: orm.Mapped[bytes | None] = orm.mapped_column(sa.LargeBinary, nullable=True)


class TaskTag(Base):
    """One row per tag of a task ("key:value"): the index behind ``?tag=``, keyset-paged on task id."""

    __tablename__ = "task_tags"

    task_id: orm.Mapped[int] = orm.mapped_column(
        sa.BigInteger, sa.ForeignKey("tasks.id", ondelete="CASCADE"), primary_key=True
    )
    tag: orm.Mapped[str] = orm.mapped_column(sa.Text, primary_key=True)
    user_id: orm.Mapped[int] = orm.mapped_column(sa.BigInteger, nullable=False)

    __table_args__ = (
        # GET /task/queue?tag=… (and /fail): one user's tasks with this tag, in id order.
        sa.Index("task_tags_user_tag_task", "user_id", "tag", "task_id"),
    )


class TaskBatch(Base):
    """A batch enqueue made with an Idempotency-Key: what a replay of it answers."""

    __tablename__ = "task_batches"

    user_id: orm.Mapped[int] = orm.mapped_column(
        sa.BigInteger, sa.ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    idempotency_key: orm.Mapped[str] = orm.mapped_column(sa.Text, primary_key=True)
    request_hash: orm.Mapped[str] = orm.mapped_column(sa.Text, nullable=False)
    # The stored tasks' ids in input order; null where the item was invalid (permissive mode).
    task_ids = orm.mapped_column(sa.ARRAY(sa.BigInteger), nullable=False)
    created_at = orm.mapped_column(sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False)

    # Retention expires a batch's Idempotency-Key with the age of its tasks.
    __table_args__ = (sa.Index("task_batches_created_at", "created_at"),)


class TaskBulkRequest(Base):
    """A bulk retry or cancel made with an Idempotency-Key: what a replay of it answers."""

    __tablename__ = "task_bulk_requests"

    user_id: orm.Mapped[int] = orm.mapped_column(
        sa.BigInteger, sa.ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    idempotency_key: orm.Mapped[str] = orm.mapped_column(sa.Text, primary_key=True)
    request_hash: orm.Mapped[str] = orm.mapped_column(sa.Text, nullable=False)
    answer = orm.mapped_column(JSONB, nullable=True)  # written in the transaction that acted
    created_at = orm.mapped_column(sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False)

    # Retention expires the key with the age of a batch's.
    __table_args__ = (sa.Index("task_bulk_requests_created_at", "created_at"),)


users = User.__table__
tasks = Task.__table__
task_contents = TaskContent.__table__
task_tags = TaskTag.__table__
task_batches = TaskBatch.__table__
task_bulk_requests = TaskBulkRequest.__table__
