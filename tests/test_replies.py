"""What an SMTP failure means (shared/delivery/failures.py, shared/delivery/replies.py): about this mail,
or about the account's relay. One test per row of the table of known throttling and quota replies,
each with a reply as the provider sends it, at the stage it sends it; then the rules by stage."""

from __future__ import annotations

import smtplib
import socket
import ssl
from datetime import UTC, datetime, timedelta

import pytest

from shared.delivery import replies
from shared.delivery.failures import classify
from shared.delivery.replies import DAY, HOUR, KNOWN_REPLIES
from shared.delivery.smtp import ReplyTooLarge, SmtpAccount
from shared.domain import AccountReason, PauseReason, SmtpSecurity
from shared.errors import (
    AccountPausedError,
    AccountSmtpError,
    HostError,
    PermanentSmtpError,
    SmtpAuthError,
    TransientSmtpError,
)

ACCOUNT = SmtpAccount("relay.example.com", 587, "ada", "s3cret-Pa55", SmtpSecurity.STARTTLS)
THROTTLED, QUOTA = AccountReason.THROTTLED, AccountReason.QUOTA

# (row, code, reply as the provider writes it, the stage it comes at, reason, seconds to wait or None)
EXAMPLES = {
    "ses-rate": (454, "Throttling failure: Maximum sending rate exceeded.", "MAIL FROM", THROTTLED, None),
    "ses-daily-quota": (454, "Throttling failure: Daily message quota exceeded.", "DATA", QUOTA, DAY),
    "m365-sender-thread-limit": (
        432,
        "4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded [Hostname=DM4PR18MB4126]",
        "DATA",
        THROTTLED,
        None,
    ),
    "m365-concurrent-connections": (
        432,
        "4.3.2 Concurrent connections limit exceeded.",
        "MAIL FROM",
        THROTTLED,
        None,
    ),
    "m365-daily-quota": (
        554,
        "5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException; Failed to process message due "
        "to a permanent exception with message Cannot submit message.",
        "DATA",
        QUOTA,
        DAY,
    ),
    "gmail-try-again-later": (
        421,
        "4.7.0 Try again later, closing connection. (EHLO) - gsmtp",
        "EHLO",
        THROTTLED,
        None,
    ),
    "gmail-server-busy": (421, "4.4.5 Server busy, try again later. - gsmtp", "RCPT TO", THROTTLED, None),
    "gmail-peak-relay-limit": (
        450,
        "4.2.1 Peak SMTP relay limit exceeded for customer - gsmtp",
        "RCPT TO",
        THROTTLED,
        None,
    ),
    "gmail-daily-sending-quota": (
        550,
        "5.4.5 Daily user sending quota exceeded. - gsmtp",
        "MAIL FROM",
        QUOTA,
        DAY,
    ),
    "gmail-daily-relay-limit": (
        550,
        "5.4.5 Daily SMTP relay limit exceeded for user - gsmtp",
        "RCPT TO",
        QUOTA,
        DAY,
    ),
    "postfix-too-many-connections": (
        421,
        "mail.example.com Error: too many connections from 203.0.113.5",
        "greeting",
        THROTTLED,
        None,
    ),
    "postfix-message-rate": (
        450,
        "4.7.1 Error: too much mail from 203.0.113.5",
        "MAIL FROM",
        THROTTLED,
        None,
    ),
    "postfix-recipient-rate": (
        450,
        "4.7.1 Error: too many recipients from 203.0.113.5",
        "RCPT TO",
        THROTTLED,
        None,
    ),
    "mailgun-limit": (
        421,
        "Domain mail.example.com is not allowed to send: message limit reached",
        "DATA",
        QUOTA,
        HOUR,
    ),
    "too-many-messages": (550, "Too many messages. Try again in 92 seconds.", "AUTH", THROTTLED, 92.0),
}


def error_for(code: int, text: str, stage: str):
    return classify(smtplib.SMTPResponseException(code, text.encode()), stage, ACCOUNT, lambda: False)


def test_every_row_of_the_table_has_its_example():
    assert sorted(EXAMPLES) == sorted(row.name for row in KNOWN_REPLIES)


@pytest.mark.parametrize("name", [row.name for row in KNOWN_REPLIES])
def test_a_known_throttling_or_quota_reply_is_the_accounts_and_spends_no_try(name):
    code, text, stage, reason, wait = EXAMPLES[name]
    row = replies.known(code, text)
    assert row is not None and row.name == name
    error = error_for(code, text, stage)
    assert isinstance(error, AccountSmtpError) and not isinstance(error, AccountPausedError)
    assert error.reason == reason and error.code == code and error.stage == stage
    assert error.wait == wait  # a quota waits for its window; a throttle backs off as usual
    assert error.shrink is (reason == THROTTLED)  # fewer conversations for a throttle, not for a quota
    assert error.message.startswith(f"{code} ")


def test_the_same_words_with_another_code_are_not_a_match():
    assert replies.known(250, "Maximum sending rate exceeded") is None
    assert replies.known(552, "5.2.2 mailbox full; too many messages in the mailbox") is None  # its mailbox


def test_a_reply_that_says_when_to_come_back_is_believed_up_to_a_day():
    now = datetime(2025, 8, 25, 6, 0, 31, tzinfo=UTC)
    assert (
        replies.asked_wait("recipient limit exceeded, try again after Mon, 25 Aug 2025 07:00:31 UTC", now)
        == 3600
    )
    assert replies.asked_wait("Try again in 5 minutes", now) == 300
    assert replies.asked_wait("try again in 3 days", now) is None
    assert replies.asked_wait("try again in 900 hours", now) == DAY
    later = (now + timedelta(days=9)).strftime("%a, %d %b %Y %H:%M:%S UTC")
    assert replies.asked_wait(f"try again after {later}", now) == DAY


# --- the rules by stage -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "stage", ["greeting", "EHLO", "STARTTLS", "AUTH", "RSET", "MAIL FROM", "RCPT TO", "DATA"]
)
def test_a_421_at_any_stage_is_the_account_throttling(stage):
    error = error_for(421, "4.3.2 Service not available, closing transmission channel", stage)
    assert isinstance(error, AccountSmtpError) and error.reason == THROTTLED and error.shrink


@pytest.mark.parametrize("stage", ["greeting", "EHLO", "STARTTLS", "AUTH"])
def test_a_temporary_failure_while_the_connection_opens_is_the_account_waiting(stage):
    error = error_for(454, "4.7.0 TLS not available due to local problem", stage)
    assert type(error) is AccountSmtpError and error.reason == AccountReason.UNAVAILABLE


@pytest.mark.parametrize("code", [451, 554])
def test_a_refused_reset_ahead_of_the_mail_is_the_accounts_not_the_mails(code):
    """The RSET a refused mail left pending goes ahead of the next mail's MAIL FROM (pipelining): its
    refusal or a connection lost there says nothing about the next mail, which spends no try."""
    error = error_for(code, "4.3.0 Error: internal state", "RSET")
    assert type(error) is AccountSmtpError and error.reason == AccountReason.UNAVAILABLE
    lost = classify(smtplib.SMTPServerDisconnected("gone"), "RSET", ACCOUNT, lambda: False)
    assert isinstance(lost, AccountSmtpError) and lost.reason == AccountReason.UNREACHABLE


def test_refused_credentials_pause_the_account():
    error = error_for(535, "5.7.8 Authentication credentials invalid", "AUTH")
    assert isinstance(error, SmtpAuthError) and error.reason == PauseReason.CREDENTIALS


@pytest.mark.parametrize(
    ("code", "stage", "kind"),
    [
        (451, "MAIL FROM", TransientSmtpError),
        (452, "RCPT TO", TransientSmtpError),
        (451, "DATA", TransientSmtpError),
        (550, "MAIL FROM", PermanentSmtpError),
        (550, "RCPT TO", PermanentSmtpError),
        (554, "DATA", PermanentSmtpError),
    ],
)
def test_a_reply_about_this_mail_is_the_mails(code, stage, kind):
    error = error_for(code, "something about this message", stage)
    assert type(error) is kind and error.code == code


@pytest.mark.parametrize(
    ("exc", "stage"),
    [
        (ConnectionRefusedError(111, "Connection refused"), "connect"),
        (TimeoutError(), "greeting"),
        (ConnectionResetError(104, "Connection reset by peer"), "EHLO"),
        (smtplib.SMTPServerDisconnected("Connection unexpectedly closed"), "MAIL FROM"),
        (smtplib.SMTPServerDisconnected("Connection unexpectedly closed"), "RCPT TO"),
    ],
)
def test_no_connection_before_data_is_the_account_unreachable(exc, stage):
    error = classify(exc, stage, ACCOUNT, lambda: False)
    assert isinstance(error, AccountSmtpError) and error.reason == AccountReason.UNREACHABLE
    assert error.shrink is isinstance(exc, ConnectionRefusedError)  # a refused connection halves it


@pytest.mark.parametrize(
    "exc", [smtplib.SMTPServerDisconnected("gone"), TimeoutError(), OSError(32, "Broken pipe")]
)
def test_the_connection_lost_after_data_began_is_the_mails(exc):
    error = classify(exc, "DATA", ACCOUNT, lambda: False)
    assert type(error) is TransientSmtpError and "may have accepted" in error.message


def test_the_deadline_before_data_is_the_accounts_and_during_data_the_mails():
    assert isinstance(classify(TimeoutError(), "AUTH", ACCOUNT, lambda: True), AccountSmtpError)
    assert type(classify(TimeoutError(), "DATA", ACCOUNT, lambda: True)) is TransientSmtpError


def test_what_cannot_work_as_configured_pauses_the_account():
    certificate = ssl.SSLCertVerificationError("certificate verify failed")
    certificate.verify_message = "self-signed certificate"
    mismatch = ssl.SSLError()
    mismatch.reason = "WRONG_VERSION_NUMBER"
    for exc, stage in (
        (certificate, "STARTTLS"),
        (mismatch, "connect"),
        (smtplib.SMTPException("the server offers no AUTH mechanism we use"), "AUTH"),
        (HostError("SMTP host resolves to 10.0.0.1, a private address; refused", refused=True), "resolve"),
        (PermanentSmtpError("server does not offer STARTTLS; refusing to send in plaintext"), "EHLO"),
    ):
        error = classify(exc, stage, ACCOUNT, lambda: False)
        assert isinstance(error, AccountPausedError) and error.reason == PauseReason.CONFIGURATION, exc


def test_a_name_that_does_not_resolve_is_the_account_unreachable():
    error = classify(HostError("cannot be resolved", transient=False), "resolve", ACCOUNT, lambda: False)
    assert type(error) is AccountSmtpError and error.reason == AccountReason.UNREACHABLE


def test_a_flood_before_data_is_the_accounts_and_during_data_the_mails():
    assert isinstance(classify(ReplyTooLarge("x"), "EHLO", ACCOUNT, lambda: False), AccountSmtpError)
    assert type(classify(ReplyTooLarge("x"), "DATA", ACCOUNT, lambda: False)) is TransientSmtpError


def test_the_password_never_shows_in_an_accounts_error():
    error = error_for(550, f"Too many messages from {ACCOUNT.password}. Try again in 9 seconds.", "AUTH")
    assert ACCOUNT.password not in error.message and isinstance(error, AccountSmtpError)


def test_a_refused_connection_to_a_real_socket_is_the_account_unreachable():
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1)
        except OSError as exc:
            error = classify(exc, "connect", ACCOUNT, lambda: False)
    assert isinstance(error, AccountSmtpError) and error.shrink
