"""End to end: `mailq dev` as a subprocess on free ports, driven over real HTTP and SMTP."""

from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psutil
import pytest

from shared.local.embedded import free_port
from shared.local.sink import count_message_ids

pytestmark = pytest.mark.e2e


def call(base: str, method: str, path: str, body=None, token: str | None = None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(base + path, data=data, method=method)
    if body is not None:
        request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


@pytest.fixture(scope="module")
def dev():
    # Not under pytest's basetemp: a pytest session removes all but the newest three basetemps of its
    # user, so another session of the same user on the machine could delete a running stack's data.
    base = Path(tempfile.mkdtemp(prefix="mailq-e2e-"))
    base.chmod(0o755)
    data_dir = base / "data"
    port, smtp_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env.update(BCRYPT_ROUNDS="4", MAILQ_HEARTBEAT_FILE=str(data_dir.parent / "beat"))
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "functions.cli",
            "dev",
            "--port",
            str(port),
            "--smtp-port",
            str(smtp_port),
            "--data-dir",
            str(data_dir),
            "--senders",
            "2",
            "--metrics-port",
            str(free_port()),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "mailq is ready" in line:
            break
    else:
        process.kill()
    if process.poll() is not None or not any("mailq is ready" in line for line in lines):
        process.kill()
        pytest.fail("mailq dev did not start:\n" + "".join(lines))
    # keep draining its output so it never blocks on a full pipe
    import threading

    threading.Thread(target=lambda: [lines.append(x) for x in process.stdout], daemon=True).start()
    info = {
        "base": f"http://127.0.0.1:{port}",
        "smtp_port": smtp_port,
        "data_dir": data_dir,
        "process": process,
        "lines": lines,
    }
    yield info
    if process.poll() is None:  # a -k run skipped the SIGTERM test: stop it the same way, so its
        process.send_signal(signal.SIGTERM)  # embedded PostgreSQL and Redis stop with it
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    shutil.rmtree(base, ignore_errors=True)


def test_register_login_and_read_the_user_over_http(dev):
    base = dev["base"]
    status, user = call(
        base,
        "POST",
        "/api/v1/register",
        {
            "email": "ada@example.com",
            "password": "correct horse",
            "smtp_host": "127.0.0.1",
            "smtp_port": dev["smtp_port"],
            "smtp-username": "ada",
            "smtp-password": "sink-accepts-any",
            "smtp_security": "none",
        },
    )
    assert status == 201, user
    status, session = call(
        base, "POST", "/api/v1/login", {"email": "ada@example.com", "password": "correct horse"}
    )
    assert status == 200 and session["token_type"] == "Bearer"
    status, me = call(base, "GET", f"/api/v1/user/{user['id']}", token=session["token"])
    assert status == 200 and me == user
    dev["token"] = session["token"]


def test_mailq_dev_prints_where_the_dashboard_and_the_reference_are(dev):
    deadline = time.monotonic() + 5  # the lines right after "mailq is ready", drained by a thread
    while not any("API reference:" in line for line in dev["lines"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert f"  dashboard:      {dev['base']}/\n" in dev["lines"]
    assert f"  API reference:  {dev['base']}/docs\n" in dev["lines"]
    with urllib.request.urlopen(dev["base"] + "/", timeout=10) as page:
        assert page.status == 200 and page.headers.get_content_type() == "text/html"


def test_five_hundred_mails_arrive_exactly_once(dev):
    base, token = dev["base"], dev["token"]
    soon = (datetime.now(UTC) + timedelta(seconds=3)).replace(tzinfo=None).isoformat()
    ids = []
    for i in range(500):
        body = {"recipient_email": f"r{i}@example.org", "subject": f"mail {i}", "body": f"body {i}\n"}
        if i % 10 == 0:
            body["scheduled_at"] = soon
        status, result = call(base, "POST", "/api/v1/task/enqueue", body, token)
        assert status == 202, result
        ids.append(result["task_id"])
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        counts = count_message_ids(dev["data_dir"])
        if sum(counts.values()) >= 500:
            break
        time.sleep(0.5)
    time.sleep(1.0)  # a late duplicate would show up now
    counts = count_message_ids(dev["data_dir"])
    assert len(counts) == 500 and set(counts.values()) == {1}, collections.Counter(counts.values())
    statuses, cursor = collections.Counter(), None
    while True:
        status, page = call(
            base,
            "GET",
            "/api/v1/task/queue?status=sent&limit=500" + (f"&cursor={cursor}" if cursor else ""),
            token=token,
        )
        assert status == 200
        statuses.update(t["status"] for t in page["items"])
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert statuses == {"sent": 500}
    status, pending = call(base, "GET", "/api/v1/task/queue", token=token)
    assert pending["items"] == []


def scrape(url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {
        s.name + json.dumps(s.labels, sort_keys=True): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_every_worker_process_serves_its_metrics_on_a_port_of_its_own(dev):
    """Two senders on one machine: each its own port, listed at start and in the data directory,
    and between them they counted every mail the 500-mail test sent."""
    listed = {
        line.split()[0]: line.split()[-1]
        for line in dev["lines"]
        if line.strip().endswith("/metrics") and "metrics:" in line
    }
    state = json.loads((dev["data_dir"] / "dev.json").read_text())
    assert listed == state["metrics"] and set(listed) == {
        "consumer",
        "sender-1",
        "sender-2",
        "sweep",
        "webhooks",
    }
    assert len(set(listed.values())) == 5
    figures = {name: scrape(url) for name, url in listed.items()}
    sent = sum(figures[name].get("mailq_mails_sent_total{}", 0) for name in ("sender-1", "sender-2"))
    assert sent == 500
    assert figures["consumer"]['mailq_envelopes_total{"outcome": "handed_off"}'] >= 450
    assert "mailq_sweep_requeued_total{}" in figures["sweep"]
    assert 'mailq_webhook_deliveries_total{"outcome": "delivered"}' in figures["webhooks"]
    queue = scrape(dev["base"] + "/metrics")  # the metrics function, behind the API
    assert (
        queue['mailq_workers_alive{"role": "sender"}'] == 2 and queue['mailq_tasks{"status": "queued"}'] == 0
    )


def test_a_request_line_too_long_for_the_http_server_is_a_414_problem(dev):
    """gunicorn refuses it before any function runs; it still answers in the one error format."""
    url = dev["base"] + "/api/v1/task/queue?tag=campaign:" + "x" * 9000
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(url, timeout=10)
    answer = caught.value
    assert answer.code == 414 and answer.headers["Content-Type"] == "application/problem+json"
    assert json.loads(answer.read())["status"] == 414


def test_mailq_status_finds_the_running_dev_stack_from_its_data_directory(dev):
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    result = subprocess.run(
        [sys.executable, "-m", "functions.cli", "status", "--data-dir", str(dev["data_dir"]), "--json"],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["figures"]["workers_alive"] == {"consumer": 1, "sender": 2, "webhooks": 1}
    assert set(shown["source"]["metrics"]) == {"consumer", "sender-1", "sender-2", "sweep", "webhooks"}


def test_mailbox_lists_what_arrived(dev):
    result = subprocess.run(
        [sys.executable, "-m", "functions.cli", "mailbox", "--data-dir", str(dev["data_dir"]), "-n", "3"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0
    assert result.stdout.count("Message-ID: <mailq.") == 3


def test_a_taken_smtp_port_is_a_clear_error(dev, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "functions.cli",
            "dev",
            "--port",
            str(free_port()),
            "--smtp-port",
            str(dev["smtp_port"]),
            "--data-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "SMTP sink cannot listen" in result.stderr and "--smtp-port" in result.stderr


def test_sigterm_stops_every_child_and_the_embedded_servers(dev):
    process: subprocess.Popen = dev["process"]
    parent = psutil.Process(process.pid)
    children = parent.children(recursive=True)
    assert len(children) >= 6  # api (+ gunicorn workers), sink, consumer, sender, sweep, redis
    postmaster_pid = int((dev["data_dir"] / "postgres" / "postmaster.pid").read_text().split()[0])
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 0, "".join(dev["lines"][-20:])
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert alive == []
    assert (
        not psutil.pid_exists(postmaster_pid)
        or psutil.Process(postmaster_pid).status() == psutil.STATUS_ZOMBIE
    )
    output = "".join(dev["lines"])
    assert "Traceback" not in output
    # No library deprecation noise either (aiosmtpd's login_data warning came once per mail).
    assert "deprecat" not in output.lower(), [line for line in dev["lines"] if "deprecat" in line.lower()]
