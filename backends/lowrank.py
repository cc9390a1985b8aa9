"""The low-rank closed forms (docs/aa-svd-spec.md §1–§5), fast: :mod:`armor_ref.lowrank` on any array namespace
(:mod:`backends.xp`), so that a compression on a GPU solves its layers there.

Each function takes arrays of one library and computes in their namespace; the formulas, the damping and the
stored factors are the reference's (see its docstrings): ``Q + δI = L Lᵀ``, ``M = W (P + δI) L⁻ᵀ``,
``W' = M_k L⁻¹`` stored as ``U = U_k Σ_k^{1/2}``, ``V = Σ_k^{1/2} V_kᵀ L⁻¹``. :func:`solve_lowrank` is the entry
point with NumPy arrays in and out (like :func:`backends.factorization.factorize`).
"""

from __future__ import annotations

import math

import numpy as np

from armor_ref.lowrank import OBJECTIVES, LowRank, check_rank
from armor_ref.objectives import DEFAULT_DAMPING

from .objectives import damped
from .threads import limit_threads
from .xp import Array, make_namespace, namespace_of

__all__ = [
    "LowRank",
    "aa_svd",
    "anchored_target",
    "damping_shift",
    "plain_svd",
    "shifted_svd",
    "solve_lowrank",
    "svd_llm",
    "truncated_factors",
    "whitened_svd",
]


def truncated_factors(M: Array, k: int) -> tuple[Array, Array]:
    """``(U_k Σ_k^{1/2}, Σ_k^{1/2} V_kᵀ)`` (d_out, k), (k, d_in) of the rank-k truncated SVD of ``M``."""
    xp = namespace_of(M)
    U, s, Vt = xp.linalg.svd(M, full_matrices=False)
    root = xp.sqrt(s[:k])
    return U[:, :k] * root[None, :], root[:, None] * Vt[:k, :]


def plain_svd(W: Array, k: int) -> LowRank:
    """Objective 1: the truncated SVD ``W_k``."""
    check_rank(k, *W.shape)
    return LowRank(*truncated_factors(W, k))


def whitened_svd(W: Array, Q: Array, P: Array, k: int) -> LowRank:
    """``argmin_{rank W' ≤ k} tr(W' Q W'ᵀ) − 2 tr(W P W'ᵀ)``: ``Q = L Lᵀ``, ``M = W P L⁻ᵀ``, ``W' = M_k L⁻¹``.
    ValueError when ``Q`` is not positive definite."""
    xp = namespace_of(W)
    check_rank(k, *W.shape)
    L = cholesky(Q)  # (d_in, d_in) lower
    M = xp.solve_triangular(L, (W @ P).T).T  # M = W P L⁻ᵀ  (d_out, d_in)
    U, V_white = truncated_factors(M, k)
    V = xp.solve_triangular(L, V_white.T, trans=True).T  # V = V_white L⁻¹  (k, d_in)
    return LowRank(U, V)


def cholesky(Q: Array) -> Array:
    """The lower Cholesky factor of ``Q``; ValueError when ``Q`` is not positive definite (NumPy and torch raise,
    CuPy returns NaN)."""
    xp = namespace_of(Q)
    try:
        L = xp.linalg.cholesky(Q)
    except (np.linalg.LinAlgError, RuntimeError):  # torch.linalg.LinAlgError is a RuntimeError
        L = None
    if L is None or not math.isfinite(float(xp.diagonal(L, 0, -2, -1).sum())):
        raise ValueError("the Gram matrix is not positive definite; solve with damping > 0")
    return L


def damping_shift(G_shift: Array, damping: float = DEFAULT_DAMPING) -> Array:
    """``δ I``, ``δ = λ · mean(diag G')`` (``λ`` for a zero ``G'``)."""
    return damped(G_shift, damping) - G_shift


def svd_llm(W: Array, G: Array, k: int, damping: float = DEFAULT_DAMPING) -> LowRank:
    """Objective 2 (SVD-LLM): :func:`aa_svd` with ``G' = C = G``."""
    return aa_svd(W, G, G, k, damping)


def shifted_svd(W: Array, G_shift: Array, k: int, damping: float = DEFAULT_DAMPING) -> LowRank:
    """Objective 3 (shifted inputs only): :func:`svd_llm` on ``G'``."""
    return svd_llm(W, G_shift, k, damping)


def aa_svd(W: Array, G_shift: Array, C: Array, k: int, damping: float = DEFAULT_DAMPING) -> LowRank:
    """Objective 4 (anchored): :func:`whitened_svd` on ``(G' + δI, C + δI)``."""
    D = damping_shift(G_shift, damping)
    return whitened_svd(W, G_shift + D, C + D, k)


def anchored_target(W: Array, G_shift: Array, C: Array, damping: float = DEFAULT_DAMPING) -> Array:
    """``T = W C_δ G'_δ⁻¹`` (d_out, d_in): the anchored loss as a hessian objective (spec §7); two triangular solves
    with the Cholesky factor of ``G'_δ``."""
    xp = namespace_of(W)
    D = damping_shift(G_shift, damping)
    L = cholesky(G_shift + D)
    Y = xp.solve_triangular(L, (C + D).T @ W.T)  # L⁻¹ C_δᵀ Wᵀ
    return xp.solve_triangular(L, Y, trans=True).T  # (L Lᵀ)⁻¹ C_δᵀ Wᵀ, transposed


def solve_lowrank(
    objective: str,
    W: np.ndarray,
    k: int,
    G: np.ndarray | None = None,
    G_shift: np.ndarray | None = None,
    C: np.ndarray | None = None,
    damping: float = DEFAULT_DAMPING,
    *,
    library: str = "numpy",
    device: str | int | None = None,
    dtype: object = None,
    threads: int | None = None,
) -> LowRank:
    """The factors of ``objective`` (:data:`armor_ref.lowrank.OBJECTIVES`: ``svd``, ``svd-llm``, ``shifted``,
    ``aa-svd``) for layer ``W`` at rank ``k``, computed with ``library`` on ``device`` in ``dtype`` (default float64
    on the CPU, float32 on a GPU); NumPy arrays in (the Gram matrices the objective needs: ``G`` for svd-llm,
    ``G_shift`` for shifted, ``G_shift`` and ``C`` for aa-svd), float64 NumPy factors out."""
    xp = make_namespace(library, device, dtype)
    with limit_threads(threads), xp.scope():
        grams = [None if g is None else xp.asarray(np.asarray(g, dtype=np.float64)) for g in (G, G_shift, C)]
        W_x = xp.asarray(np.asarray(W, dtype=np.float64))
        if objective == "svd":
            result = plain_svd(W_x, k)
        elif objective == "svd-llm":
            result = svd_llm(W_x, grams[0], k, damping)
        elif objective == "shifted":
            result = shifted_svd(W_x, grams[1], k, damping)
        elif objective == "aa-svd":
            result = aa_svd(W_x, grams[1], grams[2], k, damping)
        else:
            raise ValueError(f"unknown low-rank objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
        return LowRank(xp.to_numpy(result.U), xp.to_numpy(result.V))
