"""Scenario 12: a relay far away. Mails/s delivered through a loopback proxy that puts a round-trip time
between the client and the relay (tests/relays/latency_proxy.py), at each RTT of ``--relay-rtts``, for

- **mailq**: N queued tasks of an account on the relay, drained by one consumer and one sender process
  per core (as `mailq dev`), the account at its default SMTP_MAX_CONNECTIONS_PER_ACCOUNT (3
  conversations at once); the clock runs from the backlog's release to the relay's last 250;
- **plain smtplib**: the same messages over 3 connections, one thread each, ``sendmail`` one command at
  a time; the clock runs from the first connect to the last 250;
- **Postfix**: a private instance (tests/relays/postfix.py) relaying the same messages to the proxy with
  destination concurrency 3; the clock runs from the first mail submitted to its smtpd (directly, not
  through the proxy) to the relay's last 250. Not run, and the report says why, where Postfix cannot run.

The relay is a ThrottlingRelay without limits (aiosmtpd, offering PIPELINING); it and the proxy each run
in a process of their own (``Isolated``): in the benchmark's process their event loops would take turns
on its interpreter lock with the smtplib threads. Every run checks that the relay got each Message-ID
exactly once.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import smtplib
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.policy import default as default_policy
from multiprocessing.connection import Connection
from typing import Any

from shared import queue
from shared.accounts import users
from shared.config import Settings
from shared.delivery.message import build_message
from tests.bench import seed
from tests.bench.delivery import _settled
from tests.bench.mailbox import Verdict
from tests.bench.stack import Stack, default_senders

DEFAULT_RTTS = (0.0, 20.0, 50.0)  # milliseconds
DEFAULT_MAILS = 300
CONNECTIONS = 3  # the smtplib baseline's connections and Postfix's destination concurrency
TARGET_RTT, TARGET = 20.0, 1.6  # issue 20: mailq ≥ 1.6 × plain smtplib through a relay 20 ms away
Progress = Callable[[int], None]


@dataclass
class RelayRun:
    client: str  # "mailq", "smtplib", "postfix"
    rtt_ms: float
    n: int
    seconds: float
    verdict: Verdict
    connections: int = 0  # connections the relay accepted
    max_open: int = 0  # the most it had open at once
    commands: dict[str, int] = field(default_factory=dict)  # what the relay was told, by verb
    statuses: dict[str, int] = field(default_factory=dict)  # mailq only: task rows by status at the end
    load1: float = 0.0  # the machine's 1-minute load average when the run started

    @property
    def rate(self) -> float:
        return self.verdict.delivered / self.seconds if self.seconds > 0 else 0.0

    @property
    def ok(self) -> bool:
        return self.verdict.exactly_once and set(self.statuses) <= {"sent"}


@dataclass
class RelayResult:
    rtts: tuple[float, ...]
    n: int
    runs: list[RelayRun] = field(default_factory=list)
    postfix_skipped: str | None = None  # why Postfix was not run

    def get(self, client: str, rtt: float) -> RelayRun | None:
        return next((r for r in self.runs if r.client == client and r.rtt_ms == rtt), None)


# --- the relay and the proxy, each in a process of its own ---------------------------------------------


class Isolated:
    """A ThrottlingRelay ("relay") or LatencyProxy ("proxy") in a spawned process of its own;
    ``call("stats")`` runs one of its methods there and returns the (pickled) result."""

    def __init__(self, kind: str, **kwargs: Any):
        self.kind, self.kwargs = kind, kwargs
        self.address: tuple[str, int] = ("", 0)

    def __enter__(self) -> Isolated:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(self.kind, self.kwargs, child), daemon=True)
        self._process.start()
        child.close()
        self.address = self._receive(60)
        return self

    def call(self, method: str, *args: Any, timeout: float = 60) -> Any:
        self._conn.send((method, args))
        return self._receive(timeout)

    def __exit__(self, *exc_info: object) -> None:
        try:
            self._conn.send(None)
        except OSError:
            pass
        self._process.join(10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(10)
        self._conn.close()

    def _receive(self, timeout: float) -> Any:
        if not self._conn.poll(timeout):
            raise TimeoutError(f"the isolated {self.kind} did not answer within {timeout:.0f} s")
        answer = self._conn.recv()
        if isinstance(answer, BaseException):
            raise answer
        return answer


def _serve(kind: str, kwargs: dict[str, Any], conn: Connection) -> None:
    from tests.relays.latency_proxy import LatencyProxy
    from tests.relays.throttling_relay import ThrottlingRelay

    factory = {"relay": ThrottlingRelay, "proxy": LatencyProxy}[kind]
    try:
        server = factory(**kwargs).start()
    except BaseException as exc:  # noqa: BLE001 - handed to the parent, which raises it
        conn.send(exc)
        return
    try:
        conn.send(server.address)
        while (request := conn.recv()) is not None:
            method, args = request
            try:
                conn.send(getattr(server, method)(*args))
            except BaseException as exc:  # noqa: BLE001 - handed to the parent
                conn.send(exc)
    finally:
        server.stop()


# --- the scenario ------------------------------------------------------------------------------------


def relay_scenario(
    stack: Stack,
    n: int = DEFAULT_MAILS,
    rtts: Iterable[float] = DEFAULT_RTTS,
    *,
    postfix: bool = True,
    progress: Progress = lambda n: None,
) -> RelayResult:
    """Every client at every RTT (milliseconds), one run each."""
    from tests.relays.postfix import preflight

    result = RelayResult(tuple(rtts), n)
    problems = preflight() if postfix else ["--skip-postfix"]
    if problems:
        result.postfix_skipped = "; ".join(problems)
    for rtt in result.rtts:
        result.runs.append(_mailq(stack, n, rtt, progress))
        result.runs.append(_smtplib(n, rtt, progress))
        if not problems:
            result.runs.append(_postfix(n, rtt, progress))
    return result


def _messages(n: int) -> tuple[str, list[tuple[str, bytes]], list[str]]:
    """The sender, N (recipient, wire bytes) built as mailq builds them, and their Message-IDs."""
    policy = default_policy.clone(linesep="\r\n")
    sender, now, mails, ids = "relay@example.com", datetime.now(UTC), [], []
    for i in range(n):
        recipient, subject, body = seed.mail(i)
        message_id = seed.new_message_id()
        message = build_message(
            sender=sender, recipient=recipient, subject=subject, body=body, message_id=message_id, date=now
        )
        mails.append((recipient, message.as_bytes(policy=policy)))
        ids.append(message_id)
    return sender, mails, ids


def _relays(rtt: float):
    relay = Isolated("relay")
    relay.__enter__()
    try:
        proxy = Isolated("proxy", target=relay.address, rtt=rtt / 1000).__enter__()
    except BaseException:
        relay.__exit__(None, None, None)
        raise
    return relay, proxy


def _finish(client: str, rtt: float, n: int, started: float, relay: Isolated, ids: list[str], load1: float):
    got = relay.call("wait_for_mails", n, _timeout(n, rtt), timeout=_timeout(n, rtt) + 30)
    stats = relay.call("stats")
    seconds = max(m.at for m in got) - started  # CLOCK_MONOTONIC: the same in every process
    return RelayRun(
        client, rtt, n, seconds, _verdict(stats.message_ids, ids), stats.connections_accepted,
        stats.max_concurrent, dict(stats.commands), load1=load1,
    )  # fmt: skip


def _timeout(n: int, rtt: float) -> float:
    return 60.0 + n * (8 * rtt / 1000 + 0.05)  # far beyond a healthy run (4 round trips a mail)


def _verdict(received: Iterable[str | None], expected_ids: Iterable[str]) -> Verdict:
    counts = collections.Counter(received)
    expected = set(expected_ids)
    delivered = sum(1 for i in expected if counts.get(i, 0) >= 1)
    duplicates = sum(c - 1 for c in counts.values() if c > 1)
    unexpected = sum(1 for i in counts if i not in expected)
    return Verdict(len(expected), delivered, duplicates, len(expected) - delivered, unexpected)


def _mailq(stack: Stack, n: int, rtt: float, progress: Progress) -> RelayRun:
    stack.reset()
    relay, proxy = _relays(rtt)
    workers = []
    try:
        # A user of the relay who declares nothing: the default conversations at once.
        account = {
            "email": f"relay-{rtt:g}-{time.monotonic_ns()}@example.com",
            "password": "relay password",
            "smtp_host": "127.0.0.1",
            "smtp_port": proxy.address[1],
            "smtp-username": "",
            "smtp-password": "",
            "smtp_security": "none",
        }
        user = users.register(stack.ctx, account, "bench")
        backlog = seed.queued_backlog(stack.ctx.engine, user["id"], n)
        seed.stage_envelopes(stack.ctx.redis, [task_id for task_id, _ in backlog])
        default = str(Settings().smtp_max_connections_per_account)
        workers = stack.start_workers(default_senders(), SMTP_MAX_CONNECTIONS_PER_ACCOUNT=default)
        load1 = os.getloadavg()[0]
        started = time.monotonic()
        seed.release(stack.ctx.redis, seed.HOLD, queue.TASK_LIST)
        run = _finish("mailq", rtt, n, started, relay, [m for _, m in backlog], load1)
        run.statuses = _settled(stack)
        progress(n)
        return run
    finally:
        stack.stop(*workers)
        proxy.__exit__(None, None, None)
        relay.__exit__(None, None, None)


def _smtplib(n: int, rtt: float, progress: Progress) -> RelayRun:
    sender, mails, ids = _messages(n)
    relay, proxy = _relays(rtt)
    errors: list[BaseException] = []

    def send(share: list[tuple[str, bytes]]) -> None:
        try:
            with smtplib.SMTP(*proxy.address, timeout=60) as client:
                for recipient, data in share:
                    client.sendmail(sender, [recipient], data)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    try:
        load1 = os.getloadavg()[0]
        threads = [threading.Thread(target=send, args=(mails[i::CONNECTIONS],)) for i in range(CONNECTIONS)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise RuntimeError(f"plain smtplib at {rtt:g} ms failed") from errors[0]
        run = _finish("smtplib", rtt, n, started, relay, ids, load1)
        progress(n)
        return run
    finally:
        proxy.__exit__(None, None, None)
        relay.__exit__(None, None, None)


def _postfix(n: int, rtt: float, progress: Progress) -> RelayRun:
    from tests.relays.postfix import PostfixInstance

    sender, mails, ids = _messages(n)
    relay, proxy = _relays(rtt)
    try:
        with PostfixInstance(proxy.address[1], concurrency=CONNECTIONS) as instance:
            load1 = os.getloadavg()[0]
            started = time.monotonic()
            instance.inject([(sender, [recipient], data) for recipient, data in mails])
            run = _finish("postfix", rtt, n, started, relay, ids, load1)
            if not instance.wait_for_empty_queue(timeout=30):
                raise RuntimeError(f"mail left in Postfix's queue:\n{instance.log()[-3000:]}")
        progress(n)
        return run
    finally:
        proxy.__exit__(None, None, None)
        relay.__exit__(None, None, None)


# --- the report ----------------------------------------------------------------------------------------

TITLE = "12. A relay far away"
CLIENTS = {"mailq": "mailq", "smtplib": "plain smtplib", "postfix": "Postfix"}


def _figures(r: RelayRun) -> str:
    check = "each Message-ID exactly once" if r.verdict.exactly_once else f"**INCORRECT: {r.verdict}**"
    rows = "" if set(r.statuses) <= {"sent"} else f"; **rows not sent: {r.statuses}**"
    resets = f", {r.commands['RSET']} RSET" if r.commands.get("RSET") else ""
    return (
        f"{CLIENTS[r.client]} **{r.rate:,.1f} mails/s** ({r.n} in {r.seconds:.1f} s; {r.connections} "
        f"connections, at most {r.max_open} open{resets}; load {r.load1:.2f}; {check}{rows})"
    )


def relay_rows(t, run) -> None:
    """One row per RTT: the three clients' mails/s, mailq / plain smtplib (and / Postfix)."""
    from tests.bench.rows import _absent, _met

    target = f"mailq ≥ {TARGET} × smtplib at {TARGET_RTT:g} ms"
    result: RelayResult | None = run.relay
    if (why := _absent(run, "relay")) or result is None:
        t.add(TITLE, why or "not run", "—", target, "not run")
        return
    for rtt in result.rtts:
        runs = [r for client in CLIENTS if (r := result.get(client, rtt)) is not None]
        figures = "; ".join(_figures(r) for r in runs)
        if result.postfix_skipped:
            figures += f"; Postfix not run ({result.postfix_skipped})"
        mailq, plain, postfix = (result.get(c, rtt) for c in CLIENTS)
        ratios, ok = [], False
        if mailq and plain and plain.rate and mailq.ok and plain.ok:
            ratios.append(f"mailq/smtplib {mailq.rate / plain.rate:.2f}")
            ok = mailq.rate / plain.rate >= TARGET
        if mailq and postfix and postfix.rate and mailq.ok and postfix.ok:
            ratios.append(f"mailq/Postfix {mailq.rate / postfix.rate:.2f}")
        title = f"{TITLE}: RTT {rtt:g} ms, {CONNECTIONS} connections each"
        if rtt == TARGET_RTT:
            t.add(title, figures, "; ".join(ratios) or "—", target, _met(ok) if ratios else "not run")
        else:
            t.add(title, figures, "; ".join(ratios) or "—", "reported", "—")


def relay_json(result: RelayResult | None) -> dict | None:
    if result is None:
        return None
    return {
        "rtts_ms": list(result.rtts),
        "n": result.n,
        "postfix_skipped": result.postfix_skipped,
        "runs": [
            {
                "client": r.client,
                "rtt_ms": r.rtt_ms,
                "n": r.n,
                "seconds": r.seconds,
                "rate": r.rate,
                "exactly_once": r.verdict.exactly_once,
                "statuses": r.statuses,
                "connections": r.connections,
                "max_open": r.max_open,
                "commands": r.commands,
                "load1": r.load1,
            }
            for r in result.runs
        ],
    }


_RTTS = ", ".join(f"{r:g}" for r in DEFAULT_RTTS)
METHOD = f"""\
- **12. A relay far away**: a ThrottlingRelay without limits (aiosmtpd offering PIPELINING,
  `tests/relays/throttling_relay.py`) behind a loopback proxy that delays every byte by RTT/2 each way
  and a new connection by a TCP handshake's worth (`tests/relays/latency_proxy.py`), each in a process
  of its own, fresh for every run. At each RTT of `--relay-rtts` (default {_RTTS} ms):
  `--relay-mails` mails (default {DEFAULT_MAILS}) of a user who declares no connection limit (the
  default {Settings().smtp_max_connections_per_account} conversations at once), drained like scenario 2
  by one consumer and one sender per core, clock from the backlog's release to the relay's last 250;
  the same messages through {CONNECTIONS} plain `smtplib` connections (one thread each, `sendmail`, one
  command at a time), clock from the first connect to the last 250; and a private Postfix
  (`tests/relays/postfix.py`, Debian's package, destination concurrency {CONNECTIONS}, pipelining and
  connection caching on as by default) relaying them to the proxy, clock from the first mail submitted
  to its smtpd to the relay's last 250 (not run where Postfix cannot: not root, or not installed;
  `--skip-postfix`). Each run checks that the relay got every Message-ID exactly once; "load" is the
  machine's 1-minute load average when the run started.
"""
