"""Optional profiles of a run (``--profile DIR``): py-spy samples each worker process while it works.

py-spy writes collapsed stacks (one line per distinct stack, ``frame;frame;frame count``);
``summarize`` turns them into the functions that hold the CPU, inclusive and self, so a bottleneck
can be named with a number next to it. By default only samples of a thread holding the GIL are kept
(``--gil``): that is the interpreter's own CPU time. (py-spy's idle detection does not filter threads
blocked in a socket read in this environment, so a plain profile shows waiting as if it were work.)
"""

from __future__ import annotations

import collections
import shutil
import signal
import subprocess
from pathlib import Path


def available() -> bool:
    return shutil.which("py-spy") is not None or Path(_venv_py_spy()).exists()


def _venv_py_spy() -> str:
    import sys

    return str(Path(sys.executable).with_name("py-spy"))


class Profiler:
    """py-spy record attached to some pids until ``stop()``."""

    def __init__(self, out_dir: Path, rate: int = 250, gil: bool = True):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.rate = rate
        self.gil = gil  # only samples holding the GIL: Python's own CPU, without native I/O time
        self.running: list[tuple[str, subprocess.Popen, Path]] = []

    def attach(self, name: str, pid: int, *, subprocesses: bool = False) -> None:
        exe = shutil.which("py-spy") or _venv_py_spy()
        out = self.out_dir / f"{name}.collapsed.txt"
        args = [exe, "record", "--pid", str(pid), "--rate", str(self.rate), "--format", "raw",
                "--output", str(out)] + (["--gil"] if self.gil else [])  # fmt: skip
        if subprocesses:
            args.append("--subprocesses")
        proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self.running.append((name, proc, out))

    def stop(self) -> list[Path]:
        """Stop sampling (py-spy writes its file on SIGINT); return the files written."""
        for _, proc, _ in self.running:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        written = []
        for _, proc, out in self.running:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if out.exists():
                written.append(out)
                (out.with_name(out.name.replace(".collapsed.txt", ".top.txt"))).write_text(summarize(out))
        self.running.clear()
        return written


def _frames(stack: str) -> list[str]:
    # py-spy raw frames look like "function (file.py:line)"; drop the line so a function counts once.
    frames = []
    for frame in stack.split(";"):
        name, _, where = frame.partition(" (")
        path = where.rsplit(":", 1)[0]
        short = "/".join(path.split("/")[-2:])
        frames.append(f"{name} ({short})")
    return frames


def summarize(path: Path, top: int = 30) -> str:
    """The functions holding the CPU in a collapsed-stack file: inclusive and self share of samples."""
    inclusive: collections.Counter = collections.Counter()
    own: collections.Counter = collections.Counter()
    total = 0
    for line in Path(path).read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = _frames(stack)
        for frame in set(frames):
            inclusive[frame] += n
        if frames:
            own[frames[-1]] += n
    if not total:
        return "no samples\n"
    lines = [f"{total} CPU samples", "", "inclusive %  function"]
    lines += [f"{100 * n / total:10.1f}  {f}" for f, n in inclusive.most_common(top)]
    lines += ["", "self %  function"]
    lines += [f"{100 * n / total:6.1f}  {f}" for f, n in own.most_common(top)]
    return "\n".join(lines) + "\n"
