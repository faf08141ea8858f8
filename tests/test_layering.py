"""The packages import downward only: generation <- indexing <- retrieval <- training <- cli, bench.

Every import statement is read with `ast`, including the ones inside functions, so a lazy import
cannot hide an upward dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["generation", "indexing", "retrieval", "training"]


def imported_packages(path: Path) -> set[tuple[int, str]]:
    """(line, top-level package) of every absolute import in `path`."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {(node.lineno, alias.name.split(".")[0]) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add((node.lineno, node.module.split(".")[0]))
    return found


def upward_imports(package: str) -> list[str]:
    forbidden = set(LAYERS[LAYERS.index(package) + 1 :]) | {"cli", "bench"}
    return [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path in sorted((ROOT / package).rglob("*.py"))
        for line, name in sorted(imported_packages(path))
        if name in forbidden
    ]


@pytest.mark.parametrize("package", LAYERS)
def test_package_imports_only_packages_to_its_left(package):
    assert upward_imports(package) == []


def test_the_check_sees_an_upward_import(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from training.loop import optimise\n")
    assert (2, "training") in imported_packages(module)
