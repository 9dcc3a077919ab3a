"""A loopback TCP proxy that puts a round-trip time (RTT) between its clients and one server.

    with LatencyProxy(("127.0.0.1", relay.port), rtt=0.050) as proxy:
        smtp = smtplib.SMTP(proxy.host, proxy.port, timeout=10)  # each command now costs 50 ms more
        proxy.rtt = 0.020                                          # takes effect for the next bytes read

Why: a relay on loopback answers in microseconds, so a client that waits for every reply looks as fast
as one that pipelines. A real provider's relay is tens of milliseconds away, and there the number of
round trips per mail decides the throughput. This proxy gives every test that distance.

How: every chunk read from one side is stamped with its release time, t_recv + RTT/2, and appended to
that direction's queue; a writer task forwards the queue in order, each chunk at its own release time.
So pipelined chunks all arrive RTT/2 after they were sent (never one RTT/2 after the other, as sleeping
before forwarding each chunk would make them), byte order is kept, and a half-close (EOF) travels the
same queue: it arrives after the bytes sent before it, and the other direction keeps flowing.

A new connection costs what a TCP handshake costs over such a link: the proxy opens its upstream
connection 1.5 RTT after accepting (SYN, SYN-ACK, then the ACK's trip), so a server-first protocol's
greeting reaches the client 2 RTT after connect(), and a client-first request reaches the server 1.5 RTT
after it, as over a real link. What cannot be reproduced: the client's connect() returns at once (the
kernel completes the loopback handshake before the proxy sees the connection), so an upstream that
refuses shows up as a reset after a successful connect, not as ECONNREFUSED; ``handshake=False`` opens
the upstream connection at once.

Precision: a chunk is never released before its time, and on this kind of VM about 0.1-0.5 ms after it
(timer and thread wake-up latency), so a request/reply round trip through the proxy costs RTT + ~1 ms;
at RTT 0 the proxy adds ~0.1 ms per round trip.

Everything runs on one asyncio loop in a daemon thread, so the proxy is used the same way from a
synchronous pytest test and from a benchmark script; ``stop()`` resets what is still open and joins it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import struct
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Self

_CHUNK = 65536


@dataclass(frozen=True)
class ProxyStats:
    """What the proxy has seen since start()."""

    accepted: int  # client connections accepted
    open: int  # client connections open right now
    max_open: int  # the most client connections open at once
    upstream_refused: int  # the upstream connect failed (refused or timed out): the client got a reset
    bytes_up: int  # client -> server bytes forwarded
    bytes_down: int  # server -> client bytes forwarded


class _DelayLine:
    """One direction of one connection: chunks with their release times, in arrival order.

    At most ``limit`` bytes wait in it; beyond that the reading side stops reading, so a fast sender is
    held back by TCP flow control instead of filling the proxy's memory.
    """

    def __init__(self, limit: int) -> None:
        self._items: deque[tuple[float, bytes]] = deque()
        self._queued = 0
        self._limit = limit
        self._changed = asyncio.Condition()

    async def put(self, due: float, data: bytes) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self._queued < self._limit)
            self._items.append((due, data))
            self._queued += len(data)
            self._changed.notify_all()

    async def get(self) -> tuple[float, bytes]:
        async with self._changed:
            await self._changed.wait_for(lambda: bool(self._items))
            due, data = self._items.popleft()
            self._queued -= len(data)
            self._changed.notify_all()
            return due, data


@dataclass(eq=False)
class _Conn:
    client_w: asyncio.StreamWriter
    serve_task: asyncio.Task[None] | None = None
    server_w: asyncio.StreamWriter | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class LatencyProxy:
    """A TCP proxy on ``host``:``port`` (a free loopback port unless given) to ``target``.

    rtt is the round-trip time in seconds: RTT/2 is added in each direction. It can be changed while
    the proxy runs; the new value applies to bytes read from then on. connect_timeout bounds the upstream
    connect; a client whose upstream cannot be reached is reset. buffer_limit caps the bytes waiting
    in each direction of each connection.
    """

    def __init__(
        self,
        target: tuple[str, int],
        rtt: float = 0.0,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        handshake: bool = True,
        connect_timeout: float = 10.0,
        buffer_limit: int = 4 * 1024 * 1024,
    ) -> None:
        if rtt < 0:
            raise ValueError("rtt must be >= 0")
        self.target = target
        self.rtt = rtt
        self.host = host
        self.port = port
        self.handshake = handshake
        self.connect_timeout = connect_timeout
        self.buffer_limit = buffer_limit
        self._lock = threading.Lock()
        self._accepted = self._open = self._max_open = self._refused = 0
        self._bytes = {"up": 0, "down": 0}
        self._conns: set[_Conn] = set()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None

    # --- life cycle ---

    def start(self, timeout: float = 10.0) -> Self:
        """Listen, and return once connections are accepted."""
        if self._thread is not None:
            raise RuntimeError("already started")
        self._thread = threading.Thread(target=self._run, name="latency-proxy")
        self._thread.daemon = True
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("the latency proxy did not start")
        if self._error is not None:
            self._thread.join(timeout)
            raise self._error
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop listening, reset every open connection, and wait for the loop thread to end."""
        if self._thread is None:
            return
        if self._loop is not None and self._stopping is not None:
            with contextlib.suppress(RuntimeError):  # the loop has ended already
                self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise RuntimeError("the latency proxy did not stop")
        self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def stats(self) -> ProxyStats:
        with self._lock:
            return ProxyStats(
                accepted=self._accepted,
                open=self._open,
                max_open=self._max_open,
                upstream_refused=self._refused,
                bytes_up=self._bytes["up"],
                bytes_down=self._bytes["down"],
            )

    # --- the loop thread ---

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        try:
            server = await asyncio.start_server(self._serve, self.host, self.port, backlog=512)
        except OSError as exc:
            self._error = exc
            self._ready.set()
            return
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        await self._stopping.wait()
        server.close()
        await asyncio.sleep(0)  # connections accepted just now start their _serve() and register
        conns = list(self._conns)
        for conn in conns:
            _abort(conn.client_w)
            _abort(conn.server_w)
            if conn.serve_task is not None:
                conn.serve_task.cancel()  # _serve() ends normally all the same: see there
        await server.wait_closed()
        tasks = [task for conn in conns for task in (conn.serve_task, *conn.tasks) if task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        """One client connection, from accept to close.

        It never ends cancelled, not even when stop() cancels it: asyncio's start_server logs an
        error for a connection callback that does.
        """
        loop = asyncio.get_running_loop()
        accepted_at = loop.time()
        conn = _Conn(client_w, serve_task=asyncio.current_task())
        self._conns.add(conn)
        with self._lock:
            self._accepted += 1
            self._open += 1
            self._max_open = max(self._max_open, self._open)
        up, down = _DelayLine(self.buffer_limit), _DelayLine(self.buffer_limit)
        # The client's first bytes are read (and stamped) at once; they wait in `up` for the upstream.
        conn.tasks.append(asyncio.create_task(self._pump(client_r, up)))
        try:
            if self.handshake and self.rtt > 0:
                await asyncio.sleep(accepted_at + 1.5 * self.rtt - loop.time())
            try:
                server_r, server_w = await asyncio.wait_for(
                    asyncio.open_connection(*self.target), self.connect_timeout
                )
                conn.server_w = server_w
            except (OSError, TimeoutError):
                with self._lock:
                    self._refused += 1
                _abort(client_w)
                return
            conn.tasks += [
                asyncio.create_task(self._release(up, server_w, "up")),
                asyncio.create_task(self._pump(server_r, down)),
                asyncio.create_task(self._release(down, client_w, "down")),
            ]
            done, _ = await asyncio.wait(conn.tasks, return_when=asyncio.FIRST_EXCEPTION)
            if any(not t.cancelled() and t.exception() is not None for t in done):
                # A reset (or a write to a closed peer) on one side: the other side gets a reset too.
                _abort(client_w)
                _abort(conn.server_w)
        except asyncio.CancelledError:
            pass  # stop(): the connection was reset already
        finally:
            for task in conn.tasks:
                task.cancel()  # no await here: a second cancel must not find this task waiting
            for writer in (client_w, conn.server_w):
                if writer is not None:
                    writer.close()
            self._conns.discard(conn)
            with self._lock:
                self._open -= 1

    async def _pump(self, reader: asyncio.StreamReader, line: _DelayLine) -> None:
        """Read one side; stamp each chunk (and the final EOF, b"") with its release time."""
        loop = asyncio.get_running_loop()
        while True:
            data = await reader.read(_CHUNK)
            await line.put(loop.time() + self.rtt / 2, data)
            if not data:
                return

    async def _release(self, line: _DelayLine, writer: asyncio.StreamWriter, direction: str) -> None:
        """Forward a direction's chunks to the other side, each at its release time, in order."""
        loop = asyncio.get_running_loop()
        while True:
            due, data = await line.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if writer.is_closing():
                raise ConnectionResetError(f"{direction}: the peer went away")
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()  # half-close: the other direction keeps flowing
                return
            writer.write(data)
            with self._lock:
                self._bytes[direction] += len(data)
            await writer.drain()


def _abort(writer: asyncio.StreamWriter | None) -> None:
    """Close with a RST (SO_LINGER 0), not a FIN: the peer sees "connection reset"."""
    if writer is None or writer.is_closing():
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def main(argv: list[str] | None = None) -> None:
    """Run a proxy in the foreground until SIGINT/SIGTERM (for trying a client by hand)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="host:port of the server")
    parser.add_argument("--rtt", type=float, default=0.0, help="round-trip time in seconds")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (default: a free one)")
    args = parser.parse_args(argv)
    host, _, port = args.target.rpartition(":")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with LatencyProxy((host, int(port)), args.rtt, port=args.port) as proxy:
        print(
            f"listening on {proxy.host}:{proxy.port} -> {args.target}, rtt {args.rtt * 1000:g} ms", flush=True
        )
        stop.wait()


if __name__ == "__main__":
    main()
