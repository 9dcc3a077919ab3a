"""The API's callers in a fault run: accounts, and many enqueue clients at once with their latencies.

Each client is a thread with one keep-alive HTTP/1.1 connection. A request that gets a 5xx or no answer
is retried with the same ``Idempotency-Key`` (what a careful client does), so a retry never makes a
second task; every answer is recorded, so the run can say how many were 503, and that none was a 500.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from urllib.parse import urlparse


@dataclass
class Reply:
    status: int  # 0: no HTTP answer at all (connection refused, reset, timeout)
    body: object
    headers: dict[str, str]
    seconds: float


class Client:
    """One keep-alive connection; not thread-safe (one per thread)."""

    def __init__(self, base_url: str, timeout: float = 30.0):
        url = urlparse(base_url)
        self.host, self.port, self.timeout = url.hostname, url.port, timeout
        self.conn: http.client.HTTPConnection | None = None

    def call(self, method: str, path: str, body=None, token: str | None = None, headers=None) -> Reply:
        data = json.dumps(body).encode() if body is not None else None
        sent = {"Content-Type": "application/json"} if data is not None else {}
        if token:
            sent["Authorization"] = f"Bearer {token}"
        sent.update(headers or {})
        started = time.perf_counter()
        try:
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            self.conn.request(method, path, body=data, headers=sent)
            response = self.conn.getresponse()
            raw = response.read()
            reply_headers = {k.lower(): v for k, v in response.getheaders()}
            if response.getheader("Connection", "").lower() == "close":
                self.close()
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            return Reply(0, repr(exc), {}, time.perf_counter() - started)
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = raw[:200]
        return Reply(response.status, parsed, reply_headers, time.perf_counter() - started)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


@dataclass
class Account:
    id: int
    email: str
    password: str
    smtp_password: str
    token: str


def make_accounts(base_url: str, smtp_port: int, count: int, tag: str, *, first: int = 0) -> list[Account]:
    """Register and log in ``count`` users whose SMTP account is 127.0.0.1:smtp_port (with a login),
    numbered from ``first`` (so accounts on different servers get different addresses)."""
    client = Client(base_url)
    accounts = []
    for i in range(first, first + count):
        email = f"sender{i}.{tag}@chaos.example.com"
        password = f"pw-{tag}-{i}-correct-horse"[:60]
        smtp_password = f"smtp-secret-{tag}-{i}"
        reply = client.call(
            "POST",
            "/api/v1/register",
            {
                "email": email,
                "password": password,
                "smtp_host": "127.0.0.1",
                "smtp_port": smtp_port,
                "smtp-username": f"sender{i}",
                "smtp-password": smtp_password,
                "smtp_security": "none",
            },
        )
        if reply.status != 201:
            raise RuntimeError(f"register answered {reply.status}: {reply.body}")
        login = client.call("POST", "/api/v1/login", {"email": email, "password": password})
        if login.status != 200:
            raise RuntimeError(f"login answered {login.status}: {login.body}")
        accounts.append(Account(reply.body["id"], email, password, smtp_password, login.body["token"]))
    client.close()
    return accounts


@dataclass
class EnqueueRun:
    """What a batch of enqueue clients saw."""

    task_ids: dict[int, int] = field(default_factory=dict)  # request number -> task id
    statuses: Counter = field(default_factory=Counter)  # every answer, retries included
    latencies: list[float] = field(default_factory=list)  # seconds, every answer
    bad: list[str] = field(default_factory=list)  # answers that break the rules (a 500, a 503 not in format)
    gave_up: list[int] = field(default_factory=list)  # requests never accepted
    seconds: float = 0.0

    def percentile(self, p: float) -> float:
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def recipient(tag: str, n: int) -> str:
    """The recipient of request n: unique per task, so the SMTP server's log names the task."""
    return f"t{n}.{tag}@example.org"


class Enqueuer:
    """``clients`` threads enqueueing ``count`` mails round-robin over the accounts, in the background."""

    def __init__(
        self,
        base_url: str,
        accounts: list[Account],
        count: int,
        tag: str,
        *,
        clients: int = 4,
        rate: float | None = None,
        retry_for: float = 120.0,
    ):
        self.base_url, self.accounts, self.count, self.tag = base_url, accounts, count, tag
        self.clients, self.rate, self.retry_for = clients, rate, retry_for
        self.lifetimes: dict[int, float] = {}  # user id -> seconds: its mails' expires_at after their enqueue
        self.result = EnqueueRun()
        self._next = 0
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._started = 0.0
        self.stopping = threading.Event()

    def start(self) -> Enqueuer:
        self._started = time.monotonic()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(self.clients)]
        for t in self._threads:
            t.start()
        return self

    def join(self, timeout: float | None = None) -> EnqueueRun:
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        self.result.seconds = time.monotonic() - self._started
        return self.result

    @property
    def done(self) -> int:
        with self._lock:
            return len(self.result.task_ids) + len(self.result.gave_up)

    def _take(self) -> int | None:
        with self._lock:
            if self._next >= self.count or self.stopping.is_set():
                return None
            n, self._next = self._next, self._next + 1
        if self.rate:
            # Paced: request n is not sent before n / rate seconds into the run.
            delay = self._started + n / self.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        return n

    def _run(self) -> None:
        client = Client(self.base_url)
        try:
            while (n := self._take()) is not None:
                self._one(client, n)
        finally:
            client.close()

    def _one(self, client: Client, n: int) -> None:
        account = self.accounts[n % len(self.accounts)]
        body = {
            "recipient_email": recipient(self.tag, n),
            "subject": f"chaos {self.tag} #{n}",
            "body": f"Mail {n} of fault run {self.tag}.\nIt must arrive, and only once.\n",
        }
        if account.id in self.lifetimes:
            expires = datetime.now(UTC) + timedelta(seconds=self.lifetimes[account.id])
            body["expires_at"] = expires.isoformat(timespec="seconds")
        headers = {"Idempotency-Key": f"{self.tag}-{n}"}
        give_up = time.monotonic() + self.retry_for
        while True:
            reply = client.call("POST", "/api/v1/task/enqueue", body, account.token, headers)
            with self._lock:
                self.result.statuses[reply.status] += 1
                self.result.latencies.append(reply.seconds)
            if reply.status == 202:
                with self._lock:
                    self.result.task_ids[n] = reply.body["task_id"]
                return
            problem = _problem_violation(reply)
            if problem:
                with self._lock:
                    self.result.bad.append(f"request {n}: {problem}")
            # Retrying with the same Idempotency-Key is safe, so a careful client retries any 5xx too
            # (a 500 is still counted as a broken rule above).
            if not (reply.status == 0 or reply.status >= 500) or time.monotonic() > give_up:
                with self._lock:
                    self.result.gave_up.append(n)
                return
            time.sleep(0.2)


def _problem_violation(reply: Reply) -> str | None:
    """What is wrong with a non-2xx answer: a 5xx other than 503, or not RFC 9457 problem details."""
    if reply.status == 0:
        return None  # no answer at all is counted in statuses[0]
    if reply.status >= 500 and reply.status != 503:
        return f"{reply.status} {reply.body!r:.200}"
    if not reply.headers.get("content-type", "").startswith("application/problem+json"):
        return f"{reply.status} without problem details: {reply.headers.get('content-type')}"
    if not isinstance(reply.body, dict) or reply.body.get("status") != reply.status:
        return f"{reply.status} with a malformed problem: {reply.body!r:.200}"
    if reply.status == 503 and "retry-after" not in reply.headers:
        return "503 without Retry-After"
    return None
