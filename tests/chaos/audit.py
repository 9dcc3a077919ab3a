"""The audit every fault run ends with, against PostgreSQL (what mailq says) and the SMTP server (what
arrived): every accepted task in a terminal state, every `sent` one at the server, none lost, and the
duplicates counted by Message-ID — each one explained.
"""

from __future__ import annotations

import base64
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import sqlalchemy as sa

TERMINAL = ("sent", "cancelled")


@dataclass(frozen=True)
class Row:
    id: int
    status: str
    try_count: int  # claims so far: the fencing token, never reset
    message_id: str
    recipient_email: str
    last_error: str | None
    budget_base: int = 0  # the claim count at which the current budget of MAX_TRY_COUNT tries began

    @property
    def tries_used(self) -> int:
        """Tries spent from the current budget (a worker fault or a user's retry raises the base)."""
        return self.try_count - self.budget_base


def rows(engine) -> dict[int, Row]:
    with engine.connect() as conn:
        result = conn.execute(
            sa.text(
                "SELECT id, status, try_count, message_id, recipient_email, last_error, budget_base "
                "FROM tasks"
            )
        )
        return {r.id: Row(*r) for r in result}


def wait_settled(engine, task_ids: Iterable[int], timeout: float, poll: float = 0.5) -> dict[int, Row]:
    """Poll until every one of ``task_ids`` is sent or cancelled (or ``timeout``); return the rows."""
    wanted = set(task_ids)
    deadline = time.monotonic() + timeout
    while True:
        try:
            current = rows(engine)
        except sa.exc.DBAPIError:  # PostgreSQL may be down in the middle of a scenario
            current = {}
        pending = [i for i in wanted if i not in current or current[i].status not in TERMINAL]
        if current and not pending or time.monotonic() > deadline:
            return current
        time.sleep(poll)


def count_status(engine, status: str) -> int:
    with engine.connect() as conn:
        return conn.execute(
            sa.text("SELECT count(*) FROM tasks WHERE status = :s"), {"s": status}
        ).scalar_one()


@dataclass
class Audit:
    accepted: int = 0  # tasks the API answered 202 for
    sent: int = 0
    cancelled: int = 0
    not_terminal: list[int] = field(default_factory=list)
    missing: list[int] = field(default_factory=list)  # a 202 whose row does not exist
    sent_not_delivered: list[int] = field(default_factory=list)  # `sent` but the server never got it
    duplicates: int = 0  # copies beyond the first, over all tasks
    duplicated_tasks: list[int] = field(default_factory=list)
    strangers: int = 0  # messages at the server that belong to no task
    unjustified: list[str] = field(default_factory=list)  # a final state the server's log contradicts
    cancel_reasons: Counter = field(default_factory=Counter)

    @property
    def lost(self) -> int:
        return len(self.not_terminal) + len(self.missing) + len(self.sent_not_delivered)

    def failures(self) -> list[str]:
        """Everything that breaks the guarantees, in words (empty when the run is clean)."""
        out = []
        if self.not_terminal:
            out.append(f"{len(self.not_terminal)} task(s) not terminal, e.g. {self.not_terminal[:5]}")
        if self.missing:
            out.append(f"{len(self.missing)} accepted task(s) without a row, e.g. {self.missing[:5]}")
        if self.sent_not_delivered:
            out.append(f"{len(self.sent_not_delivered)} sent task(s) never seen at the server")
        if self.strangers:
            out.append(f"{self.strangers} message(s) at the server that belong to no task")
        out += self.unjustified[:10]
        return out


def audit_delivery(db: dict[int, Row], accepted: Iterable[int], copies: Counter) -> Audit:
    """Check the tasks the API accepted against ``copies`` (Message-ID -> copies the server holds)."""
    audit = Audit()
    accepted = sorted(set(accepted))
    audit.accepted = len(accepted)
    ours = {row.message_id for row in db.values()}
    audit.strangers = sum(n for mid, n in copies.items() if mid not in ours)
    for task_id in accepted:
        row = db.get(task_id)
        if row is None:
            audit.missing.append(task_id)
            continue
        if row.status not in TERMINAL:
            audit.not_terminal.append(task_id)
        elif row.status == "sent":
            audit.sent += 1
            if copies.get(row.message_id, 0) == 0:
                audit.sent_not_delivered.append(task_id)
        else:
            audit.cancelled += 1
            audit.cancel_reasons[_reason_kind(row.last_error)] += 1
        extra = copies.get(row.message_id, 0) - 1
        if extra > 0:
            audit.duplicates += extra
            audit.duplicated_tasks.append(task_id)
    return audit


def _reason_kind(error: str | None) -> str:
    text = error or ""
    if "worker sending the last try was lost" in text:
        return "last try's worker lost"
    if "gave up after" in text:
        return "tries used up"
    if " 5" in text[:40] or text.startswith("5"):
        return "permanent 5xx"
    return text[:60] or "no reason"


def audit_against_server_log(
    db: dict[int, Row],
    accepted: Iterable[int],
    log: list[dict],
    max_tries: int,
    *,
    kills: bool = False,
    in_window: Counter | None = None,
) -> Audit:
    """The flaky-server audit: each task's final state must be the one its attempts in the log justify.

    sent      <=> the last attempt was answered 250;
    cancelled <=> the last attempt was a 550, or the tries ran out on transient failures (451, a drop),
              or (with kills) the sender of the last try died;
    a 250 is never followed by another attempt, unless a kill landed between that 250 and the status
    write (``in_window``: Message-ID -> such kills); copies at the server = 250s + drops after the dot.
    With ``kills`` a claim may die before reaching DATA, so attempts may be fewer than tries.
    """
    copies: Counter = Counter()
    attempts: dict[str, list[str]] = {}
    for record in log:
        mid = record.get("message_id")
        attempts.setdefault(mid, []).append(record["fate"])
        if record["stored"]:
            copies[mid] += 1
    audit = audit_delivery(db, accepted, copies)
    in_window = in_window or Counter()
    for task_id in sorted(set(accepted)):
        row = db.get(task_id)
        if row is None or row.status not in TERMINAL:
            continue
        fates = attempts.get(row.message_id, [])
        problem = _unjustified(row, fates, max_tries, kills, in_window.get(row.message_id, 0))
        if problem:
            audit.unjustified.append(
                f"task {task_id} ({row.status}, try {row.try_count}, {fates}): {problem}"
            )
    return audit


def _unjustified(row: Row, fates: list[str], max_tries: int, kills: bool, in_window: int) -> str | None:
    if fates[:-1].count("250") > in_window:
        return "tried again after a 250"
    if len(fates) > row.try_count:
        return "more attempts at the server than tries counted"
    # A claim given back without spending a try (the relay refused the account after the claim) moves
    # the budget with the count: the tries spent are the count less the budget's base.
    if not kills and len(fates) != row.tries_used:
        return "a try that never reached DATA"
    last = fates[-1] if fates else None
    if row.status == "sent":
        return None if last == "250" else "sent without a 250"
    if "worker sending the last try was lost" in (row.last_error or ""):
        return None if kills and row.tries_used >= max_tries else "a lost worker without kills"
    if last == "550":
        return None if "550" in (row.last_error or "") else "cancelled by a 550 without saying so"
    if last in ("451", "drop_before", "drop_after") and row.tries_used >= max_tries:
        return None
    return f"cancelled after {last!r} with tries left"


def secrets_found(text: str, secrets: dict[str, str]) -> list[str]:
    """Names of the secrets that appear in ``text`` in clear or base64 (as an SMTP AUTH line carries them)."""
    found = []
    for name, value in secrets.items():
        if not value:
            continue
        forms = {value, base64.b64encode(value.encode()).decode().rstrip("=")}
        if any(form in text for form in forms):
            found.append(name)
    return found
