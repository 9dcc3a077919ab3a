"""The mailer against real SMTP servers (aiosmtpd, and the raw hostile servers of tests/hostile_smtp.py):
TLS, AUTH, reply classification, connection reuse, and what a hostile server cannot do to a sender."""

from __future__ import annotations

import logging
import re
import socket
import ssl
import threading
import time
import traceback
import tracemalloc
from datetime import UTC, datetime
from email.headerregistry import HeaderRegistry

import pytest

from shared.config import Settings
from shared.delivery.mailer import Mailer
from shared.delivery.message import build_message, message_id_for
from shared.delivery.smtp import SmtpAccount
from shared.domain import AccountReason, PauseReason, SmtpSecurity
from shared.errors import (
    AccountPausedError,
    AccountSmtpError,
    ConfigError,
    PermanentSmtpError,
    SmtpAuthError,
    TransientSmtpError,
)
from shared.hosts import check_host_allowed, host_refusal_reason
from tests.hostile_smtp import (
    FloodingServer,
    HostileSmtpServer,
    SilentServer,
    SlowGoodbyeServer,
    TricklingServer,
)
from tests.smtp_servers import DROP, ScriptedSmtpServer, make_ca, make_self_signed_context

PASSWORD = "s3cret-Pa55word-xyzzy"
SETTINGS = Settings(smtp_timeout=5.0, smtp_allow_private_hosts=True, smtp_allow_insecure=True)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    return make_ca(tmp_path_factory.mktemp("ca"))


@pytest.fixture
def trusting(ca):
    """An ssl_context_factory that trusts the test CA (and nothing else)."""
    return lambda: ssl.create_default_context(cafile=str(ca.ca_path))


@pytest.fixture
def server():
    with ScriptedSmtpServer() as smtp_server:
        yield smtp_server


@pytest.fixture
def mailer():
    with Mailer(SETTINGS) as shared_mailer:
        yield shared_mailer


def account_for(server, security=SmtpSecurity.NONE, username="", password="", host=None) -> SmtpAccount:
    return SmtpAccount(host or server.host, server.port, username, password, security)


def a_message(task_id: int = 1, subject: str = "Hello", body: str = "Hi there.\n"):
    sender = "alice@example.com"
    return build_message(
        sender=sender,
        recipient="bob@example.org",
        subject=subject,
        body=body,
        message_id=message_id_for(task_id, sender),
        date=datetime(2024, 5, 17, 9, 30, tzinfo=UTC),
    )


def wait_until(condition, timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


# --- what arrives ---


def test_a_mail_arrives_with_its_headers_and_body(server, mailer):
    acceptance = mailer.send(account_for(server), a_message(task_id=7))

    assert acceptance.startswith("250")
    [received] = server.received
    assert received.mail_from == "alice@example.com"
    assert received.rcpt_tos == ["bob@example.org"]
    message = received.message
    assert message["From"] == "alice@example.com"
    assert message["To"] == "bob@example.org"
    assert message["Subject"] == "Hello"
    assert message["Date"] == "Fri, 17 May 2024 09:30:00 +0000"
    assert message["Message-ID"] == message_id_for(7, "alice@example.com")
    assert message.get_content_type() == "text/plain"
    assert message.get_content().replace("\r\n", "\n") == "Hi there.\n"  # CRLF on the wire


def test_non_ascii_subject_and_body_arrive_intact(server, mailer):
    mailer.send(account_for(server), a_message(subject="Grüße aus Köln ✓", body="Schöne Grüße!\n"))

    [message] = server.messages
    assert message["Subject"] == "Grüße aus Köln ✓"
    assert message.get_content().replace("\r\n", "\n") == "Schöne Grüße!\n"
    assert server.received[0].raw.isascii()  # encoded for servers without 8BITMIME


def test_the_acceptance_quotes_the_server_reply(mailer):
    with ScriptedSmtpServer(["250 2.0.0 OK queued as ABC123"]) as server:
        assert mailer.send(account_for(server), a_message()) == "250 2.0.0 OK queued as ABC123"


# --- TLS ---


def test_starttls_with_a_certificate_from_a_trusted_ca_delivers(ca, trusting):
    with (
        ScriptedSmtpServer(tls_context=ca.server_context()) as server,
        Mailer(SETTINGS, ssl_context_factory=trusting) as mailer,
    ):
        mailer.send(account_for(server, SmtpSecurity.STARTTLS, host="localhost"), a_message())
        assert len(server.messages) == 1


def test_starttls_is_required_and_never_falls_back_to_plaintext(server, trusting):
    with Mailer(SETTINGS, ssl_context_factory=trusting) as mailer:
        with pytest.raises(
            AccountPausedError, match="does not offer STARTTLS; refusing to send in plaintext"
        ) as caught:
            mailer.send(account_for(server, SmtpSecurity.STARTTLS), a_message())
    assert caught.value.reason == PauseReason.CONFIGURATION  # the account's settings, not the mail
    assert server.data_attempts == 0 and server.received == []


def test_a_self_signed_certificate_is_refused_by_the_default_context(tmp_path, mailer):
    with ScriptedSmtpServer(tls_context=make_self_signed_context(tmp_path)) as server:
        with pytest.raises(AccountPausedError, match="certificate verification failed") as caught:
            mailer.send(account_for(server, SmtpSecurity.STARTTLS, host="localhost"), a_message())
    assert "certificate" in caught.value.message and caught.value.reason == PauseReason.CONFIGURATION
    assert server.received == []


def test_a_certificate_for_another_host_is_refused(ca, trusting):
    context = ca.server_context(names=("mail.example.net",))
    with (
        ScriptedSmtpServer(tls_context=context) as server,
        Mailer(SETTINGS, ssl_context_factory=trusting) as m,
    ):
        with pytest.raises(AccountPausedError, match="certificate verification failed"):
            m.send(account_for(server, SmtpSecurity.STARTTLS, host="localhost"), a_message())
    assert server.received == []


def test_implicit_tls_delivers_with_a_certificate_from_a_trusted_ca(ca, trusting):
    with (
        ScriptedSmtpServer(tls_context=ca.server_context(), implicit_tls=True) as server,
        Mailer(SETTINGS, ssl_context_factory=trusting) as mailer,
    ):
        mailer.send(account_for(server, SmtpSecurity.TLS, host="127.0.0.1"), a_message())
        mailer.send(account_for(server, SmtpSecurity.TLS, host="127.0.0.1"), a_message(task_id=2))
    assert len(server.messages) == 2 and server.connections == 1


def test_plaintext_is_refused_when_the_deployment_does_not_allow_it(server):
    with Mailer(SETTINGS.replace(smtp_allow_insecure=False)) as mailer:
        with pytest.raises(AccountPausedError, match="plaintext"):
            mailer.send(account_for(server, SmtpSecurity.NONE), a_message())
    assert server.connections == 0


# --- AUTH ---


def test_a_login_over_starttls_is_accepted_and_delivers(ca, trusting):
    with ScriptedSmtpServer(tls_context=ca.server_context(), auth=lambda u, p: p == PASSWORD) as server:
        with Mailer(SETTINGS, ssl_context_factory=trusting) as mailer:
            mailer.send(
                account_for(server, SmtpSecurity.STARTTLS, "alice", PASSWORD, "localhost"), a_message()
            )
    assert server.logins == [("alice", True)] and len(server.messages) == 1


def test_rejected_credentials_are_permanent_and_the_password_never_shows(caplog, mailer):
    caplog.set_level(logging.DEBUG)
    with ScriptedSmtpServer(auth=lambda u, p: False) as server:
        account = account_for(server, SmtpSecurity.NONE, "alice", PASSWORD)
        with pytest.raises(SmtpAuthError) as caught:
            mailer.send(account, a_message())
    error = caught.value
    assert error.code == 535 and "535" in error.message and error.reason == PauseReason.CREDENTIALS
    assert server.received == []
    assert PASSWORD not in "".join(traceback.format_exception(error))
    assert PASSWORD not in caplog.text
    assert PASSWORD not in repr(account)


def test_a_wrong_password_costs_exactly_one_auth_attempt(mailer):
    # smtplib's login() would try every mechanism offered in turn: three refused logins per mail.
    with HostileSmtpServer(password=PASSWORD, auth="CRAM-MD5 PLAIN LOGIN") as server:
        with pytest.raises(SmtpAuthError) as caught:
            mailer.send(account_for(server, SmtpSecurity.NONE, "alice", "wrong"), a_message())
    assert server.auth_attempts == 1 and server.count("MAIL") == 0
    assert caught.value.code == 535 and caught.value.message.startswith("535 ")


def test_login_is_used_when_plain_is_not_offered(mailer):
    with HostileSmtpServer(password=PASSWORD, auth="LOGIN") as server:
        mailer.send(account_for(server, SmtpSecurity.NONE, "alice", PASSWORD), a_message())
    assert server.auth_attempts == 1 and "AUTH LOGIN" in server.commands and len(server.messages) == 1


def test_a_temporary_auth_failure_is_the_accounts_to_wait_out_and_tried_once(mailer):
    refusal = b"454 4.7.0 Temporary authentication failure\r\n"
    with HostileSmtpServer(password=PASSWORD, replies={"AUTH": refusal}) as server:
        with pytest.raises(AccountSmtpError, match="454") as caught:
            mailer.send(account_for(server, SmtpSecurity.NONE, "alice", PASSWORD), a_message())
    assert server.auth_attempts == 1
    assert caught.value.reason == AccountReason.UNAVAILABLE and not isinstance(
        caught.value, AccountPausedError
    )


def test_a_server_offering_only_cram_md5_is_refused_without_trying(mailer):
    with HostileSmtpServer(password=PASSWORD, auth="CRAM-MD5") as server:
        with pytest.raises(AccountPausedError, match="PLAIN or LOGIN"):
            mailer.send(account_for(server, SmtpSecurity.NONE, "alice", PASSWORD), a_message())
    assert server.auth_attempts == 0


@pytest.mark.parametrize("echo", [PASSWORD, "AGFsaWNlAHMzY3JldC1QYTU1d29yZC14eXp6eQ=="])
def test_a_server_echoing_the_password_in_its_refusal_does_not_get_it_into_the_error(mailer, echo):
    # The second form is base64("\0alice\0" + PASSWORD), the AUTH PLAIN line a server might quote back.
    refusal = f"535 5.7.8 bad credentials {echo}\r\n".encode()
    with HostileSmtpServer(password=PASSWORD, replies={"AUTH": refusal}) as server:
        with pytest.raises(SmtpAuthError) as caught:
            mailer.send(account_for(server, SmtpSecurity.NONE, "alice", PASSWORD), a_message())
    assert echo not in caught.value.message and "***" in caught.value.message


def test_a_username_for_a_server_without_auth_pauses_the_account(server, mailer):
    with pytest.raises(AccountPausedError, match="does not offer AUTH"):
        mailer.send(account_for(server, SmtpSecurity.NONE, "alice", PASSWORD), a_message())
    assert server.data_attempts == 0


# --- classifying failures ---


def test_a_4xx_reply_is_transient_and_carries_code_and_text(mailer):
    with ScriptedSmtpServer(["451 4.3.0 try later"]) as server:
        with pytest.raises(TransientSmtpError) as caught:
            mailer.send(account_for(server), a_message())
    assert caught.value.code == 451
    assert "451 4.3.0 try later" in caught.value.message


def test_a_5xx_reply_is_permanent(mailer):
    with ScriptedSmtpServer(["550 5.1.1 no such user"]) as server:
        with pytest.raises(PermanentSmtpError) as caught:
            mailer.send(account_for(server), a_message())
    assert caught.value.code == 550
    assert "550 5.1.1 no such user" in caught.value.message


def test_a_permanently_refused_message_leaves_the_connection_usable(mailer):
    with ScriptedSmtpServer(["550 5.7.1 content rejected"]) as server:
        with pytest.raises(PermanentSmtpError):
            mailer.send(account_for(server), a_message())
        mailer.send(account_for(server), a_message())
    assert server.connections == 1 and len(server.messages) == 1


def test_after_a_transient_refusal_the_retry_uses_a_fresh_connection(mailer):
    with ScriptedSmtpServer(["451 4.3.0 try later"]) as server:
        with pytest.raises(TransientSmtpError):
            mailer.send(account_for(server), a_message())
        mailer.send(account_for(server), a_message())
        assert server.connections == 2 and len(server.messages) == 1
        assert wait_until(lambda: server.open_connections == 1)  # the one that refused was closed


def test_a_server_that_hangs_up_is_transient_and_is_not_retried(mailer):
    with ScriptedSmtpServer([DROP]) as server:
        with pytest.raises(TransientSmtpError, match="connection lost during DATA"):
            mailer.send(account_for(server), a_message())
    assert server.data_attempts == 1


def test_a_lost_final_reply_on_a_reused_connection_is_not_retried(mailer):
    with ScriptedSmtpServer(["250 OK", DROP]) as server:
        mailer.send(account_for(server), a_message(task_id=1))
        with pytest.raises(TransientSmtpError, match="may have accepted"):
            mailer.send(account_for(server), a_message(task_id=2))
    assert server.data_attempts == 2 and server.connections == 1


def test_a_server_that_never_greets_times_out_waiting_for_the_greeting():
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)  # the kernel completes the handshake; nobody ever says 220
        host, port = silent.getsockname()
        with Mailer(SETTINGS.replace(smtp_timeout=0.3)) as mailer:
            with pytest.raises(AccountSmtpError) as caught:
                mailer.send(SmtpAccount(host, port, "", "", SmtpSecurity.NONE), a_message())
    assert "timed out waiting for the greeting" in caught.value.message
    assert caught.value.reason == AccountReason.UNREACHABLE
    assert "connection lost" not in caught.value.message


@pytest.mark.parametrize("reply", ["550 5.1.1 no such user", "451 4.3.0 try later"])
def test_a_refusal_names_its_reply_code_once_at_the_start(mailer, reply):
    with ScriptedSmtpServer([reply]) as server:
        with pytest.raises((PermanentSmtpError, TransientSmtpError)) as caught:
            mailer.send(account_for(server), a_message())
    code = reply[:3]
    message = caught.value.message
    assert message.startswith(reply) and caught.value.code == int(code)
    assert re.findall(rf"\b{code}\b", message) == [code]  # last_error must not read "550 ... 550 ..."


def test_a_refused_connection_is_the_account_backing_off_with_fewer_conversations(mailer):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound but not listening: the connection is refused
        with pytest.raises(AccountSmtpError, match="during connect") as caught:
            mailer.send(SmtpAccount("127.0.0.1", port, "", "", SmtpSecurity.NONE), a_message())
    assert caught.value.reason == AccountReason.UNREACHABLE and caught.value.shrink


# --- connection reuse ---


def test_five_sends_to_one_account_use_one_connection(server, mailer):
    for task_id in range(5):
        mailer.send(account_for(server), a_message(task_id=task_id))
    assert server.connections == 1 and len(server.messages) == 5


def test_an_idle_connection_is_closed_and_the_next_send_opens_a_new_one(server):
    clock = FakeClock()
    with Mailer(SETTINGS.replace(smtp_idle_seconds=30), clock=clock) as mailer:
        mailer.send(account_for(server), a_message(task_id=1))
        clock.advance(31)
        mailer.send(account_for(server), a_message(task_id=2))
        assert server.connections == 2
        assert wait_until(lambda: server.open_connections == 1)


def test_close_idle_closes_only_connections_idle_too_long(server):
    clock = FakeClock()
    with Mailer(SETTINGS.replace(smtp_idle_seconds=30), clock=clock) as mailer:
        mailer.send(account_for(server), a_message())
        clock.advance(20)
        assert mailer.close_idle() == 0
        clock.advance(20)
        assert mailer.close_idle() == 1
        assert wait_until(lambda: server.open_connections == 0)


def test_a_pooled_connection_closed_by_the_server_is_found_before_it_is_used(server, mailer, caplog):
    """The sender asks for the account's connection before it claims a mail: one the relay closed is
    found then (without a round trip), not after the claim at MAIL FROM."""
    caplog.set_level(logging.DEBUG, logger="shared.delivery.mailer")
    mailer.send(account_for(server), a_message(task_id=1))
    server.drop_connections()
    assert wait_until(lambda: server.open_connections == 0)

    assert mailer.pooled(account_for(server)) is None
    mailer.send(account_for(server), a_message(task_id=2))

    assert server.connections == 2 and len(server.messages) == 2
    assert "was closed; reconnecting" not in caplog.text


def test_a_pooled_connection_closed_unseen_is_reconnected_once(server, mailer, caplog, monkeypatch):
    """A close the check cannot see yet (its FIN still on the way) fails the first command instead:
    nothing was accepted, so the mail goes over a new connection, once."""
    caplog.set_level(logging.DEBUG, logger="shared.delivery.mailer")
    mailer.send(account_for(server), a_message(task_id=1))
    server.drop_connections()
    assert wait_until(lambda: server.open_connections == 0)
    monkeypatch.setattr("shared.delivery.pool.still_open", lambda smtp: True)

    mailer.send(account_for(server), a_message(task_id=2))

    assert server.connections == 2 and len(server.messages) == 2
    assert "was closed; reconnecting" in caplog.text


def test_implicit_tls_against_a_plaintext_port_pauses_the_account(server, trusting):
    with Mailer(SETTINGS, ssl_context_factory=trusting) as mailer:
        with pytest.raises(AccountPausedError, match="WRONG_VERSION_NUMBER"):
            mailer.send(account_for(server, SmtpSecurity.TLS), a_message())
    assert server.received == []


def test_accounts_with_different_passwords_never_share_a_connection(mailer):
    with ScriptedSmtpServer(auth=lambda u, p: p == PASSWORD) as server:
        mailer.send(account_for(server, SmtpSecurity.NONE, "alice", PASSWORD), a_message())
        with pytest.raises(SmtpAuthError, match="535"):
            mailer.send(account_for(server, SmtpSecurity.NONE, "alice", "guessed"), a_message())
    assert len(server.messages) == 1


def test_threads_can_share_one_mailer(server, mailer):
    errors: list[BaseException] = []

    def send_some(first: int) -> None:
        try:
            for task_id in range(first, first + 5):
                mailer.send(account_for(server), a_message(task_id=task_id))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=send_some, args=(n * 100,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(server.messages) == 20 and server.connections <= 4


def test_a_private_host_is_refused_before_connecting(server):
    with Mailer(SETTINGS.replace(smtp_allow_private_hosts=False)) as mailer:
        with pytest.raises(AccountPausedError, match="loopback"):
            mailer.send(account_for(server), a_message())
    assert server.connections == 0


@pytest.mark.parametrize("limit", ["age", "messages"])
def test_a_pooled_connection_is_retired_at_its_maximum_age_or_message_count(server, limit):
    clock = FakeClock()
    settings = SETTINGS.replace(
        smtp_idle_seconds=1000, smtp_connection_max_age=60, smtp_connection_max_messages=3
    )
    with Mailer(settings, clock=clock) as mailer:
        for task_id in range(3 if limit == "messages" else 2):
            mailer.send(account_for(server), a_message(task_id=task_id))
            clock.advance(35 if limit == "age" else 1)
        assert server.connections == 1
        mailer.send(account_for(server), a_message(task_id=9))  # 70 s old, or its 4th mail
        assert server.connections == 2
        assert wait_until(lambda: server.open_connections == 1)


def test_the_pool_limits_are_settings_with_defaults_and_validation():
    settings = Settings.from_env({})
    assert (settings.smtp_connection_max_age, settings.smtp_connection_max_messages) == (300, 100)
    # SMTP_TIMEOUT=0 would make every socket non-blocking rather than patient.
    for bad in (
        {"SMTP_CONNECTION_MAX_AGE": "0"},
        {"SMTP_CONNECTION_MAX_MESSAGES": "0"},
        {"SMTP_TIMEOUT": "0"},
    ):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            Settings.from_env(bad)


# --- hostile servers: deadlines, caps, no waiting on a goodbye ---

MARGIN = 1.0  # seconds past the deadline a send may take to unwind on a loaded machine


def hostile_account(server, security=SmtpSecurity.NONE, host=None) -> SmtpAccount:
    return SmtpAccount(host or server.host, server.port, "", "", security)


# The hostile servers offer PIPELINING unless given these extensions: each misbehaviour that can meet the
# mail's own commands is tried on the pipelined path and on the one-command-at-a-time path.
ONE_AT_A_TIME = {"extensions": ("8BITMIME",)}
PATHS = pytest.mark.parametrize("path", [{}, ONE_AT_A_TIME], ids=["pipelined", "one-at-a-time"])


@PATHS
@pytest.mark.parametrize("trickled", ["banner", "replies"])
def test_a_server_trickling_one_byte_at_a_time_cannot_outlast_the_deadline(trickled, path):
    # Every byte comes well within SMTP_TIMEOUT, so only a deadline on the whole conversation stops it.
    with (
        TricklingServer(0.2, banner=trickled == "banner", replies=trickled == "replies", **path) as server,
        Mailer(SETTINGS.replace(smtp_timeout=1)) as mailer,
    ):
        deadline = time.monotonic() + 1.5
        # It never gets to a mail: the deadline passes while the connection opens, the account's time.
        with pytest.raises(AccountSmtpError, match="deadline"):
            mailer.send(hostile_account(server), a_message(), deadline=deadline)
        assert time.monotonic() < deadline + MARGIN
        assert wait_until(lambda: server.open_connections == 0)


def test_the_deadline_also_cuts_a_trickling_tls_server_short(ca, trusting):
    with (
        TricklingServer(0.2, tls_context=ca.server_context()) as server,
        Mailer(SETTINGS.replace(smtp_timeout=1), ssl_context_factory=trusting) as mailer,
    ):
        deadline = time.monotonic() + 1.5
        with pytest.raises(AccountSmtpError, match="deadline"):
            mailer.send(
                hostile_account(server, SmtpSecurity.TLS, "localhost"), a_message(), deadline=deadline
            )
        assert time.monotonic() < deadline + MARGIN


@PATHS
def test_a_server_that_never_answers_data_hits_the_deadline_and_may_have_accepted(mailer, path):
    # SMTP_TIMEOUT is 5 s here: the wait for the final reply must be cut to the time left.
    with SilentServer("DATA", **path) as server:
        deadline = time.monotonic() + 1.5
        with pytest.raises(TransientSmtpError) as caught:
            mailer.send(hostile_account(server), a_message(), deadline=deadline)
        assert time.monotonic() < deadline + MARGIN
    assert "deadline" in caught.value.message and "may have accepted" in caught.value.message
    assert len(server.messages) == 1


def test_without_a_deadline_a_send_gets_four_fifths_of_the_lease():
    with (
        TricklingServer(0.2) as server,
        Mailer(SETTINGS.replace(smtp_timeout=1, lease_seconds=2)) as mailer,
    ):
        started = time.monotonic()
        with pytest.raises(AccountSmtpError, match="deadline"):
            mailer.send(hostile_account(server), a_message())
        assert time.monotonic() < started + 0.8 * 2 + MARGIN


def test_a_deadline_already_passed_fails_at_once_and_spares_the_pooled_connection(server, mailer):
    mailer.send(account_for(server), a_message(task_id=1))
    with pytest.raises(TransientSmtpError, match="deadline passed before the send began"):
        mailer.send(account_for(server), a_message(task_id=2), deadline=time.monotonic())
    mailer.send(account_for(server), a_message(task_id=3))
    assert server.connections == 1 and len(server.messages) == 2


@pytest.mark.parametrize("width, lines", [(80, 50_000), (8000, 600)])
@pytest.mark.parametrize("verb, stage", [("EHLO", "EHLO"), ("MAIL", "MAIL FROM"), ("RCPT", "RCPT TO")])
@PATHS
def test_an_endless_multi_line_reply_fails_fast_and_memory_stays_bounded(width, lines, verb, stage, path):
    # 4 MB or more stand for "endless": smtplib alone would keep every line before answering.
    with FloodingServer(verb, lines=lines, width=width, **path) as server, Mailer(SETTINGS) as mailer:
        tracemalloc.start()
        try:
            # before DATA the flood is the account's relay misbehaving (shared.delivery.failures): no try
            with pytest.raises(AccountSmtpError, match=f"reply to {stage} exceeded"):
                mailer.send(hostile_account(server), a_message())
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert peak < 1_000_000
    assert server.count("MAIL") == (0 if verb == "EHLO" else 1) and server.messages == []


@pytest.mark.parametrize("closing", ["close_idle", "close"])
def test_closing_idle_connections_never_waits_for_the_servers_goodbye(closing):
    clock = FakeClock()
    with SlowGoodbyeServer(0.2) as server, Mailer(SETTINGS, clock=clock) as mailer:
        mailer.send(hostile_account(server), a_message())
        clock.advance(SETTINGS.smtp_idle_seconds + 1)
        started = time.monotonic()
        getattr(mailer, closing)()
        assert time.monotonic() - started < 0.5
        assert wait_until(lambda: server.quits == 1)  # QUIT was still said, just not waited on


# --- SIZE ---


def test_a_message_over_the_advertised_size_is_refused_before_uploading(mailer):
    with HostileSmtpServer(extensions=["SIZE 1000"]) as server:
        with pytest.raises(PermanentSmtpError, match="exceeds the server's limit of 1000 bytes"):
            mailer.send(hostile_account(server), a_message(body="x" * 2000))
        mailer.send(hostile_account(server), a_message())  # the connection is still good
    assert server.count("MAIL") == 1 and server.count("DATA") == 1 and server.connections == 1


def test_mail_from_declares_the_size_when_the_server_advertises_size(mailer):
    with HostileSmtpServer(extensions=["SIZE 100000"]) as server:
        mailer.send(hostile_account(server), a_message())
    [mail] = [line for line in server.commands if line.upper().startswith("MAIL")]
    declared = int(re.search(r" SIZE=(\d+)", mail).group(1))
    assert declared == len(server.messages[0])  # no dots to stuff in this message


# --- host checks ---


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "10.0.0.1",
        "192.168.1.5",
        "169.254.169.254",
        "::1",
        "::ffff:127.0.0.1",
        "100.100.100.200",
        "0.0.0.0",
        "224.0.0.1",
        "fd00:ec2::254",
        "localhost",
    ],
)
def test_private_and_special_addresses_are_refused_unless_allowed(host):
    with pytest.raises(PermanentSmtpError, match="refused"):
        check_host_allowed(host, 587, allow_private=False)
    assert host_refusal_reason(host, 587, allow_private=False)
    check_host_allowed(host, 587, allow_private=True)
    assert host_refusal_reason(host, 587, allow_private=True) is None


def test_the_metadata_address_is_named_in_the_refusal():
    assert "metadata" in host_refusal_reason("169.254.169.254", 25, allow_private=False)


def test_a_public_address_is_allowed():
    check_host_allowed("93.184.216.34", 587, allow_private=False)
    assert host_refusal_reason("2606:2800:220:1:248:1893:25c8:1946", 465, allow_private=False) is None


def test_an_impossible_port_is_refused():
    assert "port" in host_refusal_reason("93.184.216.34", 70000, allow_private=False)


# --- building messages ---


@pytest.mark.parametrize(
    "field, value",
    [("subject", "Hi\r\nBcc: eve@example.com"), ("subject", "Hi\nthere"), ("recipient", "bob@example.org\0")],
)
def test_build_message_rejects_line_breaks_and_nul_in_headers(field, value):
    fields = dict(
        sender="alice@example.com",
        recipient="bob@example.org",
        subject="Hi",
        body="x",
        message_id=message_id_for(1, "alice@example.com"),
        date=datetime.now(UTC),
    )
    fields[field] = value
    with pytest.raises(ValueError, match="CR, LF or NUL"):
        build_message(**fields)


def test_message_id_is_stable_per_task_and_differs_between_tasks():
    first = message_id_for(42, "alice@example.com")
    assert first == message_id_for(42, "alice@example.com")
    assert first != message_id_for(43, "alice@example.com")
    assert re.fullmatch(r"<mailq\.42\.[0-9a-f]+@example\.com>", first)
    header = HeaderRegistry()("Message-ID", first)
    assert header.defects == () and str(header) == first


def test_message_id_falls_back_to_a_safe_domain():
    assert message_id_for(1, "broken-address").endswith("@mailq.invalid>")
    assert message_id_for(1, "jürgen@bücher.example").endswith("@xn--bcher-kva.example>")
