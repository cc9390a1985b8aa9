"""2:4 masks, fast: the selection and checks of :mod:`armor_ref.masks` on any array namespace, and the support
tables the discrete step looks decisions up in. (Packing to the exported layout stays in the reference: it runs on
the host, once per file.)"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np

from armor_ref.masks import GROUP, KEEP, SUPPORTS

from .xp import Array, Namespace, namespace_of

__all__ = ["GROUP", "KEEP", "SUPPORTS", "SupportTables", "has_two_per_group", "select_2of4", "support_tables"]


def select_2of4(scores: Array) -> Array:
    """Keep, in every aligned group of 4 columns, the 2 entries with the largest score; ties go to the lower column
    (the reference's stable sort). Written as rank counting, the same in every library: entry ``j`` is kept when
    fewer than 2 entries of its group beat it (``s_i > s_j``, or ``s_i = s_j`` with ``i < j``)."""
    xp = namespace_of(scores)
    d_out, d_in = scores.shape
    if d_in % GROUP != 0:
        raise ValueError(f"input dimension {d_in} is not divisible by {GROUP}; 2:4 sparsity needs groups of 4")
    g = scores.reshape(d_out, d_in // GROUP, GROUP)
    s_i, s_j = g[..., :, None], g[..., None, :]  # (..., i, j)
    lower = xp.asarray(np.triu(np.ones((GROUP, GROUP), dtype=bool), k=1))  # [i, j] = i < j
    beats = (s_i > s_j) | ((s_i == s_j) & lower)
    return (beats.sum(-2) < KEEP).reshape(d_out, d_in)


def has_two_per_group(mask: Array) -> bool:
    """True when ``mask`` keeps exactly 2 positions in every group (the exported layout)."""
    d_out, d_in = mask.shape
    return d_in % GROUP == 0 and bool((mask.reshape(d_out, -1, GROUP).sum(-1) == KEEP).all())


@dataclass
class SupportTables:
    """The 6 supports (2 of 4 positions, in the reference's order) as lookup tables on the namespace's device."""

    flat: Array  # (12,) SUPPORTS flattened: positions p0, p1 of support 0, then of support 1, ...
    of_pattern: Array  # (16,) the support id of a 4-bit pattern (bit t = position t kept); -1 if not 2 of 4
    masks: Array  # (6, 4) bool, the mask of each support
    scatter: Array  # (6, 2, 4) float64 one-hot: value t of support s goes to position SUPPORTS[s, t]
    onehot: Array  # (6, 6) the identity: row s picks support s
    pattern_bits: Array  # (4,) int64: 1, 2, 4, 8


@cache
def support_tables(xp: Namespace) -> SupportTables:
    """:class:`SupportTables` in namespace ``xp`` (made once per namespace)."""
    n = len(SUPPORTS)
    of_pattern = np.full(16, -1, dtype=np.int64)
    masks = np.zeros((n, GROUP), dtype=bool)
    scatter = np.zeros((n, KEEP, GROUP))
    for sid, (p0, p1) in enumerate(SUPPORTS.tolist()):
        of_pattern[(1 << p0) | (1 << p1)] = sid
        masks[sid, [p0, p1]] = True
        scatter[sid, 0, p0] = scatter[sid, 1, p1] = 1.0
    return SupportTables(
        xp.asarray(SUPPORTS.reshape(-1)),
        xp.asarray(of_pattern),
        xp.asarray(masks),
        xp.asarray(scatter, dtype=xp.float64),
        xp.asarray(np.eye(n)),
        xp.asarray(1 << np.arange(GROUP)),
    )
