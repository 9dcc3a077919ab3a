"""The docs stay true to the repository: the README is a front page, every relative link and heading it
or a page under docs/ points at exists, and the tables that mirror the code (settings, routes,
modules, the latest benchmark) say what the code and the report say. Nothing a user reads talks about
the project's internal planning, and nothing in the repository points outside it.

The getting-started page itself is run by tests/test_docs_walkthrough.py.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from shared import routes
from tests.conftest import ROOT

README = ROOT / "README.md"
DOCS = ROOT / "docs"
MAX_README_LINES = 250
# What a user reads: the front page, the house rules, the history, every page under docs/.
PAGES = sorted([README, ROOT / "CONTRIBUTING.md", ROOT / "CHANGELOG.md", *DOCS.glob("*.md")])
FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _prose(text: str) -> str:
    """The page without its code (fenced blocks and inline code), where a link is not a link."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*|_(?=\W)|(?<=\W)_", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    anchors, seen = set(), {}
    for line in FENCE.sub("", path.read_text()).splitlines():
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            slug = _slug(heading.group(1))
            count = seen.get(slug, 0)
            anchors.add(slug if count == 0 else f"{slug}-{count}")
            seen[slug] = count + 1
    return anchors


def _table_rows(text: str) -> list[list[str]]:
    return [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith("|") and not re.match(r"^\|[\s\-:|]+\|$", line)
    ]


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = re.search(r"^## ", text[start + len(heading) :], re.M)
    return text[start : start + len(heading) + end.start()] if end else text[start:]


def test_the_readme_is_a_front_page_of_at_most_250_lines():
    lines = README.read_text().count("\n")
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; move the detail into docs/"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_at_a_file_and_heading_that_exist(page):
    broken = []
    for target in LINK.findall(_prose(page.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...: not ours to check
            continue
        path_part, _, anchor = target.partition("#")
        path = (page.parent / path_part).resolve() if path_part else page
        if not path.exists() or not path.is_relative_to(ROOT):
            broken.append(f"{target}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(f"{target}: no heading '{anchor}' in {path.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: {broken}"


def test_the_link_check_catches_a_missing_file_and_a_missing_heading(tmp_path):
    """The check above can fail: a dangling link and a wrong anchor are each found."""
    (tmp_path / "a.md").write_text("# Title\n\n## The `mailq` command: what it does\n")
    assert _anchors(tmp_path / "a.md") == {"title", "the-mailq-command-what-it-does"}
    text = "[ok](a.md#title) [gone](b.md) `[code](c.md)`\n```\n[fenced](d.md)\n```\n"
    assert LINK.findall(_prose(text)) == ["a.md#title", "b.md"]


def test_nothing_in_the_repository_points_outside_it():
    outside = ".." + "/shared"  # spelled apart, so this file does not find itself
    found = subprocess.run(
        ["git", "grep", "-n", "-F", outside, "--", ".", ":!tests/bench/results"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    ).stdout
    assert found == "", f"references to a folder outside the repository:\n{found}"


# Words of the project's planning, not of the product: an issue's number, the design card, the seed
# (the first version of the assignment); and a path on someone's machine (a checkout, a home folder).
INTERNAL = re.compile(r"\bissues? \d+|\bdesign card\b|\bthe seed\b|\bseed's\b", re.I)
SOMEONES_PATH = re.compile(r"(?<![\w.])/(?:home|Users|work)/[\w.-]+/")


def _internal(text: str) -> list[str]:
    found = [m.group(0) for m in INTERNAL.finditer(text)] + [m.group(0) for m in SOMEONES_PATH.finditer(text)]
    return sorted(set(found + ([str(ROOT)] if str(ROOT) in text else [])))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_page_a_user_reads_talks_about_issues_cards_or_seeds(page):
    found = [line for line in page.read_text().splitlines() if _internal(line)]
    assert not found, f"{page.relative_to(ROOT)}: {found}"


def test_the_api_reference_and_make_help_talk_about_the_product_only():
    # As a user types it: not as a sub-make of `make test`, which would announce its directory.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    help_text = subprocess.run(
        ["make", "help"], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    ).stdout
    openapi = (ROOT / "shared" / "openapi.json").read_text()
    found = {"make help": _internal(help_text), "shared/openapi.json": _internal(openapi)}
    assert found == {"make help": [], "shared/openapi.json": []}


def test_the_words_check_finds_planning_words_and_someones_paths():
    assert _internal("see issue 13 and the design card") == ["design card", "issue 13"]
    assert _internal("hpa: the seed's name; python in /work/h15-mutants/.venv") == [
        "/work/h15-mutants/",
        "the seed",
    ]
    assert str(ROOT) in _internal(f"rootdir: {ROOT}")  # wherever the clone is
    assert _internal("seeded rows, a card in the UI, /tmp/mailq-mutate-x/") == []


# --- the tables that mirror the code ------------------------------------------------------------------


def test_the_api_page_lists_exactly_the_route_table():
    rows = _table_rows(_section((DOCS / "api.md").read_text(), "## Endpoints"))
    listed = {(row[0], path) for row in rows[1:] for path in re.findall(r"`(/[^`]*)`", row[1])}
    table = {(r.method, r.path) for r in routes.ROUTES}
    assert listed == table, f"missing: {sorted(table - listed)}; not routes: {sorted(listed - table)}"


def test_the_layout_map_names_every_module_of_the_product():
    layout = _section((DOCS / "architecture.md").read_text(), "## Code layout")
    named = set(re.findall(r"`([\w/]+)`", layout))
    missing = []
    for package in ("shared", "functions"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.name == "__init__.py" or "migrations" in path.parts:
                continue
            if path.stem not in named:
                missing.append(str(path.relative_to(ROOT)))
    assert not missing, f"modules the layout map in docs/architecture.md does not name: {missing}"


def test_the_benchmark_page_shows_the_table_of_the_report_it_links():
    page = (DOCS / "benchmarks.md").read_text()
    latest = _section(page, "## The latest run")
    report = re.search(r"\]\(\.\./(tests/bench/results/[\w-]+\.md)\)", latest)
    assert report, "docs/benchmarks.md names no report under its latest run"
    lines = set((ROOT / report.group(1)).read_text().splitlines())
    shown = [line for line in latest.splitlines() if line.startswith("| ")]
    assert len(shown) > 20
    differ = [line for line in shown if line not in lines]
    assert not differ, f"rows of docs/benchmarks.md that {report.group(1)} does not have: {differ}"


def test_the_benchmark_pages_later_runs_show_rows_of_the_report_they_link():
    since = _section((DOCS / "benchmarks.md").read_text(), "## Since then")
    report = re.search(r"\]\(\.\./(tests/bench/results/[\w-]+\.md)\)", since)
    assert report, "docs/benchmarks.md names no report under Since then"
    lines = set((ROOT / report.group(1)).read_text().splitlines())
    shown = [
        line for line in since.splitlines() if line.startswith("| ") and not line.startswith("| scenario")
    ]
    assert [line for line in shown if not line.startswith("|---")], "no row under Since then"
    differ = [line for line in shown if line not in lines and not line.startswith("|---")]
    assert not differ, f"rows of docs/benchmarks.md that {report.group(1)} does not have: {differ}"


def test_the_pipelining_page_shows_rows_of_the_report_it_links():
    measured = _section((DOCS / "pipelining.md").read_text(), "## Measured")
    report = re.search(r"\]\(\.\./(tests/bench/results/[\w-]+\.md)\)", measured)
    assert report, "docs/pipelining.md names no report under Measured"
    lines = set((ROOT / report.group(1)).read_text().splitlines())
    shown = [line for line in measured.splitlines() if line.startswith("| 12.")]
    assert shown, "docs/pipelining.md shows no row of scenario 12"
    differ = [line for line in shown if line not in lines]
    assert not differ, f"rows of docs/pipelining.md that {report.group(1)} does not have: {differ}"
