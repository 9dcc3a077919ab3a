"""Run a Markdown page's shell blocks in order and compare what they print with the answers it shows.

The convention a page follows (docs/getting-started.md, the README's quickstart):

- A fenced block tagged ``sh`` is run. All of a page's ``sh`` blocks run in one ``bash`` session, in
  the page's order, so a variable or function one block sets is there for the next.
- A fenced block tagged ``text`` right after an ``sh`` block (only blank lines between) is what that
  block prints: every line of it, in order. ``...`` inside a line stands for any text on that line;
  a line that is only ``...`` stands for any number of lines. An ``sh`` block without a ``text`` block
  after it may print anything.
- A ``sh`` block that is only ``make run`` is not run: the caller starts the stack itself, and the
  ``text`` block after it is compared with what that stack printed from its "mailq is ready" line on.
- The page is written for the default ports; ``Substitutions`` moves them to the ones the test chose,
  in commands and answers alike (``127.0.0.1:8080`` and the other port numbers as whole words).

Nothing here knows mailq: tests/test_docs_walkthrough.py starts the stack and hands its ports in.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

ELLIPSIS = "..."
MARKER = "@@mailq-walkthrough-step@@"  # printed between two blocks' outputs, so each can be told apart
START_THE_STACK = "make run"


@dataclass
class Step:
    line: int  # where the sh block starts in the page (1-based), for messages
    command: str
    expected: str | None = None  # the text block after it, if any

    @property
    def starts_the_stack(self) -> bool:
        return self.command.strip() == START_THE_STACK


@dataclass
class Mismatch:
    step: Step
    actual: str

    def __str__(self) -> str:
        return (
            f"the block at line {self.step.line} printed something else than the page shows.\n"
            f"--- command ---\n{self.step.command.rstrip()}\n"
            f"--- the page shows ---\n{(self.step.expected or '').rstrip()}\n"
            f"--- it printed ---\n{self.actual.rstrip()}\n"
        )


@dataclass
class Substitutions:
    """Default port (as the page writes it) -> the port the run uses."""

    ports: dict[int, int] = field(default_factory=dict)

    def apply(self, text: str) -> str:
        if not self.ports:
            return text
        pattern = re.compile(r"(?<![0-9])(" + "|".join(str(p) for p in self.ports) + r")(?![0-9])")
        return pattern.sub(lambda m: str(self.ports[int(m.group(1))]), text)


def blocks(markdown: str) -> list[tuple[str, str, int]]:
    """The fenced code blocks of a page: (info string's first word, content, line of the opening fence)."""
    found, lines, i = [], markdown.splitlines(), 0
    while i < len(lines):
        opening = re.match(r"^(```+|~~~+)\s*([^\s`]*)", lines[i])
        if not opening:
            i += 1
            continue
        fence, info, start = opening.group(1), opening.group(2), i + 1
        i += 1
        body = []
        while i < len(lines) and not lines[i].startswith(fence):
            body.append(lines[i])
            i += 1
        i += 1  # the closing fence
        found.append((info, "\n".join(body) + "\n", start))
    return found


def steps(markdown: str) -> list[Step]:
    """The page's sh blocks, each with the text block that shows its output (if one follows it)."""
    lines = markdown.splitlines()
    result: list[Step] = []
    previous = ("", 0)  # the block before this one: its info string and the line after its closing fence
    for info, body, start in blocks(markdown):
        if info == "text" and previous[0] == "sh" and result[-1].expected is None:
            if all(not line.strip() for line in lines[previous[1] : start - 1]):
                result[-1].expected = body
        elif info == "sh":
            result.append(Step(line=start, command=body))
        previous = (info, start + body.count("\n") + 1)
    return result


def matches(expected: str, actual: str) -> bool:
    """True when ``actual`` is what ``expected`` shows, by the page's rules (see the module's doc)."""
    parts = []
    for line in expected.rstrip("\n").split("\n"):
        line = line.rstrip()
        if line == ELLIPSIS:
            parts.append(r"(?:[^\n]*\n)*?")
        else:
            parts.append("[^\n]*?".join(re.escape(piece) for piece in line.split(ELLIPSIS)) + r"[ \t]*\n")
    normalised = "\n".join(line.rstrip() for line in actual.rstrip("\n").split("\n")) + "\n"
    return re.fullmatch("".join(parts), normalised) is not None


def script(run: list[Step]) -> str:
    """One bash script: every block, each followed by the marker on a line of its own."""
    return "".join(f"{step.command}\nprintf '\\n{MARKER}\\n'\n" for step in run)


def run_steps(
    run: list[Step], cwd: Path, env: dict[str, str], timeout: float
) -> tuple[list[str], subprocess.CompletedProcess]:
    """Run the blocks in one bash session; each block's output (stdout and stderr together)."""
    process = subprocess.Popen(
        ["bash", "--noprofile", "--norc"],
        cwd=cwd,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # one process group: whatever a block leaves running is stopped below
    )
    try:
        out, _ = process.communicate(script(run), timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, _ = process.communicate()
        out += f"\n(stopped after {timeout:.0f} s)"
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    # The marker's printf starts a new line of its own, so a block's output ends with one more newline
    # than it printed (none is lost: the comparison ignores trailing newlines).
    outputs = out.split(f"\n{MARKER}\n")
    return outputs, subprocess.CompletedProcess(process.args, process.returncode, out)


def compare(run: list[Step], outputs: list[str]) -> list[Mismatch]:
    """Every block whose output differs from what the page shows (a block that never ran included)."""
    problems = []
    finished = len(outputs) - 1  # a marker follows each block that finished; the last piece is the rest
    for i, step in enumerate(run):
        if i >= finished:
            problems.append(Mismatch(step, "(the block did not finish)\n" + outputs[-1]))
            break
        if step.expected is not None and not matches(step.expected, outputs[i]):
            problems.append(Mismatch(step, outputs[i]))
    return problems
