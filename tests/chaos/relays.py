"""The relay scenarios (issue 20): a tenant's relay that goes away for longer than the whole retry budget,
and one that refuses the way a provider does (3 connections, 10 mails a second, SES's 454 beyond).

The relay is tests/relays/throttling_relay.py (aiosmtpd) running in this process, so its counters (what
it accepted, how often it refused) are read directly; mailq's workers are the usual processes. Accounts
register without an SMTP login (the relay asks for none), each with its webhook endpoint for the audit.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import dataclass

from tests.chaos.audit import rows
from tests.chaos.client import Account, Client
from tests.chaos.scenarios import Result, Run
from tests.chaos.stack import Stack
from tests.relays.throttling_relay import ThrottlingRelay


@dataclass
class RelayServer:
    """A ThrottlingRelay where a scenario expects a server: it runs in this process (RelayRun stops it)."""

    relay: ThrottlingRelay

    @property
    def port(self) -> int:
        return self.relay.port

    def counts(self) -> Counter:
        return Counter(self.relay.stats().message_ids)


class RelayRun(Run):
    """A Run whose SMTP servers are ThrottlingRelays (``relays``: their keyword arguments) and whose
    accounts log in to none; ``limits``: the accounts' declared smtp_send_limits, by relay."""

    def __init__(self, stack: Stack, name: str, tasks: int, relays: list[dict], limits=None, **kwargs):
        self.relay_specs, self.limits = relays, limits or {}
        super().__init__(stack, name, tasks, **kwargs)

    def start_servers(self, flaky, seed) -> list:
        return [RelayServer(ThrottlingRelay(**spec).start()) for spec in self.relay_specs]

    def make_accounts(self, users: int) -> list[Account]:
        client, accounts = Client(self.stack.base_url), []
        try:
            for i in range(users):
                number = i % len(self.servers)
                server = self.servers[number]
                email, password = f"relay{i}.{self.tag}@chaos.example.com", f"pw-{self.tag}-{i}-correct"[:60]
                body = {
                    "email": email,
                    "password": password,
                    "smtp_host": "127.0.0.1",
                    "smtp_port": server.port,
                    "smtp-username": "",
                    "smtp-password": "",
                    "smtp_security": "none",
                }
                if number in self.limits:
                    body["smtp_send_limits"] = self.limits[number]
                reply = client.call("POST", "/api/v1/register", body)
                if reply.status != 201:
                    raise RuntimeError(f"register answered {reply.status}: {reply.body}")
                login = client.call("POST", "/api/v1/login", {"email": email, "password": password})
                accounts.append(Account(reply.body["id"], email, password, "", login.body["token"]))
        finally:
            client.close()
        return accounts

    def copies(self) -> Counter:
        """Message-ID -> copies every relay of the run holds (each mail reached one of them)."""
        return sum((server.counts() for server in self.servers), Counter())

    answered_250 = copies  # a relay records a mail only when it answers 250 to its final dot

    def stop_server(self, server) -> None:
        pass  # no process: its counters are read after the run, then stop_relays stops it

    def stop_relays(self) -> None:
        for server in self.servers:
            server.relay.stop()


def _log_count(run: Run, pattern: str) -> int:
    return sum(len(re.findall(pattern, p.log.read_text(errors="replace"))) for p in run.workers.history)


def relay_outage(
    stack: Stack,
    tasks: int = 2000,
    *,
    downtime: float = 600.0,
    users: int = 4,
    rate: float | None = None,
    seed: int = 21,
    settings: dict | None = None,
) -> Result:
    """The relay refuses every connection (its service is down, the host up) for ``downtime`` seconds,
    much longer than the whole retry budget, while the mail is enqueued; then it comes back. Nothing may
    be lost or cancelled, and no try spent: an account condition is not the mail's failure."""
    # Production's retry budget (3 tries, 30 s and 60 s apart): the outage is longer than all of it.
    production = {"MAX_TRY_COUNT": 3, "RETRY_BACKOFF_BASE": 30, "RETRY_BACKOFF_MAX": 3600}
    run = RelayRun(
        stack,
        "relay-outage",
        tasks,
        [{}],
        users=users,
        rate=rate,
        seed=seed,
        **{**production, **(settings or {})},
    )
    relay = run.servers[0].relay
    relay.go_down("refuse")
    down = time.monotonic()
    run.enqueuer.start()
    run.wait_accepted(1.0, timeout=max(120.0, downtime))
    time.sleep(max(0.0, downtime - (time.monotonic() - down)))
    during = Counter(r.status for r in rows(stack.engine).values())
    relay.come_up()
    back = time.monotonic()
    result = run.finish(f"the relay refused every connection for {downtime:g} s, then came back")
    drained = time.monotonic() - back
    db = rows(stack.engine)
    accepted = set(run.enqueuer.result.task_ids.values())
    tries = Counter(r.try_count for i, r in db.items() if i in accepted)
    stats = relay.stats()
    run.stop_relays()
    result.figures.update(
        {
            "statuses while down": dict(during),
            "try_count of the tasks": dict(sorted(tries.items())),
            "backoff steps (sender logs)": _log_count(run, r"backs off until"),
            "drained after its return s": round(drained, 1),
            "connections after its return": stats.connections_accepted,
        }
    )
    if during.get("cancelled") or result.audit.cancelled:
        result.problems.append(f"mail cancelled by an outage: {result.audit.cancelled}")
    if any(count > 1 for count in tries):
        result.problems.append(f"tries spent by an outage: try counts {dict(tries)}")
    if result.audit.duplicates:
        result.problems.append(f"{result.audit.duplicates} duplicate(s) without any fault but the outage")
    result.notes.append(
        f"{during.get('queued', 0)} mail(s) waited queued through the outage, none claimed; all delivered "
        f"{drained:.0f} s after the relay came back, each with try_count {sorted(tries)}"
    )
    return result


def throttling_relay(
    stack: Stack,
    tasks: int = 2000,
    *,
    max_connections: int = 3,
    max_rate: int = 10,
    declared: bool = True,
    rate: float | None = None,
    seed: int = 22,
    settings: dict | None = None,
) -> Result:
    """Two tenants, each on its own relay that allows ``max_connections`` and ``max_rate`` mails a
    second (421 at connect beyond, SES's 454 at MAIL FROM beyond): one declares nothing (mailq finds
    the limit by being refused, and adapts), the other (``declared``) declares the rate in
    smtp_send_limits. Nothing cancelled or lost; the refusals bounded (about one per rate window
    without a declaration)."""
    spec = {"max_connections": max_connections, "max_rate": max_rate}
    limits = {1: [{"max": max_rate, "per": "second"}]} if declared else {}
    relays = [spec, spec] if declared else [spec]
    run = RelayRun(
        stack,
        "throttling-relay",
        tasks,
        relays,
        limits,
        users=len(relays),
        rate=rate,
        seed=seed,
        **(settings or {}),
    )
    run.enqueuer.start()
    result = run.finish(f"relays allowing {max_connections} connections and {max_rate} mails/s")
    ideal = tasks / len(run.servers) / max_rate
    result.figures["seconds at the relays' rate"] = round(ideal, 1)
    for number, server in enumerate(run.servers):
        stats = server.relay.stats()
        what = "declared" if number in limits else "undeclared"
        mails = len(stats.mails)
        first, last = (stats.mails[0].at, stats.mails[-1].at) if stats.mails else (0.0, 0.0)
        result.figures[f"{what}: refusals"] = stats.refusals
        result.figures[f"{what}: 454 throttled / 421 at connect"] = (
            f"{stats.throttled} / {stats.refused_at_connect}"
        )
        result.figures[f"{what}: mails / s"] = round(mails / (last - first), 1) if last > first else None
        result.figures[f"{what}: refusals per 100 mails"] = round(100 * stats.refusals / max(1, mails), 1)
        bound = mails // max_rate + 3 * max_connections  # about one per rate window, and the first ramp
        if stats.refusals > bound:
            result.problems.append(f"{what} relay refused {stats.refusals} times (bound {bound})")
    run.stop_relays()
    if result.audit.cancelled:
        result.problems.append(f"{result.audit.cancelled} mail(s) cancelled by a relay's throttling")
    if result.audit.duplicates:
        result.problems.append(f"{result.audit.duplicates} duplicate(s) without any fault but throttling")
    result.notes.append("every throttled mail went back to its queue without spending a try")
    return result


SCENARIOS = {"relay-outage": relay_outage, "throttling-relay": throttling_relay}
