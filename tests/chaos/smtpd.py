"""An SMTP server (aiosmtpd) that answers each DATA at random and logs every decision.

    python -m tests.chaos.smtpd --port 2525 --log smtp.jsonl --mix 250=0.7,451=0.1,550=0.1,drop_after=0.1

Fates: ``250`` accepts and stores, ``451`` and ``550`` refuse, ``drop_before`` hangs up while the client
is still sending the message (after its headers, before the final dot: nothing stored), ``drop_after``
stores the message and hangs up without answering (the lost final reply: a retry duplicates it).
Each DATA appends one JSON line — rcpt, message_id, fate, stored — which the audit replays per task.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import threading
import time
import warnings
from email.parser import BytesHeaderParser
from email.policy import default as default_policy
from pathlib import Path

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult

from shared.local.sink import run_until_stopped

FATES = ("250", "451", "550", "drop_before", "drop_after")
REPLIES = {
    "250": "250 2.0.0 OK stored",
    "451": "451 4.3.0 chaos: try again later",
    "550": "550 5.7.1 chaos: refused",
}
STORED = frozenset({"250", "drop_after"})  # fates after which the server holds a copy


def parse_mix(spec: str) -> dict[str, float]:
    """``250=0.6,451=0.2,...`` -> weights; unknown fates are an error."""
    mix = {}
    for part in spec.split(","):
        name, _, weight = part.partition("=")
        if name not in FATES:
            raise ValueError(f"unknown fate {name!r}; choose from {', '.join(FATES)}")
        mix[name] = float(weight)
    return mix


class Decisions:
    """Picks a fate per DATA from the mix (seeded) and appends each decision to the log."""

    def __init__(self, mix: dict[str, float], seed: int, log: Path):
        self.names = list(mix)
        self.weights = [mix[n] for n in self.names]
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.serial = 0

    def pick(self) -> str:
        with self.lock:
            return self.rng.choices(self.names, self.weights)[0]

    def record(self, fate: str, rcpt: list[str], message_id: str | None) -> None:
        with self.lock:
            self.serial += 1
            line = {
                "n": self.serial,
                "t": time.time(),
                "fate": fate,
                "stored": fate in STORED,
                "rcpt": rcpt[0] if rcpt else None,
                "message_id": message_id,
            }
            os.write(self.fd, (json.dumps(line) + "\n").encode())  # one write per line: whole lines only


def _message_id(content: bytes) -> str | None:
    value = BytesHeaderParser(policy=default_policy).parsebytes(content).get("Message-ID")
    return None if value is None else str(value).strip()


class _Handler:
    def __init__(self, decisions: Decisions):
        self.decisions = decisions

    async def handle_DATA(self, server: FlakySMTP, session, envelope) -> str:
        fate = server.fate or "250"
        self.decisions.record(fate, list(envelope.rcpt_tos), _message_id(envelope.original_content or b""))
        if fate == "drop_after":
            server.transport.close()
            await asyncio.sleep(3600)  # connection_lost cancels this: no reply ever goes out
        return REPLIES[fate]


class FlakySMTP(SMTP):
    """aiosmtpd's SMTP, deciding each DATA's fate before the message is read."""

    def __init__(self, decisions: Decisions, *args, **kwargs):
        self.decisions = decisions
        self.fate: str | None = None
        super().__init__(*args, **kwargs)

    async def smtp_DATA(self, arg: str) -> None:
        ready = self.envelope is not None and self.envelope.rcpt_tos and not arg and self.session.host_name
        self.fate = self.decisions.pick() if ready else None
        if self.fate != "drop_before":
            return await super().smtp_DATA(arg)
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        # Read the headers (so the log can name the message), then hang up mid-message.
        lines = []
        while len(lines) < 200:
            line = await self._reader.readuntil(b"\r\n")
            if line == b"\r\n" or line == b".\r\n":
                break
            lines.append(line)
        rcpt = list(self.envelope.rcpt_tos)
        self.decisions.record("drop_before", rcpt, _message_id(b"".join(lines) + b"\r\n"))
        self.transport.close()


def _accept_any_login(server, session, envelope, mechanism, auth_data) -> AuthResult:
    return AuthResult(success=True)


class _Controller(Controller):
    def __init__(self, decisions: Decisions, **kwargs):
        self.decisions = decisions
        super().__init__(_Handler(decisions), **kwargs)

    def factory(self):
        return FlakySMTP(self.decisions, self.handler, **self.SMTP_kwargs)


def read_log(path: Path) -> list[dict]:
    """Every decision the server logged, in order (a torn last line is skipped)."""
    records = []
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return records
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log", type=Path, required=True)
    parser.add_argument("--mix", default="250=1", help="fate=weight,... (fates: " + ", ".join(FATES) + ")")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message="Session.login_data is deprecated")
    decisions = Decisions(parse_mix(args.mix), args.seed, args.log)
    controller = _Controller(
        decisions,
        hostname=args.host,
        port=args.port,
        server_hostname="chaos-smtp",
        authenticator=_accept_any_login,
        auth_require_tls=False,
    )
    run_until_stopped(controller)


if __name__ == "__main__":
    main()
