"""What the tenant bounds (shared/bounds.py) add to one enqueue, measured in the same run.

    python -m tests.bench.enqueue_cost [--n 2000] [--rounds 7]

On embedded PostgreSQL and Redis (as `mailq dev` runs them), one client thread posts plain single
enqueues through every function (the dev dispatcher, functions-framework's app) with the bounds checked,
and again with the admission replaced by nothing, rounds of each interleaved so a busy neighbour
disturbs both alike. Reports the median of the rounds' mean time per request (wall clock) and the API
thread's CPU per request, for each, and their difference: the bounds' cost per enqueue.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

MAIL = {"recipient_email": "bob@example.org", "subject": "Hi", "body": "Hello Bob"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="enqueues per round")
    parser.add_argument("--rounds", type=int, default=7, help="rounds of each, interleaved")
    args = parser.parse_args()

    from shared.crypto import generate_key
    from shared.db import migrate
    from shared.local.embedded import EmbeddedPostgres, EmbeddedRedis

    base = Path(tempfile.mkdtemp(prefix="mailq-enqueue-cost-"))
    base.chmod(0o755)  # pgserver runs postgres as another user when we are root
    postgres, redis_server = EmbeddedPostgres(base / "pg"), EmbeddedRedis(base / "redis")
    try:
        database_url, redis_url = postgres.start(), redis_server.start()
        migrate(database_url)
        os.environ.update(
            DATABASE_URL=database_url, REDIS_URL=redis_url, JWT_SECRET="bench-" + "x" * 40,
            MAILQ_ENCRYPTION_KEYS=generate_key(), BCRYPT_ROUNDS="4", LOG_LEVEL="WARNING",
            # Far above what one client reaches: the bounds are checked in full, never refuse.
            MAX_PENDING_PER_USER=str(10**9), ENQUEUE_RATE_PER_USER=str(10**6),
            ENQUEUE_BURST_PER_USER=str(10**6),
        )  # fmt: skip
        print(report(measure(args.n, args.rounds)))
    finally:
        redis_server.stop()
        postgres.stop()
        shutil.rmtree(base, ignore_errors=True)


def measure(n: int, rounds: int) -> dict[str, list[tuple[float, float]]]:
    from werkzeug.test import Client

    from functions.devserver import build_app
    from shared import bounds

    api = Client(build_app())
    body = {"email": "bench@example.com", "password": "correct horse", "smtp_host": "127.0.0.1",
            "smtp_port": 25, "smtp-username": "", "smtp-password": "", "smtp_security": "none"}  # fmt: skip
    assert api.post("/api/v1/register", json=body).status_code == 201
    token = api.post("/api/v1/login", json=body).get_json()["token"]
    headers = {"Authorization": f"Bearer {token}"}
    real = bounds.admit
    results: dict[str, list[tuple[float, float]]] = {"with the bounds": [], "without": []}
    for round_ in range(rounds + 1):
        for name in results:
            bounds.admit = real if name == "with the bounds" else (lambda *a, **k: None)
            wall, cpu = time.perf_counter(), time.thread_time()
            for _ in range(n):
                assert api.post("/api/v1/task/enqueue", json=MAIL, headers=headers).status_code == 202
            if round_:  # the first round warms caches, prepared statements and Redis's script cache
                results[name].append(((time.perf_counter() - wall) / n, (time.thread_time() - cpu) / n))
    bounds.admit = real
    return results


def report(results: dict[str, list[tuple[float, float]]]) -> str:
    lines = []
    medians = {}
    for name, samples in results.items():
        wall = statistics.median(w for w, _ in samples) * 1e6
        cpu = statistics.median(c for _, c in samples) * 1e6
        medians[name] = (wall, cpu)
        lines.append(f"{name}: {wall:.0f} us per enqueue (the API thread's CPU {cpu:.0f} us)")
    (w1, c1), (w0, c0) = medians["with the bounds"], medians["without"]
    lines.append(
        f"the bounds' cost: {w1 - w0:+.0f} us per enqueue ({(w1 - w0) / w0:+.1%}), CPU {c1 - c0:+.0f} us"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
