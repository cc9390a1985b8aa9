"""The CuPy backend: the reference's algorithm on CuPy arrays (NVIDIA GPUs).

CuPy mirrors NumPy's API, so this backend is the reference's code with ``np`` replaced by the array module of the
data (``cupy`` for CuPy arrays; NumPy itself for NumPy arrays, which lets the tests run it on the CPU as a stand-in).
It imports CuPy only when given CuPy arrays or a CUDA device. Modules: ``xp`` (the array-module helpers),
``factorization`` (objectives, baselines and the block coordinate descent, in one module because they are small).
"""

from __future__ import annotations
