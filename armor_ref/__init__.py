"""The plain reference of ARMOR (NumPy/SciPy): ``objectives``, ``masks``, ``baselines``, ``factorization``.

Importing ``armor_ref`` also makes directories written by ``armor-ref compress`` load with transformers' own calls
(``AutoModel.from_pretrained(OUT)``, ``SentenceTransformer(OUT)``): their model types and the ``armor``
quantization method are registered with transformers by importing :mod:`toolkit.hf`, at once when transformers is
already imported, else the moment it first is (which then costs the seconds of importing transformers' modeling
code, once per process). The import itself stays cheap: it imports neither transformers nor
torch. This hook is the one place where the reference refers to the tooling above it (``tests/test_layering.py``).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from typing import Any


def register_with_transformers() -> None:
    """Register the ARMOR model types and quantization method with transformers (idempotent). A failure (no torch,
    an incompatible transformers) is a warning, never an error of ``import transformers``: without the registration
    transformers refuses ARMOR directories (their model type is unknown to it) rather than loading them wrong."""
    try:
        importlib.import_module("toolkit.hf")  # registers on import (a partial module: it is registering now)
    except ModuleNotFoundError as exc:
        if exc.name != "torch":  # without torch transformers loads no model at all: nothing to register
            warnings.warn(f"armor_ref: ARMOR checkpoints cannot be loaded with transformers here: {exc}", stacklevel=2)
    except Exception as exc:  # noqa: BLE001 - whatever happens, importing transformers must keep working
        warnings.warn(f"armor_ref: ARMOR checkpoints cannot be loaded with transformers here: {exc}", stacklevel=2)


class _RegisterAfterExec(importlib.abc.Loader):
    """Runs transformers' own loader, then :func:`register_with_transformers`; everything else is delegated."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self.loader.exec_module(module)
        register_with_transformers()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)


class _TransformersImportHook(importlib.abc.MetaPathFinder):
    """A one-shot finder: when ``transformers`` is first imported, wrap its loader in :class:`_RegisterAfterExec`."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)  # the finders after this one, as if it were not there
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisterAfterExec(spec.loader)
        return spec


if "transformers" in sys.modules:
    register_with_transformers()
elif not any(isinstance(finder, _TransformersImportHook) for finder in sys.meta_path):
    sys.meta_path.insert(0, _TransformersImportHook())
