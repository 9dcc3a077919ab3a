"""Finding mail: what a search asks for (the list endpoints' query parameters, a bulk action's
members), which index serves it, and the cursor that continues its pages. shared.tasks.pages reads
the pages: each through one index, whatever the filters are and however the data is shaped.

A search is a set of statuses and any of: an id, a Message-ID, a subject prefix, a recipient, a tag, a
created-at range. The search itself decides which index reads the page, never the planner's
statistics (tests/test_queue_plans.py measures every way at 1,000,000 rows):

=====================  ================================================  ==============  ========
the search has         read through                                      pages in order  exact
=====================  ================================================  ==============  ========
an id                  the primary key                                   id              yes
a Message-ID           tasks_user_message_id                             id              scanned
a subject prefix       tasks_user_subject (the first 64 characters)      subject, id     scanned
a recipient            tasks_user_recipient_id                           id              scanned
a tag                  task_tags_user_tag_task, then each task by key    id              scanned
a created-at range     tasks_user_status_created, one range per status,  created_at, id  yes
                       merged (a Merge Append that stops at the page)
statuses only          tasks_user_pending_id, _fail_id, _status_id;      id              yes
                       ``all``: tasks_user_status_id per status, merged
=====================  ================================================  ==============  ========

"scanned": the remaining conditions are checked on the rows the index yields, and one request looks
at shared.tasks.pages.SCAN_ROWS of them at most. A page may then hold fewer items than asked for
(even none) and still carry a ``next_cursor``: the search goes on from the last row it looked at.
That is the bound on what one page reads, however rare the matches are (a tag on 450,000 sent
mails, asked for its pending ones, read 1,359,334 buffers for an empty page; now 4,060).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from shared.domain import FAILURES, PENDING, Status
from shared.errors import ValidationFailed
from shared.models import SUBJECT_KEY_LENGTH
from shared.tasks import content
from shared.validation import Fields

ALL = "all"
STATUSES = tuple(s.value for s in Status)
PENDING_STATUSES = tuple(s.value for s in PENDING)
FAIL_STATUSES = tuple(s.value for s in FAILURES)
MAX_ID = 2**63 - 1
MAX_MESSAGE_ID = 998
MAX_TAG = 40 + 1 + content.MAX_TAG_VALUE  # key:value (shared.tasks.content.tag_filter's rules)
PARAMETERS = ("status", "recipient", "tag", "subject", "message_id", "id", "created_from", "created_to")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)

# The ways a page is read (see the table above), and the order each keeps.
BY_ID, BY_MESSAGE_ID, BY_SUBJECT, BY_RECIPIENT, BY_TAG, BY_CREATED, BY_STATUS = (
    "id",
    "message_id",
    "subject",
    "recipient",
    "tag",
    "created",
    "status",
)
SCANNED = (BY_MESSAGE_ID, BY_SUBJECT, BY_RECIPIENT, BY_TAG)


@dataclass(frozen=True)
class Search:
    """What a list (or a bulk action) looks for; every condition given must hold."""

    statuses: tuple[str, ...] = PENDING_STATUSES
    recipient: str | None = None
    tag: str | None = None
    subject: str | None = None  # a prefix, compared case-insensitively
    message_id: str | None = None
    task_id: int | None = None
    created_from: datetime | None = None  # created_at >= this
    created_to: datetime | None = None  # created_at < this

    @property
    def way(self) -> str:
        """Which index reads the page (the module's table, top row first)."""
        if self.task_id is not None:
            return BY_ID
        if self.message_id is not None:
            return BY_MESSAGE_ID
        if self.subject is not None:
            return BY_SUBJECT
        if self.recipient is not None:
            return BY_RECIPIENT
        if self.tag is not None:
            return BY_TAG
        if self.created_from is not None or self.created_to is not None:
            return BY_CREATED
        return BY_STATUS


# --- the query parameters ------------------------------------------------------------------------------


def parse(params: Mapping[str, Any], default: tuple[str, ...], *, status: bool = True) -> Search:
    """The search of a list's query parameters (or a bulk request's members): 422 naming every bad one.
    An absent or empty parameter is no condition; an absent ``status`` is ``default``, ``all`` every
    status (and ``status`` is read only where the list takes one)."""
    f = Fields({k: v for k, v in params.items() if k in PARAMETERS and v not in (None, "")})
    statuses = default
    if status and "status" in f.body:
        value = f.body["status"]
        if value == ALL:
            statuses = STATUSES
        elif value in STATUSES:
            statuses = (value,)
        else:
            f.fail("status", f"must be {ALL} or one of " + ", ".join(STATUSES))
    recipient = f.email("recipient", required=False)
    subject = f.string("subject", required=False, max_len=content.MAX_SUBJECT)
    message_id = f.string("message_id", required=False, max_len=MAX_MESSAGE_ID)
    task_id = _id(f)
    created_from = f.timestamp("created_from")
    created_to = f.timestamp("created_to")
    if created_from and created_to and created_from >= created_to:
        f.fail("created_to", "must be later than created_from")
    tag = f.string("tag", required=False, max_len=MAX_TAG)
    try:
        tag = content.tag_filter(tag)
    except ValidationFailed as exc:
        f.errors.update(exc.errors)
    if f.errors:
        raise ValidationFailed(f.errors)
    if message_id is not None:
        message_id = message_id.strip()
        if not message_id.startswith("<"):
            message_id = f"<{message_id}>"  # pasted without its angle brackets
    return Search(statuses, recipient, tag, subject, message_id, task_id, created_from, created_to)


def _id(f: Fields) -> int | None:
    value = f.body.get("id")
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        text = str(value)
    elif isinstance(value, str):
        text = value.strip()
    else:
        text = ""
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= MAX_ID:
        f.fail("id", "must be a task id (a positive integer)")
        return None
    return int(text)


# --- cursors: where the next page starts, in the order of the way that reads it -----------------------

# Cursor kinds: v1 (an id, the order of every way but two), c1 (created_at and id), s1 (the subject's
# indexed key and id). A cursor of another kind than the search's way is refused.
_KIND_OF_WAY = {BY_CREATED: "c1", BY_SUBJECT: "s1"}


def _encode(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def encode_cursor(way: str, row: Any) -> str:
    """The cursor that continues after ``row`` (a page's row or a scanned one) in ``way``'s order."""
    kind = _KIND_OF_WAY.get(way, "v1")
    if kind == "c1":
        return _encode(f"c1:{(row.created_at - _EPOCH) // _MICROSECOND}:{row.id}")
    if kind == "s1":
        return _encode(f"s1:{_encode(row.subject_key)}:{row.id}")
    return _encode(f"v1:{row.id}")


def decode_cursor(way: str, cursor: str | None) -> tuple | None:
    """The position after which ``way`` goes on: (id,), (created_at, id) or (subject key, id); None for
    the first page."""
    if not cursor:
        return None
    try:
        parts = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode().split(":")
        kind = _KIND_OF_WAY.get(way, "v1")
        if parts[0] != kind or len(parts) != (2 if kind == "v1" else 3) or not _is_id(parts[-1]):
            raise ValueError
        last = int(parts[-1])
        if kind == "c1":
            return (_EPOCH + int(parts[1]) * _MICROSECOND, last)
        if kind == "s1":
            key = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)).decode()
            if len(key) > SUBJECT_KEY_LENGTH:
                raise ValueError
            return (key, last)
        return (last,)
    except (ValueError, IndexError, OverflowError, binascii.Error):
        raise ValidationFailed(
            {"cursor": "is not a cursor this API returned for this search (start again without it)"}
        ) from None


def _is_id(text: str) -> bool:
    return text.isascii() and text.isdigit() and int(text) <= MAX_ID
