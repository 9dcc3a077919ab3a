"""An SMTP relay (aiosmtpd) that refuses the way a real provider's relay does, and counts it.

    with ThrottlingRelay(max_connections=3, max_rate=10, credentials=("user", "secret")) as relay:
        ...                                    # a client sends to relay.host:relay.port
        with relay.outage():                   # connections refused at TCP level until the block ends
            ...
        relay.wait_for_mails(5)                # the 5 first mails accepted (waits on an event, no polling)
        relay.stats().throttled, relay.stats().refusals

Why: a provider's relay pushes back in ways a loopback sink never does, and mailq's sender has to live
with each of them without losing or duplicating mail:

- more connections than ``max_connections`` at once: the extra ones get ``421 4.7.0 Too many
  connections`` as their greeting, then are closed;
- more than ``max_rate`` mails (MAIL FROM commands) in any ``rate_window`` seconds, across all
  connections (a sliding window, see SlidingWindow): ``454 4.7.0 Throttling failure: Maximum sending
  rate exceeded.`` in reply to MAIL FROM (the wording of Amazon SES);
- an outage (``go_down()``/``come_up()``, or ``with relay.outage():``). In mode ``"refuse"`` (default)
  the listening socket is closed and re-opened later on the same port, so a connect is refused by the
  kernel (ECONNREFUSED), as when the relay's host is up but its service is not: the most common "relay
  down" a client meets, and the one a client must not confuse with a rejected mail. The relay cannot
  count those attempts (they never reach it); put a LatencyProxy in front and read its
  ``upstream_refused`` if a test needs them. In mode ``"reset"`` connections are accepted and reset at
  once (a load balancer whose backend is gone): countable here, as ``reset_during_outage``. Either way,
  connections open when the outage starts are reset too (``drop_connections=False`` keeps them).
- with ``credentials=(user, password)``, AUTH PLAIN/LOGIN is offered (without TLS) and required before
  MAIL; wrong credentials get ``535 5.7.8 Authentication credentials invalid``.

PIPELINING is advertised: aiosmtpd reads each command line from its stream buffer and answers in order,
so a client's MAIL/RCPT/DATA sent in one write are handled correctly (test_throttling_relay.py proves
it); aiosmtpd just does not say so in its EHLO reply, which the EHLO hook here adds.

The port is picked below the kernel's ephemeral range, so that no outgoing connection can take it while
the relay is down and the relay can always re-open it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from typing import Any, Literal, Self

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

TOO_MANY_CONNECTIONS = "421 4.7.0 Too many connections"
THROTTLED = "454 4.7.0 Throttling failure: Maximum sending rate exceeded."
AUTH_REQUIRED = "530 5.7.0 Authentication required"

OutageMode = Literal["refuse", "reset"]


class SlidingWindow:
    """At most ``limit`` events in any ``window`` seconds: a provider's per-second sending rate.

    A sliding window rather than a token bucket: it allows no burst above the limit, so a test knows
    exactly how many of N quick mails go through. The clock is injectable for deterministic tests.
    """

    def __init__(self, limit: int, window: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        if limit < 1 or window <= 0:
            raise ValueError("limit must be >= 1 and window > 0")
        self.limit = limit
        self.window = window
        self._clock = clock
        self._events: deque[float] = deque()

    def try_acquire(self) -> bool:
        """Count one event now and return True, or return False if that would exceed the limit."""
        now = self._clock()
        while self._events and self._events[0] <= now - self.window:
            self._events.popleft()
        if len(self._events) >= self.limit:
            return False
        self._events.append(now)
        return True


@dataclass(frozen=True)
class AcceptedMail:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    message_id: str | None  # the Message-ID header as sent, angle brackets included
    size: int  # bytes of content
    at: float  # time.monotonic() when the relay answered the final dot with 250


@dataclass(frozen=True)
class RelayStats:
    """A consistent snapshot of the relay's counters since start()."""

    connections_accepted: int  # connections greeted with 220
    refused_at_connect: int  # connections greeted with 421 (too many connections), then closed
    reset_during_outage: int  # connections accepted and reset during a "reset" outage
    throttled: int  # MAIL FROM answered 454 (rate exceeded)
    auth_failures: int  # AUTH answered 535
    max_concurrent: int  # the most connections in conversation (greeted with 220) at once
    open_connections: int  # connections in conversation right now
    mails: tuple[AcceptedMail, ...]  # in the order their final dot was answered
    commands: dict[str, int]  # commands received, by verb (EHLO, MAIL, RCPT, DATA, RSET, NOOP, QUIT...)

    @property
    def refusals(self) -> int:
        """Every time the relay said no to a client: 421 + 454 + resets during an outage.

        Connections refused by the kernel during a "refuse" outage are not in it (the relay never sees
        them): count them with a LatencyProxy's ``upstream_refused``.
        """
        return self.refused_at_connect + self.throttled + self.reset_during_outage

    @property
    def message_ids(self) -> list[str | None]:
        return [mail.message_id for mail in self.mails]


class ThrottlingRelay:
    """An aiosmtpd relay on ``host`` (loopback) with connection and rate limits, AUTH and outages.

    The limits are plain attributes (``max_connections``, ``max_rate``): a test may change them while
    the relay runs; they apply from the next connection or MAIL FROM on (a changed rate starts a new
    window). idle_timeout closes a connection that says nothing for that long.
    """

    def __init__(
        self,
        *,
        max_connections: int | None = None,
        max_rate: int | None = None,
        rate_window: float = 1.0,
        credentials: tuple[str, str] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        hostname: str = "relay.test",
        idle_timeout: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_connections = max_connections
        self.max_rate = max_rate
        self.rate_window = rate_window
        self.credentials = credentials
        self.host = host
        self.port = port
        self.hostname = hostname
        self.idle_timeout = idle_timeout
        self._clock = clock
        self._window: SlidingWindow | None = None
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._counts: Counter[str] = Counter()
        self._commands: Counter[str] = Counter()
        self._open = 0
        self._max_concurrent = 0
        self._mails: list[AcceptedMail] = []
        self._live: set[_RelaySMTP] = set()  # touched by the loop thread only
        self._down: OutageMode | None = None
        self._server: asyncio.Server | None = None
        self._handler = _Handler(self)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # --- life cycle ---

    def start(self, timeout: float = 10.0) -> Self:
        """Listen; return once connections are accepted."""
        if self._thread is not None:
            raise RuntimeError("already started")
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="throttling-relay", daemon=True)
        self._thread.start()
        try:
            self._call(self._listen(first=True), timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Close the listener and every connection, and end the loop thread."""
        if self._loop is None or self._thread is None:
            return
        with contextlib.suppress(RuntimeError, TimeoutError):
            self._call(self._shutdown(), timeout)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise RuntimeError("the relay's loop thread did not stop")
        self._loop.close()
        self._loop = self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    # --- outages ---

    def go_down(self, mode: OutageMode = "refuse", *, drop_connections: bool = True) -> None:
        """From when this returns, new connections are refused ("refuse") or reset ("reset")."""
        if mode not in ("refuse", "reset"):
            raise ValueError(f"unknown outage mode {mode!r}")
        self._call(self._go_down(mode, drop_connections))

    def come_up(self) -> None:
        """From when this returns, new connections are served again (on the same port)."""
        self._call(self._come_up())

    @contextlib.contextmanager
    def outage(self, mode: OutageMode = "refuse", *, drop_connections: bool = True) -> Iterator[None]:
        self.go_down(mode, drop_connections=drop_connections)
        try:
            yield
        finally:
            self.come_up()

    @property
    def is_down(self) -> bool:
        return self._down is not None

    # --- what the tests read ---

    def stats(self) -> RelayStats:
        with self._lock:
            return self._snapshot()

    def wait_until(self, predicate: Callable[[RelayStats], bool], timeout: float = 10.0) -> RelayStats:
        """Block until predicate(stats) holds (checked on every change); TimeoutError after timeout."""
        with self._changed:
            if not self._changed.wait_for(lambda: predicate(self._snapshot()), timeout):
                raise TimeoutError(f"relay condition not met within {timeout} s: {self._snapshot()}")
            return self._snapshot()

    def wait_for_mails(self, count: int, timeout: float = 10.0) -> tuple[AcceptedMail, ...]:
        """The first ``count`` mails accepted, once they are; TimeoutError after timeout."""
        with self._changed:
            # Checked on the list itself: a snapshot per notification would copy every mail each time.
            if not self._changed.wait_for(lambda: len(self._mails) >= count, timeout):
                raise TimeoutError(
                    f"{len(self._mails)} of {count} mails within {timeout} s: {self._snapshot()}"
                )
            return tuple(self._mails[:count])

    # --- the loop thread ---

    def _call(self, coro: Any, timeout: float = 10.0) -> Any:
        assert self._loop is not None, "the relay is not running"
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _listen(self, *, first: bool = False) -> None:
        loop = asyncio.get_running_loop()
        if not (first and self.port == 0):
            self._server = await loop.create_server(
                self._protocol, self.host, self.port, reuse_address=True, backlog=512
            )
            return
        for _ in range(100):
            port = _port_below_ephemeral_range()
            try:
                self._server = await loop.create_server(
                    self._protocol, self.host, port, reuse_address=True, backlog=512
                )
            except OSError:
                continue  # taken: try another
            self.port = port
            return
        raise RuntimeError("no free port below the ephemeral range")

    async def _go_down(self, mode: OutageMode, drop_connections: bool) -> None:
        self._down = mode
        if mode == "refuse" and self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        if drop_connections:
            for protocol in list(self._live):
                if protocol.transport is not None:
                    _reset(protocol.transport)

    async def _come_up(self) -> None:
        if self._server is None:
            await self._listen()
        self._down = None

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for protocol in list(self._live):
            if protocol.transport is not None:
                protocol.transport.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _protocol(self) -> asyncio.BaseProtocol:
        """Called by the loop for each accepted connection: decides how it is greeted."""
        if self._down == "reset":
            self._count("reset_during_outage")
            return _ResetAtOnce()
        with self._changed:
            if self.max_connections is not None and self._open >= self.max_connections:
                self._counts["refused_at_connect"] += 1
                self._changed.notify_all()
                return _GreetAndClose(TOO_MANY_CONNECTIONS)
            self._open += 1  # counted here, not in connection_made: several accepts may come first
            self._max_concurrent = max(self._max_concurrent, self._open)
            self._counts["connections_accepted"] += 1
            self._changed.notify_all()
        return _RelaySMTP(
            self,
            self._handler,
            hostname=self.hostname,
            timeout=self.idle_timeout,
            enable_SMTPUTF8=True,
            authenticator=self._authenticate if self.credentials else None,
            # Not auth_required=True: without TLS aiosmtpd then emits a UserWarning, an error under
            # the repo's filterwarnings; _Handler.handle_MAIL enforces AUTH instead.
            auth_require_tls=False,
            loop=asyncio.get_running_loop(),
        )

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        assert isinstance(auth_data, LoginPassword) and self.credentials is not None
        user, password = self.credentials
        ok = auth_data.login == user.encode() and auth_data.password == password.encode()
        if not ok:
            self._count("auth_failures")
        # handled=False: aiosmtpd answers "535 5.7.8 Authentication credentials invalid" on failure.
        return AuthResult(success=ok, handled=False)

    def _admit_mail(self) -> bool:
        if self.max_rate is None:
            return True
        with self._lock:
            window = self._window
            if window is None or window.limit != self.max_rate or window.window != self.rate_window:
                window = self._window = SlidingWindow(self.max_rate, self.rate_window, self._clock)
            admitted = window.try_acquire()
        if not admitted:
            self._count("throttled")
        return admitted

    def _count(self, name: str) -> None:
        with self._changed:
            self._counts[name] += 1
            self._changed.notify_all()

    def _command(self, verb: str) -> None:
        with self._lock:
            self._commands[verb] += 1

    def _accepted(self, envelope: Envelope) -> AcceptedMail:
        content = envelope.original_content or b""
        message_id = BytesHeaderParser().parsebytes(content)["Message-ID"]
        mail = AcceptedMail(
            mail_from=envelope.mail_from or "",
            rcpt_tos=tuple(envelope.rcpt_tos),
            message_id=str(message_id).strip() if message_id is not None else None,
            size=len(content),
            at=time.monotonic(),
        )
        with self._changed:
            self._mails.append(mail)
            self._changed.notify_all()
        return mail

    def _closed(self, protocol: _RelaySMTP) -> None:
        self._live.discard(protocol)
        with self._changed:
            self._open -= 1
            self._changed.notify_all()

    def _snapshot(self) -> RelayStats:
        return RelayStats(
            connections_accepted=self._counts["connections_accepted"],
            refused_at_connect=self._counts["refused_at_connect"],
            reset_during_outage=self._counts["reset_during_outage"],
            throttled=self._counts["throttled"],
            auth_failures=self._counts["auth_failures"],
            max_concurrent=self._max_concurrent,
            open_connections=self._open,
            mails=tuple(self._mails),
            commands=dict(self._commands),
        )


class _RelaySMTP(SMTP):
    """aiosmtpd's SMTP protocol that tells its relay when its connection ends."""

    def __init__(self, relay: ThrottlingRelay, *args: Any, **kwargs: Any) -> None:
        self._relay = relay
        super().__init__(*args, **kwargs)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._relay._live.add(self)

    def connection_lost(self, error: Exception | None) -> None:
        self._relay._closed(self)
        super().connection_lost(error)


class _Handler:
    """aiosmtpd handler hooks: PIPELINING in EHLO, AUTH and rate checks at MAIL, mails recorded at DATA."""

    def __init__(self, relay: ThrottlingRelay) -> None:
        self.relay = relay

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        self.relay._command("EHLO")
        session.host_name = hostname  # aiosmtpd leaves this to a 5-argument EHLO hook
        if self.relay.credentials is None:  # aiosmtpd offers AUTH whenever it does not require TLS
            responses = [line for line in responses if not line.startswith("250-AUTH")]
        return [*responses[:-1], "250-PIPELINING", responses[-1]]

    async def handle_HELO(self, server: SMTP, session: Session, envelope: Envelope, hostname: str) -> str:
        self.relay._command("HELO")
        session.host_name = hostname
        return f"250 {server.hostname}"

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, mail_options: list[str]
    ) -> str:
        self.relay._command("MAIL")
        if self.relay.credentials is not None and not session.authenticated:
            return AUTH_REQUIRED
        if not self.relay._admit_mail():
            return THROTTLED
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        self.relay._command("RCPT")
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.relay._command("DATA")
        mail = self.relay._accepted(envelope)
        return f"250 2.0.0 OK queued as {len(self.relay._mails)}-{mail.size}"

    async def handle_RSET(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.relay._command("RSET")
        return "250 2.0.0 OK"

    async def handle_NOOP(self, server: SMTP, session: Session, envelope: Envelope, arg: str) -> str:
        self.relay._command("NOOP")
        return "250 2.0.0 OK"

    async def handle_QUIT(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.relay._command("QUIT")
        return "221 2.0.0 Bye"


class _GreetAndClose(asyncio.Protocol):
    """Greets with a refusal (421) and closes: the connection never reaches aiosmtpd."""

    def __init__(self, reply: str) -> None:
        self.reply = reply

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(self.reply.encode() + b"\r\n")
        transport.close()  # after the reply is flushed: a FIN, not a reset


class _ResetAtOnce(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        _reset(transport)


def _reset(transport: asyncio.BaseTransport) -> None:
    """Close with a RST (SO_LINGER 0), as a crashed service's kernel does for its open connections."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    assert isinstance(transport, asyncio.Transport)
    transport.abort()


def _port_below_ephemeral_range() -> int:
    """A candidate port that no outgoing connection can be given (Linux's ip_local_port_range)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return random.randrange(max(1024, low - 12000), low)
