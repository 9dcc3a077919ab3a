"""What the last guard (shared.delivery.wirecheck) costs per mail, next to what building the mail costs.

    python -m tests.bench.wirecheck_cost [--n 20000]

For the common mail (the direct path) and for a two-part mail with a display name, Cc and a custom
header (the email package's path): microseconds per ``compose`` with the check, and of the check alone on
the same bytes. CPU time of this thread (a busy machine slows the clock on the wall, not this), the best
of five rounds.
"""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime

from shared.delivery import wirecheck
from shared.delivery.message import compose

COMMON = {
    "sender": "bench@example.com",
    "recipient": "rcpt123@example.org",
    "subject": "Bench mail 123",
    "body": "Hello,\nthis is mail number 123 of the benchmark.\n",
    "message_id": "<mailq.123.abcdef012345@example.com>",
    "date": datetime(2026, 12, 1, 12, tzinfo=UTC),
}
RICH = {
    **COMMON,
    "html": "<p>Hello, this is mail number 123.</p>",
    "from_name": "J\u00f6rg M\u00fcller, Example Bank",
    "recipient_name": "Ann",
    "cc": ["c1@example.org", "c2@example.org"],
    "headers": [("X-Campaign", "spring")],
}


def best_of(rounds: int, n: int, step) -> float:
    """Microseconds per call, the best of ``rounds`` rounds of ``n`` calls."""
    best = float("inf")
    for _ in range(rounds):
        started = time.thread_time()
        for _ in range(n):
            step()
        best = min(best, (time.thread_time() - started) / n)
    return best * 1e6


def measure(n: int) -> dict[str, dict[str, float]]:
    figures = {}
    shapes = (("common mail (direct path)", COMMON), ("two parts, name, Cc (email package)", RICH))
    for name, fields in shapes:
        outgoing = compose(**fields)
        figures[name] = {
            "compose us": best_of(5, n, lambda f=fields: compose(**f)),
            "check alone us": best_of(5, n, lambda o=outgoing, f=fields: wirecheck.check(o, **f)),
        }
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000, help="calls per round")
    args = parser.parse_args()
    for name, figures in measure(args.n).items():
        share = figures["check alone us"] / figures["compose us"]
        print(
            f"{name}: compose {figures['compose us']:.1f} us per mail, of which the check "
            f"{figures['check alone us']:.1f} us ({share:.0%})"
        )


if __name__ == "__main__":
    main()
