"""Array-module helpers: the CuPy backend's code is written once for ``xp`` = ``cupy`` or ``numpy``."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np


def array_module(a: Any) -> ModuleType:
    """``cupy`` for a CuPy array, ``numpy`` otherwise (as ``cupy.get_array_module``, without importing CuPy)."""
    if type(a).__module__.split(".")[0] == "cupy":
        import cupy

        return cupy
    return np


def to_numpy(a: Any) -> np.ndarray:
    """A NumPy copy of a CuPy array (NumPy arrays pass through)."""
    return a.get() if hasattr(a, "get") and array_module(a) is not np else np.asarray(a)
