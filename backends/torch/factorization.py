"""ARMOR factorization ``Ŵ = A · (W' ⊙ M) · B`` in torch — mirrors :mod:`armor_ref.factorization` function by
function (same names, same order, same formulas), on CPU or CUDA, in float64 or float32.

Loss ``L = tr((T − A S B) H (T − A S B)ᵀ)`` (nowag: ``T = W̄``, ``H = diag(h)``; hessian: ``T = W``, damped Gram).
Shapes: ``A`` (R, b, b), ``B`` (K, b, b), ``S`` (d_out, d_in) dense and zero outside the bool 2:4 mask ``M``.

Same answers: the random stream is the reference's (a NumPy ``Generator`` seeded alike, drawn in the same order)
and the decision rules and tolerances are the reference's, so in float64 the masks and losses match it (up to
floating-point summation order, ~1e-12 relative). float32 keeps every guarantee up to float32 round-off
(the loss trace is non-increasing to ~1e-6 relative) but does not promise the reference's masks bit for bit:
a support change whose gain is below float32 resolution may go the other way.

Differences, for speed and memory only: the b×b and 2×2 pseudo-inverses are taken in float64 whatever the
working dtype; ``B H Bᵀ`` is formed from the blocks (no dense ``blockdiag(B)``); a diagonal ``H`` is kept as a
vector; the discrete step updates the groups of one position ``(p, g)`` with plain slices (:func:`update_position`)
and keeps ``L = Aᵀ G Bᵀ`` current instead of ``G`` (the same algebra, fewer products), where the reference uses
the fancy indexing of :func:`update_groups` (kept here for the Adam schedule's per-tile draws); small products are
written elementwise, cheaper than batched matmuls of 2×2 and 4×4 matrices. On the CPU the call runs with one
intra-op thread by default (see :func:`factorize`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from armor_ref.factorization import (
    CORE_CG_ITERATIONS,
    DEFAULT_BLOCK_SIZE,
    DEFAULT_INIT,
    DEFAULT_SWEEPS,
    DEFAULT_TOL,
    PINV_RTOL,
    SCHEDULES,
    ArmorResult,
    check_shapes,
)
from armor_ref.masks import GROUP

from .baselines import BASELINES, run_baseline
from .masks import SUPPORTS, has_two_per_group
from .objectives import DEFAULT_DAMPING, Problem, make_problem

_RIDGE = 1e-12  # relative eigenvalue cut-off of the pseudo-inverses (taken in float64)
#: relative tie tolerance of the discrete decision, per working dtype (the reference's 1e-12 in float64)
#: relative ridge of the core step's block-Jacobi preconditioner (the reference's 1e-10 in float64)
_PRECOND_RIDGE = {torch.float64: 1e-10, torch.float32: 1e-6}
_TIE_TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-6}


# ----------------------------------------------------------------------------------------------------------
# Block-diagonal algebra
# ----------------------------------------------------------------------------------------------------------
def blockdiag_left(A: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """``blockdiag(A) @ X`` for ``A`` (R, b, b) and ``X`` (R·b, n)."""
    R, b, _ = A.shape
    return (A @ X.reshape(R, b, -1)).reshape(R * b, -1)


def blockdiag_right(X: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``X @ blockdiag(B)`` for ``X`` (m, K·b) and ``B`` (K, b, b)."""
    K, b, _ = B.shape
    m = X.shape[0]
    return (X.reshape(m, K, b).transpose(0, 1) @ B).transpose(0, 1).reshape(m, K * b)


def blockdiag_dense(blocks: torch.Tensor) -> torch.Tensor:
    """The dense block-diagonal matrix of ``blocks`` (n, b, b)."""
    return torch.block_diag(*blocks.unbind(0))


def diagonal_blocks(problem: Problem, b: int) -> torch.Tensor:
    """The (K, b, b) diagonal blocks ``H_kk`` of the problem's ``H``."""
    if problem.H is None:
        return torch.diag_embed(problem.h.reshape(-1, b))
    K = problem.H.shape[0] // b
    return torch.stack([problem.H[k * b : (k + 1) * b, k * b : (k + 1) * b] for k in range(K)])


def reconstruct(A: torch.Tensor, S: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``Ŵ = blockdiag(A) · S · blockdiag(B)``."""
    return blockdiag_left(A, blockdiag_right(S, B))


def psd_pinv(M: torch.Tensor) -> torch.Tensor:
    """Pseudo-inverse of a batch of symmetric PSD matrices (..., n, n), in float64; eigenvalues below
    ``1e-12 · λ_max`` count as zero. Returned in the dtype of ``M``."""
    w, V = torch.linalg.eigh(M.to(torch.float64))
    cutoff = _RIDGE * torch.amax(torch.abs(w), dim=-1, keepdim=True)
    keep = w > cutoff
    inv_w = torch.where(keep, 1.0 / torch.where(keep, w, torch.ones_like(w)), torch.zeros_like(w))
    return ((V * inv_w[..., None, :]) @ V.transpose(-1, -2)).to(M.dtype)


def lstsq_pinv(M: torch.Tensor) -> torch.Tensor:
    """Batched Moore–Penrose pseudo-inverse by SVD, singular values below ``PINV_RTOL · σ_max`` dropped (the
    reference's ``np.linalg.pinv(M, rtol=PINV_RTOL)``); taken in float64."""
    return torch.linalg.pinv(M.to(torch.float64), rtol=PINV_RTOL).to(M.dtype)


# ----------------------------------------------------------------------------------------------------------
# State
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Factors:
    """The variables of the optimisation, in the problem's (possibly normalised) space."""

    A: torch.Tensor  # (R, b, b)
    B: torch.Tensor  # (K, b, b)
    S: torch.Tensor  # (d_out, d_in), contiguous, zero outside M
    M: torch.Tensor  # (d_out, d_in) bool, exactly 2 of every 4

    @property
    def block_size(self) -> int:
        return self.A.shape[1]

    def W_hat(self) -> torch.Tensor:
        return reconstruct(self.A, self.S, self.B)

    def copy(self) -> Factors:
        return Factors(self.A.clone(), self.B.clone(), self.S.clone(), self.M.clone())


# ----------------------------------------------------------------------------------------------------------
# The continuous steps (spec §5)
# ----------------------------------------------------------------------------------------------------------
def a_step(problem: Problem, f: Factors) -> None:
    """A-step: with ``P_r = S[rows r] B`` and ``H = F Fᵀ``, ``A_r += (E_r F)(P_r F)⁺`` (the least-squares form of
    ``A_r = T_r H P_rᵀ (P_r H P_rᵀ)⁻¹``, without squaring the condition number)."""
    R, b, _ = f.A.shape
    PF = problem.times_F(blockdiag_right(f.S, f.B)).reshape(R, b, -1)  # P_r F
    EF = problem.target_times_F.reshape(R, b, -1) - f.A @ PF  # E_r F
    f.A += EF @ lstsq_pinv(PF)


def b_step(problem: Problem, f: Factors) -> None:
    """B-step with ``Q_k = A S[:, cols k]`` and ``Q_k⁺`` by SVD. nowag: ``B_k = Q_k⁺ W̄[:, cols k]`` (all k at once);
    hessian: Gauss–Seidel ``ΔB_k = Q_k⁺ G[:, cols k] H_kk⁻¹``, ``G −= Q_k ΔB_k H[cols k, :]``."""
    K, b, _ = f.B.shape
    Q = blockdiag_left(f.A, f.S)
    Qk = Q.reshape(Q.shape[0], K, b).transpose(0, 1)  # (K, d_out, b)
    Qk_pinv = lstsq_pinv(Qk)  # (K, b, d_out)
    E = problem.target - blockdiag_right(Q, f.B)
    if problem.H is None:
        f.B += Qk_pinv @ E.reshape(E.shape[0], K, b).transpose(0, 1)
        return
    H = problem.H
    G = E @ H
    Hkk_pinv = psd_pinv(diagonal_blocks(problem, b))
    for k in range(K):
        cols = slice(k * b, (k + 1) * b)
        dB = Qk_pinv[k] @ G[:, cols] @ Hkk_pinv[k]
        f.B[k] += dB
        G -= (Qk[k] @ dB) @ H[cols, :]


def core_values_step(problem: Problem, f: Factors, max_iter: int = CORE_CG_ITERATIONS, rtol: float = 1e-10) -> None:
    """Core-values step: ``M ⊙ (AᵀA S (B H Bᵀ)) = M ⊙ (Aᵀ T H Bᵀ)`` by preconditioned CG from the current values,
    each step an exact line minimisation (the loss never increases). Preconditioner: for row ``i`` and column
    block ``k``, ``(AᵀA)_ii · C_kk[J, J]`` on the kept entries ``J`` (``C = B H Bᵀ``)."""
    A, B, M = f.A, f.B, f.M
    d_out, d_in = M.shape
    b = f.block_size
    K = d_in // b
    AtA = A.transpose(1, 2) @ A
    if problem.H is None:  # B D Bᵀ is block diagonal
        C_blocks = (B * problem.h.reshape(-1, 1, b)) @ B.transpose(1, 2)

        def times_C(X: torch.Tensor) -> torch.Tensor:
            return blockdiag_right(X, C_blocks)
    else:
        C = blockdiag_left(B, blockdiag_right(problem.H, B.transpose(1, 2)))  # B H Bᵀ
        C_blocks = torch.stack([C[k * b : (k + 1) * b, k * b : (k + 1) * b] for k in range(K)])

        def times_C(X: torch.Tensor) -> torch.Tensor:
            return X @ C

    Mf = M.to(A.dtype)

    def operator(X: torch.Tensor) -> torch.Tensor:  # M ⊙ (AᵀA X C)
        return Mf * times_C(blockdiag_left(AtA, X))

    # block-Jacobi preconditioner on the b/2 kept entries of each (row, column block)
    kept = torch.argsort((~M).reshape(d_out, K, b).to(torch.int8), dim=-1, stable=True)[..., : b // 2]
    C_kept = C_blocks[torch.arange(K, device=M.device)[None, :, None, None], kept[..., :, None], kept[..., None, :]]
    A_diag = torch.diagonal(AtA, dim1=1, dim2=2).reshape(d_out, 1, 1, 1)
    P = A_diag * C_kept  # (d_out, K, b/2, b/2), PSD
    del C_kept
    ridge = _PRECOND_RIDGE[P.dtype] * torch.diagonal(P, dim1=-2, dim2=-1).sum(-1)[..., None, None] / (b // 2) + 1e-300
    P += ridge * torch.eye(b // 2, dtype=P.dtype, device=P.device)
    P_inv = torch.linalg.inv(P)
    del P

    def precondition(X: torch.Tensor) -> torch.Tensor:
        X_kept = torch.gather(X.reshape(d_out, K, b), -1, kept)
        out = torch.zeros((d_out, K, b), dtype=X.dtype, device=X.device)
        out.scatter_(-1, kept, (P_inv @ X_kept[..., None])[..., 0])
        return out.reshape(d_out, d_in)

    rhs = Mf * blockdiag_right(blockdiag_left(A.transpose(1, 2), problem.target_times_H), B.transpose(1, 2))
    X = f.S * Mf
    residual = rhs - operator(X)  # = −½ masked gradient
    z = precondition(residual)
    direction = z.clone()
    rz = float(torch.sum(residual * z))
    rhs_norm = float(torch.linalg.vector_norm(rhs))
    for _ in range(max_iter):
        if rz <= 0 or float(torch.linalg.vector_norm(residual)) <= rtol * max(rhs_norm, 1e-300):
            break
        Ad = operator(direction)
        curvature = float(torch.sum(direction * Ad))
        if curvature <= 0:
            break
        alpha = float(torch.sum(residual * direction)) / curvature  # exact minimiser along the direction
        X.add_(direction, alpha=alpha)
        residual.sub_(Ad, alpha=alpha)
        z = precondition(residual)
        rz_new = float(torch.sum(residual * z))
        direction = z.add_(direction, alpha=rz_new / rz)
        rz = rz_new
    f.S.copy_(X)


# ----------------------------------------------------------------------------------------------------------
# The discrete step (spec §5)
# ----------------------------------------------------------------------------------------------------------
def _support_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``SUPPORTS`` flattened (12,), the support id of each 4-bit pattern (16,) and the 6 support masks (6, 4)."""
    supports = SUPPORTS.to(device)
    of_pattern = torch.full((16,), -1, dtype=torch.int64)
    masks = torch.zeros((len(SUPPORTS), GROUP), dtype=torch.bool)
    for sid, (p0, p1) in enumerate(SUPPORTS.tolist()):
        of_pattern[(1 << p0) | (1 << p1)] = sid
        masks[sid, [p0, p1]] = True
    return supports.reshape(-1), of_pattern.to(device), masks.to(device)


@dataclass
class GroupTables:
    """What the discrete step needs of ``B`` and ``H`` for the groups of column blocks ``ks`` (fixed during the
    step): ``BH[k] = B_k H_kk`` (nk, b, b), ``Q[k, g] = B_g H_kk B_gᵀ`` (nk, b/4, 4, 4), its 6 principal 2×2
    blocks ``Q_ss`` and their pseudo-inverses (nk, b/4, 6, 2, 2); plus the support index tables."""

    BH: torch.Tensor
    BHBt: torch.Tensor  # B_k H_kk B_kᵀ (nk, b, b); its rows g are B_g H_kk B_kᵀ
    Q: torch.Tensor
    Q_ss: torch.Tensor
    Q_ss_pinv: torch.Tensor
    supports_flat: torch.Tensor  # (12,)
    support_of_pattern: torch.Tensor  # (16,)
    support_masks: torch.Tensor  # (6, 4)

    def select(self, ks: slice) -> GroupTables:
        return GroupTables(
            self.BH[ks],
            self.BHBt[ks],
            self.Q[ks],
            self.Q_ss[ks],
            self.Q_ss_pinv[ks],
            self.supports_flat,
            self.support_of_pattern,
            self.support_masks,
        )


def group_tables(B_ks: torch.Tensor, H_kk: torch.Tensor) -> GroupTables:
    """Build :class:`GroupTables` from ``B_k`` (nk, b, b) and ``H_kk`` (nk, b, b)."""
    nk, b, _ = B_ks.shape
    BH = B_ks @ H_kk
    full = BH @ B_ks.transpose(1, 2)
    g = torch.arange(b // GROUP, device=B_ks.device)
    rows = GROUP * g[:, None] + torch.arange(GROUP, device=B_ks.device)  # (b/4, 4)
    Q = full[:, rows[:, :, None], rows[:, None, :]]  # (nk, b/4, 4, 4)
    sup = SUPPORTS.to(B_ks.device)
    Q_ss = Q[..., sup[:, :, None], sup[:, None, :]]  # (nk, b/4, 6, 2, 2)
    return GroupTables(BH, full, Q, Q_ss, psd_pinv(Q_ss), *_support_tables(B_ks.device))


def _matvec(M: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``M @ v`` over broadcast batches of small matrices (..., n, n) and vectors (..., n): written elementwise for
    a few thousand entries (least per-call overhead), by ``einsum`` beyond (no broadcast copies)."""
    if v.numel() <= 8192:
        return torch.sum(M * v[..., None, :], dim=-1)
    return torch.einsum("...ij,...j->...i", M, v)


def support_costs(
    Q_ss: torch.Tensor, Q_ss_pinv: torch.Tensor, ell: torch.Tensor, a_norm2: torch.Tensor, supports_flat: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each group and each of the 6 supports: ``u_s = Q_ss⁻¹ ℓ_s / ‖a‖²`` (..., 6, 2) and
    ``cost_s = φ(u_s) = ‖a‖² u_sᵀ Q_ss u_s − 2 u_sᵀ ℓ_s`` (..., 6), evaluated as the reference does.
    (Unlike the reference, ``u`` is returned on the support only, (..., 6, 2), not scattered to (..., 6, 4).)
    The small products go through :func:`_matvec`."""
    ell_s = ell[..., supports_flat].unflatten(-1, (-1, 2))  # (..., 6, 2)
    scale = torch.where(a_norm2 > 0, a_norm2, torch.ones_like(a_norm2))[..., None, None]
    u_s = _matvec(Q_ss_pinv, ell_s) / scale
    quad = torch.sum(_matvec(Q_ss, u_s) * u_s, dim=-1)
    cost = scale[..., 0] * quad - 2 * torch.sum(u_s * ell_s, dim=-1)
    return u_s, cost


def choose_supports(
    tables: GroupTables,
    Q: torch.Tensor,
    Q_ss: torch.Tensor,
    Q_ss_pinv: torch.Tensor,
    ell: torch.Tensor,
    a_norm2: torch.Tensor,
    s: torch.Tensor,
    m: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The discrete decision for groups with values ``s`` and mask ``m`` (..., 4): the cheapest support if strictly
    cheaper than the current one (tie: keep), values accepted only on a strict decrease of ``φ`` and never for
    ``a = 0``. Returns new values (..., 4), new mask (..., 4) and whether the support changed."""
    u_s, cost = support_costs(Q_ss, Q_ss_pinv, ell, a_norm2, tables.supports_flat)
    Qs = _matvec(Q, s)
    cost_now = a_norm2 * torch.sum(s * Qs, dim=-1) - 2 * torch.sum(s * ell, dim=-1)
    pattern = m[..., 0] + 2 * m[..., 1] + 4 * m[..., 2] + 8 * m[..., 3]
    current = tables.support_of_pattern[pattern]
    cost_current = torch.gather(cost, -1, current[..., None])[..., 0]
    best = torch.argmin(cost, dim=-1)
    tolerance = _TIE_TOLERANCE[cost.dtype] * (torch.abs(cost_current) + torch.abs(cost_now)) + 1e-300
    switch = torch.gather(cost, -1, best[..., None])[..., 0] < cost_current - tolerance
    chosen = torch.where(switch, best, current)
    cost_new = torch.gather(cost, -1, chosen[..., None])[..., 0]
    accept = (a_norm2 > 0) & (cost_new < cost_now)
    new_mask = tables.support_masks[chosen]  # (..., 4)
    u_chosen = torch.gather(u_s, -2, chosen[..., None, None].expand(*chosen.shape, 1, 2))[..., 0, :]  # (..., 2)
    u = torch.zeros_like(s).masked_scatter_(new_mask, u_chosen)  # kept positions in increasing order
    u_new = torch.where(accept[..., None], u, s)
    m_new = torch.where(accept[..., None], new_mask, m)
    return u_new, m_new, accept & switch


def group_ell_first_term(f: Factors, G: torch.Tensor) -> torch.Tensor:
    """``B_g G_rkᵀ a`` for every group at once: the entry block of ``Aᵀ G Bᵀ`` (= −½ ∂L/∂S)."""
    return blockdiag_right(blockdiag_left(f.A.transpose(1, 2), G), f.B.transpose(1, 2))


def improvable_groups(problem: Problem, f: Factors, ell_first: torch.Tensor, tables: GroupTables) -> torch.Tensor:
    """Which groups could strictly lower the loss by changing support, each judged alone at the current point.
    Takes ``ell_first = group_ell_first_term(f, G)`` (computed once by the caller, unlike the reference's ``G``).
    Returns bool (R, b, K, b/4)."""
    R, b, _ = f.A.shape
    K = f.B.shape[0]
    shape = (R, b, K, b // GROUP, GROUP)
    s = f.S.reshape(shape)
    m = f.M.reshape(shape)
    a_norm2 = torch.sum(f.A * f.A, dim=1)[:, :, None, None].expand(shape[:-1])
    Q = tables.Q
    ell = ell_first.reshape(shape) + a_norm2[..., None] * _matvec(Q, s)
    _, _, switch = choose_supports(tables, Q, tables.Q_ss, tables.Q_ss_pinv, ell, a_norm2, s, m)
    return switch


def update_groups(
    f: Factors, G_tiles: torch.Tensor, tables: GroupTables, ks: slice, p: torch.Tensor, g: torch.Tensor
) -> torch.Tensor:
    """Re-choose one group in each tile of row blocks ``0..R−1`` × column blocks ``ks``: row ``p[r, k]`` of the row
    block, columns ``4·g[r, k] … +3`` of the column block. ``G_tiles`` (R, nk, b, b) = ``(T − Ŵ) H`` on those
    tiles, kept current. ``ℓ = B_g G_rkᵀ a + ‖a‖² Q s``. Returns the number of support changes (a 0-d tensor)."""
    R, b, _ = f.A.shape
    K = f.B.shape[0]
    nk = G_tiles.shape[1]
    dev = f.A.device
    rr = torch.arange(R, device=dev)[:, None, None]
    kk = torch.arange(nk, device=dev)[None, :, None]
    cols = GROUP * g[..., None] + torch.arange(GROUP, device=dev)  # (R, nk, 4)
    S4 = f.S.view(R, b, K, b)[:, :, ks, :]
    M4 = f.M.view(R, b, K, b)[:, :, ks, :]

    a = f.A[rr[..., 0], :, p]  # (R, nk, b)
    a_norm2 = torch.sum(a * a, dim=-1)
    B_g = f.B[ks][kk, cols]  # (R, nk, 4, b)
    BgH = tables.BH[kk, cols]
    kg = (kk[..., 0], g)
    Q = tables.Q[kg]  # (R, nk, 4, 4)
    s = S4[rr, p[..., None], kk, cols]  # (R, nk, 4), a copy
    m = M4[rr, p[..., None], kk, cols]
    Gta = (a[..., None, :] @ G_tiles)[..., 0, :]  # G_rkᵀ a
    ell = (B_g @ Gta[..., None])[..., 0] + a_norm2[..., None] * (Q @ s[..., None])[..., 0]

    u_new, m_new, switched = choose_supports(tables, Q, tables.Q_ss[kg], tables.Q_ss_pinv[kg], ell, a_norm2, s, m)
    S4[rr, p[..., None], kk, cols] = u_new
    M4[rr, p[..., None], kk, cols] = m_new
    delta = u_new - s
    G_tiles -= a[..., :, None] * (delta[..., None, :] @ BgH)  # G_rk −= a ⊗ (δᵀ B_g H_kk)
    return torch.sum(switched)


def update_position(
    f: Factors,
    L_rows: torch.Tensor,
    tables: GroupTables,
    ks: slice,
    p: int,
    g: int,
    AtA: torch.Tensor,
    a_norm2_all: torch.Tensor,
) -> torch.Tensor:
    """:func:`update_groups` with the same position ``(p, g)`` in every tile (what the discrete step visits), by
    plain slicing, keeping ``L = Aᵀ G Bᵀ`` current instead of ``G = (T − Ŵ) H`` (same algebra, fewer products):
    its entry block is the first term of ``ℓ`` (:func:`group_ell_first_term`), so ``ℓ = L[r, p, k, g] + ‖a‖² Q s``;
    and ``G_rk −= a ⊗ (δᵀ B_g H_kk)`` becomes ``L_rk −= (A_rᵀ a) ⊗ (δᵀ B_g H_kk B_kᵀ)``.
    ``L_rows`` (R, b, nk·b) holds ``L`` on the tiles in row-block layout; ``AtA`` (R, b, b) = ``A_rᵀ A_r`` (column
    ``p`` is ``A_rᵀ a``) and ``a_norm2_all`` (R, b) its diagonal, ``‖a‖²``; both fixed during the step."""
    R, b, _ = f.A.shape
    K = f.B.shape[0]
    nk = ks.stop - ks.start
    S5 = f.S.view(R, b, K, b // GROUP, GROUP)[:, p, ks, g]  # (R, nk, 4) view
    M5 = f.M.view(R, b, K, b // GROUP, GROUP)[:, p, ks, g]
    a_norm2 = a_norm2_all[:, p, None].expand(R, nk)
    Q = tables.Q[:, g]  # (nk, 4, 4)
    s = S5.clone()
    m = M5.clone()
    ell = L_rows.view(R, b, nk, b // GROUP, GROUP)[:, p, :, g] + a_norm2[..., None] * torch.sum(Q * s[..., None, :], -1)

    u_new, m_new, switched = choose_supports(tables, Q, tables.Q_ss[:, g], tables.Q_ss_pinv[:, g], ell, a_norm2, s, m)
    S5.copy_(u_new)
    M5.copy_(m_new)
    delta = u_new - s  # (R, nk, 4)
    v = torch.sum(delta[..., :, None] * tables.BHBt[:, GROUP * g : GROUP * g + GROUP], dim=-2)  # (R, nk, b)
    L_rows.baddbmm_(AtA[:, :, p : p + 1], v.view(R, 1, nk * b), alpha=-1)
    return torch.sum(switched)


def discrete_step(problem: Problem, f: Factors, rng: np.random.Generator) -> int:
    """Re-choose 2:4 supports group by group: screen with :func:`improvable_groups`, then visit the positions
    ``(p, g)`` where some group can improve in a random order (the reference's ``rng.permutation``), in parallel
    only where groups cannot interact (nowag: one group per tile; hessian: one per row block, column block after
    column block, with ``G = (T − Ŵ) H`` brought up to date after each). Returns the number of support changes."""
    R, b, _ = f.A.shape
    K = f.B.shape[0]
    d_out = f.S.shape[0]
    nb = b // GROUP
    G = problem.times_H(problem.target - f.W_hat())
    tables = group_tables(f.B, diagonal_blocks(problem, b))
    ell_first = group_ell_first_term(f, G)  # Aᵀ G Bᵀ
    candidates = improvable_groups(problem, f, ell_first, tables)  # (R, b, K, b/4)
    # which positions (p, g) are worth visiting, per batch of column blocks: one transfer for all batches
    batches = [slice(0, K)] if problem.diagonal else [slice(k, k + 1) for k in range(K)]
    per_k = candidates.any(dim=0).permute(1, 0, 2).reshape(K, b * nb)  # (K, b·b/4)
    worth_all = [per_k[ks].any(dim=0) for ks in batches]
    worth_all = torch.stack(worth_all).cpu().numpy()
    AtA = f.A.transpose(1, 2) @ f.A  # column p = A_rᵀ a
    a_norm2_all = torch.sum(f.A * f.A, dim=1)  # (R, b) = ‖A_r[:, p]‖²
    changed = torch.zeros((), dtype=torch.int64, device=f.S.device)
    for ks, worth_visiting in zip(batches, worth_all, strict=True):
        nk = ks.stop - ks.start
        col_range = slice(ks.start * b, ks.stop * b)
        if not worth_visiting.any():
            continue
        S_before = f.S[:, col_range].clone() if not problem.diagonal else None
        if ks.start > 0:  # hessian: G has changed since the screening; Aᵀ G Bᵀ of this column block only
            ell_first = blockdiag_right(blockdiag_left(f.A.transpose(1, 2), G[:, col_range]), f.B[ks].transpose(1, 2))
            col_range_L = slice(0, b)
        else:
            col_range_L = col_range
        L_rows = ell_first[:, col_range_L].reshape(R, b, nk * b).clone()  # Aᵀ G Bᵀ on the batch, (R, b, nk·b)
        batch_tables = tables.select(ks)
        order = rng.permutation(b * nb)
        for flat in order[worth_visiting[order]].tolist():
            changed += update_position(f, L_rows, batch_tables, ks, flat // nb, flat % nb, AtA, a_norm2_all)
        if not problem.diagonal:  # carry the column block's change into G for the blocks still to come
            dE = -blockdiag_left(f.A, blockdiag_right(f.S[:, col_range] - S_before, f.B[ks]))
            G += dE.reshape(d_out, -1) @ problem.H[col_range, :]
    return int(changed)


# ----------------------------------------------------------------------------------------------------------
# The two schedules
# ----------------------------------------------------------------------------------------------------------
def initial_factors(problem: Problem, S_layer: torch.Tensor, M: torch.Tensor, block_size: int) -> Factors:
    """``A = I``, ``B = I`` and the baseline's core mapped into the problem's space (spec §4)."""
    d_out, d_in = S_layer.shape
    eye = torch.eye(block_size, dtype=S_layer.dtype, device=S_layer.device)
    A = eye.repeat(d_out // block_size, 1, 1)
    B = eye.repeat(d_in // block_size, 1, 1)
    return Factors(A, B, (problem.to_target_space(S_layer) * M).contiguous(), M.clone())


def run_bcd(
    problem: Problem,
    f: Factors,
    sweeps: int,
    tol: float,
    rng: np.random.Generator,
    on_sweep: Callable[[int, float], None] | None = None,
) -> tuple[list[dict], int]:
    """Sweeps of A-, B-, core-values and discrete steps, the loss recorded after every step; stops after ``sweeps``
    or when a sweep improves the loss by less than ``tol`` relative."""
    loss = problem.loss(f.W_hat())
    trace = [{"sweep": 0, "step": "init", "loss": loss}]
    steps: list[tuple[str, Callable[[], object]]] = [
        ("A", lambda: a_step(problem, f)),
        ("B", lambda: b_step(problem, f)),
        ("core", lambda: core_values_step(problem, f)),
        ("discrete", lambda: discrete_step(problem, f, rng)),
    ]
    done = 0
    for sweep in range(1, sweeps + 1):
        start_loss = loss
        for name, step in steps:
            saved = f.copy()
            step()
            new_loss = problem.loss(f.W_hat())
            if new_loss > loss:  # a rounding rise (see the reference): undo the step
                f.A, f.B, f.S, f.M = saved.A, saved.B, saved.S, saved.M
                trace.append({"sweep": sweep, "step": name, "loss": loss, "reverted": True, "rise": new_loss - loss})
                continue
            loss = new_loss
            trace.append({"sweep": sweep, "step": name, "loss": loss})
        done = sweep
        if on_sweep is not None:
            on_sweep(sweep, loss)
        if start_loss - loss <= tol * start_loss:
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
    """The paper's schedule: Adam on ``A``, ``B`` and the kept core values plus one discrete update per tile (nowag)
    or per row block (hessian, cycling over column blocks) per iteration, groups drawn by gradient L1 weight; returns
    the best iterate. Same formulas and the same random draws as the reference."""
    R, b, _ = f.A.shape
    K = f.B.shape[0]
    nb = b // GROUP
    params = [f.A, f.B, f.S]
    moments = [(torch.zeros_like(x), torch.zeros_like(x)) for x in params]
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    best = f.copy()
    best_loss = problem.loss(f.W_hat())
    trace = [{"sweep": 0, "step": "init", "loss": best_loss}]
    Hkk = diagonal_blocks(problem, b)
    Mf = f.M.to(f.S.dtype)
    since_best = 0
    done = 0
    for it in range(1, iterations + 1):
        G = problem.times_H(problem.target - f.W_hat())
        SB = blockdiag_right(f.S, f.B)
        AS = blockdiag_left(f.A, f.S)
        grad_A = -2 * torch.einsum("rid,rjd->rij", G.reshape(R, b, -1), SB.reshape(R, b, -1))
        grad_B = -2 * torch.einsum("dki,dkj->kij", AS.reshape(-1, K, b), G.reshape(-1, K, b))
        grad_S_full = -2 * blockdiag_right(blockdiag_left(f.A.transpose(1, 2), G), f.B.transpose(1, 2))
        for x, grad, (m1, m2) in zip(params, (grad_A, grad_B, grad_S_full * Mf), moments, strict=True):
            m1.mul_(beta1).add_((1 - beta1) * grad)
            m2.mul_(beta2).add_((1 - beta2) * grad * grad)
            x -= lr * (m1 / (1 - beta1**it)) / (torch.sqrt(m2 / (1 - beta2**it)) + eps)
        f.S *= Mf

        ks = slice(0, K) if problem.diagonal else slice(it % K, it % K + 1)
        nk = ks.stop - ks.start
        col_range = slice(ks.start * b, ks.stop * b)
        G = problem.times_H(problem.target - f.W_hat())
        weights = torch.abs(grad_S_full[:, col_range]).reshape(R, b, nk, nb, GROUP).sum(-1)
        weights = weights.permute(0, 2, 1, 3).reshape(R, nk, -1) + 1e-300
        cdf = torch.cumsum(weights, dim=-1)
        draws = torch.from_numpy(rng.random((R, nk, 1))).to(cdf) * cdf[..., -1:]
        flat = torch.clamp(torch.sum(cdf < draws, dim=-1), max=weights.shape[-1] - 1)
        G_tiles = G[:, col_range].reshape(R, b, nk, b).permute(0, 2, 1, 3).contiguous()
        update_groups(f, G_tiles, group_tables(f.B[ks], Hkk[ks]), ks, flat // nb, flat % nb)
        Mf = f.M.to(f.S.dtype)

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
def default_dtype(device: str | torch.device) -> torch.dtype:
    """float64 on the CPU (the reference's answers), float32 on CUDA (speed; see the module docstring)."""
    return torch.float64 if torch.device(device).type == "cpu" else torch.float32


@torch.inference_mode()
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
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    num_threads: int | None = None,
) -> ArmorResult:
    """:func:`armor_ref.factorization.factorize` on torch: NumPy arrays in, an ``ArmorResult`` of float64 NumPy
    arrays out. ``device`` ``cpu`` / ``cuda`` / ``cuda:N``; ``dtype`` the working precision (default
    :func:`default_dtype`). Nothing is kept on the device after the call returns.

    ``num_threads``: torch's intra-op CPU threads during the call (restored afterwards). Default 1 on the CPU: the
    work is mostly many small operations, where OpenMP threads cost more than they save (on a busy 2-core machine,
    10× more); pass a larger number for large layers on an idle many-core CPU.
    """
    device = torch.device(device)
    threads = num_threads or (1 if device.type == "cpu" else torch.get_num_threads())
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _factorize(
            W, gram, proxy, init, block_size, sweeps, tol, seed, schedule, damping, on_sweep, device, dtype
        )
    finally:
        torch.set_num_threads(previous)


def _factorize(
    W: np.ndarray,
    gram: np.ndarray,
    proxy: str,
    init: str | None,
    block_size: int,
    sweeps: int | None,
    tol: float,
    seed: int,
    schedule: str,
    damping: float,
    on_sweep: Callable[[int, float], None] | None,
    device: torch.device,
    dtype: torch.dtype | None,
) -> ArmorResult:
    W_np = np.asarray(W, dtype=np.float64)
    d_out, d_in = W_np.shape
    check_shapes(d_out, d_in, block_size)
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    init = init or DEFAULT_INIT[proxy]
    if init not in BASELINES:
        raise ValueError(f"unknown init {init!r}; choose one of {', '.join(BASELINES)}")
    sweeps = DEFAULT_SWEEPS[proxy] if sweeps is None else sweeps
    dtype = dtype or default_dtype(device)

    t0 = time.perf_counter()
    W_t = torch.from_numpy(W_np).to(device=device, dtype=dtype)
    gram_t = torch.from_numpy(np.asarray(gram, dtype=np.float64)).to(device=device, dtype=dtype)
    problem = make_problem(W_t, gram_t, proxy, damping)
    S0, M0 = run_baseline(init, W_t, gram_t)
    del gram_t
    assert has_two_per_group(M0)
    f = initial_factors(problem, S0, M0, block_size)
    del S0, M0
    rng = np.random.default_rng(seed)
    if schedule == "bcd":
        trace, done = run_bcd(problem, f, sweeps, tol, rng, on_sweep)
    else:
        trace, done, f = run_adam(problem, f, sweeps, rng, on_sweep=on_sweep)
    R, b = d_out // block_size, block_size
    A = f.A * problem.row_scale.reshape(R, b, 1)
    B = f.B * problem.col_scale.reshape(-1, 1, b)

    def to_np(x: torch.Tensor) -> np.ndarray:
        return x.detach().to(device="cpu", dtype=torch.float64 if x.is_floating_point() else x.dtype).numpy()

    return ArmorResult(
        A=to_np(A),
        B=to_np(B),
        S=to_np(f.S),
        M=to_np(f.M),
        proxy=proxy,
        init=init,
        schedule=schedule,
        baseline_loss=trace[0]["loss"],
        loss=problem.loss(f.W_hat()),
        trace=trace,
        sweeps=done,
        seconds=time.perf_counter() - t0,
    )
