"""GET /api/v1/task/stats and the recipient filter: what they answer, and that PostgreSQL serves them
from their indexes at a realistic size (EXPLAIN, with sequential scans allowed and forbidden)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

import pytest
import sqlalchemy as sa

from shared.db import engine_for
from shared.tasks import pages, search, stats
from tests.conftest import auth_header, login, register_user
from tests.pipeline import Pipeline
from tests.smtp_servers import ScriptedSmtpServer
from tests.test_accounts_api import assert_problem

MAIL = {"recipient_email": "bob@example.org", "subject": "Hi", "body": "Hello Bob"}


@pytest.fixture()
def alice(api):
    user = register_user(api)
    return user, auth_header(login(api))


def enqueue(api, headers, n: int, **fields) -> list[int]:
    return [
        api.post("/api/v1/task/enqueue", json={**MAIL, **fields}, headers=headers).get_json()["task_id"]
        for _ in range(n)
    ]


def set_status(pg_url, ids, status: str, updated: str = "now()") -> None:
    with engine_for(pg_url).begin() as conn:
        conn.execute(
            sa.text(f"UPDATE tasks SET status = :status, updated_at = {updated} WHERE id = ANY(:ids)"),
            {"status": status, "ids": list(ids)},
        )


def log_attempt(pg_url, task_id: int, outcome: str, finished: str, spent: bool = True) -> None:
    """A line of the attempt log as the sender writes it (shared.delivery.record), at a chosen time."""
    with engine_for(pg_url).begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO task_attempts (task_id, user_id, try_count, spent, started_at, finished_at,"
                f" outcome) SELECT id, user_id, 1, :spent, {finished}, {finished}, :outcome FROM tasks"
                " WHERE id = :id"
            ),
            {"id": task_id, "outcome": outcome, "spent": spent},
        )


def test_stats_count_each_status_and_place_each_attempt_in_its_minute(api, alice, pg_url):
    _, headers = alice
    ids = enqueue(api, headers, 9)
    enqueue(api, headers, 1, scheduled_at="2999-01-01T00:00:00Z")
    with engine_for(pg_url).connect() as conn:
        anchor = conn.execute(sa.text("SELECT date_trunc('minute', now()) - interval '10 minutes'")).scalar()
    at = f"TIMESTAMPTZ '{anchor.isoformat()}' + interval '30 seconds'"
    later = f"TIMESTAMPTZ '{anchor.isoformat()}' + interval '5 minutes'"
    set_status(pg_url, ids[:3], "sent", at)
    set_status(pg_url, ids[3:4], "failed", at)
    set_status(pg_url, ids[4:5], "cancelled", at)
    set_status(pg_url, ids[5:6], "sent", "now() - interval '2 hours'")  # counted, but not in the hour
    set_status(pg_url, ids[6:7], "processing")
    for task_id in ids[:3]:
        log_attempt(pg_url, task_id, "sent", at)
    log_attempt(pg_url, ids[0], "deferred", f"{at} - interval '1 minute'")  # deferred, then sent
    log_attempt(pg_url, ids[3], "deferred", at)
    log_attempt(pg_url, ids[3], "deferred", later)
    log_attempt(pg_url, ids[4], "cancelled", at)
    log_attempt(pg_url, ids[5], "sent", "now() - interval '2 hours'")  # not in the hour
    log_attempt(pg_url, ids[7], "waiting", at, spent=False)  # the account's waits are not tries
    log_attempt(pg_url, ids[8], "paused", later, spent=False)
    bob = register_user(api, email="bob@example.com")
    other = auth_header(login(api, email=bob["email"]))
    for task_id in enqueue(api, other, 2):  # someone else's
        set_status(pg_url, [task_id], "sent")
        log_attempt(pg_url, task_id, "sent", at)

    figures = api.get("/api/v1/task/stats", headers=headers).get_json()

    assert figures["counts"] == {
        "scheduled": 1,
        "queued": 2,
        "processing": 1,
        "sent": 4,
        "failed": 1,
        "cancelled": 1,
    }
    assert figures["capped"] == []
    minutes = figures["minutes"]
    assert len(minutes) == 60 and minutes[0]["start"] == figures["since"]
    starts = [datetime.fromisoformat(m["start"]) for m in minutes]
    assert all(b - a == timedelta(minutes=1) for a, b in zip(starts, starts[1:], strict=False))
    assert all(m["failed"] == m["deferred"] for m in minutes)  # the series' name before, kept
    busy = {
        m["start"]: (m["sent"], m["deferred"], m["cancelled"])
        for m in minutes
        if m["sent"] + m["deferred"] + m["cancelled"]
    }
    minute = timedelta(minutes=1)
    assert busy == {
        (anchor - minute).isoformat(): (0, 1, 0),
        anchor.isoformat(): (3, 1, 1),
        (anchor + 5 * minute).isoformat(): (0, 1, 0),
    }


def test_a_deferral_that_later_succeeded_stays_in_the_hours_figures(api, ctx):
    """Issue 22: the chart counts attempts. A mail deferred once (451) and then sent is one deferral
    and one sent in the hour, not only the sent its task shows now."""
    ctx.settings = ctx.settings.replace(retry_backoff_base=0, retry_backoff_max=0)
    pipe = Pipeline(ctx)
    try:
        with ScriptedSmtpServer(["451 4.3.0 try later", "250 OK"]) as server:
            no_login = {"smtp-username": "", "smtp-password": ""}
            register_user(api, smtp_host=server.host, smtp_port=server.port, **no_login)
            headers = auth_header(login(api))
            api.post("/api/v1/task/enqueue", json=MAIL, headers=headers)
            assert set(pipe.run_until_settled().values()) == {"sent"}
    finally:
        pipe.close()

    minutes = api.get("/api/v1/task/stats", headers=headers).get_json()["minutes"]

    keys = ("sent", "deferred", "failed", "cancelled")
    totals = {key: sum(m.get(key, 0) for m in minutes) for key in keys}
    assert totals == {"sent": 1, "deferred": 1, "failed": 1, "cancelled": 0}


def test_a_count_stops_at_the_cap_and_the_answer_says_which(api, alice, pg_url, monkeypatch):
    monkeypatch.setattr(stats, "COUNT_CAP", 3)
    _, headers = alice
    set_status(pg_url, enqueue(api, headers, 5), "sent")
    enqueue(api, headers, 3)

    figures = api.get("/api/v1/task/stats", headers=headers).get_json()

    assert figures["counts"]["sent"] == 3 and figures["counts"]["queued"] == 3
    assert figures["capped"] == ["sent"]


def test_stats_need_a_token(api):
    assert_problem(api.get("/api/v1/task/stats"), 401)


def test_the_recipient_filter_finds_one_addresses_tasks_as_enqueue_stored_them(api, alice, pg_url):
    _, headers = alice
    to_bob = enqueue(api, headers, 2)
    enqueue(api, headers, 2, recipient_email="carol@example.org")
    set_status(pg_url, to_bob[:1], "cancelled")

    def ids(url):
        return [t["id"] for t in api.get(url, headers=headers).get_json()["items"]]

    assert ids("/api/v1/task/queue?recipient=bob@EXAMPLE.ORG") == to_bob[1:]
    assert ids("/api/v1/task/queue?status=cancelled&recipient=bob@example.org") == to_bob[:1]
    assert ids("/api/v1/task/queue/fail?recipient=bob@example.org") == to_bob[:1]
    assert ids("/api/v1/task/queue?recipient=") == ids("/api/v1/task/queue")
    problem = assert_problem(api.get("/api/v1/task/queue?recipient=bob", headers=headers), 422)
    assert "recipient" in problem["errors"]


# --- the plans ----------------------------------------------------------------------------------------

SEED_USERS = """
INSERT INTO users (email, password_hash, smtp_host, smtp_port, smtp_username, smtp_password_enc,
                   smtp_security)
SELECT 'explain' || g || '@example.com', 'x', 'smtp.example.com', 587, 'u', 'x', 'starttls'
  FROM generate_series(1, 20) AS g
RETURNING id
"""
# 20 users, 60,000 tasks: mostly sent long ago, a few hundred outcomes in the last hour, a spread of
# recipients, some of everything else -- the shape of a live system.
SEED_TASKS = """
INSERT INTO tasks (user_id, recipient_email, subject, body, status, try_count, scheduled_at,
                   next_attempt_at, message_id, updated_at)
SELECT (SELECT min(id) FROM users) + mod(g, 20), 'r' || mod(g, 500) || '@example.org', 's', 'b',
       CASE WHEN mod(g, 50) = 0 THEN 'failed' WHEN mod(g, 50) = 1 THEN 'cancelled'
            WHEN mod(g, 50) = 2 THEN 'queued' WHEN mod(g, 50) = 3 THEN 'scheduled' ELSE 'sent' END,
       1, now(), now(), 'm' || g,
       CASE WHEN mod(g, 100) < 1 THEN now() - mod(g, 3600) * interval '1 second'
            ELSE now() - interval '1 day' - mod(g, 86400) * interval '1 second' END
  FROM generate_series(1, 60000) AS g
"""


def _plan_nodes(plan):
    if isinstance(plan, dict):
        if "Node Type" in plan:
            yield plan
        for value in plan.values():
            yield from _plan_nodes(value)
    elif isinstance(plan, list):
        for value in plan:
            yield from _plan_nodes(value)


def test_the_counts_and_the_recipient_filter_are_served_by_indexes(pg_url, clean):
    engine = sa.create_engine(pg_url, poolclass=sa.pool.NullPool)
    dialect = engine.dialect
    try:
        with engine.connect() as conn:
            tx = conn.begin()  # rolled back: the rows and ANALYZE's statistics vanish with it
            user_id = conn.execute(sa.text(SEED_USERS)).scalars().all()[7]
            conn.execute(sa.text(SEED_TASKS))
            conn.execute(sa.text("ANALYZE tasks"))
            statements = {
                "counts": (stats._COUNTS_SQL, {"user_id": user_id, "cap_plus_one": stats.COUNT_CAP + 1}),
                "recipient": (pages.statement(user_id, search.Search(recipient="r7@example.org"), 50), None),
                "recipient+status": (
                    pages.statement(user_id, search.Search(("sent",), recipient="r7@example.org"), 50),
                    None,
                ),
            }
            wanted = {
                "counts": "tasks_user_status_id",
                "recipient": "tasks_user_recipient_id",
                "recipient+status": "tasks_user_recipient_id",
            }
            plans = {}
            for name, (statement, params) in statements.items():
                if params is None:
                    sql = str(statement.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))
                else:
                    sql = statement.text
                for seqscan in ("on", "off"):
                    conn.execute(sa.text(f"SET LOCAL enable_seqscan = {seqscan}"))
                    plans[name, seqscan] = conn.execute(
                        sa.text("EXPLAIN (FORMAT JSON) " + sql), params or {}
                    ).scalar_one()
            tx.rollback()
    finally:
        engine.dispose()
    for (name, seqscan), plan in plans.items():
        nodes = list(_plan_nodes(plan))
        seq = [n for n in nodes if n["Node Type"] == "Seq Scan" and n.get("Relation Name") == "tasks"]
        assert not seq, f"{name}: sequential scan on tasks (enable_seqscan={seqscan}): {json.dumps(plan)}"
        used = {n.get("Index Name") for n in nodes}
        assert wanted[name] in used, f"{name} (enable_seqscan={seqscan}) used {used}: {json.dumps(plan)}"


# 1,000,000 lines of the attempt log: 20 users' 100,000 tasks of ten attempts each, spread over the
# last 30 days; one attempt in 1,000 finished in the last hour (about 50 per user), the account's waits
# among them.
ATTEMPT_ROWS = 1_000_000
SEED_ATTEMPT_TASKS = """
INSERT INTO tasks (user_id, recipient_email, subject, body, status, try_count, scheduled_at,
                   next_attempt_at, message_id)
SELECT (SELECT min(id) FROM users) + mod(g, 20), 'r@example.org', 's', 'b', 'sent', 10, now(), now(),
       'm' || g
  FROM generate_series(1, 100000) AS g
"""
SEED_ATTEMPTS = """
INSERT INTO task_attempts (task_id, user_id, try_count, spent, started_at, finished_at, outcome)
SELECT t.id, t.user_id, k, o.outcome IN ('sent', 'deferred', 'cancelled'), f.at, f.at, o.outcome
  FROM tasks AS t, generate_series(1, 10) AS k,
       LATERAL (SELECT (ARRAY['sent', 'deferred', 'cancelled', 'waiting', 'paused'])
                       [1 + mod(t.id / 20 + k, 5)] AS outcome) AS o,
       LATERAL (SELECT CASE WHEN mod(t.id / 20 * 10 + k, 1000) = 0
                            THEN now() - mod(t.id + k, 3600) * interval '1 second'
                            ELSE now() - interval '1 hour' - mod(t.id * 10 + k, 2592000) * interval '1 second'
                       END AS at) AS f
"""


def test_the_hour_reads_only_the_windows_attempts_of_its_user_from_an_index(pg_url, clean):
    """EXPLAIN ANALYZE at 1,000,000 attempts: the hour is one index range of (user_id, finished_at) and
    reads the user's lines of the window, no more; never a sequential scan of task_attempts."""
    engine = sa.create_engine(pg_url, poolclass=sa.pool.NullPool)
    params = {"user_id": None, "minutes": stats.WINDOW_MINUTES}
    window_sql = sa.text(
        "SELECT count(*) FROM task_attempts WHERE user_id = :user_id"
        " AND finished_at >= date_trunc('minute', now()) - make_interval(mins => :minutes - 1)"
    )
    try:
        with engine.connect() as conn:
            tx = conn.begin()  # rolled back: the rows and ANALYZE's statistics vanish with it
            params["user_id"] = conn.execute(sa.text(SEED_USERS)).scalars().all()[7]
            conn.execute(sa.text(SEED_ATTEMPT_TASKS))
            conn.execute(sa.text(SEED_ATTEMPTS))
            conn.execute(sa.text("ANALYZE tasks, task_attempts"))
            assert conn.execute(sa.text("SELECT count(*) FROM task_attempts")).scalar_one() == ATTEMPT_ROWS
            in_window = conn.execute(window_sql, params).scalar_one()
            plans = {}
            for seqscan in ("on", "off"):
                conn.execute(sa.text(f"SET LOCAL enable_seqscan = {seqscan}"))
                plans[seqscan] = conn.execute(
                    sa.text("EXPLAIN (ANALYZE, FORMAT JSON) " + stats._HOUR_SQL.text), params
                ).scalar_one()
            tx.rollback()
    finally:
        engine.dispose()
    assert 0 < in_window < 200
    for seqscan, plan in plans.items():
        where = f"enable_seqscan={seqscan}: {json.dumps(plan)}"
        nodes = list(_plan_nodes(plan))
        on_attempts = [n["Node Type"] for n in nodes if n.get("Relation Name") == "task_attempts"]
        assert on_attempts, where
        assert set(on_attempts) <= {"Index Scan", "Index Only Scan", "Bitmap Heap Scan"}, where
        [scan] = [n for n in nodes if n.get("Index Name") == "task_attempts_user_finished"]
        assert "user_id" in scan["Index Cond"] and "finished_at" in scan["Index Cond"], where
        # What the index gave: the window's lines of this user, no more (a filter drops the waits).
        assert scan["Actual Rows"] + scan.get("Rows Removed by Filter", 0) == in_window, where
