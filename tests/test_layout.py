"""The shape of the house, read from the source: imports flow one way (no circles between modules
nor between the rooms of the tree), modules and functions stay a size a reader can hold, and
`__init__.py` files only describe, re-export or name constants."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "storycli"
MAX_MODULE_LINES = 700
MAX_FUNCTION_LINES = 100

# What each room may import besides itself, bottom to top: the data flows story → plan → loop →
# files, stage one before stage two, scoring and benchmarks above both, the command line on top.
# A room is a package (story, keyframes, ...) or a shared top-level module (errors, atomic, ...).
BASE = {"errors", "atomic", "locks", "paths", "seeds", "config", "saved_banks", "outputs"}
ROOMS: dict[str, set[str]] = {
    "story": {"errors", "config", "saved_banks"},
    "weights": {"errors", "config", "story"},
    "batch": {"errors", "config", "story"},
    "render": {"errors", "atomic", "locks", "paths"},
    "consistency": BASE | {"story", "weights"},
    "keyframes": BASE | {"story", "weights", "batch", "render", "consistency"},
    "motion": BASE | {"story", "weights", "batch", "consistency", "keyframes"},
    "evaluate": BASE | {"story", "weights", "keyframes", "motion"},
    "llm": BASE | {"story", "keyframes"},
    "suites": BASE | {"story", "weights", "keyframes", "evaluate"},
    "cli": BASE | set(),  # filled below: the command line may import every room
}
ROOMS["cli"] |= set(ROOMS)


def modules() -> Iterator[tuple[str, Path]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path


@cache
def tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"))


@cache
def import_graph() -> dict[str, set[str]]:
    """Module → the storycli modules it imports anywhere (top level, inside functions, under
    TYPE_CHECKING): a circle through a function-level import is still a circle to a reader."""
    known = dict(modules())
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        targets = set()
        for node in ast.walk(tree(path)):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                assert node.level == 0, f"{path}:{node.lineno}: relative import"
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    targets.add(sub if sub in known else node.module)
        graph[name] = {t for t in targets if t in known and t != name and t != "storycli"}
    return graph


def room(module: str) -> str:
    return module.split(".")[1] if module.count(".") else module


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_module_imports_itself_through_others() -> None:
    assert cycles(import_graph()) == []


def test_rooms_import_only_the_rooms_below_them() -> None:
    wrong = []
    for module, targets in sorted(import_graph().items()):
        here = room(module)
        if here not in ROOMS:
            continue  # a shared top-level module: checked by the circle test
        allowed = ROOMS[here] | {here}
        wrong += [f"{module} imports {t}" for t in sorted(targets) if room(t) not in allowed]
    assert wrong == []


def test_every_room_of_the_tree_is_placed() -> None:
    rooms = {room(m) for m, _ in modules() if m != "storycli"}
    assert rooms - set(ROOMS) - BASE == {"__main__"}


def test_the_rule_itself_has_no_circle() -> None:
    assert cycles({r: deps - {r} for r, deps in ROOMS.items()}) == []


@pytest.mark.parametrize(("name", "path"), list(modules()), ids=lambda v: str(v))
def test_module_size(name: str, path: Path) -> None:
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_MODULE_LINES, f"{name}: {lines} lines"


def function_lengths(path: Path, in_cli: bool) -> Iterator[tuple[str, int]]:
    for node in ast.walk(tree(path)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            # A command's long option signature is its help text: only its body counts.
            start = node.body[0].lineno if in_cli else node.lineno
            yield f"{path.name}:{node.lineno} {node.name}", node.end_lineno - start + 1


def test_no_function_over_a_hundred_lines() -> None:
    long = [
        f"{where}: {n} lines"
        for name, path in modules()
        for where, n in function_lengths(path, room(name) == "cli")
        if n > MAX_FUNCTION_LINES
    ]
    assert long == []


def test_init_files_do_no_work() -> None:
    """A package's __init__.py describes it, names constants or re-exports; only the command
    line's wires the commands (as huggingface_hub's `hf` does)."""
    busy = []
    for name, path in modules():
        if path.name != "__init__.py" or name == "storycli.cli":
            continue
        for node in tree(path).body:
            if not isinstance(node, ast.Expr | ast.Import | ast.ImportFrom | ast.Assign):
                busy.append(f"{name}:{node.lineno}")
    assert busy == []
