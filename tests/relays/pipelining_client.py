"""A small RFC 2920 (PIPELINING) SMTP client: the round-trip ceiling a sender can reach.

    with PipeliningClient("127.0.0.1", port, timeout=30) as client:
        client.send("a@example.test", ["b@example.test"], content)       # 2 round trips
        client.send_many(mails, chain=True)                                # ~1 round trip per mail

Why: smtplib waits for every reply, so each mail costs 4 round trips (MAIL, RCPT, DATA, content).
With PIPELINING the envelope (MAIL, every RCPT, DATA) goes in one write and its replies are read in
order, then the content: 2 round trips. ``chain=True`` also sends the next mail's envelope right behind
a mail's final dot (RFC 2920 allows the content to start a group), so in the steady state each mail
costs one round trip. The benchmark uses it to show what a relay that far away allows.

Deliberately minimal: no TLS, AUTH PLAIN only, one connection, blocking socket with a timeout.
"""

from __future__ import annotations

import base64
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Self

Mail = tuple[str, Sequence[str], bytes]  # (mail_from, rcpt_tos, content)


class Reply(NamedTuple):
    code: int
    text: str


class SmtpError(Exception):
    """The server answered something the session cannot go on from (greeting, EHLO, AUTH)."""

    def __init__(self, what: str, reply: Reply) -> None:
        super().__init__(f"{what}: {reply.code} {reply.text}")
        self.reply = reply


@dataclass(frozen=True)
class Transaction:
    """One mail's replies, in order: MAIL, each RCPT, DATA and (if DATA got 354) the final one."""

    replies: tuple[Reply, ...]

    @property
    def ok(self) -> bool:
        return self.replies[-1].code == 250 and len(self.replies) >= 4

    @property
    def final(self) -> Reply:
        return self.replies[-1]


class PipeliningClient:
    """One SMTP connection to a server that advertises PIPELINING (SmtpError if it does not)."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        timeout: float = 30.0,
        helo: str = "client.test",
        credentials: tuple[str, str] | None = None,
    ) -> None:
        self.host, self.port, self.timeout, self.helo = host, port, timeout, helo
        self.credentials = credentials
        self.extensions: set[str] = set()
        self._sock: socket.socket | None = None
        self._buffer = b""

    def connect(self) -> Self:
        """Connect, read the greeting, EHLO (and AUTH PLAIN if credentials were given)."""
        self._sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if (reply := self._read_reply()).code != 220:
            raise SmtpError("greeting", reply)
        self._sock.sendall(f"EHLO {self.helo}\r\n".encode())
        if (reply := self._read_reply()).code != 250:
            raise SmtpError("EHLO", reply)
        self.extensions = {line.split(" ")[0].upper() for line in reply.text.splitlines()[1:]}
        if "PIPELINING" not in self.extensions:
            raise SmtpError("the server does not offer PIPELINING", reply)
        if self.credentials is not None:
            user, password = self.credentials
            token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
            self._sock.sendall(f"AUTH PLAIN {token}\r\n".encode())
            if (reply := self._read_reply()).code != 235:
                raise SmtpError("AUTH", reply)
        return self

    def close(self) -> None:
        """QUIT (best effort) and close."""
        if self._sock is None:
            return
        try:
            self._sock.sendall(b"QUIT\r\n")
            self._read_reply()
        except (OSError, SmtpError):
            pass
        finally:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Self:
        return self.connect()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def send(self, mail_from: str, rcpt_tos: Sequence[str], content: bytes) -> Transaction:
        """One mail in 2 round trips: the envelope in one write, then the content."""
        return self.send_many([(mail_from, rcpt_tos, content)], chain=False)[0]

    def send_many(self, mails: Iterable[Mail], *, chain: bool = True) -> list[Transaction]:
        """Send each mail on this connection, in order; one Transaction per mail.

        chain=True writes each mail's content and the next mail's envelope together.
        """
        sock = self._connected()
        results: list[Transaction] = []
        pending: tuple[bytes, tuple[Reply, ...]] | None = None  # content owed after a 354
        queue = iter(mails)
        while True:
            mail = next(queue, None)
            out = b""
            if pending is not None:
                out += _data_block(pending[0])
            if mail is not None:
                out += _envelope(mail)
            if not out:
                return results
            sock.sendall(out)
            if pending is not None:
                results.append(Transaction((*pending[1], self._read_reply())))
                pending = None
            if mail is not None:
                replies = tuple(self._read_reply() for _ in range(len(mail[1]) + 2))
                if replies[-1].code != 354:
                    results.append(Transaction(replies))  # refused before the content: nothing owed
                elif not any(r.code == 250 for r in replies[1:-1]):
                    # A 354 although no recipient was accepted: end the empty message at once.
                    sock.sendall(b".\r\n")
                    results.append(Transaction((*replies, self._read_reply())))
                else:
                    pending = (mail[2], replies)
                if not chain and pending is not None:
                    sock.sendall(_data_block(pending[0]))
                    results.append(Transaction((*pending[1], self._read_reply())))
                    pending = None

    def _connected(self) -> socket.socket:
        if self._sock is None:
            raise RuntimeError("not connected")
        return self._sock

    def _read_reply(self) -> Reply:
        """One reply, possibly multi-line, from the socket's buffered stream."""
        sock = self._connected()
        lines = []
        while True:
            while b"\r\n" not in self._buffer:
                chunk = sock.recv(65536)
                if not chunk:
                    raise SmtpError("connection closed", Reply(0, "EOF"))
                self._buffer += chunk
            line, self._buffer = self._buffer.split(b"\r\n", 1)
            lines.append(line[4:].decode("utf-8", "replace"))
            if line[3:4] != b"-":
                return Reply(int(line[:3]), "\n".join(lines))


def _envelope(mail: Mail) -> bytes:
    mail_from, rcpt_tos, _ = mail
    lines = [f"MAIL FROM:<{mail_from}>", *(f"RCPT TO:<{rcpt}>" for rcpt in rcpt_tos), "DATA"]
    return "".join(line + "\r\n" for line in lines).encode()


def _data_block(content: bytes) -> bytes:
    """The content with CRLF line ends, dot-stuffed, and the final dot."""
    lines = content.replace(b"\r\n", b"\n").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines) + b".\r\n"
