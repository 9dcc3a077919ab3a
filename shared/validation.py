"""Field rules for request bodies. Each checker returns the clean value or records an error.

Every rule here has a test that fails when the rule is removed (tests/test_validation.py and the
API tests). Anything with CR, LF or NUL is refused before it can reach a header or a log line.
"""

from __future__ import annotations

import ipaddress
import re
from datetime import UTC, datetime
from typing import Any

from email_validator import EmailNotValidError, validate_email

from shared.domain import SmtpSecurity

# CR, LF and NUL, and every other character Python's str.splitlines() breaks on (VT, FF, FS, GS, RS,
# NEL, LS, PS): the email package refuses them in a header, so they are refused at the door.
LINE_BREAKS = re.compile("[\r\n\x00\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")
# RFC 2047 encoded-word syntax (=?charset?q?text?=, B or Q, any case), as loosely as any decoder reads it:
# whitespace inside and a charset with a *language are still decoded by some. A header value holding one
# can decode to a line break (the email package of Python 3.11.7 and earlier did, when folding), so every
# field that becomes a header refuses it; mailq encodes what needs encoding itself.
ENCODED_WORD = re.compile(r"=\?[^?]*\?[bBqQ]\?.*?\?=", re.DOTALL)
ENCODED_WORD_REFUSED = (
    "must not contain RFC 2047 encoded-word syntax (=?charset?q?...?=); send the text itself, "
    "mailq encodes what needs encoding"
)
_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
MISSING = object()
MAX_PASSWORD_BYTES = 72  # bcrypt ignores everything past 72 bytes; we refuse instead of truncating
MIN_PASSWORD_BYTES = 8


class Fields:
    """Collects one error per field while a body is checked."""

    def __init__(self, body: dict[str, Any]):
        self.body = body
        self.errors: dict[str, str] = {}

    def fail(self, name: str, message: str) -> None:
        self.errors.setdefault(name, message)

    def string(self, name: str, *, required: bool = True, max_len: int = 1000, allow_empty: bool = False):
        value = self.body.get(name, MISSING)
        if value is MISSING or value is None:
            if required:
                self.fail(name, "is required")
            return None
        if not isinstance(value, str):
            self.fail(name, "must be a string")
            return None
        if LINE_BREAKS.search(value):
            self.fail(name, "must not contain CR, LF, NUL or other line-breaking characters")
            return None
        if not value and not allow_empty:
            self.fail(name, "must not be empty")
            return None
        if len(value) > max_len:
            self.fail(name, f"must be at most {max_len} characters")
            return None
        return value

    def email(self, name: str, *, required: bool = True) -> str | None:
        value = self.string(name, max_len=254, required=required)
        if value is None:
            return None
        if ENCODED_WORD.search(value):
            self.fail(name, ENCODED_WORD_REFUSED)
            return None
        try:
            return validate_email(value, check_deliverability=False).normalized
        except EmailNotValidError as exc:
            self.fail(name, f"is not a valid email address ({exc})")
            return None

    def password(self, name: str) -> str | None:
        value = self.body.get(name, MISSING)
        if value is MISSING or value is None:
            self.fail(name, "is required")
            return None
        if not isinstance(value, str):
            self.fail(name, "must be a string")
            return None
        if LINE_BREAKS.search(value):
            self.fail(name, "must not contain CR, LF or NUL characters")
            return None
        size = len(value.encode())
        if not MIN_PASSWORD_BYTES <= size <= MAX_PASSWORD_BYTES:
            self.fail(name, f"must be {MIN_PASSWORD_BYTES} to {MAX_PASSWORD_BYTES} bytes long (UTF-8)")
            return None
        return value

    def port(self, name: str) -> int | None:
        value = self.body.get(name, MISSING)
        if value is MISSING or value is None:
            self.fail(name, "is required")
            return None
        # Existing clients send the port either as a number or as a string of digits.
        if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 5:
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            self.fail(name, "must be an integer")
            return None
        if not 1 <= value <= 65535:
            self.fail(name, "must be between 1 and 65535")
            return None
        return value

    def hostname(self, name: str) -> str | None:
        value = self.string(name, max_len=253)
        if value is None:
            return None
        if not is_hostname_or_ip(value):
            self.fail(name, "must be a valid hostname or IP address")
            return None
        return value.lower().rstrip(".")

    def choice(self, name: str, choices: tuple[str, ...]) -> str | None:
        value = self.string(name, required=False, max_len=32)
        if value is None:
            return None
        if value not in choices:
            self.fail(name, "must be one of " + ", ".join(choices))
            return None
        return value

    def timestamp(self, name: str) -> datetime | None:
        """ISO 8601; without an offset it means UTC. None when absent or null (the caller decides
        what that means: for ``scheduled_at`` it is "now", on PostgreSQL's clock)."""
        value = self.body.get(name, MISSING)
        if value is MISSING or value is None or value == "":
            return None
        if not isinstance(value, str):
            self.fail(name, "must be an ISO 8601 date-time string")
            return None
        text = value.strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            self.fail(name, "must be an ISO 8601 date-time, e.g. 2024-04-15T12:00:00")
            return None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        if parsed.year < 1970 or parsed.year > 9000:
            self.fail(name, "is out of range")
            return None
        return parsed


def is_hostname_or_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        pass
    host = value.rstrip(".")
    if not host or len(host) > 253:
        return False
    labels = host.split(".")
    if labels[-1].isdigit():  # 300.1.1.1 is neither an IP nor a hostname
        return False
    return all(_LABEL.match(label) for label in labels)


SECURITY_CHOICES = tuple(s.value for s in SmtpSecurity)
