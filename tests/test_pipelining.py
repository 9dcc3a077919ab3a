"""ESMTP PIPELINING (RFC 2920): MAIL FROM, every RCPT TO and DATA leave in one write when the server
offers it, and every reply is still judged exactly as the one-at-a-time path judges it.

Against aiosmtpd (a careful server: DATA gets 503 when no recipient was accepted), against the raw
servers of tests/hostile_smtp.py (a careless one that answers DATA with 354 whatever came before, and
hostile ones), and, in tests/test_postfix_pipelining.py, against Postfix's smtpd.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest

from shared.config import Settings
from shared.delivery.mailer import Mailer
from shared.delivery.message import build_message, message_id_for
from shared.delivery.smtp import SmtpAccount
from shared.domain import AccountReason, SmtpSecurity
from shared.errors import AccountSmtpError, PermanentSmtpError, SmtpError, TransientSmtpError
from tests.hostile_smtp import HostileSmtpServer, SilentServer
from tests.smtp_servers import ScriptedSmtpServer

SETTINGS = Settings(smtp_timeout=5.0, smtp_allow_private_hosts=True, smtp_allow_insecure=True)
SENDER = "alice@example.com"
BOB, CAROL, DAVE = "bob@example.org", "carol@example.org", "dave@example.org"
NO_PIPELINING = ("8BITMIME",)  # HostileSmtpServer's extensions without PIPELINING
MARGIN = 1.0  # seconds past the deadline a send may take to unwind on a loaded machine


def a_message(task_id: int = 1, *, to: str = BOB, cc: tuple[str, ...] = (), sender: str = SENDER):
    return build_message(
        sender=sender,
        recipient=to,
        subject=f"Mail {task_id}",
        body=f"Hello {task_id}.\n.a line that starts with a dot\n",
        message_id=message_id_for(task_id, sender),
        date=datetime(2024, 5, 17, 9, 30, tzinfo=UTC),
        cc=cc,
    )


def account_for(server) -> SmtpAccount:
    return SmtpAccount(server.host, server.port, "", "", SmtpSecurity.NONE)


def wait_until(condition, timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def outcome(server, message, **kwargs) -> tuple[str, int | None, str]:
    """What one send to server came to: ("sent", None, acceptance) or (error class, code, message)."""
    with Mailer(SETTINGS) as mailer:
        try:
            acceptance = mailer.send(account_for(server), message, **kwargs)
        except SmtpError as exc:
            return type(exc).__name__, exc.code, exc.message.replace(str(server.port), "PORT")
    return "sent", None, f"{acceptance} refused={acceptance.refused}"


# --- pipelined only when offered ---


def test_the_envelope_leaves_in_one_write_when_the_server_offers_pipelining():
    with HostileSmtpServer() as server, Mailer(SETTINGS) as mailer:
        mailer.send(account_for(server), a_message(cc=(CAROL,)), bcc=(DAVE,))
    # Every reply of the envelope was due while the next commands had arrived already; the 354 was
    # awaited before the message went.
    assert server.early == ["MAIL", "RCPT", "RCPT", "RCPT"]
    verbs = [c.split(":")[0] for c in server.commands[1:6]]  # after EHLO (QUIT may come too late to see)
    assert verbs == ["MAIL FROM", "RCPT TO", "RCPT TO", "RCPT TO", "DATA"]
    [content] = server.messages
    assert b"\r\n..a line that starts with a dot\r\n" in content  # dot-stuffed as smtplib does


def test_a_server_without_pipelining_gets_one_command_at_a_time_also_after_a_refusal():
    refusal = {BOB: b"550 5.1.1 no such user\r\n"}
    with HostileSmtpServer(extensions=NO_PIPELINING, refuse=refusal) as server, Mailer(SETTINGS) as mailer:
        with pytest.raises(PermanentSmtpError, match="550 5.1.1 no such user"):
            mailer.send(account_for(server), a_message(1))
        mailer.send(account_for(server), a_message(2, to=CAROL))
    assert server.early == []
    assert server.count("RSET") == 1 and server.connections == 1 and len(server.messages) == 1


def test_pipelined_mail_reaches_a_real_server_in_one_piece():
    with ScriptedSmtpServer(pipelining=True) as server, Mailer(SETTINGS) as mailer:
        for task_id in range(3):
            mailer.send(account_for(server), a_message(task_id, cc=(CAROL,)), bcc=(DAVE,))
    assert server.connections == 1 and len(server.received) == 3
    assert all(r.rcpt_tos == [BOB, CAROL, DAVE] for r in server.received)
    assert server.messages[0]["Subject"] == "Mail 0"
    assert ".a line that starts with a dot" in server.messages[0].get_content()


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "one-at-a-time"])
def test_an_internationalised_address_goes_out_with_smtputf8_on_both_paths(pipelining):
    message = a_message(to="jürgen@bücher.example", cc=("zoë@example.org",))
    with ScriptedSmtpServer(pipelining=pipelining) as server, Mailer(SETTINGS) as mailer:
        mailer.send(account_for(server), message)
    [received] = server.received
    assert received.rcpt_tos == ["jürgen@bücher.example", "zoë@example.org"]
    assert received.message["To"] == "jürgen@bücher.example"


# --- each failure as the one-at-a-time path has it (aiosmtpd, with and without PIPELINING) ---

REFUSED = "550 5.1.1 no such user"
LATER = "451 4.2.0 mailbox busy, try later"

CASES = {
    "one recipient refused for good, the others get it": ({"refuse": {CAROL: REFUSED}}, (CAROL,), 1),
    "every recipient refused for good": ({"refuse": {BOB: REFUSED, CAROL: REFUSED}}, (CAROL,), 0),
    "a 4xx for one recipient": ({"refuse": {CAROL: LATER}}, (CAROL,), 0),
    "a 4xx and a 5xx": ({"refuse": {BOB: REFUSED, CAROL: LATER}}, (CAROL,), 0),
    "MAIL FROM refused for good": ({"refuse_senders": {SENDER: "553 5.7.1 sender not allowed"}}, (), 0),
    "MAIL FROM refused for now": ({"refuse_senders": {SENDER: "451 4.7.1 try again later"}}, (), 0),
    "the message refused for good": ({"replies": ["554 5.7.1 content rejected"]}, (CAROL,), 0),  # fmt: skip
    "the message refused for now": ({"replies": ["452 4.3.1 out of space"]}, (CAROL,), 0),
}


@pytest.mark.parametrize("case", CASES)
def test_a_pipelined_failure_comes_out_as_the_one_at_a_time_one(case):
    options, cc, delivered = CASES[case]
    outcomes = {}
    for pipelining in (False, True):
        with ScriptedSmtpServer(pipelining=pipelining, **options) as server:
            outcomes[pipelining] = outcome(server, a_message(cc=cc))
            assert len(server.received) == delivered
    assert outcomes[True] == outcomes[False]


def test_one_recipient_refused_for_good_leaves_the_others_their_mail_and_says_who():
    with ScriptedSmtpServer(pipelining=True, refuse={CAROL: REFUSED}) as server, Mailer(SETTINGS) as mailer:
        acceptance = mailer.send(account_for(server), a_message(cc=(CAROL,)), bcc=(DAVE,))
    [received] = server.received
    assert received.rcpt_tos == [BOB, DAVE]
    assert acceptance.startswith("250") and acceptance.refused == (f"<{CAROL}> 550 5.1.1 no such user",)


def test_every_recipient_refused_sends_nothing_and_the_session_goes_on():
    refuse = {BOB: REFUSED, CAROL: REFUSED}
    with ScriptedSmtpServer(pipelining=True, refuse=refuse) as server, Mailer(SETTINGS) as mailer:
        with pytest.raises(PermanentSmtpError) as caught:
            mailer.send(account_for(server), a_message(1, cc=(CAROL,)))
        mailer.send(account_for(server), a_message(2, to=DAVE))
    assert caught.value.code == 550 and f"<{BOB}>" in caught.value.message
    assert server.data_attempts == 1 and [r.rcpt_tos for r in server.received] == [[DAVE]]
    assert server.connections == 1 and server.resets == 1


def test_a_4xx_for_one_recipient_sends_nothing_to_the_others():
    with ScriptedSmtpServer(pipelining=True, refuse={CAROL: LATER}) as server, Mailer(SETTINGS) as mailer:
        with pytest.raises(TransientSmtpError) as caught:
            mailer.send(account_for(server), a_message(1, cc=(CAROL,)))
        # aiosmtpd answered the pipelined DATA with 354 (Bob was accepted): the mailer hung up instead
        # of sending anything, which aborts the transaction.
        assert wait_until(lambda: server.open_connections == 0)
        mailer.send(account_for(server), a_message(2, to=DAVE))
    assert caught.value.code == 451 and f"<{CAROL}>" in caught.value.message
    assert [r.rcpt_tos for r in server.received] == [[DAVE]] and server.connections == 2


def test_a_refused_mail_from_sends_nothing_and_the_session_goes_on():
    refusal = {SENDER: "553 5.7.1 sender not allowed"}
    with ScriptedSmtpServer(pipelining=True, refuse_senders=refusal) as server, Mailer(SETTINGS) as mailer:
        with pytest.raises(PermanentSmtpError, match="553 5.7.1 sender not allowed .*MAIL FROM"):
            mailer.send(account_for(server), a_message(1))
        mailer.send(account_for(server), a_message(2, sender="erin@example.com"))
    assert [r.mail_from for r in server.received] == ["erin@example.com"] and server.connections == 1


# --- a careless server: 354 to a DATA whose message must not follow ---


def test_a_354_after_every_recipient_was_refused_gets_the_final_dot_alone():
    refuse = {BOB: b"550 5.1.1 no such user\r\n", CAROL: b"550 5.1.1 no such user\r\n"}
    with HostileSmtpServer(refuse=refuse) as server, Mailer(SETTINGS) as mailer:
        with pytest.raises(PermanentSmtpError, match="550 5.1.1 no such user"):
            mailer.send(account_for(server), a_message(1, cc=(CAROL,)))
        mailer.send(account_for(server), a_message(2, to=DAVE))  # the session is still in step
    assert server.messages[0] == b""  # the data phase ended with the dot alone (RFC 2920 3.1)
    assert len(server.messages) == 2 and b"Mail 2" in server.messages[1]
    assert server.connections == 1


def test_a_354_after_a_4xx_for_one_recipient_is_answered_by_hanging_up():
    # Bob was accepted: a dot would deliver him an empty message.
    with (
        HostileSmtpServer(refuse={CAROL: b"451 4.2.0 mailbox busy\r\n"}) as server,
        Mailer(SETTINGS) as mailer,
    ):
        with pytest.raises(TransientSmtpError, match="451 4.2.0 mailbox busy"):
            mailer.send(account_for(server), a_message(cc=(CAROL,)))
        assert wait_until(lambda: server.aborted == 1)
    assert server.messages == []


def test_a_354_after_a_refused_mail_from_is_answered_by_hanging_up():
    # This server accepted the recipients although it refused the sender: only a hang-up is safe.
    with HostileSmtpServer(replies={"MAIL": b"550 5.7.1 sender refused\r\n"}) as server:
        with Mailer(SETTINGS) as mailer:
            with pytest.raises(PermanentSmtpError, match="550 5.7.1 sender refused .*MAIL FROM"):
                mailer.send(account_for(server), a_message())
            assert wait_until(lambda: server.aborted == 1)
    assert server.messages == []


# --- hostile servers and broken sessions in the middle of a group ---


@pytest.mark.parametrize("verb, stage", [("MAIL", "MAIL FROM"), ("RCPT", "RCPT TO")])
def test_a_421_in_the_middle_of_the_group_ends_the_mail_with_that_421(verb, stage):
    closing = {verb: b"421 4.3.2 service shutting down\r\n"}
    with HostileSmtpServer(replies=closing, hang_up_after={verb}) as server, Mailer(SETTINGS) as mailer:
        with pytest.raises(AccountSmtpError) as caught:  # a 421 is the relay's, at any stage (no try spent)
            mailer.send(account_for(server), a_message(cc=(CAROL,)))
    assert caught.value.code == 421 and f"in reply to {stage}" in caught.value.message
    assert caught.value.reason == AccountReason.THROTTLED and caught.value.stage == stage
    assert server.messages == [] and server.aborted == 0


def test_a_421_to_a_recipient_ends_the_mail_there_also_one_command_at_a_time():
    closing = {"RCPT": b"421 4.3.2 service shutting down\r\n"}
    for extensions in (NO_PIPELINING, ("PIPELINING",)):
        with HostileSmtpServer(extensions=extensions, replies=closing, hang_up_after={"RCPT"}) as server:
            with Mailer(SETTINGS) as mailer, pytest.raises(AccountSmtpError) as caught:
                mailer.send(account_for(server), a_message(cc=(CAROL,)))
        assert caught.value.code == 421 and "in reply to RCPT TO" in caught.value.message
        assert server.messages == [] and server.aborted == 0


@pytest.mark.parametrize("verb, stage", [("MAIL", "MAIL FROM"), ("RCPT", "RCPT TO")])
def test_a_connection_dropped_in_the_middle_of_the_group_is_the_accounts_and_sends_nothing(verb, stage):
    with HostileSmtpServer(replies={verb: b""}, hang_up_after={verb}) as server, Mailer(SETTINGS) as mailer:
        with pytest.raises(AccountSmtpError) as caught:  # before DATA: the relay went away, no try spent
            mailer.send(account_for(server), a_message(cc=(CAROL,)))
    assert f"connection lost during {stage}" in caught.value.message
    assert caught.value.reason == AccountReason.UNREACHABLE
    assert server.messages == []


def test_a_pipelined_message_never_answered_hits_the_deadline_and_may_have_been_accepted():
    with SilentServer("DATA") as server, Mailer(SETTINGS) as mailer:
        deadline = time.monotonic() + 1.5
        with pytest.raises(TransientSmtpError, match="may have accepted"):
            mailer.send(account_for(server), a_message(), deadline=deadline)
        assert time.monotonic() < deadline + MARGIN
    assert server.early == ["MAIL", "RCPT"] and len(server.messages) == 1


# --- no round trip of its own for the RSET after a refusal ---


class SlowResetServer(HostileSmtpServer):
    """Answers RSET only after ``delay`` seconds."""

    def __init__(self, delay: float, **kwargs):
        super().__init__(**kwargs)
        self.delay = delay

    def answer(self, sock, reader, verb: str, default: bytes) -> None:
        if verb == "RSET":
            self._stopped.wait(self.delay)
        super().answer(sock, reader, verb, default)


def test_the_rset_after_a_refused_mail_leads_the_next_mails_group_and_costs_no_round_trip():
    refuse = {BOB: b"550 5.1.1 no such user\r\n"}
    with SlowResetServer(1.0, refuse=refuse) as server, Mailer(SETTINGS) as mailer:
        with pytest.raises(PermanentSmtpError):
            mailer.send(account_for(server), a_message(1))
        assert server.count("RSET") == 0  # the idle session says nothing meanwhile
        mailer.send(account_for(server), a_message(2, to=CAROL))
    # The next mail's envelope had arrived with the RSET: nobody waited for its reply.
    assert server.early == ["MAIL", "RCPT", "RSET", "MAIL", "RCPT"]
    assert server.connections == 1 and [b"Mail 2" in m for m in server.messages] == [False, True]


def test_a_refused_rset_means_a_stale_connection_and_the_next_mail_reconnects():
    refuse = {BOB: b"550 5.1.1 no such user\r\n"}
    closing = {"RSET": b"421 4.4.2 idle too long, closing\r\n"}
    with HostileSmtpServer(refuse=refuse, replies=closing, hang_up_after={"RSET"}) as server:
        with Mailer(SETTINGS) as mailer:
            with pytest.raises(PermanentSmtpError):
                mailer.send(account_for(server), a_message(1))
            mailer.send(account_for(server), a_message(2, to=CAROL))
    assert server.connections == 2 and len([m for m in server.messages if b"Mail 2" in m]) == 1


def test_an_idle_pooled_connection_found_closed_is_reconnected_once_on_the_pipelined_path():
    with ScriptedSmtpServer(pipelining=True) as server, Mailer(SETTINGS) as mailer:
        mailer.send(account_for(server), a_message(1))
        server.drop_connections()
        mailer.send(account_for(server), a_message(2))
    assert server.connections == 2 and len(server.received) == 2
