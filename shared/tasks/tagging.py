"""A mail's tags (``{"key": "value"}`` at enqueue, up to MAX_TAGS) and the ``tag`` filter of the task
lists ("key:value"): the one set of rules both are checked by."""

from __future__ import annotations

import re

from shared.errors import ValidationFailed
from shared.validation import Fields

MAX_TAGS = 10
MAX_TAG_VALUE = 256
TAG_KEY = re.compile(r"^[A-Za-z0-9_-]{1,40}$")


def tags_of(f: Fields) -> dict[str, str]:
    value = f.body.get("tags")
    if value is None:
        return {}
    if not isinstance(value, dict):
        f.fail("tags", "must be an object of key: value strings")
        return {}
    if len(value) > MAX_TAGS:
        f.fail("tags", f"must hold at most {MAX_TAGS} tags")
        return {}
    for key, text in value.items():
        if not TAG_KEY.match(key):
            f.fail("tags", f"key {key[:50]!r} must be 1 to 40 of A-Z, a-z, 0-9, _ and -")
        elif not isinstance(text, str) or len(text) > MAX_TAG_VALUE or not text.isprintable():
            f.fail(f"tags.{key}", f"must be a string of at most {MAX_TAG_VALUE} printable characters")
    return {} if any(k == "tags" or k.startswith("tags.") for k in f.errors) else dict(value)


def tag_filter(param: str | None) -> str | None:
    """The ``tag`` query parameter ("key:value") as task_tags stores it, or None if absent or empty."""
    if param is None or param == "":
        return None
    key, colon, value = param.partition(":")
    if not colon or not TAG_KEY.match(key) or len(value) > MAX_TAG_VALUE or not value.isprintable():
        raise ValidationFailed(
            {
                "tag": "must be key:value: a key of 1 to 40 of A-Z, a-z, 0-9, _ and -, a colon, and a value "
                f"of at most {MAX_TAG_VALUE} printable characters"
            }
        )
    return param
