"""The webhook audit every fault run ends with: a receiver in this process, one endpoint per account, a
`mailq webhooks` worker beside the senders, and at the end, for every accepted task in a final state,
exactly the events its history implies at the receiver (at least once each), none for anything that did
not happen, every request verified with the Standard Webhooks reference library.

What "its history implies" means here:

- ``sent``: one ``task.sent`` whose try count is the row's (the outcome that won the fencing check),
  no ``task.cancelled``;
- ``cancelled``: one ``task.cancelled`` whose reason is the one the row's error names, no ``task.sent``;
- ``task.deferred``: one per recorded transient failure, each with its own try count below the final
  one; where the scenario has the SMTP server's log and killed no sender, exactly as many as the log's
  transient failures that were not the last try (a last try's failure is reported as the cancel).

"At least once" is the promise, so a webhook-id may arrive twice (a worker killed after the receiver's
200); two *different* events for one thing that happened once is a failure.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import sqlalchemy as sa

from tests.chaos.audit import TERMINAL, Row
from tests.chaos.client import Client
from tests.webhook_receiver import WebhookReceiver

TRANSIENT = ("451", "drop_before", "drop_after")
DELIVERY_TIMEOUT = 120.0  # after the tasks settled, for the last deliveries to reach the receiver


@dataclass
class HookAudit:
    requests: int = 0  # POSTs the receiver got, repeats included
    events: int = 0  # distinct webhook-ids
    repeats: int = 0  # requests beyond the first per webhook-id (allowed: at least once)
    by_type: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(self.by_type.items()))
        return f"webhooks: {self.events} events ({kinds}), {self.repeats} repeated deliveries"


class Hooks:
    """The receiver and one endpoint per account; ``audit()`` once the tasks settled."""

    def __init__(self, base_url: str, accounts: list):
        self.receiver = WebhookReceiver().__enter__()
        self.secrets: dict[int, str] = {}  # user id -> signing secret
        client = Client(base_url)
        try:
            for account in {a.id: a for a in accounts}.values():  # a tenant may be listed more than once
                reply = client.call(
                    "POST", "/api/v1/webhooks", {"url": self.receiver.url}, token=account.token
                )
                if reply.status != 201:
                    raise RuntimeError(f"creating a webhook endpoint answered {reply.status}: {reply.body}")
                self.secrets[account.id] = reply.body["secret"]
        finally:
            client.close()

    def close(self) -> None:
        self.receiver.__exit__(None, None, None)

    def wait_delivered(self, engine, timeout: float = DELIVERY_TIMEOUT) -> dict[str, int]:
        """Wait until no delivery is left to make; return deliveries by state."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                with engine.connect() as conn:
                    states = dict(
                        conn.execute(
                            sa.text("SELECT state, count(*) FROM webhook_deliveries GROUP BY state")
                        ).all()
                    )
            except sa.exc.DBAPIError:
                states = {"unknown": 1}
            if set(states) <= {"delivered", "failed"} or time.monotonic() > deadline:
                return states
            time.sleep(0.5)

    def audit(
        self,
        engine,
        db: dict[int, Row],
        accepted: list[int],
        attempts: dict[str, list[str]] | None = None,
    ) -> HookAudit:
        """Check what reached the receiver against the tasks' final rows (and the server's log, if any:
        Message-ID -> fates of each attempt, in order)."""
        result = HookAudit()
        states = self.wait_delivered(engine)
        if set(states) - {"delivered"}:
            result.problems.append(f"webhook deliveries not all delivered: {states}")
        owner = _owners(engine)
        seen: dict[str, dict] = {}
        for request in list(self.receiver.requests):
            result.requests += 1
            event = request.event
            data = event.get("data", {})
            task_id = data.get("task_id")
            if str(event.get("type", "")).startswith("account."):  # an account's event names its user
                secret = self.secrets.get(data.get("user_id"))
            else:
                secret = self.secrets.get(owner.get(task_id, -1))
            if secret is None:
                result.problems.append(f"a webhook for task {task_id}, which no account of this run owns")
                continue
            try:
                verified = request.verified(secret)
            except Exception as exc:  # noqa: BLE001 - the reference library's verdict, in words
                result.problems.append(f"webhook {request.headers.get('webhook-id')} failed to verify: {exc}")
                continue
            webhook_id = request.headers["webhook-id"]
            if webhook_id in seen:
                result.repeats += 1
                if seen[webhook_id] != verified:
                    result.problems.append(f"webhook-id {webhook_id} arrived with two different bodies")
                continue
            seen[webhook_id] = verified
        result.events = len(seen)
        per_task: dict[int, list[dict]] = defaultdict(list)
        for event in seen.values():
            result.by_type[event["type"]] += 1
            if not event["type"].startswith("account."):
                per_task[event["data"]["task_id"]].append(event)
        wanted = set(accepted)
        for task_id in sorted(set(per_task) - wanted):
            result.problems.append(f"task {task_id}: events for a task the API never accepted")
        for task_id in sorted(wanted):
            row = db.get(task_id)
            if row is None or row.status not in TERMINAL:
                continue  # the delivery audit already reports it
            fates = attempts.get(row.message_id) if attempts is not None else None
            problem = _judge(row, per_task.get(task_id, []), fates)
            if problem:
                result.problems.append(f"task {task_id} ({row.status}, try {row.try_count}): {problem}")
        return result


def _owners(engine) -> dict[int, int]:
    with engine.connect() as conn:
        return dict(conn.execute(sa.text("SELECT id, user_id FROM tasks")).all())


def _judge(row: Row, events: list[dict], fates: list[str] | None) -> str | None:
    kinds = Counter(e["type"] for e in events)
    final = "task.sent" if row.status == "sent" else "task.cancelled"
    other = "task.cancelled" if final == "task.sent" else "task.sent"
    if kinds[final] != 1:
        return f"{kinds[final]} {final} event(s), wanted exactly 1 ({dict(kinds)})"
    if kinds[other]:
        return f"a {other} for a task that ended {row.status}"
    (last,) = [e for e in events if e["type"] == final]
    if last["data"]["try_count"] != row.try_count:
        return f"{final} reports try {last['data']['try_count']}, the row's outcome is try {row.try_count}"
    if final == "task.cancelled":
        expected = _cancel_reason(row.last_error)
        if expected and last["data"].get("reason") != expected:
            return f"task.cancelled says {last['data'].get('reason')!r}, the row's error says {expected!r}"
    deferred = sorted(e["data"]["try_count"] for e in events if e["type"] == "task.deferred")
    if len(set(deferred)) != len(deferred):
        return f"two task.deferred events for one try: {deferred}"
    if deferred and deferred[-1] >= row.try_count:
        return f"a task.deferred at try {deferred[-1]}, not before the final try {row.try_count}"
    if fates is not None:
        implied = sum(1 for fate in fates[:-1] if fate in TRANSIENT)  # the last one is the outcome
        if len(deferred) != implied:
            return f"{len(deferred)} task.deferred event(s), the server's log implies {implied} ({fates})"
    return None


def _cancel_reason(error: str | None) -> str | None:
    text = error or ""
    if "worker sending the last try was lost" in text:
        return "lost_in_flight"
    if "gave up after" in text:
        return "tries_exhausted"
    return None  # a permanent failure's text varies; its reason is checked by the unit tests
