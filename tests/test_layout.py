"""The package's layout keeps its promises: no import circles between our
modules, and the vault itself (L{securevault.core}, L{securevault.stores},
L{securevault.storage}) imports nothing of Twisted, so it runs from any
thread and any tool."""

from __future__ import annotations

import ast
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

PACKAGE = Path(__file__).resolve().parents[1] / "securevault"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module this file imports anywhere: at the top, in functions and
    under C{TYPE_CHECKING} alike (a circle of annotations is still a circle)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py") if path.name != "__main__.py"}
    return {
        name: {target for target in imports_of(path) if target in modules and target != name}
        for name, path in modules.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle, as the list of modules around it, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return stack[stack.index(target) :] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


class LayoutTests(SynchronousTestCase):
    def test_no_import_circles(self) -> None:
        """No module of securevault imports, directly or through others, a
        module that imports it back (package __init__ files that re-export
        are counted too)."""
        graph = import_graph()
        self.assertIn("securevault.storage", graph)
        self.assertIsNone(find_cycle(graph))

    def test_cycle_finder_finds_a_circle(self) -> None:
        """The check above can fail: a two-module circle is found."""
        self.assertEqual(find_cycle({"a": {"b"}, "b": {"a"}}), ["a", "b", "a"])
        self.assertIsNone(find_cycle({"a": {"b"}, "b": set()}))

    def test_vault_imports_no_twisted(self) -> None:
        """The vault and its stores are plain blocking Python."""
        for path in [PACKAGE / "storage.py", *(PACKAGE / "core").glob("*.py"), *(PACKAGE / "stores").glob("*.py")]:
            twisted = sorted(name for name in imports_of(path) if name.split(".")[0] == "twisted")
            self.assertEqual(twisted, [], path.name)

    def test_client_imports_nothing_of_the_server(self) -> None:
        """The client runs on the standard library and its own package (and
        the version in securevault/__init__.py, which importing the client
        runs anyway)."""
        for path in (PACKAGE / "client").glob("*.py"):
            ours = {name for name in imports_of(path) if name.startswith("securevault.")}
            ours.discard("securevault.__version__")
            self.assertEqual({name for name in ours if not name.startswith("securevault.client")}, set(), path.name)
