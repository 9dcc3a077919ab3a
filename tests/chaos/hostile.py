"""The hostile tenants' SMTP servers (tests/hostile_smtp.py) in one process of their own, each DATA logged.

    python -m tests.chaos.hostile --ports ports.json --log data.jsonl --deadline 3.2 --seed 1

One server per kind in KINDS, each on a free loopback port (written to the ports file). Every message a
server receives up to its final dot is appended to the log as one JSON line (server, Message-ID, time),
so the audit can count the copies of each task that reached a hostile server, whatever it answered.
The servers accept any login: their hostility is elsewhere.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from email.policy import default as default_policy
from pathlib import Path

from shared.local.sink import stop_signals
from tests.hostile_smtp import FloodingServer, HostileSmtpServer, SilentServer, TricklingServer

BANNER_BYTES = len(HostileSmtpServer.banner)
# What each kind does, in the words the report uses.
KINDS = {
    "trickle-banner": "banner one byte at a time, slower than the conversation's deadline",
    "trickle-replies": "every reply one byte at a time, the whole conversation well inside its deadline",
    "flood": "EHLO answered with an endless 250- reply",
    "silent-data": "takes the message, never answers the final dot",
    "throttle-421": "answers MAIL FROM with 421 4.7.0 half the time",
}


class _AnyPassword(str):
    """Equal to every password: HostileSmtpServer then accepts any login."""

    def __eq__(self, other: object) -> bool:
        return True

    __hash__ = str.__hash__


class _Log(list):
    """``server.messages``: every append is also one line in the shared log."""

    def __init__(self, name: str, fd: int, lock: threading.Lock):
        super().__init__()
        self.name, self.fd, self.lock = name, fd, lock

    def append(self, content: bytes) -> None:
        value = BytesHeaderParser(policy=default_policy).parsebytes(content).get("Message-ID")
        line = {"server": self.name, "message_id": value and str(value).strip(), "t": time.time()}
        with self.lock:
            os.write(self.fd, (json.dumps(line) + "\n").encode())  # whole lines only


class Throttling(HostileSmtpServer):
    """Answers MAIL FROM with ``421 4.7.0`` with probability ``share`` (seeded), else accepts."""

    def __init__(self, share: float, seed: int, **kwargs):
        super().__init__(**kwargs)
        self.share, self.rng = share, random.Random(seed)

    def answer(self, sock, reader, verb: str, default: bytes) -> None:
        if verb == "MAIL":
            with self._lock:
                throttled = self.rng.random() < self.share
            if throttled:
                return self.write(sock, b"421 4.7.0 Too many messages, slow down\r\n")
        return super().answer(sock, reader, verb, default)


def build(kind: str, deadline: float, seed: int) -> HostileSmtpServer:
    """One server of ``kind``, its speed chosen against the senders' conversation ``deadline``."""
    login = {"password": _AnyPassword("any")}
    if kind == "trickle-banner":  # the greeting alone takes twice the deadline
        return TricklingServer(delay=2 * deadline / BANNER_BYTES, banner=True, replies=False, **login)
    if kind == "trickle-replies":  # a new connection's ~200 reply bytes take a fifth of the deadline
        return TricklingServer(delay=deadline / 1000, banner=False, replies=True, **login)
    if kind == "flood":
        return FloodingServer("EHLO", **login)
    if kind == "silent-data":
        return SilentServer("DATA", **login)
    if kind == "throttle-421":
        return Throttling(0.5, seed, **login)
    raise ValueError(f"unknown kind {kind!r}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ports", type=Path, required=True)
    parser.add_argument("--log", type=Path, required=True)
    parser.add_argument("--deadline", type=float, required=True, help="the senders' conversation deadline")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    fd = os.open(args.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    lock = threading.Lock()
    servers = {}
    for kind in KINDS:
        server = build(kind, args.deadline, args.seed)
        server.messages = _Log(kind, fd, lock)
        servers[kind] = server.start()
    tmp = args.ports.with_suffix(".tmp")
    tmp.write_text(json.dumps({kind: s.port for kind, s in servers.items()}))
    os.replace(tmp, args.ports)
    with stop_signals() as wait:
        wait()
    for server in servers.values():
        server.stop()


# --- the harness's side --------------------------------------------------------------------------------


@dataclass
class HostileServers:
    proc: object  # tests.chaos.stack.Proc
    ports: dict[str, int]  # kind -> port
    log: Path

    def records(self) -> list[dict]:
        try:
            lines = self.log.read_text().splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # a torn last line
        return out

    def counts(self) -> Counter:
        """Message-ID -> copies received (up to the final dot) by any hostile server."""
        return Counter(r["message_id"] for r in self.records())


def start(stack, deadline: float, seed: int = 1, timeout: float = 30.0) -> HostileServers:
    """Start every hostile server in one process of ``stack``; return their ports and log."""
    serial = time.monotonic_ns()
    ports_file = stack.workdir / f"hostile-{serial}.json"
    log = stack.workdir / f"hostile-{serial}.jsonl"
    args = ["--ports", str(ports_file), "--log", str(log), "--deadline", str(deadline), "--seed", str(seed)]
    proc = stack.spawn("hostile-smtp", args, module="tests.chaos.hostile")
    end = time.monotonic() + timeout
    while not ports_file.exists():
        if not proc.alive() or time.monotonic() > end:
            raise RuntimeError(f"the hostile servers did not start:\n{proc.log.read_text(errors='replace')}")
        time.sleep(0.05)
    return HostileServers(proc, json.loads(ports_file.read_text()), log)


if __name__ == "__main__":
    main()
