"""The architecture, checked: imports run one way, tooling → fast implementation (``backends``) → plain reference
(``armor_ref``). A module may import its own layer and the layers below it, never one above."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = {"armor_ref": 0, "backends": 1, "toolkit": 2}


def project_imports(path: Path) -> set[str]:
    """The top-level project packages a module imports (absolute imports; relative ones stay in its package)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found.update(name.split(".")[0] for name in names if name.split(".")[0] in LAYERS)
    return found


MODULES = sorted(p for package in LAYERS for p in (ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_run_downwards_only(path: Path) -> None:
    layer = LAYERS[path.relative_to(ROOT).parts[0]]
    upward = {name for name in project_imports(path) if LAYERS[name] > layer}
    assert not upward, f"{path.relative_to(ROOT)} imports {sorted(upward)}, a layer above its own"


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    """The control: a reference module importing the tooling is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("import numpy\nfrom toolkit.cli import cli\nfrom . import masks\n", encoding="utf-8")
    assert project_imports(bad) == {"toolkit"}
