"""Finding mail through the list endpoints: every status, an id, a Message-ID, a recipient, a subject
prefix, a created-at range, combined and paged; never another user's mail (real PostgreSQL).

What each page reads at 1,000,000 rows is tests/test_queue_plans.py's job; this file checks what the
pages hold."""

from __future__ import annotations

from urllib.parse import urlencode

import pytest
import sqlalchemy as sa

from shared.db import engine_for
from shared.tasks import pages
from tests.conftest import auth_header, login, register_user
from tests.test_accounts_api import assert_problem

QUEUE = "/api/v1/task/queue"


@pytest.fixture()
def two(api):
    """Ada and Grace, each with a token."""
    register_user(api, "ada@example.com")
    register_user(api, "grace@example.com")
    return auth_header(login(api, "ada@example.com")), auth_header(login(api, "grace@example.com"))


def enqueue(api, headers, **fields) -> int:
    mail = {"recipient_email": "bob@example.org", "subject": "Hello", "body": "Hi", **fields}
    response = api.post("/api/v1/task/enqueue", json=mail, headers=headers)
    assert response.status_code == 202, response.get_json()
    return response.get_json()["task_id"]


def set_rows(pg_url, sql: str, **params) -> None:
    with engine_for(pg_url).begin() as conn:
        conn.execute(sa.text(sql), params)


def ids(api, headers, path=QUEUE, **query) -> list[int]:
    response = api.get(f"{path}?{urlencode(query)}", headers=headers)
    assert response.status_code == 200, response.get_json()
    return [t["id"] for t in response.get_json()["items"]]


def every_page(api, headers, path=QUEUE, **query) -> tuple[list[int], int]:
    """Every match, following next_cursor; and how many requests that took."""
    found, cursor, requests = [], None, 0
    while True:
        response = api.get(
            f"{path}?{urlencode({**query, **({'cursor': cursor} if cursor else {})})}", headers=headers
        )
        assert response.status_code == 200, response.get_json()
        page = response.get_json()
        requests += 1
        found += [t["id"] for t in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            return found, requests
        assert requests < 100, "the cursor does not move on"


def test_all_lists_every_status_and_the_default_only_what_is_still_to_go_out(api, two, pg_url):
    ada, _ = two
    queued, sent, cancelled = (enqueue(api, ada) for _ in range(3))
    set_rows(pg_url, "UPDATE tasks SET status = 'sent' WHERE id = :id", id=sent)
    set_rows(pg_url, "UPDATE tasks SET status = 'cancelled' WHERE id = :id", id=cancelled)
    assert ids(api, ada) == [queued]
    assert ids(api, ada, status="all") == [queued, sent, cancelled]
    assert ids(api, ada, "/api/v1/task/queue/fail") == [cancelled]
    assert every_page(api, ada, status="all", limit=1) == ([queued, sent, cancelled], 3)


def test_an_id_or_a_message_id_finds_that_mail_and_never_another_users(api, two):
    ada, grace = two
    mine = enqueue(api, ada)
    theirs = enqueue(api, grace)
    message_id = api.get(f"/api/v1/task/{mine}", headers=ada).get_json()["message_id"]
    their_message_id = api.get(f"/api/v1/task/{theirs}", headers=grace).get_json()["message_id"]
    assert ids(api, ada, id=mine) == [mine]
    assert ids(api, ada, id=theirs) == []
    assert ids(api, ada, message_id=message_id) == [mine]
    assert ids(api, ada, message_id=message_id.strip("<>")) == [mine]  # pasted without its brackets
    assert ids(api, ada, message_id=their_message_id) == []
    assert ids(api, ada, id=mine, status="sent") == []  # and the other conditions still hold


def test_the_subject_prefix_is_case_insensitive_and_its_wildcards_are_plain_characters(api, two):
    ada, grace = two
    invoice = enqueue(api, ada, subject="Invoice 2026-001")
    percent = enqueue(api, ada, subject="50% off today")
    fifty = enqueue(api, ada, subject="50 percent off")
    under = enqueue(api, ada, subject="a_b test")
    axb = enqueue(api, ada, subject="axb test")
    slash = enqueue(api, ada, subject="C:\\path\\file")
    enqueue(api, grace, subject="Invoice 2026-002")  # Grace's: never in Ada's results
    assert ids(api, ada, subject="invoice") == [invoice]
    assert ids(api, ada, subject="INVOICE 2026") == [invoice]
    assert ids(api, ada, subject="50%") == [percent]
    assert ids(api, ada, subject="50") == [fifty, percent]  # subject order: "50 p" < "50% "
    assert ids(api, ada, subject="a_b") == [under]
    assert ids(api, ada, subject="a") == [under, axb]
    assert ids(api, ada, subject="c:\\path") == [slash]
    assert ids(api, ada, subject="c:\\p%") == []


def test_a_subject_prefix_longer_than_the_indexed_part_compares_the_whole_prefix(api, two):
    ada, _ = two
    stem = "x" * 70
    one = enqueue(api, ada, subject=stem + " one")
    two_ = enqueue(api, ada, subject=stem + " two")
    assert ids(api, ada, subject=stem) == [one, two_]
    assert ids(api, ada, subject=stem + " tw") == [two_]


def test_the_recipient_is_an_exact_address_of_this_users_mail(api, two):
    ada, grace = two
    bob = enqueue(api, ada, recipient_email="bob@example.org")
    enqueue(api, ada, recipient_email="bobby@example.org")
    enqueue(api, grace, recipient_email="bob@example.org")
    assert ids(api, ada, recipient="bob@EXAMPLE.org", status="all") == [bob]


def test_a_created_at_range_includes_its_start_excludes_its_end_and_combines_with_status(api, two, pg_url):
    ada, grace = two
    first, second, third, fourth = (enqueue(api, ada) for _ in range(4))
    hers = enqueue(api, grace)
    for task_id, day in ((first, 1), (second, 2), (third, 3), (fourth, 4), (hers, 2)):
        set_rows(
            pg_url,
            "UPDATE tasks SET created_at = timestamptz '2026-03-01 00:00:00+00' + :d * interval '1 day'"
            " WHERE id = :id",
            d=day,
            id=task_id,
        )
    set_rows(pg_url, "UPDATE tasks SET status = 'sent' WHERE id = :id", id=third)
    window = {"created_from": "2026-03-03", "created_to": "2026-03-05T00:00:00Z"}
    assert ids(api, ada, status="all", **window) == [second, third]
    assert ids(api, ada, **window) == [second]  # still to go out
    assert ids(api, ada, status="sent", **window) == [third]
    assert ids(api, ada, status="all", created_from="2026-03-04T00:00:00+01:00") == [third, fourth]
    assert every_page(api, ada, status="all", limit=1, created_to="2026-03-06") == (
        [first, second, third, fourth],
        4,
    )


def test_filters_combine_and_each_page_goes_on_where_the_last_stopped(api, two, pg_url):
    ada, _ = two
    wanted = []
    for n in range(6):
        task_id = enqueue(
            api, ada, subject=f"Report {n}", recipient_email="bob@example.org", tags={"kind": "r"}
        )
        if n % 2 == 0:
            wanted.append(task_id)
        else:
            set_rows(pg_url, "UPDATE tasks SET status = 'sent' WHERE id = :id", id=task_id)
    query = {"subject": "report", "recipient": "bob@example.org", "tag": "kind:r"}
    assert every_page(api, ada, limit=1, **query)[0] == wanted
    assert every_page(api, ada, limit=2, recipient="bob@example.org", tag="kind:r")[0] == wanted


def test_a_search_the_index_cannot_decide_reads_a_bounded_stretch_per_page_and_finds_everything(
    api, two, pg_url
):
    """1,500 sent mails to one recipient come before its 3 still to go out: a page looks at SCAN_ROWS
    rows at most, answers what it found with a cursor, and the next page goes on from there."""
    ada, grace = two
    enqueue(api, grace)
    user_id = 1  # Ada registered first
    set_rows(
        pg_url,
        """INSERT INTO tasks (user_id, recipient_email, subject, body, status, scheduled_at, next_attempt_at,
                              message_id)
           SELECT :u, 'bob@example.org', 'Old ' || g, 'b', 'sent', now(), now(), '<old' || g || '@x>'
             FROM generate_series(1, 1500) AS g""",
        u=user_id,
    )
    live = [enqueue(api, ada) for _ in range(3)]
    first = api.get(
        f"{QUEUE}?{urlencode({'recipient': 'bob@example.org', 'limit': 2})}", headers=ada
    ).get_json()
    assert first["items"] == [] and first["next_cursor"]  # looked at SCAN_ROWS sent mails: none matched
    found, requests = every_page(api, ada, recipient="bob@example.org", limit=2)
    assert found == live
    assert requests == 3  # 1,000 rows looked at, then 500 more and two matches, then the last match
    assert 1500 > pages.SCAN_ROWS


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ({"status": "everything"}, "status"),
        ({"id": "0"}, "id"),
        ({"id": "abc"}, "id"),
        ({"id": "99999999999999999999"}, "id"),
        ({"message_id": "m" * 1000}, "message_id"),
        ({"subject": "a\r\nBcc: x"}, "subject"),
        ({"recipient": "nobody"}, "recipient"),
        ({"tag": "nocolon"}, "tag"),
        ({"created_from": "yesterday"}, "created_from"),
        ({"created_from": "2026-03-05", "created_to": "2026-03-05"}, "created_to"),
        ({"status": "all", "created_from": "2026-01-01", "cursor": "djE6MQ"}, "cursor"),  # an id cursor
        ({"subject": "x", "cursor": "djE6MQ"}, "cursor"),
    ],
)
def test_a_bad_search_parameter_is_a_422_naming_it(api, two, query, field):
    ada, _ = two
    problem = assert_problem(api.get(f"{QUEUE}?{urlencode(query)}", headers=ada), 422)
    assert field in problem["errors"], problem


def test_the_fail_list_takes_the_same_search_but_keeps_its_statuses(api, two, pg_url):
    ada, _ = two
    failed = enqueue(api, ada, subject="Broken one")
    enqueue(api, ada, subject="Broken two")  # still queued
    set_rows(pg_url, "UPDATE tasks SET status = 'failed' WHERE id = :id", id=failed)
    assert ids(api, ada, "/api/v1/task/queue/fail", subject="broken") == [failed]
    assert ids(api, ada, "/api/v1/task/queue/fail", subject="broken", status="queued") == [failed]
