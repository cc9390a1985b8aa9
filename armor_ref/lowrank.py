"""Low-rank layer objectives (AA-SVD, docs/aa-svd-spec.md §1–§5): the plain reference of four closed forms.

A layer ``y = W x``, ``W`` (d_out, d_in), is replaced by ``W' = U V`` with ``U`` (d_out, k) and ``V`` (k, d_in).
Rows of the activation matrices are tokens. ``X`` (N, d_in) are the layer's inputs in the original model, ``X'``
(N, d_in) its inputs on the same tokens in the partially compressed model. Every solver takes Gram matrices in
float64, all (d_in, d_in):

    G = XᵀX,    G' = X'ᵀX',    C = XᵀX'   (the cross Gram; not symmetric).

The four objectives, each minimised over all ``W'`` of rank ≤ k:

1. :func:`plain_svd`    ``‖W − W'‖²_F``
2. :func:`svd_llm`      ``‖X Wᵀ − X W'ᵀ‖²``    (original inputs)
3. :func:`shifted_svd`  ``‖X' Wᵀ − X' W'ᵀ‖²``  (shifted inputs only)
4. :func:`aa_svd`       ``‖X Wᵀ − X' W'ᵀ‖²``   (anchored: the compressed layer, fed what it will see, reproduces
   what the original layer produced from the original inputs)

Objectives 2–4 are one quadratic, ``ℓ(W') = tr(W' Q W'ᵀ) − 2 tr(W P W'ᵀ) + tr(W R Wᵀ)`` with ``(R, P, Q) =
(G, C, G')`` (objective 4), ``(G, G, G)`` (2) or ``(G', G', G')`` (3), and :func:`whitened_svd` minimises it in
closed form. **Damping**: each is solved with ``δ · I`` added to all three of ``R, P, Q``, ``δ = λ · mean(diag Q)``
(``λ = DEFAULT_DAMPING``, the hessian objective's rule): as if ``√δ · I`` were ``d_in`` extra calibration tokens
fed identically to both streams. The damped loss is ``ℓ(W') + δ ‖W − W'‖²_F`` — a ridge towards the original
weights, exactly the hessian objective's damping when ``X' = X`` (AA-SVD's public code instead adds
``(−λ_min + 10⁻³) · I`` to ``G'`` alone, and only when its Cholesky factorisation fails; see the spec).
Each ``*_loss`` function below evaluates the objective its solver minimises; ``damping=0`` gives the raw
output error.

The anchored loss is not tied to low rank: for any replacement ``Ŵ`` it is the hessian objective around the target
:func:`anchored_target` ``T = W C_δ G'_δ⁻¹`` with weight ``G'_δ``, up to a constant — which is how ARMOR uses it
(``armor-anchored``, spec §7).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import scipy.linalg

from .objectives import DEFAULT_DAMPING, damped

OBJECTIVES = ("svd", "svd-llm", "shifted", "aa-svd")


class LowRank(NamedTuple):
    """The two stored factors of a low-rank layer: ``W' = U V``, ``y = U (V x) + bias``."""

    U: np.ndarray  # (d_out, k)
    V: np.ndarray  # (k, d_in)

    @property
    def rank(self) -> int:
        return self.U.shape[1]

    def weight(self) -> np.ndarray:
        """``W' = U V`` (d_out, d_in)."""
        return self.U @ self.V


# ----------------------------------------------------------------------------------------------------------
# The rank rule
# ----------------------------------------------------------------------------------------------------------
def rank_for_ratio(ratio: float, d_out: int, d_in: int) -> int:
    """``k = ⌊ρ · d_out · d_in / (d_out + d_in)⌋``: the largest rank whose factors keep at most a fraction
    ``ρ`` of the layer's parameters, ``k (d_out + d_in) ≤ ρ d_out d_in``.

    ``ρ`` must lie in (0, 1]; ``ρ = 1`` keeps as many parameters as the dense layer (``k < min(d_out, d_in)``
    always). A product within 1e-9 of an integer counts as that integer, so that a decimal ``ρ`` such as 0.6 is
    not cut by one because of its binary rounding. Raises ``ValueError`` when ``ρ`` is outside (0, 1] or the
    layer is too small for even rank 1 at this ``ρ``.
    """
    if not (isinstance(ratio, (int, float)) and math.isfinite(ratio) and 0.0 < ratio <= 1.0):
        raise ValueError(f"parameter ratio {ratio!r} is outside (0, 1]; pass the fraction of parameters to keep")
    exact = ratio * d_out * d_in / (d_out + d_in)
    k = math.floor(exact + 1e-9)
    if k < 1:
        raise ValueError(
            f"ratio {ratio} keeps {ratio * d_out * d_in:.1f} parameters of a {d_out}×{d_in} layer, fewer than one "
            f"rank-1 term ({d_out + d_in}); raise the ratio to at least {(d_out + d_in) / (d_out * d_in):.4g}"
        )
    return k


def check_rank(k: int, d_out: int, d_in: int) -> None:
    if not 1 <= k <= min(d_out, d_in):
        raise ValueError(f"rank {k} is outside 1..{min(d_out, d_in)} for a {d_out}×{d_in} layer")


# ----------------------------------------------------------------------------------------------------------
# Objective 1, and the truncated SVD every objective ends with
# ----------------------------------------------------------------------------------------------------------
def truncated_factors(M: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``M_k = U_k Σ_k V_kᵀ`` (the rank-k truncated SVD of ``M``, d_out × d_in), split evenly:
    returns ``(U_k Σ_k^{1/2}, Σ_k^{1/2} V_kᵀ)`` of shapes (d_out, k) and (k, d_in)."""
    U, s, Vt = np.linalg.svd(M, full_matrices=False)  # U (d_out, r), s (r,), Vt (r, d_in), r = min(d_out, d_in)
    root = np.sqrt(s[:k])  # (k,)
    return U[:, :k] * root[None, :], root[:, None] * Vt[:k, :]


def plain_svd(W: np.ndarray, k: int) -> LowRank:
    """Objective 1: ``argmin_{rank W' ≤ k} ‖W − W'‖²_F = W_k``, the truncated SVD (Eckart–Young).

    ``U = U_k Σ_k^{1/2}`` (d_out, k), ``V = Σ_k^{1/2} V_kᵀ`` (k, d_in)."""
    W = np.asarray(W, dtype=np.float64)  # (d_out, d_in)
    check_rank(k, *W.shape)
    return LowRank(*truncated_factors(W, k))


def plain_svd_loss(W: np.ndarray, W_low: np.ndarray) -> float:
    """Objective 1's loss ``‖W − W'‖²_F``."""
    return float(np.sum((np.asarray(W, dtype=np.float64) - W_low) ** 2))


# ----------------------------------------------------------------------------------------------------------
# The common closed form of objectives 2–4
# ----------------------------------------------------------------------------------------------------------
def whitened_svd(W: np.ndarray, Q: np.ndarray, P: np.ndarray, k: int) -> LowRank:
    """``argmin_{rank W' ≤ k} tr(W' Q W'ᵀ) − 2 tr(W P W'ᵀ)`` for a positive definite ``Q``, in closed form.

    With the Cholesky factor ``Q = L Lᵀ`` (L lower triangular) the square completes:

        tr(W' Q W'ᵀ) − 2 tr(W P W'ᵀ) = ‖W' L − M‖²_F − ‖M‖²_F,      M = W P L⁻ᵀ   (d_out, d_in),

    and ``W' ↦ W' L`` maps the rank-≤k matrices onto themselves (``L`` is invertible), so by Eckart–Young the
    minimiser is ``W' L = M_k``: ``W' = M_k L⁻¹``. Stored as ``U = U_k Σ_k^{1/2}`` (d_out, k) and
    ``V = Σ_k^{1/2} V_kᵀ L⁻¹`` (k, d_in), with ``M_k = U_k Σ_k V_kᵀ``.
    Raises ``ValueError`` when ``Q`` is not positive definite (undamped, rank-deficient inputs).
    """
    W = np.asarray(W, dtype=np.float64)  # (d_out, d_in)
    check_rank(k, *W.shape)
    try:
        L = np.linalg.cholesky(Q)  # (d_in, d_in), lower, Q = L Lᵀ
    except np.linalg.LinAlgError:
        raise ValueError("the Gram matrix is not positive definite; solve with damping > 0") from None
    # M = W P L⁻ᵀ, i.e. Mᵀ = L⁻¹ (W P)ᵀ: one triangular solve
    M = scipy.linalg.solve_triangular(L, (W @ P).T, lower=True).T  # (d_out, d_in)
    U, V_white = truncated_factors(M, k)  # (d_out, k), (k, d_in): M_k = U V_white
    # V = V_white L⁻¹, i.e. Vᵀ = L⁻ᵀ V_whiteᵀ
    V = scipy.linalg.solve_triangular(L, V_white.T, lower=True, trans="T").T  # (k, d_in)
    return LowRank(U, V)


def damping_shift(G_shift: np.ndarray, damping: float = DEFAULT_DAMPING) -> np.ndarray:
    """``δ I`` with ``δ = λ · mean(diag G')`` (``λ = damping``; ``δ = λ`` for a zero ``G'``): the hessian
    objective's rule (:func:`armor_ref.objectives.damped`), sized on the Gram of the inputs the layer will see.

    Objectives 2–4 add this same ``δ I`` to ``G``, ``G'`` and ``C`` alike: that is ``√δ · I`` appended as ``d_in``
    extra tokens to both ``X`` and ``X'``, so the damped anchored loss ``‖X Wᵀ − X' W'ᵀ‖² + δ ‖W − W'‖²_F`` is
    still a least-squares loss, and with ``X' = X`` exactly the hessian objective's damped loss
    ``tr((W − W') (G + δI) (W − W')ᵀ)``."""
    return damped(G_shift, damping) - G_shift  # (d_in, d_in)


# ----------------------------------------------------------------------------------------------------------
# Objectives 2, 3, 4
# ----------------------------------------------------------------------------------------------------------
def svd_llm(W: np.ndarray, G: np.ndarray, k: int, damping: float = DEFAULT_DAMPING) -> LowRank:
    """Objective 2 (SVD-LLM, original inputs): ``argmin_{rank W' ≤ k} ‖X Wᵀ − X W'ᵀ‖² + δ ‖W − W'‖²_F``
    ``= tr((W − W') (G + δI) (W − W')ᵀ)``, ``δ = λ · mean(diag G)``.

    Objective 4 with ``X' = X`` (``G' = C = G``): ``G + δI = L Lᵀ``, ``M = W (G + δI) L⁻ᵀ = W L``,
    ``W' = M_k L⁻¹`` — SVD-LLM's truncation-aware whitening. ``G = XᵀX`` (d_in, d_in) float64."""
    return aa_svd(W, G, G, k, damping)


def shifted_svd(W: np.ndarray, G_shift: np.ndarray, k: int, damping: float = DEFAULT_DAMPING) -> LowRank:
    """Objective 3 (shifted inputs only): ``argmin_{rank W' ≤ k} ‖X' Wᵀ − X' W'ᵀ‖² + δ ‖W − W'‖²_F``.

    The same problem as objective 2 with ``G'`` in place of ``G``: fit the original weights on the inputs the
    layer will see, ignoring that those inputs have already drifted. ``G_shift = X'ᵀX'`` (d_in, d_in)."""
    return svd_llm(W, G_shift, k, damping)


def aa_svd(W: np.ndarray, G_shift: np.ndarray, C: np.ndarray, k: int, damping: float = DEFAULT_DAMPING) -> LowRank:
    """Objective 4 (AA-SVD, anchored): ``argmin_{rank W' ≤ k} ‖X Wᵀ − X' W'ᵀ‖² + δ ‖W − W'‖²_F``.

    Expanded, ``‖X Wᵀ − X' W'ᵀ‖² = tr(W' G' W'ᵀ) − 2 tr(W C W'ᵀ) + tr(W G Wᵀ)``; the last term does not depend on
    ``W'``, so only ``G'`` and ``C`` are needed. Closed form (:func:`whitened_svd` on the damped Grams,
    :func:`damping_shift`): ``G' + δI = L Lᵀ``, ``M = W (C + δI) L⁻ᵀ``, ``W' = M_k L⁻¹``.
    Shapes: ``W`` (d_out, d_in), ``G_shift = X'ᵀX'`` and ``C = XᵀX'`` (d_in, d_in) float64.
    """
    D = damping_shift(G_shift, damping)  # δ I (d_in, d_in)
    return whitened_svd(W, G_shift + D, C + D, k)


def anchored_loss(
    W: np.ndarray,
    W_low: np.ndarray,
    G: np.ndarray,
    G_shift: np.ndarray,
    C: np.ndarray,
    damping: float = DEFAULT_DAMPING,
) -> float:
    """Objective 4's loss, the one :func:`aa_svd` minimises:

        ‖X Wᵀ − X' W'ᵀ‖² + δ ‖W − W'‖²_F = tr(W G_δ Wᵀ) − 2 tr(W C_δ W'ᵀ) + tr(W' G'_δ W'ᵀ),

    where ``G_δ = G + δI`` and likewise ``G'_δ``, ``C_δ`` (``δ I`` from :func:`damping_shift`). ``damping=0``:
    the layer's raw output error against the original model. (The expanded form loses digits to cancellation
    when the loss is ≪ ``‖X Wᵀ‖²``.)"""
    W = np.asarray(W, dtype=np.float64)  # (d_out, d_in)
    W_low = np.asarray(W_low, dtype=np.float64)  # (d_out, d_in)
    D = damping_shift(G_shift, damping)  # δ I (d_in, d_in)
    fit = np.sum((W_low @ (G_shift + D)) * W_low)  # tr(W' G'_δ W'ᵀ)
    cross = np.sum((W @ (C + D)) * W_low)  # tr(W C_δ W'ᵀ)
    return float(np.sum((W @ (G + D)) * W) - 2.0 * cross + fit)


def anchored_target(W: np.ndarray, G_shift: np.ndarray, C: np.ndarray, damping: float = DEFAULT_DAMPING) -> np.ndarray:
    """The target ``T = W C_δ G'_δ⁻¹`` (d_out, d_in) of the anchored objective written as a hessian objective (spec §7):

        ‖X Wᵀ − X' Ŵᵀ‖² + δ ‖W − Ŵ‖²_F = tr((T − Ŵ) G'_δ (T − Ŵ)ᵀ) + tr(W G_δ Wᵀ) − tr(T G'_δ Tᵀ)

    for every ``Ŵ`` (expand: ``T G'_δ = W C_δ``), with ``G'_δ = G' + δI``, ``C_δ = C + δI`` (:func:`damping_shift`).
    The last two terms do not depend on ``Ŵ``: any method minimising the damped hessian objective
    ``tr((T − Ŵ) G'_δ (T − Ŵ)ᵀ)`` — ARMOR with ``proxy="hessian"`` on ``(T, G')``, whose damping is this very ``δ``
    — minimises the damped anchored loss. With ``X' = X`` (``C = G' = G``) the target is ``W``.
    Solved with the Cholesky factor of ``G'_δ``: ``Tᵀ = G'_δ⁻¹ C_δᵀ Wᵀ``."""
    W = np.asarray(W, dtype=np.float64)  # (d_out, d_in)
    D = damping_shift(G_shift, damping)  # δ I (d_in, d_in)
    factor = scipy.linalg.cho_factor(G_shift + D, lower=True)  # G'_δ = L Lᵀ
    return scipy.linalg.cho_solve(factor, (C + D).T @ W.T).T  # (d_out, d_in)


def output_loss(W: np.ndarray, W_low: np.ndarray, G: np.ndarray, damping: float = DEFAULT_DAMPING) -> float:
    """The loss of objectives 2 (``G = XᵀX``) and 3 (pass ``G' = X'ᵀX'``), the one :func:`svd_llm` and
    :func:`shifted_svd` minimise: ``tr((W − W') (G + δI) (W − W')ᵀ) = ‖X (W − W')ᵀ‖² + δ ‖W − W'‖²_F``,
    ``δ = λ · mean(diag G)``. Computed from the error directly (no cancellation); equal to
    ``anchored_loss(W, W', G, G, G, damping)``."""
    E = np.asarray(W, dtype=np.float64) - np.asarray(W_low, dtype=np.float64)  # (d_out, d_in)
    return float(np.sum((E @ damped(G, damping)) * E))


def solve_lowrank(
    objective: str,
    W: np.ndarray,
    k: int,
    G: np.ndarray | None = None,
    G_shift: np.ndarray | None = None,
    C: np.ndarray | None = None,
    damping: float = DEFAULT_DAMPING,
) -> LowRank:
    """The closed form of ``objective`` (one of :data:`OBJECTIVES`) at rank ``k``, given the Gram matrices it needs:
    none for ``svd``, ``G`` for ``svd-llm``, ``G_shift`` for ``shifted``, ``G_shift`` and ``C`` for ``aa-svd``."""
    if objective == "svd":
        return plain_svd(W, k)
    if objective == "svd-llm":
        return svd_llm(W, G, k, damping)
    if objective == "shifted":
        return shifted_svd(W, G_shift, k, damping)
    if objective == "aa-svd":
        return aa_svd(W, G_shift, C, k, damping)
    raise ValueError(f"unknown low-rank objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
