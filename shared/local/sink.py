"""The local SMTP sink for development: accepts every message (and any login) and keeps it on disk.

Messages land in ``<data_dir>/mailbox`` as one ``.eml`` file each, named so that sorting by name is
sorting by arrival, with one JSON line per message appended to ``index.jsonl`` beside them.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import itertools
import json
import logging
import os
import signal
import socket
import threading
from datetime import UTC, datetime
from email.parser import BytesHeaderParser
from email.policy import default as default_policy
from pathlib import Path

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Session

log = logging.getLogger(__name__)

MAILBOX = "mailbox"
INDEX = "index.jsonl"


def _accept_any_login(server, session, envelope, mechanism, auth_data) -> AuthResult:
    # Development only: users register with whatever username and password they like.
    return AuthResult(success=True)


class _Session(Session):
    """aiosmtpd 1.4 assigns the legacy ``Session.login_data`` on every successful AUTH, and that
    property logs "Session.login_data is deprecated" on each assignment: a warning about the library's
    own code, once per mail. A plain attribute of the same name takes the assignment silently; nothing
    here reads it (``auth_data`` is the supported one)."""

    login_data = None


class _SMTP(SMTP):
    def _create_session(self) -> Session:
        return _Session(self.loop)


class _Controller(Controller):
    def factory(self) -> SMTP:  # aiosmtpd's documented hook for a custom server class
        return _SMTP(self.handler, **self.SMTP_kwargs)


class _MailboxHandler:
    def __init__(self, mailbox: Path):
        self.mailbox = mailbox
        self._sequence = itertools.count(1)  # keeps names unique and ordered within one microsecond

    async def handle_EHLO(self, server, session, envelope, hostname: str, responses: list[str]) -> list[str]:
        """Offer PIPELINING (RFC 2920): aiosmtpd answers pipelined commands in order, it just does not
        say so; senders then put MAIL FROM, RCPT TO and DATA in one write, as with a real relay."""
        session.host_name = hostname  # aiosmtpd leaves this to a handler with this hook
        return [*responses[:-1], "250-PIPELINING", responses[-1]]

    async def handle_DATA(self, server, session, envelope) -> str:
        content: bytes = envelope.original_content or envelope.content or b""
        now = datetime.now(UTC)
        name = f"{now:%Y%m%dT%H%M%S.%fZ}-{next(self._sequence):06d}.eml"
        temporary = self.mailbox / f".{name}.tmp"
        temporary.write_bytes(content)
        os.replace(temporary, self.mailbox / name)  # readers never see half a message
        headers = BytesHeaderParser(policy=default_policy).parsebytes(content)
        record = {
            "received_at": now.isoformat(),
            "mail_from": envelope.mail_from,
            "rcpt_tos": list(envelope.rcpt_tos),
            "subject": _header(headers, "Subject"),
            "message_id": _header(headers, "Message-ID"),
            "file": name,
        }
        # One write of one line in append mode: a reader sees whole lines or a torn last line it skips.
        with open(self.mailbox / INDEX, "a", encoding="utf-8") as index:
            index.write(json.dumps(record, ensure_ascii=False) + "\n")
        return f"250 OK queued as {name[:-4]}"


def _header(headers, name: str) -> str | None:
    try:
        value = headers[name]
    except Exception:  # a malformed header must not cost the message; the .eml keeps it raw
        return None
    return None if value is None else str(value)


class Sink:
    """An aiosmtpd server on host:port that stores what it receives under data_dir/mailbox."""

    def __init__(self, data_dir: Path, host: str = "127.0.0.1", port: int = 1025):
        self.data_dir = Path(data_dir)
        self.host = host
        self.port = port  # 0 picks a free port at start(); read it back from here
        self._controller: Controller | None = None

    @property
    def mailbox(self) -> Path:
        return self.data_dir / MAILBOX

    def __enter__(self) -> Sink:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> None:
        """Listen; raise RuntimeError naming the address when it cannot be bound."""
        # aiosmtpd reports a bind failure only after its ready timeout, and obscurely; try it first.
        self.port = self._probe_port()
        self.mailbox.mkdir(parents=True, exist_ok=True)
        controller = _Controller(
            _MailboxHandler(self.mailbox),
            hostname=self.host,
            port=self.port,
            server_hostname="mailq-sink",  # the default, socket.getfqdn(), can stall on a slow resolver
            authenticator=_accept_any_login,
            auth_require_tls=False,
        )
        try:
            controller.start()
        except OSError as exc:  # lost the port between the probe and the bind
            raise self._cannot_listen(exc) from exc
        self._controller = controller
        log.info("SMTP sink listening on %s:%d, mailbox %s", self.host, self.port, self.mailbox)

    def stop(self) -> None:
        """Stop listening; safe to call twice."""
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def _probe_port(self) -> int:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            # asyncio sets SO_REUSEADDR too; without it a port in TIME_WAIT would look taken.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((self.host, self.port))
            except OSError as exc:
                raise self._cannot_listen(exc) from exc
            return probe.getsockname()[1]

    def _cannot_listen(self, exc: OSError) -> RuntimeError:
        if exc.errno == errno.EADDRINUSE:
            reason = "address already in use (use --smtp-port)"
        else:
            reason = exc.strerror or str(exc)
        return RuntimeError(f"SMTP sink cannot listen on {self.host}:{self.port}: {reason}")


def _index_records(data_dir: Path):
    try:
        lines = (Path(data_dir) / MAILBOX / INDEX).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return
    for line in lines:
        try:
            yield json.loads(line)
        except ValueError:
            continue  # a line still being written


def read_mailbox(data_dir: Path, limit: int = 20) -> list[dict]:
    """The latest `limit` messages' index records (received_at, mail_from, rcpt_tos, subject,
    message_id, file), newest last."""
    return list(collections.deque(_index_records(data_dir), maxlen=limit)) if limit > 0 else []


def count_message_ids(data_dir: Path) -> collections.Counter:
    """How many times each Message-ID arrived; more than one means a duplicate delivery."""
    return collections.Counter(record.get("message_id") for record in _index_records(data_dir))


def serve_forever(data_dir: Path, host: str = "127.0.0.1", port: int = 1025) -> None:
    """Run the sink until SIGTERM or SIGINT; call it from the main thread of its own process."""
    run_until_stopped(Sink(data_dir, host, port))


def run_until_stopped(server) -> None:
    """Start ``server`` (anything with ``start()`` and ``stop()``: the sink, an aiosmtpd controller) and
    stop it when SIGTERM or SIGINT comes. Main thread only."""
    with stop_signals() as wait:
        server.start()  # a server that did not start has nothing to stop
        try:
            wait()
        finally:
            server.stop()


@contextlib.contextmanager
def stop_signals():
    """From here on SIGTERM and SIGINT ask to stop instead of killing the process; yields a function
    that blocks until one came. Main thread only; the previous handlers come back afterwards. The SMTP
    servers of the benchmark and the fault runs use it too."""
    stopping = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stopping.set()) for sig in (signal.SIGTERM, signal.SIGINT)}

    def wait() -> None:
        while not stopping.wait(0.5):  # a timed wait lets the signal handler run promptly
            pass

    try:
        yield wait
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
