"""The import graph of `nanogpt_core`: no cycle of any kind, no module past ~400 lines,
no class past ~300.

Imports anywhere in a module count, those inside functions too (a cycle hidden
in a function is still two modules that cannot be understood apart); only
imports under ``if TYPE_CHECKING:`` are left out, since they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "nanogpt_core"
# "About 400 lines": a module may pass it by a little while it reads as one concept.
MAX_MODULE_LINES = 450
# "About 300 lines" for a class, with the same allowance.
MAX_CLASS_LINES = 330


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def type_checking_only(tree: ast.Module) -> set[int]:
    """ids of the nodes under ``if TYPE_CHECKING:``."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else getattr(test, "attr", None)
            if name == "TYPE_CHECKING":
                for child in node.body:
                    skipped.update(id(n) for n in ast.walk(child))
    return skipped


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The package's modules ``path`` imports, anywhere but under TYPE_CHECKING."""
    tree = ast.parse(path.read_text())
    skipped = type_checking_only(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module not in modules:
                continue
            for alias in node.names:  # `from pkg import module` imports the module
                child = f"{node.module}.{alias.name}"
                found.add(child if child in modules else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(paths)
    graph = {name: imported_modules(path, modules) - {name} for name, path in paths.items()}
    # Importing a.b.c runs the package a.b's __init__ first.
    for name in list(graph):
        for target in list(graph[name]):
            parts = target.split(".")
            for i in range(2, len(parts)):
                parent = ".".join(parts[:i])
                if parent in graph and parent != name and not name.startswith(parent + "."):
                    graph[name].add(parent)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path ``[a, b, ..., a]``, or None."""
    done: set[str] = set()
    for start in sorted(graph):
        on_path = {start}
        iterators = {start: iter(sorted(graph[start]))}
        path = [start]
        while path:
            node = path[-1]
            child = next(iterators[node], None)
            if child is None:
                path.pop()
                on_path.discard(node)
                done.add(node)
                continue
            if child in on_path:
                return [*path[path.index(child) :], child]
            if child in done:
                continue
            path.append(child)
            on_path.add(child)
            iterators[child] = iter(sorted(graph[child]))
    return None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_one():
    """The check itself can fail: a two-module and a three-module cycle are found."""
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_imports_inside_functions_count_and_type_checking_ones_do_not(tmp_path):
    module = tmp_path / "m.py"
    module.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from nanogpt_core.train.trainer import Trainer\n"
        "def f():\n    from nanogpt_core.model.gpt import GPT\n"
    )
    found = imported_modules(module, {"nanogpt_core.train.trainer", "nanogpt_core.model.gpt"})
    assert found == {"nanogpt_core.model.gpt"}


def test_no_module_is_much_over_400_lines():
    long = {
        module_name(p): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_no_class_is_much_over_300_lines():
    long = {
        f"{module_name(path)}.{node.name}": node.end_lineno - node.lineno + 1
        for path in PACKAGE.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES
    }
    assert not long, f"classes over {MAX_CLASS_LINES} lines: {long}"
