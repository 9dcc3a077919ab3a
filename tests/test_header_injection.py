"""Header injection through RFC 2047 encoded words and folded display names, sent through a real aiosmtpd
server (issue 21, items 1 and 2), and the last guard that parses the bytes about to be sent.

On Python 3.11.7 the email package decodes an encoded word while folding a header, so
``=?utf-8?q?Invoice=0D=0ABcc:_victim@…?=`` became real header lines; and folding a long quoted display
name dropped its quotes on every version, so a reader saw two From addresses. The API now refuses
encoded-word syntax in every field that becomes a header, display names are written so folding cannot
unquote them, and whatever a builder still gets wrong is refused before a byte is sent.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from email.header import decode_header, make_header
from email.parser import BytesParser
from email.policy import default as default_policy

import pytest
import sqlalchemy as sa

from shared.db import engine_for
from shared.delivery import message as message_module
from shared.delivery import wirecheck
from shared.delivery.message import Outgoing, compose
from shared.errors import UnsafeMessage
from shared.tasks import storage
from shared.tasks.content import Attachment, Mail
from shared.workers import Outcome
from tests.test_accounts_api import assert_problem
from tests.test_content import account

ENQUEUE = "/api/v1/task/enqueue"
MAIL = {"recipient_email": "bob@example.org", "subject": "Hi", "body": "Hello Bob"}
VICTIM = "victim@evil.example"
# The reproductions: each decoded, on 3.11.7, to header lines of the tenant's choosing.
INJECTIONS = {
    "subject": {"subject": f"=?utf-8?q?Invoice=0D=0AFrom:_ceo@bank.example=0D=0ABcc:_{VICTIM}?="},
    "from_name": {"from_name": f"=?utf-8?q?Support=0D=0ABcc:_{VICTIM}?="},
    "recipient_name": {"recipient_name": "=?utf-8?q?Bob=0D=0A=0D=0AYour_account_is_locked?="},
    "headers.X-Note": {"headers": {"X-Note": f"caf\u00e9 =?utf-8?q?x=0D=0ABcc:_{VICTIM}?="}},
}
FOLDED_NAME = "ceo@bank.example, Chief Executive Office of Example Bank Incorporated Worldwide"


def header_names(raw: bytes) -> list[str]:
    """The top-level header names of a received message, read from its bytes."""
    block = raw.split(b"\r\n\r\n", 1)[0]
    return [
        line.split(b":", 1)[0].decode().lower() for line in block.split(b"\r\n") if line[:1] not in b" \t"
    ]


def assert_only_what_was_meant(received, sender="ada@example.com", to="bob@example.org") -> None:
    """A received mail carries exactly one From (the sender), one To, no Bcc, and went to ``to`` only."""
    names = header_names(received.raw)
    assert "bcc" not in names and names.count("from") == 1 and names.count("to") == 1, received.raw[:600]
    message = BytesParser(policy=default_policy).parsebytes(received.raw)
    assert [a.addr_spec for a in message["From"].addresses] == [sender], str(message["From"])
    assert [a.addr_spec for a in message["To"].addresses] == [to], str(message["To"])
    assert received.rcpt_tos == [to] and VICTIM.encode() not in received.raw.split(b"\r\n\r\n")[0]


# --- the reproductions, through the API and a real SMTP server -----------------------------


@pytest.mark.parametrize("field", INJECTIONS, ids=list(INJECTIONS))
def test_an_encoded_word_reproduction_reaches_no_inbox_as_extra_headers(api, pipe, smtp, pg_url, field):
    headers = account(api, smtp)
    response = api.post(ENQUEUE, json={**MAIL, **INJECTIONS[field]}, headers=headers)
    pipe.pump()
    for received in smtp.received:  # before the fix: Bcc, a second From, a replaced body
        assert_only_what_was_meant(received)
    problem = assert_problem(response, 422)
    assert "encoded-word" in problem["errors"][field]
    with engine_for(pg_url).connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM tasks")).scalar_one() == 0


@pytest.mark.parametrize(("field", "header"), [("from_name", "From"), ("recipient_name", "To")])
def test_a_long_display_name_with_a_comma_stays_one_quoted_name_when_folded(api, pipe, smtp, field, header):
    headers = account(api, smtp)
    response = api.post(ENQUEUE, json={**MAIL, field: FOLDED_NAME}, headers=headers)
    assert response.status_code == 202, response.get_json()
    assert pipe.pump()[-1] == Outcome.SENT
    [received] = smtp.received
    assert_only_what_was_meant(received)
    shown = BytesParser(policy=default_policy).parsebytes(received.raw)[header]
    [address] = shown.addresses
    assert address.display_name == FOLDED_NAME
    assert f'"{FOLDED_NAME}"'.encode() in received.raw  # one quoted-string, never broken by a fold
    assert max(len(line) for line in received.raw.split(b"\r\n")) <= 998


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"subject": "=?UTF-8?B?SGVsbG8=?="}, "subject"),
        ({"subject": "=?utf-8?Q?a b?= and more"}, "subject"),  # whitespace inside: some decoders still do
        ({"from_name": "=?iso-8859-1*en?q?x?="}, "from_name"),
        ({"recipient_name": "Bob =?utf-8?b?QQ==?="}, "recipient_name"),
        ({"headers": {"X-Campaign": "=?utf-8?q?x?="}}, "headers.X-Campaign"),
        ({"headers": {"List-Unsubscribe": "<https://x.example/=?u?q?x?=>"}}, "headers.List-Unsubscribe"),
        (
            {"attachments": [{"filename": "=?utf-8?q?a=0D=0A?=.txt", "content": "eA=="}]},
            "attachments[0].filename",
        ),
        ({"recipient_email": "=?utf-8?q?x=0D=0A?=@example.org"}, "recipient_email"),
        ({"cc": ["=?utf-8?q?x=0D=0A?=@example.org"]}, "cc[0]"),
        ({"bcc": ["=?utf-8?q?x?=@example.org"]}, "bcc[0]"),
        ({"reply_to": "=?utf-8?q?x?=@example.org"}, "reply_to"),
    ],
)
def test_every_field_that_becomes_a_header_refuses_encoded_word_syntax(api, smtp, pg_url, body, field):
    headers = account(api, smtp)
    problem = assert_problem(api.post(ENQUEUE, json={**MAIL, **body}, headers=headers), 422)
    assert "encoded-word" in problem["errors"][field]


def test_a_registered_email_may_not_hold_an_encoded_word_either(api):
    problem = assert_problem(
        api.post("/api/v1/register", json={**_register_body(), "email": "=?utf-8?q?a?=@example.com"}), 422
    )
    assert "encoded-word" in problem["errors"]["email"]


def _register_body() -> dict:
    return {"email": "x@example.com", "password": "correct horse", "smtp_host": "127.0.0.1", "smtp_port": 25}


def test_text_that_only_resembles_an_encoded_word_is_still_accepted(api, pipe, smtp):
    headers = account(api, smtp)
    subject = "Is 2+2=? Ask me ?= later"
    response = api.post(ENQUEUE, json={**MAIL, "subject": subject, "from_name": "Q=?"}, headers=headers)
    assert response.status_code == 202, response.get_json()
    pipe.pump()
    [received] = smtp.received
    assert (
        received.message["Subject"] == subject and received.message["From"].addresses[0].display_name == "Q=?"
    )


# --- the last guard: mail stored before this release, builders that go wrong --------------------------


def store(pipe, user, **fields) -> int:
    """A task written straight to the database, as one stored before the API refused its content."""
    seed = {"recipient_email": "bob@example.org", "subject": "Hi", "body": "Hello", "scheduled_at": None}
    mail = Mail(**{**seed, **fields})
    [row] = storage.insert_one(pipe.ctx.engine, user.id, mail)
    from shared.tasks.enqueue import push

    push(pipe.ctx.redis, [row.id])
    return row.id


@pytest.mark.parametrize(
    "fields",
    [
        {"subject": INJECTIONS["subject"]["subject"]},
        {"subject": INJECTIONS["subject"]["subject"], "html": "<p>x</p>"},  # the email package's path
        {"headers": (("X-Note", INJECTIONS["headers.X-Note"]["headers"]["X-Note"]),)},
        {
            "attachments": (Attachment("a.txt", "text/plain", b"x"),),
            "subject": INJECTIONS["subject"]["subject"],
        },
    ],
    ids=["direct-path-subject", "multipart-subject", "x-header", "attachment"],
)
def test_a_stored_mail_whose_bytes_would_carry_injected_headers_is_cancelled_unsent(pipe, smtp, fields):
    user = pipe.user(smtp)
    task_id = store(pipe, user, **fields)
    pipe.pump()
    for received in smtp.received:  # a fixed email package builds it safely: then it arrives intact
        assert_only_what_was_meant(received)
    row = pipe.task(task_id)
    if not smtp.received:
        assert row.status == "cancelled" and row.try_count == 1
        assert row.last_error.startswith("not sent:") and "nobody asked for: bcc" in row.last_error


@pytest.mark.parametrize("field", ["from_name", "recipient_name"])
def test_a_stored_encoded_word_display_name_is_sent_as_literal_text_never_decoded(pipe, smtp, field):
    user = pipe.user(smtp)
    name = INJECTIONS[field][field]
    store(pipe, user, **{field: name})
    assert pipe.pump()[-1] == Outcome.SENT
    [received] = smtp.received
    assert_only_what_was_meant(received)
    header = "From" if field == "from_name" else "To"
    message = BytesParser(policy=default_policy).parsebytes(received.raw)
    # Encoded by us, it decodes to the text itself (read as RFC 2047 says: Python's address parser keeps
    # the folding whitespace between two encoded words, so the phrase is decoded here by email.header).
    block = received.raw.split(b"\r\n\r\n", 1)[0].replace(b"\r\n ", b" ").decode()
    [line] = [line for line in block.split("\r\n") if line.startswith(f"{header}: ")]
    phrase = line[len(header) + 2 :].rpartition(" <")[0]
    assert str(make_header(decode_header(phrase))) == name
    assert message.get_content().strip() == "Hello"  # the body is the body


SEED = {
    "sender": "ada@example.com",
    "recipient": "bob@example.org",
    "subject": "Hi",
    "body": "Hello",
    "message_id": "<mailq.1.abc@example.com>",
    "date": datetime(2026, 1, 1, tzinfo=UTC),
}


@pytest.mark.parametrize(("builder", "html"), [("_plain_wire", None), ("_flatten", "<p>two parts</p>")])
def test_a_builder_that_slips_a_header_in_is_stopped_before_sending(monkeypatch, builder, html):
    # A fault we cannot provoke otherwise: either builder's bytes carry an extra header line.
    real = getattr(message_module, builder)

    def slipping(*args, **kwargs):
        first, rest = real(*args, **kwargs).split(b"\r\n", 1)
        return first + f"\r\nBcc: {VICTIM}\r\n".encode() + rest

    monkeypatch.setattr(message_module, builder, slipping)
    with pytest.raises(UnsafeMessage, match="nobody asked for: bcc"):
        compose(**SEED, html=html)


def test_a_builder_that_unquotes_a_name_is_stopped_before_sending(monkeypatch):
    monkeypatch.setattr(message_module, "address_headers", lambda *a, **k: [
        ("From", f"{FOLDED_NAME} <ada@example.com>"), ("To", "bob@example.org")])  # fmt: skip
    with pytest.raises(UnsafeMessage, match="From header holds 2 address"):
        compose(**SEED, from_name=FOLDED_NAME)


# --- the guard alone, on crafted bytes -------------------------------------------------------------------


def wire(*header_lines: str, body: str = "Hello") -> bytes:
    return ("\r\n".join(header_lines) + "\r\n\r\n" + body + "\r\n").encode()


GOOD_LINES = [
    "From: Ada <ada@example.com>",
    "To: bob@example.org",
    "Subject: Hi",
    "Message-ID: <m@example.com>",
    "Date: Thu, 01 Jan 2026 00:00:00 +0000",
    'Content-Type: text/plain; charset="utf-8"',
    "Content-Transfer-Encoding: 7bit",
    "MIME-Version: 1.0",
]
MEANT = {"sender": "ada@example.com", "recipient": "bob@example.org", "from_name": "Ada"}


def outgoing(data: bytes, recipients=("bob@example.org",), sender="ada@example.com") -> Outgoing:
    return Outgoing(sender, tuple(recipients), data, ())


def test_the_guard_passes_the_mail_meant():
    wirecheck.check(outgoing(wire(*GOOD_LINES)), **MEANT)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({1: f"To: bob@example.org\r\nBcc: {VICTIM}"}, "nobody asked for: bcc"),
        ({0: "From: Ada <ada@example.com>\r\nFrom: ceo@bank.example"}, "2 From header"),
        ({0: "From: ceo@bank.example, Ada <ada@example.com>"}, "From header holds 2 address"),
        ({0: 'From: "Ada" <ada@example.com>, ceo@bank.example'}, "From header holds 2 address"),
        ({0: "From: Ada\r\n <ceo@bank.example>"}, "not the ones meant"),
        ({0: "From: Eve <ada@example.com>"}, "display name is not the one meant"),
        ({0: "From: =?utf-8?q?A=0D=0Ada?= <ada@example.com>"}, "not a plain list"),
        ({0: "From: Ada <ada@example.com> (ceo@bank.example)"}, "not a plain list"),
        ({0: "From: undisclosed: ada@example.com;"}, "not a plain list"),
        ({1: "To: bob@example.org\r\n\r\nTo: x"}, "0 Content-Type header"),  # the header block ended early
        ({2: "Subject: Hi\nBcc: x"}, "bare CR, LF or NUL"),
        ({2: "Subject Hi"}, "not a field"),
    ],
)
def test_the_guard_refuses_bytes_that_are_not_the_mail_meant(change, reason):
    lines = [change.get(i, line) for i, line in enumerate(GOOD_LINES)]
    with pytest.raises(UnsafeMessage, match=re.escape(reason)):
        wirecheck.check(outgoing(wire(*lines)), **MEANT)


def test_the_guard_refuses_an_envelope_that_is_not_the_one_meant():
    with pytest.raises(UnsafeMessage, match="envelope"):
        wirecheck.check(outgoing(wire(*GOOD_LINES), recipients=("bob@example.org", VICTIM)), **MEANT)
    with pytest.raises(UnsafeMessage, match="envelope"):
        wirecheck.check(outgoing(wire(*GOOD_LINES), sender="ceo@bank.example"), **MEANT)
    wirecheck.check(outgoing(wire(*GOOD_LINES), recipients=("bob@example.org", "hidden@x.org")), **MEANT,
                    bcc=["hidden@x.org"])  # fmt: skip


def test_the_guard_reads_quoted_and_encoded_display_names_as_a_reader_does():
    lines = list(GOOD_LINES)
    lines[0] = f'From: "{FOLDED_NAME}"\r\n <ada@example.com>'
    wirecheck.check(outgoing(wire(*lines)), **{**MEANT, "from_name": FOLDED_NAME})
    lines[0] = "From: =?utf-8?b?SsO2cmcgTcO8bGxlcg==?=\r\n =?utf-8?q?_und_Co?= <ada@example.com>"
    wirecheck.check(outgoing(wire(*lines)), **{**MEANT, "from_name": "J\u00f6rg M\u00fcller und Co"})
