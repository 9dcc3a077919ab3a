"""Real mails: HTML, cc/bcc, reply-to, custom headers, attachments, display names and tags, from the
enqueue request to what an aiosmtpd server parses, with real PostgreSQL and Redis."""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from shared.db import engine_for
from shared.tasks import content, pages, search
from shared.workers import Outcome
from tests.conftest import auth_header, login, register_user
from tests.smtp_servers import ScriptedSmtpServer
from tests.test_accounts_api import assert_problem

ENQUEUE = "/api/v1/task/enqueue"
MAIL = {"recipient_email": "bob@example.org", "subject": "Hi", "body": "Hello Bob"}
# Every byte value, a NUL, CRLF and a lone dot line: what a mangling transfer would break first.
BINARY = bytes(range(256)) * 64 + b"\x00\r\n.\r\n\n.\n"
UNSUBSCRIBE = "<https://example.com/unsubscribe?token=" + "a1" * 60 + ">, <mailto:unsubscribe@example.com>"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def account(api, server, email: str = "ada@example.com") -> dict[str, str]:
    """A user whose mail goes to ``server``; the Authorization header of its token."""
    credentials = {"smtp-username": "", "smtp-password": ""}
    register_user(api, email=email, smtp_host=server.host, smtp_port=server.port, **credentials)
    return auth_header(login(api, email=email))


def enqueue(api, auth, **fields) -> int:
    response = api.post(ENQUEUE, json={**MAIL, **fields}, headers=auth)
    assert response.status_code == 202, response.get_json()
    return response.get_json()["task_id"]


def count(pg_url, table: str) -> int:
    with engine_for(pg_url).connect() as conn:
        return conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one()  # noqa: S608


# --- what arrives ---------------------------------------------------------------------------------------


def test_every_content_field_arrives_as_enqueued(api, pipe, smtp):
    headers = account(api, smtp)
    task_id = enqueue(
        api,
        headers,
        recipient_name="Bob Müller",
        from_name="Ада Лавлейс",
        subject="Grüße — 你好",
        body="Hallo Bob,\nschöne Grüße.\n",
        html="<p>Hallo <b>Bob</b>, schöne Grüße.</p>\n",
        cc=["carol@example.org"],
        bcc=["dave@example.org", "bob@example.org"],  # bob is in To already: one copy
        reply_to="support@example.com",
        headers={
            "X-Campaign": "spring ✿",
            "List-Unsubscribe": UNSUBSCRIBE,
            "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
            "In-Reply-To": "<first@example.org>",
            "References": "<zero@example.org> <first@example.org>",
        },
        attachments=[
            {"filename": "report.pdf", "content": b64(BINARY)},
            {
                "filename": "naïve résumé.txt",
                "content": b64("héllo\n".encode()),
                "content_type": "text/plain",
            },
        ],
        tags={"campaign": "spring", "user": "42"},
    )
    assert pipe.pump()[-1] == Outcome.SENT
    [received] = smtp.received
    assert received.mail_from == "ada@example.com"
    assert received.rcpt_tos == ["bob@example.org", "carol@example.org", "dave@example.org"]
    assert b"dave@example.org" not in received.raw and "Bcc" not in received.message
    m = received.message
    assert (
        str(m["From"]) == "Ада Лавлейс <ada@example.com>" and str(m["To"]) == "Bob Müller <bob@example.org>"
    )
    assert m["Subject"] == "Grüße — 你好" and m["Cc"] == "carol@example.org"
    assert m["Reply-To"] == "support@example.com" and m["Message-ID"] == pipe.task(task_id).message_id
    assert m["X-Campaign"] == "spring ✿" and m["List-Unsubscribe"] == UNSUBSCRIBE
    assert f"List-Unsubscribe: {UNSUBSCRIBE.split(', ')[0]}".encode() in received.raw  # not encoded-words
    assert m["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert m["In-Reply-To"] == "<first@example.org>"
    assert m["References"] == "<zero@example.org> <first@example.org>"
    assert max(len(line) for line in received.raw.split(b"\r\n")) <= 998
    assert m.get_content_type() == "multipart/mixed"
    alternative, *files = m.iter_parts()
    text, html = alternative.iter_parts()
    assert alternative.get_content_type() == "multipart/alternative"
    assert (text.get_content_type(), html.get_content_type()) == ("text/plain", "text/html")
    assert text.get_content().replace("\r\n", "\n") == "Hallo Bob,\nschöne Grüße.\n"
    assert html.get_content().replace("\r\n", "\n") == "<p>Hallo <b>Bob</b>, schöne Grüße.</p>\n"
    assert [(f.get_filename(), f.get_content_type()) for f in files] == [
        ("report.pdf", "application/pdf"),  # guessed from the name
        ("naïve résumé.txt", "text/plain"),
    ]
    assert b"filename*=utf-8''na%C3%AFve%20r%C3%A9sum%C3%A9.txt" in received.raw  # RFC 2231
    assert sha256(files[0].get_payload(decode=True)) == sha256(BINARY)
    assert files[1].get_payload(decode=True) == "héllo\n".encode()


def test_the_task_view_shows_the_content_and_every_view_its_tags(api, pipe, smtp):
    headers = account(api, smtp)
    fields = {
        "html": "<p>Hi</p>",
        "cc": ["carol@example.org"],
        "bcc": ["dave@example.org"],
        "headers": {"X-Campaign": "spring"},
        "attachments": [{"filename": "a.bin", "content": b64(BINARY), "content_type": "application/x-thing"}],
        "tags": {"campaign": "spring"},
    }
    task_id = enqueue(api, headers, **fields)
    task = api.get(f"/api/v1/task/{task_id}", headers=headers).get_json()
    assert (
        task["body"] == "Hello Bob" and task["html"] == "<p>Hi</p>" and task["tags"] == {"campaign": "spring"}
    )
    assert task["cc"] == ["carol@example.org"] and task["bcc"] == ["dave@example.org"]
    assert task["headers"] == {"X-Campaign": "spring"} and task["reply_to"] is None
    assert task["attachments"] == [
        {"filename": "a.bin", "content_type": "application/x-thing", "size": len(BINARY)}
    ]
    [listed] = api.get("/api/v1/task/queue", headers=headers).get_json()["items"]
    assert listed["tags"] == {"campaign": "spring"} and "body" not in listed and "html" not in listed
    plain = enqueue(api, headers)
    assert api.get(f"/api/v1/task/{plain}", headers=headers).get_json()["tags"] == {}


def test_an_html_only_mail_has_one_html_part_and_an_empty_text_body_adds_none(api, pipe, smtp):
    headers = account(api, smtp)
    enqueue(api, headers, body=None, html="<h1>Only HTML</h1>")
    enqueue(api, headers, body="", html="<h1>Still only HTML</h1>")
    pipe.pump()
    assert [m.get_content_type() for m in smtp.messages] == ["text/html", "text/html"]
    assert smtp.messages[0].get_content() == "<h1>Only HTML</h1>\r\n"


def test_a_mail_to_bcc_recipients_only_shows_none_of_them(api, pipe, smtp):
    headers = account(api, smtp)
    enqueue(api, headers, bcc=["eve@example.org", "frank@example.org"])
    pipe.pump()
    [received] = smtp.received
    assert received.rcpt_tos == ["bob@example.org", "eve@example.org", "frank@example.org"]
    head = received.raw.split(b"\r\n\r\n")[0]
    assert b"eve@" not in received.raw and b"frank@" not in received.raw and b"bcc" not in head.lower()


def test_a_retry_sends_the_same_message_id_and_the_same_bytes(api, pipe, smtp):
    pipe.ctx.settings = pipe.ctx.settings.replace(retry_backoff_base=0.1, retry_backoff_max=0.2)
    pipe.sender.settings = pipe.ctx.settings
    headers = account(api, smtp)
    smtp.script("451 4.3.0 try again later")
    task_id = enqueue(api, headers, attachments=[{"filename": "x.bin", "content": b64(BINARY)}])
    pipe.run_until_settled(timeout=20)
    row = pipe.task(task_id)
    assert row.status == "sent" and row.try_count == 2 and smtp.data_attempts == 2
    [received] = smtp.received
    assert received.message["Message-ID"] == row.message_id
    [attachment] = received.message.iter_attachments()
    assert sha256(attachment.get_payload(decode=True)) == sha256(BINARY)


# --- internationalised addresses ------------------------------------------------------------------------


def test_an_internationalised_address_is_delivered_where_smtputf8_is_offered(api, pipe):
    with ScriptedSmtpServer(smtputf8=True) as server:  # aiosmtpd's default, said out loud
        headers = account(api, server)
        task_id = enqueue(api, headers, recipient_email="jürgen@bücher.example", cc=["zoë@example.org"])
        pipe.pump()
        [received] = server.received
    assert pipe.task(task_id).status == "sent"
    assert received.rcpt_tos == ["jürgen@bücher.example", "zoë@example.org"]
    assert received.message["To"] == "jürgen@bücher.example"


def test_an_internationalised_address_without_smtputf8_is_a_clear_permanent_error(api, pipe):
    with ScriptedSmtpServer(smtputf8=False) as server:
        headers = account(api, server)
        task_id = enqueue(api, headers, bcc=["zoë@example.org"])
        pipe.pump()
        assert server.data_attempts == 0
    row = pipe.task(task_id)
    assert row.status == "cancelled" and "SMTPUTF8" in row.last_error


# --- recipients the server refuses ----------------------------------------------------------------------


def test_recipients_refused_for_good_miss_the_mail_and_are_named_while_the_others_get_it(api, pipe):
    with ScriptedSmtpServer(refuse={"carol@example.org": "550 5.1.1 no such user"}) as server:
        headers = account(api, server)
        task_id = enqueue(api, headers, cc=["carol@example.org", "dave@example.org"])
        pipe.pump()
        [received] = server.received
    row = pipe.task(task_id)
    assert received.rcpt_tos == ["bob@example.org", "dave@example.org"]
    assert row.status == "sent" and "550 5.1.1 no such user" in row.last_error and "carol" in row.last_error


def test_a_recipient_refused_for_now_holds_the_whole_mail_back_for_a_retry(api, pipe):
    with ScriptedSmtpServer(refuse={"carol@example.org": "450 4.2.1 mailbox busy"}) as server:
        headers = account(api, server)
        task_id = enqueue(api, headers, cc=["carol@example.org"])
        pipe.pump()
        assert server.data_attempts == 0  # nobody got it, so nobody gets it twice
    row = pipe.task(task_id)
    assert (
        row.status == "failed" and row.last_error.startswith("450") and "carol@example.org" in row.last_error
    )


def test_a_mail_every_recipient_of_which_is_refused_is_cancelled(api, pipe):
    refuse = {a: "550 5.1.1 no such user" for a in ("bob@example.org", "carol@example.org")}
    with ScriptedSmtpServer(refuse=refuse) as server:
        headers = account(api, server)
        task_id = enqueue(api, headers, cc=["carol@example.org"])
        pipe.pump()
    assert pipe.task(task_id).status == "cancelled" and server.data_attempts == 0


# --- the rules at the API -------------------------------------------------------------------------------

ATTACHMENT = {"filename": "a.txt", "content": b64(b"hello")}


@pytest.mark.parametrize(
    ("fields", "key"),
    [
        ({"body": None}, "body"),
        ({"html": 5}, "html"),
        ({"html": "nul\x00"}, "html"),
        ({"from_name": "Ada\r\nBcc: eve@example.org"}, "from_name"),
        ({"recipient_name": "x" * 257}, "recipient_name"),
        ({"cc": "carol@example.org"}, "cc"),
        ({"cc": ["carol@example.org", "nobody"]}, "cc[1]"),
        ({"cc": ["carol@example.org\r\nBcc: eve@example.org"]}, "cc[0]"),
        ({"cc": [f"c{i}@example.org" for i in range(51)]}, "cc"),
        ({"bcc": [5]}, "bcc[0]"),
        (
            {"cc": [f"c{i}@example.org" for i in range(50)], "bcc": [f"b{i}@example.org" for i in range(50)]},
            "bcc",
        ),
        ({"reply_to": "nobody"}, "reply_to"),
        ({"headers": ["X-A: b"]}, "headers"),
        ({"headers": {"From": "eve@example.org"}}, "headers.From"),
        ({"headers": {"bcc": "eve@example.org"}}, "headers.bcc"),
        ({"headers": {"Content-Type": "text/html"}}, "headers.Content-Type"),
        ({"headers": {"MIME-Version": "2.0"}}, "headers.MIME-Version"),
        ({"headers": {"Received": "from evil"}}, "headers.Received"),
        ({"headers": {"X-A": "one\r\nBcc: eve@example.org"}}, "headers.X-A"),
        ({"headers": {"X-A": "one\u2028two"}}, "headers.X-A"),
        ({"headers": {"X-A": "a", "x-a": "b"}}, "headers.x-a"),
        ({"headers": {"X A": "b"}}, "headers"),
        ({"headers": {"References": "<ü@example.org>"}}, "headers.References"),
        ({"headers": {"X-A": "x" * 901}}, "headers.X-A"),
        ({"headers": {f"X-{i}": "v" for i in range(21)}}, "headers"),
        ({"attachments": {"filename": "a"}}, "attachments"),
        ({"attachments": [ATTACHMENT] * 11}, "attachments"),
        ({"attachments": ["a.txt"]}, "attachments[0]"),
        ({"attachments": [{**ATTACHMENT, "filename": "../etc/passwd"}]}, "attachments[0].filename"),
        ({"attachments": [{**ATTACHMENT, "filename": "C:\\x.txt"}]}, "attachments[0].filename"),
        ({"attachments": [{**ATTACHMENT, "filename": "a\r\nb.txt"}]}, "attachments[0].filename"),
        ({"attachments": [{**ATTACHMENT, "filename": "fdp\u202eexe.pdf"}]}, "attachments[0].filename"),
        ({"attachments": [{**ATTACHMENT, "filename": ""}]}, "attachments[0].filename"),
        ({"attachments": [{**ATTACHMENT, "content": "not base64!"}]}, "attachments[0].content"),
        ({"attachments": [{"filename": "a.txt"}]}, "attachments[0].content"),
        ({"attachments": [{**ATTACHMENT, "content_type": "multipart/mixed"}]}, "attachments[0].content_type"),
        ({"attachments": [{**ATTACHMENT, "content_type": "text/plain; x=y"}]}, "attachments[0].content_type"),
        ({"tags": ["a:b"]}, "tags"),
        ({"tags": {"bad key": "v"}}, "tags"),
        ({"tags": {"k": "x" * 257}}, "tags.k"),
        ({"tags": {"k": "line\nbreak"}}, "tags.k"),
        ({"tags": {"k": 5}}, "tags.k"),
        ({"tags": {f"k{i}": "v" for i in range(11)}}, "tags"),
    ],
)
def test_each_invalid_content_field_is_a_422_naming_it_and_nothing_is_written(api, pg_url, fields, key):
    register_user(api)
    headers = auth_header(login(api))
    problem = assert_problem(api.post(ENQUEUE, json={**MAIL, **fields}, headers=headers), 422)
    assert key in problem["errors"], problem["errors"]
    assert count(pg_url, "tasks") == 0


def test_attachments_over_max_attachment_bytes_are_a_413_and_at_the_limit_pass(api, pg_url, monkeypatch):
    from functions import http

    monkeypatch.setenv("MAX_ATTACHMENT_BYTES", "1000")
    http.reset_context()
    register_user(api)
    headers = auth_header(login(api))
    halves = [{"filename": f"{i}.bin", "content": b64(b"x" * 500)} for i in range(2)]
    assert api.post(ENQUEUE, json={**MAIL, "attachments": halves}, headers=headers).status_code == 202
    halves[1]["content"] = b64(b"x" * 501)
    problem = assert_problem(api.post(ENQUEUE, json={**MAIL, "attachments": halves}, headers=headers), 413)
    assert "1000 bytes" in problem["detail"]
    assert count(pg_url, "tasks") == 1


def test_html_counts_toward_max_body_bytes(api, monkeypatch):
    from functions import http

    monkeypatch.setenv("MAX_BODY_BYTES", "1000")
    http.reset_context()
    register_user(api)
    headers = auth_header(login(api))
    fits = {**MAIL, "body": "x" * 500, "html": "y" * 500}
    assert api.post(ENQUEUE, json=fits, headers=headers).status_code == 202
    assert_problem(api.post(ENQUEUE, json={**fits, "html": "y" * 501}, headers=headers), 413)


def test_base64_wrapped_in_lines_is_accepted(api, pipe, smtp):
    headers = account(api, smtp)
    wrapped = base64.encodebytes(BINARY).decode()  # 76 characters a line, as `base64` prints it
    enqueue(api, headers, attachments=[{"filename": "x.bin", "content": wrapped}])
    pipe.pump()
    [attachment] = smtp.messages[0].iter_attachments()
    assert attachment.get_payload(decode=True) == BINARY


# --- the Idempotency-Key covers every field -------------------------------------------------------------

FIRST_EXPIRY = (datetime.now(UTC) + timedelta(days=1)).isoformat()
SECOND_EXPIRY = (datetime.now(UTC) + timedelta(days=2)).isoformat()
CHANGES = {
    "html": ("<p>a</p>", "<p>b</p>"),
    "from_name": ("Ada", "Eve"),
    "recipient_name": ("Bob", "Rob"),
    "cc": (["c@example.org"], ["d@example.org"]),
    "bcc": (["c@example.org"], ["d@example.org"]),
    "reply_to": ("c@example.org", "d@example.org"),
    "headers": ({"X-A": "1"}, {"X-A": "2"}),
    "attachments": ([ATTACHMENT], [{**ATTACHMENT, "content": b64(b"hellO")}]),
    "tags": ({"k": "1"}, {"k": "2"}),
    "expires_at": (FIRST_EXPIRY, SECOND_EXPIRY),
}


def test_the_idempotency_key_covers_every_field(api, pg_url):
    assert set(CHANGES) == set(content.NEW_FIELDS)
    register_user(api)
    headers = auth_header(login(api))
    for name, (first, second) in CHANGES.items():
        keyed = {**headers, "Idempotency-Key": f"key-{name}"}
        one = api.post(ENQUEUE, json={**MAIL, name: first}, headers=keyed).get_json()
        assert api.post(ENQUEUE, json={**MAIL, name: first}, headers=keyed).get_json() == one
        problem = assert_problem(api.post(ENQUEUE, json={**MAIL, name: second}, headers=keyed), 422)
        assert "Idempotency-Key" in problem["errors"], name
    assert count(pg_url, "tasks") == len(CHANGES)


def test_a_seed_request_hashes_as_it_did_before_the_new_fields(ctx):
    """A client retrying a request made before the upgrade still gets its first task back."""
    seed = {**MAIL, "scheduled_at": None, "html": None}
    before = hashlib.sha256(
        json.dumps(
            {k: seed.get(k) for k in ("recipient_email", "subject", "body", "scheduled_at")}, sort_keys=True
        ).encode()
    ).hexdigest()
    assert content.request_hash(seed) == before


# --- storage ---------------------------------------------------------------------------------------------


def test_a_plain_mail_has_no_content_row_and_deleting_a_task_takes_its_content_and_tags(api, pg_url):
    register_user(api)
    headers = auth_header(login(api))
    enqueue(api, headers)
    rich = enqueue(api, headers, html="<p>x</p>", attachments=[ATTACHMENT], tags={"a": "1", "b": "2"})
    assert (count(pg_url, "task_contents"), count(pg_url, "task_tags")) == (1, 2)
    with engine_for(pg_url).begin() as conn:  # what retention will do
        conn.execute(sa.text("DELETE FROM tasks WHERE id = :id"), {"id": rich})
    assert (count(pg_url, "tasks"), count(pg_url, "task_contents"), count(pg_url, "task_tags")) == (1, 0, 0)


def test_the_list_statements_read_neither_bodies_nor_content():
    for found in (
        search.Search(("queued",)),
        search.Search(("queued",), recipient="bob@example.org"),
        search.Search(("queued",), recipient="bob@example.org", tag="k:v"),
        search.Search(search.STATUSES, tag="k:v", subject="Hi"),
        search.Search(created_from=datetime(2026, 1, 1, tzinfo=UTC)),
    ):
        sql = str(pages.statement(1, found, 50).compile())
        assert "body" not in sql and "task_contents" not in sql and "attachment" not in sql
