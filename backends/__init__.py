"""Backends that run the reference algorithm (``armor_ref``) on other array libraries.

``get_factorize(backend, device)`` returns a function with the signature and result type of
:func:`armor_ref.factorization.factorize` (NumPy arrays in, :class:`~armor_ref.factorization.ArmorResult` out),
so that commands can swap backends without knowing them.
"""

from __future__ import annotations

from collections.abc import Callable

BACKENDS = ("numpy", "torch", "cupy")


class BackendUnavailable(RuntimeError):
    """The requested backend or device is not installed or not present on this machine."""


def get_factorize(backend: str = "numpy", device: str = "cpu") -> Callable:
    """The ``factorize`` function of ``backend`` on ``device``."""
    if backend == "numpy":
        if device != "cpu":
            raise BackendUnavailable("the numpy backend runs on the CPU only; use --backend torch or cupy for cuda")
        from armor_ref.factorization import factorize

        return factorize
    raise BackendUnavailable(f"backend {backend!r} is not available yet; choose one of: numpy")
