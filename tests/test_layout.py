"""The package's layout holds: a small base at shared/ top level, rooms named after their jobs above it
in one order, the one-machine stack apart, and no module that has grown past one idea.

    base (shared/*.py, shared/migrations/)  <  accounts  <  tasks  <  webhooks  <  delivery
                                            <  maintenance  <  observe            local: apart

Everything is read from the source with ``ast`` (imports inside functions included); nothing here
imports the product.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("shared", "functions")
# The rooms, lowest first: a room imports the base and the rooms before it, never one after it.
ROOMS = ("accounts", "tasks", "webhooks", "delivery", "maintenance", "observe")
# The one-machine stack: it imports only the base, and the product imports it only where the local
# stack is started (the cluster image has no shared/local/, see .dockerignore).
LOCAL = "local"
BASE_PACKAGES = ("migrations",)  # folders of shared/ that belong to the base (Alembic's environment)
MAX_LINES = 400
HTTP_FRAMEWORKS = ("flask", "werkzeug", "functions_framework")  # only functions/ knows HTTP
# The modules of shared/ that may read the process environment. config.py is the only one by design
# (Settings.from_env(environ) is handed the mapping; today it reads no os.environ itself); there is no
# other exception, local/ included: `mailq dev` reads the environment in functions/ and passes it down.
READS_ENVIRONMENT = {"shared.config"}
# Where the product imports the local stack: the commands that start it or read what it stored, each
# importing it inside the function so the cluster image can still import their module.
STARTS_THE_LOCAL_STACK = {
    ("functions.dev", "Supervisor.start"),  # die_with_parent for every child of `mailq dev`
    ("functions.dev", "dev"),  # embedded PostgreSQL and Redis, the dev secrets
    ("functions.dev", "sink"),  # `mailq sink`
    ("functions.dev", "mailbox"),  # `mailq mailbox` reads the sink's mailbox
}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # the module imported (a module of the product, resolved)
    line: int
    function: str  # the enclosing function's qualified name, "" at module level


def _modules(root: Path) -> dict[str, Path]:
    modules = {}
    for package in PRODUCT:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The product's module a dotted name refers to (a name inside a module counts as that module)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(root: Path = ROOT) -> Iterator[Import]:
    modules = _modules(root)
    for module, path in modules.items():
        yield from _imports_of(module, path, modules)


def _imports_of(module: str, path: Path, modules: dict[str, Path]) -> Iterator[Import]:
    """Every import in one module, at any depth, with the function (or class) it sits in."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]

    def visit(node: ast.AST, function: str) -> Iterator[Import]:
        for child in ast.iter_child_nodes(node):
            scope = function
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                scope = f"{function}.{child.name}" if function else child.name
            names: list[str] = []
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    within = package[: len(package) - (child.level - 1)]
                    base = ".".join([*within, *([child.module] if child.module else [])])
                # `from shared import tasks` imports the module shared.tasks; `from x import name`
                # imports x (name is then an attribute of it).
                names = [f"{base}.{alias.name}" for alias in child.names]
            for name in names:
                target = _resolve(name, modules)
                if target is not None and target != module:
                    yield Import(module, target, child.lineno, function)
                elif target is None and name.split(".")[0] not in PRODUCT:
                    yield Import(module, name, child.lineno, function)  # a third-party module
            yield from visit(child, scope)

    yield from visit(ast.parse(path.read_text(), str(path)), "")


def _room(module: str) -> str | None:
    """ "base", a room's name, LOCAL, or None for a module outside shared/."""
    parts = module.split(".")
    if parts[0] != "shared":
        return None
    if len(parts) == 1 or parts[1] in BASE_PACKAGES or (ROOT / "shared" / f"{parts[1]}.py").is_file():
        return "base"
    return parts[1]


def _rank(room: str) -> int:
    return -1 if room == "base" else ROOMS.index(room)


def _product_imports() -> list[Import]:
    return [i for i in _imports() if i.target.split(".")[0] in PRODUCT]


def test_every_folder_of_shared_is_a_declared_room_or_a_base_package():
    folders = {p.parent.name for p in (ROOT / "shared").glob("*/__init__.py")}
    assert folders == {*ROOMS, LOCAL, *BASE_PACKAGES}


def test_the_base_imports_no_room():
    offenders = [
        f"{i.module}:{i.line} imports {i.target}"
        for i in _product_imports()
        if _room(i.module) == "base" and _room(i.target) not in ("base", None)
    ]
    assert offenders == []


def test_a_room_imports_only_the_base_and_the_rooms_below_it():
    offenders = []
    for i in _product_imports():
        room, target = _room(i.module), _room(i.target)
        if room not in ROOMS or target is None or target == room:
            continue
        if target == LOCAL or _rank(target) > _rank(room):
            offenders.append(f"{i.module}:{i.line} ({room}) imports {i.target} ({target})")
    assert offenders == []


def test_the_local_stack_imports_only_the_base():
    offenders = [
        f"{i.module}:{i.line} imports {i.target}"
        for i in _product_imports()
        if _room(i.module) == LOCAL and _room(i.target) not in ("base", LOCAL)
    ]
    assert offenders == []


def test_the_product_imports_the_local_stack_only_where_it_starts_it():
    offenders = [
        f"{i.module}:{i.line} ({i.function or 'module level'}) imports {i.target}"
        for i in _product_imports()
        if _room(i.target) == LOCAL
        and _room(i.module) != LOCAL
        and (i.module, i.function) not in STARTS_THE_LOCAL_STACK
    ]
    assert offenders == []


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (its modules in order, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10_000))
    try:
        for node in sorted(edges):
            if node not in state and (found := visit(node)):
                return found
    finally:
        sys.setrecursionlimit(limit)
    return None


def test_no_module_of_shared_or_functions_takes_part_in_an_import_cycle():
    edges: dict[str, set[str]] = {}
    for i in _product_imports():
        edges.setdefault(i.module, set()).add(i.target)
    assert _cycle(edges) is None


def test_no_module_of_shared_or_functions_is_over_400_lines():
    long = {
        str(path.relative_to(ROOT)): n
        for path in _modules(ROOT).values()
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


def test_nothing_in_shared_imports_an_http_framework():
    offenders = [
        f"{i.module}:{i.line} imports {i.target}"
        for i in _imports()
        if i.module.split(".")[0] == "shared" and i.target.split(".")[0] in HTTP_FRAMEWORKS
    ]
    assert offenders == []


def _reads_environment(tree: ast.AST) -> list[int]:
    """Lines that read the process environment: os.environ, os.environb, os.getenv(b), or those names
    imported from os."""
    names = ("environ", "environb", "getenv", "getenvb")
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in names:
            if isinstance(node.value, ast.Name) and node.value.id == "os":
                lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.module == "os":
            lines += [node.lineno for alias in node.names if alias.name in names]
    return sorted(lines)


def test_nothing_in_shared_but_config_reads_the_environment():
    offenders = [
        f"{module}:{line}"
        for module, path in _modules(ROOT).items()
        if module.split(".")[0] == "shared" and module not in READS_ENVIRONMENT
        for line in _reads_environment(ast.parse(path.read_text()))
    ]
    assert offenders == []


def test_the_layout_checks_see_imports_inside_functions_and_find_a_cycle():
    """The checks above would pass vacuously if the parser missed what they look for."""
    inside = {(i.module, i.target, i.function) for i in _product_imports()}
    assert ("functions.dev", "shared.local.embedded", "dev") in inside
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    source = "import os\nx = os.environ.get('A')\nfrom os import getenv\ny = os.getenv('B')"
    assert _reads_environment(ast.parse(source)) == [2, 3, 4]
