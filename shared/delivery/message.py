"""Building a message: headers guarded against injection, a stable Message-ID, and its wire form.

The address headers are written by shared/delivery/addresses.py (folding cannot unquote a display name),
and every wire form ``compose`` makes is parsed back by shared/delivery/wirecheck.py before it may be
sent. Talking SMTP is shared/delivery/mailer.py's job; this module never opens a socket.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from email.contentmanager import _encode_text  # the one set_content uses; tests pin the equivalence
from email.generator import BytesGenerator
from email.headerregistry import HeaderRegistry
from email.message import EmailMessage
from email.policy import default as default_policy
from email.utils import format_datetime

from shared.delivery import wirecheck
from shared.delivery.addresses import address_headers, spec, unique
from shared.errors import PermanentSmtpError
from shared.tasks.content import Attachment
from shared.validation import ENCODED_WORD, LINE_BREAKS

_DOT_ATOM = re.compile(r"^[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*$")


class _CachedHeaderRegistry(HeaderRegistry):
    """The default header registry, except that each header class is made once.

    ``HeaderRegistry.__getitem__`` builds a new class with ``type()`` on every header it parses; in a
    sender that is the largest single cost of a message (profiled: ~12 % of the sender's CPU).
    """

    def __init__(self):
        super().__init__()
        self._classes: dict[str, type] = {}

    def __getitem__(self, name: str) -> type:
        key = name.lower()
        cls = self._classes.get(key)
        if cls is None:
            cls = self._classes[key] = super().__getitem__(name)
        return cls


# email.policy.default in every rule, except: header classes are cached, and a header we set raw (an
# ASCII value the user wrote, e.g. a long List-Unsubscribe URL) is written as set instead of being
# refolded into RFC 2047 encoded-words that would break it.
POLICY = default_policy.clone(header_factory=_CachedHeaderRegistry(), refold_source="none")
_FOLD_AT = 78  # RFC 5322's recommended line length; our raw headers are folded at spaces near it


def build_message(
    *,
    sender: str,
    recipient: str,
    subject: str,
    body: str | None,
    message_id: str,
    date: datetime,
    html: str | None = None,
    from_name: str | None = None,
    recipient_name: str | None = None,
    cc: Sequence[str] = (),
    reply_to: str | None = None,
    headers: Sequence[tuple[str, str]] = (),
    attachments: Sequence[Attachment] = (),
) -> EmailMessage:
    """The message under the default policy: the text part, the HTML part (both: multipart/alternative,
    text first), attachments (multipart/mixed). Bcc is no argument: it never reaches a header.

    Raise ValueError for CR, LF or NUL (or another line break) in a header, or a mail without a part.
    """
    _refuse_line_breaks(
        [sender, recipient, subject, message_id, from_name or "", recipient_name or "", reply_to or ""],
        [*cc, *(n for n, _ in headers), *(v for _, v in headers), *(a.filename for a in attachments)],
    )
    if body is None and html is None:
        raise ValueError("a mail needs a text or an HTML part")
    message = EmailMessage(policy=POLICY)
    for name, value in address_headers(
        sender, recipient, from_name=from_name, recipient_name=recipient_name, cc=cc, reply_to=reply_to
    ):
        message.set_raw(name, value)  # written as built: folding cannot unquote a display name
    message["Subject"] = subject
    message["Message-ID"] = message_id
    message["Date"] = format_datetime(date)  # a naive datetime is written as UTC with "-0000"
    for name, value in headers:
        if value.isascii():
            message.set_raw(name, _fold(value))  # exactly as written (a URL, a Message-ID list)
        else:
            message[name] = value  # RFC 2047 (only X-… headers may hold non-ASCII text)
    if body is not None:
        message.set_content(body, cte=_text_cte(body))
        if html is not None:
            message.add_alternative(html, subtype="html", cte=_text_cte(html))
    else:
        message.set_content(html, subtype="html", cte=_text_cte(html))
    for attachment in attachments:
        maintype, _, subtype = attachment.content_type.partition("/")
        filename: str | tuple[str, str, str] = attachment.filename
        if ENCODED_WORD.search(attachment.filename):  # RFC 2231 (percent-encoded): nothing to decode
            filename = ("utf-8", "", attachment.filename)
        message.add_attachment(attachment.data, maintype, subtype, filename=filename)
    for part in message.walk():
        if part is not message:
            del part["MIME-Version"]  # the email package repeats it in every part it makes; once is enough
    return message


def _refuse_line_breaks(*groups: Iterable[str]) -> None:
    for group in groups:
        for value in group:
            if LINE_BREAKS.search(value):
                # The API refuses these with a 422 already; this keeps a header injection out if one slips by.
                raise ValueError("a header must not contain CR, LF or NUL (or another line break)")


def package(*, bcc: Iterable[str] = (), **fields) -> Outgoing:
    """The email package's wire form of a mail (``build_message``) with the envelope meant, unchecked:
    ``compose`` checks it (and takes the direct path when it can)."""
    bcc = tuple(bcc)
    _refuse_line_breaks(bcc)
    message = build_message(**fields)
    sender = spec(fields["sender"])
    shown = (spec(fields["recipient"]), *(spec(a) for a in fields.get("cc", ())))
    international = not all(a.isascii() for a in (sender, *shown, *bcc))
    options = ("SMTPUTF8", "BODY=8BITMIME") if international else ()
    return Outgoing(sender, tuple(unique((*shown, *bcc))), _flatten(message, international), options)


def compose(*, bcc: Iterable[str] = (), **fields) -> Outgoing:
    """The envelope and wire bytes of a mail (``build_message``'s fields, plus ``bcc``), checked by the
    last guard (shared.delivery.wirecheck): UnsafeMessage unless its headers, From, To, Cc and envelope
    are exactly the ones meant.

    The common mail - one text or one HTML part, short ASCII headers, no attachments - is written
    directly: the email package spends most of a sender's CPU building and flattening a message
    (profiled: about a third of it), for bytes that are fixed by its rules. Anything else goes through
    the email package. ``tests/test_message.py`` holds the direct bytes equal to the email package's
    for every input the direct path takes.
    """
    bcc = tuple(bcc)
    _refuse_line_breaks(bcc)
    data = _plain_wire(**fields) if all(a.isascii() for a in bcc) else None
    if data is None:
        outgoing = package(bcc=bcc, **fields)
    else:
        shown = (spec(fields["recipient"]), *(spec(a) for a in fields.get("cc", ())))
        outgoing = Outgoing.direct(spec(fields["sender"]), shown, bcc, data)
    wirecheck.check(outgoing, bcc=bcc, **fields)
    return outgoing


# What the direct path takes: a subject the email package writes back unchanged - printable ASCII words
# separated by single spaces, no encoded-word look-alike - and ASCII address headers as
# shared.delivery.addresses writes them for either path, on header lines no longer than the policy's 78
# characters. The body is encoded by the email package's own function.
_WORDS = re.compile(r"[\x21-\x7e]+(?: [\x21-\x7e]+)*")
_MSG_ID = re.compile(r"<[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+@[A-Za-z0-9.-]+>")
_MAX_LINE = 78
_NEWLINE = re.compile(r"\r\n|\r|\n")
_CRLF_POLICY = POLICY.clone(linesep="\r\n")


def _plain_wire(
    *,
    sender: str,
    recipient: str,
    subject: str,
    body: str | None,
    message_id: str,
    date: datetime,
    html: str | None = None,
    from_name: str | None = None,
    recipient_name: str | None = None,
    cc: Sequence[str] = (),
    reply_to: str | None = None,
    headers: Sequence[tuple[str, str]] = (),
    attachments: Sequence[Attachment] = (),
) -> bytes | None:
    """The wire bytes of a one-part mail with short ASCII headers, or None to leave it to the email
    package."""
    if attachments or (body is None) == (html is None):
        return None
    text, subtype = (body, "plain") if body is not None else (html, "html")
    if not _WORDS.fullmatch(subject) or "=?" in subject or not _MSG_ID.fullmatch(message_id):
        return None
    named = address_headers(
        sender, recipient, from_name=from_name, recipient_name=recipient_name, cc=cc, reply_to=reply_to
    )
    named += [("Subject", subject), ("Message-ID", message_id), ("Date", format_datetime(date))]
    out = []
    for name, value in named:
        if len(name) + 2 + len(value) > _MAX_LINE or not value.isascii() or "\n" in value:
            return None
        out.append(f"{name}: {value}\r\n")
    for name, value in headers:
        if not (name.isascii() and value.isascii()) or LINE_BREAKS.search(name + value):
            return None
        out.append(_CRLF_POLICY.fold_binary(name, _fold(value)).decode("ascii"))
    # The part's encoding and payload by the email package's own function, as set_content makes them.
    cte, payload = _encode_text(text, "utf-8", _text_cte(text), POLICY)
    out.append(
        f'Content-Type: text/{subtype}; charset="utf-8"\r\n'
        f"Content-Transfer-Encoding: {cte}\r\nMIME-Version: 1.0\r\n\r\n"
    )
    out.append(_NEWLINE.sub("\r\n", payload))  # what the generator does to the payload's line ends
    return "".join(out).encode("ascii")


def _text_cte(text: str) -> str | None:
    """7bit for ASCII (the email package decides); quoted-printable keeps mostly-Latin text readable and
    7-bit clean for servers without 8BITMIME; base64 when it is shorter (e.g. Cyrillic, CJK)."""
    if text.isascii():
        return None
    data = text.encode("utf-8", "surrogateescape")
    non_ascii = len(data) - len(data.decode("ascii", "ignore"))
    return "quoted-printable" if 3 * non_ascii < len(data) // 2 else "base64"


def _fold(value: str) -> str:
    """An ASCII header value folded at spaces into lines of about _FOLD_AT (a longer word stays whole)."""
    lines, line = [], ""
    for word in value.split(" "):
        if line and len(line) + 1 + len(word) > _FOLD_AT:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    lines.append(line)
    return "\n ".join(lines)


def message_id_for(task_id: int, sender_email: str) -> str:
    """The task's Message-ID, the same on every retry so a duplicate delivery can be recognised."""
    _, at, domain = sender_email.rpartition("@")
    domain = domain.strip().lower() if at else ""
    try:
        domain = domain.encode("idna").decode("ascii")
    except UnicodeError:
        domain = ""
    if not _DOT_ATOM.match(domain):
        domain = "mailq.invalid"
    digest = hashlib.sha256(f"{task_id}:{sender_email.lower()}".encode()).hexdigest()[:12]
    return f"<mailq.{task_id}.{digest}@{domain}>"


@dataclass(frozen=True)
class Outgoing:
    """The envelope and the wire bytes of one message, computed once however often we connect."""

    sender: str
    recipients: tuple[str, ...]  # To, Cc and Bcc, each address once (in that order)
    data: bytes  # CRLF line endings, not yet dot-stuffed
    options: tuple[str, ...]  # MAIL FROM parameters the addresses need (SMTPUTF8)

    @classmethod
    def direct(cls, sender: str, shown: Iterable[str], bcc: Iterable[str], data: bytes) -> Outgoing:
        """From ASCII addresses known to be well formed (the direct path of ``compose``)."""
        return cls(sender, tuple(unique((*shown, *bcc))), data, ())

    @classmethod
    def of(cls, message: EmailMessage, bcc: Iterable[str] = ()) -> Outgoing:
        """The envelope from the headers plus ``bcc`` (which no header shows).

        Raise PermanentSmtpError unless From holds exactly one address and To at least one."""
        (sender,) = _addresses(message, "From", exactly_one=True)
        recipients = unique((*_addresses(message, "To"), *_addresses(message, "Cc", optional=True), *bcc))
        international = not all(a.isascii() for a in (sender, *recipients))
        options = ("SMTPUTF8", "BODY=8BITMIME") if international else ()
        return cls(sender, tuple(recipients), _flatten(message, international), options)


def _flatten(message: EmailMessage, international: bool) -> bytes:
    """The wire bytes: CRLF line ends, UTF-8 headers only for a mail that needs SMTPUTF8 anyway, and
    multipart boundaries drawn from the Message-ID (_SeededGenerator)."""
    buffer = io.BytesIO()
    policy = message.policy.clone(linesep="\r\n", utf8=international)
    _SeededGenerator(buffer, policy=policy, seed=str(message["Message-ID"] or "")).flatten(message)
    return buffer.getvalue()


class _SeededGenerator(BytesGenerator):
    """The email package's generator, except that a multipart's boundary comes from the Message-ID
    instead of a random number: the same mail is the same bytes on every try (a duplicate after a lost
    reply is the same message), and ``GET /task/{id}/raw`` rebuilds exactly what was sent. A boundary
    found in the parts' text is lengthened as the email package does."""

    def __init__(self, outfp, *args, seed: str = "", shared: list[int] | None = None, **kwargs):
        super().__init__(outfp, *args, **kwargs)
        self._seed = seed
        self._made = shared if shared is not None else [0]  # boundaries made so far, clones included

    def clone(self, fp):
        options = {"policy": self.policy, "seed": self._seed, "shared": self._made}
        return type(self)(fp, self._mangle_from_, None, **options)

    def _make_boundary(self, text=None):
        self._made[0] += 1
        digest = hashlib.sha256(f"{self._seed}:{self._made[0]}".encode()).hexdigest()
        boundary = "=" * 15 + f"{int(digest[:15], 16):019d}" + "=="
        candidate, counter = boundary, 0
        while text is not None and self._compile_re(
            "^--" + re.escape(candidate) + "(--)?$", re.MULTILINE
        ).search(text):
            candidate = f"{boundary}.{counter}"
            counter += 1
        return candidate


def _addresses(message: EmailMessage, name: str, *, exactly_one=False, optional=False) -> list[str]:
    found = [a.addr_spec for a in getattr(message[name], "addresses", ()) if a.addr_spec]
    if (exactly_one and len(found) != 1) or (not found and not optional):
        raise PermanentSmtpError(
            f"the message needs {'exactly' if exactly_one else 'at least'} one {name} address"
        )
    return found
