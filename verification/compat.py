"""The two discrete-step operations the checkers need, over :mod:`armor_ref.factorization`'s internals."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from armor_ref import factorization as fz
from armor_ref.masks import SUPPORTS


def support_costs(Q: np.ndarray, ell: np.ndarray, a_norm2: float) -> tuple[np.ndarray, np.ndarray]:
    """Optimal values ``u`` (6, 4) and costs (6,) of the 6 supports of one group with ``Q``, ``ℓ``, ``‖a‖²``."""
    Q_ss = np.stack([Q[np.ix_(s, s)] for s in SUPPORTS])
    return fz.support_costs(Q_ss, fz.psd_pinv(Q_ss), ell, a_norm2)


def run_update_groups(
    f: fz.Factors,
    G_tiles: np.ndarray,
    B_ks: np.ndarray,
    H_kk: np.ndarray,
    ks: slice,
    p: np.ndarray,
    g: np.ndarray,
    update: Callable[..., bool] | None = None,
) -> int:
    """One batch of the discrete step: in every tile ``(r, k)`` of row blocks × the column blocks ``ks``, call
    ``update`` (default: the reference's ``update_group``) on the group ``(p[r, j], g[r, j])``, ``j = k − ks.start``.
    ``G_tiles`` (R, nk, b, b) holds ``(T − Ŵ) H`` on those tiles and is kept current; ``B_ks``, ``H_kk``
    (nk, b, b) give the group tables. Returns the number of support changes."""
    update = fz.update_group if update is None else update
    R, nk = G_tiles.shape[:2]
    changed = 0
    for j, k in enumerate(range(ks.start, ks.stop)):
        tables = fz.group_tables(B_ks[j], H_kk[j])
        for r in range(R):
            changed += int(update(f, G_tiles[r, j], tables, r, k, int(p[r, j]), int(g[r, j])))
    return changed
