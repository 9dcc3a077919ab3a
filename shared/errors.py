"""Every error mailq raises on purpose, in one tree.

    MailqError
     ├── ConfigError              settings the service refuses to run with
     ├── EnvelopeDecodeError      a Redis message that is not a valid envelope
 ├── HostError                a user's host (SMTP server, webhook receiver) we cannot or may not reach
     ├── ServiceError             a use case refused the request (entry points map these to HTTP)
     │    ├── BadRequest            the request cannot be parsed at all
     │    ├── ValidationFailed      parsed, but fields are wrong (one entry per field)
     │    ├── Unauthorized          no valid credentials
     │    ├── NotFound              nothing the caller may see under that id
     │    ├── Conflict              would duplicate something unique, or the task's status forbids it
     │    ├── PayloadTooLarge       body beyond the configured limit
     │    ├── UnsupportedMediaType  not JSON
     │    ├── RateLimited           too many attempts; retry_after seconds
     │    └── DependencyUnavailable PostgreSQL or Redis cannot be reached
     └── SmtpError                a send failed
          ├── TransientSmtpError    about this mail, worth retrying (4xx to MAIL/RCPT/DATA, lost in DATA)
          ├── PermanentSmtpError    about this mail, not worth retrying (5xx, too big for the server)
          │    └── UnsafeMessage      the bytes about to be sent are not the mail meant (last guard)
          └── AccountSmtpError      about the account's relay, not the mail: it backs off, no try spent
               └── AccountPausedError   the account cannot send until its settings change: it pauses
                    └── SmtpAuthError     the server refused the account's credentials (5xx to AUTH)

Only ``functions/`` knows which HTTP status each ServiceError becomes.
"""

from __future__ import annotations


class MailqError(Exception):
    """Base class of every error raised on purpose by mailq."""


class ConfigError(MailqError):
    """Raised when settings are missing or invalid; the message names what is wrong."""


class EnvelopeDecodeError(MailqError):
    """Raised when a Redis message is not a well-formed version-1 envelope."""


class HostError(MailqError):
    """Raised by shared.hosts when a user's host does not resolve or points somewhere we must not
    connect to; ``transient`` when a retry may do better (the resolver is down), ``refused`` when the
    name resolved to an address we refuse."""

    def __init__(self, message: str, *, transient: bool = False, refused: bool = False):
        super().__init__(message)
        self.message = message
        self.transient = transient
        self.refused = refused


class ServiceError(MailqError):
    """A use case refused a request; ``detail`` is safe to show to the caller."""

    title = "Request refused"

    def __init__(self, detail: str = "", **extra):
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        self.extra = extra


class BadRequest(ServiceError):
    """Raised when the request body cannot be parsed (malformed JSON, not an object)."""

    title = "Bad request"


class ValidationFailed(ServiceError):
    """Raised when fields are invalid; ``errors`` maps each field to what is wrong with it."""

    title = "Validation failed"

    def __init__(self, errors: dict[str, str], detail: str = ""):
        super().__init__(detail or "One or more fields are invalid.")
        self.errors = errors


class Unauthorized(ServiceError):
    """Raised for a missing, malformed, expired or forged token, or wrong login credentials."""

    title = "Unauthorized"


class NotFound(ServiceError):
    """Raised when the id does not exist or belongs to someone else (we do not say which)."""

    title = "Not found"


class Conflict(ServiceError):
    """Raised when a unique thing (an email) already exists, or a task's status does not allow the
    change asked for (cancelling a task that is being sent, retrying one that was sent)."""

    title = "Conflict"


class PayloadTooLarge(ServiceError):
    """Raised when the request or the mail body is over its size limit."""

    title = "Payload too large"


class UnsupportedMediaType(ServiceError):
    """Raised when a body is sent with a content type other than JSON."""

    title = "Unsupported media type"


class RateLimited(ServiceError):
    """Raised when a client or an email exceeded its attempts, or a tenant one of its bounds (``limit``
    in ``extra`` names which); retry after ``retry_after`` seconds."""

    title = "Too many requests"

    def __init__(self, retry_after: int, detail: str = "", **extra):
        super().__init__(detail or "Too many attempts; try again later.", **extra)
        self.retry_after = retry_after


class DependencyUnavailable(ServiceError):
    """Raised when PostgreSQL or Redis cannot be reached; ``dependency`` names which."""

    title = "Service unavailable"

    def __init__(self, dependency: str, detail: str = ""):
        super().__init__(detail or f"{dependency} is unavailable; try again shortly.")
        self.dependency = dependency


class SmtpError(MailqError):
    """A send failed; ``code`` is the server's reply code when there was one."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.stage: str | None = None  # how far the conversation got (connect, greeting, …, DATA)


class TransientSmtpError(SmtpError):
    """Raised for failures worth retrying: 4xx replies, timeouts, lost connections."""


class PermanentSmtpError(SmtpError):
    """Raised for failures not worth retrying: 5xx replies, bad credentials, TLS refused."""


class AccountSmtpError(SmtpError):
    """Raised for what the relay said about the account rather than about this mail: it cannot be
    reached, it answered 421, a greeting, EHLO, STARTTLS or AUTH failed for now, or a known throttling
    or quota reply (shared.delivery.replies). The mail spends no try; the account backs off.

    ``reason`` is a ``shared.domain.AccountReason``; ``wait`` the seconds the relay asked for (a quota's
    window), None to back off as usual; ``shrink`` asks for fewer conversations at once (a throttling or
    a refused connection)."""

    def __init__(
        self,
        message: str,
        code: int | None = None,
        *,
        reason: str = "unavailable",
        wait: float | None = None,
        shrink: bool = False,
        stage: str | None = None,
    ):
        super().__init__(message, code)
        self.reason = reason
        self.wait = wait
        self.shrink = shrink
        self.stage = stage


class AccountPausedError(AccountSmtpError):
    """Raised when the account cannot send as configured whatever the time (a certificate that does not
    verify, no STARTTLS, no AUTH, plaintext refused): the account pauses until its settings change.
    ``reason`` is a ``shared.domain.PauseReason``."""


class SmtpAuthError(AccountPausedError):
    """Raised when the server answers AUTH with 5xx (535: credentials refused).

    Every mail of that account would fail the same way (and each try counts against the account at the
    provider), so the sender pauses the account instead of failing its mails one by one.
    """


class UnsafeMessage(PermanentSmtpError):
    """Raised by the last guard (shared.delivery.wirecheck) when the wire form of a mail is not the one
    meant: a header nobody asked for, From/To/Cc/Reply-To not exactly the addresses and names given, or an
    envelope that differs. Nothing is sent; the task is cancelled with this reason."""

    def __init__(self, detail: str):
        super().__init__(f"not sent: {detail} (the last check of the message as built refused it)")
