"""Tags: kept with the task, shown in every view, and ``?tag=key:value`` served by an index."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa

from shared.db import engine_for
from shared.tasks import pages, search
from tests.conftest import auth_header, login, register_user
from tests.test_accounts_api import assert_problem
from tests.test_stats import SEED_TASKS, SEED_USERS, _plan_nodes

MAIL = {"recipient_email": "bob@example.org", "subject": "Hi", "body": "Hello Bob"}


@pytest.fixture()
def alice(api):
    register_user(api)
    return auth_header(login(api))


def test_the_tag_filter_pages_one_tags_tasks_in_both_lists(api, alice, pg_url):
    def enqueue(tags):
        return api.post("/api/v1/task/enqueue", json={**MAIL, "tags": tags}, headers=alice).get_json()[
            "task_id"
        ]

    spring = [enqueue({"campaign": "spring", "n": str(i)}) for i in range(5)]
    enqueue({"campaign": "summer"})
    enqueue({"campaign": "spring:late"})  # a value may hold a colon
    register_user(api, email="eve@example.com")
    eve = auth_header(login(api, email="eve@example.com"))
    api.post("/api/v1/task/enqueue", json={**MAIL, "tags": {"campaign": "spring"}}, headers=eve)
    with engine_for(pg_url).begin() as conn:
        conn.execute(sa.text("UPDATE tasks SET status = 'failed' WHERE id = :id"), {"id": spring[1]})

    def ids(url):
        seen, cursor = [], None
        while True:
            page = api.get(url + (f"&cursor={cursor}" if cursor else ""), headers=alice).get_json()
            assert all(t["tags"]["campaign"] == "spring" for t in page["items"])
            seen += [t["id"] for t in page["items"]]
            if (cursor := page["next_cursor"]) is None:
                return seen

    assert ids("/api/v1/task/queue?limit=2&tag=campaign:spring") == spring
    assert ids("/api/v1/task/queue?status=failed&tag=campaign:spring") == spring[1:2]
    assert ids("/api/v1/task/queue/fail?limit=1&tag=campaign:spring") == spring[1:2]
    assert ids("/api/v1/task/queue?tag=n:3&recipient=bob@example.org") == spring[3:4]
    late = api.get("/api/v1/task/queue?tag=campaign:spring:late", headers=alice).get_json()["items"]
    assert [t["tags"] for t in late] == [{"campaign": "spring:late"}]


@pytest.mark.parametrize("tag", ["campaign", "bad key:v", ":v", "k:" + "x" * 257, "k:line%0Abreak"])
def test_a_malformed_tag_filter_is_a_422(api, alice, tag):
    problem = assert_problem(api.get(f"/api/v1/task/queue?tag={tag}", headers=alice), 422)
    assert "tag" in problem["errors"]


# One busy user besides SEED_TASKS' twenty: 60,000 tasks of its own, mostly sent.
SEED_BUSY = """
INSERT INTO tasks (user_id, recipient_email, subject, body, status, try_count, scheduled_at,
                   next_attempt_at, message_id, updated_at)
SELECT :user_id, 'r' || mod(g, 500) || '@example.org', 's', 'b',
       CASE WHEN mod(g, 50) = 0 THEN 'failed' WHEN mod(g, 50) = 1 THEN 'cancelled'
            WHEN mod(g, 50) = 2 THEN 'queued' WHEN mod(g, 50) = 3 THEN 'scheduled' ELSE 'sent' END,
       1, now(), now(), 'busy' || g, now() - interval '1 day'
  FROM generate_series(1, 60000) AS g
"""
# Every task tagged with one of 50 campaigns (a narrow tag) and one of 3 kinds (a broad one).
SEED_TAGS = """
INSERT INTO task_tags (task_id, tag, user_id)
SELECT id, 'campaign:c' || mod(id, 50), user_id FROM tasks
UNION ALL
SELECT id, 'kind:' || mod(id, 3), user_id FROM tasks
"""


def test_the_tag_filter_is_served_by_its_index_at_a_realistic_size(pg_url, clean):
    engine = sa.create_engine(pg_url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            tx = conn.begin()  # rolled back: the rows and ANALYZE's statistics vanish with it
            user_id = conn.execute(sa.text(SEED_USERS)).scalars().all()[7]
            conn.execute(sa.text(SEED_TASKS))
            conn.execute(sa.text(SEED_BUSY), {"user_id": user_id})
            conn.execute(sa.text(SEED_TAGS))
            conn.execute(sa.text("ANALYZE tasks"))
            conn.execute(sa.text("ANALYZE task_tags"))
            statements = {
                "tag": pages.statement(user_id, search.Search(tag="campaign:c7"), 50),
                "tag+status": pages.statement(user_id, search.Search(("sent",), tag="kind:1"), 50),
                "tag, later page": pages.statement(
                    user_id, search.Search(search.FAIL_STATUSES, tag="kind:2"), 50, (40000,)
                ),
            }
            plans = {}
            for name, statement in statements.items():
                sql = str(statement.compile(dialect=engine.dialect, compile_kwargs={"literal_binds": True}))
                for seqscan in ("on", "off"):
                    conn.execute(sa.text(f"SET LOCAL enable_seqscan = {seqscan}"))
                    plans[name, seqscan] = conn.execute(sa.text("EXPLAIN (FORMAT JSON) " + sql)).scalar_one()
            tx.rollback()
    finally:
        engine.dispose()
    for (name, seqscan), plan in plans.items():
        nodes = list(_plan_nodes(plan))
        seq = [n for n in nodes if n["Node Type"] == "Seq Scan"]
        assert not seq, f"{name}: sequential scan (enable_seqscan={seqscan}): {json.dumps(plan)}"
        used = {n.get("Index Name") for n in nodes}
        assert "task_tags_user_tag_task" in used, f"{name} (enable_seqscan={seqscan}) used {used}"
        if name != "tag":  # a broad tag is read in task id order, page after page, never sorted whole
            sorts = [n for n in nodes if n["Node Type"] == "Sort"]
            assert not sorts, f"{name} (enable_seqscan={seqscan}) sorts: {json.dumps(plan)}"
