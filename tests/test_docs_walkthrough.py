"""The getting-started page and the README's quickstart, run as written against a fresh `mailq dev`.

How a page is read (tests/walkthrough.py has the details): its ``sh`` blocks run in order in one bash
session; the ``text`` block right after one is what it must print, where ``...`` stands for any text
on a line and a line of ``...`` alone for any number of lines; a block that is only ``make run`` is the
stack this test starts itself, and the ``text`` block after it is compared with the stack's "mailq is
ready" lines. The pages are written for the default ports (API 8080, SMTP sink 1025, the workers'
metrics from 9100, the webhook receiver 9000); the test runs on free ports and moves those numbers, as
whole words, in commands and answers alike.

The stack is fresh (empty tables, ids from 1, an empty Redis) and runs in a folder that stands for the
clone: its ``.venv`` is the repository's, its ``.mailq`` the stack's data. Nothing else may appear in
it: a page writes its files to a temporary folder, never into the clone.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import sqlalchemy as sa

from shared.context import make_redis
from shared.db import engine_for
from shared.local.embedded import free_port
from tests import walkthrough
from tests.conftest import ROOT

pytestmark = pytest.mark.e2e

GETTING_STARTED = ROOT / "docs" / "getting-started.md"
README = ROOT / "README.md"
API_PORT, SMTP_PORT, RECEIVER_PORT, FIRST_METRICS_PORT = 8080, 1025, 9000, 9100
SENDERS = 2  # the pages show the banner of a 2-core machine: sender-1 and sender-2
TIMEOUT = 120  # seconds for a whole page: only a hang gets near it


def _is_log_line(line: str) -> bool:
    """A worker's log line (text format starts with the date), printed among the banner's lines."""
    return len(line) > 10 and line[:4].isdigit() and line[4] == "-" and line[7] == "-"


def _need_curl() -> None:
    if shutil.which("curl"):
        return
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail("curl is not installed and CI is set: the walkthrough's commands need it")
    pytest.skip("curl is not installed: the walkthrough's commands need it")


def _empty(servers) -> None:
    with engine_for(servers["database_url"]).begin() as conn:
        conn.execute(sa.text("TRUNCATE users, tasks RESTART IDENTITY CASCADE"))
    client = make_redis(servers["redis_url"])
    client.flushall()
    client.close()


@pytest.fixture(scope="module")
def stack(servers, base_env, tmp_path_factory):
    """`mailq dev` on free ports and a fresh database, in a folder standing for the clone."""
    _need_curl()
    _empty(servers)
    clone = tmp_path_factory.mktemp("clone")
    (clone / ".venv").symlink_to(ROOT / ".venv")
    home = tmp_path_factory.mktemp("home")  # HOME and TMPDIR of the page's shell: no ~/.curlrc
    port, smtp_port = free_port(), free_port()
    env = {
        **os.environ,
        **base_env,
        "LOG_LEVEL": "WARNING",
        "MAILQ_HEARTBEAT_FILE": str(home / "beat"),
    }
    command = [
        sys.executable, "-m", "functions.cli", "dev",
        "--port", str(port), "--smtp-port", str(smtp_port), "--metrics-port", str(free_port()),
        "--senders", str(SENDERS), "--api-workers", "1",
    ]  # fmt: skip
    process = subprocess.Popen(
        command,
        env=env,
        cwd=clone,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    threading.Thread(target=lambda: [lines.append(x) for x in process.stdout], daemon=True).start()
    deadline = time.monotonic() + 90
    while not any(line.startswith("  webhooks metrics:") for line in lines):
        if process.poll() is not None or time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            pytest.fail("mailq dev did not start:\n" + "".join(lines))
        time.sleep(0.1)
    state = json.loads((clone / ".mailq" / "dev.json").read_text())
    metrics = [int(url.rsplit(":", 1)[1].split("/")[0]) for url in state["metrics"].values()]
    ports = {API_PORT: port, SMTP_PORT: smtp_port, RECEIVER_PORT: free_port()}
    ports.update({FIRST_METRICS_PORT + i: p for i, p in enumerate(metrics)})
    shell_env = {"PATH": os.environ["PATH"], "HOME": str(home), "TMPDIR": str(home), "LANG": "C.UTF-8"}
    yield {
        "clone": clone,
        "lines": lines,
        "subs": walkthrough.Substitutions(ports),
        "env": shell_env,
    }
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)


def _banner(lines: list[str]) -> str:
    """What `mailq dev` printed from its "mailq is ready" line on, without the workers' log lines."""
    start = next(i for i, line in enumerate(lines) if line.startswith("mailq is ready"))
    return "".join(line for line in lines[start:] if not _is_log_line(line))


def _run_page(page, stack) -> list[walkthrough.Mismatch]:
    subs = stack["subs"]
    run = walkthrough.steps(subs.apply(page.read_text()))
    assert run, f"{page.name} has no sh block"
    problems = []
    for step in [s for s in run if s.starts_the_stack and s.expected is not None]:
        banner = _banner(stack["lines"])
        if not walkthrough.matches(step.expected, banner):
            problems.append(walkthrough.Mismatch(step, banner))
    commands = [s for s in run if not s.starts_the_stack]
    outputs, _ = walkthrough.run_steps(commands, stack["clone"], stack["env"], TIMEOUT)
    return problems + walkthrough.compare(commands, outputs)


def test_the_getting_started_page_runs_as_written_on_a_fresh_stack(stack):
    problems = _run_page(GETTING_STARTED, stack)
    assert not problems, "docs/getting-started.md drifted from what mailq does:\n\n" + "\n".join(
        str(p) for p in problems
    )
    left = sorted(p.name for p in stack["clone"].iterdir())
    assert left == [".mailq", ".venv"], f"the walkthrough wrote into the clone: {left}"


def test_the_readmes_quickstart_runs_as_written(stack):
    """After the walkthrough, on the same stack: the quickstart's answers show no ids that depend on it."""
    problems = _run_page(README, stack)
    assert not problems, "README.md's quickstart drifted from what mailq does:\n\n" + "\n".join(
        str(p) for p in problems
    )


# --- the comparison itself: what drift it catches (no stack needed) ------------------------------------

PAGE = """Intro.

```sh
make run
```

```text
mailq is ready: http://127.0.0.1:8080  (data in ...)
...
```

```sh
curl -s http://127.0.0.1:8080/api/v1/task/$TASK
```

```text
{"id": 4, "status": "scheduled", ...} HTTP 200
```

Prose between.

```sh
echo unchecked
```

```python
print("not run")
```

```text
not the output of anything: prose lies between
```
"""


def test_a_page_is_read_as_commands_each_with_the_answer_shown_after_it():
    run = walkthrough.steps(PAGE)
    assert [(s.line, s.starts_the_stack) for s in run] == [(3, True), (12, False), (22, False)]
    assert run[1].expected == '{"id": 4, "status": "scheduled", ...} HTTP 200\n'
    assert run[2].expected is None  # a python block in between; the text block is not its output
    moved = walkthrough.Substitutions({8080: 41234}).apply(PAGE)
    assert "127.0.0.1:41234/api" in moved and "8080" not in moved
    assert walkthrough.Substitutions({8080: 1}).apply("18080 8080 80801 :8080/") == "18080 1 80801 :1/"


@pytest.mark.parametrize(
    ("actual", "right"),
    [
        ('{"id": 4, "status": "scheduled", "tries_left": 3} HTTP 200\n', True),
        (
            '{"id": 4, "status": "scheduled", "try_count": 0} HTTP 200\n\n',
            True,
        ),  # trailing blank lines do not count
        ('{"id": 2, "status": "scheduled", "tries_left": 3} HTTP 200\n', False),  # another task
        ('{"id": 4, "status": "scheduled", "tries_left": 3} HTTP 409\n', False),  # another status code
        ('{"id": 4, "status": "sent", "tries_left": null} HTTP 200\n', False),  # a field shown differs
        ('{"id": 4, "status": "scheduled"}\n', False),  # `curl -s` without -w prints no code
        ("", False),  # nothing at all (?status=sent right after an enqueue: an empty list is still a line)
        ('{"id": 4, "status": "scheduled"} HTTP 200\nand more\n', False),  # a line the page does not show
    ],
)
def test_the_comparison_catches_an_answer_that_drifted(actual, right):
    assert walkthrough.matches('{"id": 4, "status": "scheduled", ...} HTTP 200\n', actual) is right


def test_a_line_of_dots_stands_for_any_number_of_lines_and_nothing_else():
    shown = "first\n...\nlast\n"
    assert walkthrough.matches(shown, "first\nlast\n")
    assert walkthrough.matches(shown, "first\na\nb\nlast\n")
    assert not walkthrough.matches(shown, "first\na\nb\n")
    assert not walkthrough.matches("a...c\n", "a\nc\n")  # dots inside a line never cross a line
