"""The mailer against Postfix's smtpd, a server relays really run: pipelined where it offers PIPELINING, one
command at a time on a second listener that does not, each refusal coming out the same on both, and the
relay behind Postfix receiving exactly the mail that should get through.

Postfix (tests/relays/postfix.py) runs as a private instance relaying to a ThrottlingRelay (without
limits) that counts what arrives. Skipped where Postfix cannot run (not root, or the package, its user or
group missing: preflight() says which); under CI that is a failure: .ci/run installs the package.
"""

from __future__ import annotations

import os
import smtplib
from datetime import UTC, datetime

import pytest

from shared.config import Settings
from shared.delivery.mailer import Mailer
from shared.delivery.message import build_message, message_id_for
from shared.delivery.smtp import SmtpAccount
from shared.domain import SmtpSecurity
from shared.errors import PermanentSmtpError, SmtpError, TransientSmtpError
from tests.relays.postfix import PostfixInstance, preflight
from tests.relays.throttling_relay import ThrottlingRelay

SETTINGS = Settings(smtp_timeout=10.0, smtp_allow_private_hosts=True, smtp_allow_insecure=True)
SENDER, REFUSED_SENDER, LATER_SENDER = "alice@example.com", "mallory@example.com", "slow@example.com"
BOB, CAROL, DAVE = "bob@example.org", "carol@example.org", "dave@example.org"
NOBODY, BUSY = "nobody@example.org", "busy@example.org"  # refused for good, refused for now
# Refusals decided by Postfix's own access tables. smtpd_delay_reject = no: a refused sender is refused at
# MAIL FROM (by default Postfix waits until RCPT TO).
RESTRICTIONS = {
    "smtpd_delay_reject": "no",
    "smtpd_sender_restrictions": (
        f"check_sender_access inline:{{ {{ {REFUSED_SENDER} = 553 5.7.1 sender not allowed }}, "
        f"{{ {LATER_SENDER} = 451 4.7.1 try again later }} }}"
    ),
    "smtpd_recipient_restrictions": (
        f"check_recipient_access inline:{{ {{ {NOBODY} = 550 5.1.1 no such user }}, "
        f"{{ {BUSY} = 450 4.2.1 mailbox busy }} }}"
    ),
    # Postfix's own check of a client's pipelining: DATA is refused to one that sent the message ahead
    # of the 354 (it lets an envelope group through, even where PIPELINING is not offered).
    "smtpd_data_restrictions": "reject_unauth_pipelining",
    "smtpd_soft_error_limit": "1000",  # past it Postfix sleeps a second before each reply
    "smtpd_hard_error_limit": "1000",
}


def _skip_or_fail() -> None:
    problems = preflight()
    if not problems:
        return
    reason = "Postfix cannot run here: " + "; ".join(problems)
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail(f"{reason} (CI is set: .ci/run must install postfix)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def postfix():
    _skip_or_fail()
    with (
        ThrottlingRelay() as relay,
        PostfixInstance(
            relay.port, extra=RESTRICTIONS, second_smtpd={"smtpd_discard_ehlo_keywords": "pipelining"}
        ) as instance,
    ):
        instance.relay = relay
        yield instance


def a_message(task_id: int, *, sender: str = SENDER, to: str = BOB, cc: tuple[str, ...] = ()):
    return build_message(
        sender=sender,
        recipient=to,
        subject=f"Postfix {task_id}",
        body="Hello.\n.a line that starts with a dot\n",
        message_id=message_id_for(task_id, sender),
        date=datetime(2024, 5, 17, 9, 30, tzinfo=UTC),
        cc=cc,
    )


def account(port: int) -> SmtpAccount:
    return SmtpAccount("127.0.0.1", port, "", "", SmtpSecurity.NONE)


def arrivals(postfix, message) -> list:
    """Wait for message (a marker sent last) to reach the relay behind Postfix; return what arrived with
    it since the last call, marker included."""
    relay = postfix.relay
    seen = getattr(postfix, "seen", 0)
    marker = message["Message-ID"]
    relay.wait_until(lambda stats: marker in stats.message_ids, timeout=30)
    assert postfix.wait_for_empty_queue(timeout=30)
    mails = relay.stats().mails
    postfix.seen = len(mails)
    return list(mails[seen:])


@pytest.mark.parametrize("pipelined", [True, False], ids=["pipelined", "one-at-a-time"])
def test_postfix_gets_the_mail_pipelined_only_where_it_offers_pipelining(postfix, pipelined):
    port = postfix.smtpd_port if pipelined else postfix.second_port
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo()
        assert client.has_extn("pipelining") == pipelined
    with Mailer(SETTINGS) as mailer:
        mailer.send(account(port), a_message(1, cc=(CAROL,)), bcc=(DAVE,))
    [mail] = arrivals(postfix, a_message(1, cc=(CAROL,)))
    assert mail.rcpt_tos == (BOB, CAROL, DAVE)
    assert "improper command pipelining" not in postfix.log()  # nothing was sent ahead of a 354


CASES = {
    "one recipient refused for good": (SENDER, (NOBODY,), [(BOB,)]),
    "every recipient refused for good": (SENDER, (NOBODY,), []),
    "a 4xx for one recipient": (SENDER, (BUSY,), []),
    "MAIL FROM refused for good": (REFUSED_SENDER, (CAROL,), []),
    "MAIL FROM refused for now": (LATER_SENDER, (CAROL,), []),
}


@pytest.mark.parametrize("case", CASES)
def test_each_refusal_by_postfix_comes_out_the_same_on_both_paths_and_delivers_what_it_should(postfix, case):
    sender, cc, delivered = CASES[case]
    to = NOBODY if case == "every recipient refused for good" else BOB
    outcomes = []
    for n, port in enumerate((postfix.smtpd_port, postfix.second_port)):
        message = a_message(100 + n, sender=sender, to=to, cc=cc)
        marker = a_message(200 + n, to=DAVE)
        with Mailer(SETTINGS) as mailer:
            try:
                acceptance = mailer.send(account(port), message)
                outcomes.append(("sent", acceptance.refused))
            except SmtpError as exc:
                outcomes.append((type(exc).__name__, exc.code, exc.message.replace(str(port), "PORT")))
            mailer.send(account(port), marker)  # sent last: once it arrived, Postfix has passed on the rest
        got = arrivals(postfix, marker)
        assert [m.rcpt_tos for m in got if m.message_id == message["Message-ID"]] == delivered
        assert [m.message_id for m in got].count(marker["Message-ID"]) == 1
    assert outcomes[0] == outcomes[1], outcomes
    kinds = {
        "one recipient refused for good": "sent",
        "every recipient refused for good": PermanentSmtpError.__name__,
        "a 4xx for one recipient": TransientSmtpError.__name__,
        "MAIL FROM refused for good": PermanentSmtpError.__name__,
        "MAIL FROM refused for now": TransientSmtpError.__name__,
    }
    assert outcomes[0][0] == kinds[case]
    if case.startswith("MAIL FROM"):
        assert "in reply to MAIL FROM" in outcomes[0][2]


def test_a_4xx_for_one_recipient_aborts_postfix_in_the_data_phase_and_nothing_is_queued(postfix):
    message = a_message(300, cc=(BUSY,))
    with Mailer(SETTINGS) as mailer:
        with pytest.raises(TransientSmtpError, match="450 4.2.1"):
            mailer.send(account(postfix.smtpd_port), message)
    marker = a_message(301, to=DAVE)
    with Mailer(SETTINGS) as mailer:
        mailer.send(account(postfix.smtpd_port), marker)
    got = arrivals(postfix, marker)
    assert [m.message_id for m in got] == [marker["Message-ID"]]
    # Postfix had answered the pipelined DATA with 354 (Bob was accepted); the mailer hung up instead of
    # sending anything, and Postfix dropped the transaction.
    assert "lost connection after DATA" in postfix.log()
