"""A pytest plugin for one mutant's run (``-p tests.mutate.guard``), loaded by the runner only.

It refuses to run unless mailq's packages come from the scratch copy named by MAILQ_MUTATE_ROOT:
the editable install in .venv points at the working tree, and a run that imported that instead of
the mutant would report every mutant as survived (or worse, as killed by the wrong code). It checks
again at the end, over every module imported meanwhile, and writes what it saw (the first failing
test included) to MAILQ_MUTATE_REPORT as JSON.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

PACKAGES = ("shared", "functions", "tests")
_seen: dict = {"first_failure": None, "collection_error": None, "guard": None, "imported_from": {}}


def _root() -> Path:
    return Path(os.environ["MAILQ_MUTATE_ROOT"]).resolve()


def _outside_root() -> dict[str, str]:
    """mailq's modules imported so far from anywhere but the scratch copy."""
    root, outside = _root(), {}
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] not in PACKAGES:
            continue
        file = getattr(module, "__file__", None)
        if file is None:  # a namespace package has no file; its parts are checked one by one
            continue
        if not Path(file).resolve().is_relative_to(root):
            outside[name] = file
    return outside


def pytest_sessionstart(session):
    import functions
    import shared

    _seen["imported_from"] = {"shared": shared.__file__, "functions": functions.__file__}
    outside = _outside_root()
    if outside:
        _seen["guard"] = f"imported from outside the scratch copy: {outside}"
        _write()
        pytest.exit(_seen["guard"], returncode=4)


def pytest_collectreport(report):
    if report.failed and _seen["collection_error"] is None:
        _seen["collection_error"] = report.nodeid or "(collection)"


def pytest_runtest_logreport(report):
    if report.failed and _seen["first_failure"] is None:
        _seen["first_failure"] = report.nodeid


def pytest_sessionfinish(session, exitstatus):
    outside = _outside_root()
    if outside and _seen["guard"] is None:
        _seen["guard"] = f"imported from outside the scratch copy: {outside}"
    _write()


def _write() -> None:
    Path(os.environ["MAILQ_MUTATE_REPORT"]).write_text(json.dumps(_seen))
