"""The last guard: the exact bytes about to be sent are parsed back, and nothing is sent unless their
header names, From, To, Cc, Reply-To and the envelope are exactly the ones meant.

Builders have been fooled before: an encoded word in a subject that the email package of Python 3.11.7
decoded into real header lines while folding (``Bcc: victim@…``), a quoted display name that folding
unquoted into a second From address. The API refuses what it knows to be dangerous
(shared.tasks.content), and the builders write address headers in forms folding cannot change
(shared.delivery.addresses); this module does not trust either. It reads the header block as a reader
(or the next relay) would - lines, unfolding, names, address lists with their quoted strings, comments,
angle brackets and encoded words - with a parser of its own, so a bug in the email package cannot hide
from it. Whatever it refuses is a permanent failure of the mail (``UnsafeMessage``): the task is
cancelled with the reason, and nothing reaches the server.

It runs once per mail on both builders' output; it is cheap (a few microseconds for a common mail,
measured by tests/test_wirecheck.py's figures) because it reads only the header block.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from shared.delivery.addresses import spec, unique
from shared.errors import UnsafeMessage

# The header fields mailq writes at the top of every mail besides the user's own, and the MIME ones the
# builders add (Content-Transfer-Encoding is absent from a multipart mail).
_ALWAYS = ("from", "to", "subject", "message-id", "date", "mime-version", "content-type")
_OPTIONAL_MIME = "content-transfer-encoding"
_FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+")
_FOLD = re.compile(rb"\r\n([ \t])")
_SIMPLE_SPEC = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+@[A-Za-z0-9.-]+")
_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+")
_ENCODED_WORD = re.compile(r"=\?([^?*\s]+)(?:\*[^?\s]*)?\?([bBqQ])\?([^?\s]*)\?=")
# Outside quoted-strings: comments, groups, domain literals, escapes - nothing mailq writes.
_NOT_PLAIN = re.compile(r"[();:\[\]\\]")
_QP_ESCAPE = re.compile(r"=([0-9A-Fa-f]{2})")
_LINE_BREAKS = re.compile("[\r\n\x00\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")


def check(
    outgoing: Any,
    *,
    sender: str,
    recipient: str,
    from_name: str | None = None,
    recipient_name: str | None = None,
    cc: Sequence[str] = (),
    reply_to: str | None = None,
    headers: Sequence[tuple[str, str]] = (),
    bcc: Iterable[str] = (),
    **_content: Any,  # subject, body, html, attachments, message_id, date: not part of what is checked
) -> None:
    """Raise UnsafeMessage unless ``outgoing`` (an Outgoing: sender, recipients, data) is exactly the mail
    meant by these fields."""
    fields = _header_fields(outgoing.data)
    expected = [*_ALWAYS, *(name.lower() for name, _ in headers)]
    if cc:
        expected.append("cc")
    if reply_to:
        expected.append("reply-to")
    seen = [name for name, _ in fields if name != _OPTIONAL_MIME]
    if sorted(seen) != sorted(expected) or len(fields) - len(seen) > 1:
        _explain_names([name for name, _ in fields], expected)
    values = dict(fields)
    _same(values, "from", [(spec(sender), from_name)])
    _same(values, "to", [(spec(recipient), recipient_name)])
    if cc:
        _same(values, "cc", [(spec(a), None) for a in cc])
    if reply_to:
        _same(values, "reply-to", [(spec(reply_to), None)])
    envelope = unique([spec(recipient), *(spec(a) for a in cc), *bcc])
    if outgoing.sender != spec(sender) or list(outgoing.recipients) != envelope:
        raise UnsafeMessage("the envelope is not the one meant (sender or recipients differ)")


def _explain_names(names: list[str], expected: list[str]) -> None:
    """Raise UnsafeMessage saying how the header names differ from the ones meant."""
    seen, wanted = Counter(names), Counter(expected)
    unexpected = sorted(set(seen) - set(wanted) - {_OPTIONAL_MIME})
    if unexpected:
        raise UnsafeMessage(f"the message would carry header(s) nobody asked for: {', '.join(unexpected)}")
    for name in sorted({*wanted, _OPTIONAL_MIME}):
        most = 1 if name == _OPTIONAL_MIME else wanted[name]
        if seen[name] > most or (name != _OPTIONAL_MIME and seen[name] < most):
            raise UnsafeMessage(f"the message would carry {seen[name]} {_title(name)} header(s), not {most}")


def _title(name: str) -> str:
    return "-".join(part.capitalize() for part in name.split("-")).replace("Id", "ID")


def _header_fields(data: bytes) -> list[tuple[str, str]]:
    """(lower-cased name, unfolded value) of every field of the top header block, in order."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        raise UnsafeMessage("the message has no end to its header block")
    block = data[:end]
    crlf = block.count(b"\r\n")
    if block.count(b"\r") != crlf or block.count(b"\n") != crlf or b"\x00" in block:
        raise UnsafeMessage("a header line holds a bare CR, LF or NUL")
    if block[:1] in (b" ", b"\t"):
        raise UnsafeMessage("the header block begins with a continuation line")
    # Unfolding drops each CRLF before whitespace and keeps the whitespace (RFC 5322, 2.2.3).
    fields = []
    for line in _FOLD.sub(rb"\1", block).decode("utf-8", "replace").split("\r\n"):
        name, colon, value = line.partition(":")
        if not colon or not _FIELD_NAME.fullmatch(name):
            raise UnsafeMessage("a header line is not a field (no name and colon)")
        fields.append((name.lower(), value.strip(" \t")))
    return fields


def _same(values: dict[str, str], name: str, meant: list[tuple[str, str | None]]) -> None:
    """The address list in header ``name`` is exactly ``meant``: (address, display name) in order."""
    found = mailboxes(values[name])
    if found is None:
        raise UnsafeMessage(f"the {_title(name)} header is not a plain list of addresses")
    if [address for address, _ in found] != [address for address, _ in meant]:
        raise UnsafeMessage(
            f"the {_title(name)} header holds {len(found)} address(es) that are not the ones meant"
        )
    for (_, shown), (_, wanted) in zip(found, meant, strict=True):
        if shown != (wanted or ""):
            raise UnsafeMessage(f"the {_title(name)} header's display name is not the one meant")


def mailboxes(value: str) -> list[tuple[str, str]] | None:
    """(address, display name decoded) of each mailbox of an address-list value, as a reader splits it:
    at every comma outside quotes, comments and angle brackets. None when it is no plain address list
    (a group, a comment, unbalanced quotes or brackets, a display name that is not words or one quoted
    string)."""
    if '"' not in value:  # no quoted-string: the commas split it (the common case, at C speed)
        if _NOT_PLAIN.search(value):
            return None
        found = [_mailbox(part.strip(" \t")) for part in value.split(",")]
        return None if None in found else found  # type: ignore[return-value]
    parts, start, i, quoted, angle = [], 0, 0, False, False
    while i < len(value):
        char = value[i]
        if quoted:
            if char == "\\":
                i += 1
            elif char == '"':
                quoted = False
        elif char == '"':
            quoted = True
        elif char in "();:[]":  # comments, groups, domain literals: nothing mailq writes
            return None
        elif char == "<":
            if angle:
                return None
            angle = True
        elif char == ">":
            if not angle:
                return None
            angle = False
        elif char == "," and not angle:
            parts.append(value[start:i])
            start = i + 1
        i += 1
    if quoted or angle:
        return None
    parts.append(value[start:])
    found = []
    for part in parts:
        box = _mailbox(part.strip(" \t"))
        if box is None:
            return None
        found.append(box)
    return found


def _mailbox(text: str) -> tuple[str, str] | None:
    if not text:
        return None
    if "<" not in text:
        return (text, "") if _is_addr_spec(text) else None
    if not text.endswith(">"):
        return None
    opening = _outside_quotes(text, "<")
    if opening is None:
        return None
    shown, address = text[:opening], text[opening + 1 : -1]
    if not _is_addr_spec(address):
        return None
    name = _phrase(shown.strip(" \t"))
    return None if name is None else (address, name)


def _outside_quotes(text: str, wanted: str) -> int | None:
    """Where ``wanted`` first occurs outside a quoted-string."""
    quoted, i = False, 0
    while i < len(text):
        char = text[i]
        if quoted and char == "\\":
            i += 1
        elif char == '"':
            quoted = not quoted
        elif char == wanted and not quoted:
            return i
        i += 1
    return None


def _is_addr_spec(text: str) -> bool:
    """local@domain with a dot-atom or one quoted-string before the last @, no whitespace outside quotes."""
    if _SIMPLE_SPEC.fullmatch(text):
        return True
    local, at, domain = text.rpartition("@")
    if not at or not local or not domain or any(c in domain for c in ' \t"<>@,'):
        return False
    if local.startswith('"'):
        return len(local) >= 2 and local.endswith('"') and _unquote(local) is not None
    # Dots anywhere (a leading, trailing or doubled dot is obsolete syntax, but changes no mailbox).
    return all(
        not part or _ATOM.fullmatch(part) or not part.isascii() for part in local.split(".")
    ) and not any(c in local for c in " \t")


def _unquote(text: str) -> str | None:
    """The content of one quoted-string (``"..."``), or None when it is not exactly one."""
    out, i = [], 1
    while i < len(text) - 1:
        char = text[i]
        if char == "\\":
            i += 1
            if i >= len(text) - 1:
                return None
            char = text[i]
        elif char == '"':
            return None
        out.append(char)
        i += 1
    return "".join(out)


def _phrase(text: str) -> str | None:
    """A display name as a reader shows it: one quoted-string, or words (atoms and encoded words, the
    whitespace between two encoded words dropped as RFC 2047 says). None for anything else."""
    if not text:
        return ""
    if text.startswith('"'):
        name = _unquote(text) if text.endswith('"') else None
        return name if name is not None and not _LINE_BREAKS.search(name) else None
    out: list[str] = []
    previous_encoded = False
    for word in text.split():
        match = _ENCODED_WORD.fullmatch(word)
        if match:
            decoded = _decode(*match.groups())
            if decoded is None or _LINE_BREAKS.search(decoded):
                return None
            out.append(decoded if previous_encoded or not out else " " + decoded)
            previous_encoded = True
        elif _ATOM.fullmatch(word) or not word.isascii():
            out.append(word if not out else " " + word)
            previous_encoded = False
        else:
            return None
    return "".join(out)


def _decode(charset: str, encoding: str, text: str) -> str | None:
    try:
        if encoding in "bB":
            raw = base64.b64decode(text, validate=True)
        else:
            raw = _QP_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), text.replace("_", " ")).encode("latin-1")
        return raw.decode(charset)
    except (binascii.Error, LookupError, UnicodeError, ValueError):
        return None
