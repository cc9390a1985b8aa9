"""The two discrete-step operations the checkers need, over :mod:`armor_ref.factorization`'s internals."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from armor_ref import factorization as fz
from armor_ref.masks import SUPPORTS


def support_costs(Q: np.ndarray, ell: np.ndarray, a_norm2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Optimal values ``u`` (..., 6, 4) and costs (..., 6) of the 6 supports of groups with ``Q``, ``ℓ``, ``‖a‖²``."""
    Q_ss = Q[..., SUPPORTS[:, :, None], SUPPORTS[:, None, :]]
    return fz.support_costs(Q, Q_ss, fz.psd_pinv(Q_ss), ell, a_norm2)


def run_update_groups(
    f: fz.Factors,
    G_tiles: np.ndarray,
    B_ks: np.ndarray,
    H_kk: np.ndarray,
    ks: slice,
    p: np.ndarray,
    g: np.ndarray,
    update: Callable[..., int] | None = None,
) -> int:
    """Call ``update`` (default: the reference's ``update_groups``) on one batch, with the group tables of
    ``B_k`` (nk, b, b) and ``H_kk`` (nk, b, b)."""
    update = fz.update_groups if update is None else update
    return update(f, G_tiles, fz.group_tables(B_ks, H_kk), ks, p, g)
