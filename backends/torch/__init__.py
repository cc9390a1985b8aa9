"""The torch backend: the reference's modules, one by one, on torch (CPU and CUDA; float64 or float32).

``objectives``, ``masks``, ``baselines`` and ``factorization`` mirror the ``armor_ref`` modules of the same names;
``inference`` holds :class:`~backends.torch.inference.ArmorLinear`, the fast inference module. Import the submodules
directly (``from backends.torch.factorization import factorize``); importing this package needs torch.
"""

from __future__ import annotations
