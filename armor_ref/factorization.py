"""ARMOR factorization ``Ŵ = A · (W' ⊙ M) · B`` by block coordinate descent: the plain reference.

Each function implements one section of ``docs/armor-spec.md`` and says which. Everything works on a
:class:`~armor_ref.objectives.Problem`, i.e. on the loss

    L(A, S, B) = tr((T − A S B) H (T − A S B)ᵀ)        (nowag: T = W̄, H = diag(h); hessian: T = W, H damped Gram)

Shapes: ``A`` (R, b, b) holds the blocks ``A_r`` of ``blockdiag(A)``, ``R = d_out / b``; ``B`` (K, b, b) the blocks
``B_k``, ``K = d_in / b``; the core ``S`` (d_out, d_in) is stored dense, zero outside its boolean 2:4 mask ``M``.
Row block ``r`` is rows ``r·b … r·b + b − 1`` (:func:`block`), column block ``k`` likewise; tile ``(r, k)`` of ``Ŵ``
is ``A_r S_rk B_k``.

One sweep = A-step, B-step, core-values step, discrete step (spec §5). The code favours the formulas over speed:
loops over row blocks, column blocks, groups and supports, small matrices, no index tricks. It is meant to be read
next to the spec and to run the verification suite and the equality tests on small shapes.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .baselines import BASELINES, run_baseline
from .masks import GROUP, KEEP, SUPPORTS, check_groupable, has_two_per_group
from .objectives import DEFAULT_DAMPING, Problem, make_problem

DEFAULT_BLOCK_SIZE = 32
DEFAULT_INIT = {"nowag": "nowag-p", "hessian": "sparsegpt"}
#: the sweep cap (spec §5.6): the tolerance below normally stops first
DEFAULT_SWEEPS = {"nowag": 40, "hessian": 40}
#: stop when a sweep lowers the loss by no more than this fraction of the loss at its start (spec §5.6). On real
#: MiniLM layers the held-out error keeps falling with the loss to 60 sweeps and beyond, so this is a budget, chosen
#: from benchmarks/results/stopping_rule.json: 0.5 % stops hessian layers after 29 sweeps on average
DEFAULT_TOL = 5e-3
#: the help text of the options that set the budget
BUDGET_HELP = (
    f"at most {DEFAULT_SWEEPS['nowag']} nowag / {DEFAULT_SWEEPS['hessian']} hessian sweeps, fewer once a sweep "
    f"lowers the loss by no more than {DEFAULT_TOL:.1%}"
)
SCHEDULES = ("bcd", "adam")

# ---- every tolerance of the algorithm (spec §8) --------------------------------------------------------------
#: eigenvalues of a PSD matrix below ``PSD_PINV_CUTOFF · λ_max`` count as zero in :func:`psd_pinv`
PSD_PINV_CUTOFF = 1e-12
#: singular values below ``PINV_RTOL · σ_max`` count as zero in the least-squares pseudo-inverses of the A- and
#: B-steps: directions weaker than that are left where they are (keeps B bounded for duplicated or dead columns)
PINV_RTOL = 1e-6
#: conjugate-gradient iterations of one core-values step (warm-started from the current values every sweep). Each
#: costs one d_out×d_in×d_in product; on real MiniLM layers 8 iterations and a few more sweeps reach a lower loss in
#: the same time than 20 (spec §5.4)
CORE_CG_ITERATIONS = 8
#: the core-values CG stops once ``‖residual‖ ≤ CORE_CG_RTOL · ‖right-hand side‖``
CORE_CG_RTOL = 1e-10
#: ridge of the core step's block-Jacobi preconditioner, relative to the mean of its diagonal
PRECONDITIONER_RIDGE = 1e-10
#: the discrete step switches support only if the best cost beats the current support's by
#: ``TIE_RTOL · (|cost_current| + |cost_now|) + TINY``
TIE_RTOL = 1e-12
#: an absolute floor that only keeps divisions and comparisons away from exact zero
TINY = 1e-300
#: Adam schedule (the paper's): learning rate, moment decays, epsilon, iterations without improvement before stopping
ADAM_LR = 1e-4
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
ADAM_PATIENCE = 100


# ----------------------------------------------------------------------------------------------------------
# Block-diagonal algebra (spec §1)
# ----------------------------------------------------------------------------------------------------------
def block(i: int, b: int) -> slice:
    """The indices ``i·b … i·b + b − 1`` of block ``i``."""
    return slice(i * b, (i + 1) * b)


def blockdiag_left(A: np.ndarray, X: np.ndarray) -> np.ndarray:
    """``blockdiag(A) · X`` for ``A`` (R, b, b) and ``X`` (R·b, n): row block ``r`` of the result is ``A_r X_r``."""
    R, b, _ = A.shape
    out = np.empty((R * b, X.shape[1]), dtype=np.result_type(A, X))
    for r in range(R):
        out[block(r, b)] = A[r] @ X[block(r, b)]
    return out


def blockdiag_right(X: np.ndarray, B: np.ndarray) -> np.ndarray:
    """``X · blockdiag(B)`` for ``X`` (m, K·b) and ``B`` (K, b, b): column block ``k`` of the result is
    ``X_k B_k``."""
    K, b, _ = B.shape
    out = np.empty((X.shape[0], K * b), dtype=np.result_type(X, B))
    for k in range(K):
        out[:, block(k, b)] = X[:, block(k, b)] @ B[k]
    return out


def blockdiag_dense(blocks: np.ndarray) -> np.ndarray:
    """The dense block-diagonal matrix of ``blocks`` (n, b, b)."""
    n, b, _ = blocks.shape
    out = np.zeros((n * b, n * b), dtype=blocks.dtype)
    for i in range(n):
        out[block(i, b), block(i, b)] = blocks[i]
    return out


def diagonal_blocks(H: np.ndarray, b: int) -> np.ndarray:
    """The (K, b, b) diagonal blocks ``H_kk`` of a (K·b, K·b) matrix."""
    K = H.shape[0] // b
    return np.stack([H[block(k, b), block(k, b)] for k in range(K)])


def reconstruct(A: np.ndarray, S: np.ndarray, B: np.ndarray) -> np.ndarray:
    """``Ŵ = blockdiag(A) · S · blockdiag(B)`` (spec §1.1)."""
    return blockdiag_left(A, blockdiag_right(S, B))


def psd_pinv(M: np.ndarray, scale: np.ndarray | float = 0.0) -> np.ndarray:
    """Pseudo-inverse ``V Λ⁺ Vᵀ`` of a symmetric PSD matrix (or a stack of them, ``(..., n, n)``) from its
    eigendecomposition ``M = V Λ Vᵀ``; eigenvalues ``≤ PSD_PINV_CUTOFF · max(λ_max, scale)`` count as zero (spec
    §5.1.1). ``scale`` (broadcast over the stack) is the size ``M`` would have if nothing in it were dead, so that
    rounding residue in an all-dead block is not inverted."""
    w, V = np.linalg.eigh(M)
    cutoff = PSD_PINV_CUTOFF * np.maximum(np.max(np.abs(w), axis=-1), scale)[..., None]
    inv_w = np.where(w > cutoff, 1.0 / np.where(w > cutoff, w, 1.0), 0.0)
    return (V * inv_w[..., None, :]) @ np.swapaxes(V, -1, -2)


def lstsq_pinv(X: np.ndarray) -> np.ndarray:
    """Pseudo-inverse of ``X`` by SVD, singular values ``≤ PINV_RTOL · σ_max`` counting as zero, so that
    ``Y X⁺ = argmin_Z ‖Y − Z X‖`` on the kept directions (spec §5.1.2)."""
    return np.linalg.pinv(X, rtol=PINV_RTOL)


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
# The continuous steps (spec §5.1–5.4)
# ----------------------------------------------------------------------------------------------------------
def a_step(problem: Problem, f: Factors) -> None:
    """A-step (spec §5.2): each ``A_r`` minimises ``‖(T_r − A_r P_r) F‖²`` with ``P_r = (S B)_r`` and
    ``H = F Fᵀ``, in the square-root least-squares form, from the current point:

        E_r = T_r − A_r P_r,        A_r ← A_r + (E_r F)(P_r F)⁺        (⁺: SVD, cut-off PINV_RTOL)

    i.e. ``A_r = T_r H P_rᵀ (P_r H P_rᵀ)⁻¹`` without forming ``P_r H P_rᵀ`` (which squares the condition number).
    """
    R, b, _ = f.A.shape
    PF = problem.times_F(blockdiag_right(f.S, f.B))  # S B F (d_out, d_in); rows of block r = P_r F
    for r in range(R):
        rows = block(r, b)
        EF = problem.target_times_F[rows] - f.A[r] @ PF[rows]  # E_r F  (b, d_in)
        f.A[r] += EF @ lstsq_pinv(PF[rows])  # (b, d_in) (d_in, b)


def b_step(problem: Problem, f: Factors) -> None:
    """B-step (spec §5.3), with ``Q_k = (A S)[:, cols k]`` (d_out, b) and ``Q_k⁺`` its SVD pseudo-inverse
    (``= (Q_kᵀQ_k)⁻¹ Q_kᵀ``, never forming ``Q_kᵀQ_k``), from the current point ``E = T − Ŵ``:

    * nowag (``H`` diagonal, its weights cancel): ``B_k ← B_k + Q_k⁺ E[:, cols k]``, all ``k`` at once;
    * hessian, Gauss–Seidel over ``k`` with ``G = (T − Ŵ) H`` kept current:
      ``ΔB_k = Q_k⁺ G[:, cols k] H_kk⁺``,  ``B_k ← B_k + ΔB_k``,  ``G ← G − Q_k ΔB_k H[cols k, :]``.
    """
    K, b, _ = f.B.shape
    Q = blockdiag_left(f.A, f.S)  # A S (d_out, d_in); Q_k = Q[:, cols k]
    E = problem.target - blockdiag_right(Q, f.B)  # T − Ŵ
    if problem.diagonal:
        for k in range(K):
            cols = block(k, b)
            f.B[k] += lstsq_pinv(Q[:, cols]) @ E[:, cols]
        return
    H = problem.H
    G = E @ H  # (d_out, d_in)
    for k in range(K):
        cols = block(k, b)
        dB = lstsq_pinv(Q[:, cols]) @ G[:, cols] @ psd_pinv(H[cols, cols])  # (b, b)
        f.B[k] += dB
        G -= (Q[:, cols] @ dB) @ H[cols, :]


def core_values_step(
    problem: Problem, f: Factors, max_iter: int = CORE_CG_ITERATIONS, rtol: float = CORE_CG_RTOL
) -> None:
    """Core-values step (spec §5.4): with the mask fixed, the kept entries of ``S`` minimise a convex quadratic
    whose normal equations are

        M ⊙ (AᵀA · S · C) = M ⊙ (Aᵀ T H Bᵀ),        C = B H Bᵀ        (nowag: H = diag(h), C block diagonal)

    Solved by preconditioned conjugate gradient started at the current values: every iteration is an exact line
    minimisation, so the loss never increases. At most ``max_iter`` iterations; stops early once
    ``‖residual‖ ≤ rtol · ‖rhs‖``, or when ``rᵀz ≤ 0`` or a curvature ``dᵀ𝕄d ≤ 0`` appears (nothing left to gain).
    The preconditioner is :func:`core_preconditioner`.
    """
    A, B, M = f.A, f.B, f.M
    R, b, _ = A.shape
    K = B.shape[0]
    Bt = np.swapaxes(B, 1, 2)
    AtA = np.stack([A[r].T @ A[r] for r in range(R)])  # A_rᵀ A_r  (R, b, b)
    if problem.diagonal:  # C = B D Bᵀ is block diagonal: C_kk = B_k D_k B_kᵀ
        h = np.diag(problem.H)
        C = blockdiag_dense(np.stack([(B[k] * h[block(k, b)][None, :]) @ Bt[k] for k in range(K)]))
    else:
        C = blockdiag_left(B, blockdiag_right(problem.H, Bt))  # B H Bᵀ  (d_in, d_in)

    def operator(X: np.ndarray) -> np.ndarray:  # 𝕄 X = M ⊙ (AᵀA X C)
        return M * (blockdiag_left(AtA, X) @ C)

    precondition = core_preconditioner(AtA, C, M)
    rhs = M * blockdiag_right(blockdiag_left(np.swapaxes(A, 1, 2), problem.target_times_H), Bt)
    X = f.S * M
    residual = rhs - operator(X)  # = −½ of the masked gradient
    z = precondition(residual)
    direction = z.copy()
    rz = float(np.sum(residual * z))
    rhs_norm = float(np.linalg.norm(rhs))
    for _ in range(max_iter):
        if rz <= 0 or float(np.linalg.norm(residual)) <= rtol * max(rhs_norm, TINY):
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


def core_preconditioner(AtA: np.ndarray, C: np.ndarray, M: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """The block-Jacobi preconditioner of the core step (spec §5.4.1): for row ``i`` (row ``p`` of row block ``r``)
    and column block ``k``, with ``J`` the ``b/2`` kept columns of the row in that block,

        P = (A_rᵀA_r)_pp · C[J, J] + ρ I,        ρ = PRECONDITIONER_RIDGE · tr(P) / (b/2) + TINY

    (exact when ``A`` is diagonal and ``C`` block diagonal; the ridge keeps it invertible for dead inputs).
    Returns ``X ↦ P⁻¹ X`` applied on every (row, column block), zero off the mask."""
    b = AtA.shape[1]
    d_out, d_in = M.shape
    K = d_in // b
    half = b // KEEP
    kept = np.empty((d_out, K, half), dtype=np.int64)  # the kept columns J, absolute indices
    P_inv = np.empty((d_out, K, half, half))
    for i in range(d_out):
        r, p = divmod(i, b)
        for k in range(K):
            J = k * b + np.flatnonzero(M[i, block(k, b)])
            P = AtA[r, p, p] * C[np.ix_(J, J)]
            ridge = PRECONDITIONER_RIDGE * np.trace(P) / half + TINY
            kept[i, k] = J
            P_inv[i, k] = np.linalg.inv(P + ridge * np.eye(half))
    rows = np.arange(d_out)[:, None, None]

    def precondition(X: np.ndarray) -> np.ndarray:
        out = np.zeros_like(X)
        out[rows, kept] = np.einsum("ikab,ikb->ika", P_inv, X[rows, kept])  # P⁻¹ X[i, J] on every (i, k)
        return out

    return precondition


# ----------------------------------------------------------------------------------------------------------
# The discrete step (spec §5.5)
# ----------------------------------------------------------------------------------------------------------
@dataclass
class GroupTables:
    """What the discrete step needs of one column block ``k`` (``B`` and ``H`` are fixed while it runs).

    Group ``g`` of the block is its columns ``4g … 4g+3``; ``B_g`` = rows ``4g … 4g+3`` of ``B_k``."""

    BH: np.ndarray  # B_k H_kk (b, b); rows 4g..4g+3 are B_g H_kk
    Q: np.ndarray  # Q[g] = B_g H_kk B_gᵀ (b/4, 4, 4)
    Q_ss: np.ndarray  # Q_ss[g, s] = Q[g][s, s] for each support s (b/4, 6, 2, 2)
    Q_ss_pinv: np.ndarray  # psd_pinv(Q_ss[g, s]) (b/4, 6, 2, 2)


def group_tables(B_k: np.ndarray, H_kk: np.ndarray) -> GroupTables:
    """:class:`GroupTables` of a column block from ``B_k`` (b, b) and ``H_kk`` (b, b) (spec §5.5.2)."""
    b = B_k.shape[0]
    BH = B_k @ H_kk
    BHBt = BH @ B_k.T  # B_k H_kk B_kᵀ; Q[g] is its g-th 4×4 diagonal block
    Q = np.stack([BHBt[block(g, GROUP), block(g, GROUP)] for g in range(b // GROUP)])
    Q_ss = np.stack([[Q_g[np.ix_(s, s)] for s in SUPPORTS] for Q_g in Q])
    # what Q_g would hold if its channels were live: its largest row of B_g squared times the block's largest h
    h_max = max(float(np.max(np.diag(H_kk))), 0.0)
    scale = np.array([np.max(np.sum(B_k[block(g, GROUP)] ** 2, axis=1)) * h_max for g in range(b // GROUP)])
    return GroupTables(BH, Q, Q_ss, psd_pinv(Q_ss, scale[:, None]))


def all_group_tables(problem: Problem, f: Factors) -> list[GroupTables]:
    """:func:`group_tables` of every column block ``k = 0 … K−1``."""
    b = f.block_size
    return [group_tables(f.B[k], problem.H[block(k, b), block(k, b)]) for k in range(f.B.shape[0])]


def support_costs(
    Q_ss: np.ndarray, Q_ss_pinv: np.ndarray, ell: np.ndarray, a_norm2: float
) -> tuple[np.ndarray, np.ndarray]:
    """For one group, the optimal values and the cost of each of the 6 supports ``s`` (spec §5.5.3).

    Minimising ``φ(u) = ‖a‖² uᵀ Q u − 2 uᵀ ℓ`` over ``u`` supported on ``s`` gives

        u_s = Q_ss⁺ ℓ_s / ‖a‖²,        cost_s = φ(u_s)   (= −ℓ_sᵀ Q_ss⁺ ℓ_s / ‖a‖² when Q_ss is invertible)

    The cost is evaluated as ``φ(u_s)`` itself so that a singular ``Q_ss`` cannot misreport it; ``‖a‖² = 0`` is
    replaced by 1 (such a group is never changed, see :func:`choose_support`).
    Shapes: ``Q_ss``, ``Q_ss_pinv`` (6, 2, 2), ``ell`` (4,). Returns ``u`` (6, 4) and ``cost`` (6,)."""
    scale = a_norm2 if a_norm2 > 0 else 1.0
    u = np.zeros((len(SUPPORTS), GROUP))
    cost = np.empty(len(SUPPORTS))
    for sid, (p0, p1) in enumerate(SUPPORTS.tolist()):  # the 2×2 algebra written out, in plain floats
        (P00, P01), (P10, P11) = Q_ss_pinv[sid].tolist()  # Q_ss⁺
        (q00, q01), (q10, q11) = Q_ss[sid].tolist()
        l0, l1 = float(ell[p0]), float(ell[p1])  # ℓ_s
        u0, u1 = (P00 * l0 + P01 * l1) / scale, (P10 * l0 + P11 * l1) / scale  # u_s = Q_ss⁺ ℓ_s / ‖a‖²
        quadratic = u0 * q00 * u0 + u0 * q01 * u1 + u1 * q10 * u0 + u1 * q11 * u1  # u_sᵀ Q_ss u_s
        cost[sid] = scale * quadratic - 2 * (u0 * l0 + u1 * l1)  # φ(u_s)
        u[sid, p0], u[sid, p1] = u0, u1
    return u, cost


#: the index in ``SUPPORTS`` of each 4-position mask that keeps exactly 2 positions, keyed by the mask as a tuple
SUPPORT_OF_MASK = {tuple(p in s for p in range(GROUP)): sid for sid, s in enumerate(SUPPORTS.tolist())}


def support_index(m: np.ndarray) -> int:
    """The index in ``SUPPORTS`` of a group's boolean mask ``m`` (4,) keeping exactly 2 positions."""
    return SUPPORT_OF_MASK[tuple(bool(x) for x in m)]


def choose_support(
    Q: np.ndarray,
    Q_ss: np.ndarray,
    Q_ss_pinv: np.ndarray,
    ell: np.ndarray,
    a_norm2: float,
    s: np.ndarray,
    m: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, bool]:
    """The discrete decision (spec §5.5.4) for one group with current values ``s`` and mask ``m`` (4,):

    * ``best`` = the cheapest of the 6 supports (the first on an exact tie);
    * switch to it only if ``cost_best < cost_current − (TIE_RTOL · (|cost_current| + |cost_now|) + TINY)``,
      where ``cost_current`` is the optimum on the current support and ``cost_now = φ(s)``; else keep the support;
    * write the chosen support's optimal values only on a decrease by more than the same margin,
      ``cost_chosen < cost_now − margin``, and never for ``‖a‖ = 0`` (without the margin, a group already at its
      optimum would be rewritten or not on the last bit of rounding).

    Returns the new values (4,), the new mask (4,) and whether the support changed."""
    u, cost = support_costs(Q_ss, Q_ss_pinv, ell, a_norm2)
    cost_now = a_norm2 * np.sum(s * np.einsum("gh,h->g", Q, s)) - 2 * np.sum(s * ell)  # φ(s)
    current = support_index(m)
    best = int(np.argmin(cost))
    margin = TIE_RTOL * (abs(cost[current]) + abs(cost_now)) + TINY
    switch = bool(cost[best] < cost[current] - margin)
    chosen = best if switch else current
    if not (a_norm2 > 0 and cost[chosen] < cost_now - margin):
        return s, m, False
    new_mask = np.zeros(GROUP, dtype=bool)
    new_mask[SUPPORTS[chosen]] = True
    return u[chosen], new_mask, switch


def group_ell(f: Factors, G_tile: np.ndarray, tables: GroupTables, r: int, k: int, p: int, g: int) -> np.ndarray:
    """``ℓ`` (4,) (spec §5.5.1) of the group in row ``p`` of row block ``r`` and group ``g`` of column block ``k``,
    given ``G_tile = ((T − Ŵ) H)[rows r, cols k]`` (b, b) at the current point.

    The group's values ``s`` enter ``Ŵ`` as ``a (sᵀ B_g)`` in tile ``(r, k)``, ``a = A_r[:, p]``. With ``R`` the
    residual with the group's contribution added back, ``ℓ = B_g (R H)_rkᵀ a = B_g G_rkᵀ a + ‖a‖² Q s``."""
    b = f.block_size
    a = f.A[r][:, p]  # (b,)
    B_g = f.B[k][block(g, GROUP)]  # (4, b)
    s = f.S[r * b + p, k * b + GROUP * g + np.arange(GROUP)]
    Gt_a = np.einsum("ij,i->j", G_tile, a)  # G_rkᵀ a  (b,)
    return np.einsum("gj,j->g", B_g, Gt_a) + np.sum(a * a) * np.einsum("gh,h->g", tables.Q[g], s)


def update_group(f: Factors, G_tile: np.ndarray, tables: GroupTables, r: int, k: int, p: int, g: int) -> bool:
    """Re-choose the support and values of one group (spec §5.5.5; :func:`group_ell`, :func:`choose_support`), keep
    ``G_tile = ((T − Ŵ) H)[rows r, cols k]`` current: ``Ŵ`` changes by ``a ⊗ (δᵀ B_g)`` with ``δ = u_new − s``,
    so ``G_tile −= a ⊗ (δᵀ B_g H_kk)``. Returns whether the group's support changed."""
    b = f.block_size
    row, cols = r * b + p, k * b + GROUP * g + np.arange(GROUP)
    a = f.A[r][:, p]
    s, m = f.S[row, cols], f.M[row, cols]
    ell = group_ell(f, G_tile, tables, r, k, p, g)
    u_new, m_new, switched = choose_support(tables.Q[g], tables.Q_ss[g], tables.Q_ss_pinv[g], ell, np.sum(a * a), s, m)
    f.S[row, cols] = u_new
    f.M[row, cols] = m_new
    G_tile -= a[:, None] * np.einsum("g,gj->j", u_new - s, tables.BH[block(g, GROUP)])[None, :]
    return switched


def improvable_groups(f: Factors, G: np.ndarray, tables: list[GroupTables]) -> np.ndarray:
    """Screening (spec §5.5.6): which groups, each judged alone at the current point (``G = (T − Ŵ) H``), would switch
    support (:func:`choose_support`). The first term of every group's ``ℓ``, ``B_g G_rkᵀ a``, is read off
    ``Aᵀ G Bᵀ`` (= −½ ∂L/∂S), computed once. Returns a bool array (R, b, K, b/4): row block, row in block,
    column block, group in block. No True at all means the masks are discrete-stationary."""
    R, b, _ = f.A.shape
    K = f.B.shape[0]
    AtGBt = blockdiag_right(blockdiag_left(np.swapaxes(f.A, 1, 2), G), np.swapaxes(f.B, 1, 2))  # (d_out, d_in)
    a_norm2 = np.sum(f.A * f.A, axis=1)  # (R, b): ‖A_r[:, p]‖²
    out = np.zeros((R, b, K, b // GROUP), dtype=bool)
    for r, p, k, g in itertools.product(range(R), range(b), range(K), range(b // GROUP)):
        row, cols = r * b + p, k * b + GROUP * g + np.arange(GROUP)
        s, m = f.S[row, cols], f.M[row, cols]
        Q = tables[k].Q[g]
        ell = AtGBt[row, cols] + a_norm2[r, p] * np.einsum("gh,h->g", Q, s)
        out[r, p, k, g] = choose_support(Q, tables[k].Q_ss[g], tables[k].Q_ss_pinv[g], ell, a_norm2[r, p], s, m)[2]
    return out


def discrete_batches(problem: Problem, K: int) -> list[list[int]]:
    """Column blocks whose groups are updated together (spec §5.5.7): nowag all ``K`` at once (one group per tile, ``H``
    diagonal so tiles do not interact), hessian one column block at a time (one group per row block)."""
    return [list(range(K))] if problem.diagonal else [[k] for k in range(K)]


def discrete_step(problem: Problem, f: Factors, rng: np.random.Generator) -> int:
    """Discrete step (spec §5.5.8): re-choose 2:4 supports group by group.

    1. Screening: :func:`improvable_groups` judges every group alone at the start.
    2. For each batch of column blocks (:func:`discrete_batches`) where some group was found improvable: draw
       one permutation ``rng.permutation(b · b/4)`` of the positions ``(p, g)`` (``flat = p · b/4 + g``) and, in
       that order, skipping positions where no group of the batch was found improvable, update the group at
       ``(p, g)`` of every tile of the batch (:func:`update_group`; they cannot interact). The batch's
       ``G = (T − Ŵ) H`` is kept current group by group.
    3. hessian: after each column block, bring ``G`` up to date for the blocks still to come:
       ``G ← G − A ΔS_k B_k H[cols k, :]``.

    Returns the number of support changes."""
    R, b, _ = f.A.shape
    K = f.B.shape[0]
    n_groups = b // GROUP
    G = problem.times_H(problem.target - f.W_hat())  # (T − Ŵ) H  (d_out, d_in)
    tables = all_group_tables(problem, f)
    candidates = improvable_groups(f, G, tables)  # (R, b, K, b/4)
    changed = 0
    for ks in discrete_batches(problem, K):
        worth_visiting = candidates[:, :, ks, :].any(axis=(0, 2))  # (b, b/4): positions (p, g)
        if not worth_visiting.any():
            continue
        cols = slice(ks[0] * b, (ks[-1] + 1) * b)
        S_before = f.S[:, cols].copy()
        G_batch = G[:, cols].copy()  # (T − Ŵ) H on the batch's columns, kept current below
        for flat in rng.permutation(b * n_groups):
            p, g = divmod(int(flat), n_groups)
            if not worth_visiting[p, g]:
                continue
            for j, k in enumerate(ks):
                for r in range(R):
                    changed += update_group(f, G_batch[block(r, b), block(j, b)], tables[k], r, k, p, g)
        if not problem.diagonal:  # the column block's change, carried into G for the blocks still to come
            (k,) = ks
            dE = -blockdiag_left(f.A, (f.S[:, cols] - S_before) @ f.B[k])  # change of T − Ŵ (d_out, b)
            G += dE @ problem.H[cols, :]
    return changed


# ----------------------------------------------------------------------------------------------------------
# The start and the two schedules (spec §4.1, §5.6, §5.7)
# ----------------------------------------------------------------------------------------------------------
def initial_factors(problem: Problem, S_layer: np.ndarray, M: np.ndarray, block_size: int) -> Factors:
    """``A = I``, ``B = I`` and the baseline's core mapped into the problem's space (spec §4.1)."""
    d_out, d_in = S_layer.shape
    A = np.tile(np.eye(block_size), (d_out // block_size, 1, 1))
    B = np.tile(np.eye(block_size), (d_in // block_size, 1, 1))
    return Factors(A, B, problem.to_target_space(S_layer) * M, M.copy())


def check_budget(sweeps: int, tol: float = 0.0) -> None:
    """Raise ValueError unless ``sweeps`` is an integer ≥ 0 and ``tol`` a finite number ≥ 0 (spec §5.6.1)."""
    if isinstance(sweeps, bool) or not isinstance(sweeps, (int, np.integer)) or sweeps < 0:
        raise ValueError(f"sweeps must be a whole number >= 0, got {sweeps!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float, np.floating, np.integer)):
        raise ValueError(f"tol must be a number >= 0, got {tol!r}")
    if not (math.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")


def run_bcd(
    problem: Problem,
    f: Factors,
    sweeps: int,
    tol: float,
    rng: np.random.Generator,
    on_sweep: Callable[[int, float], None] | None = None,
) -> tuple[list[dict], int]:
    """Block coordinate descent (spec §5.6): sweeps of :func:`a_step`, :func:`b_step`, :func:`core_values_step`
    and :func:`discrete_step`, recording the computed loss after every step (nothing is undone: the trace is
    what the steps did). Stops after ``sweeps`` sweeps, or after the first sweep that lowers the loss by no
    more than ``tol`` times the loss at its start. Returns the trace and the number of sweeps run."""
    check_budget(sweeps, tol)
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
            step()
            loss = problem.loss(f.W_hat())
            trace.append({"sweep": sweep, "step": name, "loss": loss})
        done = sweep
        if on_sweep is not None:
            on_sweep(sweep, loss)
        if start_loss - loss <= tol * start_loss:
            break
    return trace, done


def adam_gradients(problem: Problem, f: Factors) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The gradients of ``L`` (spec §5.7, step 1) with ``G = (T − Ŵ) H`` (so ``∂L/∂Ŵ = −2G``):
    ``∂L/∂A_r = −2 G_r (S B)_rᵀ``, ``∂L/∂B_k = −2 (A S)[:, cols k]ᵀ G[:, cols k]``, ``∂L/∂S = −2 Aᵀ G Bᵀ``
    (the last on every entry; Adam uses it masked, the group draw unmasked)."""
    R, b, _ = f.A.shape
    K = f.B.shape[0]
    G = problem.times_H(problem.target - f.W_hat())
    SB = blockdiag_right(f.S, f.B)
    AS = blockdiag_left(f.A, f.S)
    grad_A = np.stack([-2 * np.einsum("id,jd->ij", G[block(r, b)], SB[block(r, b)]) for r in range(R)])  # G_r SB_rᵀ
    grad_B = np.stack([-2 * np.einsum("di,dj->ij", AS[:, block(k, b)], G[:, block(k, b)]) for k in range(K)])
    grad_S = -2 * blockdiag_right(blockdiag_left(np.swapaxes(f.A, 1, 2), G), np.swapaxes(f.B, 1, 2))
    return grad_A, grad_B, grad_S


def run_adam(
    problem: Problem,
    f: Factors,
    iterations: int,
    rng: np.random.Generator,
    lr: float = ADAM_LR,
    patience: int = ADAM_PATIENCE,
    on_sweep: Callable[[int, float], None] | None = None,
) -> tuple[list[dict], int, Factors]:
    """The paper's schedule (spec §5.7). Each iteration ``t``:

    1. one Adam step (``lr``, ``ADAM_BETAS``, ``ADAM_EPS``, bias-corrected moments) on ``A``, ``B`` and the kept
       core values jointly (:func:`adam_gradients`; the core's gradient masked, ``S`` re-masked after);
    2. one discrete update (:func:`update_group`) per tile of the batch: nowag every tile, hessian the tiles
       of column block ``t mod K``; in each tile the group ``flat = p · b/4 + g`` is drawn with probability
       proportional to the L1 norm of the (pre-step, unmasked) core gradient over its 4 entries (plus
       ``TINY``), by one uniform ``rng.random((R, nk))`` per iteration, row block major.

    Not monotone in general; returns the trace, the iterations run and the best iterate seen, and stops after
    ``patience`` iterations without a new best."""
    check_budget(iterations)
    R, b, _ = f.A.shape
    K = f.B.shape[0]
    n_groups = b // GROUP
    beta1, beta2 = ADAM_BETAS
    params = [f.A, f.B, f.S]
    moments = [(np.zeros_like(x), np.zeros_like(x)) for x in params]
    best = f.copy()
    best_loss = problem.loss(f.W_hat())
    trace = [{"sweep": 0, "step": "init", "loss": best_loss}]
    since_best = 0
    done = 0
    for it in range(1, iterations + 1):
        grad_A, grad_B, grad_S = adam_gradients(problem, f)
        for x, grad, (m1, m2) in zip(params, (grad_A, grad_B, grad_S * f.M), moments, strict=True):
            m1 *= beta1
            m1 += (1 - beta1) * grad
            m2 *= beta2
            m2 += (1 - beta2) * grad * grad
            x -= lr * (m1 / (1 - beta1**it)) / (np.sqrt(m2 / (1 - beta2**it)) + ADAM_EPS)
        f.S *= f.M

        ks = list(range(K)) if problem.diagonal else [it % K]
        G = problem.times_H(problem.target - f.W_hat())
        tables = all_group_tables(problem, f)
        draws = rng.random((R, len(ks)))
        for r in range(R):
            for j, k in enumerate(ks):
                tile = np.abs(grad_S[block(r, b), block(k, b)])  # (b, b)
                weights = np.array([np.sum(tile[p, block(g, GROUP)]) for p in range(b) for g in range(n_groups)])
                cdf = np.cumsum(weights + TINY)  # position flat = p · b/4 + g
                flat = min(int(np.sum(cdf < draws[r, j] * cdf[-1])), len(cdf) - 1)
                p, g = divmod(flat, n_groups)
                update_group(f, G[block(r, b), block(k, b)], tables[k], r, k, p, g)

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
# Entry point (spec §1.2, §4.2)
# ----------------------------------------------------------------------------------------------------------
def check_shapes(d_out: int, d_in: int, block_size: int) -> None:
    """Raise ValueError unless the block size is a multiple of 4 dividing both dimensions (spec §1.2)."""
    if block_size <= 0 or block_size % GROUP != 0:
        raise ValueError(f"block size {block_size} must be a positive multiple of 4")
    check_groupable(d_in)
    for name, d in (("output", d_out), ("input", d_in)):
        if d % block_size != 0:
            raise ValueError(
                f"{name} dimension {d} is not divisible by block size {block_size}; pick one that divides it"
            )


def check_options(
    W: np.ndarray,
    gram: np.ndarray,
    proxy: str,
    init: str | None,
    block_size: int,
    sweeps: int | None,
    tol: float,
    schedule: str,
) -> tuple[str, int]:
    """Every check of :func:`factorize`'s input (spec §4.2), as ValueErrors naming the problem: shapes
    (:func:`check_shapes`), a (d_in, d_in) Gram matrix, finite inputs, a known proxy, schedule and baseline, a valid
    budget (:func:`check_budget`). Returns the starting baseline and the sweep budget with the defaults filled in."""
    d_out, d_in = W.shape
    check_shapes(d_out, d_in, block_size)
    if gram.shape != (d_in, d_in):
        raise ValueError(f"Gram matrix shape {gram.shape} does not match the layer's {d_in} inputs")
    if not (np.all(np.isfinite(W)) and np.all(np.isfinite(gram))):
        raise ValueError("the layer or its Gram matrix holds NaN or infinite values")
    if proxy not in DEFAULT_INIT:
        raise ValueError(f"unknown proxy {proxy!r}; choose one of {', '.join(DEFAULT_INIT)}")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    init = init or DEFAULT_INIT[proxy]
    if init not in BASELINES:
        raise ValueError(f"unknown init {init!r}; choose one of {', '.join(BASELINES)}")
    sweeps = DEFAULT_SWEEPS[proxy] if sweeps is None else sweeps
    check_budget(sweeps, tol)
    return init, sweeps


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
    """Factorize layer ``W`` (d_out, d_in) as ``Ŵ = blockdiag(A) · (W' ⊙ M) · blockdiag(B)`` (spec §4.2).

    ``gram`` is the raw calibration Gram matrix ``Xᵀ X`` (d_in, d_in). ``proxy`` picks the loss (``nowag`` or
    ``hessian``), ``init`` the baseline to start from (default NoWag-P for nowag, SparseGPT for hessian),
    ``sweeps`` the cap (default ``DEFAULT_SWEEPS``, 40; iterations for ``schedule="adam"``), ``tol`` the relative
    improvement per sweep at or under which to stop (default ``DEFAULT_TOL``, 0.5 %). Deterministic for a given ``seed``
    (``np.random.default_rng(seed)`` drives the discrete step's visiting order and Adam's group draws).
    The normalisation is folded back at the end: ``A_r ← diag(row_scale_r) A_r``, ``B_k ← B_k diag(col_scale_k)``.
    """
    W = np.asarray(W, dtype=np.float64)
    gram = np.asarray(gram, dtype=np.float64)
    d_out, d_in = W.shape
    init, sweeps = check_options(W, gram, proxy, init, block_size, sweeps, tol, schedule)

    t0 = time.perf_counter()
    problem = make_problem(W, gram, proxy, damping)
    S0, M0 = run_baseline(init, W, gram)
    if not has_two_per_group(M0):
        raise ValueError(f"baseline {init!r} did not keep exactly 2 of every 4 positions")
    f = initial_factors(problem, S0, M0, block_size)
    rng = np.random.default_rng(seed)
    if schedule == "bcd":
        trace, done = run_bcd(problem, f, sweeps, tol, rng, on_sweep)
    else:
        trace, done, f = run_adam(problem, f, sweeps, rng, on_sweep=on_sweep)
    R, b = d_out // block_size, block_size
    A = np.stack([problem.row_scale[block(r, b)][:, None] * f.A[r] for r in range(R)])  # diag(r) A_r
    B = np.stack([f.B[k] * problem.col_scale[block(k, b)][None, :] for k in range(d_in // b)])  # B_k diag(c)
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
