"""docs/armor-spec.md and the code stay in step: every section names one function that exists (``→ `name```), and
every constant of the tolerance table has the value the spec states."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

SPEC = Path(__file__).resolve().parent.parent / "docs" / "armor-spec.md"
#: a section starts with a numbered heading (``## 5.``, ``### 5.4``) or a numbered bold paragraph (``**5.4.1 …``)
SECTION = re.compile(r"^(?:#{2,3} |\*\*)(\d+(?:\.\d+)*)\.?\s")
ARROW = re.compile(r"→\s*`([\w.]+)`")


def sections(text: str) -> dict[str, str]:
    """Section number → its own text (up to the next section of any level)."""
    out: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        match = SECTION.match(line)
        if match:
            current = match.group(1)
            out[current] = ""
        if current is not None:
            out[current] += line + "\n"
    return out


def resolve(dotted: str) -> object:
    """The object a dotted name such as ``armor_ref.factorization.a_step`` refers to."""
    parts = dotted.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise LookupError(dotted)


def implementers(text: str) -> dict[str, list[str]]:
    """Section number → the names after ``→`` in it; sections that have subsections may name none."""
    parts = sections(text)
    out = {}
    for number, body in parts.items():
        has_children = any(other.startswith(number + ".") for other in parts)
        names = ARROW.findall(body)
        if names or not has_children:
            out[number] = names
    return out


def test_every_section_names_one_function_that_exists() -> None:
    found = implementers(SPEC.read_text(encoding="utf-8"))
    found.pop("8")  # the tolerance table: checked below, constant by constant
    assert len(found) > 30
    for number, names in found.items():
        assert len(names) == 1, f"§{number} names {names}, not one function"
        assert callable(resolve(names[0])), f"§{number}: {names[0]} is not a function"


def test_the_section_check_sees_a_missing_or_wrong_name() -> None:
    """The control: a leaf section without ``→``, or naming a function that does not exist, is reported."""
    text = "## 1. A\n### 1.1 B\n→ `armor_ref.factorization.reconstruct`\n### 1.2 C\nno arrow here\n"
    assert implementers(text) == {"1.1": ["armor_ref.factorization.reconstruct"], "1.2": []}
    with pytest.raises(AttributeError):
        resolve("armor_ref.factorization.no_such_step")


def tolerance_rows(text: str) -> list[tuple[list[str], str, list[object]]]:
    """(constant names, module, stated values) of each row of the §8 table."""
    rows = []
    for line in sections(text)["8"].splitlines():
        if not line.startswith("| `"):
            continue
        name_cell, value_cell = line.split("|")[1:3]
        module = re.search(r"\(`(\w+)`\)", name_cell)
        names = re.findall(r"`(\w+)`", re.sub(r"\(`\w+`\)", "", name_cell))
        values = [ast.literal_eval(v) for v in re.findall(r"`([^`]+)`", value_cell)]
        rows.append((names, module.group(1) if module else "factorization", values))
    return rows


def test_every_tolerance_in_the_spec_has_its_stated_value() -> None:
    rows = tolerance_rows(SPEC.read_text(encoding="utf-8"))
    assert len(rows) >= 12
    for names, module, values in rows:
        constants = [getattr(importlib.import_module(f"armor_ref.{module}"), name) for name in names]
        if len(names) == len(values):
            assert constants == values, names
        else:  # one constant holding several values (a per-proxy dict)
            (constant,) = constants
            assert list(constant.values()) == values, names
