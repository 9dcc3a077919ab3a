"""SMTP servers that misbehave on purpose, scripted byte by byte over raw sockets.

aiosmtpd cannot trickle a reply or flood one, so these servers speak just enough SMTP themselves
(EHLO, AUTH PLAIN/LOGIN, MAIL, RCPT, DATA, RSET, NOOP, QUIT) for a client to reach the misbehaviour:

    with TricklingServer(delay=0.2) as server:        # every byte of every reply 0.2 s apart
        mailer.send(SmtpAccount(server.host, server.port, "", "", SmtpSecurity.NONE), message)
    server.connections, server.commands, server.auth_attempts, server.messages   # what it saw

- ``HostileSmtpServer``: well-behaved unless told otherwise. ``replies={"MAIL": b"421 4.7.0 slow\\r\\n"}``
  makes a throttling server, ``extensions=["SIZE 1000"]`` one with a size limit, ``password=`` turns on AUTH,
  ``refuse={"bob@example.org": b"550 ...\\r\\n"}`` refuses one recipient, ``hang_up_after={"RCPT"}`` closes
  the connection after that reply (an empty reply: without one). It offers PIPELINING and, unlike a
  careful server, answers DATA with 354 whatever MAIL FROM and RCPT TO got: a client must check every
  reply of a pipelined group itself. ``early`` lists the commands whose reply was due while the client
  had already sent more (the client pipelined).
- ``TricklingServer``: the banner and/or every reply one byte at a time.
- ``FloodingServer``: answers one verb (EHLO by default) with an endless (or very long) ``250-`` reply.
- ``SilentServer``: goes quiet when one verb's reply is due (after DATA: accepted, never answered).
- ``SlowGoodbyeServer``: answers QUIT with ``221-`` lines trickled forever.

Plain TCP, or implicit TLS with ``tls_context=`` (a server context). One thread accepts, one thread per
client talks; ``stop()`` (or leaving the ``with`` block) ends them all within a fraction of a second, also
in the middle of a trickle or a flood.
"""

from __future__ import annotations

import base64
import socket
import ssl
import threading
from collections.abc import Iterable, Mapping

OK = b"250 2.0.0 OK\r\n"


class HostileSmtpServer:
    """A raw-socket SMTP server on 127.0.0.1 whose every reply can be replaced; counts what it sees.

    replies maps a verb to the reply it gets instead of the default; for DATA that is the reply after
    the message's final dot (the 354 always comes). password turns on AUTH (mechanisms ``auth``); a
    wrong password gets ``auth_refusal``. tls_context speaks TLS from the first byte (implicit TLS).
    """

    banner = b"220 hostile.test ESMTP\r\n"

    def __init__(
        self,
        *,
        extensions: Iterable[str] = ("PIPELINING", "8BITMIME"),
        replies: Mapping[str, bytes] | None = None,
        password: str | None = None,
        auth: str = "PLAIN LOGIN",
        auth_refusal: bytes = b"535 5.7.8 Authentication credentials invalid\r\n",
        tls_context: ssl.SSLContext | None = None,
        refuse: Mapping[str, bytes] | None = None,
        hang_up_after: Iterable[str] = (),
    ):
        self.host = "127.0.0.1"
        self.port = 0
        self.extensions = list(extensions) + ([f"AUTH {auth}"] if password is not None else [])
        self.replies = {verb.upper(): reply for verb, reply in (replies or {}).items()}
        self.password = password
        self.auth_refusal = auth_refusal
        self.tls_context = tls_context
        self.refuse = {address.lower(): reply for address, reply in (refuse or {}).items()}
        self.hang_up_after = {verb.upper() for verb in hang_up_after}
        self.early: list[str] = []  # commands whose reply was due while more input had arrived already
        self._current = threading.local()  # the command being answered on this thread's connection
        self.connections = 0  # TCP connections accepted
        self.commands: list[str] = []  # every command line received (AUTH without its credentials)
        self.auth_attempts = 0  # AUTH commands, whatever the outcome
        self.messages: list[bytes] = []  # the content of every DATA that ended with its dot
        self.aborted = 0  # DATA phases the client ended without the final dot (it hung up)
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._clients: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._listener: socket.socket | None = None

    # --- life cycle ---

    def start(self) -> HostileSmtpServer:
        self._listener = socket.create_server((self.host, 0))
        self._listener.settimeout(0.05)  # accept() wakes up to notice stop()
        self.port = self._listener.getsockname()[1]
        self._spawn(self._accept)
        return self

    def stop(self) -> None:
        self._stopped.set()
        with self._lock:
            clients = list(self._clients)
        for sock in clients:
            _shutdown(sock)  # wakes the thread blocked in a read or a write on it
        for thread in self._threads:
            thread.join(timeout=2)
        if self._listener is not None:
            self._listener.close()

    def __enter__(self) -> HostileSmtpServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def open_connections(self) -> int:
        """Clients connected right now."""
        with self._lock:
            return len(self._clients)

    def count(self, verb: str) -> int:
        """How many commands with this verb arrived."""
        with self._lock:
            return sum(1 for line in self.commands if line.split(" ", 1)[0].upper() == verb.upper())

    # --- hooks for subclasses ---

    def write(self, sock: socket.socket, data: bytes, *, banner: bool = False) -> None:
        """Send a reply (or the banner); subclasses slow it down."""
        self.note_early(sock)
        sock.sendall(data)

    def note_early(self, sock: socket.socket) -> None:
        """As a command's reply is due: has the client sent more already (it did not wait for it)?"""
        verb = getattr(self._current, "verb", None)
        if verb is not None and _pending(sock):
            self._current.verb = None  # once per command (DATA has two replies)
            with self._lock:
                self.early.append(verb)

    def answer(self, sock: socket.socket, reader, verb: str, default: bytes) -> None:
        """Send the reply to verb: the scripted one if any, else default."""
        self.write(sock, self.replies.get(verb, default))

    def goodbye(self, sock: socket.socket) -> None:
        """Answer QUIT; the connection is closed afterwards."""
        self.write(sock, b"221 2.0.0 Bye\r\n")

    # --- the protocol ---

    def _spawn(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True, name=type(self).__name__)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.settimeout(None)
            with self._lock:
                self.connections += 1
                self._clients.add(sock)
            self._spawn(self._serve, sock)

    def _serve(self, sock: socket.socket) -> None:
        reader = None
        try:
            if self.tls_context is not None:
                with self._lock:
                    self._clients.discard(sock)
                    sock = self.tls_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
                    self._clients.add(sock)
                sock.do_handshake()  # outside the lock: stop() must be able to interrupt it
            # Unbuffered: what the client sent beyond the current line stays in the socket, where
            # _pending() sees it.
            reader = sock.makefile("rb", buffering=0)
            self.write(sock, self.banner, banner=True)
            while not self._stopped.is_set():
                line = reader.readline(65536)
                if not line or not self._command(sock, reader, line.rstrip(b"\r\n").decode("latin-1")):
                    break
        except (OSError, ValueError):
            pass  # the client hung up (or sent garbage), or stop() shut the socket down
        finally:
            with self._lock:
                self._clients.discard(sock)
            if reader is not None:
                reader.close()
            sock.close()

    def _command(self, sock: socket.socket, reader, line: str) -> bool:
        """Handle one command line; False ends the conversation."""
        words = line.split(" ")
        verb = words[0].upper()
        with self._lock:
            self.commands.append(" ".join(words[:2]) if verb == "AUTH" else line)
        self._current.verb = verb
        if not self._reply_to(sock, reader, verb, words, line):
            return False
        if verb in self.hang_up_after:
            _shutdown(sock)
            return False
        return True

    def _reply_to(self, sock: socket.socket, reader, verb: str, words: list[str], line: str) -> bool:
        if verb in ("EHLO", "HELO"):
            lines = ["hostile.test", *self.extensions]
            reply = "".join(
                f"250{'-' if i < len(lines) - 1 else ' '}{text}\r\n" for i, text in enumerate(lines)
            )
            self.answer(sock, reader, verb, reply.encode())
        elif verb == "AUTH":
            with self._lock:
                self.auth_attempts += 1
            if verb in self.replies:
                self.answer(sock, reader, verb, b"")
            else:
                self._authenticate(sock, reader, words)
        elif verb == "RCPT" and _address(line).lower() in self.refuse:
            self.write(sock, self.refuse[_address(line).lower()])
        elif verb in ("MAIL", "RCPT", "RSET", "NOOP"):
            self.answer(sock, reader, verb, OK)
        elif verb == "DATA":
            self.write(sock, b"354 End data with <CR><LF>.<CR><LF>\r\n")
            content = b""
            while (chunk := reader.readline(65536)) not in (b".\r\n", b""):
                content += chunk
            if chunk == b"":  # the client hung up in the data phase: the transaction is aborted
                with self._lock:
                    self.aborted += 1
                return False
            with self._lock:
                self.messages.append(content)
            self.answer(sock, reader, verb, b"250 2.0.0 OK queued as HOSTILE\r\n")
        elif verb == "QUIT":
            self.goodbye(sock)
            return False
        else:
            self.write(sock, b"502 5.5.1 Unrecognized command\r\n")
        return True

    def _authenticate(self, sock: socket.socket, reader, words: list[str]) -> None:
        mechanism = words[1].upper() if len(words) > 1 else ""
        initial = words[2] if len(words) > 2 else None

        def ask(challenge: bytes) -> str:
            self.write(sock, b"334 " + base64.b64encode(challenge) + b"\r\n")
            return reader.readline(65536).strip().decode("latin-1")

        password = None
        if mechanism == "PLAIN":
            fields = base64.b64decode(initial or ask(b"")).split(b"\0")
            password = fields[-1].decode("utf-8", "replace")
        elif mechanism == "LOGIN":
            initial or ask(b"Username:")
            password = base64.b64decode(ask(b"Password:")).decode("utf-8", "replace")
        elif mechanism == "CRAM-MD5":
            ask(b"<1.1@hostile.test>")  # never verified: a wrong password is refused all the same
        ok = password is not None and password == self.password
        self.write(sock, b"235 2.7.0 Authentication successful\r\n" if ok else self.auth_refusal)


class TricklingServer(HostileSmtpServer):
    """Sends the banner (banner=True) and/or every reply (replies=True) one byte per delay seconds;
    with ``only=("MAIL", "RCPT", "DATA")`` just the replies to those verbs (the connection opens at
    full speed, the mail's transaction crawls)."""

    def __init__(
        self,
        delay: float = 0.2,
        *,
        banner: bool = True,
        replies: bool = True,
        only: Iterable[str] | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.delay, self.trickle_banner, self.trickle_replies = delay, banner, replies
        self.only = {verb.upper() for verb in only} if only is not None else None

    def write(self, sock: socket.socket, data: bytes, *, banner: bool = False) -> None:
        if self.only is not None or not (self.trickle_banner if banner else self.trickle_replies):
            sock.sendall(data)
            return
        self.trickle(sock, data)

    def answer(self, sock: socket.socket, reader, verb: str, default: bytes) -> None:
        if self.only is not None and verb in self.only:
            self.trickle(sock, self.replies.get(verb, default))
        else:
            super().answer(sock, reader, verb, default)

    def trickle(self, sock: socket.socket, data: bytes) -> None:
        for i in range(len(data)):
            if self._stopped.wait(self.delay):
                return
            sock.sendall(data[i : i + 1])


class FloodingServer(HostileSmtpServer):
    """Answers verb with ``250-`` continuation lines of width bytes: forever (lines=None) or lines of them,
    then ``250 OK``. flood_bytes counts what it managed to send.
    """

    def __init__(self, verb: str = "EHLO", *, lines: int | None = None, width: int = 80, **kwargs):
        super().__init__(**kwargs)
        self.verb, self.lines, self.flood_bytes = verb.upper(), lines, 0
        self._line = b"250-" + b"x" * (width - 6) + b"\r\n"
        self._per_chunk = max(1, 64_000 // width)
        self._chunk = self._line * self._per_chunk  # built once, so flooding allocates (almost) nothing

    def answer(self, sock: socket.socket, reader, verb: str, default: bytes) -> None:
        if verb != self.verb:
            return super().answer(sock, reader, verb, default)
        left = self.lines
        while left is None or left > 0:
            if self._stopped.is_set():
                return
            count = self._per_chunk if left is None else min(self._per_chunk, left)
            sock.sendall(self._chunk if count == self._per_chunk else self._line * count)
            self.flood_bytes += count * len(self._line)
            left = None if left is None else left - count
        sock.sendall(b"250 OK\r\n")


class SilentServer(HostileSmtpServer):
    """Goes quiet when the reply to verb is due (for DATA: after the message arrived) and stays so."""

    def __init__(self, verb: str = "DATA", **kwargs):
        super().__init__(**kwargs)
        self.verb = verb.upper()

    def answer(self, sock: socket.socket, reader, verb: str, default: bytes) -> None:
        if verb != self.verb:
            return super().answer(sock, reader, verb, default)
        while reader.readline(65536) and not self._stopped.is_set():
            pass  # read whatever comes, answer nothing, until the client hangs up
        raise ConnectionAbortedError  # ends this conversation


class SlowGoodbyeServer(HostileSmtpServer):
    """Answers QUIT with ``221-`` continuation lines, one byte per delay seconds, forever; counts quits."""

    def __init__(self, delay: float = 0.2, **kwargs):
        super().__init__(**kwargs)
        self.delay, self.quits = delay, 0

    def goodbye(self, sock: socket.socket) -> None:
        with self._lock:
            self.quits += 1
        while not self._stopped.wait(self.delay):
            sock.sendall(b"2")  # "221-..." never ends: the client must not wait for it
            for byte in b"21-bye\r\n":
                if self._stopped.wait(self.delay):
                    return
                sock.sendall(bytes([byte]))


def _pending(sock: socket.socket) -> bool:
    """Whether the client has sent bytes not read yet (the reader is unbuffered); a hang-up is not."""
    if isinstance(sock, ssl.SSLSocket):
        return sock.pending() > 0
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except OSError:  # BlockingIOError: nothing there
        return False


def _address(line: str) -> str:
    """The address in ``RCPT TO:<address>``."""
    return line.partition("<")[2].partition(">")[0]


def _shutdown(sock: socket.socket) -> None:
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)  # SSLSocket.shutdown() would drop its TLS state
    except OSError:
        pass
