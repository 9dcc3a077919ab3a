"""An HTTP/1.1 load generator on asyncio: keep-alive connections, pre-encoded requests.

Python clients built on urllib or requests cost more CPU per request than the server under test,
and this machine has two cores; a raw keep-alive client spends far less. ``closed_loop`` is C
clients each sending back to back (throughput); ``open_loop`` sends at a fixed rate whatever the
answers do, timing each request from when it was due (no coordinated omission).
"""

from __future__ import annotations

import asyncio
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field


def build_request(
    method: str, path: str, port: int, *, body: dict | None = None, headers: dict[str, str] | None = None
) -> bytes:
    payload = json.dumps(body).encode() if body is not None else b""
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: keep-alive"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(payload)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload


class _Connection:
    def __init__(self, port: int):
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        for attempt in (1, 2):
            if self.writer is None:
                self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
            try:
                self.writer.write(raw)
                head = await self.reader.readuntil(b"\r\n\r\n")
                break
            except (ConnectionError, asyncio.IncompleteReadError):
                # The server closed a kept-alive connection between requests: reconnect once.
                self.close()
                if attempt == 2:
                    raise
        status = int(head[9:12])
        length, close, chunked = 0, False, False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        if chunked:
            body = b""
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
                chunk = await self.reader.readexactly(size + 2)
                if size == 0:
                    break
                body += chunk[:-2]
        else:
            body = await self.reader.readexactly(length) if length else b""
        if close:
            self.close()
        return status, body

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def percentile(values: list[float], p: float) -> float:
    """The p-th percentile (0-100), nearest-rank; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class LoadResult:
    requests: int  # answered inside the measured window
    errors: int  # answers that were not the expected status, and failed requests
    seconds: float
    latencies_ms: list[float] = field(repr=False, default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def p50(self) -> float:
        return percentile(self.latencies_ms, 50)

    @property
    def p99(self) -> float:
        return percentile(self.latencies_ms, 99)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.latencies_ms) if self.latencies_ms else 0.0


async def _closed_loop(
    port: int, make_request: Callable[[int], bytes], clients: int, warmup: float, seconds: float, ok: int
) -> LoadResult:
    result = LoadResult(0, 0, seconds)
    counter = iter(range(10**12))
    connections = [_Connection(port) for _ in range(clients)]

    async def first_answer(conn: _Connection) -> None:
        try:
            await conn.request(make_request(next(counter)))
        except (OSError, asyncio.IncompleteReadError, ValueError):
            conn.close()

    # Every client has had one answer before the clock starts: a function's first requests open its
    # database pool and import what it imports lazily, which under a loaded machine took longer than
    # the whole window (the tiny benchmark once counted no answer at all). Not the load being measured.
    await asyncio.gather(*(first_answer(conn) for conn in connections))
    start = time.perf_counter()
    measure_from, measure_to = start + warmup, start + warmup + seconds

    async def client(conn: _Connection) -> None:
        try:
            while (now := time.perf_counter()) < measure_to:
                try:
                    status, _ = await conn.request(make_request(next(counter)))
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    status = 0
                    conn.close()
                done = time.perf_counter()
                if now >= measure_from and done <= measure_to:
                    result.statuses[status] = result.statuses.get(status, 0) + 1
                    if status == ok:
                        result.requests += 1
                        result.latencies_ms.append((done - now) * 1000)
                    else:
                        result.errors += 1
        finally:
            conn.close()

    await asyncio.gather(*(client(conn) for conn in connections))
    return result


def closed_loop(
    port: int,
    make_request: Callable[[int], bytes],
    *,
    clients: int,
    seconds: float,
    warmup: float = 1.0,
    ok: int = 200,
) -> LoadResult:
    """``clients`` connections sending back to back, once each has had a first answer; only answers
    inside the window (after ``warmup``, for ``seconds``) are counted."""
    return asyncio.run(_closed_loop(port, make_request, clients, warmup, seconds, ok))


@dataclass
class Sent:
    due: float  # epoch seconds the request was due to leave
    answered: float  # epoch seconds the answer was read
    status: int
    body: bytes


async def _open_loop(
    port: int, make_request: Callable[[int], bytes], rate: float, count: int, max_connections: int
) -> list[Sent]:
    idle: list[_Connection] = []
    opened = 0
    available = asyncio.Semaphore(max_connections)
    results: list[Sent] = []
    wall0, mono0 = time.time() + 0.2, time.perf_counter() + 0.2

    async def one(i: int) -> None:
        nonlocal opened
        await asyncio.sleep(max(0.0, mono0 + i / rate - time.perf_counter()))
        async with available:
            if idle:
                conn = idle.pop()
            else:
                conn, opened = _Connection(port), opened + 1
            try:
                status, body = await conn.request(make_request(i))
                idle.append(conn)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                conn.close()
                status, body = 0, b""
        results.append(Sent(wall0 + i / rate, wall0 + time.perf_counter() - mono0, status, body))

    await asyncio.gather(*(one(i) for i in range(count)))
    for conn in idle:
        conn.close()
    return results


def open_loop(
    port: int, make_request: Callable[[int], bytes], *, rate: float, count: int, max_connections: int = 64
) -> list[Sent]:
    """Send ``count`` requests at ``rate`` per second, at most ``max_connections`` in flight."""
    return asyncio.run(_open_loop(port, make_request, rate, count, max_connections))


async def _closed_count(
    port: int, make_request: Callable[[int], bytes], clients: int, count: int
) -> list[Sent]:
    results: list[Sent] = []
    todo = iter(range(count))  # shared by the clients: each request is sent once
    wall0, mono0 = time.time(), time.perf_counter()

    async def client() -> None:
        conn = _Connection(port)
        try:
            for i in todo:
                began = time.perf_counter()
                try:
                    status, body = await conn.request(make_request(i))
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    conn.close()
                    status, body = 0, b""
                results.append(Sent(wall0 + began - mono0, wall0 + time.perf_counter() - mono0, status, body))
        finally:
            conn.close()

    await asyncio.gather(*(client() for _ in range(clients)))
    return results


def closed_count(port: int, make_request: Callable[[int], bytes], *, clients: int, count: int) -> list[Sent]:
    """``count`` requests by ``clients`` keep-alive connections back to back; ``Sent.due`` is when each
    request started."""
    return asyncio.run(_closed_count(port, make_request, clients, count))
