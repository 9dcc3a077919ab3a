"""A deadline on the whole of one exchange with a peer we do not trust, enforced on its socket.

A socket timeout bounds each operation, not the exchange: a peer that trickles a byte at a time keeps
every read short and the whole exchange endless. A ``Guard`` holds one exchange's deadline and its
socket; one ``Watchdog`` thread per client expires the guards whose deadline has passed by shutting
their sockets down, which wakes whatever the thread is blocked in: a read, a write, a connect or a TLS
handshake. The SMTP side (shared/delivery/smtp.py, shared/delivery/mailer.py) and the webhook receiver
(shared/webhooks/receiver.py) both use it.
"""

from __future__ import annotations

import math
import socket
import threading
from collections.abc import Callable

# The watchdog looks at the clock at least this often: a clock other than time.monotonic (tests) may
# jump, and a guard due then must not wait for the next one to be added.
_WATCHDOG_TICK = 1.0


class Guard:
    """The deadline of one send and the socket it is using; the Watchdog expires it at the deadline.

    It keeps its own duplicate of the socket's descriptor: shutting that down ends the connection for
    the sending thread too (TLS included), and it can never hit another socket that reused a number the
    sending thread closed meanwhile.
    """

    def __init__(self, deadline: float):
        self.deadline = deadline
        self.expired = False
        self._lock = threading.Lock()
        self._watched: socket.socket | None = None

    def watch(self, sock: socket.socket) -> None:
        """From now on the deadline applies to sock (the descriptor is duplicated: works for SSLSockets)."""
        duplicate = socket.fromfd(sock.fileno(), sock.family, sock.type)
        with self._lock:
            previous, self._watched = self._watched, duplicate
            if self.expired:
                _shutdown(duplicate)
        if previous is not None:
            previous.close()

    def expire(self) -> None:
        with self._lock:
            self.expired = True
            if self._watched is not None:
                _shutdown(self._watched)

    def release(self) -> None:
        with self._lock:
            watched, self._watched = self._watched, None
        if watched is not None:
            watched.close()


class Watchdog:
    """One thread per Mailer (not one per send) that expires the guards whose deadline has passed."""

    def __init__(self, clock: Callable[[], float]):
        self._clock = clock
        self._changed = threading.Condition()
        self._guards: set[Guard] = set()
        self._thread: threading.Thread | None = None  # the thread that should be running, if any
        # When the waiting thread looks at the clock next; -inf while it is not waiting (it looks at
        # every guard before it waits again, so no one needs to wake it).
        self._wakeup = -math.inf

    def start(self, deadline: float) -> Guard:
        """Watch a new conversation that must be over by deadline (on the clock given)."""
        guard = Guard(deadline)
        with self._changed:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="smtp-watchdog", daemon=True)
                self._thread.start()
            self._guards.add(guard)
            if deadline < self._wakeup:  # otherwise the thread wakes up early enough already
                self._changed.notify()
        return guard

    def stop(self, guard: Guard) -> None:
        """Stop watching: the guard's socket can no longer be shut down (idempotent)."""
        with self._changed:
            self._guards.discard(guard)
        guard.release()

    def close(self) -> None:
        """End the thread (a later start() begins a new one)."""
        with self._changed:
            thread, self._thread = self._thread, None
            self._changed.notify_all()
        if thread is not None:
            thread.join()

    def _run(self) -> None:
        with self._changed:
            while self._thread is threading.current_thread():
                now = self._clock()
                for guard in [g for g in self._guards if g.deadline <= now]:
                    self._guards.discard(guard)
                    guard.expire()
                if self._guards:
                    wait = min(min(g.deadline for g in self._guards) - now, _WATCHDOG_TICK)
                    self._wakeup = now + wait
                    self._changed.wait(wait)
                else:
                    self._wakeup = math.inf
                    self._changed.wait()
                self._wakeup = -math.inf


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # not connected yet, or already gone
