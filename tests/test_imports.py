"""Imports flow one way (import-linter holds the layers in CI); here: no circle among hybridd's modules, and no
import of a hybridd module inside a function to dodge one (the CLI's per-subcommand imports aside)."""

from __future__ import annotations

import ast
from pathlib import Path

import grimp
import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "hybridd"
# `hybridd status` must start fast: each subcommand imports what it needs when it runs.
LAZY_ALLOWED = {PACKAGE / "cli"}


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _local_imports(path: Path) -> list[str]:
    """hybridd imports inside a function body (module level and `if TYPE_CHECKING:` blocks are fine)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for inner in ast.walk(node):
            if isinstance(inner, ast.ImportFrom) and (inner.module or "").startswith("hybridd"):
                found.append(f"{path.relative_to(PACKAGE.parent)}:{inner.lineno} from {inner.module}")
            elif isinstance(inner, ast.Import) and any(a.name.startswith("hybridd") for a in inner.names):
                found.append(f"{path.relative_to(PACKAGE.parent)}:{inner.lineno} import")
    return found


@pytest.mark.parametrize("path", [p for p in _modules() if not any(d in p.parents for d in LAZY_ALLOWED)],
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_hybridd_import_hides_inside_a_function(path: Path) -> None:
    assert _local_imports(path) == []


def test_the_cli_may_import_lazily_and_the_check_sees_it() -> None:
    assert _local_imports(PACKAGE / "cli" / "main.py")  # what the test above would catch, were it elsewhere


def test_no_import_circle_between_hybridd_modules() -> None:
    graph = grimp.build_graph("hybridd")
    circles = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            chain = graph.find_shortest_chain(importer=imported, imported=module)
            if chain:
                circles.append(" -> ".join((module, *chain)))
    assert circles == []
