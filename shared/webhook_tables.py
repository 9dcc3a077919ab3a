"""The webhook tables (shared/tasks/events.py writes events and deliveries; shared/webhooks/worker.py
sends them), on the one declarative base of ``shared.models``, which re-exports them."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy import orm
from sqlalchemy.dialects import postgresql

from shared.modelbase import Base

# Webhooks (shared/tasks/events.py writes events and deliveries; shared/webhooks/worker.py sends them).
EVENT_TYPES = ("task.sent", "task.deferred", "task.cancelled")
EVENT_TYPES += ("account.paused", "account.resumed", "account.backing_off")  # no task: user_id names it
# A delivery's life: scheduled (a retry waiting for next_attempt_at) -> queued (its envelope pushed at
# next_attempt_at) -> sending (a worker holds it until lease_until) -> delivered | failed, or back to
# scheduled. The API shows the first three as "pending".
DELIVERY_STATES = ("scheduled", "queued", "sending", "delivered", "failed")


class WebhookEndpoint(Base):
    __tablename__ = "webhook_endpoints"

    id: orm.Mapped[int] = orm.mapped_column(sa.BigInteger, sa.Identity(), primary_key=True)
    user_id: orm.Mapped[int] = orm.mapped_column(
        sa.BigInteger, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False
    )
    url: orm.Mapped[str] = orm.mapped_column(sa.Text)
    events = orm.mapped_column(postgresql.ARRAY(sa.Text), nullable=False)  # the event types it receives
    enabled: orm.Mapped[bool] = orm.mapped_column(sa.Boolean, server_default=sa.true(), nullable=False)
    disabled_reason: orm.Mapped[str | None] = orm.mapped_column(sa.Text, nullable=True)
    # The signing secret, encrypted like SMTP passwords (it must be usable, so it is not hashed).
    secret_enc: orm.Mapped[str] = orm.mapped_column(sa.Text)
    # The secret a rotation replaced: deliveries are signed with it too until previous_secret_until.
    previous_secret_enc: orm.Mapped[str | None] = orm.mapped_column(sa.Text, nullable=True)
    previous_secret_until = orm.mapped_column(sa.DateTime(timezone=True), nullable=True)
    created_at = orm.mapped_column(sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False)
    updated_at = orm.mapped_column(sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False)

    __table_args__ = (
        # A user's endpoints: the list, the limit of ten, and the send path's "any endpoint?" check.
        sa.Index("webhook_endpoints_user_id", "user_id", "id"),
    )


class WebhookEvent(Base):
    """What happened to a task, or to an account (``account.*``: no task), written in the transaction
    that made it happen (the outbox)."""

    __tablename__ = "webhook_events"

    id: orm.Mapped[int] = orm.mapped_column(sa.BigInteger, sa.Identity(), primary_key=True)
    task_id: orm.Mapped[int | None] = orm.mapped_column(
        sa.BigInteger, sa.ForeignKey("tasks.id", ondelete="CASCADE"), nullable=True
    )
    user_id: orm.Mapped[int | None] = orm.mapped_column(
        sa.BigInteger, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=True
    )
    type: orm.Mapped[str] = orm.mapped_column(sa.Text)
    data = orm.mapped_column(postgresql.JSONB, nullable=False)  # the payload's "data", as it was then
    created_at = orm.mapped_column(sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False)

    __table_args__ = (
        sa.CheckConstraint(
            f"type IN ({', '.join(repr(t) for t in EVENT_TYPES)})", name="webhook_events_type_check"
        ),
        sa.CheckConstraint("task_id IS NOT NULL OR user_id IS NOT NULL", name="webhook_events_subject_check"),
        sa.Index("webhook_events_task_id", "task_id"),
        # Retention of account events (a task's go with its task).
        sa.Index("webhook_events_account_created", "created_at", postgresql_where=sa.text("task_id IS NULL")),
    )


class WebhookDelivery(Base):
    """One event to one endpoint: kept after it ends, as the delivery log (and for audits)."""

    __tablename__ = "webhook_deliveries"

    id: orm.Mapped[int] = orm.mapped_column(sa.BigInteger, sa.Identity(), primary_key=True)
    event_id: orm.Mapped[int] = orm.mapped_column(
        sa.BigInteger, sa.ForeignKey("webhook_events.id", ondelete="CASCADE"), nullable=False
    )
    endpoint_id: orm.Mapped[int] = orm.mapped_column(
        sa.BigInteger, sa.ForeignKey("webhook_endpoints.id", ondelete="CASCADE"), nullable=False
    )
    state: orm.Mapped[str] = orm.mapped_column(sa.Text)
    # Attempts started so far: the fencing token of the outcome, like a task's try_count.
    attempts: orm.Mapped[int] = orm.mapped_column(sa.Integer, server_default="0", nullable=False)
    last_status: orm.Mapped[int | None] = orm.mapped_column(sa.Integer, nullable=True)  # HTTP status
    last_error: orm.Mapped[str | None] = orm.mapped_column(sa.Text, nullable=True)
    next_attempt_at = orm.mapped_column(
        sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
    )
    lease_until = orm.mapped_column(sa.DateTime(timezone=True), nullable=True)
    created_at = orm.mapped_column(sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False)
    updated_at = orm.mapped_column(sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False)
    delivered_at = orm.mapped_column(sa.DateTime(timezone=True), nullable=True)

    __table_args__ = (
        sa.CheckConstraint(
            f"state IN ({', '.join(repr(s) for s in DELIVERY_STATES)})", name="webhook_deliveries_state_check"
        ),
        # The delivery log of one endpoint, newest first (keyset on id).
        sa.Index("webhook_deliveries_endpoint_id", "endpoint_id", "id"),
        sa.Index("webhook_deliveries_event_id", "event_id"),
        # The sweep (and idle webhook workers): retries due, envelopes lost, leases run out.
        sa.Index(
            "webhook_deliveries_due",
            "next_attempt_at",
            postgresql_where=sa.text("state = 'scheduled'"),
        ),
        sa.Index(
            "webhook_deliveries_queued",
            "next_attempt_at",
            postgresql_where=sa.text("state = 'queued'"),
        ),
        sa.Index(
            "webhook_deliveries_lease",
            "lease_until",
            postgresql_where=sa.text("state = 'sending'"),
        ),
    )


webhook_endpoints = WebhookEndpoint.__table__
webhook_events = WebhookEvent.__table__
webhook_deliveries = WebhookDelivery.__table__
