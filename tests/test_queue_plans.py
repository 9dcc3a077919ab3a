"""The queue page reads one page's worth of rows, whatever the planner's statistics suggest.

A user's tasks still to go out are its newest: in a table of any age they sit after all of its
history in id order. The planner assumes matching rows are spread evenly over the ids, so for a
table with few users it may read the queue page by walking the primary key in id order and
filtering, expecting the first 51 pending rows early — and then reads the user's whole history
first. These tests build that table (two users, history first, the live rows last), ANALYZE it, and
measure what each list statement reads with EXPLAIN ANALYZE.
"""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa

from shared.tasks import views

HISTORY, LIVE = 90_000, 10_000
SEED = f"""
WITH u AS (
    INSERT INTO users (email, password_hash, smtp_host, smtp_port, smtp_username, smtp_password_enc,
                       smtp_security)
    SELECT 'plans' || g || '@example.com', 'x', 'smtp.example.com', 587, 'u', 'x', 'starttls'
      FROM generate_series(1, 2) AS g
    RETURNING id
), t AS (
    INSERT INTO tasks (user_id, recipient_email, subject, body, status, try_count, scheduled_at,
                       next_attempt_at, message_id, updated_at)
    SELECT (SELECT min(id) FROM u) + mod(g, 2), 'r' || mod(g, 500) || '@example.org', 's', repeat('b', 400),
           CASE WHEN g <= {HISTORY} THEN 'sent'
                ELSE (ARRAY['queued', 'scheduled', 'failed', 'processing', 'cancelled'])[1 + mod(g, 5)] END,
           1, now(), now(), 'm' || g, now()
      FROM generate_series(1, {HISTORY + LIVE}) AS g
    RETURNING id, user_id
)
INSERT INTO task_tags (task_id, tag, user_id)
SELECT id, CASE WHEN id <= (SELECT min(id) FROM t) + {HISTORY} THEN 'campaign:old' ELSE 'campaign:new' END,
       user_id
  FROM t
"""
PAGE = 51  # what GET /task/queue asks for: 50 and one more to know whether there is a next page
# A page through its index reads 15-310 buffers here (the tag's pages probe each task by its key);
# walking the primary key through the history first read 6,691.
MAX_BUFFERS = 1000


def _statements(user_id: int) -> dict[str, sa.Select]:
    pending = views.queue_statuses(None)
    return {
        "still to go out": views.list_query(user_id, pending, PAGE, 0),
        "failed or cancelled": views.list_query(user_id, views.FAIL_STATUSES, PAGE, 0),
        "queued": views.list_query(user_id, ("queued",), PAGE, 0),
        "scheduled": views.list_query(user_id, ("scheduled",), PAGE, 0),
        "tag": views.list_query(user_id, pending, PAGE, 0, None, "campaign:new"),
        "tag, failed or cancelled": views.list_query(
            user_id, views.FAIL_STATUSES, PAGE, 0, None, "campaign:new"
        ),
        "sent, a later page": views.list_query(user_id, ("sent",), PAGE, 40_000),
    }


@pytest.fixture(scope="module")
def plans(servers):
    engine = sa.create_engine(servers["database_url"], poolclass=sa.pool.NullPool)
    found = {}
    try:
        with engine.connect() as conn:
            tx = conn.begin()  # rolled back: the rows and ANALYZE's statistics vanish with it
            conn.execute(sa.text(SEED))
            conn.execute(sa.text("ANALYZE tasks"))
            conn.execute(sa.text("ANALYZE task_tags"))
            user_id = conn.execute(sa.text("SELECT min(id) FROM users WHERE email LIKE 'plans%'")).scalar()
            for name, statement in _statements(user_id).items():
                sql = str(statement.compile(dialect=engine.dialect, compile_kwargs={"literal_binds": True}))
                plan = conn.execute(sa.text("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + sql)).scalar_one()
                rows = conn.execute(sa.text(sql)).all()
                found[name] = (plan[0]["Plan"], len(rows))
            tx.rollback()
    finally:
        engine.dispose()
    return found


@pytest.mark.parametrize("name", list(_statements(0)))
def test_a_queue_page_reads_a_pages_worth_even_when_the_users_pending_tasks_are_its_newest(plans, name):
    plan, rows = plans[name]
    assert rows == PAGE  # each statement has more than a page to show
    read = plan["Shared Hit Blocks"] + plan["Shared Read Blocks"]
    assert read <= MAX_BUFFERS, f"{name}: read {read} buffers for one page: {json.dumps(plan)}"
