"""Run each curated mutant against the tests meant to kill it, one at a time, each in a scratch copy.

    python -m tests.mutate                 # every mutant (what `make mutate` runs)
    python -m tests.mutate -k consumer     # those whose name contains "consumer" (-k again to add more)
    python -m tests.mutate --list          # the list, with each invariant and its tests
    python -m tests.mutate --mutants x.toml  # another list (trying out new entries)

The working tree is never written: its files (``git ls-files``, untracked ones included, ignored ones
not) are copied once, then each mutant gets a fresh copy of that, its exact edit, and one pytest run of
only its listed tests with the copy first on the import path. A run that imported mailq from anywhere
else is an error, not a result (tests/mutate/guard.py). The listed tests first run once on the
unmutated copy: a test that already fails would "kill" every mutant.

Results: killed (a listed test failed: the first failing node id is shown), survived (all passed),
stale (the old text no longer occurs exactly once: the code moved on and the entry needs updating),
timeout, error (collection failed, or the import guard tripped). Exit status 0 only when every
selected mutant was killed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LIST = Path(__file__).with_name("mutants.toml")
TIMEOUT = 300.0  # seconds per run; pytest-timeout's own limit is the same
# The baseline runs every listed test in one go (over a hundred): on a loaded 2-core machine that took
# over 5 minutes, so it gets more time than one mutant's run.
BASELINE_TIMEOUT = 1200.0
# Plugin autoloading is off (schemathesis, hypothesis and anyio cost over a second a run); a listed test
# that needs one of them adds it here.
PLUGINS = ("pytest_timeout", "tests.mutate.guard")


@dataclass(frozen=True)
class Edit:
    file: str
    old: str
    new: str


@dataclass(frozen=True)
class Mutant:
    name: str
    invariant: str
    edits: tuple[Edit, ...]
    tests: tuple[str, ...]


@dataclass
class Result:
    mutant: str
    status: str  # killed, survived, stale, timeout, error
    detail: str  # the killing test, or why stale/error
    seconds: float


def load(path: Path = LIST) -> list[Mutant]:
    """The mutants of ``path``; ValueError naming the entry for anything malformed."""
    mutants, names = [], set()
    for entry in tomllib.loads(path.read_text())["mutant"]:
        name = entry.get("name", "?")
        raw_edits = [entry] if "file" in entry else entry.get("edit", [])
        try:
            edits = tuple(Edit(e["file"], e["old"], e["new"]) for e in raw_edits)
            mutant = Mutant(entry["name"], entry["invariant"], edits, tuple(entry["tests"]))
        except KeyError as missing:
            raise ValueError(f"mutant {name!r}: {missing} is missing") from None
        if not edits or not mutant.tests or name in names:
            raise ValueError(f"mutant {name!r}: needs a unique name, at least one edit and one test")
        if any(e.old == e.new for e in edits):
            raise ValueError(f"mutant {name!r}: an edit changes nothing")
        names.add(name)
        mutants.append(mutant)
    return mutants


def apply(mutant: Mutant, tree: Path) -> str | None:
    """Make the mutant's edits in ``tree``; None, or why the mutant is stale."""
    for edit in mutant.edits:
        path = tree / edit.file
        if not path.is_file():
            return f"{edit.file} does not exist"
        text = path.read_text()
        count = text.count(edit.old)
        if count != 1:
            return f"{edit.file}: the old text occurs {count} times"
        path.write_text(text.replace(edit.old, edit.new))
    return None


def snapshot(dest: Path) -> int:
    """Copy the working tree's files (tracked or untracked, not ignored) into ``dest``."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    copied = 0
    for name in dict.fromkeys(listed.split("\0")):
        source = ROOT / name
        if not name or not (source.is_file() or source.is_symlink()):
            continue  # deleted in the working tree, or a submodule
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target, follow_symlinks=False)
        copied += 1
    return copied


def run_tests(tree: Path, tests: tuple[str, ...], python: str, timeout: float) -> tuple[str, str, dict]:
    """One pytest run of ``tests`` in ``tree``: (passed|failed|timeout|error, detail, the guard's report)."""
    report = tree / ".mutate-report.json"
    scratch_tmp = tree / ".tmp"  # the run's temporary files (databases included) go when the copy goes
    scratch_tmp.mkdir(exist_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")])),
        "PYTHONDONTWRITEBYTECODE": "1",  # a .pyc of the same size and second could hide an edit
        "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
        "MAILQ_MUTATE_ROOT": str(tree),
        "MAILQ_MUTATE_REPORT": str(report),
        "TMPDIR": str(scratch_tmp),
    }
    plugins = [arg for plugin in PLUGINS for arg in ("-p", plugin)]
    command = [python, "-m", "pytest", "-x", "-q", "--no-header", "-p", "no:cacheprovider", *plugins, *tests]
    process = subprocess.Popen(
        command,
        cwd=tree,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its servers and children go with it on a timeout
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # Ctrl-C first, so the session fixtures stop the PostgreSQL and Redis they started (pgserver's
        # postgres leaves our process group, so a SIGKILL alone would leave it running).
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
        return "timeout", f"no answer within {timeout:.0f} s", {}
    seen = json.loads(report.read_text()) if report.exists() else {}
    tail = output.decode(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
    if not seen:
        return "error", f"pytest exited {process.returncode} before the guard ran: {tail[0]}", seen
    if seen["guard"]:
        return "error", seen["guard"], seen
    if seen["collection_error"]:
        return "error", f"collection failed: {seen['collection_error']}", seen
    if process.returncode == 0:
        return "passed", "", seen
    if process.returncode == 1 and seen["first_failure"]:
        return "failed", seen["first_failure"], seen
    return "error", f"pytest exited {process.returncode}: {tail[0]}", seen


def run_mutant(mutant: Mutant, base: Path, scratch: Path, python: str, timeout: float) -> Result:
    tree = scratch / "mutant"
    started = time.monotonic()
    shutil.copytree(base, tree, symlinks=True)
    try:
        stale = apply(mutant, tree)
        if stale:
            return Result(mutant.name, "stale", stale, time.monotonic() - started)
        outcome, detail, _ = run_tests(tree, mutant.tests, python, timeout)
    finally:
        shutil.rmtree(tree, ignore_errors=True)
    status = {"failed": "killed", "passed": "survived"}.get(outcome, outcome)
    return Result(mutant.name, status, detail, time.monotonic() - started)


def table(results: list[Result]) -> str:
    width = max([len(r.mutant) for r in results] + [6])
    lines = [f"{'mutant':<{width}}  {'result':<8}  {'seconds':>7}  killed by / why", "-" * (width + 60)]
    for r in results:
        lines.append(f"{r.mutant:<{width}}  {r.status:<8}  {r.seconds:7.1f}  {_short(r.detail)}")
    return "\n".join(lines)


def _short(detail: str, limit: int = 110) -> str:
    """A node id whose parameters run long (a 37-character password, say), cut inside the brackets."""
    head, bracket, params = detail.partition("[")
    if not bracket or len(detail) <= limit:
        return detail
    return f"{head}[{params[: max(8, limit - len(head) - 3)]}…]"


def interpreter(python: str) -> str:
    """The interpreter that runs pytest, by its version and, inside the clone, its relative path: the
    output is pasted into reports, where the clone's absolute path would name someone's machine."""
    version = subprocess.run(
        [python, "-c", "import platform; print(platform.python_version())"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    path = Path(python)
    where = f" ({path.relative_to(ROOT)})" if path.is_absolute() and path.is_relative_to(ROOT) else ""
    return f"Python {version or '?'}{where}"


def summary(results: list[Result], seconds: float) -> str:
    statuses = ("killed", "survived", "stale", "timeout", "error")
    counts = {s: sum(r.status == s for r in results) for s in statuses}
    rate = 100.0 * counts["killed"] / len(results) if results else 0.0
    others = ", ".join(f"{n} {s}" for s, n in counts.items() if s != "killed")
    return f"killed {counts['killed']} of {len(results)} ({rate:.0f} %); {others}; {seconds:.0f} s in all"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make mutate", description=__doc__.split("\n\n")[0])
    parser.add_argument("-k", dest="select", action="append", default=[], help="mutants whose name has this")
    parser.add_argument("--list", action="store_true", help="print the mutants and exit")
    parser.add_argument("--mutants", type=Path, default=LIST, help="the list to run (a TOML file)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run on the unmutated copy")
    parser.add_argument("--timeout", type=float, default=TIMEOUT, help="seconds per pytest run")
    parser.add_argument(
        "--baseline-timeout", type=float, default=BASELINE_TIMEOUT, help="seconds for the unmutated run"
    )
    parser.add_argument("--python", default=sys.executable, help="the interpreter that runs pytest")
    args = parser.parse_args(argv)

    mutants = [m for m in load(args.mutants) if not args.select or any(s in m.name for s in args.select)]
    if not mutants:
        print("no mutant matches", args.select, file=sys.stderr)
        return 2
    if args.list:
        for m in mutants:
            print(f"{m.name}\n    {m.invariant}\n    " + "\n    ".join(m.tests))
        return 0

    started = time.monotonic()
    scratch = Path(tempfile.mkdtemp(prefix="mailq-mutate-"))
    scratch.chmod(0o755)  # pgserver runs postgres as another user when we are root: it must reach its data
    try:
        base = scratch / "base"
        files = snapshot(base)
        print(
            f"{len(mutants)} mutant(s); {files} files copied to {scratch}; {interpreter(args.python)}",
            flush=True,
        )
        if not args.no_baseline:
            tests = tuple(dict.fromkeys(t for m in mutants for t in m.tests))
            tree = scratch / "baseline"
            shutil.copytree(base, tree, symlinks=True)
            outcome, detail, seen = run_tests(tree, tests, args.python, args.baseline_timeout)
            if outcome != "passed":
                print(f"baseline: the listed tests fail unmutated ({outcome}): {detail}", file=sys.stderr)
                return 2
            took = time.monotonic() - started
            print(f"baseline: the {len(tests)} listed tests pass unmutated ({took:.0f} s); the run imported")
            print(f"  shared from {seen['imported_from']['shared']}", flush=True)
        results = []
        for mutant in mutants:
            result = run_mutant(mutant, base, scratch, args.python, args.timeout)
            results.append(result)
            print(f"  {result.mutant}: {result.status} ({result.seconds:.1f} s)", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print()
    print(table(results))
    print(summary(results, time.monotonic() - started))
    return 0 if all(r.status == "killed" for r in results) else 1
