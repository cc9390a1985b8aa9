"""The architecture, checked: imports run one way, tooling → fast implementation (``backends``) → plain reference
(``armor_ref``). A module may import its own layer and the layers below it, never one above — with one exception,
:data:`ALLOWED_UPWARD`: ``import armor_ref`` registers ARMOR checkpoints with transformers through ``toolkit.hf``, by
name (``importlib.import_module``) and only once transformers is imported, so the reference itself stays cheap to
import (tested here in a fresh process)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = {"armor_ref": 0, "backends": 1, "toolkit": 2}
ALLOWED_UPWARD = {"armor_ref/__init__.py": {"toolkit"}}  # the transformers registration hook


def project_imports(path: Path) -> set[str]:
    """The top-level project packages a module imports (absolute imports, and ``importlib.import_module`` of a
    string literal; relative imports stay in their package)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names = [node.args[0].value]
        else:
            continue
        found.update(name.split(".")[0] for name in names if name.split(".")[0] in LAYERS)
    return found


MODULES = sorted(p for package in LAYERS for p in (ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_run_downwards_only(path: Path) -> None:
    relative = path.relative_to(ROOT)
    layer = LAYERS[relative.parts[0]]
    upward = {name for name in project_imports(path) if LAYERS[name] > layer}
    upward -= ALLOWED_UPWARD.get(relative.as_posix(), set())
    assert not upward, f"{relative} imports {sorted(upward)}, a layer above its own"


def test_the_one_allowed_upward_import_exists_and_is_the_only_one() -> None:
    """The exception is used (it does not outlive the hook) and nothing else in the reference looks up."""
    for name, allowed in ALLOWED_UPWARD.items():
        assert project_imports(ROOT / name) >= allowed
    upward = {
        p.relative_to(ROOT).as_posix() for p in (ROOT / "armor_ref").rglob("*.py") if project_imports(p) - {"armor_ref"}
    }
    assert upward == set(ALLOWED_UPWARD)


def test_importing_the_reference_imports_neither_transformers_nor_torch() -> None:
    code = "import sys, armor_ref, armor_ref.factorization; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    """The control: a reference module importing the tooling is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("import numpy\nfrom toolkit.cli import cli\nfrom . import masks\n", encoding="utf-8")
    assert project_imports(bad) == {"toolkit"}
    bad.write_text("import importlib\nimportlib.import_module('backends.torch')\n", encoding="utf-8")
    assert project_imports(bad) == {"backends"}
