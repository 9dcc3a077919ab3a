"""Task statuses and the transitions between them.

The data path (workers and the sweep):

scheduled ──(due; sweep)──────────────┐
queued ──(sender claims)──> processing ├─> sent
  ^                            │       ├─> failed ──(due; sweep)──> queued
  └──(lease ran out; sweep)────┘       └─> cancelled

What a user may do (shared/tasks/control.py), each one conditional UPDATE on the status:

scheduled | queued | failed ──(cancel)──────> cancelled     never processing: it is being sent
scheduled | queued | failed ──(reschedule)──> scheduled (later) | queued (due now)
failed | cancelled ─────────(retry)────────> queued         a fresh budget; try_count keeps counting

A sender claims only a ``queued`` row, so a task the user cancelled or moved to later has nothing
left to claim, whatever envelopes of it are still in Redis.
"""

from __future__ import annotations

import enum


class Status(enum.StrEnum):
    SCHEDULED = "scheduled"  # waiting for scheduled_at
    QUEUED = "queued"  # an envelope is (or should be) on its way to a sender
    PROCESSING = "processing"  # claimed by a sender until lease_until
    SENT = "sent"  # the SMTP server accepted it
    FAILED = "failed"  # a transient failure; will be retried at next_attempt_at
    CANCELLED = "cancelled"  # no more tries: permanent error, tries used up, or cancelled by the user


class CancelReason(enum.StrEnum):
    """Why a task was cancelled: a bounded vocabulary (metrics labels and webhook events share it)."""

    PERMANENT_FAILURE = "permanent_failure"  # the SMTP server refused it for good, or it cannot be built
    TRIES_EXHAUSTED = "tries_exhausted"  # transient failures used up its MAX_TRY_COUNT tries
    USER = "user"  # the user cancelled it
    LOST_IN_FLIGHT = "lost_in_flight"  # the worker sending its last try was lost (it may have gone out)
    EXPIRED = "expired"  # not sent by its expires_at (MAX_QUEUE_LIFETIME after it was due, or its own)


TERMINAL = frozenset({Status.SENT, Status.CANCELLED})  # for the workers; only a user's retry revives one
PENDING = (Status.SCHEDULED, Status.QUEUED, Status.PROCESSING, Status.FAILED)  # "still to go out"
FAILURES = (Status.FAILED, Status.CANCELLED)

# A reschedule may keep the status (scheduled -> scheduled at another time, queued -> queued now).
TRANSITIONS: dict[Status, frozenset[Status]] = {
    Status.SCHEDULED: frozenset({Status.QUEUED, Status.CANCELLED, Status.SCHEDULED}),
    Status.QUEUED: frozenset({Status.PROCESSING, Status.CANCELLED, Status.SCHEDULED, Status.QUEUED}),
    Status.PROCESSING: frozenset({Status.SENT, Status.FAILED, Status.CANCELLED, Status.QUEUED}),
    Status.FAILED: frozenset({Status.QUEUED, Status.CANCELLED, Status.SCHEDULED}),
    Status.SENT: frozenset(),
    Status.CANCELLED: frozenset({Status.QUEUED}),  # retry
}

# The statuses from which a user may cancel, reschedule or retry a task (shared/tasks/control.py). Never
# ``processing``: an attempt under way cannot be taken back; its outcome decides what comes next.
CANCELLABLE = (Status.SCHEDULED, Status.QUEUED, Status.FAILED)
RESCHEDULABLE = (Status.SCHEDULED, Status.QUEUED, Status.FAILED)
RETRYABLE = (Status.FAILED, Status.CANCELLED)


def can_move(old: Status, new: Status) -> bool:
    return new in TRANSITIONS[old]


class SmtpSecurity(enum.StrEnum):
    STARTTLS = "starttls"  # plaintext connect, then STARTTLS is required before anything else
    TLS = "tls"  # implicit TLS from the first byte (port 465)
    NONE = "none"  # plaintext; only where SMTP_ALLOW_INSECURE permits it


class AccountReason(enum.StrEnum):
    """Why an account backs off: what its relay said about the account, not about a mail (a bounded
    vocabulary: the metrics' reason label, the user record's ``smtp_state.reason``, webhook events)."""

    UNREACHABLE = "unreachable"  # no connection: refused, reset, timed out, name not found, lost before DATA
    THROTTLED = "throttled"  # 421, or a known throttling reply (shared.delivery.replies)
    QUOTA = "quota"  # a known quota reply: the account waits for the quota's window
    UNAVAILABLE = "unavailable"  # a temporary failure of the greeting, EHLO, STARTTLS or AUTH


class PauseReason(enum.StrEnum):
    """Why an account is paused: its mail waits until the user (or an operator) changes something."""

    CREDENTIALS = "credentials"  # the server refused the account's login (5xx to AUTH)
    KEY = "key"  # no configured key decrypts the stored SMTP password
    CONFIGURATION = "configuration"  # the server cannot be used as configured (TLS, STARTTLS, AUTH offered)


def default_security(port: int) -> SmtpSecurity:
    return SmtpSecurity.TLS if port == 465 else SmtpSecurity.STARTTLS
