"""The relays' replies that say "slow down" or "over your quota": about the account, never the mail.

A reply to MAIL FROM, RCPT TO or DATA is usually about the mail, and a 4xx there spends one of its
tries. These replies are the exception: the relay refuses the *account* for a while (its sending rate,
its concurrent sessions, its daily quota), whatever the mail, so the mail spends nothing and the
account waits (shared.delivery.failures turns a match into an AccountSmtpError). Each row is a reply
seen from a real relay, with where it is documented; tests/test_replies.py has one test per row.

A ``quota`` row waits for its window (a day for a daily quota) instead of the growing backoff: trying
again every few minutes would only be refused again, and cancelling would lose the account's queue. A
reply that says when to come back ("try again in 92 seconds", "try again after <date>") is believed,
up to a day.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

from shared.domain import AccountReason

DAY = 86400.0
HOUR = 3600.0


@dataclass(frozen=True)
class KnownReply:
    name: str  # for tests and logs
    codes: tuple[int, ...]  # the reply codes it comes with
    pattern: re.Pattern[str]  # searched in the reply text (case-insensitive)
    reason: AccountReason  # THROTTLED or QUOTA
    wait: float | None = None  # seconds until the quota's window has passed; None: back off as usual


def _row(name: str, codes: tuple[int, ...], pattern: str, reason: AccountReason, wait=None) -> KnownReply:
    return KnownReply(name, codes, re.compile(pattern, re.IGNORECASE), reason, wait)


THROTTLED, QUOTA = AccountReason.THROTTLED, AccountReason.QUOTA

KNOWN_REPLIES: tuple[KnownReply, ...] = (
    # Amazon SES, "Errors related to the sending quotas for your Amazon SES account"
    # (docs.aws.amazon.com/ses/latest/dg/manage-sending-quotas-errors.html): over the per-second rate,
    #   454 Throttling failure: Maximum sending rate exceeded
    # and over the 24-hour quota (a rolling window: AWS says to wait and retry),
    #   454 Throttling failure: Daily message quota exceeded
    _row("ses-rate", (454,), r"maximum sending rate exceeded", THROTTLED),
    _row("ses-daily-quota", (454,), r"daily message quota exceeded", QUOTA, DAY),
    # Microsoft 365, "Message storage and concurrent connection throttling for SMTP Authenticated
    # Submission" (learn.microsoft.com/en-us/exchange/troubleshoot/send-emails/smtp-submission-improvements)
    # and the Exchange team's announcement (techcommunity.microsoft.com, "Changes coming to the SMTP
    # Authenticated Submission client protocol"): three concurrent connections per mailbox, beyond them
    #   432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded
    #   432 4.3.2 Concurrent connections limit exceeded.
    # (421 4.3.2 variants are 421s anyway); and over the 10,000 recipients a day
    #   554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException; ...
    _row("m365-sender-thread-limit", (421, 432, 451, 452), r"sender thread limit exceeded", THROTTLED),
    _row("m365-concurrent-connections", (421, 432), r"concurrent connections? limit exceeded", THROTTLED),
    _row("m365-daily-quota", (550, 552, 554), r"SubmissionQuotaExceeded", QUOTA, DAY),
    # Google, "Gmail SMTP errors and codes" (support.google.com/a/answer/3726730):
    #   421 4.7.0 Try again later, closing connection.
    #   421 4.4.5 Server busy, try again later.
    #   450 4.2.1 Peak SMTP relay limit exceeded for customer
    # and the daily limits, rolling 24 hours ("Gmail sending limits in Google Workspace"):
    #   550 5.4.5 Daily user sending quota exceeded.  /  550 5.4.5 Daily user sending limit exceeded.
    #   550 5.4.5 Daily SMTP relay limit exceeded for user  /  550 5.7.1 ... for customer
    _row("gmail-server-busy", (421,), r"server busy", THROTTLED),
    _row("gmail-try-again-later", (421,), r"try again later", THROTTLED),
    _row("gmail-peak-relay-limit", (450, 451), r"peak smtp relay limit exceeded", THROTTLED),
    _row("gmail-daily-sending-quota", (550, 552), r"daily user sending (quota|limit) exceeded", QUOTA, DAY),
    _row("gmail-daily-relay-limit", (550,), r"daily smtp relay limit exceeded", QUOTA, DAY),
    # Postfix's smtpd (src/smtpd/smtpd.c) when anvil's client limits are reached:
    #   421 <host> Error: too many connections from <ip>       (smtpd_client_connection_count_limit)
    #   450 4.7.1 Error: too much mail from <ip>               (smtpd_client_message_rate_limit)
    #   450 4.7.1 Error: too many recipients from <ip>         (smtpd_client_recipient_rate_limit)
    _row("postfix-too-many-connections", (421, 450), r"too many connections from", THROTTLED),
    _row("postfix-message-rate", (450, 451), r"too much mail from", THROTTLED),
    _row("postfix-recipient-rate", (450, 451), r"too many recipients from", THROTTLED),
    # Mailgun, as its SMTP service answered (github.com/swapmyvote/swapmyvote/issues/887 and
    # github.com/mailgun/mailgun-java/issues/50, the same wording through its API):
    #   421 Domain <domain> is not allowed to send: message limit reached
    #   ... is not allowed to send: recipient limit exceeded, try again after <date> UTC
    # Its window is not stated (the "try again after" hint, when given, is believed): an hour.
    _row("mailgun-limit", (421, 450, 451, 550), r"is not allowed to send: \w+ limit", QUOTA, HOUR),
    # A relay-side rate limit of another provider, replied even to AUTH (client.cloud4u.com,
    # "Restrictions on the Service to prevent spam"):  550 Too many messages. Try again in 92 seconds.
    _row("too-many-messages", (421, 450, 451, 550, 554), r"too many messages", THROTTLED),
)

_IN = re.compile(r"try again in (\d{1,6}) ?(s|sec|second|seconds|m|min|minute|minutes|h|hour|hours)\b", re.I)
_AFTER = re.compile(r"try again after ([A-Z][a-z]{2}, \d{1,2} [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d [A-Z]{3})")
_UNIT = {"s": 1, "m": 60, "h": 3600}


def known(code: int, text: str) -> KnownReply | None:
    """The row of the table this reply matches, if any."""
    for row in KNOWN_REPLIES:
        if code in row.codes and row.pattern.search(text):
            return row
    return None


def asked_wait(text: str, now: datetime | None = None) -> float | None:
    """Seconds the reply itself asks us to wait ("try again in 92 seconds", "try again after <date>"),
    up to a day; None when it does not say."""
    found = _IN.search(text)
    if found:
        return min(DAY, float(found.group(1)) * _UNIT[found.group(2)[0].lower()])
    found = _AFTER.search(text)
    if found:
        try:
            when = parsedate_to_datetime(found.group(1))
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return max(0.0, min(DAY, (when - (now or datetime.now(UTC))).total_seconds()))
    return None
