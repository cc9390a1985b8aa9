"""ARMOR on CuPy — the reference (:mod:`armor_ref.objectives`, :mod:`armor_ref.baselines`,
:mod:`armor_ref.factorization`) with ``np`` replaced by ``xp``, the array module of the data.

Same names, same order and same formulas as the reference; where the reference calls something CuPy lacks or
treats differently, the replacement is noted: the 2:4 selection ranks entries by comparison instead of a stable
``argsort`` (same result, ties to the lower column); SparseGPT inverts ``H`` with ``xp.linalg.inv`` and takes the
upper factor as the transpose of a lower Cholesky factor (no SciPy); module constants are moved to the data's
device. The random stream is the reference's (NumPy ``Generator`` on the host, same draws in the same order).
float64 by default for NumPy arrays (the stand-in reproduces the reference), float32 on the GPU; ``dtype`` picks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

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
from armor_ref.masks import GROUP, KEEP, SUPPORTS
from armor_ref.objectives import DEFAULT_DAMPING

from .xp import array_module, to_numpy

BASELINES = ("magnitude", "wanda", "nowag-p", "sparsegpt")
_RIDGE = 1e-12
_TIE = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 1e-6}
_PRECOND_RIDGE = {np.dtype(np.float64): 1e-10, np.dtype(np.float32): 1e-6}

_SUPPORT_OF_PATTERN = np.full(16, -1, dtype=np.int64)
for _sid, (_p0, _p1) in enumerate(SUPPORTS):
    _SUPPORT_OF_PATTERN[(1 << _p0) | (1 << _p1)] = _sid
_SUPPORT_MASKS = np.zeros((len(SUPPORTS), GROUP), dtype=bool)
_SUPPORT_MASKS[np.arange(len(SUPPORTS))[:, None], SUPPORTS] = True


def _const(xp: ModuleType, a: np.ndarray) -> Any:
    return xp.asarray(a)


# ----------------------------------------------------------------------------------------------------------
# masks and objectives
# ----------------------------------------------------------------------------------------------------------
def select_2of4(scores: Any) -> Any:
    """Keep the 2 largest scores of every aligned group of 4 (ties to the lower column), by rank counting:
    entry ``j`` is kept when fewer than 2 entries beat it (``s_i > s_j``, or ``s_i == s_j`` with ``i < j``)."""
    xp = array_module(scores)
    d_out, d_in = scores.shape
    g = scores.reshape(d_out, d_in // GROUP, GROUP)
    si, sj = g[..., :, None], g[..., None, :]  # (…, i, j)
    lower = _const(xp, np.tri(GROUP, k=-1, dtype=bool).T)  # [i, j] = i < j
    beats = (si > sj) | ((si == sj) & lower)
    return (beats.sum(axis=-2) < KEEP).reshape(d_out, d_in)


def has_two_per_group(mask: Any) -> bool:
    d_out, d_in = mask.shape
    return d_in % GROUP == 0 and bool((mask.reshape(d_out, -1, GROUP).sum(axis=-1) == KEEP).all())


def nowag_normalization(W: Any) -> tuple[Any, Any, Any]:
    """``(W̄, r, c)``: columns, then rows, to unit norm (zero norms → 1)."""
    xp = array_module(W)
    c = xp.linalg.norm(W, axis=0)
    c = xp.where(c > 0, c, 1.0)
    W1 = W / c[None, :]
    r = xp.linalg.norm(W1, axis=1)
    r = xp.where(r > 0, r, 1.0)
    return W1 / r[:, None], r, c


@dataclass
class Problem:
    """``L = tr((T − Ŵ_T) H (T − Ŵ_T)ᵀ)``; ``H`` is ``None`` when diagonal (nowag: ``h`` only)."""

    proxy: str
    target: Any
    h: Any
    H: Any | None
    row_scale: Any
    col_scale: Any
    target_times_H: Any
    H_factor: Any  # F with H = F Fᵀ: √h (a vector) for nowag, the lower Cholesky factor for hessian
    target_times_F: Any

    @property
    def diagonal(self) -> bool:
        return self.H is None

    def times_H(self, X: Any) -> Any:
        return X * self.h[None, :] if self.H is None else X @ self.H

    def times_F(self, X: Any) -> Any:
        return X * self.H_factor[None, :] if self.H is None else X @ self.H_factor

    def loss(self, W_hat_T: Any) -> float:
        E = self.target - W_hat_T
        if self.H is None:
            return float((self.h[None, :] * E * E).sum())
        return float(((E @ self.H) * E).sum())

    def to_target_space(self, W_hat: Any) -> Any:
        return W_hat / self.row_scale[:, None] / self.col_scale[None, :]


def make_problem(W: Any, gram: Any, proxy: str, damping: float = DEFAULT_DAMPING) -> Problem:
    xp = array_module(W)
    if proxy == "nowag":
        W_bar, r, c = nowag_normalization(W)
        h = xp.diag(gram).copy()
        F = xp.sqrt(xp.maximum(h, 0.0))
        return Problem("nowag", W_bar, h, None, r, c, W_bar * h[None, :], F, W_bar * F[None, :])
    if proxy == "hessian":
        mean_h = float(xp.mean(xp.diag(gram)))
        H = gram + damping * (mean_h if mean_h > 0 else 1.0) * xp.eye(gram.shape[0], dtype=gram.dtype)
        ones_out, ones_in = xp.ones(W.shape[0], dtype=W.dtype), xp.ones(W.shape[1], dtype=W.dtype)
        F = xp.linalg.cholesky(H)
        return Problem("hessian", W, xp.diag(H).copy(), H, ones_out, ones_in, W @ H, F, W @ F)
    raise ValueError(f"unknown proxy {proxy!r}")


# ----------------------------------------------------------------------------------------------------------
# baselines
# ----------------------------------------------------------------------------------------------------------
def prune_sparsegpt(W: Any, gram: Any, block_size: int = 128, damping: float = DEFAULT_DAMPING) -> tuple[Any, Any]:
    """SparseGPT 2:4 (as the reference): OBS updates with ``U`` upper, ``H⁻¹ = Uᵀ U``; blocks of 128."""
    xp = array_module(W)
    W = W.copy()
    H = gram.copy()
    d_out, d_in = W.shape
    dead = xp.diag(H) == 0
    idx = xp.arange(d_in)
    H[idx[dead], idx[dead]] = 1.0
    W[:, dead] = 0.0
    H += damping * xp.mean(xp.diag(H)) * xp.eye(d_in, dtype=H.dtype)
    H_inv = xp.linalg.inv(H)
    U = xp.linalg.cholesky((H_inv + H_inv.T) / 2).T  # upper: H⁻¹ = Uᵀ U
    mask = xp.zeros((d_out, d_in), dtype=bool)
    for start in range(0, d_in, block_size):
        stop = min(start + block_size, d_in)
        W_blk = W[:, start:stop].copy()
        errors = xp.zeros_like(W_blk)
        U_blk = U[start:stop, start:stop]
        d = xp.diag(U_blk)
        for j in range(stop - start):
            if j % GROUP == 0:
                saliency = W_blk[:, j : j + GROUP] ** 2 / d[j : j + GROUP][None, :] ** 2
                mask[:, start + j : start + j + GROUP] = select_2of4(saliency)
            w = W_blk[:, j]
            q = xp.where(mask[:, start + j], w, 0.0)
            e = (w - q) / U_blk[j, j]
            W_blk[:, j:] -= xp.outer(e, U_blk[j, j:])
            W_blk[:, j] = q
            errors[:, j] = e
        W[:, start:stop] = W_blk
        W[:, stop:] -= errors @ U[start:stop, stop:]
    return W * mask, mask


def run_baseline(name: str, W: Any, gram: Any) -> tuple[Any, Any]:
    xp = array_module(W)
    h = xp.maximum(xp.diag(gram), 0.0)
    if name == "magnitude":
        mask = select_2of4(xp.abs(W))
    elif name == "wanda":
        mask = select_2of4(xp.abs(W) * xp.sqrt(h)[None, :])
    elif name == "nowag-p":
        mask = select_2of4(nowag_normalization(W)[0] ** 2 * h[None, :])
    elif name == "sparsegpt":
        return prune_sparsegpt(W, gram)
    else:
        raise ValueError(f"unknown baseline {name!r}; choose one of {', '.join(BASELINES)}")
    return W * mask, mask


# ----------------------------------------------------------------------------------------------------------
# Block-diagonal algebra
# ----------------------------------------------------------------------------------------------------------
def blockdiag_left(A: Any, X: Any) -> Any:
    R, b, _ = A.shape
    return (A @ X.reshape(R, b, -1)).reshape(R * b, -1)


def blockdiag_right(X: Any, B: Any) -> Any:
    K, b, _ = B.shape
    m = X.shape[0]
    return (X.reshape(m, K, b).transpose(1, 0, 2) @ B).transpose(1, 0, 2).reshape(m, K * b)


def diagonal_blocks(problem: Problem, b: int) -> Any:
    xp = array_module(problem.h)
    if problem.H is None:
        hb = problem.h.reshape(-1, b)
        return hb[:, :, None] * xp.eye(b, dtype=hb.dtype)[None]
    K = problem.H.shape[0] // b
    return xp.stack([problem.H[k * b : (k + 1) * b, k * b : (k + 1) * b] for k in range(K)])


def reconstruct(A: Any, S: Any, B: Any) -> Any:
    return blockdiag_left(A, blockdiag_right(S, B))


def psd_pinv(M: Any) -> Any:
    """Pseudo-inverse of symmetric PSD matrices (..., n, n), eigenvalues below ``1e-12 · λ_max`` dropped (float64)."""
    xp = array_module(M)
    w, V = xp.linalg.eigh(M.astype(xp.float64))
    cutoff = _RIDGE * xp.max(xp.abs(w), axis=-1, keepdims=True)
    inv_w = xp.where(w > cutoff, 1.0 / xp.where(w > cutoff, w, 1.0), 0.0)
    return ((V * inv_w[..., None, :]) @ xp.swapaxes(V, -1, -2)).astype(M.dtype)


def lstsq_pinv(M: Any) -> Any:
    """Batched pseudo-inverse by SVD, singular values ≤ ``PINV_RTOL · σ_max`` dropped (float64)."""
    xp = array_module(M)
    U, sv, Vt = xp.linalg.svd(M.astype(xp.float64), full_matrices=False)
    keep = sv > PINV_RTOL * sv[..., :1]
    inv_s = xp.where(keep, 1.0 / xp.where(keep, sv, 1.0), 0.0)
    return ((xp.swapaxes(Vt, -1, -2) * inv_s[..., None, :]) @ xp.swapaxes(U, -1, -2)).astype(M.dtype)


@dataclass
class Factors:
    A: Any
    B: Any
    S: Any
    M: Any

    def W_hat(self) -> Any:
        return reconstruct(self.A, self.S, self.B)

    def copy(self) -> Factors:
        return Factors(self.A.copy(), self.B.copy(), self.S.copy(), self.M.copy())


# ----------------------------------------------------------------------------------------------------------
# The continuous steps (spec §5)
# ----------------------------------------------------------------------------------------------------------
def a_step(problem: Problem, f: Factors) -> None:
    """``A_r += (E_r F)(P_r F)⁺`` with ``H = F Fᵀ``, ``P_r = S[rows r] B``, ``E_r = T_r − A_r P_r``."""
    R, b, _ = f.A.shape
    PF = problem.times_F(blockdiag_right(f.S, f.B)).reshape(R, b, -1)
    EF = problem.target_times_F.reshape(R, b, -1) - f.A @ PF
    f.A += EF @ lstsq_pinv(PF)


def b_step(problem: Problem, f: Factors) -> None:
    """nowag: ``B_k += Q_k⁺ E_k``; hessian: Gauss–Seidel ``ΔB_k = Q_k⁺ G_k H_kk⁺`` (``Q_k⁺`` by SVD)."""
    K, b, _ = f.B.shape
    Q = blockdiag_left(f.A, f.S)
    Qk = Q.reshape(Q.shape[0], K, b).transpose(1, 0, 2)
    Qk_pinv = lstsq_pinv(Qk)
    E = problem.target - blockdiag_right(Q, f.B)
    if problem.diagonal:
        f.B += Qk_pinv @ E.reshape(E.shape[0], K, b).transpose(1, 0, 2)
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
    """``M ⊙ (AᵀA S (B H Bᵀ)) = M ⊙ (Aᵀ T H Bᵀ)`` by block-Jacobi preconditioned CG with exact line steps."""
    xp = array_module(f.A)
    A, B, M = f.A, f.B, f.M
    d_out, d_in = M.shape
    b = A.shape[1]
    K = d_in // b
    AtA = xp.swapaxes(A, 1, 2) @ A
    if problem.diagonal:
        C_blocks = (B * problem.h.reshape(-1, 1, b)) @ xp.swapaxes(B, 1, 2)

        def times_C(X: Any) -> Any:
            return blockdiag_right(X, C_blocks)
    else:
        C = blockdiag_left(B, blockdiag_right(problem.H, xp.swapaxes(B, 1, 2)))
        C_blocks = xp.stack([C[k * b : (k + 1) * b, k * b : (k + 1) * b] for k in range(K)])

        def times_C(X: Any) -> Any:
            return X @ C

    def operator(X: Any) -> Any:
        return M * times_C(blockdiag_left(AtA, X))

    kept = xp.nonzero(M.reshape(d_out, K, b))[2].reshape(d_out, K, b // 2)
    C_kept = C_blocks[xp.arange(K)[None, :, None, None], kept[..., :, None], kept[..., None, :]]
    A_diag = xp.einsum("rii->ri", AtA).reshape(d_out, 1, 1, 1)
    P = A_diag * C_kept
    del C_kept
    ridge = _PRECOND_RIDGE[P.dtype] * xp.einsum("...ii->...", P)[..., None, None] / (b // 2) + 1e-300
    P_inv = xp.linalg.inv(P + ridge * xp.eye(b // 2, dtype=P.dtype))
    del P
    rows, blocks = xp.arange(d_out)[:, None, None], xp.arange(K)[None, :, None]

    def precondition(X: Any) -> Any:
        out = xp.zeros((d_out, K, b), dtype=X.dtype)
        X_kept = X.reshape(d_out, K, b)[rows, blocks, kept]
        out[rows, blocks, kept] = xp.einsum("rkij,rkj->rki", P_inv, X_kept)
        return out.reshape(d_out, d_in)

    rhs = M * blockdiag_right(blockdiag_left(xp.swapaxes(A, 1, 2), problem.target_times_H), xp.swapaxes(B, 1, 2))
    X = f.S * M
    residual = rhs - operator(X)
    z = precondition(residual)
    direction = z.copy()
    rz = float((residual * z).sum())
    rhs_norm = float(xp.linalg.norm(rhs))
    for _ in range(max_iter):
        if rz <= 0 or float(xp.linalg.norm(residual)) <= rtol * max(rhs_norm, 1e-300):
            break
        Ad = operator(direction)
        curvature = float((direction * Ad).sum())
        if curvature <= 0:
            break
        alpha = float((residual * direction).sum()) / curvature
        X += alpha * direction
        residual -= alpha * Ad
        z = precondition(residual)
        rz_new = float((residual * z).sum())
        direction = z + (rz_new / rz) * direction
        rz = rz_new
    f.S[:] = X


# ----------------------------------------------------------------------------------------------------------
# The discrete step (spec §5)
# ----------------------------------------------------------------------------------------------------------
@dataclass
class GroupTables:
    BH: Any
    Q: Any
    Q_ss: Any
    Q_ss_pinv: Any


def group_tables(B_ks: Any, H_kk: Any) -> GroupTables:
    xp = array_module(B_ks)
    nk, b, _ = B_ks.shape
    BH = B_ks @ H_kk
    full = BH @ xp.swapaxes(B_ks, 1, 2)
    g = np.arange(b // GROUP)
    rows = _const(xp, GROUP * g[:, None] + np.arange(GROUP))
    Q = full[:, rows[:, :, None], rows[:, None, :]]
    sup = _const(xp, SUPPORTS)
    Q_ss = Q[..., sup[:, :, None], sup[:, None, :]]
    return GroupTables(BH, Q, Q_ss, psd_pinv(Q_ss))


def support_costs(Q: Any, Q_ss: Any, Q_ss_pinv: Any, ell: Any, a_norm2: Any) -> tuple[Any, Any]:
    """``u_s = Q_ss⁺ ℓ_s / ‖a‖²``, ``cost_s = φ(u_s)``; ``u`` (..., 6, 4), ``cost`` (..., 6)."""
    xp = array_module(ell)
    sup = _const(xp, SUPPORTS)
    ell_s = ell[..., sup]
    scale = xp.where(a_norm2 > 0, a_norm2, 1.0)[..., None, None]
    u_s = xp.einsum("...ij,...j->...i", Q_ss_pinv, ell_s) / scale
    cost = scale[..., 0] * xp.einsum("...i,...ij,...j->...", u_s, Q_ss, u_s) - 2 * (u_s * ell_s).sum(axis=-1)
    u = xp.zeros(ell.shape[:-1] + (len(SUPPORTS), GROUP), dtype=ell.dtype)
    u[..., _const(xp, np.arange(len(SUPPORTS))[:, None]), sup] = u_s
    return u, cost


def choose_supports(Q: Any, Q_ss: Any, Q_ss_pinv: Any, ell: Any, a_norm2: Any, s: Any, m: Any) -> tuple[Any, Any, Any]:
    """Cheapest support if strictly cheaper than the current (tie: keep); accepted on a strict decrease, a ≠ 0."""
    xp = array_module(ell)
    u, cost = support_costs(Q, Q_ss, Q_ss_pinv, ell, a_norm2)
    Qs = xp.einsum("...gh,...h->...g", Q, s)
    cost_now = a_norm2 * (s * Qs).sum(axis=-1) - 2 * (s * ell).sum(axis=-1)
    pattern = m[..., 0] + 2 * m[..., 1].astype(np.int64) + 4 * m[..., 2] + 8 * m[..., 3]
    current = _const(xp, _SUPPORT_OF_PATTERN)[pattern]
    cost_current = xp.take_along_axis(cost, current[..., None], axis=-1)[..., 0]
    best = xp.argmin(cost, axis=-1)
    tolerance = _TIE[cost.dtype] * (xp.abs(cost_current) + xp.abs(cost_now)) + 1e-300
    switch = xp.take_along_axis(cost, best[..., None], axis=-1)[..., 0] < cost_current - tolerance
    chosen = xp.where(switch, best, current)
    cost_new = xp.take_along_axis(cost, chosen[..., None], axis=-1)[..., 0]
    accept = (a_norm2 > 0) & (cost_new < cost_now)
    u_new = xp.where(accept[..., None], xp.take_along_axis(u, chosen[..., None, None], axis=-2)[..., 0, :], s)
    m_new = xp.where(accept[..., None], _const(xp, _SUPPORT_MASKS)[chosen], m)
    return u_new, m_new, accept & switch


def group_ell_first_term(f: Factors, G: Any) -> Any:
    xp = array_module(G)
    return blockdiag_right(blockdiag_left(xp.swapaxes(f.A, 1, 2), G), xp.swapaxes(f.B, 1, 2))


def improvable_groups(problem: Problem, f: Factors, G: Any, tables: GroupTables) -> Any:
    xp = array_module(G)
    R, b, _ = f.A.shape
    K = f.B.shape[0]
    shape = (R, b, K, b // GROUP, GROUP)
    s = f.S.reshape(shape)
    m = f.M.reshape(shape)
    a_norm2 = xp.broadcast_to((f.A * f.A).sum(axis=1)[:, :, None, None], shape[:-1])
    Q = tables.Q[None, None]
    ell = group_ell_first_term(f, G).reshape(shape) + a_norm2[..., None] * xp.einsum("...gh,...h->...g", Q, s)
    _, _, switch = choose_supports(Q, tables.Q_ss[None, None], tables.Q_ss_pinv[None, None], ell, a_norm2, s, m)
    return switch


def update_groups(f: Factors, G_tiles: Any, tables: GroupTables, ks: slice, p: Any, g: Any) -> int:
    """One group per tile (row blocks × column blocks ``ks``): row ``p[r, k]``, columns ``4 g[r, k] … +3``."""
    xp = array_module(G_tiles)
    R, b, _ = f.A.shape
    K = f.B.shape[0]
    nk = G_tiles.shape[1]
    rr = xp.arange(R)[:, None, None]
    kk = xp.arange(nk)[None, :, None]
    cols = GROUP * g[..., None] + xp.arange(GROUP)
    S4 = f.S.reshape(R, b, K, b)[:, :, ks, :]
    M4 = f.M.reshape(R, b, K, b)[:, :, ks, :]
    a = f.A[rr[..., 0], :, p]
    a_norm2 = (a * a).sum(axis=-1)
    B_g = f.B[ks][kk, cols]
    BgH = tables.BH[kk, cols]
    kg = (kk[..., 0], g)
    Q = tables.Q[kg]
    s = S4[rr, p[..., None], kk, cols]
    m = M4[rr, p[..., None], kk, cols]
    Gta = xp.einsum("rkij,rki->rkj", G_tiles, a)
    ell = xp.einsum("rkgj,rkj->rkg", B_g, Gta) + a_norm2[..., None] * xp.einsum("rkgh,rkh->rkg", Q, s)
    u_new, m_new, switched = choose_supports(Q, tables.Q_ss[kg], tables.Q_ss_pinv[kg], ell, a_norm2, s, m)
    S4[rr, p[..., None], kk, cols] = u_new
    M4[rr, p[..., None], kk, cols] = m_new
    delta = u_new - s
    G_tiles -= a[..., :, None] * xp.einsum("rkg,rkgj->rkj", delta, BgH)[..., None, :]
    return switched


def discrete_step(problem: Problem, f: Factors, rng: np.random.Generator) -> int:
    """Screen with :func:`improvable_groups`, then visit the positions worth visiting in the reference's order."""
    xp = array_module(f.A)
    R, b, _ = f.A.shape
    K = f.B.shape[0]
    d_out = f.S.shape[0]
    G = problem.times_H(problem.target - f.W_hat())
    tables = group_tables(f.B, diagonal_blocks(problem, b))
    candidates = improvable_groups(problem, f, G, tables)
    batches = [slice(0, K)] if problem.diagonal else [slice(k, k + 1) for k in range(K)]
    per_k = to_numpy(candidates.any(axis=0).transpose(1, 0, 2).reshape(K, -1))  # one transfer
    changed = xp.zeros((), dtype=xp.int64)
    for ks in batches:
        nk = ks.stop - ks.start
        col_range = slice(ks.start * b, ks.stop * b)
        worth_visiting = per_k[ks].any(axis=0)
        if not worth_visiting.any():
            continue
        S_before = f.S[:, col_range].copy()
        G_tiles = G[:, col_range].reshape(R, b, nk, b).transpose(0, 2, 1, 3).copy()
        batch_tables = GroupTables(tables.BH[ks], tables.Q[ks], tables.Q_ss[ks], tables.Q_ss_pinv[ks])
        for flat in rng.permutation(b * (b // GROUP)):
            if worth_visiting[flat]:
                p = xp.full((R, nk), flat // (b // GROUP))
                g = xp.full((R, nk), flat % (b // GROUP))
                changed += update_groups(f, G_tiles, batch_tables, ks, p, g).sum()
        if not problem.diagonal:
            dE = -blockdiag_left(f.A, blockdiag_right(f.S[:, col_range] - S_before, f.B[ks]))
            G += dE.reshape(d_out, -1) @ problem.H[col_range, :]
    return int(changed)


# ----------------------------------------------------------------------------------------------------------
# Schedule and entry point (the BCD schedule; the paper's Adam schedule is in the reference and the torch backend)
# ----------------------------------------------------------------------------------------------------------
def run_bcd(
    problem: Problem,
    f: Factors,
    sweeps: int,
    tol: float,
    rng: np.random.Generator,
    on_sweep: Callable[[int, float], None] | None = None,
) -> tuple[list[dict], int]:
    loss = problem.loss(f.W_hat())
    trace = [{"sweep": 0, "step": "init", "loss": loss}]
    steps = [
        ("A", a_step),
        ("B", b_step),
        ("core", core_values_step),
        ("discrete", lambda p, x: discrete_step(p, x, rng)),
    ]
    done = 0
    for sweep in range(1, sweeps + 1):
        start_loss = loss
        for name, step in steps:
            saved = f.copy()
            step(problem, f)
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
    device: int | None = 0,
    dtype: str | None = None,
) -> ArmorResult:
    """:func:`armor_ref.factorization.factorize` on CuPy (GPU ``device``), NumPy in, NumPy out. ``device=None`` runs
    the same code on NumPy arrays (the CPU stand-in the tests use). ``dtype``: ``"float32"`` (GPU default) or
    ``"float64"`` (stand-in default). Only the ``bcd`` schedule."""
    W = np.asarray(W, dtype=np.float64)
    d_out, d_in = W.shape
    check_shapes(d_out, d_in, block_size)
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if schedule != "bcd":
        raise ValueError("the cupy backend runs the bcd schedule only; use --backend numpy or torch for adam")
    init = init or DEFAULT_INIT[proxy]
    if init not in BASELINES:
        raise ValueError(f"unknown init {init!r}; choose one of {', '.join(BASELINES)}")
    sweeps = DEFAULT_SWEEPS[proxy] if sweeps is None else sweeps
    if device is None:
        xp, dtype = np, np.dtype(dtype or "float64")
        return _factorize(xp, W, gram, proxy, init, block_size, sweeps, tol, seed, damping, on_sweep, dtype)
    import cupy

    with cupy.cuda.Device(device):
        return _factorize(
            cupy, W, gram, proxy, init, block_size, sweeps, tol, seed, damping, on_sweep, np.dtype(dtype or "float32")
        )


def _factorize(
    xp: ModuleType,
    W: np.ndarray,
    gram: np.ndarray,
    proxy: str,
    init: str,
    block_size: int,
    sweeps: int,
    tol: float,
    seed: int,
    damping: float,
    on_sweep: Callable[[int, float], None] | None,
    dtype: np.dtype,
) -> ArmorResult:
    t0 = time.perf_counter()
    W_x = xp.asarray(W, dtype=dtype)
    gram_x = xp.asarray(np.asarray(gram, dtype=np.float64), dtype=dtype)
    problem = make_problem(W_x, gram_x, proxy, damping)
    S0, M0 = run_baseline(init, W_x, gram_x)
    del gram_x
    assert has_two_per_group(M0)
    R, K, b = W.shape[0] // block_size, W.shape[1] // block_size, block_size
    eye = xp.eye(b, dtype=dtype)
    f = Factors(xp.tile(eye, (R, 1, 1)), xp.tile(eye, (K, 1, 1)), problem.to_target_space(S0) * M0, M0.copy())
    rng = np.random.default_rng(seed)
    trace, done = run_bcd(problem, f, sweeps, tol, rng, on_sweep)
    A = f.A * problem.row_scale.reshape(R, b, 1)
    B = f.B * problem.col_scale.reshape(-1, 1, b)
    return ArmorResult(
        A=to_numpy(A).astype(np.float64),
        B=to_numpy(B).astype(np.float64),
        S=to_numpy(f.S).astype(np.float64),
        M=to_numpy(f.M),
        proxy=proxy,
        init=init,
        schedule="bcd",
        baseline_loss=trace[0]["loss"],
        loss=problem.loss(f.W_hat()),
        trace=trace,
        sweeps=done,
        seconds=time.perf_counter() - t0,
    )
