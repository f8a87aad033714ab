"""The installed import names: the references in fixtures/ install as `parity_fixtures`
(`fixtures` is another project's name on PyPI), and no module imports them by the
directory's name, which would load a second copy of every reference."""
from __future__ import annotations

import ast
import importlib.util
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("conftest.py", "converters", "fixtures", "parity_harness", "parity_tools", "parity_tests")


def _python_files():
    for name in SOURCES:
        path = ROOT / name
        yield from [path] if path.is_file() else sorted(path.rglob("*.py"))


def test_nothing_imports_the_references_by_their_directory_name():
    found = []
    for path in _python_files():
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            found += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names
                      if n == "fixtures" or n.startswith("fixtures.")]
    assert found == []


def test_the_references_install_as_parity_fixtures():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "fixtures" not in setuptools["packages"]
    assert setuptools["package-dir"]["parity_fixtures"] == "fixtures"
    spec = importlib.util.find_spec("parity_fixtures")
    assert spec is not None and (Path(spec.origin).parent / "harness.py").is_file()
