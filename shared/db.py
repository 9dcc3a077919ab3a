"""PostgreSQL: the models, the engine, and the migration entry point.

The schema is created only by Alembic migrations (``shared/migrations``); ``create_all`` appears
nowhere outside the test that checks the migrations match these models.
"""

from __future__ import annotations

import threading
from datetime import datetime
from pathlib import Path

import sqlalchemy as sa
from pg8000 import converters
from sqlalchemy import orm
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Engine

from shared import prepared
from shared.domain import Status

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
STATUS_VALUES = tuple(s.value for s in Status)
# Every index the pipeline's queries rely on is named here so tests can check EXPLAIN uses them.
PENDING_SQL_LIST = "'scheduled', 'queued', 'processing', 'failed'"
FAIL_SQL_LIST = "'failed', 'cancelled'"
# The statuses a try ends in; the dashboard's last hour counts them by the time they were reached.
OUTCOME_STATUSES = (Status.SENT, Status.FAILED, Status.CANCELLED)
OUTCOME_SQL_LIST = ", ".join(f"'{s.value}'" for s in OUTCOME_STATUSES)


class Base(orm.DeclarativeBase):
    pass


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
    created_at = orm.mapped_column(sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False)
    updated_at = orm.mapped_column(sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False)

    __table_args__ = (
        sa.Index("users_email_lower_key", sa.func.lower(sa.column("email")), unique=True),
        sa.CheckConstraint("smtp_security IN ('starttls', 'tls', 'none')", name="users_smtp_security_check"),
        sa.CheckConstraint("smtp_port BETWEEN 1 AND 65535", name="users_smtp_port_check"),
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
        # GET /task/stats: the last hour's outcomes, read from the index alone (status included).
        sa.Index(
            "tasks_user_outcome_at",
            "user_id",
            "updated_at",
            postgresql_include=["status"],
            postgresql_where=sa.text(f"status IN ({OUTCOME_SQL_LIST})"),
        ),
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
        # Retention: final tasks by age (the predicate is shared.sweep_sql.FINAL_STATUSES).
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
        # shared/gauges.py states the always-true "scheduled_at IS NOT NULL", so the sweep's queries
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
    )


# Webhooks (shared/events.py writes events and deliveries; shared/webhooks.py sends them).
EVENT_TYPES = ("task.sent", "task.deferred", "task.cancelled")
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
    """What happened to a task, written in the transaction that made it happen (the outbox)."""

    __tablename__ = "webhook_events"

    id: orm.Mapped[int] = orm.mapped_column(sa.BigInteger, sa.Identity(), primary_key=True)
    task_id: orm.Mapped[int] = orm.mapped_column(
        sa.BigInteger, sa.ForeignKey("tasks.id", ondelete="CASCADE"), nullable=False
    )
    type: orm.Mapped[str] = orm.mapped_column(sa.Text)
    data = orm.mapped_column(postgresql.JSONB, nullable=False)  # the payload's "data", as it was then
    created_at = orm.mapped_column(sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False)

    __table_args__ = (
        sa.CheckConstraint(
            f"type IN ({', '.join(repr(t) for t in EVENT_TYPES)})", name="webhook_events_type_check"
        ),
        sa.Index("webhook_events_task_id", "task_id"),
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


users = User.__table__
tasks = Task.__table__
webhook_endpoints = WebhookEndpoint.__table__
webhook_events = WebhookEvent.__table__
webhook_deliveries = WebhookDelivery.__table__
task_contents = TaskContent.__table__
task_tags = TaskTag.__table__
task_batches = TaskBatch.__table__

_engines: dict[str, Engine] = {}
_engines_lock = threading.Lock()


# Every socket operation on a PostgreSQL connection ends within this many seconds (the default of
# DATABASE_SOCKET_TIMEOUT), so a connection that went half-open (a peer gone without a reset) is
# noticed instead of hanging a worker forever.
SOCKET_TIMEOUT = 60.0


def on_the_row(condition: str) -> str:
    """A condition on the row a statement finds by its primary key, written so that the planner cannot
    take it as a reason to use a partial status index instead (``coalesce`` hides it from index
    matching; in a WHERE clause NULL and false are the same).

    ``WHERE id = :id AND status = 'queued'`` may otherwise be planned as a scan of the partial index of
    queued rows, filtered by id, whenever the table's statistics say that index is nearly empty - as
    they do after an ANALYZE taken while nothing was queued. During the next burst every claim then read
    every queued row, and a drain grew with the square of its backlog (measured: PostgreSQL's CPU per
    mail 0.8 -> 2.7 ms on 20,000 queued rows; tests/test_prepared.py reproduces the plan).
    """
    return f"coalesce({condition}, false)"


def make_engine(
    url: str,
    *,
    pool_size: int = 5,
    pre_ping: bool = True,
    max_overflow: int | None = None,
    socket_timeout: float = SOCKET_TIMEOUT,
) -> Engine:
    """A new engine. ``pre_ping`` checks each connection before use, so a request right after a
    PostgreSQL restart does not fail; workers skip it (one round trip per transaction) because
    their loop retries a failed step anyway, and SQLAlchemy drops the dead pool on the first error."""
    engine = sa.create_engine(
        url,
        pool_pre_ping=pre_ping,
        pool_size=pool_size,
        max_overflow=pool_size if max_overflow is None else max_overflow,
        pool_recycle=1800,
        hide_parameters=True,  # bound values (hashes, ciphertexts, mail bodies) never reach an error log
        connect_args={"timeout": socket_timeout},
    )
    sa.event.listen(engine, "handle_error", _timeout_is_a_disconnect)
    if engine.dialect.driver == "pg8000":
        sa.event.listen(engine, "connect", _read_timestamps_natively)
    prepared.install(engine)  # the per-mail statements: prepared once per connection, one round trip
    return engine


def timestamptz_in(text: str):
    """A ``timestamptz`` as PostgreSQL writes it (``2026-12-01 20:10:17.12+00``), read by the C
    parser of ``datetime.fromisoformat``; what that refuses (infinity, BC dates, years past 9999)
    is read by pg8000's own converter, as before.

    pg8000 reads every timestamp with ``strptime`` (and retries with dateutil whenever the offset is
    not whole hours): ~8 us each, 80 times the C parser. A queue page of 50 tasks holds 250 of them:
    it was most of the page's time in Python (tests/bench's scale scenario), and a few per cent of a
    sender's CPU (the claim returns two)."""
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return converters.timestamptz_in(text)


def timestamp_in(text: str):
    """The same for ``timestamp`` (without time zone)."""
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return converters.timestamp_in(text)


def _read_timestamps_natively(dbapi_connection, _record) -> None:
    dbapi_connection.register_in_adapter(converters.TIMESTAMPTZ, timestamptz_in)
    dbapi_connection.register_in_adapter(converters.TIMESTAMP, timestamp_in)


def _timeout_is_a_disconnect(context) -> None:
    # pg8000 lets a read that timed out (a half-open connection: no reply, no reset) escape as a bare
    # TimeoutError, which SQLAlchemy does not take for a lost connection: it would try a ROLLBACK on
    # it and log the failure. Marked as a disconnect, the connection (and the pool) is dropped at once.
    if isinstance(context.original_exception, TimeoutError):
        context.is_disconnect = True


def engine_for(
    url: str,
    *,
    pool_size: int = 5,
    pre_ping: bool = True,
    max_overflow: int | None = None,
    socket_timeout: float = SOCKET_TIMEOUT,
) -> Engine:
    """One engine per URL per process, created on first use (never at import time)."""
    with _engines_lock:
        engine = _engines.get(url)
        if engine is None:
            engine = _engines[url] = make_engine(
                url,
                pool_size=pool_size,
                pre_ping=pre_ping,
                max_overflow=max_overflow,
                socket_timeout=socket_timeout,
            )
        return engine


def dispose_engines() -> None:
    """Drop pooled connections, e.g. after a fork."""
    with _engines_lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()


# SQLSTATEs of a server that is going away, not there yet, or out of room for us right now: class 08
# (connection exceptions), class 53 (insufficient resources: 53300 too many connections, 53100 disk
# full, 53200 out of memory) and the shutdown codes of class 57.
_UNAVAILABLE_SQLSTATES = frozenset({"57P01", "57P02", "57P03"})
_UNAVAILABLE_CLASSES = ("08", "53")


def is_unavailable(exc: BaseException) -> bool:
    """True when ``exc`` means PostgreSQL cannot be used right now (down, restarting, connection lost).

    A shutting-down server answers a new connection with 57P03, which SQLAlchemy raises as a
    ProgrammingError; pg8000 may surface a reset socket as a bare ConnectionError, and a connection
    that stopped answering (DATABASE_SOCKET_TIMEOUT) as a bare TimeoutError.
    """
    if isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError | ConnectionError | TimeoutError):
        return True
    if isinstance(exc, sa.exc.DBAPIError):
        if exc.connection_invalidated:
            return True
        args = getattr(exc.orig, "args", ())
        code = args[0].get("C") if args and isinstance(args[0], dict) else None
        return bool(code) and (code.startswith(_UNAVAILABLE_CLASSES) or code in _UNAVAILABLE_SQLSTATES)
    return False


def alembic_config(url: str):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["database_url"] = url
    return config


def migrate(url: str) -> None:
    """Bring the schema to the newest migration; safe to run again and from two processes at once."""
    from alembic import command

    command.upgrade(alembic_config(url), "head")
