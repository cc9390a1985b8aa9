"""Backends that run the reference algorithm (``armor_ref``) on other array libraries.

``get_factorize(backend, device)`` returns a function with the signature and result type of
:func:`armor_ref.factorization.factorize` (NumPy arrays in, :class:`~armor_ref.factorization.ArmorResult` with NumPy
arrays out), so that commands can swap backends without knowing them. The torch and CuPy functions take one more
keyword, ``dtype`` (torch: ``torch.float64``/``torch.float32``; CuPy: ``"float64"``/``"float32"``); the default is
float64 on the CPU (the reference's answers) and float32 on CUDA.

* ``numpy``: the reference itself, CPU only.
* ``torch``: ``backends/torch/``, devices ``cpu``, ``cuda``, ``cuda:N``.
* ``cupy``: ``backends/cupy/``, devices ``cuda``, ``cuda:N``.

Nothing is imported until asked for: a missing library or GPU raises :class:`BackendUnavailable` with the reason.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable

BACKENDS = ("numpy", "torch", "cupy")


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


def _torch_factorize(device: str) -> Callable:
    index = _cuda_index(device)
    if importlib.util.find_spec("torch") is None:
        raise BackendUnavailable("the torch backend needs torch: pip install -e '.[torch]'")
    import torch

    if index is not None:
        if not torch.cuda.is_available():
            raise BackendUnavailable(
                f"device {device!r} needs CUDA, but this torch ({torch.__version__}) sees no CUDA GPU; use --device cpu"
            )
        if index >= torch.cuda.device_count():
            raise BackendUnavailable(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    from .torch.factorization import factorize

    return functools.wraps(factorize)(functools.partial(factorize, device=device))


def _cupy_factorize(device: str) -> Callable:
    index = _cuda_index(device)
    if index is None:
        raise BackendUnavailable("the cupy backend runs on CUDA only; use --device cuda, or --backend torch for cpu")
    if importlib.util.find_spec("cupy") is None:
        raise BackendUnavailable("the cupy backend needs CuPy and an NVIDIA GPU: pip install -e '.[cupy]'")
    try:
        import cupy

        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CuPy installed but no driver / no GPU
        raise BackendUnavailable(f"CuPy is installed but finds no usable CUDA GPU: {exc}") from None
    if index >= count:
        raise BackendUnavailable(f"device {device!r}: only {count} CUDA device(s) present")
    from .cupy.factorization import factorize

    return functools.wraps(factorize)(functools.partial(factorize, device=index))


def get_factorize(backend: str = "numpy", device: str = "cpu") -> Callable:
    """The ``factorize`` function of ``backend`` on ``device`` (see the module docstring)."""
    if backend == "numpy":
        if device != "cpu":
            raise BackendUnavailable("the numpy backend runs on the CPU only; use --backend torch or cupy for cuda")
        from armor_ref.factorization import factorize

        return factorize
    if backend == "torch":
        return _torch_factorize(device)
    if backend == "cupy":
        return _cupy_factorize(device)
    raise BackendUnavailable(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
