"""ARMOR factorization ``Ŵ = A · (W' ⊙ M) · B``, fast: :mod:`armor_ref.factorization` written once over an array
namespace (:mod:`backends.xp`), so the same code runs on NumPy, torch (CPU, CUDA) and CuPy.

Loss ``L = tr((T − A S B) H (T − A S B)ᵀ)`` (nowag: ``T = W̄``, ``H = diag(h)``; hessian: ``T = W``, damped Gram).
Shapes: ``A`` (R, b, b), ``B`` (K, b, b), ``S`` (d_out, d_in) dense and zero outside the bool 2:4 mask ``M``;
``nb = b/4`` groups per block row.

Same decisions as the reference: the random stream is the reference's (a NumPy ``Generator`` on the host, the same
draws in the same order), and so are the screening, the batches, the tie rule, the acceptance test, the
preconditioned-CG core step and the pseudo-inverse cut-offs. In float64 the masks are the reference's and the
losses agree to rounding (the tests ask 1e-9 relative); float32 keeps every guarantee to float32 round-off.

What differs, for speed and memory only:

* the b×b and 2×2 pseudo-inverses are taken in float64 whatever the working dtype;
* a diagonal ``H`` is a vector; ``B H Bᵀ`` is formed from the blocks;
* the discrete step visits one position ``(p, g)`` of all row blocks at once with plain slices
  (:func:`walk_column_block`), keeping ``L = Aᵀ G Bᵀ`` current on the column block instead of ``G``, and the
  groups' supports as ids (0–5) rather than 4-bit masks; the 6 supports' costs and optimal values come from one
  small product with a per-group table (:class:`GroupTables` ``T``), built from ``P_s = Q_ss⁺`` and
  ``Z_s = P_s Q_ss P_s − 2 P_s``: ``φ(u_s) = ℓ_sᵀ Z_s ℓ_s / ‖a‖²`` is the reference's ``φ(u_s)``, exactly, for any
  pseudo-inverse;
* ``G = (T − Ŵ) H`` is kept current lazily (:func:`g_columns`): a column block reads its columns of ``G`` as
  ``G₀[:, k] + ΔE[:, :k] H[:k, k]`` from the change ``ΔE`` of the blocks before it, instead of a rank-b update of
  the whole matrix per column block (B-step and discrete step);
* the error ``E = T − Ŵ`` and ``G = E H`` behind each step's loss (:class:`Residual`) are handed to the next step,
  which would otherwise form ``E H`` again: the B-step's and the discrete step's ``G₀``, and the core step's first
  CG residual ``M ⊙ Aᵀ G Bᵀ`` (the reference: ``n − 𝕄S``, the same number up to rounding);
* the reference's fancy-indexed :func:`update_groups` is kept for the Adam schedule's per-tile draws only.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from armor_ref.factorization import (
    CORE_CG_ITERATIONS,
    CORE_CG_RTOL,
    DEFAULT_BLOCK_SIZE,
    DEFAULT_TOL,
    PINV_RTOL,
    PRECONDITIONER_RIDGE,
    PSD_PINV_CUTOFF,
    TIE_RTOL,
    TINY,
    ArmorResult,
    check_options,
)

from .baselines import run_baseline
from .masks import GROUP, SupportTables, has_two_per_group, support_tables
from .objectives import DEFAULT_DAMPING, Problem, make_problem
from .threads import limit_threads
from .xp import Array, Namespace, dtype_name, make_namespace

#: relative tie tolerance of the discrete decision and ridge of the core step's preconditioner per working dtype:
#: the reference's in float64, looser in float32 where its round-off is ~1e-7
TIE_TOLERANCE = {"float64": TIE_RTOL, "float32": 1e-6}
PRECONDITIONER_RIDGES = {"float64": PRECONDITIONER_RIDGE, "float32": 1e-6}
#: the environment variable that forces (1) or forbids (0) the fused discrete walk (:func:`column_block_walk`)
FUSED_WALK_ENV = "ARMOR_FUSED_WALK"


# ----------------------------------------------------------------------------------------------------------
# Block-diagonal algebra
# ----------------------------------------------------------------------------------------------------------
def blockdiag_left(A: Array, X: Array) -> Array:
    """``blockdiag(A) @ X`` for ``A`` (R, b, b) and ``X`` (R·b, n)."""
    R, b, _ = A.shape
    return (A @ X.reshape(R, b, -1)).reshape(R * b, -1)


def blockdiag_right(xp: Namespace, X: Array, B: Array) -> Array:
    """``X @ blockdiag(B)`` for ``X`` (m, K·b) and ``B`` (K, b, b)."""
    K, b, _ = B.shape
    m = X.shape[0]
    return xp.swapaxes(xp.swapaxes(X.reshape(m, K, b), 0, 1) @ B, 0, 1).reshape(m, K * b)


def transpose_blocks(xp: Namespace, blocks: Array) -> Array:
    """Each block transposed: (n, b, b) → (n, b, b)."""
    return xp.swapaxes(blocks, 1, 2)


def diagonal_blocks(problem: Problem, b: int) -> Array:
    """The (K, b, b) diagonal blocks ``H_kk`` of the problem's ``H``."""
    xp = problem.xp
    if problem.H is None:
        return problem.h.reshape(-1, b)[:, :, None] * xp.eye(b)[None]
    K = problem.H.shape[0] // b
    return xp.stack([problem.H[k * b : (k + 1) * b, k * b : (k + 1) * b] for k in range(K)])


def reconstruct(xp: Namespace, A: Array, S: Array, B: Array) -> Array:
    """``Ŵ = blockdiag(A) · S · blockdiag(B)``."""
    return blockdiag_left(A, blockdiag_right(xp, S, B))


def psd_pinv(xp: Namespace, M: Array, scale: Array | float = 0.0) -> Array:
    """Pseudo-inverse of a batch of symmetric PSD matrices (..., n, n), taken in float64; eigenvalues below
    ``PSD_PINV_CUTOFF · max(λ_max, scale)`` count as zero (``scale`` broadcast over the batch: the size ``M`` would
    have if nothing in it were dead). Returned in the dtype of ``M``."""
    w, V = xp.linalg.eigh(xp.astype(M, xp.float64))
    largest = xp.amax(xp.abs(w), axis=-1, keepdims=True)
    keep = w > PSD_PINV_CUTOFF * xp.where(largest > scale, largest, scale)
    inv_w = xp.where(keep, 1.0 / xp.where(keep, w, 1.0), 0.0)
    return xp.astype((V * inv_w[..., None, :]) @ xp.swapaxes(V, -1, -2), M.dtype)


def on_gpu(xp: Namespace) -> bool:
    """Whether ``xp`` computes on a GPU (CuPy, torch on CUDA)."""
    return xp.name == "cupy" or (xp.name == "torch" and xp.device.type == "cuda")


def lstsq_pinv(xp: Namespace, M: Array) -> Array:
    """Batched Moore–Penrose pseudo-inverse in float64, singular values ≤ ``PINV_RTOL · σ_max`` dropped (the
    reference's ``np.linalg.pinv(M, rtol=PINV_RTOL)``): by SVD on the CPU, by :func:`gram_pinv` on a GPU."""
    if on_gpu(xp):
        return gram_pinv(xp, M)
    U, sv, Vt = xp.linalg.svd(xp.astype(M, xp.float64), full_matrices=False)
    keep = sv > PINV_RTOL * sv[..., :1]  # singular values come sorted, largest first
    inv_s = xp.where(keep, 1.0 / xp.where(keep, sv, 1.0), 0.0)
    return xp.astype((xp.swapaxes(Vt, -1, -2) * inv_s[..., None, :]) @ xp.swapaxes(U, -1, -2), M.dtype)


def gram_pinv(xp: Namespace, M: Array) -> Array:
    """:func:`lstsq_pinv` of thin matrices (..., p, q) from the Gram matrix of the short side, in float64:
    ``M⁺ = Mᵀ (M Mᵀ)⁺`` (p ≤ q) or ``(Mᵀ M)⁺ Mᵀ``, eigenvalues ``λ = σ²`` ≤ ``PINV_RTOL² · λ_max`` dropped (the
    SVD's cut-off). One batched product and one batched ``min(p, q)``-square eigendecomposition (cuSOLVER's batched
    Jacobi up to 32), where a batched SVD of thin matrices is one solver call per matrix on CUDA (the A-step's
    ``R`` matrices b × d_in, the B-step's ``K`` matrices d_out × b). It squares the condition number, which float64
    absorbs: the directions kept have ``σ ≥ 1e-6 σ_max``, so ``κ² ≤ 1e12``."""
    M64 = xp.astype(M, xp.float64)
    Mt = xp.swapaxes(M64, -1, -2)
    wide = M.shape[-2] <= M.shape[-1]
    w, V = xp.linalg.eigh(M64 @ Mt if wide else Mt @ M64)
    keep = w > PINV_RTOL**2 * xp.amax(w, axis=-1, keepdims=True)
    inv_w = xp.where(keep, 1.0 / xp.where(keep, w, 1.0), 0.0)
    G_pinv = (V * inv_w[..., None, :]) @ xp.swapaxes(V, -1, -2)
    return xp.astype(Mt @ G_pinv if wide else G_pinv @ Mt, M.dtype)


def dot(X: Array, Y: Array) -> float:
    """``Σ_ij X_ij Y_ij`` (one BLAS dot product, no temporary)."""
    return float(X.reshape(-1) @ Y.reshape(-1))


def g_columns(G0: Array, dE: Array, H: Array, cols: slice) -> Array:
    """Columns ``cols`` of the current ``G = (T − Ŵ) H`` when ``Ŵ`` has changed by ``−dE`` on the columns before
    ``cols`` only (``dE`` is zero from ``cols.start`` on): ``G₀[:, cols] + dE[:, :start] H[:start, cols]``. This is
    how ``G`` is kept current lazily, a column block at a time."""
    start = cols.start
    if start == 0:
        return G0[:, cols]
    return G0[:, cols] + dE[:, :start] @ H[:start, cols]


# ----------------------------------------------------------------------------------------------------------
# State
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Factors:
    """The variables of the optimisation, in the problem's (possibly normalised) space."""

    xp: Namespace
    A: Array  # (R, b, b)
    B: Array  # (K, b, b)
    S: Array  # (d_out, d_in), contiguous, zero outside M
    M: Array  # (d_out, d_in) bool, exactly 2 of every 4

    @property
    def block_size(self) -> int:
        return self.A.shape[1]

    def W_hat(self) -> Array:
        return reconstruct(self.xp, self.A, self.S, self.B)

    def copy(self) -> Factors:
        xp = self.xp
        return Factors(xp, xp.copy(self.A), xp.copy(self.B), xp.copy(self.S), xp.copy(self.M))


@dataclass
class Residual:
    """The error at the current point and its product with ``H``: ``E = T − Ŵ``, ``G = E H`` (d_out, d_in) and the
    loss ``L = ⟨E, G⟩``. :func:`run_bcd` computes it once after each step, for the loss, and hands it to the next
    step, which would otherwise form the same product ``E H`` again (the B-step's ``G₀``, the core step's first
    residual ``M ⊙ Aᵀ G Bᵀ``, the discrete step's ``G₀``)."""

    E: Array
    G: Array
    loss: float


def residual_at(problem: Problem, f: Factors) -> Residual:
    """:class:`Residual` of the factors ``f`` (the loss exactly as :meth:`Problem.loss` computes it)."""
    E = problem.target - f.W_hat()
    G = problem.times_H(E)
    return Residual(E, G, dot(G, E))


# ----------------------------------------------------------------------------------------------------------
# The continuous steps (spec §5)
# ----------------------------------------------------------------------------------------------------------
def a_step(problem: Problem, f: Factors) -> None:
    """A-step: with ``P_r = S[rows r] B`` and ``H = F Fᵀ``, ``A_r += (E_r F)(P_r F)⁺`` (the least-squares form of
    ``A_r = T_r H P_rᵀ (P_r H P_rᵀ)⁻¹``, without squaring the condition number)."""
    xp = f.xp
    R, b, _ = f.A.shape
    PF = problem.times_F(blockdiag_right(xp, f.S, f.B)).reshape(R, b, -1)  # P_r F  (R, b, d_in)
    EF = problem.target_times_F.reshape(R, b, -1) - f.A @ PF  # E_r F
    f.A += EF @ lstsq_pinv(xp, PF)


def b_step(problem: Problem, f: Factors, at: Residual | None = None) -> None:
    """B-step with ``Q_k = A S[:, cols k]`` (d_out, b) and ``Q_k⁺`` by SVD. nowag: ``B_k += Q_k⁺ E[:, cols k]``, all k
    at once. hessian: Gauss–Seidel over k, ``ΔB_k = Q_k⁺ G[:, cols k] H_kk⁺``, with ``G = (T − Ŵ) H`` kept current
    lazily (:func:`g_columns`; ``Ŵ`` changes by ``Q_k ΔB_k`` on the columns of block k). ``at``: the
    :class:`Residual` at the current point, if the caller has it."""
    xp = f.xp
    K, b, _ = f.B.shape
    at = at if at is not None else residual_at(problem, f)
    Q = blockdiag_left(f.A, f.S)  # (d_out, d_in); Q[:, cols k] = Q_k
    Qk = xp.swapaxes(Q.reshape(Q.shape[0], K, b), 0, 1)  # (K, d_out, b)
    Qk_pinv = lstsq_pinv(xp, Qk)  # (K, b, d_out)
    if problem.H is None:
        f.B += Qk_pinv @ xp.swapaxes(at.E.reshape(at.E.shape[0], K, b), 0, 1)
        return
    H = problem.H
    G0 = at.G
    dE = xp.zeros(Q.shape, dtype=Q.dtype)  # −(change of Ŵ) on the blocks done so far
    Hkk_pinv = psd_pinv(xp, diagonal_blocks(problem, b))
    for k in range(K):
        cols = slice(k * b, (k + 1) * b)
        dB = Qk_pinv[k] @ g_columns(G0, dE, H, cols) @ Hkk_pinv[k]
        f.B[k] += dB
        dE[:, cols] = -(Qk[k] @ dB)


def core_values_step(
    problem: Problem,
    f: Factors,
    max_iter: int = CORE_CG_ITERATIONS,
    rtol: float = CORE_CG_RTOL,
    at: Residual | None = None,
) -> None:
    """Core-values step: ``M ⊙ (AᵀA S (B H Bᵀ)) = M ⊙ (Aᵀ T H Bᵀ)`` by preconditioned CG from the current values,
    each step an exact line minimisation (the loss never increases). Preconditioner: for row ``i`` and column
    block ``k``, ``(AᵀA)_ii · C_kk[J, J]`` on the kept entries ``J`` (``C = B H Bᵀ``). The first residual
    ``n − 𝕄S = M ⊙ (Aᵀ G Bᵀ)`` is read off the :class:`Residual` ``at`` (``G = (T − Ŵ) H``; computed if not given)
    instead of a product with ``C``."""
    xp = f.xp
    at = at if at is not None else residual_at(problem, f)
    A, B, M = f.A, f.B, f.M
    d_out, d_in = M.shape
    b = f.block_size
    K = d_in // b
    half = b // 2
    AtA = transpose_blocks(xp, A) @ A  # (R, b, b)
    Bt = transpose_blocks(xp, B)
    if problem.H is None:  # B D Bᵀ is block diagonal: (K, b, b)
        C_blocks = (B * problem.h.reshape(-1, 1, b)) @ Bt

        def times_C(X: Array) -> Array:
            return blockdiag_right(xp, X, C_blocks)
    else:
        C = blockdiag_left(B, blockdiag_right(xp, problem.H, Bt))  # B H Bᵀ (d_in, d_in)
        C_blocks = xp.stack([C[k * b : (k + 1) * b, k * b : (k + 1) * b] for k in range(K)])

        def times_C(X: Array) -> Array:
            return X @ C

    Mf = xp.astype(M, A.dtype)

    def operator(X: Array) -> Array:  # M ⊙ (AᵀA X C)
        return Mf * times_C(blockdiag_left(AtA, X))

    # block-Jacobi preconditioner on the b/2 kept entries of each (row, column block), increasing positions
    kept = xp.argsort_stable(xp.astype(~M.reshape(d_out, K, b), xp.int64))[..., :half]  # (d_out, K, b/2)
    P = C_blocks[xp.arange(K)[None, :, None, None], kept[..., :, None], kept[..., None, :]]  # C_kk[J, J]
    P *= xp.diagonal(AtA, 0, -2, -1).reshape(d_out, 1, 1, 1)  # (d_out, K, b/2, b/2), PSD, formed in place
    ridge = PRECONDITIONER_RIDGES[dtype_name(A.dtype)] * xp.diagonal(P, 0, -2, -1).sum(-1) / half + TINY
    P.reshape(d_out, K, half * half)[..., :: half + 1] += ridge[..., None]  # + ρ I, on the diagonal's view
    P_inv = xp.linalg.inv(P).reshape(-1, half, half)
    del P
    flat = (xp.arange(d_out * K)[:, None] * b + kept.reshape(-1, half)).reshape(-1)  # kept entries of S.reshape(-1)

    def precondition(X: Array) -> Array:
        out = xp.zeros(d_out * d_in, dtype=X.dtype)
        out[flat] = xp.einsum("nij,nj->ni", P_inv, X.reshape(-1)[flat].reshape(-1, half)).reshape(-1)
        return out.reshape(d_out, d_in)

    At = transpose_blocks(xp, A)
    rhs = Mf * blockdiag_right(xp, blockdiag_left(At, problem.target_times_H), Bt)
    X = f.S * Mf
    residual = Mf * blockdiag_right(xp, blockdiag_left(At, at.G), Bt)  # n − 𝕄X = −½ masked gradient
    z = precondition(residual)
    direction = xp.copy(z)
    rz = dot(residual, z)
    rhs_norm = dot(rhs, rhs) ** 0.5
    for _ in range(max_iter):
        if rz <= 0 or dot(residual, residual) ** 0.5 <= rtol * max(rhs_norm, TINY):
            break
        Ad = operator(direction)
        curvature = dot(direction, Ad)
        if curvature <= 0:
            break
        alpha = dot(residual, direction) / curvature  # exact minimiser along the direction
        X += alpha * direction
        residual -= alpha * Ad
        z = precondition(residual)
        rz_new = dot(residual, z)
        direction = z + (rz_new / rz) * direction
        rz = rz_new
    f.S[...] = X


# ----------------------------------------------------------------------------------------------------------
# The discrete step (spec §5)
# ----------------------------------------------------------------------------------------------------------
@dataclass
class GroupTables:
    """What the discrete step needs of ``B`` and ``H`` for the groups of a batch of column blocks (fixed while the
    step runs). For group ``g`` of column block ``k`` (rows ``4g … 4g+3`` of ``B_k``, ``B_g``), ``Q = B_g H_kk B_gᵀ``
    and, for each support ``s`` (2 of the 4 slots), ``P_s = (Q_ss)⁺`` the pseudo-inverse of its principal 2×2
    block and ``Z_s = P_s Q_ss P_s − 2 P_s``. Minimising ``φ(u) = ‖a‖² uᵀ Q u − 2 uᵀ ℓ`` on ``s`` gives
    ``u_s = P_s ℓ_s / ‖a‖²`` at cost ``φ(u_s) = ℓ_sᵀ Z_s ℓ_s / ‖a‖²`` (exactly, for any pseudo-inverse).

    * ``Q[k, g]`` (nk, b/4, 4, 4);
    * ``T[k, g]`` (nk, b/4, 30, 20): one matrix that maps ``x = (ℓ ⊗ ℓ, ℓ)`` (16 + 4) to the 6 costs times ``‖a‖²``
      (rows 0–5, ``Z_s`` spread over the 16 products) and the 6 value vectors ``‖a‖² u_s`` in the group's 4 slots
      (rows 6–29, ``P_s`` placed at the support's slots) — one small product per group;
    * ``z[k, g]`` (nk, b/4, 3, 6): ``Z_s``'s ``z₀₀``, ``z₀₁ + z₁₀``, ``z₁₁`` for the elementwise costs of the screening;
    * ``BH[k] = B_k H_kk`` and ``BHBt[k] = B_k H_kk B_kᵀ`` (nk, b, b): rows ``4g … 4g+3`` turn a change of a group's
      values into a change of ``G`` and of ``L = Aᵀ G Bᵀ``.

    Built in float64, kept in the working dtype."""

    supports: SupportTables  # the support lookup tables, on the same device
    Q: Array
    T: Array
    z: Array
    BH: Array
    BHBt: Array

    def select(self, ks: slice) -> GroupTables:
        return GroupTables(self.supports, self.Q[ks], self.T[ks], self.z[ks], self.BH[ks], self.BHBt[ks])


def group_tables(xp: Namespace, B_ks: Array, H_kk: Array) -> GroupTables:
    """Build :class:`GroupTables` from ``B_k`` (nk, b, b) and ``H_kk`` (nk, b, b)."""
    supports = support_tables(xp)
    nk, b, _ = B_ks.shape
    nb = b // GROUP
    BH = B_ks @ H_kk
    BHBt = BH @ transpose_blocks(xp, B_ks)  # group g is its g-th 4×4 diagonal block
    Q = xp.stack([BHBt[:, 4 * g : 4 * g + 4, 4 * g : 4 * g + 4] for g in range(nb)], axis=1)
    sup = supports.flat.reshape(-1, 2)
    Q_ss = xp.astype(Q[..., sup[:, :, None], sup[:, None, :]], xp.float64)  # (nk, b/4, 6, 2, 2)
    # what Q_g would hold if its channels were live: its largest row of B_g squared times the block's largest h
    h_max = xp.amax(xp.diagonal(H_kk, 0, -2, -1), axis=-1)  # (nk,)
    row_norm2 = xp.amax((B_ks * B_ks).sum(-1).reshape(nk, nb, GROUP), axis=-1)  # (nk, b/4)
    scale = xp.astype(row_norm2 * xp.where(h_max > 0, h_max, 0 * h_max)[:, None], xp.float64)
    P = psd_pinv(xp, Q_ss, scale[:, :, None, None])
    Z = P @ Q_ss @ P - 2 * P
    E, Et = supports.scatter, xp.swapaxes(supports.scatter, -1, -2)  # (6, 2, 4): slot t of support s → position
    T = xp.zeros((nk, nb, 30, 20), dtype=xp.float64)
    T[..., :6, :16] = (Et @ Z @ E).reshape(nk, nb, 6, 16)
    T[..., 6:, 16:] = (Et @ P @ E).reshape(nk, nb, 24, 4)
    z = xp.stack([Z[..., 0, 0], Z[..., 0, 1] + Z[..., 1, 0], Z[..., 1, 1]], axis=-2)
    return GroupTables(supports, Q, xp.astype(T, Q.dtype), xp.astype(z, Q.dtype), BH, BHBt)


def current_supports(supports: SupportTables, M: Array) -> Array:
    """The support id (0–5) of every group of a mask (..., 4) → (...)."""
    return supports.of_pattern[(M * supports.pattern_bits).sum(-1)]


def decide(
    xp: Namespace, tie: float, cost: Array, cost_now: Array, a_norm2: Array, current: Array
) -> tuple[Array, Array, Array]:
    """The discrete decision rule of the reference, for groups on support ``current`` (...) with support costs
    ``cost`` (..., 6) and current cost ``cost_now = φ(s)`` (...): the cheapest support is chosen only if strictly
    cheaper than the current support's optimum (by more than ``tie`` relative; on a tie the current one stays), and
    the new values are accepted only if ``φ`` decreases by more than the same margin, never for ``a = 0``. Returns
    the chosen support (...), whether it differs from the current one, and whether the new values are accepted."""
    cost_current = xp.pick(cost, current)
    best = cost.argmin(-1)
    best_cost = xp.pick(cost, best)
    margin = tie * (xp.abs(cost_current) + xp.abs(cost_now)) + TINY
    switch = best_cost < cost_current - margin
    accept = (a_norm2 > 0) & (xp.where(switch, best_cost, cost_current) < cost_now - margin)
    return xp.where(switch, best, current), switch, accept


def choose_supports(
    xp: Namespace, tie: float, T: Array, ell: Array, cost_now: Array, a_norm2: Array, s: Array, current: Array
) -> tuple[Array, Array, Array]:
    """Re-choose groups with values ``s`` (..., 4), support ``current`` (...) and ``ℓ`` (..., 4): the optimal values
    and cost of every support from the table ``T`` (:class:`GroupTables`, broadcast against the groups), then
    :func:`decide`. Returns the new values (..., 4), the new support ids (...) and whether the support changed."""
    scale = xp.where(a_norm2 > 0, a_norm2, 1.0)
    x = xp.concatenate([(ell[..., :, None] * ell[..., None, :]).reshape(*ell.shape[:-1], 16), ell], axis=-1)
    out = (T @ x[..., None])[..., 0]  # (..., 30): ‖a‖² · (6 costs | 6 value vectors of 4)
    chosen, switch, accept = decide(xp, tie, out[..., :6] / scale[..., None], cost_now, a_norm2, current)
    u = xp.pick(out[..., 6:].reshape(*ell.shape[:-1], 6, GROUP), chosen, axis=-2) / scale[..., None]
    u_new = xp.where(accept[..., None], u, s)
    return u_new, xp.where(accept, chosen, current), accept & switch


def improvable_groups(f: Factors, L: Array, tables: GroupTables, tie: float, a_norm2: Array) -> Array:
    """Which groups could strictly lower the loss by changing support, each judged alone at the current point
    (exact for a single-group change), from ``L = Aᵀ G Bᵀ`` (d_out, d_in): :func:`decide` on every group at once,
    the costs written elementwise, ``ℓ_sᵀ Z_s ℓ_s = z₀₀ ℓ₀² + (z₀₁ + z₁₀) ℓ₀ℓ₁ + z₁₁ ℓ₁²``. Returns bool
    (R, b, K, b/4): row block, row in block, column block, group in block."""
    xp = f.xp
    R, b, _ = f.A.shape
    K = f.B.shape[0]
    shape = (R, b, K, b // GROUP, GROUP)
    s = f.S.reshape(shape)
    first = L.reshape(shape)  # the first term of ℓ
    a2 = a_norm2[:, :, None, None]  # ‖A_r[:, i]‖², (R, b, 1, 1)
    ell = first + a2[..., None] * (tables.Q * s[..., None, :]).sum(-1)
    cost_now = -(s * (ell + first)).sum(-1)  # φ(s) = ‖a‖² sᵀQs − 2 sᵀℓ
    ell_s = ell[..., tables.supports.flat].reshape(*shape[:-1], 6, 2)
    l0, l1 = ell_s[..., 0], ell_s[..., 1]
    z = tables.z
    quad = z[..., 0, :] * l0 * l0 + z[..., 1, :] * l0 * l1 + z[..., 2, :] * l1 * l1  # ‖a‖² · cost, (..., 6)
    sid = current_supports(tables.supports, f.M.reshape(shape))
    _, switch, accept = decide(xp, tie, quad / xp.where(a2 > 0, a2, 1.0)[..., None], cost_now, a2, sid)
    return switch & accept


def walk_column_block(
    xp: Namespace,
    S_k: Array,
    M_k: Array,
    L_k: Array,
    AtA: Array,
    a_norm2: Array,
    tables: GroupTables,
    tie: float,
    positions: Sequence[int],
) -> Array:
    """Visit ``positions`` in order on a batch of ``nk`` column blocks that do not interact (hessian: one column
    block; nowag: all of them), re-choosing at each position ``(p, g) = divmod(flat, b/4)`` the group of every tile
    ``(r, k)``: row ``p`` of row block ``r``, columns ``4g … 4g+3`` of column block ``k``.

    Updated in place: ``S_k``, ``M_k`` (R, b, nk, b/4, 4), views of the core and the mask on the batch; ``L_k``
    (R, b, nk·b), ``L = Aᵀ G Bᵀ`` on the batch, kept current. Fixed during the walk: ``AtA`` (R, b, b) = ``A_rᵀ A_r``
    (column ``p`` is ``A_rᵀ a`` for ``a = A_r[:, p]``), ``a_norm2`` (R, b) its diagonal ``‖a‖²``, and the batch's
    ``tables``. At a group: ``ℓ = L[r, p, k, g] + ‖a‖² Q s`` (the residual with the group's own contribution added
    back, seen through ``a`` and ``B_g``), the decision is :func:`choose_supports`, and a change ``δ`` of the values
    moves ``Ŵ_T`` by ``a ⊗ (δᵀ B_g)``, so ``L_rk −= (A_rᵀ a) ⊗ (δᵀ B_g H_kk B_kᵀ)``. The walk keeps the groups'
    supports as ids (:func:`current_supports`) and writes the mask from them at the end. Returns the number of
    support changes (a 0-d array).

    This loop is the hot spot of a hessian sweep ((d_in/b) · b²/4 positions, each a few dozen small operations);
    on CUDA the fused Triton kernel :func:`backends.torch.discrete_kernel.walk_column_block_fused`, same signature
    and answers, walks a whole batch in one launch (:func:`column_block_walk` chooses).
    """
    R, b, nk, nb, _ = S_k.shape
    L5 = L_k.reshape(R, b, nk, nb, GROUP)
    supports = tables.supports
    sid_k = current_supports(supports, M_k)  # (R, b, nk, b/4)
    switched = []
    for flat in positions:
        p, g = divmod(flat, nb)
        s = S_k[:, p, :, g]  # (R, nk, 4), a view
        first = L5[:, p, :, g]
        a2 = a_norm2[:, p, None]  # (R, 1)
        ell = first + a2[..., None] * (tables.Q[:, g] @ s[..., None])[..., 0]
        cost_now = -(s * (ell + first)).sum(-1)  # φ(s) = ‖a‖² sᵀQs − 2 sᵀℓ
        u_new, sid_new, changed = choose_supports(xp, tie, tables.T[:, g], ell, cost_now, a2, s, sid_k[:, p, :, g])
        delta = u_new - s  # (R, nk, 4)
        S_k[:, p, :, g] = u_new
        sid_k[:, p, :, g] = sid_new
        switched.append(changed)
        v = delta[..., None, :] @ tables.BHBt[:, 4 * g : 4 * g + 4]  # δᵀ B_g H_kk B_kᵀ, (R, nk, 1, b)
        L_k -= AtA[:, :, p, None] * v.reshape(R, 1, nk * b)
    M_k[...] = supports.masks[sid_k]
    return xp.stack(switched).sum() if switched else xp.zeros((), dtype=xp.int64)


def column_block_walk(xp: Namespace) -> Callable[..., Array]:
    """The walk :func:`discrete_step` runs on each batch of column blocks: the fused Triton kernel
    (:func:`backends.torch.discrete_kernel.walk_column_block_fused`, one launch per batch, the same decisions) for
    torch on CUDA where triton is installed, :func:`walk_column_block` elsewhere. The environment variable
    ``ARMOR_FUSED_WALK`` overrides the choice for torch namespaces: ``1`` forces the kernel (on the CPU it then runs
    under Triton's interpreter, which must be switched on with ``TRITON_INTERPRET=1`` before triton is imported:
    how the tests check it without a GPU), ``0`` forbids it (the loop, e.g. to compare on a GPU)."""
    value = os.environ.get(FUSED_WALK_ENV, "")
    if value not in ("", "0", "1"):
        raise ValueError(f"{FUSED_WALK_ENV}={value!r}: use 1 (force the fused walk), 0 (never) or leave it unset")
    if xp.name != "torch" or value == "0" or (value == "" and xp.device.type != "cuda"):
        return walk_column_block
    from .torch import discrete_kernel

    if not discrete_kernel.available():
        if value == "1":
            raise RuntimeError(f"{FUSED_WALK_ENV}=1: the fused walk needs triton (pip install 'armor-ref[gpu]')")
        return walk_column_block
    return discrete_kernel.walk_column_block_fused


def discrete_step(problem: Problem, f: Factors, rng: np.random.Generator, at: Residual | None = None) -> int:
    """Re-choose 2:4 supports group by group (spec §5, the reference's ``discrete_step``): screen every group alone
    at the current point (:func:`improvable_groups`), then, batch after batch, visit the positions ``(p, g)`` where
    some group of the batch can improve, in the order of ``rng.permutation`` (drawn only for a batch with such a
    position), with :func:`walk_column_block` or its fused kernel (:func:`column_block_walk`). Batches: nowag, all
    column blocks at once (``H`` diagonal, so they do not interact); hessian, one column block after another, each
    reading its columns of ``G = (T − Ŵ) H`` current (:func:`g_columns`). ``G₀`` is the :class:`Residual` ``at``'s
    (computed if not given). Returns the number of support changes."""
    xp = f.xp
    R, b, _ = f.A.shape
    K = f.B.shape[0]
    nb = b // GROUP
    tie = TIE_TOLERANCE[dtype_name(f.S.dtype)]
    G0 = (at if at is not None else residual_at(problem, f)).G
    At, Bt = transpose_blocks(xp, f.A), transpose_blocks(xp, f.B)
    L = blockdiag_right(xp, blockdiag_left(At, G0), Bt)  # Aᵀ G Bᵀ (d_out, d_in), its entries are ℓ's first term
    tables = group_tables(xp, f.B, diagonal_blocks(problem, b))
    AtA = At @ f.A  # (R, b, b)
    a_norm2 = (f.A * f.A).sum(1)  # (R, b)
    S5 = f.S.reshape(R, b, K, nb, GROUP)  # views
    M5 = f.M.reshape(R, b, K, nb, GROUP)
    candidates = improvable_groups(f, L, tables, tie, a_norm2)  # (R, b, K, b/4)
    batches = [slice(0, K)] if problem.diagonal else [slice(k, k + 1) for k in range(K)]
    per_k = xp.swapaxes(candidates.any(0), 0, 1).reshape(K, b * nb)  # positions worth visiting, per column block
    worth = xp.to_numpy(xp.stack([per_k[ks].any(0) for ks in batches]))  # one transfer to the host
    dE = None if problem.diagonal else xp.zeros(f.S.shape, dtype=f.S.dtype)  # −(change of Ŵ) on blocks done
    changed = xp.zeros((), dtype=xp.int64)
    walk = column_block_walk(xp)
    moved = False  # whether Ŵ has changed since L was computed
    for ks, worth_visiting in zip(batches, worth, strict=True):
        if not worth_visiting.any():
            continue
        order = rng.permutation(b * nb)
        nk = ks.stop - ks.start
        cols = slice(ks.start * b, ks.stop * b)
        if not moved:
            L_k = xp.copy(L[:, cols])
        else:  # Ŵ has changed on earlier column blocks: this block's columns of G, then of Aᵀ G Bᵀ
            L_k = blockdiag_right(xp, blockdiag_left(At, g_columns(G0, dE, problem.H, cols)), Bt[ks])
        S_before = None if problem.diagonal else xp.copy(f.S[:, cols])
        changed += walk(
            xp,
            S5[:, :, ks],
            M5[:, :, ks],
            L_k.reshape(R, b, nk * b),
            AtA,
            a_norm2,
            tables.select(ks),
            tie,
            order[worth_visiting[order]].tolist(),
        )
        moved = True
        if not problem.diagonal:
            dE[:, cols] = -blockdiag_left(f.A, (f.S[:, cols] - S_before) @ f.B[ks.start])
    return int(changed)


def update_groups(f: Factors, G_tiles: Array, tables: GroupTables, ks: slice, p: Array, g: Array) -> Array:
    """Re-choose one group in each tile of row blocks ``0..R−1`` × column blocks ``ks``: row ``p[r, k]`` of the row
    block, columns ``4·g[r, k] … +3`` of the column block (the Adam schedule's per-tile draws; the reference's
    ``update_groups``). ``G_tiles`` (R, nk, b, b) = ``(T − Ŵ) H`` on those tiles, kept current:
    ``ℓ = B_g G_rkᵀ a + ‖a‖² Q s``, ``G_rk −= a ⊗ (δᵀ B_g H_kk)``. Returns the number of support changes."""
    xp = f.xp
    R, b, _ = f.A.shape
    K = f.B.shape[0]
    nk = G_tiles.shape[1]
    rr = xp.arange(R)[:, None, None]
    kk = xp.arange(nk)[None, :, None]
    cols = GROUP * g[..., None] + xp.arange(GROUP)  # (R, nk, 4) columns inside the block
    S4 = f.S.reshape(R, b, K, b)[:, :, ks, :]  # views
    M4 = f.M.reshape(R, b, K, b)[:, :, ks, :]
    a = f.A[rr[..., 0], :, p]  # (R, nk, b)
    a_norm2 = (a * a).sum(-1)  # (R, nk)
    B_g = f.B[ks][kk, cols]  # (R, nk, 4, b)
    BgH = tables.BH[kk, cols]  # (R, nk, 4, b)
    kg = (kk[..., 0], g)
    s = S4[rr, p[..., None], kk, cols]  # (R, nk, 4), a copy
    Gta = (a[..., None, :] @ G_tiles)[..., 0, :]  # G_rkᵀ a  (R, nk, b)
    first = (B_g @ Gta[..., None])[..., 0]  # B_g G_rkᵀ a
    ell = first + a_norm2[..., None] * (tables.Q[kg] @ s[..., None])[..., 0]
    cost_now = -(s * (ell + first)).sum(-1)  # φ(s) = ‖a‖² sᵀQs − 2 sᵀℓ
    tie = TIE_TOLERANCE[dtype_name(f.S.dtype)]
    current = current_supports(tables.supports, M4[rr, p[..., None], kk, cols])
    u_new, sid_new, switched = choose_supports(xp, tie, tables.T[kg], ell, cost_now, a_norm2, s, current)
    S4[rr, p[..., None], kk, cols] = u_new
    M4[rr, p[..., None], kk, cols] = tables.supports.masks[sid_new]
    delta = u_new - s
    G_tiles -= a[..., :, None] * (delta[..., None, :] @ BgH)  # G_rk −= a ⊗ (δᵀ B_g H_kk)
    return switched.sum()


# ----------------------------------------------------------------------------------------------------------
# The two schedules
# ----------------------------------------------------------------------------------------------------------
def initial_factors(problem: Problem, S_layer: Array, M: Array, block_size: int) -> Factors:
    """``A = I``, ``B = I`` and the baseline's core mapped into the problem's space (spec §4)."""
    xp = problem.xp
    d_out, d_in = S_layer.shape
    eye = xp.eye(block_size, dtype=S_layer.dtype)
    A = xp.tile(eye, (d_out // block_size, 1, 1))
    B = xp.tile(eye, (d_in // block_size, 1, 1))
    return Factors(xp, A, B, xp.copy(problem.to_target_space(S_layer) * M), xp.copy(M))


def run_bcd(
    problem: Problem,
    f: Factors,
    sweeps: int,
    tol: float,
    rng: np.random.Generator,
    on_sweep: Callable[[int, float], None] | None = None,
) -> tuple[list[dict], int]:
    """Sweeps of A-, B-, core-values and discrete steps, the loss recorded after every step; stops after ``sweeps``
    or when a sweep improves the loss by less than ``tol`` relative. The loss after each step comes with ``E`` and
    ``G = E H`` (:func:`residual_at`), which the next step takes instead of forming ``E H`` itself.

    A production safety net the reference does not need: a step whose computed loss rose (float32 on a GPU can
    round upwards near an exact fit) is undone and recorded as ``{"reverted": True, "rise": ...}``. In float64 on
    well-conditioned layers that never happens; the tests fail if it does."""
    at = residual_at(problem, f)
    trace = [{"sweep": 0, "step": "init", "loss": at.loss}]
    steps: list[tuple[str, Callable[[Residual], object]]] = [
        ("A", lambda _: a_step(problem, f)),
        ("B", lambda at: b_step(problem, f, at=at)),
        ("core", lambda at: core_values_step(problem, f, at=at)),
        ("discrete", lambda at: discrete_step(problem, f, rng, at=at)),
    ]
    done = 0
    for sweep in range(1, sweeps + 1):
        start_loss = at.loss
        for name, step in steps:
            saved = f.copy()
            step(at)
            new = residual_at(problem, f)
            if new.loss > at.loss:
                f.A, f.B, f.S, f.M = saved.A, saved.B, saved.S, saved.M
                trace.append(
                    {"sweep": sweep, "step": name, "loss": at.loss, "reverted": True, "rise": new.loss - at.loss}
                )
                continue
            at = new
            trace.append({"sweep": sweep, "step": name, "loss": at.loss})
        done = sweep
        if on_sweep is not None:
            on_sweep(sweep, at.loss)
        if start_loss - at.loss <= tol * start_loss:
            break
    return trace, done


def run_adam(
    problem: Problem,
    f: Factors,
    iterations: int,
    rng: np.random.Generator,
    lr: float = 1e-4,
    patience: int = 100,
    on_sweep: Callable[[int, float], None] | None = None,
) -> tuple[list[dict], int, Factors]:
    """The paper's schedule (the reference's ``run_adam``): Adam (``lr``) on ``A``, ``B`` and the kept core values,
    plus one discrete update per tile (nowag) or per row block (hessian, cycling over column blocks) per iteration,
    the group drawn with probability proportional to the L1 norm of the loss gradient over its 4 entries (the same
    host draws). Returns the best iterate seen; stops after ``patience`` iterations without improvement."""
    xp = f.xp
    R, b, _ = f.A.shape
    K = f.B.shape[0]
    nb = b // GROUP
    params = [f.A, f.B, f.S]
    moments = [(xp.zeros_like(x), xp.zeros_like(x)) for x in params]
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    best = f.copy()
    best_loss = problem.loss(f.W_hat())
    trace = [{"sweep": 0, "step": "init", "loss": best_loss}]
    Hkk = diagonal_blocks(problem, b)
    since_best = 0
    done = 0
    for it in range(1, iterations + 1):
        G = problem.times_H(problem.target - f.W_hat())  # dL/dŴ = −2 G
        SB = blockdiag_right(xp, f.S, f.B)
        AS = blockdiag_left(f.A, f.S)
        grad_A = -2 * xp.einsum("rid,rjd->rij", G.reshape(R, b, -1), SB.reshape(R, b, -1))
        grad_B = -2 * xp.einsum("dki,dkj->kij", AS.reshape(-1, K, b), G.reshape(-1, K, b))
        grad_S = -2 * blockdiag_right(xp, blockdiag_left(transpose_blocks(xp, f.A), G), transpose_blocks(xp, f.B))
        for x, grad, (m1, m2) in zip(params, (grad_A, grad_B, grad_S * f.M), moments, strict=True):
            m1 *= beta1
            m1 += (1 - beta1) * grad
            m2 *= beta2
            m2 += (1 - beta2) * grad * grad
            x -= lr * (m1 / (1 - beta1**it)) / (xp.sqrt(m2 / (1 - beta2**it)) + eps)
        f.S *= f.M

        # one discrete update per independent tile, group drawn by gradient L1 weight
        ks = slice(0, K) if problem.diagonal else slice(it % K, it % K + 1)
        nk = ks.stop - ks.start
        cols = slice(ks.start * b, ks.stop * b)
        G = problem.times_H(problem.target - f.W_hat())
        weights = xp.abs(grad_S[:, cols]).reshape(R, b, nk, nb, GROUP).sum(-1)
        weights = xp.permute(weights, (0, 2, 1, 3)).reshape(R, nk, -1) + TINY  # (R, nk, b·b/4)
        cdf = weights.cumsum(-1)
        draws = xp.asarray(rng.random((R, nk, 1)), dtype=cdf.dtype) * cdf[..., -1:]
        flat = (cdf < draws).sum(-1)
        flat = xp.where(flat < weights.shape[-1] - 1, flat, weights.shape[-1] - 1)
        G_tiles = xp.copy(xp.permute(G[:, cols].reshape(R, b, nk, b), (0, 2, 1, 3)))
        tables = group_tables(xp, f.B[ks], Hkk[ks])
        update_groups(f, G_tiles, tables, ks, flat // nb, flat % nb)

        loss = problem.loss(f.W_hat())
        trace.append({"sweep": it, "step": "adam", "loss": loss})
        done = it
        if loss < best_loss:
            best, best_loss, since_best = f.copy(), loss, 0
        else:
            since_best += 1
        if on_sweep is not None:
            on_sweep(it, loss)
        if since_best >= patience:
            break
    return trace, done, best


# ----------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------
def factorize(
    W: np.ndarray,
    gram: np.ndarray,
    proxy: str = "nowag",
    init: str | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    sweeps: int | None = None,
    tol: float = DEFAULT_TOL,
    seed: int = 0,
    schedule: str = "bcd",
    damping: float = DEFAULT_DAMPING,
    on_sweep: Callable[[int, float], None] | None = None,
    *,
    library: str = "numpy",
    device: str | int | None = None,
    dtype: object = None,
    threads: int | None = None,
) -> ArmorResult:
    """:func:`armor_ref.factorization.factorize`, fast: NumPy arrays in, an ``ArmorResult`` of float64 NumPy arrays
    out, computed with ``library`` (``numpy``, ``torch``, ``cupy``) on ``device`` (torch: ``cpu``, ``cuda``,
    ``cuda:N``; CuPy: a device number) in ``dtype`` (``float64``/``float32``, a NumPy or torch dtype or its name;
    default float64 on the CPU, float32 on a GPU). Nothing stays on the device after the call.

    ``threads``: BLAS and torch intra-op threads during the call (:func:`backends.threads.limit_threads`); ``None``
    takes the count of an enclosing ``limit_threads`` block, or else :func:`backends.threads.default_threads`.
    """
    W = np.asarray(W, dtype=np.float64)
    gram = np.asarray(gram, dtype=np.float64)
    d_out, d_in = W.shape
    init, sweeps = check_options(W, gram, proxy, init, block_size, sweeps, tol, schedule)
    xp = make_namespace(library, device, dtype)  # imports the library before the thread limits are set
    with limit_threads(threads), xp.scope():
        t0 = time.perf_counter()
        W_x = xp.asarray(W)
        gram_x = xp.asarray(gram)
        problem = make_problem(W_x, gram_x, proxy, damping)
        S0, M0 = run_baseline(init, W_x, gram_x)
        del gram_x
        assert has_two_per_group(M0)
        f = initial_factors(problem, S0, M0, block_size)
        del S0, M0
        rng = np.random.default_rng(seed)
        if schedule == "bcd":
            trace, done = run_bcd(problem, f, sweeps, tol, rng, on_sweep)
        else:
            trace, done, f = run_adam(problem, f, sweeps, rng, on_sweep=on_sweep)
        R, b = d_out // block_size, block_size
        return ArmorResult(
            A=xp.to_numpy(f.A * problem.row_scale.reshape(R, b, 1)),
            B=xp.to_numpy(f.B * problem.col_scale.reshape(-1, 1, b)),
            S=xp.to_numpy(f.S),
            M=xp.to_numpy(f.M),
            proxy=proxy,
            init=init,
            schedule=schedule,
            baseline_loss=trace[0]["loss"],
            loss=problem.loss(f.W_hat()),
            trace=trace,
            sweeps=done,
            seconds=time.perf_counter() - t0,
        )
