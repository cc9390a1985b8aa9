"""ARMOR factorization ``Ŵ = A · (W' ⊙ M) · B`` by block coordinate descent (spec §1, §4, §5).

Everything here works on a :class:`~armor_ref.objectives.Problem`, i.e. on the loss
``L = tr((T − A S B) H (T − A S B)ᵀ)`` (nowag: ``T = W̄``, ``H = diag(h)``; hessian: ``T = W``, ``H`` damped Gram).

Shapes: ``A`` (R, b, b) with ``R = d_out / b``; ``B`` (K, b, b) with ``K = d_in / b``; the core ``S`` (d_out, d_in)
stored dense, zero outside its boolean 2:4 mask ``M``. Tile ``(r, k)`` of ``Ŵ`` is ``A_r S_rk B_k``.

One sweep = A-step, B-step, core-values step, discrete step. Each is an exact minimisation over its block of
variables, written as a step from the current point (``x ← x + M⁺(n − M x)``), so that even where a system is
singular (dead input channels, empty rows) the step cannot increase ``L``. The discrete step accepts a new
2:4 support only on a strict decrease. Hence the loss trace never increases and ``L(ARMOR) ≤ L(start)``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .baselines import BASELINES, run_baseline
from .masks import GROUP, SUPPORTS, check_groupable, has_two_per_group
from .objectives import DEFAULT_DAMPING, Problem, make_problem

DEFAULT_BLOCK_SIZE = 32
DEFAULT_INIT = {"nowag": "nowag-p", "hessian": "sparsegpt"}
DEFAULT_SWEEPS = {"nowag": 30, "hessian": 20}
DEFAULT_TOL = 1e-5
SCHEDULES = ("bcd", "adam")
CORE_CG_ITERATIONS = 20  # conjugate-gradient iterations of one core-values step (warm-started every sweep)
_RIDGE = 1e-12  # relative eigenvalue cut-off of the PSD pseudo-inverses
# relative singular-value cut-off of the least-squares pseudo-inverses (A- and B-steps): directions weaker than
# this are left where they are, which keeps B bounded when columns are duplicated or dead
PINV_RTOL = 1e-6


# ----------------------------------------------------------------------------------------------------------
# Block-diagonal algebra
# ----------------------------------------------------------------------------------------------------------
def blockdiag_left(A: np.ndarray, X: np.ndarray) -> np.ndarray:
    """``blockdiag(A) @ X`` for ``A`` (R, b, b) and ``X`` (R·b, n)."""
    R, b, _ = A.shape
    return (A @ X.reshape(R, b, -1)).reshape(R * b, -1)


def blockdiag_right(X: np.ndarray, B: np.ndarray) -> np.ndarray:
    """``X @ blockdiag(B)`` for ``X`` (m, K·b) and ``B`` (K, b, b)."""
    K, b, _ = B.shape
    m = X.shape[0]
    tiles = X.reshape(m, K, b).transpose(1, 0, 2)  # (K, m, b)
    return (tiles @ B).transpose(1, 0, 2).reshape(m, K * b)


def blockdiag_dense(blocks: np.ndarray) -> np.ndarray:
    """The dense block-diagonal matrix of ``blocks`` (n, b, b)."""
    n, b, _ = blocks.shape
    out = np.zeros((n * b, n * b), dtype=blocks.dtype)
    for i in range(n):
        out[i * b : (i + 1) * b, i * b : (i + 1) * b] = blocks[i]
    return out


def diagonal_blocks(H: np.ndarray, b: int) -> np.ndarray:
    """The (K, b, b) diagonal blocks ``H_kk`` of a (K·b, K·b) matrix."""
    K = H.shape[0] // b
    return np.stack([H[k * b : (k + 1) * b, k * b : (k + 1) * b] for k in range(K)])


def reconstruct(A: np.ndarray, S: np.ndarray, B: np.ndarray) -> np.ndarray:
    """``Ŵ = blockdiag(A) · S · blockdiag(B)``."""
    return blockdiag_left(A, blockdiag_right(S, B))


def psd_pinv(M: np.ndarray) -> np.ndarray:
    """Pseudo-inverse of a batch of symmetric PSD matrices (..., n, n); eigenvalues below
    ``1e-12 · λ_max`` count as zero."""
    w, V = np.linalg.eigh(M)
    cutoff = _RIDGE * np.max(np.abs(w), axis=-1, keepdims=True)
    inv_w = np.where(w > cutoff, 1.0 / np.where(w > cutoff, w, 1.0), 0.0)
    return (V * inv_w[..., None, :]) @ np.swapaxes(V, -1, -2)


# ----------------------------------------------------------------------------------------------------------
# State and result
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Factors:
    """The variables of the optimisation, in the problem's (possibly normalised) space."""

    A: np.ndarray  # (R, b, b)
    B: np.ndarray  # (K, b, b)
    S: np.ndarray  # (d_out, d_in), zero outside M
    M: np.ndarray  # (d_out, d_in) bool, exactly 2 of every 4

    @property
    def block_size(self) -> int:
        return self.A.shape[1]

    def W_hat(self) -> np.ndarray:
        return reconstruct(self.A, self.S, self.B)

    def copy(self) -> Factors:
        return Factors(self.A.copy(), self.B.copy(), self.S.copy(), self.M.copy())


@dataclass
class ArmorResult:
    """A factorized layer: ``Ŵ = blockdiag(A) · S · blockdiag(B)`` with the normalisation folded into A, B."""

    A: np.ndarray  # (d_out/b, b, b)
    B: np.ndarray  # (d_in/b, b, b)
    S: np.ndarray  # (d_out, d_in), 2:4
    M: np.ndarray  # (d_out, d_in) bool
    proxy: str
    init: str
    schedule: str
    baseline_loss: float  # proxy loss of the starting baseline
    loss: float  # proxy loss of the result
    trace: list[dict] = field(default_factory=list)  # one entry per step: sweep, step, loss
    sweeps: int = 0
    seconds: float = 0.0

    @property
    def block_size(self) -> int:
        return self.A.shape[1]

    def W_hat(self) -> np.ndarray:
        return reconstruct(self.A, self.S, self.B)


# ----------------------------------------------------------------------------------------------------------
# The continuous steps (spec §5)
# ----------------------------------------------------------------------------------------------------------
def a_step(problem: Problem, f: Factors) -> None:
    """A-step, row blocks separately: with ``P_r = S[rows r] B``, ``A_r = T_r H P_rᵀ (P_r H P_rᵀ)⁻¹``
    (nowag: ``H = D``). Computed without forming ``P_r H P_rᵀ``, which would square the condition number: with
    ``H = F Fᵀ``, ``A_r += argmin_X ‖(E_r − X P_r) F‖ = (E_r F)(P_r F)⁺``, ``E_r = T_r − A_r P_r``, the
    pseudo-inverse by SVD."""
    R, b, _ = f.A.shape
    PF = problem.times_F(blockdiag_right(f.S, f.B)).reshape(R, b, -1)  # P_r F  (R, b, d_in)
    EF = problem.target_times_F.reshape(R, b, -1) - f.A @ PF  # E_r F
    f.A += EF @ np.linalg.pinv(PF, rtol=PINV_RTOL)


def b_step(problem: Problem, f: Factors) -> None:
    """B-step, with ``Q_k = A S[:, cols k]`` (d_out, b) and ``Q_k⁺ = (Q_kᵀQ_k)⁻¹ Q_kᵀ`` (by SVD, never forming
    ``Q_kᵀQ_k``).

    nowag: ``h_j`` scales a whole column and cancels: ``B_k = Q_k⁺ W̄[:, cols k]``, all k at once.
    hessian: Gauss–Seidel over k with ``G = (W − Ŵ) H`` kept current:
    ``ΔB_k = Q_k⁺ G[:, cols k] H_kk⁻¹``, ``B_k += ΔB_k``, ``G −= Q_k ΔB_k H[cols k, :]``.
    """
    K, b, _ = f.B.shape
    Q = blockdiag_left(f.A, f.S)  # (d_out, d_in); Q[:, cols k] = Q_k
    Qk = Q.reshape(Q.shape[0], K, b).transpose(1, 0, 2)  # (K, d_out, b)
    Qk_pinv = np.linalg.pinv(Qk, rtol=PINV_RTOL)  # (K, b, d_out)
    E = problem.target - blockdiag_right(Q, f.B)
    if problem.diagonal:
        f.B += Qk_pinv @ E.reshape(E.shape[0], K, b).transpose(1, 0, 2)  # ΔB_k = Q_k⁺ E[:, cols k]
        return
    H = problem.H
    G = E @ H
    Hkk_pinv = psd_pinv(diagonal_blocks(H, b))
    for k in range(K):
        cols = slice(k * b, (k + 1) * b)
        dB = Qk_pinv[k] @ G[:, cols] @ Hkk_pinv[k]
        f.B[k] += dB
        G -= (Qk[k] @ dB) @ H[cols, :]


def core_values_step(problem: Problem, f: Factors, max_iter: int = CORE_CG_ITERATIONS, rtol: float = 1e-10) -> None:
    """Core-values step (mask fixed): the kept entries solve the convex quadratic
    ``M ⊙ (AᵀA S (B H Bᵀ)) = M ⊙ (Aᵀ T H Bᵀ)`` (nowag: ``H = D``; independent per tile for nowag and per
    row block for hessian). Solved by preconditioned conjugate gradient started at the current values, each
    step an exact line minimisation, so the loss never increases; ``max_iter`` bounds the work, ``rtol`` the
    residual. Preconditioner: for row ``i`` and column block ``k``, ``(AᵀA)_ii · C_kk[J, J]`` on the kept
    entries ``J`` (``C = B H Bᵀ``), exact when ``A`` is diagonal and ``C`` block diagonal."""
    A, B, M = f.A, f.B, f.M
    d_out, d_in = M.shape
    b = f.block_size
    K = d_in // b
    AtA = np.swapaxes(A, 1, 2) @ A  # (R, b, b)
    if problem.diagonal:  # B D Bᵀ is block diagonal: (K, b, b)
        C_blocks = (B * np.diag(problem.H).reshape(-1, 1, b)) @ np.swapaxes(B, 1, 2)

        def times_C(X: np.ndarray) -> np.ndarray:
            return blockdiag_right(X, C_blocks)
    else:
        C = blockdiag_left(B, blockdiag_right(problem.H, np.swapaxes(B, 1, 2)))  # B H Bᵀ (d_in, d_in)
        C_blocks = diagonal_blocks(C, b)

        def times_C(X: np.ndarray) -> np.ndarray:
            return X @ C

    def operator(X: np.ndarray) -> np.ndarray:  # M ⊙ (AᵀA X C)
        return M * times_C(blockdiag_left(AtA, X))

    # block-Jacobi preconditioner on the b/2 kept entries of each (row, column block)
    kept = np.nonzero(M.reshape(d_out, K, b))[2].reshape(d_out, K, b // 2)  # (d_out, K, b/2)
    C_kept = C_blocks[np.arange(K)[None, :, None, None], kept[..., :, None], kept[..., None, :]]
    A_diag = np.einsum("rii->ri", AtA).reshape(d_out, 1, 1, 1)
    P = A_diag * C_kept  # (d_out, K, b/2, b/2), PSD; a tiny ridge keeps it invertible (dead inputs)
    ridge = 1e-10 * np.einsum("...ii->...", P)[..., None, None] / (b // 2) + 1e-300
    P_inv = np.linalg.inv(P + ridge * np.eye(b // 2))
    rows, blocks = np.arange(d_out)[:, None, None], np.arange(K)[None, :, None]

    def precondition(X: np.ndarray) -> np.ndarray:
        out = np.zeros((d_out, K, b))
        X_kept = X.reshape(d_out, K, b)[rows, blocks, kept]
        out[rows, blocks, kept] = np.einsum("rkij,rkj->rki", P_inv, X_kept)
        return out.reshape(d_out, d_in)

    rhs = M * blockdiag_right(blockdiag_left(np.swapaxes(A, 1, 2), problem.target_times_H), np.swapaxes(B, 1, 2))
    X = f.S * M
    residual = rhs - operator(X)  # = −½ masked gradient
    z = precondition(residual)
    direction = z.copy()
    rz = float(np.sum(residual * z))
    rhs_norm = float(np.linalg.norm(rhs))
    for _ in range(max_iter):
        if rz <= 0 or float(np.linalg.norm(residual)) <= rtol * max(rhs_norm, 1e-300):
            break
        Ad = operator(direction)
        curvature = float(np.sum(direction * Ad))
        if curvature <= 0:
            break
        alpha = float(np.sum(residual * direction)) / curvature  # exact minimiser along the direction
        X += alpha * direction
        residual -= alpha * Ad
        z = precondition(residual)
        rz_new = float(np.sum(residual * z))
        direction = z + (rz_new / rz) * direction
        rz = rz_new
    f.S[:] = X


# ----------------------------------------------------------------------------------------------------------
# The discrete step (spec §5)
# ----------------------------------------------------------------------------------------------------------
# support id of a 4-bit mask pattern (bit t = position t kept); -1 for patterns that do not keep exactly 2
_SUPPORT_OF_PATTERN = np.full(16, -1, dtype=np.int64)
for _sid, (_p0, _p1) in enumerate(SUPPORTS):
    _SUPPORT_OF_PATTERN[(1 << _p0) | (1 << _p1)] = _sid
_SUPPORT_MASKS = np.zeros((len(SUPPORTS), GROUP), dtype=bool)
_SUPPORT_MASKS[np.arange(len(SUPPORTS))[:, None], SUPPORTS] = True


@dataclass
class GroupTables:
    """What the discrete step needs of ``B`` and ``H`` for the groups of a batch of column blocks ``ks``
    (fixed while the discrete step runs). For group ``g`` (4 rows of ``B_k``, ``B_g``):
    ``BH[k] = B_k H_kk`` (nk, b, b), ``Q[k, g] = B_g H_kk B_gᵀ`` (nk, b/4, 4, 4) and the pseudo-inverses of
    its 6 principal 2×2 blocks ``Q_ss⁺`` (nk, b/4, 6, 2, 2)."""

    BH: np.ndarray
    Q: np.ndarray
    Q_ss: np.ndarray
    Q_ss_pinv: np.ndarray


def group_tables(B_ks: np.ndarray, H_kk: np.ndarray) -> GroupTables:
    """Build :class:`GroupTables` from ``B_k`` (nk, b, b) and ``H_kk`` (nk, b, b)."""
    nk, b, _ = B_ks.shape
    BH = B_ks @ H_kk
    full = BH @ np.swapaxes(B_ks, 1, 2)  # B_k H_kk B_kᵀ; group g is its g-th 4×4 diagonal block
    g = np.arange(b // GROUP)
    rows = GROUP * g[:, None] + np.arange(GROUP)  # (b/4, 4)
    Q = full[:, rows[:, :, None], rows[:, None, :]]  # (nk, b/4, 4, 4)
    Q_ss = Q[..., SUPPORTS[:, :, None], SUPPORTS[:, None, :]]  # (nk, b/4, 6, 2, 2)
    return GroupTables(BH, Q, Q_ss, psd_pinv(Q_ss))


def support_costs(
    Q: np.ndarray, Q_ss: np.ndarray, Q_ss_pinv: np.ndarray, ell: np.ndarray, a_norm2: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """For each group, the optimal values on each of the 6 supports and their cost.

    Minimising ``φ(u) = ‖a‖² uᵀ Q u − 2 uᵀ ℓ`` over ``u`` supported on ``s`` gives
    ``u_s = Q_ss⁻¹ ℓ_s / ‖a‖²`` and ``cost_s = φ(u_s) = −ℓ_sᵀ Q_ss⁻¹ ℓ_s / ‖a‖²``. ``Q_ss⁻¹`` is a pseudo-inverse,
    and the cost is evaluated as ``φ(u_s)`` itself so that a singular ``Q_ss`` cannot mislead the choice.
    Shapes: ``Q`` (..., 4, 4), ``Q_ss``/``Q_ss_pinv`` (..., 6, 2, 2), ``ell`` (..., 4), ``a_norm2`` (...).
    Returns ``u`` (..., 6, 4) and ``cost`` (..., 6).
    """
    ell_s = ell[..., SUPPORTS]  # (..., 6, 2)
    scale = np.where(a_norm2 > 0, a_norm2, 1.0)[..., None, None]
    u_s = np.einsum("...ij,...j->...i", Q_ss_pinv, ell_s) / scale  # (..., 6, 2)
    cost = scale[..., 0] * np.einsum("...i,...ij,...j->...", u_s, Q_ss, u_s) - 2 * np.sum(u_s * ell_s, axis=-1)
    u = np.zeros(ell.shape[:-1] + (len(SUPPORTS), GROUP))
    u[..., np.arange(len(SUPPORTS))[:, None], SUPPORTS] = u_s
    return u, cost


def choose_supports(
    Q: np.ndarray,
    Q_ss: np.ndarray,
    Q_ss_pinv: np.ndarray,
    ell: np.ndarray,
    a_norm2: np.ndarray,
    s: np.ndarray,
    m: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The discrete decision for a batch of groups with current values ``s`` and mask ``m`` (..., 4).

    The cheapest of the 6 supports is taken only if it is strictly cheaper than the current support (on a
    tie the current one stays); the new values are accepted only if ``φ`` strictly decreases, and never for a
    group with ``a = 0``. Returns the new values (..., 4), the new mask (..., 4) and whether the support changed.
    """
    u, cost = support_costs(Q, Q_ss, Q_ss_pinv, ell, a_norm2)  # (..., 6, 4), (..., 6)
    Qs = np.einsum("...gh,...h->...g", Q, s)
    cost_now = a_norm2 * np.sum(s * Qs, axis=-1) - 2 * np.sum(s * ell, axis=-1)
    current = _SUPPORT_OF_PATTERN[m.astype(np.int64) @ (1 << np.arange(GROUP))]
    cost_current = np.take_along_axis(cost, current[..., None], axis=-1)[..., 0]
    best = np.argmin(cost, axis=-1)
    tolerance = 1e-12 * (np.abs(cost_current) + np.abs(cost_now)) + 1e-300
    switch = np.take_along_axis(cost, best[..., None], axis=-1)[..., 0] < cost_current - tolerance
    chosen = np.where(switch, best, current)
    cost_new = np.take_along_axis(cost, chosen[..., None], axis=-1)[..., 0]
    accept = (a_norm2 > 0) & (cost_new < cost_now)
    u_new = np.where(accept[..., None], np.take_along_axis(u, chosen[..., None, None], axis=-2)[..., 0, :], s)
    m_new = np.where(accept[..., None], _SUPPORT_MASKS[chosen], m)
    return u_new, m_new, accept & switch


def group_ell_first_term(f: Factors, G: np.ndarray) -> np.ndarray:
    """``B_g G_rkᵀ a`` for every group at once: it is the entry block of ``Aᵀ G Bᵀ`` (= −½ ∂L/∂S)."""
    return blockdiag_right(blockdiag_left(np.swapaxes(f.A, 1, 2), G), np.swapaxes(f.B, 1, 2))


def improvable_groups(problem: Problem, f: Factors, G: np.ndarray, tables: GroupTables) -> np.ndarray:
    """Which groups could strictly lower the loss by changing support, each judged alone at the current
    point (exact for a single-group change). Returns a bool array (R, b, K, b/4): row block, row in block,
    column block, group in block. No True at all means the current masks are discrete-stationary."""
    R, b, _ = f.A.shape
    K = f.B.shape[0]
    shape = (R, b, K, b // GROUP, GROUP)
    s = f.S.reshape(shape)
    m = f.M.reshape(shape)
    a_norm2 = np.broadcast_to(np.sum(f.A * f.A, axis=1)[:, :, None, None], shape[:-1])  # ‖A[:, i]‖²
    Q = tables.Q[None, None]
    ell = group_ell_first_term(f, G).reshape(shape) + a_norm2[..., None] * np.einsum("...gh,...h->...g", Q, s)
    _, _, switch = choose_supports(Q, tables.Q_ss[None, None], tables.Q_ss_pinv[None, None], ell, a_norm2, s, m)
    return switch


def update_groups(f: Factors, G_tiles: np.ndarray, tables: GroupTables, ks: slice, p: np.ndarray, g: np.ndarray) -> int:
    """Re-choose the support and values of one group in each of a batch of tiles that cannot interact.

    Tiles: row blocks ``r = 0..R−1`` × the column blocks ``ks`` (``nk`` of them). In tile ``(r, k)`` the group is
    row ``p[r, k]`` of the row block and the 4 columns ``4·g[r, k] … 4·g[r, k]+3`` of the column block.
    ``G_tiles`` (R, nk, b, b) holds ``((T − Ŵ) H)`` on those tiles and is kept current; ``tables`` are those of
    the column blocks ``ks``. With ``a`` = column ``p`` of ``A_r``, ``B_g`` = rows ``g`` of ``B_k`` and current
    values ``s``: ``Q = B_g H_kk B_gᵀ`` and ``ℓ = B_g (R H)ᵀ a = B_g G_rkᵀ a + ‖a‖² Q s`` (``R`` the residual
    with the group's contribution added back). Returns the number of groups whose support changed.
    """
    R, b, _ = f.A.shape
    K = f.B.shape[0]
    nk = G_tiles.shape[1]
    rr = np.arange(R)[:, None, None]
    kk = np.arange(nk)[None, :, None]
    cols = GROUP * g[..., None] + np.arange(GROUP)  # (R, nk, 4) columns inside the block
    S4 = f.S.reshape(R, b, K, b)[:, :, ks, :]  # views into f.S / f.M
    M4 = f.M.reshape(R, b, K, b)[:, :, ks, :]

    a = f.A[rr[..., 0], :, p]  # (R, nk, b)
    a_norm2 = np.sum(a * a, axis=-1)  # (R, nk)
    B_g = f.B[ks][kk, cols]  # (R, nk, 4, b)
    BgH = tables.BH[kk, cols]  # (R, nk, 4, b)
    kg = (kk[..., 0], g)
    Q = tables.Q[kg]  # (R, nk, 4, 4)
    s = S4[rr, p[..., None], kk, cols]  # (R, nk, 4)
    m = M4[rr, p[..., None], kk, cols]
    Gta = np.einsum("rkij,rki->rkj", G_tiles, a)  # G_rkᵀ a  (R, nk, b)
    ell = np.einsum("rkgj,rkj->rkg", B_g, Gta) + a_norm2[..., None] * np.einsum("rkgh,rkh->rkg", Q, s)

    u_new, m_new, switched = choose_supports(Q, tables.Q_ss[kg], tables.Q_ss_pinv[kg], ell, a_norm2, s, m)
    S4[rr, p[..., None], kk, cols] = u_new
    M4[rr, p[..., None], kk, cols] = m_new
    delta = u_new - s  # (R, nk, 4): Ŵ_T changes by a ⊗ (δᵀ B_g), so G_rk −= a ⊗ (δᵀ B_g H_kk)
    G_tiles -= a[..., :, None] * np.einsum("rkg,rkgj->rkj", delta, BgH)[..., None, :]
    return int(np.sum(switched))


def discrete_step(problem: Problem, f: Factors, rng: np.random.Generator) -> int:
    """Re-choose 2:4 supports group by group (spec §5, discrete step).

    First every group is judged alone at the current point (:func:`improvable_groups`, one vectorised pass);
    then, in a random order, each position (row ``p`` of the row blocks, group ``g`` of the column blocks)
    where some group can improve is updated exactly, in parallel only where groups cannot interact:
    nowag — one group per tile (``H`` diagonal, so column blocks are independent); hessian — one group per row
    block, column block after column block, with ``G = (T − Ŵ) H`` brought up to date after each column
    block. Returns the number of support changes.
    """
    R, b, _ = f.A.shape
    K = f.B.shape[0]
    d_out = f.S.shape[0]
    G = problem.times_H(problem.target - f.W_hat())
    tables = group_tables(f.B, diagonal_blocks(problem.H, b))
    candidates = improvable_groups(problem, f, G, tables)  # (R, b, K, b/4)
    batches = [slice(0, K)] if problem.diagonal else [slice(k, k + 1) for k in range(K)]
    changed = 0
    for ks in batches:
        nk = ks.stop - ks.start
        col_range = slice(ks.start * b, ks.stop * b)
        worth_visiting = candidates[:, :, ks, :].any(axis=(0, 2)).reshape(-1)  # (b · b/4,) positions (p, g)
        if not worth_visiting.any():
            continue
        S_before = f.S[:, col_range].copy()
        G_tiles = G[:, col_range].reshape(R, b, nk, b).transpose(0, 2, 1, 3).copy()  # (R, nk, b, b)
        batch_tables = GroupTables(tables.BH[ks], tables.Q[ks], tables.Q_ss[ks], tables.Q_ss_pinv[ks])
        for flat in rng.permutation(b * (b // GROUP)):
            if worth_visiting[flat]:
                p = np.full((R, nk), flat // (b // GROUP))
                g = np.full((R, nk), flat % (b // GROUP))
                changed += update_groups(f, G_tiles, batch_tables, ks, p, g)
        if not problem.diagonal:  # carry the column block's change into G for the blocks still to come
            dE = -blockdiag_left(f.A, blockdiag_right(f.S[:, col_range] - S_before, f.B[ks]))
            G += dE.reshape(d_out, -1) @ problem.H[col_range, :]
    return changed


# ----------------------------------------------------------------------------------------------------------
# The two schedules
# ----------------------------------------------------------------------------------------------------------
def initial_factors(problem: Problem, S_layer: np.ndarray, M: np.ndarray, block_size: int) -> Factors:
    """``A = I``, ``B = I`` and the baseline's core mapped into the problem's space (spec §4)."""
    d_out, d_in = S_layer.shape
    A = np.tile(np.eye(block_size), (d_out // block_size, 1, 1))
    B = np.tile(np.eye(block_size), (d_in // block_size, 1, 1))
    return Factors(A, B, problem.to_target_space(S_layer) * M, M.copy())


def run_bcd(
    problem: Problem,
    f: Factors,
    sweeps: int,
    tol: float,
    rng: np.random.Generator,
    on_sweep: Callable[[int, float], None] | None = None,
) -> tuple[list[dict], int]:
    """Block coordinate descent: sweeps of A-, B-, core-values and discrete steps, recording the loss after
    every step (a step whose computed loss rose through rounding is undone and marked ``reverted``).
    Stops after ``sweeps`` sweeps or when a sweep improves the loss by less than ``tol`` relative."""
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
            if new_loss > loss:
                # Each step is exact, so this only happens through rounding near an exact fit or with extreme
                # conditioning (a rise of ~ε·κ); undo the step so that the computed trace never increases.
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
    """The paper's schedule: Adam (``lr``) on ``A``, ``B`` and the kept core values jointly, plus one discrete
    update per tile (nowag) or per row block (hessian, cycling over column blocks) per iteration, the group
    drawn with probability proportional to the L1 norm of the loss gradient over its 4 entries. Not monotone
    in general; returns the best iterate seen and stops after ``patience`` iterations without improvement."""
    R, b, _ = f.A.shape
    K = f.B.shape[0]
    params = [f.A, f.B, f.S]
    moments = [(np.zeros_like(x), np.zeros_like(x)) for x in params]
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    best = f.copy()
    best_loss = problem.loss(f.W_hat())
    trace = [{"sweep": 0, "step": "init", "loss": best_loss}]
    Hkk = diagonal_blocks(problem.H, b)
    since_best = 0
    done = 0
    for it in range(1, iterations + 1):
        G = problem.times_H(problem.target - f.W_hat())  # dL/dŴ = −2 G
        SB = blockdiag_right(f.S, f.B)
        AS = blockdiag_left(f.A, f.S)
        grad_A = -2 * np.einsum("rid,rjd->rij", G.reshape(R, b, -1), SB.reshape(R, b, -1))
        grad_B = -2 * np.einsum("dki,dkj->kij", AS.reshape(-1, K, b), G.reshape(-1, K, b))
        grad_S_full = -2 * blockdiag_right(blockdiag_left(np.swapaxes(f.A, 1, 2), G), np.swapaxes(f.B, 1, 2))
        for x, grad, (m1, m2) in zip(params, (grad_A, grad_B, grad_S_full * f.M), moments, strict=True):
            m1 *= beta1
            m1 += (1 - beta1) * grad
            m2 *= beta2
            m2 += (1 - beta2) * grad * grad
            x -= lr * (m1 / (1 - beta1**it)) / (np.sqrt(m2 / (1 - beta2**it)) + eps)
        f.S *= f.M

        # one discrete update per independent tile, group drawn by gradient L1 weight
        ks = slice(0, K) if problem.diagonal else slice(it % K, it % K + 1)
        nk = ks.stop - ks.start
        col_range = slice(ks.start * b, ks.stop * b)
        G = problem.times_H(problem.target - f.W_hat())
        weights = np.abs(grad_S_full[:, col_range]).reshape(R, b, nk, b // GROUP, GROUP).sum(-1)
        weights = weights.transpose(0, 2, 1, 3).reshape(R, nk, -1) + 1e-300  # (R, nk, b·b/4)
        cdf = np.cumsum(weights, axis=-1)
        draws = rng.random((R, nk, 1)) * cdf[..., -1:]
        flat = np.minimum(np.sum(cdf < draws, axis=-1), weights.shape[-1] - 1)
        G_tiles = G[:, col_range].reshape(R, b, nk, b).transpose(0, 2, 1, 3).copy()
        update_groups(f, G_tiles, group_tables(f.B[ks], Hkk[ks]), ks, flat // (b // GROUP), flat % (b // GROUP))

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
def check_shapes(d_out: int, d_in: int, block_size: int) -> None:
    """Raise ValueError unless the block size is a multiple of 4 dividing both dimensions."""
    if block_size <= 0 or block_size % GROUP != 0:
        raise ValueError(f"block size {block_size} must be a positive multiple of 4")
    check_groupable(d_in)
    for name, d in (("output", d_out), ("input", d_in)):
        if d % block_size != 0:
            raise ValueError(
                f"{name} dimension {d} is not divisible by block size {block_size}; pick one that divides it"
            )


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
) -> ArmorResult:
    """Factorize layer ``W`` (d_out, d_in) as ``Ŵ = blockdiag(A) · (W' ⊙ M) · blockdiag(B)``.

    ``gram`` is the raw calibration Gram matrix ``Xᵀ X`` (d_in, d_in). ``proxy`` picks the loss (``nowag`` or
    ``hessian``), ``init`` the baseline to start from (default NoWag-P for nowag, SparseGPT for hessian),
    ``sweeps`` the budget (default 30 nowag / 20 hessian; iterations for ``schedule="adam"``), ``tol`` the
    relative improvement per sweep under which to stop. Deterministic for a given ``seed``.
    """
    W = np.asarray(W, dtype=np.float64)
    d_out, d_in = W.shape
    check_shapes(d_out, d_in, block_size)
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    init = init or DEFAULT_INIT[proxy]
    if init not in BASELINES:
        raise ValueError(f"unknown init {init!r}; choose one of {', '.join(BASELINES)}")
    sweeps = DEFAULT_SWEEPS[proxy] if sweeps is None else sweeps

    t0 = time.perf_counter()
    problem = make_problem(W, gram, proxy, damping)
    S0, M0 = run_baseline(init, W, gram)
    assert has_two_per_group(M0)
    f = initial_factors(problem, S0, M0, block_size)
    rng = np.random.default_rng(seed)
    if schedule == "bcd":
        trace, done = run_bcd(problem, f, sweeps, tol, rng, on_sweep)
    else:
        trace, done, f = run_adam(problem, f, sweeps, rng, on_sweep=on_sweep)
    # fold the normalisation back: A ← diag(r) A, B ← B diag(c)
    R, b = d_out // block_size, block_size
    A = f.A * problem.row_scale.reshape(R, b, 1)
    B = f.B * problem.col_scale.reshape(-1, 1, b)
    return ArmorResult(
        A=A,
        B=B,
        S=f.S,
        M=f.M,
        proxy=proxy,
        init=init,
        schedule=schedule,
        baseline_loss=trace[0]["loss"],
        loss=problem.loss(f.W_hat()),
        trace=trace,
        sweeps=done,
        seconds=time.perf_counter() - t0,
    )
