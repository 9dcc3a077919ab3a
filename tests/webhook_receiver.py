"""A real HTTP receiver for webhook tests (http.server in a thread), scripted per request, and the check
every delivery gets: the Standard Webhooks reference library (PyPI `standardwebhooks`), not our code."""

from __future__ import annotations

import http.server
import json
import ssl
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

SILENT = "silent"  # accepts the request and never answers
TRICKLE = "trickle"  # answers one byte at a time, forever


TOLERANCE = 300.0  # seconds: the reference library's tolerance for webhook-timestamp


class _AtArrival(Webhook):
    """The reference library's verification, its timestamp tolerance measured from when the request
    arrived rather than from when it is checked (a fault run of many minutes audits at its end)."""

    def __init__(self, secret: str, arrived: float):
        super().__init__(secret)
        self._arrived = arrived

    def _Webhook__verify_timestamp(self, timestamp_header: str) -> datetime:  # the library's private check
        try:
            timestamp = float(timestamp_header)
        except ValueError:
            raise WebhookVerificationError("Invalid Signature Headers") from None
        if timestamp < self._arrived - TOLERANCE:
            raise WebhookVerificationError("Message timestamp too old")
        if timestamp > self._arrived + TOLERANCE:
            raise WebhookVerificationError("Message timestamp too new")
        return datetime.fromtimestamp(timestamp, tz=UTC)


@dataclass
class Request:
    headers: dict[str, str]
    body: bytes
    path: str
    arrived: float = field(default_factory=time.time)

    @property
    def event(self) -> dict:
        return json.loads(self.body)

    def verified(self, secret: str) -> dict:
        """The payload, once the reference library has verified the signature with ``secret`` (its
        timestamp within the library's tolerance of when the request arrived)."""
        return _AtArrival(secret, self.arrived).verify(self.body, self.headers)


@dataclass
class WebhookReceiver:
    """``script`` is consumed one entry per request: an HTTP status, (status, headers), SILENT or
    TRICKLE; when it runs out every request gets ``default``."""

    script: list = field(default_factory=list)
    default: object = 200
    delay: float = 0.0  # seconds each answer waits
    tls: ssl.SSLContext | None = None  # a server context: https://localhost
    requests: list[Request] = field(default_factory=list)

    def __post_init__(self):
        self.closing = threading.Event()
        self._lock = threading.Lock()
        self.in_flight = self.max_in_flight = 0  # requests being answered at once, and the most seen
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):  # noqa: N802 - http.server's naming
                with receiver._lock:
                    receiver.in_flight += 1
                    receiver.max_in_flight = max(receiver.max_in_flight, receiver.in_flight)
                try:
                    self._answer()
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the worker hung up (its deadline) or was killed: nothing to answer
                finally:
                    with receiver._lock:
                        receiver.in_flight -= 1

            def _answer(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with receiver._lock:
                    receiver.requests.append(
                        Request({k.lower(): v for k, v in self.headers.items()}, body, self.path)
                    )
                    what = receiver.script.pop(0) if receiver.script else receiver.default
                if what == SILENT:
                    receiver.closing.wait(60)
                    return
                if what == TRICKLE:
                    for byte in b"HTTP/1.1 200 OK\r\n" * 1000:
                        if receiver.closing.wait(0.2):  # far below any per-read timeout
                            return
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                    return
                if receiver.delay and receiver.closing.wait(receiver.delay):
                    return
                status, headers = what if isinstance(what, tuple) else (what, {})
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        if self.tls is not None:
            self.server.socket = self.tls.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        if self.tls is not None:
            return f"https://localhost:{self.server.server_address[1]}/hooks"
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks"

    def __enter__(self) -> WebhookReceiver:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()

    def wait_for(self, count: int, timeout: float = 20.0) -> list[Request]:
        deadline = time.monotonic() + timeout
        while len(self.requests) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(self.requests)} of {count} webhook requests arrived")
            time.sleep(0.02)
        return self.requests
