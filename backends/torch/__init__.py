"""torch-only code: :class:`~backends.torch.inference.ArmorLinear`, the 2:4 inference module (``inference``). The
factorization itself runs on torch through the shared fast path (``backends.factorization``, ``library="torch"``).
Importing this package needs torch.
"""

from __future__ import annotations
