"""One POST to a webhook receiver we do not trust: vetted address, a deadline on the whole, capped answer.

Every receiver belongs to a user, so it gets the SMTP servers' treatment (shared.delivery.smtp): the host is
resolved and vetted by shared.hosts on every request and the socket connects to exactly the address
that was checked; the whole request — connect, TLS, sending, the answer — must end by one deadline
(WEBHOOK_TIMEOUT), enforced per socket operation and by shared.deadline's Watchdog shutting the socket
down, so a receiver trickling its answer a byte at a time cannot hold a thread either; at most
MAX_ANSWER_BYTES of the answer are read (the status line and, when they fit, the headers: nothing
else matters); redirects are never followed (a 3xx is a failure like any other non-2xx).
"""

from __future__ import annotations

import re
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit

from shared import hosts
from shared.deadline import Guard, Watchdog
from shared.errors import HostError

MAX_ANSWER_BYTES = 4096  # the status line and the headers of any sane answer; the body is never read
MAX_URL_LENGTH = 2048
USER_AGENT = "mailq-webhooks/1"
_STATUS_LINE = re.compile(rb"^HTTP/\d(?:\.\d)? (\d{3})(?: [^\r\n]*)?\r\n")
_RETRY_AFTER = re.compile(rb"\r\nretry-after:[ \t]*([^\r\n]*)\r\n", re.IGNORECASE)
_URL_CHARACTERS = re.compile(r"^[!#-~]+$")  # printable ASCII without spaces or quotes


@dataclass(frozen=True)
class Target:
    """Where a receiver URL points: what we connect to and what we ask for."""

    scheme: str
    host: str
    port: int
    path: str  # the request target: path and query

    @property
    def host_header(self) -> str:
        name = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return name if self.port == default else f"{name}:{self.port}"


def parse_url(url: str, *, allow_http: bool) -> Target:
    """The target of a receiver URL, or ValueError saying what is wrong with it (in words for a 422)."""
    if not _URL_CHARACTERS.match(url) or '"' in url:
        raise ValueError("must be printable ASCII without spaces (percent-encode anything else)")
    if len(url) > MAX_URL_LENGTH:
        raise ValueError(f"must be at most {MAX_URL_LENGTH} characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ValueError("is not a valid URL") from None
    schemes = ("https", "http") if allow_http else ("https",)
    if parts.scheme not in schemes:
        raise ValueError(
            "must be an https:// URL" if not allow_http else "must be an http:// or https:// URL"
        )
    if not parts.hostname:
        raise ValueError("must name a host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not contain a user name or password")
    if parts.fragment or url.endswith("#"):
        raise ValueError("must not contain a fragment (#…)")
    from shared.validation import is_hostname_or_ip

    if not is_hostname_or_ip(parts.hostname):
        raise ValueError("must name a valid hostname or IP address")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target(parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80), path)


@dataclass(frozen=True)
class Answer:
    """What came of one request: the HTTP status, or why there was none."""

    status: int | None = None
    error: str | None = None  # for the delivery log: never an address we refused to connect to
    retry_after: float | None = None  # seconds, from a Retry-After header we could read


class Receiver:
    """POSTs deliveries; one Watchdog thread serves every request of the worker."""

    def __init__(
        self,
        *,
        timeout: float,
        allow_http: bool,
        allow_private: bool,
        clock: Callable[[], float] = time.monotonic,
        ssl_context_factory: Callable[[], ssl.SSLContext] = ssl.create_default_context,
    ):
        self.timeout = timeout
        self.allow_http = allow_http
        self.allow_private = allow_private
        self.clock = clock
        self._ssl_context_factory = ssl_context_factory
        self._watchdog = Watchdog(clock)

    def close(self) -> None:
        self._watchdog.close()

    def post(self, url: str, payload: bytes, headers: dict[str, str]) -> Answer:
        """Send ``payload``; every failure becomes an Answer with an error (nothing raises)."""
        deadline = self.clock() + self.timeout
        try:
            target = parse_url(url, allow_http=self.allow_http)
            # Checked at every request, not only at create: DNS may point elsewhere by now. The lookup
            # is bounded by the resolver's own timeouts; the deadline is checked right after it.
            addresses = hosts.vet(
                target.host, target.port, allow_private=self.allow_private, what="webhook host"
            )
        except ValueError as exc:
            return Answer(error=f"the URL {exc}")
        except HostError as exc:
            return Answer(
                error=f"the webhook host {hosts.PRIVATE_HOST_REFUSED}" if exc.refused else exc.message
            )
        guard = self._watchdog.start(deadline)
        try:
            return self._exchange(target, addresses, payload, headers, guard)
        finally:
            self._watchdog.stop(guard)

    def _left(self, guard: Guard) -> float:
        left = guard.deadline - self.clock()
        if left <= 0 or guard.expired:
            raise TimeoutError
        return left

    def _exchange(self, target: Target, addresses, payload: bytes, headers: dict[str, str], guard: Guard):
        sock = None
        stage = "connect"
        try:
            sock = self._connect(addresses, guard)
            if target.scheme == "https":
                stage = "TLS handshake"
                sock.settimeout(self._left(guard))
                sock = self._ssl_context_factory().wrap_socket(sock, server_hostname=target.host)
            stage = "sending"
            head = [
                f"POST {target.path} HTTP/1.1",
                f"Host: {target.host_header}",
                f"User-Agent: {USER_AGENT}",
                "Content-Type: application/json",
                f"Content-Length: {len(payload)}",
                "Connection: close",
                *(f"{name}: {value}" for name, value in headers.items()),
            ]
            request = ("\r\n".join(head) + "\r\n\r\n").encode("ascii") + payload
            sock.settimeout(self._left(guard))
            sock.sendall(request)
            stage = "reading the answer"
            return self._read_answer(sock, guard)
        except OSError as exc:  # timeouts, resets, TLS errors (ssl.SSLError is an OSError too)
            if isinstance(exc, TimeoutError) or guard.expired:
                return Answer(
                    error=f"no answer within WEBHOOK_TIMEOUT ({self.timeout:g} s): {stage} took too long"
                )
            if isinstance(exc, ssl.SSLError):
                return Answer(error=f"TLS failed: {exc.reason or type(exc).__name__}")
            return Answer(error=f"connection failed while {stage}: {exc.strerror or type(exc).__name__}")
        finally:
            if sock is not None:
                sock.close()

    def _connect(self, addresses, guard: Guard) -> socket.socket:
        """A socket connected to the first vetted address that answers (no second DNS lookup)."""
        failure: OSError | None = None
        for family, sockaddr in addresses:
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                guard.watch(sock)
                sock.settimeout(self._left(guard))
                sock.connect(sockaddr)
                return sock
            except OSError as exc:
                sock.close()
                if isinstance(exc, TimeoutError | socket.timeout) or guard.expired:
                    raise TimeoutError from None
                failure = exc
        raise failure or OSError("no address to connect to")

    def _read_answer(self, sock: socket.socket, guard: Guard) -> Answer:
        """The status (and Retry-After, when the headers fit in MAX_ANSWER_BYTES); nothing more is read."""
        answer = b""
        status: int | None = None
        closed = False
        while len(answer) < MAX_ANSWER_BYTES:
            try:
                sock.settimeout(self._left(guard))
                chunk = sock.recv(MAX_ANSWER_BYTES - len(answer))
            except OSError:
                if status is None:
                    raise
                break  # the receiver said what matters; what it trickles after that does not
            if not chunk:
                if (
                    status is None and guard.expired
                ):  # the watchdog shut the socket: the deadline, not the peer
                    raise TimeoutError
                closed = True
                break
            answer += chunk
            if status is None and (match := _STATUS_LINE.match(answer)):
                status = int(match.group(1))
                if 200 <= status < 300 or status == 410:
                    break  # nothing in the headers changes what happens next
            if b"\r\n\r\n" in answer:
                break
        if status is None:
            what = (
                "closed the connection before answering" if closed else "answered something that is not HTTP"
            )
            return Answer(error=f"the receiver {what}")
        return Answer(status=status, retry_after=_retry_after(answer))


def _retry_after(head: bytes) -> float | None:
    """Retry-After in seconds (delta-seconds or an HTTP date), if the headers we read carry one."""
    end = head.find(b"\r\n\r\n")
    match = _RETRY_AFTER.search(head[: end + 2] if end >= 0 else head)
    if not match:
        return None
    value = match.group(1).strip().decode("latin-1")
    if value.isdigit():
        return float(value)
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, moment.timestamp() - time.time())
