"""The benchmark's tiny variant, so its code cannot rot: every scenario runs at a tiny size.

Only correctness is asserted — every mail delivered exactly once, the report written with a row for
every scenario. No figure is compared with a target: the machine running the tests is busy, and
the targets belong to `make bench`.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCENARIO_TITLES = (
    "1. Raw limit",
    "2. mailq delivery",
    "3. Celery + Redis",
    "4. Enqueue API",
    "5. End-to-end latency",
    "6. Scale",
)
TINY = ["--n", "200", "--seconds", "2", "--latency-seconds", "1", "--scale-rows", "5000",
        "--scale-user-rows", "500"]  # fmt: skip


def run_bench(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tests.bench", "--no-progress", "--out", str(out), *TINY, *args],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )  # fmt: skip


def report_of(out: Path) -> tuple[str, dict]:
    [md] = out.glob("*.md")
    return md.read_text(), json.loads(md.with_suffix(".json").read_text())


def test_the_tiny_benchmark_delivers_every_mail_exactly_once_and_reports_every_scenario(tmp_path):
    result = run_bench(tmp_path, "--senders", "1,2", "--skip-celery")
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    text, data = report_of(tmp_path)

    for title in SCENARIO_TITLES:
        assert f"| {title}" in text, f"no row for {title}"
    assert "not run (--skip-celery)" in text
    assert data["failed"] == {}
    assert data["raw"]["exactly_once"]
    assert [d["label"] for d in data["mailq"]] == ["mailq, 1 sender(s)", "mailq, 2 sender(s)"]
    for run in data["mailq"]:
        assert run["exactly_once"] and run["statuses"] == {"sent": 200}, run
    assert data["latency"]["exactly_once"] and data["latency"]["sent"] >= 1
    assert data["api"]["enqueue"]["errors"] == 0 and data["api"]["enqueue"]["rps"] > 0
    assert data["scale"]["rows"] == 5000
    assert data["scale"]["sweep_requeued"] == data["scale"]["due"] > 0
    assert data["scale"]["page"]["errors"] == 0 and data["scale"]["page"]["rps"] > 0
    assert data["commit"] and data["commit"] in text


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
