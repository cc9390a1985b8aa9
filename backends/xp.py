"""The array namespace of the fast path: one thin shim over NumPy, torch (CPU, CUDA) and CuPy.

The fast implementation (``objectives``, ``masks``, ``baselines``, ``factorization`` in this package) is written once
against a :class:`Namespace` ``xp``. Most of what it does is spelled the same in all three libraries and needs no
shim at all: operators (``@``, ``*``, ``-=``, comparisons), basic and advanced indexing, the methods ``reshape``,
``sum(axis)``, ``any(axis)``, ``argmin(axis)``, ``cumsum(axis)``, ``mean()``, and the module functions bound here
as they are (``einsum``, ``where``, ``abs``, ``amax``, ``sqrt``, ``stack``, ``swapaxes``, ``tile``, ``outer``,
``diagonal``, ``zeros_like``, ``linalg``). Only what really differs is written here, once per library, with the reason:

* creation (``asarray``, ``zeros``, ``ones``, ``eye``, ``arange``, ``full``): torch takes ``device=``, CuPy picks the
  current device, NumPy has none;
* ``copy`` (torch: ``clone``), ``astype`` (torch: ``to``), ``permute`` (NumPy/CuPy ``transpose(axes)``; torch's
  ``transpose`` swaps two axes only), ``pick`` (one entry per batch element: torch gathers, NumPy/CuPy index the
  flattened array), ``argsort_stable`` (the keyword that makes the sort stable differs; CuPy's sort is always
  stable), ``solve_triangular`` (NumPy has none: SciPy's; CuPy's is in ``cupyx``; torch's takes ``upper``),
  ``to_numpy``.

Why not ``array-api-compat`` (installed): its namespaces wrap many functions in Python, which costs per call what
the discrete step cannot afford (thousands of positions per sweep, a few dozen small operations each), and the
standard it implements has no ``einsum`` and only a subset of the indexing used here. Measured on arrays of the
discrete step's size (12×6), one thread, µs per call, this shim / array-api-compat: one entry per row
(``pick`` / ``take_along_axis``) 1.15 / 3.63 (NumPy), 5.9 / 11.9 (torch); ``argmin`` 0.18 / 0.88 (NumPy),
1.40 / 2.76 (torch); ``where`` 1.39 / 1.62 (NumPy), 4.2 / 5.1 (torch); ``copy`` 0.18 / 0.62 (NumPy). A function
bound here is the library's own: it adds nothing per call.

Precision: ``Namespace.dtype`` is the working float dtype (float64 by default on the CPU, float32 on CUDA); the small
pseudo-inverses are always taken in float64 (``Namespace.float64``).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from functools import cache
from types import ModuleType
from typing import Any

import numpy as np

Array = Any  # a numpy.ndarray, torch.Tensor or cupy.ndarray, as the namespace says


class Namespace:
    """The array functions of one library on one device, with the working float dtype ``dtype``.

    Attributes bound directly to the library (same name and signature in NumPy, torch and CuPy): ``einsum``,
    ``where``, ``abs``, ``amax``, ``sqrt``, ``stack``, ``concatenate``, ``swapaxes``, ``tile``, ``outer``,
    ``diagonal``, ``zeros_like``, ``linalg``; dtypes ``float64``, ``int64``, ``bool``.
    """

    def __init__(self, name: str, lib: ModuleType, device: Any, dtype: Any) -> None:
        self.name = name  # "numpy", "torch" or "cupy"
        self.lib = lib
        self.device = device  # None for NumPy; a torch.device; a CuPy device id
        self.dtype = dtype  # the working float dtype
        self._starts: dict[tuple[int, int], Array] = {}  # cached index offsets of pick()
        self.float64, self.int64 = lib.float64, lib.int64
        self.bool = lib.bool if name == "torch" else np.bool_
        for fn in (
            "einsum",
            "where",
            "abs",
            "amax",
            "sqrt",
            "stack",
            "concatenate",
            "swapaxes",
            "tile",
            "outer",
            "diagonal",
            "zeros_like",
            "linalg",
        ):
            setattr(self, fn, getattr(lib, fn))

    def __repr__(self) -> str:
        return f"Namespace({self.name}, device={self.device}, dtype={self.dtype})"

    def scope(self) -> AbstractContextManager:
        """The context to compute in: CuPy's device (CuPy works on the current device), torch's inference mode (no
        autograd bookkeeping on any operation), nothing for NumPy."""
        if self.name == "torch":
            return self.lib.inference_mode()
        if self.name == "cupy":
            return self.lib.cuda.Device(self.device)
        return nullcontext()

    # ---- creation: the device argument differs --------------------------------------------------------------
    def asarray(self, x: Any, dtype: Any = None) -> Array:
        """``x`` (a NumPy array, Python data, or an array of this library) on this device, in ``dtype`` (default:
        the working dtype for floating data, unchanged otherwise)."""
        if dtype is None and _is_floating(x):
            dtype = self.dtype
        if self.name == "torch":
            if isinstance(x, np.ndarray) and not x.flags.writeable:  # torch warns on read-only memory (np.diag's view)
                x = x.copy()
            return self.lib.as_tensor(x, dtype=dtype, device=self.device)
        return self.lib.asarray(x, dtype=dtype)

    def zeros(self, shape: Sequence[int] | int, dtype: Any = None) -> Array:
        return self._create(self.lib.zeros, shape, dtype)

    def ones(self, shape: Sequence[int] | int, dtype: Any = None) -> Array:
        return self._create(self.lib.ones, shape, dtype)

    def eye(self, n: int, dtype: Any = None) -> Array:
        return self._create(self.lib.eye, n, dtype)

    def arange(self, n: int) -> Array:
        if self.name == "torch":
            return self.lib.arange(n, device=self.device)
        return self.lib.arange(n)

    def _create(self, fn: Any, shape: Any, dtype: Any) -> Array:
        dtype = self.dtype if dtype is None else dtype
        if self.name == "torch":
            return fn(shape, dtype=dtype, device=self.device)
        return fn(shape, dtype=dtype)

    # ---- functions whose spelling differs ---------------------------------------------------------------------
    def copy(self, x: Array) -> Array:
        return x.clone() if self.name == "torch" else x.copy()

    def astype(self, x: Array, dtype: Any) -> Array:
        return x.to(dtype) if self.name == "torch" else x.astype(dtype)

    def permute(self, x: Array, axes: Sequence[int]) -> Array:
        """The axes of ``x`` reordered (NumPy's ``transpose(axes)``)."""
        return x.permute(*axes) if self.name == "torch" else x.transpose(*axes)

    def pick(self, x: Array, index: Array, axis: int = -1) -> Array:
        """One entry per batch element: along ``axis=-1``, x (..., n) → (...); along ``axis=-2``, x (..., n, d) →
        (..., d); ``x``'s batch shape is ``index``'s. torch gathers; NumPy and CuPy index the flattened array (NumPy's
        ``take_along_axis`` is a Python function, 4× slower on small arrays)."""
        if self.name == "torch":
            if axis == -1:
                return self.lib.take_along_dim(x, index[..., None], -1)[..., 0]
            return self.lib.take_along_dim(x, index[..., None, None], -2)[..., 0, :]
        flat = self._row_starts(index.size, x.shape[axis]) + index.reshape(-1)
        if axis == -1:
            return x.reshape(-1)[flat].reshape(index.shape)
        return x.reshape(-1, x.shape[-1])[flat].reshape(*index.shape, x.shape[-1])

    def _row_starts(self, rows: int, n: int) -> Array:
        key = (rows, n)
        if key not in self._starts:
            self._starts[key] = self.arange(rows) * n
        return self._starts[key]

    def argsort_stable(self, x: Array, axis: int = -1) -> Array:
        """Indices that sort ``x`` along ``axis``, equal values kept in their order."""
        if self.name == "torch":
            return self.lib.argsort(x, dim=axis, stable=True)
        if self.name == "cupy":  # CuPy's sort is a stable radix sort; it has no `kind`
            return self.lib.argsort(x, axis=axis)
        return self.lib.argsort(x, axis=axis, kind="stable")

    def solve_triangular(self, L: Array, B: Array, trans: bool = False) -> Array:
        """``X`` with ``L X = B`` (``Lᵀ X = B`` when ``trans``) for a lower-triangular ``L`` (n, n), ``B`` (n, m):
        one triangular solve, O(n² m)."""
        if self.name == "torch":
            return self.lib.linalg.solve_triangular(L.T if trans else L, B, upper=trans)
        if self.name == "cupy":
            from cupyx.scipy.linalg import solve_triangular
        else:
            from scipy.linalg import solve_triangular
        return solve_triangular(L, B, lower=True, trans="T" if trans else "N")

    def to_numpy(self, x: Array) -> np.ndarray:
        """A host NumPy copy (float arrays as float64, the reference's dtype)."""
        if self.name == "torch":
            x = x.detach().cpu()
            return (x.double() if x.is_floating_point() else x).numpy()
        if self.name == "cupy":
            x = x.get()
        return x.astype(np.float64) if np.issubdtype(x.dtype, np.floating) else np.asarray(x)


def _is_floating(x: Any) -> bool:
    """Whether ``x`` (an array of any of the three libraries, or Python data) holds floating-point numbers."""
    if library_of(x) == "torch":
        return x.is_floating_point()
    dtype = getattr(x, "dtype", None)
    return np.dtype(dtype if dtype is not None else np.asarray(x).dtype).kind == "f"


# ----------------------------------------------------------------------------------------------------------------
# Making a namespace
# ----------------------------------------------------------------------------------------------------------------
def library_of(x: Any) -> str:
    """``"torch"``, ``"cupy"`` or ``"numpy"``: the library an array belongs to (without importing any)."""
    top = type(x).__module__.split(".")[0]
    return top if top in ("torch", "cupy") else "numpy"


def namespace_of(x: Array) -> Namespace:
    """The namespace of array ``x``: its library, its device, and its dtype as the working dtype (float64 for
    integer or bool arrays)."""
    name = library_of(x)
    if name == "numpy":
        return _namespace("numpy", None, x.dtype.name if x.dtype.kind == "f" else "float64")
    if name == "torch":
        dtype = x.dtype if x.is_floating_point() else None
        return _namespace("torch", str(x.device), str(dtype).removeprefix("torch.") if dtype else "float64")
    return _namespace("cupy", x.device.id, x.dtype.name if x.dtype.kind == "f" else "float64")


def make_namespace(library: str, device: str | int | None, dtype: Any = None) -> Namespace:
    """The namespace of ``library`` (``numpy``, ``torch``, ``cupy``) on ``device`` (torch: ``cpu``, ``cuda``,
    ``cuda:N``; CuPy: a device number) with working dtype ``dtype`` (a NumPy/torch dtype or its name; default
    :func:`default_dtype`)."""
    name = dtype_name(dtype) if dtype is not None else default_dtype(library, device)
    if library == "torch":
        import torch

        device = str(torch.device(device if device is not None else "cpu"))
    elif library == "cupy":
        device = 0 if device is None else device
    else:
        device = None
    return _namespace(library, device, name)


@cache
def _namespace(library: str, device: Any, dtype_name_: str) -> Namespace:
    if library == "torch":
        import torch

        return Namespace("torch", torch, torch.device(device), getattr(torch, dtype_name_))
    if library == "cupy":
        import cupy

        return Namespace("cupy", cupy, device, cupy.dtype(dtype_name_))
    return Namespace("numpy", np, None, np.dtype(dtype_name_))


def dtype_name(dtype: Any) -> str:
    """``"float64"`` or ``"float32"`` from a NumPy dtype, a torch dtype or a name; ValueError for anything else."""
    name = str(dtype).removeprefix("torch.")
    if name not in ("float64", "float32"):
        raise ValueError(f"unsupported dtype {dtype!r}; use float64 or float32")
    return name


def default_dtype(library: str, device: Any) -> str:
    """float64 on the CPU (the reference's answers), float32 on a GPU (speed; every guarantee holds to round-off)."""
    on_gpu = library == "cupy" or (library == "torch" and str(device or "cpu") != "cpu")
    return "float32" if on_gpu else "float64"
