"""The pure core stays pure: importing it loads no asyncio, HTTP, GPU library, psutil or logging."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "hybridd"
PURE = sorted(p for folder in ("model", "place") for p in (PACKAGE / folder).glob("*.py"))
FORBIDDEN = ("asyncio", "aiohttp", "pynvml", "psutil", "zeroconf", "gguf", "logging", "socket")


@pytest.mark.parametrize("path", PURE, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_pure_module_imports_nothing_impure(path: Path) -> None:
    module = "hybridd." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
    module = module.removesuffix(".__init__")
    code = (f"import sys, {module}\n"
            f"bad = [m for m in {FORBIDDEN!r} if m in sys.modules]\n"
            "print(','.join(bad))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "", f"{module} loads {result.stdout.strip()}"


@pytest.mark.parametrize("path", PURE, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_pure_module_does_no_io(path: Path) -> None:
    tree = ast.parse(path.read_text())
    calls = {node.func.id for node in ast.walk(tree)
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
    assert not calls & {"open", "print", "input"}, f"{path.name} calls {calls & {'open', 'print', 'input'}}"


def test_there_are_pure_modules_to_check() -> None:
    assert len(PURE) >= 3
