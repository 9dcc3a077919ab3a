"""Writing address headers (From, To, Cc, Reply-To) ourselves, so folding can never unquote a display name.

The email package folds a long quoted display name by breaking it into words, and in doing so drops the
quotes: ``"ceo@bank.example, Chief …" <sender@…>`` went out as ``ceo@bank.example, Chief …
<sender@…>``, two mailboxes to every reader, the first one chosen by the tenant (every Python version).
Here a display name is written in one of three forms, none of which a fold can change:

- plain words (atext separated by single spaces) as they are;
- other printable ASCII as one quoted-string, never broken (a name is at most 256 characters, so the
  line stays far below RFC 5322's 998);
- anything else (non-ASCII, or text that looks like an encoded word) as RFC 2047 encoded words of our own,
  each at most 75 characters, with a fold only *between* two of them, which decoders drop.

A header is folded only between mailboxes and between a display name and its ``<address>``. The values
carry ``"\\n "`` where they fold: the policy writes each as CRLF and a space (shared.delivery.message).
"""

from __future__ import annotations

import base64
import functools
import re
from collections.abc import Iterable, Sequence
from email.headerregistry import Address

from shared.validation import ENCODED_WORD

# RFC 5322 atext: what a display name may hold without quotes.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_PLAIN_WORDS = re.compile(rf"{_ATEXT}+(?: {_ATEXT}+)*")
_PRINTABLE_ASCII = re.compile(r"[\x20-\x7e]*")
_MAX_LINE = 78  # RFC 5322's recommended line length: fold between mailboxes beyond it
_EW_PREFIX, _EW_SUFFIX = "=?utf-8?b?", "?="
_EW_BYTES = 45  # UTF-8 bytes per encoded word: 60 base64 characters, 72 with prefix and suffix (<= 75)


@functools.lru_cache(maxsize=4096)  # a tenant's few addresses, over and over
def spec(address: str) -> str:
    """How an address is written between ``<`` and ``>`` and on the envelope (the local part quoted
    when it must be, as the email package does)."""
    username, _, domain = address.rpartition("@")
    return Address(username=username, domain=domain).addr_spec


def display(name: str) -> str:
    """A display name in a form that folding cannot change (see the module's docstring)."""
    if _PLAIN_WORDS.fullmatch(name) and not ENCODED_WORD.search(name):
        return name
    if _PRINTABLE_ASCII.fullmatch(name) and not ENCODED_WORD.search(name):
        return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return "\n ".join(encoded_words(name))


def encoded_words(text: str) -> list[str]:
    """``text`` as RFC 2047 encoded words (UTF-8, base64), each whole characters and at most 75 long.

    A word ends after a space of the text when one is near: RFC 2047 readers join adjacent encoded words
    without the folding whitespace between them, and the few that keep it (Python's own address parser)
    then show a doubled space rather than a word cut in two."""
    words, chunk, size = [], [], 0
    for char in text:
        width = len(char.encode("utf-8", "surrogatepass"))
        if chunk and size + width > _EW_BYTES:
            cut = len(chunk) - chunk[::-1].index(" ") if " " in chunk[len(chunk) // 2 :] else len(chunk)
            words.append(_word("".join(chunk[:cut])))
            chunk = chunk[cut:]
            size = sum(len(c.encode("utf-8", "surrogatepass")) for c in chunk)
        chunk.append(char)
        size += width
    if chunk or not words:
        words.append(_word("".join(chunk)))
    return words


def _word(text: str) -> str:
    return _EW_PREFIX + base64.b64encode(text.encode("utf-8", "surrogatepass")).decode("ascii") + _EW_SUFFIX


def mailbox(address: str, name: str | None = None) -> str:
    """``Name <address>`` (or the bare address), the name written by ``display``."""
    if not name:
        return spec(address)
    shown = display(name)
    angle = f"<{spec(address)}>"
    last = shown.rpartition("\n ")[2]
    return f"{shown}\n {angle}" if len(last) + 1 + len(angle) > _MAX_LINE - 6 else f"{shown} {angle}"


def field(mailboxes: Sequence[str], header: str) -> str:
    """Mailboxes joined by commas, a new line begun before one that would pass 78 characters."""
    out: list[str] = []
    column = len(header) + 2
    for i, box in enumerate(mailboxes):
        first_line = box.partition("\n ")[0]
        if i:
            if column + 2 + len(first_line) > _MAX_LINE:
                out.append(",\n ")
                column = 1
            else:
                out.append(", ")
                column += 2
        out.append(box)
        lines = box.split("\n ")
        column = (column + len(lines[0])) if len(lines) == 1 else 1 + len(lines[-1])
    return "".join(out)


def address_headers(
    sender: str,
    recipient: str,
    *,
    from_name: str | None = None,
    recipient_name: str | None = None,
    cc: Iterable[str] = (),
    reply_to: str | None = None,
) -> list[tuple[str, str]]:
    """(name, value) of From, To, Cc (when any) and Reply-To (when set), values folded with ``"\\n "``."""
    headers = [
        ("From", field([mailbox(sender, from_name)], "From")),
        ("To", field([mailbox(recipient, recipient_name)], "To")),
    ]
    cc = list(cc)
    if cc:
        headers.append(("Cc", field([mailbox(a) for a in cc], "Cc")))
    if reply_to:
        headers.append(("Reply-To", field([mailbox(reply_to)], "Reply-To")))
    return headers


def unique(addresses: Iterable[str]) -> list[str]:
    """Each mailbox once, in order, compared without case (the same mailbox in To and Bcc gets one copy)."""
    seen: set[str] = set()
    out = []
    for address in addresses:
        if address.lower() not in seen:
            seen.add(address.lower())
            out.append(address)
    return out
