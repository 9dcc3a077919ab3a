"""The mutation check's list (tests/mutate/mutants.toml) stays usable: each mutant still applies to the
code and names tests that exist. A mutant that no longer applies is reported STALE by `make mutate`;
this says so in `make test` already, where the change that moved the code is being made."""

from __future__ import annotations

import json
import re
import sys

import pytest

from tests.mutate import run
from tests.mutate.run import ROOT, Edit, Mutant, apply, load


def test_every_mutant_applies_exactly_once_and_names_tests_that_exist():
    problems = []
    for mutant in load():
        for edit in mutant.edits:
            found = (ROOT / edit.file).read_text().count(edit.old) if (ROOT / edit.file).is_file() else 0
            if found != 1:
                problems.append(f"{mutant.name}: the old text occurs {found} times in {edit.file}")
        for test in mutant.tests:
            path, _, name = test.partition("::")
            source = (ROOT / path).read_text() if (ROOT / path).is_file() else ""
            function = re.escape(name.split("[")[0])
            if not source or (name and not re.search(rf"^def {function}\(", source, re.M)):
                problems.append(f"{mutant.name}: no test {test}")
    assert problems == []


def test_an_edit_whose_text_moved_is_stale_and_leaves_the_file_alone(tmp_path):
    (tmp_path / "x.py").write_text("a = 1\na = 1\n")
    twice = Mutant("m", "", (Edit("x.py", "a = 1", "a = 2"),), ("t",))
    assert apply(twice, tmp_path) == "x.py: the old text occurs 2 times"
    gone = Mutant("m", "", (Edit("x.py", "b = 1", "b = 2"),), ("t",))
    assert apply(gone, tmp_path) == "x.py: the old text occurs 0 times"
    assert (tmp_path / "x.py").read_text() == "a = 1\na = 1\n"


@pytest.mark.parametrize("field", ["name", "invariant", "tests"])
def test_a_mutant_without_a_name_invariant_or_tests_is_refused(tmp_path, field):
    entry = {"name": "m", "invariant": "i", "tests": ["t"], "file": "x.py", "old": "a", "new": "b"}
    del entry[field]
    list_file = tmp_path / "mutants.toml"
    list_file.write_text("[[mutant]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in entry.items()))
    with pytest.raises(ValueError):
        load(list_file)


def test_the_runners_output_names_no_path_of_the_machine_it_ran_on(tmp_path, capsys):
    """What `make mutate` prints is pasted into docs and reports: it shows the interpreter by its
    version and its place in the clone, never the clone's absolute path (someone else's machine)."""
    list_file = tmp_path / "mutants.toml"
    entry = {"name": "m", "invariant": "i", "tests": ["t"], "file": "README.md", "old": "\x00", "new": "x"}
    list_file.write_text("[[mutant]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in entry.items()))
    assert run.main(["--mutants", str(list_file), "--no-baseline"]) == 1  # stale: nothing to kill
    out = capsys.readouterr().out
    assert "m " in out and "stale" in out
    assert str(ROOT) not in out
    assert f"Python {sys.version.split()[0]}" in out
