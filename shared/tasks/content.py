"""What one mail may carry, and the rules for it: the one place single and batch enqueue check a mail.

``parse`` reads one enqueue body and returns the clean ``Mail`` or the errors, one per field, keyed
as the caller wrote it (``cc[2]``, ``attachments[0].filename``, ``headers.From``, ``tags.team``). A
size over its limit is kept apart: a single enqueue answers it with 413, a batch as that item's error.
Everything that ends up in a header is refused with CR, LF, NUL or another line break in it, or with RFC
2047 encoded-word syntax (which a header parser may decode to a line break).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import mimetypes
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from shared.config import Settings
from shared.tasks.tagging import MAX_TAG_VALUE, MAX_TAGS, TAG_KEY, tag_filter, tags_of  # noqa: F401
from shared.validation import ENCODED_WORD, ENCODED_WORD_REFUSED, LINE_BREAKS, Fields

MAX_SUBJECT = 998  # RFC 5322's line limit
MAX_NAME = 256  # a display name (from_name, recipient_name)
MAX_ADDRESSES = 50  # cc, and bcc, each
MAX_RECIPIENTS = 100  # to + cc + bcc, each address counted once
MAX_HEADERS = 20
# A header's value; with "Name: " it still fits RFC 5322's 998-character line when it cannot be folded.
MAX_HEADER_VALUE = 900
MAX_ATTACHMENTS = 10
MAX_FILENAME = 255
# JSON values one enqueue body may hold, counted before it is parsed (functions/http.py json_body): twice
# what the fullest valid mail holds (32 members for its fields and a client's own, cc and bcc full,
# every header, attachment and tag), so a request's memory stays a small multiple of its size whatever
# its shape. A batch may hold MAX_BATCH times as many.
MAX_VALUES = 2 * (32 + 2 * (MAX_ADDRESSES + 1) + (MAX_HEADERS + 1) + 4 * MAX_ATTACHMENTS + 1 + MAX_TAGS + 1)
# RFC 5322 field-name: printable ASCII except the colon.
_HEADER_NAME = re.compile(r"^[\x21-\x39\x3b-\x7e]{1,76}$")
# Headers a user may set besides X-…: the few that mailing-list and reply mail needs.
ALLOWED_HEADERS = ("List-Unsubscribe", "List-Unsubscribe-Post", "In-Reply-To", "References")
# Headers mailq writes itself (or that shape the MIME structure); naming one is a 422 that says so.
STRUCTURAL_HEADERS = ("From", "To", "Cc", "Bcc", "Subject", "Date", "Message-ID", "MIME-Version", "Reply-To")
# RFC 6838 restricted-name for type and subtype, no parameters.
_CONTENT_TYPE = re.compile(r"^[a-z0-9][a-z0-9!#$&^_.+-]{0,126}/[a-z0-9][a-z0-9!#$&^_.+-]{0,126}$")
_WHITESPACE = re.compile(rb"[ \t\r\n]+")
# Only Python's built-in table: the same guess on every machine (not /etc/mime.types).
_TYPES = mimetypes.MimeTypes(filenames=())
# The seed's fields: a request hash over only these stays what it was before the new fields existed,
# so a client retrying a request from before the upgrade still gets its first task back.
_SEED_FIELDS = ("recipient_email", "subject", "body", "scheduled_at")
NEW_FIELDS = (
    "html",
    "from_name",
    "recipient_name",
    "cc",
    "bcc",
    "reply_to",
    "headers",
    "attachments",
    "tags",
    "expires_at",
)


@dataclass(frozen=True)
class Attachment:
    filename: str
    content_type: str  # type/subtype
    data: bytes


@dataclass(frozen=True)
class Mail:
    """One mail as it will be stored: normalized addresses, decoded attachments."""

    recipient_email: str
    subject: str
    body: str | None  # the text part; None: HTML only
    scheduled_at: datetime | None
    html: str | None = None
    from_name: str | None = None
    recipient_name: str | None = None
    cc: tuple[str, ...] = ()
    bcc: tuple[str, ...] = ()
    reply_to: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    attachments: tuple[Attachment, ...] = ()
    tags: dict[str, str] = field(default_factory=dict)
    expires_at: datetime | None = None  # never attempted after it (None: ``lifetime`` after it is due)
    lifetime: int = 5 * 86400  # seconds it may wait once due: the deployment's MAX_QUEUE_LIFETIME

    @property
    def has_content(self) -> bool:
        """True when the mail carries more than the seed's fields (it gets a task_contents row)."""
        return bool(
            self.html is not None
            or self.from_name
            or self.recipient_name
            or self.cc
            or self.bcc
            or self.reply_to
            or self.headers
            or self.attachments
        )


@dataclass
class Parsed:
    mail: Mail | None  # None when anything is wrong
    errors: dict[str, str]
    too_large: dict[str, str]  # field -> what is over its limit (a 413 for a single enqueue)


def parse(body: dict[str, Any], settings: Settings) -> Parsed:
    """Check one enqueue body against every rule; collect every error (one per field)."""
    f = Fields(body)
    too_large: dict[str, str] = {}
    recipient = f.email("recipient_email")
    subject = _header_text(f, f.string("subject", max_len=MAX_SUBJECT, allow_empty=True), "subject")
    text = _text(f, "body")
    html = _text(f, "html")
    if text is None and html is None and not any(k in f.errors for k in ("body", "html")):
        f.fail("body", "is required (or give html)")
    if html is not None and text == "":
        text = None  # an empty text alternative would be shown by some clients instead of the HTML
    size = sum(len(t.encode("utf-8", "surrogatepass")) for t in (text, html) if t is not None)
    if size > settings.max_body_bytes:
        name = "body" if html is None else "html"
        too_large[name] = (
            f"the mail body (text and HTML together) must be at most {settings.max_body_bytes} bytes"
        )
    from_name = _display_name(f, "from_name")
    recipient_name = _display_name(f, "recipient_name")
    cc = _addresses(f, "cc")
    bcc = _addresses(f, "bcc")
    reply_to = f.email("reply_to", required=False)
    if recipient and len({a.lower() for a in (recipient, *cc, *bcc)}) > MAX_RECIPIENTS:
        f.fail("bcc", f"to, cc and bcc together must be at most {MAX_RECIPIENTS} different addresses")
    headers = _headers(f)
    attachments = _attachments(f, settings, too_large)
    tags = tags_of(f)
    scheduled_at = f.timestamp("scheduled_at")
    expires_at = _expires_at(f, scheduled_at, settings)
    if f.errors or too_large:
        return Parsed(None, f.errors, too_large)
    mail = Mail(
        recipient_email=recipient,
        subject=subject,
        body=text,
        scheduled_at=scheduled_at,
        html=html,
        from_name=from_name,
        recipient_name=recipient_name,
        cc=cc,
        bcc=bcc,
        reply_to=reply_to,
        headers=headers,
        attachments=attachments,
        tags=tags,
        expires_at=expires_at,
        lifetime=settings.max_queue_lifetime,
    )
    return Parsed(mail, {}, {})


def request_hash(body: dict[str, Any]) -> str:
    """What an Idempotency-Key is compared with: every field as sent (the new ones when present)."""
    fields = {k: body.get(k) for k in _SEED_FIELDS}
    fields.update({k: body[k] for k in NEW_FIELDS if body.get(k) is not None})
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def request_limit(settings: Settings) -> int:
    """Largest single enqueue request accepted before parsing.

    JSON may spell any character as a six-byte ``\\uXXXX`` escape, and an ASCII or control character is
    one byte of the body: a full-size body (text and HTML) can arrive six times its size. Attachments
    arrive as base64 (4 bytes per 3), with 10 % for line breaks and escaped slashes some encoders add.
    The 512 KiB hold every other field at its limits, escaped. The cluster's gateway takes its
    client_max_body_size from this (deployment/gen_gateway.py), so the two limits cannot disagree.
    """
    base64_room = (settings.max_attachment_bytes // 3 + 1) * 4 * 11 // 10
    return 6 * settings.max_body_bytes + base64_room + 512 * 1024


# --- the checks --------------------------------------------------------------------------------------


def _text(f: Fields, name: str) -> str | None:
    value = f.body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        f.fail(name, "must be a string")
        return None
    if "\x00" in value:
        f.fail(name, "must not contain NUL characters")
        return None
    return value


def _header_text(f: Fields, value: str | None, name: str) -> str | None:
    """``value`` unless it holds encoded-word syntax (the field becomes a header)."""
    if value and ENCODED_WORD.search(value):
        f.fail(name, ENCODED_WORD_REFUSED)
        return None
    return value


def _expires_at(f: Fields, scheduled_at: datetime | None, settings: Settings) -> datetime | None:
    """When the mail stops being worth sending: in the future, after it is due, and within
    MAX_QUEUE_LIFETIME of that (the longest any mail is kept)."""
    expires_at = f.timestamp("expires_at")
    if expires_at is None:
        return None
    now = datetime.now(UTC)
    due = max(scheduled_at or now, now)
    if expires_at <= now:
        f.fail("expires_at", "must be in the future")
    elif scheduled_at is not None and expires_at <= scheduled_at:
        f.fail("expires_at", "must be after scheduled_at (the mail would expire before it is due)")
    elif expires_at > due + timedelta(seconds=settings.max_queue_lifetime):
        f.fail(
            "expires_at",
            f"must be at most MAX_QUEUE_LIFETIME ({settings.max_queue_lifetime} s) after the mail is due",
        )
    else:
        return expires_at
    return None


def _display_name(f: Fields, name: str) -> str | None:
    value = f.string(name, required=False, max_len=MAX_NAME, allow_empty=True)
    if value and not value.isprintable():
        f.fail(name, "must hold printable characters only")
        return None
    return _header_text(f, value, name) or None


def _list(f: Fields, name: str, most: int, what: str) -> list | None:
    value = f.body.get(name)
    if value is None:
        return None
    if not isinstance(value, list):
        f.fail(name, f"must be an array of {what}")
        return None
    if len(value) > most:
        f.fail(name, f"must hold at most {most} {what}")
        return None
    return value


def _addresses(f: Fields, name: str) -> tuple[str, ...]:
    items = _list(f, name, MAX_ADDRESSES, "addresses") or []
    each = Fields({f"{name}[{i}]": value for i, value in enumerate(items)})
    clean = tuple(each.email(key) for key in each.body)
    for key, message in each.errors.items():
        f.fail(key, message)
    return () if each.errors else clean


def _headers(f: Fields) -> tuple[tuple[str, str], ...]:
    value = f.body.get("headers")
    if value is None:
        return ()
    if not isinstance(value, dict):
        f.fail("headers", "must be an object of header names and values")
        return ()
    if len(value) > MAX_HEADERS:
        f.fail("headers", f"must hold at most {MAX_HEADERS} headers")
        return ()
    clean, seen = [], set()
    allowed = {h.lower(): h for h in ALLOWED_HEADERS}
    structural = {h.lower() for h in STRUCTURAL_HEADERS}
    for name, text in value.items():
        key = f"headers.{name}"
        lowered = name.lower()
        if not _HEADER_NAME.match(name):
            f.fail("headers", f"{name[:80]!r} is not a header name (printable ASCII without ':')")
        elif lowered in structural or lowered.startswith("content-"):
            f.fail(key, "is a structural header mailq sets itself; use the request's fields instead")
        elif not lowered.startswith("x-") and lowered not in allowed:
            f.fail(key, "is not allowed: use an X-… header or one of " + ", ".join(ALLOWED_HEADERS))
        elif lowered in seen:
            f.fail(key, "is given twice (header names are case-insensitive)")
        elif not isinstance(text, str):
            f.fail(key, "must be a string")
        elif LINE_BREAKS.search(text):
            f.fail(key, "must be one line: no CR, LF, NUL or other line-breaking characters")
        elif len(text) > MAX_HEADER_VALUE:
            f.fail(key, f"must be at most {MAX_HEADER_VALUE} characters")
        elif not text.isascii() and not lowered.startswith("x-"):
            f.fail(key, "must be ASCII (only X-… headers may hold other characters)")
        elif not text.isprintable():
            f.fail(key, "must hold printable characters only")
        elif ENCODED_WORD.search(text):
            f.fail(key, ENCODED_WORD_REFUSED)
        else:
            seen.add(lowered)
            clean.append((name, text))
    return tuple(clean)


def _attachments(f: Fields, settings: Settings, too_large: dict[str, str]) -> tuple[Attachment, ...]:
    items = _list(f, "attachments", MAX_ATTACHMENTS, "attachments") or []
    clean, total = [], 0
    for i, item in enumerate(items):
        where = f"attachments[{i}]"
        if not isinstance(item, dict):
            f.fail(where, "must be an object with filename and content")
            continue
        filename = _filename(f, where, item.get("filename"))
        content_type = _content_type(f, where, item.get("content_type"), filename)
        content = item.get("content")
        if not isinstance(content, str):
            f.fail(f"{where}.content", "is required: the file's bytes in base64")
            continue
        raw = _WHITESPACE.sub(b"", content.encode("ascii", "replace"))
        total += len(raw) // 4 * 3 - raw[-2:].count(b"=")  # exact for valid base64
        if total > settings.max_attachment_bytes:  # before decoding: a bound on the work, too
            break
        try:
            data = base64.b64decode(raw, validate=True)
        except binascii.Error:
            f.fail(f"{where}.content", "is not valid base64")
            continue
        if filename is not None and content_type is not None:
            clean.append(Attachment(filename, content_type, data))
    if total > settings.max_attachment_bytes:
        too_large["attachments"] = (
            f"the attachments must be at most {settings.max_attachment_bytes} bytes together (decoded)"
        )
    return tuple(clean)


def _filename(f: Fields, where: str, value: Any) -> str | None:
    key = f"{where}.filename"
    if not isinstance(value, str) or not value:
        f.fail(key, "is required: a non-empty string")
    elif len(value) > MAX_FILENAME:
        f.fail(key, f"must be at most {MAX_FILENAME} characters")
    elif "/" in value or "\\" in value or value in (".", ".."):
        f.fail(key, "must be a file name without a path")
    elif not value.isprintable() or LINE_BREAKS.search(value):
        # Also refuses format characters such as U+202E, which can make "exe.pdf" look like "fdp.exe".
        f.fail(key, "must hold printable characters only")
    elif ENCODED_WORD.search(value):  # a parameter of the part's Content-Disposition header
        f.fail(key, ENCODED_WORD_REFUSED)
    else:
        return value
    return None


def _content_type(f: Fields, where: str, value: Any, filename: str | None) -> str | None:
    if value is None:
        guessed = _TYPES.guess_type(filename or "", strict=False)[0] if filename else None
        if guessed is None or guessed.startswith(("multipart/", "message/")):
            return "application/octet-stream"
        return guessed
    key = f"{where}.content_type"
    if not isinstance(value, str) or not _CONTENT_TYPE.match(value.lower()):
        f.fail(key, "must be a media type such as application/pdf (type/subtype, no parameters)")
        return None
    if value.lower().startswith(("multipart/", "message/")):
        f.fail(key, "must not be multipart/… or message/… (send it as application/octet-stream)")
        return None
    return value.lower()
