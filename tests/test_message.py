"""The direct path of shared.delivery.message.compose writes exactly the bytes the email package would.

The sender writes the common mail (one part, short ASCII headers, no attachment) itself instead of
building and flattening an EmailMessage; these tests hold it to the email package's output for every
input it takes, and check that it does take the common mail (else it would only be dead code).
"""

from __future__ import annotations

import re
import string
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from shared.delivery import wirecheck
from shared.delivery.message import Outgoing, _plain_wire, compose, package
from shared.tasks.content import Attachment

DATE = datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC)
SEED_MAIL = {
    "sender": "bench@example.com",
    "recipient": "rcpt123@example.org",
    "subject": "Bench mail 123",
    "body": "Hello,\nthis is mail number 123 of the benchmark.\n",
    "message_id": "<mailq.123.abcdef012345@example.com>",
    "date": DATE,
}


def by_email_package(bcc=(), **fields) -> Outgoing:
    """The email package's wire form, through the same last guard as compose's."""
    outgoing = package(bcc=bcc, **fields)
    wirecheck.check(outgoing, bcc=bcc, **fields)
    return outgoing


def same_but_boundary(outgoing: Outgoing) -> Outgoing:
    """The email package draws a random MIME boundary per message; compare everything else."""
    return replace(outgoing, data=re.sub(rb"={15}\d+==", b"BOUNDARY", outgoing.data))


@pytest.mark.parametrize(
    "change",
    [
        {},
        {"body": "a paragraph without hard line breaks, as most mail clients write them, " * 3},  # QP
        {"body": "caf\u00e9 cr\u00e8me\n"},  # mostly Latin: quoted-printable
        {"body": "\u041f\u0440\u0438\u0432\u0435\u0442\n"},  # Cyrillic: base64
        {"html": "<p>hi</p>", "body": None},
        {"from_name": "Bench Sender", "recipient_name": "Ann", "cc": ["c@example.org"]},
        {"reply_to": "replies@example.com", "headers": [("List-Unsubscribe", "<https://x.example/u>")]},
        # Address headers are written by shared.delivery.addresses for both paths: quoting is no reason
        # to leave a mail to the email package.
        {"recipient": '"quoted local"@example.org'},
        {"from_name": "Dr. Who"},
        {"from_name": "Dr. W\u00fc"},  # encoded words of our own: ASCII
        {"cc": ["ok@example.org", "bad address@example.org"]},
    ],
)
def test_the_common_mail_takes_the_direct_path_with_the_email_packages_bytes(change):
    fields = {**SEED_MAIL, **change}
    assert _plain_wire(**fields) is not None
    assert compose(**fields) == by_email_package(**fields)


@pytest.mark.parametrize(
    "change",
    [
        {"html": "<p>hi</p>"},  # two parts: multipart/alternative
        {"subject": "=?utf-8?q?looks_encoded?="},
        {"subject": "two  spaces"},
        {"subject": "S" * 70},  # the header line would be folded
        {"recipient": "\u00fcser@example.org"},  # SMTPUTF8
        {"attachments": [Attachment("a.txt", "text/plain", b"a")]},
    ],
)
def test_what_the_direct_path_leaves_to_the_email_package(change):
    fields = {**SEED_MAIL, **change}
    assert _plain_wire(**fields) is None
    assert same_but_boundary(compose(**fields)) == same_but_boundary(by_email_package(**fields))


def test_a_non_ascii_bcc_leaves_the_mail_to_the_email_package_for_its_smtputf8_option():
    outgoing = compose(**SEED_MAIL, bcc=("\u00fcser@example.org",))
    assert outgoing == by_email_package(bcc=("\u00fcser@example.org",), **SEED_MAIL)
    assert "SMTPUTF8" in outgoing.options


def test_bcc_is_in_the_envelope_once_and_in_no_header():
    outgoing = compose(**SEED_MAIL, cc=["c@example.org"], bcc=("B@example.net", "RCPT123@example.org"))
    assert outgoing.recipients == ("rcpt123@example.org", "c@example.org", "B@example.net")
    assert b"B@example.net" not in outgoing.data
    assert outgoing == by_email_package(
        bcc=("B@example.net", "RCPT123@example.org"), cc=["c@example.org"], **SEED_MAIL
    )


def test_a_line_break_in_a_header_is_still_refused():
    with pytest.raises(ValueError, match="CR, LF or NUL"):
        compose(**{**SEED_MAIL, "subject": "hi\r\nBcc: victim@example.org"})
    with pytest.raises(ValueError, match="CR, LF or NUL"):
        compose(**SEED_MAIL, headers=[("X-Tag", "a\nb")])


# Inputs near the edges the direct path decides on: printable ASCII with the characters that make
# the email package quote, encode or fold (spaces, quotes, parentheses, "=?", long words).
_PRINTABLE = st.text(alphabet=string.printable.replace("\x0b", "").replace("\x0c", ""), max_size=90)
_WORDISH = st.text(alphabet=string.ascii_letters + string.digits + " .-_()\"'<>@,;:=?\\", max_size=80)
_PLAIN_WORDS = st.from_regex(r"[A-Za-z0-9]{1,12}( [A-Za-z0-9!?.,:-]{1,12}){0,4}", fullmatch=True)
_LOCAL = st.from_regex(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~\-]{1,20}", fullmatch=True)
_DOMAIN = st.from_regex(r"[A-Za-z0-9\-]{1,12}(\.[A-Za-z0-9\-]{1,12}){0,2}", fullmatch=True)
_ADDRESS = st.builds(lambda local, domain: f"{local}@{domain}", _LOCAL, _DOMAIN)
_BODY = st.one_of(
    _PRINTABLE,
    st.lists(st.text(alphabet=string.ascii_letters + " .,!\t", max_size=82), max_size=6).map("\n".join),
    st.lists(st.text(alphabet=string.ascii_letters + " ", max_size=40), max_size=6).map("\r\n".join),
    st.lists(st.text(alphabet=string.ascii_letters + " ", max_size=40), max_size=6).map("\r".join),
    st.lists(st.text(alphabet=string.ascii_letters + " =.\t", min_size=60, max_size=200), max_size=14).map(
        "\n".join
    ),
    st.text(max_size=120),  # any Unicode, surrogates included
)
_DATES = st.datetimes(
    min_value=datetime(1990, 1, 1), max_value=datetime(2090, 1, 1), timezones=st.sampled_from([UTC, None])
) | st.just(datetime(2026, 6, 1, 8, 30, tzinfo=timezone(timedelta(hours=-5, minutes=-30))))


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sender=_ADDRESS,
    recipient=_ADDRESS,
    subject=_WORDISH | _PLAIN_WORDS,
    body=_BODY,
    html_only=st.booleans(),
    message_id=st.one_of(
        st.builds(lambda a: f"<{a}>", _ADDRESS), st.just("<mailq.1.abc@example.com>"), _WORDISH
    ),
    date=_DATES,
    from_name=st.one_of(st.none(), _WORDISH, _PLAIN_WORDS),
    recipient_name=st.one_of(st.none(), st.from_regex(r"[A-Za-z0-9 ]{0,30}", fullmatch=True)),
    cc=st.lists(_ADDRESS, max_size=3),
    reply_to=st.one_of(st.none(), _ADDRESS),
    headers=st.lists(
        st.tuples(st.sampled_from(["X-Tag", "List-Unsubscribe", "X-Long"]), _PRINTABLE), max_size=2
    ),
    bcc=st.lists(_ADDRESS, max_size=2),
)
@example(  # the seed mail's shape, at the edges of a header line's 78 characters
    sender="a@example.com",
    recipient="b@example.com",
    subject="s" * 69,
    body="x" * 78,
    html_only=False,
    message_id="<mailq.1.abc@example.com>",
    date=DATE,
    from_name=None,
    recipient_name=None,
    cc=[],
    reply_to=None,
    headers=[],
    bcc=[],
)
def test_the_direct_path_writes_what_the_email_package_writes(html_only, bcc, **fields):
    if html_only:
        fields["html"], fields["body"] = fields["body"], None
    try:
        expected = by_email_package(bcc=bcc, **fields)
    except Exception as exc:  # what the email package refuses, compose refuses the same way
        with pytest.raises(type(exc)):
            compose(bcc=bcc, **fields)
        return
    assert compose(bcc=bcc, **fields) == expected
