"""Filling PostgreSQL fast: tasks go in with ``COPY``, in the shape ``shared.tasks.enqueue`` writes them.

Delivery scenarios measure how fast a backlog drains, not how fast it is made: the rows are copied
in and their envelopes staged in a side list before the clock starts (scenario 4 measures enqueue
itself, and scenario 5 goes through the HTTP enqueue function).
"""

from __future__ import annotations

import csv
import io
import random
import uuid
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from shared import queue

COPY_CHUNK = 50_000

# The mail every scenario sends: a short plain-text notification, the typical transactional mail.
BODY = (
    "Hello,\n\nthis is notification {i} from the mailq benchmark. Your order has shipped and\n"
    "should arrive within three working days. Reply to this mail if anything looks wrong.\n\n"
    "Regards,\nthe benchmark\n"
)


def mail(i: int) -> tuple[str, str, str]:
    """(recipient, subject, body) of mail number ``i``."""
    return f"user{i}@example.org", f"Your order {i} has shipped", BODY.format(i=i)


def new_message_id(domain: str = "example.com") -> str:
    return f"<mailq.{uuid.uuid4().hex}@{domain}>"  # the format shared.tasks.enqueue uses


def _iso(t: datetime) -> str:
    return t.isoformat()


def copy_tasks(
    engine: Engine,
    columns: Sequence[str],
    rows: Iterable[Sequence],
    progress: Callable[[int], None] = lambda n: None,
) -> int:
    """COPY rows into tasks in chunks; return how many went in."""
    sql = f"COPY tasks ({', '.join(columns)}) FROM STDIN WITH (FORMAT csv)"
    total = 0
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        pending = 0

        def flush() -> None:
            nonlocal buffer, writer, pending, total
            if pending:
                data = buffer.getvalue().encode()
                if hasattr(cursor, "copy"):  # psycopg 3
                    with cursor.copy(sql) as copy:
                        copy.write(data)
                else:  # pg8000
                    cursor.execute(sql, stream=io.BytesIO(data))
                raw.commit()
                total += pending
                progress(pending)
            buffer = io.StringIO()
            writer = csv.writer(buffer, lineterminator="\n")
            pending = 0

        for row in rows:
            writer.writerow(["" if v is None else v for v in row])
            pending += 1
            if pending >= COPY_CHUNK:
                flush()
        flush()
    finally:
        raw.close()
    return total


QUEUED_COLUMNS = (
    "user_id",
    "recipient_email",
    "subject",
    "body",
    "status",
    "scheduled_at",
    "next_attempt_at",
    "message_id",
)


def queued_backlog(engine: Engine, user_id: int, n: int) -> list[tuple[int, str]]:
    """N queued tasks for ``user_id``; returns their (id, message_id) in id order."""
    now = _iso(datetime.now(UTC))

    def rows():
        for i in range(n):
            recipient, subject, body = mail(i)
            yield (user_id, recipient, subject, body, "queued", now, now, new_message_id())

    with engine.begin() as conn:
        first = conn.execute(sa.text("SELECT coalesce(max(id), 0) FROM tasks")).scalar_one()
    copy_tasks(engine, QUEUED_COLUMNS, rows())
    with engine.connect() as conn:
        return [
            (r.id, r.message_id)
            for r in conn.execute(
                sa.text("SELECT id, message_id FROM tasks WHERE id > :first ORDER BY id"), {"first": first}
            )
        ]


HOLD = "bench:hold"  # envelopes wait here until the clock starts; RENAME makes them appear at once


def stage_envelopes(client, task_ids: Sequence[int], key: str = HOLD) -> None:
    """LPUSH the envelopes of ``task_ids`` (in order) into a side list, 1,000 per command."""
    client.delete(key)
    pipe = client.pipeline(transaction=False)
    for start in range(0, len(task_ids), 1000):
        pipe.lpush(key, *(queue.encode(i) for i in task_ids[start : start + 1000]))
    pipe.execute()


def release(client, source: str, destination: str) -> None:
    """Make a staged backlog appear in ``destination`` in one step (blocked readers wake up)."""
    client.rename(source, destination)


# --- the scale scenario's million rows ----------------------------------------------------------

# Status mix of the table, per 1,000 rows: mostly history, a realistic amount still to go out.
SCALE_MIX = (
    (850, "sent"),
    (20, "cancelled"),
    (1, "failed-due"),  # a retry that is due: the sweep must put it back
    (9, "failed"),  # retries due later
    (1, "scheduled-due"),  # scheduled_at has passed: the sweep must put it back
    (49, "scheduled"),  # scheduled for later
    (40, "queued"),  # pushed less than a minute ago
    (5, "processing"),  # with a sender, lease running
    (25, "sent"),
)
assert sum(n for n, _ in SCALE_MIX) == 1000
# Rows whose timestamps matter relative to "now" (due or not yet, fresh, lease running): copied last, so
# a long seeding cannot make a retry due, a queued row look leaked or a lease run out before the sweep.
HISTORY_KINDS = ("sent", "cancelled")
# History rows made in Python at most; the rest are copies of those made inside PostgreSQL (a fresh
# Message-ID each), so 5,000,000 rows take about as long in Python as 1,000,000.
PYTHON_HISTORY_ROWS = 1_000_000
# History reaches this many days back: inside TASK_RETENTION_DAYS (30), so no row expires while a run
# seeds and measures, and the timed sweep pass does the same work at every table size. (Seeded up to
# the 30th day, the rows crossing it during the seeding - five times as many in a table five times as
# large - were purged in the timed pass: 515 deletes with their cascades in a 5M-row pass.) The purge
# has its own tests (tests/test_retention.py).
HISTORY_DAYS = 29
REPLICATE_CHUNK = 500_000

SCALE_COLUMNS = (
    "user_id",
    "recipient_email",
    "subject",
    "body",
    "status",
    "try_count",
    "scheduled_at",
    "next_attempt_at",
    "lease_until",
    "last_error",
    "message_id",
    "created_at",
    "updated_at",
    "sent_at",
)


def _kinds() -> list[str]:
    return [kind for count, kind in SCALE_MIX for _ in range(count)]


def _kind_of(kinds: list[str], i: int, live_rows: int) -> str:
    """Row ``i``'s kind: the mix over the first ``live_rows`` rows, history (sent/cancelled) after."""
    kind = kinds[i % 1000]
    return kind if i < live_rows or kind in HISTORY_KINDS else "sent"


def scale_counts(total: int, live_rows: int | None = None) -> dict[str, int]:
    kinds, live = _kinds(), min(total, live_rows or total)
    counts: dict[str, int] = {}
    for i in range(total):
        kind = _kind_of(kinds, i, live)
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def extra_users(engine: Engine, template_user_id: int, count: int) -> list[int]:
    """``count`` more users, copies of the template's SMTP account (those made by an earlier call are
    reused: a run seeds several table sizes)."""
    with engine.begin() as conn:
        have = [
            r.id
            for r in conn.execute(
                sa.text("SELECT id FROM users WHERE email LIKE :pattern ORDER BY id"),
                {"pattern": "tenant%@example.net"},
            )
        ]
        if len(have) >= count:
            return have[:count]
        rows = conn.execute(
            sa.text(
                """
                INSERT INTO users (email, password_hash, smtp_host, smtp_port, smtp_username,
                                   smtp_password_enc, smtp_security)
                SELECT 'tenant' || g || '@example.net', password_hash, smtp_host, smtp_port, smtp_username,
                       smtp_password_enc, smtp_security
                  FROM users, generate_series(CAST(:first AS integer), CAST(:count AS integer)) AS g
                 WHERE id = :template
                RETURNING id
                """
            ),
            {"first": len(have) + 1, "count": count, "template": template_user_id},
        ).all()
    return have + [r.id for r in rows]


def _scale_row(i: int, kind: str, user_id: int, now: datetime, rng: random.Random) -> tuple:
    recipient, subject, body = mail(i)
    created = now - timedelta(seconds=rng.uniform(60, HISTORY_DAYS * 86400))
    status, tries, lease, error, sent = kind, 0, None, None, None
    scheduled = next_at = created
    if kind == "sent":
        tries, sent = 1, created + timedelta(seconds=rng.uniform(0.05, 5))
    elif kind == "cancelled":
        tries, error = 3, "550 5.1.1 mailbox unavailable"
    elif kind in ("failed", "failed-due"):
        status, tries, error = "failed", 1, "451 4.3.0 try again later"
        next_at = now + timedelta(seconds=rng.uniform(60, 3600))
        if kind == "failed-due":
            next_at = now - timedelta(seconds=rng.uniform(1, 600))
    elif kind in ("scheduled", "scheduled-due"):
        status = "scheduled"
        scheduled = next_at = now + timedelta(seconds=rng.uniform(600, 30 * 86400))
        if kind == "scheduled-due":
            scheduled = next_at = now - timedelta(seconds=rng.uniform(1, 600))
    elif kind == "queued":
        created = scheduled = next_at = now - timedelta(seconds=rng.uniform(0, 60))
    elif kind == "processing":
        created = scheduled = now - timedelta(seconds=rng.uniform(0, 60))
        next_at, tries, lease = created, 1, now + timedelta(seconds=rng.uniform(60, 120))
    updated = sent or created
    return (
        user_id,
        recipient,
        subject,
        body,
        status,
        tries,
        _iso(scheduled),
        _iso(next_at),
        lease and _iso(lease),
        error,
        new_message_id(),
        _iso(created),
        _iso(updated),
        sent and _iso(sent),
    )


def scale_table(
    engine: Engine,
    user_ids: Sequence[int],
    total: int,
    progress: Callable[[int], None] = lambda n: None,
    seed: int = 42,
    live_rows: int | None = None,
) -> dict[str, int]:
    """``total`` tasks spread round-robin over ``user_ids``; returns the counts by kind.

    The first ``live_rows`` rows (all of them by default) follow SCALE_MIX; the rest are history
    (sent, cancelled), so tables of several sizes seeded with the same ``live_rows`` hold the same
    live work (due retries and schedules, queued, processing) and differ only in history.
    History rows go in first, beyond PYTHON_HISTORY_ROWS as copies made inside PostgreSQL; every
    row whose timestamps are relative to now goes in last, so none has become due, leaked or lost its
    lease by the sweep.
    """
    kinds = _kinds()
    rng = random.Random(seed)
    users = len(user_ids)
    live = min(total, live_rows or total)

    def rows(history: bool):
        now = datetime.now(UTC)
        for i in range(min(total, PYTHON_HISTORY_ROWS) if history else live):
            kind = _kind_of(kinds, i, live)
            if (kind in HISTORY_KINDS) == history:
                yield _scale_row(i, kind, user_ids[i % users], now, rng)

    made = copy_tasks(engine, SCALE_COLUMNS, rows(history=True), progress)
    counts = scale_counts(total, live)
    wanted = sum(n for kind, n in counts.items() if kind in HISTORY_KINDS)
    replicate_history(engine, wanted - made, progress)
    copy_tasks(engine, SCALE_COLUMNS, rows(history=False), progress)
    return counts


_FRESH_ID = "'<mailq.' || md5(random()::text || id::text) || '@example.com>'"
_REPLICATE_SQL = sa.text(
    f"""
    INSERT INTO tasks ({", ".join(SCALE_COLUMNS)})
    SELECT {", ".join(_FRESH_ID if c == "message_id" else c for c in SCALE_COLUMNS)}
      FROM tasks
     WHERE status IN ('sent', 'cancelled')
     ORDER BY id
     LIMIT :k
    """  # noqa: S608 - only this module's column names
)


def replicate_history(engine: Engine, count: int, progress: Callable[[int], None] = lambda n: None) -> None:
    """``count`` more history rows, copied inside PostgreSQL from those already in (new Message-IDs)."""
    while count > 0:
        k = min(count, REPLICATE_CHUNK)
        with engine.begin() as conn:
            k = conn.execute(_REPLICATE_SQL, {"k": k}).rowcount
        if k <= 0:
            raise RuntimeError("no history rows to copy from")
        count -= k
        progress(k)
