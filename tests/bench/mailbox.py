"""Watching the SMTP sink: how many mails arrived, when, and whether each arrived exactly once.

The sink appends one JSON line per message to ``mailbox/index.jsonl``. Re-reading the whole file on
every poll would cost the driver a core at 20,000 lines; ``MailboxTail`` reads only what is new.
"""

from __future__ import annotations

import collections
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from shared.local.sink import INDEX, MAILBOX, count_message_ids


class MailboxTail:
    """Incremental reader of the sink's index: message ids and their arrival times."""

    def __init__(self, data_dir: Path):
        self.path = Path(data_dir) / MAILBOX / INDEX
        self._offset = 0
        self._partial = b""
        self.arrivals: dict[str, list[float]] = collections.defaultdict(list)  # id -> epoch seconds
        self.count = 0
        self.last_arrival = 0.0
        self.domains: collections.Counter = collections.Counter()  # recipient domain -> arrivals

    def poll(self) -> int:
        """Read what arrived since the last poll; return the total count so far."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return self.count
        self._offset += len(chunk)
        data = self._partial + chunk
        *lines, self._partial = data.split(b"\n")
        for line in lines:
            if not line:
                continue
            record = json.loads(line)
            at = datetime.fromisoformat(record["received_at"]).timestamp()
            self.arrivals[record.get("message_id")].append(at)
            self.last_arrival = max(self.last_arrival, at)
            self.count += 1
            for rcpt in record.get("rcpt_tos") or ():
                self.domains[rcpt.rpartition("@")[2]] += 1
        return self.count

    def wait_for(
        self,
        n: int,
        timeout: float,
        *,
        alive: Callable[[], None] = lambda: None,
        progress: Callable[[int], None] = lambda count: None,
        interval: float = 0.1,
    ) -> bool:
        """Poll until ``n`` mails arrived (True) or ``timeout`` passed (False)."""
        deadline = time.monotonic() + timeout
        while True:
            count = self.poll()
            progress(count)
            if count >= n:
                return True
            if time.monotonic() > deadline:
                return False
            alive()
            time.sleep(interval)


@dataclass(frozen=True)
class Verdict:
    expected: int
    delivered: int  # distinct expected ids that arrived
    duplicates: int  # arrivals beyond the first of any id
    missing: int
    unexpected: int  # ids nobody sent in this scenario

    @property
    def exactly_once(self) -> bool:
        return self.delivered == self.expected and not (self.duplicates or self.missing or self.unexpected)

    def __str__(self) -> str:
        if self.exactly_once:
            return f"all {self.expected} exactly once"
        return (
            f"{self.delivered}/{self.expected} delivered, {self.missing} missing, "
            f"{self.duplicates} duplicate(s), {self.unexpected} unexpected"
        )


def verify(data_dir: Path, expected_ids: Iterable[str], settle: float = 1.0) -> Verdict:
    """Wait ``settle`` seconds for late duplicates, then count every Message-ID the sink stored."""
    time.sleep(settle)
    counts = count_message_ids(data_dir)  # the sink's own reader: the check does not trust MailboxTail
    expected = set(expected_ids)
    delivered = sum(1 for i in expected if counts.get(i, 0) >= 1)
    duplicates = sum(c - 1 for c in counts.values() if c > 1)
    unexpected = sum(1 for i in counts if i not in expected)
    return Verdict(len(expected), delivered, duplicates, len(expected) - delivered, unexpected)
