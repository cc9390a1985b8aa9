"""The fast implementation of ARMOR, written once over an array namespace (:mod:`backends.xp`) and run on NumPy,
torch (CPU, CUDA) or CuPy; it mirrors the plain reference :mod:`armor_ref` module by module (``objectives``,
``masks``, ``baselines``, ``factorization``) and makes the same decisions. ``backends/torch/inference.py`` holds
:class:`~backends.torch.inference.ArmorLinear`, the 2:4 inference module.

``get_factorize(backend, device)`` returns a function with the signature and result type of
:func:`armor_ref.factorization.factorize` (NumPy arrays in, :class:`~armor_ref.factorization.ArmorResult` of NumPy
arrays out) plus the keyword ``threads`` (CPU threads, :mod:`backends.threads`), so that commands can swap backends
without knowing them. The torch and CuPy functions take one more keyword, ``dtype`` (``float64``/``float32``, a
name or a torch/NumPy dtype); the default is float64 on the CPU (the reference's answers) and float32 on CUDA.
``get_lowrank(backend, device)`` does the same for the low-rank closed forms of :mod:`armor_ref.lowrank` (fast:
:mod:`backends.lowrank`).

* ``numpy``: the fast path on NumPy, CPU only (the command line's default);
* ``torch``: the fast path on torch, devices ``cpu``, ``cuda``, ``cuda:N``;
* ``cupy``: the fast path on CuPy, devices ``cuda``, ``cuda:N``;
* ``reference``: the plain reference :func:`armor_ref.factorization.factorize` itself (slow; for checking).

Nothing is imported until asked for: a missing library or GPU raises :class:`BackendUnavailable` with the reason.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
from collections.abc import Callable
from typing import Any

BACKENDS = ("numpy", "torch", "cupy", "reference")


class BackendUnavailable(RuntimeError):
    """The requested backend or device is not installed or not present on this machine."""


def _cuda_index(device: str) -> int | None:
    """``None`` for ``cpu``; the device number for ``cuda`` / ``cuda:N``; ValueError otherwise."""
    if device == "cpu":
        return None
    if device == "cuda":
        return 0
    if device.startswith("cuda:") and device[5:].isdigit():
        return int(device[5:])
    raise ValueError(f"unknown device {device!r}; use cpu, cuda or cuda:N")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ValueError:  # a module set to None in sys.modules (made unimportable on purpose)
        return False


def _check_torch(device: str) -> None:
    index = _cuda_index(device)
    if not _installed("torch"):
        raise BackendUnavailable("the torch backend needs torch: pip install -e '.[torch]'")
    import torch

    if index is not None:
        if not torch.cuda.is_available():
            raise BackendUnavailable(
                f"device {device!r} needs CUDA, but this torch ({torch.__version__}) sees no CUDA GPU; use --device cpu"
            )
        if index >= torch.cuda.device_count():
            raise BackendUnavailable(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) present")


def _check_cupy(device: str) -> int:
    index = _cuda_index(device)
    if index is None:
        raise BackendUnavailable("the cupy backend runs on CUDA only; use --device cuda, or --backend numpy for cpu")
    if not _installed("cupy"):
        raise BackendUnavailable("the cupy backend needs CuPy and an NVIDIA GPU: pip install -e '.[cupy]'")
    try:
        import cupy

        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CuPy installed but no driver / no GPU
        raise BackendUnavailable(f"CuPy is installed but finds no usable CUDA GPU: {exc}") from None
    if index >= count:
        raise BackendUnavailable(f"device {device!r}: only {count} CUDA device(s) present")
    return index


def _with_threads(factorize: Callable) -> Callable:
    """The reference's ``factorize`` with the fast path's ``threads`` keyword (the reference knows nothing of
    threads)."""

    @functools.wraps(factorize)
    def run(*args: Any, threads: int | None = None, **kwargs: Any) -> Any:
        from .threads import limit_threads

        with limit_threads(threads):
            return factorize(*args, **kwargs)

    signature = inspect.signature(factorize)
    threads = inspect.Parameter("threads", inspect.Parameter.KEYWORD_ONLY, default=None, annotation="int | None")
    run.__signature__ = signature.replace(parameters=[*signature.parameters.values(), threads])  # type: ignore[attr-defined]
    return run


def _library_device(backend: str, device: str) -> str | int | None:
    """Check that ``backend`` runs on ``device`` here; return the device as its library names it (``None`` for
    NumPy and the reference)."""
    if backend not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    if backend in ("numpy", "reference") and device != "cpu":
        raise BackendUnavailable(f"the {backend} backend runs on the CPU only; use --backend torch or cupy for cuda")
    if backend == "torch":
        _check_torch(device)
        return device
    if backend == "cupy":
        return _check_cupy(device)
    return None


def get_factorize(backend: str = "numpy", device: str = "cpu") -> Callable:
    """The ``factorize`` function of ``backend`` on ``device`` (see the module docstring)."""
    library_device = _library_device(backend, device)
    if backend == "reference":
        from armor_ref.factorization import factorize as reference_factorize

        return _with_threads(reference_factorize)
    from .factorization import factorize

    return functools.wraps(factorize)(functools.partial(factorize, library=backend, device=library_device))


def get_lowrank(backend: str = "numpy", device: str = "cpu") -> Callable:
    """The low-rank closed forms of ``backend`` on ``device``: a function with the signature of
    :func:`armor_ref.lowrank.solve_lowrank` (NumPy arrays in, a :class:`~armor_ref.lowrank.LowRank` of float64 NumPy
    factors out) plus the keyword ``threads``, and for torch/CuPy ``dtype`` (:func:`backends.lowrank.solve_lowrank`)."""
    library_device = _library_device(backend, device)
    if backend == "reference":
        from armor_ref.lowrank import solve_lowrank as reference_lowrank

        return _with_threads(reference_lowrank)
    from .lowrank import solve_lowrank

    return functools.wraps(solve_lowrank)(functools.partial(solve_lowrank, library=backend, device=library_device))
