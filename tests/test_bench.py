"""The benchmark's tiny variant, so its code cannot rot: every scenario runs at a tiny size.

Only correctness is asserted — every mail delivered exactly once, the report written with a row for
every scenario. No figure is compared with a target: the machine running the tests is busy, and
the targets belong to `make bench`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCENARIO_TITLES = (
    "1. Raw limit",
    "2. mailq delivery",
    "3. Celery + Redis",
    "4. Enqueue API",
    "5. API to inbox",
    "6. API to inbox, batches of 100",
    "7. End-to-end latency",
    "8. mailq's own CPU per mail",
    "9. Cost with the backlog size",
    "10. Fairness between tenants",
    "11. Scale",
    "12. A relay far away",
)
# One size each where the report's comparison rows (the curve, backlog and scale flatness) are checked
# on made-up results below instead: the tiny run stays short, and every scenario's code still runs.
TINY = ["--n", "200", "--seconds", "2", "--latency-seconds", "1", "--backlogs", "100", "--scale-rows",
        "3000", "--scale-user-rows", "500", "--relay-mails", "30", "--relay-rtts", "10"]  # fmt: skip


def run_bench(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tests.bench", "--no-progress", "--out", str(out), *TINY, *args],
        cwd=ROOT, capture_output=True, text=True, timeout=480,
    )  # fmt: skip


def report_of(out: Path) -> tuple[str, dict]:
    [md] = out.glob("*.md")
    return md.read_text(), json.loads(md.with_suffix(".json").read_text())


def test_the_tiny_benchmark_delivers_every_mail_exactly_once_and_reports_every_scenario(tmp_path):
    result = run_bench(tmp_path, "--senders", "2", "--skip-celery")
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    text, data = report_of(tmp_path)

    for title in SCENARIO_TITLES:
        assert f"| {title}" in text, f"no row for {title}"
        assert any(row["scenario"].startswith(title) for row in data["rows"]), f"no JSON row for {title}"
    assert "not run (--skip-celery)" in text
    assert data["failed"] == {}
    assert data["raw"]["exactly_once"]
    sent = {"sent": 200}
    assert [d["label"] for d in data["mailq"]] == ["mailq, 2 sender(s)"]
    # The account declares 16 connections; one more run has it at the default 3.
    assert data["mailq"][0]["concurrency"] == 8  # 2 senders × WORKER_COUNT 4, under the 16 declared
    default = data["mailq_default_connections"]
    assert default["label"] == "mailq, 2 sender(s), default 3 connections" and default["concurrency"] == 3
    for run in (*data["mailq"], default, data["inbox"], data["batch"]):
        assert run["exactly_once"] and run["statuses"] == sent and run["n"] == 200, run
    relay = data["relay"]
    clients = ["mailq", "smtplib"] + ([] if relay["postfix_skipped"] else ["postfix"])
    assert [(r["client"], r["rtt_ms"]) for r in relay["runs"]] == [(c, 10) for c in clients]
    for run in relay["runs"]:
        assert run["exactly_once"] and run["n"] == 30 and run["rate"] > 0, run
        assert run["client"] != "mailq" or run["statuses"] == {"sent": 30}
    mailq_runs = [r for r in relay["runs"] if r["client"] == "mailq"]
    assert all(r["max_open"] <= 2 * 3 for r in mailq_runs)  # the default 3 conversations, per sender's pool
    assert [row["scenario"] for row in data["rows"] if row["scenario"].startswith("12.")] == [
        "12. A relay far away: RTT 10 ms, 3 connections each"
    ]
    assert data["inbox"]["label"] == "API to inbox, single enqueues"
    assert data["batch"]["label"] == "API to inbox, batches of 100"
    assert [(d["n"], d["statuses"]) for d in data["backlog"]] == [(100, {"sent": 100})]
    assert data["cpu"]["own_ms_per_mail"] > 0
    assert data["latency"]["exactly_once"] and data["latency"]["sent"] >= 1
    fair = data["fairness"]
    assert fair["exactly_once"] and fair["statuses"] == {"sent": 400 + fair["b_accepted"]}
    assert fair["b_accepted"] == fair["b_sent"] >= 1 and fair["b_p99_ms"] > 0
    assert data["api"]["enqueue"]["errors"] == 0 and data["api"]["enqueue"]["rps"] > 0
    [scale] = data["scale"]
    assert scale["rows"] == 3000
    assert scale["sweep_requeued"] == scale["due"] > 0
    assert scale["page"]["errors"] == 0 and scale["page"]["rps"] > 0
    assert scale["claim"]["rps"] > 0 and scale["claim"]["errors"] == 0
    # What ran meanwhile: the function served the loop, PostgreSQL answered it.
    assert scale["page_meanwhile_cores"]["function"] > 0 and scale["page_meanwhile_cores"]["postgres"] > 0
    assert scale["metrics_meanwhile_cores"]["function"] > 0
    assert scale["metrics_meanwhile_cores"]["postgres_by_kind"]["sessions"] > 0
    assert "meanwhile, in cores: the function" in text
    assert data["commit"] and data["commit"] in text


def test_the_sink_refuses_mail_without_auth_and_a_wrong_password(tmp_path):
    import smtplib

    from shared.local.embedded import free_port
    from tests.bench.stack import SMTP_ACCOUNTS, Child, wait_for_port

    port = free_port()
    env = {**os.environ, "BENCH_SINK_ACCOUNTS": json.dumps(SMTP_ACCOUNTS)}
    sink = Child(
        "sink", [sys.executable, "-m", "tests.bench.authsink", str(tmp_path), str(port)], env, tmp_path
    )
    try:
        wait_for_port(port, sink)
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
            smtp.ehlo()
            code, _ = smtp.mail("a@example.com")
            assert code == 530  # authentication required
            smtp.rset()
            with pytest.raises(smtplib.SMTPAuthenticationError):
                smtp.login("tenant-b", SMTP_ACCOUNTS["bench"])
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
            smtp.login("tenant-b", SMTP_ACCOUNTS["tenant-b"])
            assert smtp.sendmail("b@example.com", ["x@example.net"], b"Message-ID: <1@x>\r\n\r\nhi\r\n") == {}
    finally:
        sink.stop()


def test_the_celery_peer_delivers_every_mail_exactly_once(tmp_path):
    if importlib.util.find_spec("celery") is None:
        pytest.skip("Celery is not installed; it comes with the bench extra: pip install -e '.[dev,bench]'")
    result = run_bench(tmp_path, "--only", "celery")
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    text, data = report_of(tmp_path)

    assert data["celery"]["exactly_once"] and data["celery"]["n"] == 200
    for title in SCENARIO_TITLES:
        assert f"| {title}" in text, f"no row for {title}"
    assert "not run (--only)" in text


def test_the_chart_is_a_png_with_every_delivery_bar(tmp_path):
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip(
            "matplotlib is not installed; it comes with the bench extra: pip install -e '.[dev,bench]'"
        )
    from tests.bench.delivery import Delivery
    from tests.bench.mailbox import Verdict
    from tests.bench.report import Run, chart

    verdict = Verdict(expected=10, delivered=10, duplicates=0, missing=0, unexpected=0)
    run = Run(started=datetime(2026, 1, 1), options={"n": 10})
    run.raw = Delivery("raw limit", 10, 0.1, verdict)
    run.mailq = [Delivery("mailq, 1 sender(s)", 10, 0.2, verdict, concurrency=4)]
    path = tmp_path / "chart.png"
    chart(run, path, "test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_report_compares_sizes_sender_counts_and_tenants_from_the_figures_it_is_given(monkeypatch):
    from shared.maintenance.sweep import SweepReport
    from tests.bench.delivery import Delivery
    from tests.bench.inbox import FairnessResult
    from tests.bench.load import LoadResult
    from tests.bench.mailbox import Verdict
    from tests.bench.relay import RelayResult, RelayRun
    from tests.bench.report import Run, table
    from tests.bench.scale import ScaleResult

    monkeypatch.setattr("tests.bench.report.default_senders", lambda: 2)  # as on a 2-core machine

    def drained(label, n, seconds, senders_cpu):
        cpu = {"senders": senders_cpu * n / 1000, "consumer": 0.1 * n / 1000, "postgres": 0.5 * n / 1000,
               "redis": 0.1 * n / 1000, "sink": n / 1000}  # fmt: skip
        return Delivery(label, n, seconds, Verdict(n, n, 0, 0, 0), cpu, {"sent": n})

    def scale(rows, ms):
        load = LoadResult(10, 0, 1.0, [ms] * 10)
        return ScaleResult(rows=rows, user_rows=100, counts={}, load_seconds=1.0, sweep_seconds=ms / 1000,
                           sweep=SweepReport(), idle_sweep_seconds=0.001, page=load, enqueue=load,
                           sizing=None, metrics=load, claim=load)  # fmt: skip

    run = Run(started=datetime(2026, 1, 1), options={})
    run.mailq = [drained("mailq, 1 sender(s)", 1000, 4.0, 2.0), drained("mailq, 2 sender(s)", 1000, 2.5, 2.2),
                 drained("mailq, 4 sender(s)", 1000, 3.0, 2.8)]  # fmt: skip
    run.backlog = [drained("backlog of 1,000, 2 sender(s)", 1000, 2.5, 2.0),
                   drained("backlog of 10,000, 2 sender(s)", 10000, 25.0, 2.6)]  # fmt: skip
    run.fairness = FairnessResult(1000, 2.0, 2.5, Verdict(1003, 1003, 0, 0, 0), 3, 3, [50.0, 60.0, 900.0],
                                  {"sent": 1003}, 2)  # fmt: skip
    run.scale = [scale(1_000_000, 10.0), scale(5_000_000, 11.0)]
    run.relay = RelayResult((0.0, 20.0), 300, postfix_skipped="not root")
    for client, rtt, seconds in [("mailq", 0.0, 1.0), ("smtplib", 0.0, 0.5), ("mailq", 20.0, 5.0),
                                 ("smtplib", 20.0, 9.0)]:  # fmt: skip
        run.relay.runs.append(RelayRun(client, rtt, 300, seconds, Verdict(300, 300, 0, 0, 0), 3, 3))
    rows = {r[0]: r for r in table(run).rows}

    [curve] = [r for name, r in rows.items() if "the curve" in name]
    assert "2.00 ms of its own CPU per mail" in curve[1] and "near 500 mails/s" in curve[1]
    assert "the best is 2 sender(s) at 400 mails/s" in curve[1] and "4 sender(s) deliver 333" in curve[1]
    assert "the CPU was not saturated" in curve[1]  # 1.56 of 2 cores busy, no "other" CPU given
    [flat] = [r for name, r in rows.items() if "worst / best" in name]
    assert flat[2] == f"{3.3 / 2.7:.2f}" and flat[4] == "**NOT met**"  # (2.6+0.7)/(2.0+0.7) > 1.15
    [own] = [r for name, r in rows.items() if name.startswith("8.")]
    assert "mailq, 2 sender(s)" in own[1] and "**2.90 ms**" in own[1] and own[4] == "**NOT met**"
    [quiet] = [r for name, r in rows.items() if "tenant B" in name]
    assert "p99 **900 ms**" in quiet[1] and quiet[4] == "met"
    [burst] = [r for name, r in rows.items() if "A alone" in name]
    assert burst[2] == "0.80" and burst[4] == "**NOT met**"
    [scaled] = [r for name, r in rows.items() if "flat from 1,000,000 to 5,000,000" in name]
    assert scaled[2] == "worst 1.10" and scaled[4] == "met"
    [near, far] = [r for name, r in rows.items() if name.startswith("12.")]
    assert near[2] == "mailq/smtplib 0.50" and (near[3], near[4]) == ("reported", "—")
    assert "mailq **60.0 mails/s**" in far[1] and "plain smtplib **33.3 mails/s**" in far[1]
    assert "Postfix not run (not root)" in far[1]
    assert far[2] == "mailq/smtplib 1.80" and far[4] == "met"  # 60 / 33.3 ≥ 1.6 at 20 ms


def test_the_scale_table_copies_history_inside_postgresql_past_the_python_share_with_the_mix_intact(
    ctx, monkeypatch
):
    import sqlalchemy as sa

    from shared.accounts import users
    from tests.bench import seed

    account = {"email": "s@example.com", "password": "pw pw pw pw", "smtp_host": "127.0.0.1", "smtp_port": 25,
               "smtp-username": "s", "smtp-password": "p", "smtp_security": "none"}  # fmt: skip
    user = users.register(ctx, account, "test")
    user_ids = [user["id"], *seed.extra_users(ctx.engine, user["id"], 2)]
    assert seed.extra_users(ctx.engine, user["id"], 2) == user_ids[1:]  # a second size reuses them
    monkeypatch.setattr(seed, "PYTHON_HISTORY_ROWS", 1000)
    monkeypatch.setattr(seed, "REPLICATE_CHUNK", 700)

    counts = seed.scale_table(ctx.engine, user_ids, 3000)

    with ctx.engine.connect() as conn:
        total, ids, per_user = conn.execute(
            sa.text("SELECT count(*), count(DISTINCT message_id), count(DISTINCT user_id) FROM tasks")
        ).one()
        live = dict(conn.execute(sa.text(
            "SELECT status, count(*) FROM tasks WHERE status NOT IN ('sent', 'cancelled') GROUP BY status"
        )).all())  # fmt: skip
    assert (total, ids, per_user) == (3000, 3000, 3)
    assert live == {"failed": 30, "scheduled": 150, "queued": 120, "processing": 15}
    assert counts["failed-due"] == 3 and counts["scheduled-due"] == 3

    # A bigger table with the same live work: only history grows.
    with ctx.engine.begin() as conn:
        conn.execute(sa.text("TRUNCATE tasks CASCADE"))
    counts = seed.scale_table(ctx.engine, user_ids, 6000, live_rows=3000)
    with ctx.engine.connect() as conn:
        total, ids = conn.execute(sa.text("SELECT count(*), count(DISTINCT message_id) FROM tasks")).one()
        bigger = dict(conn.execute(sa.text(
            "SELECT status, count(*) FROM tasks WHERE status NOT IN ('sent', 'cancelled') GROUP BY status"
        )).all())  # fmt: skip
    assert (total, ids) == (6000, 6000) and bigger == live
    assert counts["failed-due"] == 3 and counts["sent"] + counts["cancelled"] == 6000 - 315


_PARENT = """
import subprocess, sys
sys.stdin.readline()  # the meter has started
burn = "import time\\nend = time.process_time() + 0.4\\nwhile time.process_time() < end: pass"
subprocess.run([sys.executable, "-c", burn])
print("done", flush=True)
sys.stdin.readline()
"""


def test_the_cpu_meter_counts_a_child_that_ended_during_the_measurement():
    """PostgreSQL's autovacuum workers come and go: the CPU of a child reaped in between counts."""
    from tests.bench.stack import CpuMeter

    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        meter = CpuMeter({"parent": [parent.pid]}).start()
        parent.stdin.write("go\n")
        parent.stdin.flush()
        assert parent.stdout.readline().strip() == "done"
        used = meter.stop()["parent"]
    finally:
        parent.stdin.close()
        parent.wait(10)
    assert used >= 0.35


def test_the_report_names_each_changed_path_whole(monkeypatch):
    from tests.bench import report

    outputs = {"rev-parse": "abc1234", "status": " M README.md\n M shared/x.py\n?? new.txt"}
    monkeypatch.setattr(report, "_run", lambda args: outputs[args[1]].strip())
    assert report.git_state() == ("abc1234", ["README.md", "shared/x.py", "new.txt"])


def test_the_closed_loop_starts_its_clock_once_every_client_has_had_a_first_answer():
    """A server whose first answers come after the whole window (a function opening its pool on a loaded
    machine) still gets its window measured: the tiny benchmark once counted no enqueue at all."""
    import http.server
    import threading

    from tests.bench.load import build_request, closed_loop

    first = threading.Event()

    class Slow(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            if not first.is_set():
                time.sleep(1.5)  # longer than warm-up and window together
                first.set()
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        request = build_request("GET", "/", port)
        result = closed_loop(port, lambda i: request, clients=2, seconds=0.5, warmup=0.2)
    finally:
        server.shutdown()
        server.server_close()
    assert first.is_set() and result.errors == 0
    assert result.requests > 0
