"""Deliberately wrong anchored (AA-SVD, objective 4) solvers, for the mutation tests of the low-rank lemma
(PROOF.md §8): each is a plausible slip in the closed form ``W' = M_k L⁻¹``, ``M = W C_δ L⁻ᵀ``, ``G'_δ = L Lᵀ``.
They have the signature of :data:`verification.lowrank_checkers.Solver`; the optimality checker must report
every one of them."""

from __future__ import annotations

import numpy as np

from armor_ref.lowrank import LowRank, aa_svd, damping_shift, plain_svd, truncated_factors, whitened_svd
from verification.strategies import TwoStreamLayer


def _damped(layer: TwoStreamLayer, damping: float) -> tuple[np.ndarray, np.ndarray]:
    """``(G'_δ, C_δ)``, damped as the reference damps them."""
    D = damping_shift(layer.G_shift, damping)
    return layer.G_shift + D, layer.C + D


def aa_svd_without_inverse_whitening(W: np.ndarray, layer: TwoStreamLayer, k: int, damping: float) -> LowRank:
    """``M = W C_δ`` (the ``L⁻ᵀ`` forgotten), then ``W' = M_k L⁻¹``."""
    G_shift_d, C_d = _damped(layer, damping)
    U, V_white = truncated_factors(W @ C_d, k)
    return LowRank(U, V_white @ np.linalg.inv(np.linalg.cholesky(G_shift_d)))


def aa_svd_unwhitened_at_the_end(W: np.ndarray, layer: TwoStreamLayer, k: int, damping: float) -> LowRank:
    """The right ``M``, mapped back with ``L⁻ᵀ`` instead of ``L⁻¹``: ``W' = M_k L⁻ᵀ``."""
    G_shift_d, C_d = _damped(layer, damping)
    L_inv_t = np.linalg.inv(np.linalg.cholesky(G_shift_d)).T
    U, V_white = truncated_factors(W @ C_d @ L_inv_t, k)
    return LowRank(U, V_white @ L_inv_t)


def aa_svd_cross_gram_transposed(W: np.ndarray, layer: TwoStreamLayer, k: int, damping: float) -> LowRank:
    """``Cᵀ = X'ᵀX`` passed where ``C = XᵀX'`` belongs (the two streams swapped in the cross Gram)."""
    return aa_svd(W, layer.G_shift, layer.C.T, k, damping)


def aa_svd_original_gram_as_cross(W: np.ndarray, layer: TwoStreamLayer, k: int, damping: float) -> LowRank:
    """``G = XᵀX`` used as the cross term, as if ``X' ≈ X`` there: the anchor's correction is lost."""
    return aa_svd(W, layer.G_shift, layer.G, k, damping)


def aa_svd_truncating_the_target(W: np.ndarray, layer: TwoStreamLayer, k: int, damping: float) -> LowRank:
    """The unconstrained optimum ``T = W C_δ G'_δ⁻¹`` truncated in the plain Frobenius norm (``G'`` ignored)."""
    G_shift_d, C_d = _damped(layer, damping)
    return plain_svd(np.linalg.solve(G_shift_d, (W @ C_d).T).T, k)


def aa_svd_undamped_cross_gram(W: np.ndarray, layer: TwoStreamLayer, k: int, damping: float) -> LowRank:
    """``δ I`` added to ``G'`` but not to ``C``: the ridge pulls ``W'`` towards 0 instead of towards ``W``."""
    G_shift_d, _ = _damped(layer, damping)
    return whitened_svd(W, G_shift_d, layer.C, k)
