"""The mailer against real SMTP servers (aiosmtpd): TLS, AUTH, reply classification, connection reuse."""

from __future__ import annotations

import logging
import re
import socket
import ssl
import threading
import time
import traceback
from datetime import UTC, datetime
from email.headerregistry import HeaderRegistry

import pytest

from shared.config import Settings
from shared.domain import SmtpSecurity
from shared.errors import PermanentSmtpError, TransientSmtpError
from shared.mailer import (
    Mailer,
    SmtpAccount,
    build_message,
    check_host_allowed,
    host_refusal_reason,
    message_id_for,
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
            PermanentSmtpError, match="does not offer STARTTLS; refusing to send in plaintext"
        ):
            mailer.send(account_for(server, SmtpSecurity.STARTTLS), a_message())
    assert server.data_attempts == 0 and server.received == []


def test_a_self_signed_certificate_is_refused_by_the_default_context(tmp_path, mailer):
    with ScriptedSmtpServer(tls_context=make_self_signed_context(tmp_path)) as server:
        with pytest.raises(PermanentSmtpError, match="certificate verification failed") as caught:
            mailer.send(account_for(server, SmtpSecurity.STARTTLS, host="localhost"), a_message())
    assert "certificate" in caught.value.message
    assert server.received == []


def test_a_certificate_for_another_host_is_refused(ca, trusting):
    context = ca.server_context(names=("mail.example.net",))
    with (
        ScriptedSmtpServer(tls_context=context) as server,
        Mailer(SETTINGS, ssl_context_factory=trusting) as m,
    ):
        with pytest.raises(PermanentSmtpError, match="certificate verification failed"):
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
        with pytest.raises(PermanentSmtpError, match="plaintext"):
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
        with pytest.raises(PermanentSmtpError) as caught:
            mailer.send(account, a_message())
    error = caught.value
    assert error.code == 535 and "535" in error.message
    assert server.received == []
    assert PASSWORD not in "".join(traceback.format_exception(error))
    assert PASSWORD not in caplog.text
    assert PASSWORD not in repr(account)


def test_a_username_for_a_server_without_auth_is_permanent(server, mailer):
    with pytest.raises(PermanentSmtpError, match="does not offer AUTH"):
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


def test_a_refused_message_leaves_the_connection_usable(mailer):
    with ScriptedSmtpServer(["451 4.3.0 try later"]) as server:
        with pytest.raises(TransientSmtpError):
            mailer.send(account_for(server), a_message())
        mailer.send(account_for(server), a_message())
    assert server.connections == 1 and len(server.messages) == 1


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


def test_a_server_that_never_greets_times_out_as_transient():
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)  # the kernel completes the handshake; nobody ever says 220
        host, port = silent.getsockname()
        with Mailer(SETTINGS.replace(smtp_timeout=0.3)) as mailer:
            started = time.monotonic()
            with pytest.raises(TransientSmtpError, match="timed out"):
                mailer.send(SmtpAccount(host, port, "", "", SmtpSecurity.NONE), a_message())
    assert time.monotonic() - started < 3


def test_a_refused_connection_is_transient(mailer):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound but not listening: the connection is refused
        with pytest.raises(TransientSmtpError, match="during connect"):
            mailer.send(SmtpAccount("127.0.0.1", port, "", "", SmtpSecurity.NONE), a_message())


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


def test_a_pooled_connection_closed_by_the_server_is_reconnected_once(server, mailer, caplog):
    caplog.set_level(logging.DEBUG, logger="shared.mailer")
    mailer.send(account_for(server), a_message(task_id=1))
    server.drop_connections()

    mailer.send(account_for(server), a_message(task_id=2))

    assert server.connections == 2 and len(server.messages) == 2
    assert "was closed; reconnecting" in caplog.text


def test_implicit_tls_against_a_plaintext_port_is_permanent(server, trusting):
    with Mailer(SETTINGS, ssl_context_factory=trusting) as mailer:
        with pytest.raises(PermanentSmtpError, match="WRONG_VERSION_NUMBER"):
            mailer.send(account_for(server, SmtpSecurity.TLS), a_message())
    assert server.received == []


def test_accounts_with_different_passwords_never_share_a_connection(mailer):
    with ScriptedSmtpServer(auth=lambda u, p: p == PASSWORD) as server:
        mailer.send(account_for(server, SmtpSecurity.NONE, "alice", PASSWORD), a_message())
        with pytest.raises(PermanentSmtpError, match="535"):
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
        with pytest.raises(PermanentSmtpError, match="loopback"):
            mailer.send(account_for(server), a_message())
    assert server.connections == 0


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
