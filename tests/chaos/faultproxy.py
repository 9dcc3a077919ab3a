"""A TCP fault proxy (asyncio, no toxiproxy) between the workers and PostgreSQL, Redis and SMTP.

    python -m tests.chaos.faultproxy --route pg=unix:/run/pg/.s.PGSQL.5432 --route redis=127.0.0.1:6379 \
        --route smtp=127.0.0.1:2525:smtp --ports ports.json

Each route listens on a free loopback port; the ports (and the control port) go to the ports file.
Commands on the control port, one JSON object per line, each answered with one JSON line:

    {"cmd": "latency", "seconds": 0.2}  every server-to-client chunk waits this long (one way, as
                                        toxiproxy's latency toxic: +0.2 s per request/reply round trip)
    {"cmd": "blackhole"}                freeze every connection, and every new one: nothing is forwarded
                                        any more, nothing is reset, the sockets stay open
    {"cmd": "heal"}                     new connections work again; frozen ones stay frozen for good (a
                                        NAT or firewall that forgot them): only their client can notice
    {"cmd": "reset"}                    abort every connection, both sides, with a TCP RST
    {"cmd": "stats"}                    what happened to each frozen connection, and counters per route

A frozen connection still reads both sides and drops what it reads, so the proxy sees when a client
starts waiting on a dead connection (it was waiting for a reply when the freeze came, or sends a
request later) and when it gives up: it closes the connection, or says something else after a pause
(pg8000's Terminate, SMTP's QUIT; a closed socket may wait for Python's garbage collector). That is the
detection this harness measures. What it cannot show: TCP keepalive. The client's kernel talks to the
proxy's kernel, which answers keepalive probes however dead the connection is behind it; only deadlines
and timeouts in the client can be observed here.

An SMTP route also counts the conversations cut (frozen or reset) after the client's final dot went
through and before the server's reply came back: the server may have stored that mail, so a retry of it
is the one duplicate the design cannot rule out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import struct
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

_DOT = b"\r\n.\r\n"
_CHUNK = 65536
# Client bytes this long after the request that found a frozen connection are a new move (a ROLLBACK,
# a Terminate, a QUIT): the client gave up waiting. Closer together, they are the same request.
_BURST = 0.2


@dataclass
class Route:
    name: str
    target: str  # "unix:/path" or "host:port"
    smtp: bool = False  # the server speaks first (a new connection awaits its greeting); final dots tracked

    @classmethod
    def parse(cls, spec: str) -> Route:
        name, _, rest = spec.partition("=")
        return cls(name, rest.removesuffix(":smtp"), rest.endswith(":smtp"))

    async def connect(self):
        if self.target.startswith("unix:"):
            return await asyncio.open_unix_connection(self.target[5:])
        host, _, port = self.target.rpartition(":")
        return await asyncio.open_connection(host, int(port))


@dataclass(eq=False)
class Conn:
    route: Route
    client_r: asyncio.StreamReader
    client_w: asyncio.StreamWriter
    server_w: asyncio.StreamWriter | None = None
    opened: float = field(default_factory=time.time)
    frozen_at: float | None = None
    in_use_at: float | None = None  # the client waited on (or wrote to) the frozen connection from here
    burst_at: float = 0.0  # the last client bytes of the request it is waiting on
    gave_up_at: float | None = None  # the client moved on (said something else, or closed)
    closed_at: float | None = None  # the client closed it
    reset: bool = False  # the proxy's reset ended it before the client closed it
    answered: bool = False  # the client had received something from the server before the freeze
    last_up: float = 0.0  # last chunk forwarded client -> server (monotonic)
    last_down: float = 0.0  # last chunk delivered server -> client
    tail: bytes = b""  # the last bytes forwarded upstream (to see a final dot across chunk boundaries)
    dot_outstanding: bool = False  # the final dot went through and no reply has come back yet
    down: asyncio.Queue = field(default_factory=asyncio.Queue)

    def record(self) -> dict:
        return {
            "route": self.route.name,
            "opened": self.opened,
            "frozen_at": self.frozen_at,
            "in_use_at": self.in_use_at,
            "gave_up_at": self.gave_up_at,
            "closed_at": self.closed_at,
            "reset": self.reset,
            "answered": self.answered,
        }


class Proxy:
    def __init__(self, routes: list[Route]):
        self.routes = routes
        self.latency = 0.0
        self.blackholed = False
        self.conns: set[Conn] = set()
        self.frozen: list[Conn] = []  # every connection ever frozen, closed ones included
        self.counts: Counter = Counter()  # "<route> opened", "<route> reset", "smtp cut after dot", ...

    # --- faults ---

    def freeze(self, conn: Conn) -> None:
        if conn.frozen_at is not None:
            return
        now = time.time()
        conn.frozen_at = now
        conn.answered = bool(conn.last_down)
        awaiting = conn.last_up > conn.last_down or (conn.route.smtp and not conn.last_down)
        if awaiting:
            conn.in_use_at = conn.burst_at = now
        if conn.dot_outstanding:
            self.counts[f"{conn.route.name} cut after the final dot"] += 1
        self.frozen.append(conn)

    def reset(self) -> int:
        conns = list(self.conns)
        for conn in conns:
            if conn.dot_outstanding and conn.frozen_at is None:
                self.counts[f"{conn.route.name} cut after the final dot"] += 1
            if conn.frozen_at is not None and conn.closed_at is None:
                conn.reset = True  # the client learns from the RST, not by itself
                conn.closed_at = time.time()
            self.counts[f"{conn.route.name} reset"] += 1
            for writer in (conn.client_w, conn.server_w):
                _abort(writer)
            self.conns.discard(conn)
        return len(conns)

    def command(self, message: dict) -> dict:
        cmd = message.get("cmd")
        if cmd == "latency":
            self.latency = float(message["seconds"])
        elif cmd == "blackhole":
            self.blackholed = True
            for conn in list(self.conns):
                self.freeze(conn)
        elif cmd == "heal":
            self.blackholed = False
        elif cmd == "reset":
            return {"ok": True, "reset": self.reset()}
        elif cmd != "stats":
            return {"ok": False, "error": f"unknown command {cmd!r}"}
        return {
            "ok": True,
            "now": time.time(),
            "latency": self.latency,
            "blackholed": self.blackholed,
            "open": Counter(c.route.name for c in self.conns),
            "counts": self.counts,
            "frozen": [c.record() for c in self.frozen],
        }

    # --- forwarding ---

    async def serve(self, route: Route, client_r, client_w) -> None:
        conn = Conn(route, client_r, client_w)
        self.conns.add(conn)
        self.counts[f"{route.name} opened"] += 1
        _nodelay(client_w)
        tasks = []
        try:
            if self.blackholed:
                self.freeze(conn)  # accepted by the kernel already; from here on, silence
            else:
                try:
                    server_r, conn.server_w = await route.connect()
                except OSError:
                    self.counts[f"{route.name} upstream refused"] += 1
                    return
                _nodelay(conn.server_w)
                tasks += [
                    asyncio.create_task(self._downstream(conn, server_r)),
                    asyncio.create_task(self._deliver(conn)),
                ]
            await self._upstream(conn)
        finally:
            for task in tasks:
                task.cancel()
            self.conns.discard(conn)
            for writer in (conn.client_w, conn.server_w):
                if writer is not None:
                    writer.close()

    async def _upstream(self, conn: Conn) -> None:
        """Client to server, until the client closes (or the connection is reset)."""
        while True:
            try:
                data = await conn.client_r.read(_CHUNK)
            except OSError:
                data = b""
            now = time.time()
            if not data:
                if conn.frozen_at is not None and conn.closed_at is None:
                    conn.closed_at = now
                    conn.gave_up_at = conn.gave_up_at or now
                return
            if conn.frozen_at is not None:
                if conn.in_use_at is None:
                    conn.in_use_at = now
                elif conn.gave_up_at is None and now - conn.burst_at > _BURST:
                    conn.gave_up_at = now
                conn.burst_at = now
                continue
            if conn.server_w is None or conn.server_w.is_closing():
                return
            conn.server_w.write(data)
            conn.last_up = time.monotonic()
            conn.tail = (conn.tail + data)[-len(_DOT) :]
            if conn.route.smtp and conn.tail == _DOT:
                conn.dot_outstanding = True

    async def _downstream(self, conn: Conn, server_r) -> None:
        """Server to client: each chunk is queued with the time it may be delivered."""
        while True:
            try:
                data = await server_r.read(_CHUNK)
            except OSError:
                data = b""
            if conn.frozen_at is not None:
                if not data:
                    return
                continue
            await conn.down.put((time.monotonic() + self.latency, data))
            if not data:
                return

    async def _deliver(self, conn: Conn) -> None:
        while True:
            due, data = await conn.down.get()
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if conn.frozen_at is not None:
                continue  # dropped: a frozen connection never delivers again
            if not data:  # the server closed: close the client's side as well
                conn.client_w.close()
                return
            conn.client_w.write(data)
            conn.last_down = time.monotonic()
            conn.dot_outstanding = False
            try:
                await conn.client_w.drain()
            except OSError:
                return

    async def control(self, reader, writer) -> None:
        try:
            while line := await reader.readline():
                try:
                    answer = self.command(json.loads(line))
                except (ValueError, KeyError, TypeError) as exc:
                    answer = {"ok": False, "error": repr(exc)}
                writer.write(json.dumps(answer).encode() + b"\n")
                await writer.drain()
        finally:
            writer.close()


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _abort(writer: asyncio.StreamWriter | None) -> None:
    """Close with a RST (SO_LINGER 0), not a FIN: the peer sees "connection reset"."""
    if writer is None:
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _main(routes: list[Route], ports_file: Path) -> None:
    proxy = Proxy(routes)
    servers, ports = [], {}
    for route in routes:
        server = await asyncio.start_server(
            lambda r, w, route=route: proxy.serve(route, r, w), "127.0.0.1", 0, backlog=512
        )
        servers.append(server)
        ports[route.name] = server.sockets[0].getsockname()[1]
    control = await asyncio.start_server(proxy.control, "127.0.0.1", 0)
    tmp = ports_file.with_suffix(".tmp")
    tmp.write_text(json.dumps({"control": control.sockets[0].getsockname()[1], "routes": ports}))
    os.replace(tmp, ports_file)  # the harness never reads half a file
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    for server in [*servers, control]:
        server.close()
    proxy.reset()


# --- the harness's side --------------------------------------------------------------------------------


@dataclass
class FaultProxy:
    """A running proxy process: its routes' ports and its control port."""

    proc: object  # tests.chaos.stack.Proc
    control: int
    ports: dict[str, int]

    def send(self, cmd: str, **args) -> dict:
        with socket.create_connection(("127.0.0.1", self.control), timeout=10) as sock:
            sock.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
            answer = json.loads(sock.makefile("rb").readline())
        if not answer.get("ok"):
            raise RuntimeError(f"fault proxy refused {cmd}: {answer}")
        return answer

    def latency(self, seconds: float) -> None:
        self.send("latency", seconds=seconds)

    def blackhole(self) -> None:
        self.send("blackhole")

    def heal(self) -> None:
        self.send("heal")

    def reset(self) -> int:
        return self.send("reset")["reset"]

    def stats(self) -> dict:
        return self.send("stats")


def start(stack, routes: dict[str, str], timeout: float = 30.0) -> FaultProxy:
    """Start the proxy as a process of ``stack`` with routes {name: target}; return its handle."""
    ports_file = stack.workdir / f"faultproxy-{time.monotonic_ns()}.json"
    args = [f"--route={name}={target}" for name, target in routes.items()]
    proc = stack.spawn("faultproxy", [*args, "--ports", str(ports_file)], module="tests.chaos.faultproxy")
    deadline = time.monotonic() + timeout
    while not ports_file.exists():
        if not proc.alive() or time.monotonic() > deadline:
            log = proc.log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the fault proxy did not start:\n{log}")
        time.sleep(0.05)
    ports = json.loads(ports_file.read_text())
    return FaultProxy(proc, ports["control"], ports["routes"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--route", action="append", required=True, help="name=unix:/path or name=host:port")
    parser.add_argument("--ports", type=Path, required=True, help="where the listening ports are written")
    args = parser.parse_args(argv)
    asyncio.run(_main([Route.parse(r) for r in args.route], args.ports))


if __name__ == "__main__":
    main()
