"""What the product is made of: the cluster image's install reproduced without Docker, the product's
imports, and the make targets that reach the harnesses under tests/.

The image check builds the context the way the builder does (`.dockerignore`: the last matching pattern
wins, `!` lets a path back in), applies the build stage's WORKDIR and COPY lines, and runs its
`pip install .` (from the package index, build isolation included, `--no-deps` because the venv holds
the dependencies).
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import posixpath
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path, PurePosixPath

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "deployment" / "Dockerfile"
PRODUCT = ("shared", "functions")
HARNESSES = {"tests", "bench", "chaos"}


# --- the build context ------------------------------------------------------------------------------


def _ignore_patterns() -> list[tuple[bool, re.Pattern[str], str]]:
    """(re-includes, regex, literal prefix) per line, as moby's patternmatcher reads .dockerignore."""
    # BuildKit prefers <Dockerfile>.dockerignore beside the Dockerfile to the one at the context root.
    beside = DOCKERFILE.with_name(DOCKERFILE.name + ".dockerignore")
    text = (beside if beside.exists() else ROOT / ".dockerignore").read_text()
    patterns = []
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        line = line.strip()
        negate = line.startswith("!")
        pattern = posixpath.normpath(line.removeprefix("!")).lstrip("/")
        regex = ""
        for part in re.split(r"(\*\*/|\*\*|\*|\?)", pattern):
            regex += {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(part, re.escape(part))
        patterns.append((negate, re.compile(regex), re.split(r"[*?\[]", pattern)[0]))
    return patterns


def _ignored(patterns, path: str) -> bool:
    """The last pattern matching the path or one of its parent directories decides."""
    parents = ["/".join(path.split("/")[: i + 1]) for i in range(path.count("/") + 1)]
    ignored = False
    for negate, regex, _ in patterns:
        if any(regex.fullmatch(p) for p in parents):
            ignored = not negate
    return ignored


def _build_context(dest: Path) -> None:
    """Copy what the builder would receive from the repository root into dest."""
    patterns = _ignore_patterns()
    for folder, dirs, files in os.walk(ROOT):
        rel = Path(folder).relative_to(ROOT).as_posix()
        rel = "" if rel == "." else rel + "/"
        # Like the builder, skip an ignored directory unless a `!` pattern could reach inside it.
        dirs[:] = [
            d
            for d in dirs
            if not _ignored(patterns, rel + d)
            or any(neg and (p.startswith(rel + d + "/") or (rel + d).startswith(p)) for neg, _, p in patterns)
        ]
        for name in files:
            if not _ignored(patterns, rel + name):
                (dest / rel).mkdir(parents=True, exist_ok=True)
                shutil.copy2(Path(folder) / name, dest / rel / name)


def _apply_build_stage(context: Path, root: Path) -> Path:
    """Run the WORKDIR and COPY lines of the stage that pip-installs into root; return what it installs."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages = re.split(r"^FROM\s", text, flags=re.M)[1:]
    (stage,) = [s for s in stages if re.search(r"^RUN\s.*\bpip install\b", s, re.M)]
    workdir = PurePosixPath("/")
    for keyword, args in re.findall(r"^(WORKDIR|COPY|ADD|RUN)\s+(.*)$", stage, re.M):
        if keyword == "WORKDIR":
            workdir = workdir / args.strip()
            (root / workdir.relative_to("/")).mkdir(parents=True, exist_ok=True)
        elif keyword in ("COPY", "ADD"):
            words = json.loads(args) if args.startswith("[") else args.split()
            assert not any(w.startswith("--from") for w in words), "the build stage copies only the context"
            *sources, target = [w for w in words if not w.startswith("--")]
            into = root / (workdir / target).relative_to("/")
            for source in sources:
                matches = sorted(context.glob(source))
                assert matches, f"{keyword} {source}: not in the build context"
                for match in matches:
                    if match.is_dir():
                        shutil.copytree(match, into, dirs_exist_ok=True)
                    elif target.endswith("/") or into.is_dir():
                        into.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(match, into / match.name)
                    else:  # a file path, as Docker reads a target without a trailing slash
                        into.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(match, into)
        elif "pip install" in args:
            return root / (workdir / args.split()[-1]).relative_to("/")
    raise AssertionError("the build stage never runs pip install")


def _dev_only_modules() -> set[str]:
    """Import names that only the optional extras (local, dev, bench) bring; the image has none of them."""

    def name(requirement: str) -> str:
        return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", requirement)[0]).lower()

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {name(r) for r in project["dependencies"]}
    extras = {name(r) for group in project["optional-dependencies"].values() for r in group}
    extras -= core | {name(project["name"])}  # `mailq[local]` inside an extra names the product itself
    return {
        module
        for module, dists in importlib.metadata.packages_distributions().items()
        if all(name(d) in extras for d in dists)
    }


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """(what the build stage holds, where `pip install` put it) for the image as the repository builds it."""
    work = tmp_path_factory.mktemp("image")
    _build_context(work / "context")
    source = _apply_build_stage(work / "context", work / "root")
    snapshot = {p.relative_to(source) for p in source.rglob("*") if p.is_file()}
    site = work / "site"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "--quiet",
         "--target", str(site), str(source)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, f"the image's `pip install .` fails:\n{done.stderr[-3000:]}"
    return snapshot, site


def test_the_image_installs_exactly_its_product_files_and_no_harness_or_dev_only_code(image):
    snapshot, site = image
    installed = {
        p.relative_to(site)
        for p in site.rglob("*")
        if p.is_file() and not re.fullmatch(r"bin|.*\.dist-info", p.relative_to(site).parts[0])
    }
    assert {p.parts[0] for p in installed} == set(PRODUCT)
    assert installed == {p for p in snapshot if p.parts[0] in PRODUCT}, "the context and the install differ"
    dev_only = _dev_only_modules() | HARNESSES
    for path in sorted(site.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            used = {n.split(".")[0] for n in names} & dev_only
            assert not used, f"the image ships {path.relative_to(site)}, which imports {used}"


def test_the_image_carries_the_licence_its_metadata_names(image):
    """Apache-2.0 asks that a redistribution carry the licence: the image's install holds its text."""
    _, site = image
    (info,) = site.glob("mailq-*.dist-info")
    metadata = (info / "METADATA").read_text()
    assert "License-Expression: Apache-2.0" in metadata.splitlines()
    assert (info / "licenses" / "LICENSE").read_text() == (ROOT / "LICENSE").read_text()


def test_every_module_the_image_installs_imports_without_the_optional_extras(image):
    _, site = image
    code = """if True:
        import importlib, importlib.abc, pkgutil, sys
        blocked, site = set(sys.argv[1:-1]), sys.argv[-1]

        class Absent(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in blocked:
                    raise ModuleNotFoundError(f"{name} is not in the image")

        # The venv's editable install would fill any gap in the image from the source tree.
        sys.meta_path[:] = [Absent(), *(f for f in sys.meta_path if "__editable__" not in f.__module__)]
        sys.path_hooks[:] = [h for h in sys.path_hooks if "__editable__" not in h.__module__]
        sys.path_importer_cache.clear()
        for package in ("shared", "functions"):
            module = importlib.import_module(package)
            assert module.__file__.startswith(site), module.__file__
            for info in pkgutil.walk_packages(module.__path__, package + "."):
                if info.name != "shared.migrations.env":  # runs inside alembic only
                    importlib.import_module(info.name)
    """
    done = subprocess.run(
        [sys.executable, "-c", code, *sorted(_dev_only_modules() | HARNESSES), str(site)],
        cwd=site, env={**os.environ, "PYTHONPATH": str(site)}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]


# --- the product and the harnesses ------------------------------------------------------------------


def test_mailq_version_is_the_installed_package_version():
    command = [sys.executable, "-m", "functions.cli", "--version"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"mailq, version {importlib.metadata.version('mailq')}\n"


def test_the_product_never_imports_the_tests_or_their_harnesses():
    offenders = []
    for path in sorted(p for folder in PRODUCT for p in (ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in HARNESSES]
    assert not offenders
    found = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert {p.split(".")[0] for p in found["include"]} == set(PRODUCT)


@pytest.mark.parametrize(
    ("target", "command"),
    [
        (["bench", "BENCH_ARGS=--quick"], "-m tests.bench --quick"),
        (["chaos", "CHAOS_ARGS=-s sender-kills -n 10"], "-m tests.chaos -s sender-kills -n 10"),
        (["fuzz"], "-m pytest tests/test_fuzz.py"),
    ],
)
def test_make_bench_chaos_and_fuzz_run_the_harnesses_under_tests_with_their_arguments(target, command):
    # The Makefile includes the harnesses' .mk files with -include, which says nothing when one is missing.
    done = subprocess.run(["make", "-n", *target], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert command in done.stdout, done.stdout
