"""Where a mail is kept: the task row, its content row and its tag rows, written by one statement for
one mail or a whole batch, and read back in the shapes the sender and the views need.

``tasks`` holds what every list and status change touches (and ``tags``); ``task_contents`` holds the
rest, only for mails that have it, so a status UPDATE never copies an HTML part or an attachment and
a plain mail costs what it always did. ``task_tags`` is the index behind ``?tag=``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from shared.prepared import alone, run_alone
from shared.tasks.content import Attachment, Mail

# One statement, one round trip, one INSERT per table however many mails: the ids are drawn from the
# sequence first so the content and tag rows can name them. The content and tag rows are written
# only for task rows really inserted (a replayed Idempotency-Key inserts nothing), and only when the
# user still exists. The Message-ID is fixed for the task's life, so a duplicate after a lost SMTP
# reply is recognisable; whether a mail is due is decided on PostgreSQL's clock, the one the sweep
# and senders use. Rows are written only while the token's generation (:generation) is the user's
# current one: a password change or a logout-all raises it (None, for a caller without a token: no check).
INSERT_SQL = sa.text(
    """
    WITH input AS (
        SELECT nextval(pg_get_serial_sequence('tasks', 'id')) AS id, x.*
          FROM unnest(CAST(:recipient_email AS text[]), CAST(:subject AS text[]), CAST(:body AS text[]),
                      CAST(:at AS timestamptz[]), CAST(:token AS text[]), CAST(:idempotency_key AS text[]),
                      CAST(:request_hash AS text[]), CAST(:tags AS jsonb[]), CAST(:has_content AS boolean[]),
                      CAST(:html AS text[]), CAST(:from_name AS text[]), CAST(:recipient_name AS text[]),
                      CAST(:cc AS jsonb[]), CAST(:bcc AS jsonb[]), CAST(:reply_to AS text[]),
                      CAST(:headers AS jsonb[]), CAST(:attachments AS jsonb[]),
                      CAST(:attachment_data AS bytea[]), CAST(:expires_at AS timestamptz[]),
                      CAST(:lifetime AS integer[]))
               WITH ORDINALITY
            AS x(recipient_email, subject, body, at, token, idempotency_key, request_hash, tags,
                 has_content, html, from_name, recipient_name, cc, bcc, reply_to, headers, attachments,
                 attachment_data, expires_at, lifetime, ord)
    ), inserted AS (
        INSERT INTO tasks (id, user_id, recipient_email, subject, body, status, scheduled_at,
                           next_attempt_at, message_id, idempotency_key, request_hash, tags, expires_at)
        SELECT i.id, u.id, i.recipient_email, i.subject, i.body,
               CASE WHEN i.at > now() THEN 'scheduled' ELSE 'queued' END,
               GREATEST(COALESCE(i.at, now()), now()),
               GREATEST(COALESCE(i.at, now()), now()),
               '<mailq.' || i.token || '@' || CASE WHEN split_part(u.email, '@', 2) ~ '^[A-Za-z0-9.-]+$'
                                                  THEN lower(split_part(u.email, '@', 2))
                                                  ELSE 'mailq.invalid' END || '>',
               i.idempotency_key, i.request_hash, i.tags,
               COALESCE(i.expires_at, GREATEST(i.at, now()) + make_interval(secs => i.lifetime))
          FROM input AS i JOIN users AS u
            ON u.id = :user_id
           AND (CAST(:generation AS integer) IS NULL OR u.token_generation = CAST(:generation AS integer))
         ORDER BY i.ord
            ON CONFLICT (user_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
        RETURNING id, status, scheduled_at
    ), contents AS (
        INSERT INTO task_contents (task_id, html, from_name, recipient_name, cc, bcc, reply_to, headers,
                                   attachments, attachment_data)
        SELECT i.id, i.html, i.from_name, i.recipient_name, i.cc, i.bcc, i.reply_to, i.headers,
               i.attachments, i.attachment_data
          FROM input AS i JOIN inserted USING (id)
         WHERE i.has_content
    ), tagged AS (
        INSERT INTO task_tags (task_id, tag, user_id)
        SELECT i.id, t.key || ':' || t.value, :user_id
          FROM input AS i JOIN inserted USING (id), jsonb_each_text(i.tags) AS t
    )
    SELECT i.ord, s.id, s.status, s.scheduled_at
      FROM inserted AS s JOIN input AS i USING (id)
     ORDER BY i.ord
    """
)


# A single plain mail (the seed's fields only, no tags): the same row, without the arrays and the
# content and tag inserts that would cost it about twice the time.
PLAIN_INSERT_SQL = sa.text(
    """
    INSERT INTO tasks (user_id, recipient_email, subject, body, status, scheduled_at, next_attempt_at,
                       message_id, idempotency_key, request_hash, expires_at)
    SELECT u.id, :recipient_email, :subject, :body,
           CASE WHEN CAST(:at AS timestamptz) > now() THEN 'scheduled' ELSE 'queued' END,
           GREATEST(COALESCE(CAST(:at AS timestamptz), now()), now()),
           GREATEST(COALESCE(CAST(:at AS timestamptz), now()), now()),
           '<mailq.' || :token || '@' || CASE WHEN split_part(u.email, '@', 2) ~ '^[A-Za-z0-9.-]+$'
                                              THEN lower(split_part(u.email, '@', 2))
                                              ELSE 'mailq.invalid' END || '>',
           :idempotency_key, :request_hash,
           COALESCE(CAST(:expires_at AS timestamptz),
                    GREATEST(CAST(:at AS timestamptz), now()) + make_interval(secs => :lifetime))
      FROM users AS u
     WHERE u.id = :user_id
       AND (CAST(:generation AS integer) IS NULL OR u.token_generation = CAST(:generation AS integer))
        ON CONFLICT (user_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING 1 AS ord, id, status, scheduled_at
    """
)


# The same statement run by itself, prepared once per connection (shared.prepared): a plain single
# enqueue is then one Bind/Execute exchange instead of BEGIN, Parse, Describe, Execute and COMMIT.
# A copy (execution_options makes one): PLAIN_INSERT_SQL inside a transaction must join it.
PLAIN_INSERT_ALONE = alone(PLAIN_INSERT_SQL)


def _is_plain(mails: Sequence[Mail]) -> bool:
    """One mail without a content row or tags: the task row is all there is to write."""
    return len(mails) == 1 and not mails[0].has_content and not mails[0].tags


def _plain_params(
    user_id: int, mail: Mail, idempotency_key: str | None, request_hash: str | None, generation: int | None
) -> dict:
    return {
        "user_id": user_id,
        "generation": generation,
        "expires_at": mail.expires_at,
        "lifetime": mail.lifetime,
        "recipient_email": mail.recipient_email,
        "subject": mail.subject,
        "body": mail.body,
        "at": mail.scheduled_at,
        "token": uuid.uuid4().hex,
        "idempotency_key": idempotency_key,
        "request_hash": request_hash,
    }


def insert_one(
    engine: Engine, user_id: int, mail: Mail, *, idempotency_key: str | None = None,
    request_hash: str | None = None, generation: int | None = None,
) -> list[Any]:  # fmt: skip
    """``insert`` of one mail as a transaction of its own (one statement for a plain mail)."""
    if _is_plain([mail]):
        return run_alone(
            engine,
            PLAIN_INSERT_ALONE,
            _plain_params(user_id, mail, idempotency_key, request_hash, generation),
        )
    with engine.begin() as conn:
        return insert(
            conn, user_id, [mail], idempotency_key=idempotency_key, request_hash=request_hash,
            generation=generation,
        )  # fmt: skip


def insert(
    conn: Connection,
    user_id: int,
    mails: Sequence[Mail],
    *,
    idempotency_key: str | None = None,
    request_hash: str | None = None,
    generation: int | None = None,
) -> list[Any]:
    """Insert ``mails`` (all or, on a conflicting Idempotency-Key, none); return the inserted rows
    (ord from 1, id, status, scheduled_at) in input order. Nothing is inserted when the user is gone or
    ``generation`` (the token's) is not the user's current one."""
    if _is_plain(mails):
        return conn.execute(
            PLAIN_INSERT_SQL, _plain_params(user_id, mails[0], idempotency_key, request_hash, generation)
        ).all()
    params: dict[str, Any] = {"user_id": user_id, "generation": generation}
    columns = {name: [] for name in _COLUMNS}
    for mail in mails:
        for name, value in _row(mail).items():
            columns[name].append(value)
    params.update(columns)
    params["idempotency_key"] = [idempotency_key] * len(mails)
    params["request_hash"] = [request_hash] * len(mails)
    return conn.execute(INSERT_SQL, params).all()


_COLUMNS = (
    "recipient_email",
    "subject",
    "body",
    "at",
    "token",
    "tags",
    "has_content",
    "html",
    "from_name",
    "recipient_name",
    "cc",
    "bcc",
    "reply_to",
    "headers",
    "attachments",
    "attachment_data",
    "expires_at",
    "lifetime",
)


def _row(mail: Mail) -> dict[str, Any]:
    rich = mail.has_content
    return {
        "recipient_email": mail.recipient_email,
        "subject": mail.subject,
        "body": mail.body,
        "at": mail.scheduled_at,
        "token": uuid.uuid4().hex,
        "tags": json.dumps(mail.tags, ensure_ascii=False),
        "has_content": rich,
        "html": mail.html,
        "from_name": mail.from_name,
        "recipient_name": mail.recipient_name,
        "cc": json.dumps(list(mail.cc), ensure_ascii=False),
        "bcc": json.dumps(list(mail.bcc), ensure_ascii=False),
        "reply_to": mail.reply_to,
        "headers": json.dumps([list(h) for h in mail.headers], ensure_ascii=False),
        "attachments": json.dumps(
            [
                {"filename": a.filename, "content_type": a.content_type, "size": len(a.data)}
                for a in mail.attachments
            ],
            ensure_ascii=False,
        ),
        # One bytea per mail: the attachments' bytes back to back (their sizes say where each ends).
        "attachment_data": b"".join(a.data for a in mail.attachments) if mail.attachments else None,
        "expires_at": mail.expires_at,
        "lifetime": mail.lifetime,
    }


def attachments_of(meta: list[dict[str, Any]] | None, data: bytes | None) -> tuple[Attachment, ...]:
    """The attachments stored as ``attachments`` (filename, content_type, size) and their bytes."""
    out, start = [], 0
    view = memoryview(data or b"")  # slices of it copy nothing
    for item in meta or ():
        end = start + item["size"]
        out.append(Attachment(item["filename"], item["content_type"], view[start:end]))
        start = end
    return tuple(out)


def content_view(row: Any) -> dict[str, Any]:
    """The content members of a task's view (``GET /task/{id}``): never the attachments' bytes."""
    return {
        "html": row.html,
        "from_name": row.from_name,
        "recipient_name": row.recipient_name,
        "cc": row.cc or [],
        "bcc": row.bcc or [],
        "reply_to": row.reply_to,
        "headers": dict(row.headers or []),
        "attachments": row.attachments or [],
    }
