"""Property checkers: plain functions that return a list of violations (empty = the property holds).

The tests call them on generated layers; the mutation tests call the same functions with a deliberately wrong
step and assert that they report something. Everything is computed from first principles, independently of the
reference's own bookkeeping: gradients of ``L = tr((T − A S B) H (T − A S B)ᵀ)`` are formed here, and the
discrete step is compared with a brute-force search over the 6 supports that evaluates the true loss.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from armor_ref.factorization import (
    TIE_RTOL,
    ArmorResult,
    Factors,
    a_step,
    b_step,
    blockdiag_dense,
    blockdiag_left,
    blockdiag_right,
    core_values_step,
    diagonal_blocks,
    reconstruct,
)
from armor_ref.masks import GROUP, SUPPORTS, has_two_per_group, is_2of4
from armor_ref.objectives import Problem
from verification.compat import run_update_groups

#: relative tolerance for "the loss did not increase"
MONOTONE_RTOL = 1e-9
#: relative tolerance for "the gradient of a block vanishes" (A- and B-steps: direct solves)
GRAD_RTOL = 1e-6
#: the core step is an iterative (CG) solve; allow a little more
CORE_GRAD_RTOL = 1e-6

Step = Callable[[Problem, Factors], None]


# ----------------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------------
def times_H(problem: Problem, X: np.ndarray) -> np.ndarray:
    return X @ problem.H


def relative(value: float, scale: float, floor: float = 1e-300) -> float:
    """``value / scale`` with ``0/0 = 0``."""
    return value / scale if scale > floor else (0.0 if value <= floor else np.inf)


def not_increased(before: float, after: float, rtol: float = MONOTONE_RTOL, atol: float = 0.0) -> bool:
    """``after ≤ before`` up to ``rtol · before + atol``."""
    return after <= before + rtol * abs(before) + atol


#: absolute tolerance, relative to the data's own scale ``L(Ŵ = 0) = ‖T‖²_H``: about one ulp of it. Near an exact
#: fit the loss is rounding noise — ``Ŵ`` is a product of factors that can be 100× larger than ``T`` and come
#: from solves with condition numbers up to 1e12 — so differences below this floor are not compared
#: (see PROOF.md, "Tolerances"; the smallest rise seen was 4e-14 at ``L(0) = 2.3e4``, i.e. 2e-18 of it).
NOISE_FLOOR = 1e-16


def loss_floor(problem: Problem) -> float:
    """``NOISE_FLOOR · L(Ŵ = 0)``: the absolute tolerance for comparing losses of this problem."""
    return NOISE_FLOOR * problem.loss(np.zeros_like(problem.target))


def perturbed(f: Factors, rng: np.random.Generator, scale: float = 0.3) -> Factors:
    """A generic point near ``f`` (e.g. from ``initial_factors``): ``A``, ``B`` and the kept core values plus
    noise, the mask unchanged. The exactness of a step must not depend on starting at ``A = B = I``."""
    g = f.copy()
    g.A += scale * rng.standard_normal(g.A.shape)
    g.B += scale * rng.standard_normal(g.B.shape)
    spread = float(np.std(g.S[g.M])) if g.M.any() else 1.0
    g.S += scale * spread * rng.standard_normal(g.S.shape) * g.M
    return g


# ----------------------------------------------------------------------------------------------------------
# Gradients of L = tr((T − A S B) H (T − A S B)ᵀ), each split as 2 · (model term − target term)
# ----------------------------------------------------------------------------------------------------------
EPS = float(np.finfo(np.float64).eps)
#: a solve of a system with condition number κ is accurate to about ε·κ; allow KAPPA_FACTOR·ε·κ ...
KAPPA_FACTOR = 1e3
#: ... but never more than this (a wrong update leaves a relative gradient of order 1)
KAPPA_CAP = 1e-2


def pseudo_condition(M: np.ndarray) -> np.ndarray:
    """Condition number of symmetric PSD matrices (..., n, n) on their numerical range: ``λ_max / λ_min`` over
    the eigenvalues above ``1e-12 · λ_max`` (the reference's pseudo-inverse cut-off); 1 for a zero matrix."""
    w = np.linalg.eigvalsh(M)
    top = np.max(w, axis=-1, keepdims=True)
    kept = np.where(w > 1e-12 * top, w, np.inf)
    low = np.min(kept, axis=-1)
    return np.where(np.isfinite(low) & (top[..., 0] > 0), top[..., 0] / np.where(np.isfinite(low), low, 1.0), 1.0)


@dataclass
class BlockGradient:
    """``grad = 2 (model − target)`` for a batch of blocks, ``scale = 2 (‖model‖ + ‖target‖)`` per block and
    ``kappa``, the condition number of the linear system that makes the block's gradient vanish."""

    grad: np.ndarray  # (n_blocks, ...)
    scale: np.ndarray  # (n_blocks,)
    kappa: np.ndarray  # (n_blocks,)

    def ratios(self) -> np.ndarray:
        """``‖grad_blk‖ / scale_blk``; blocks whose scale is negligible next to the largest count 0."""
        norms = np.sqrt(np.sum(self.grad.reshape(len(self.grad), -1) ** 2, axis=1))
        floor = 1e-13 * float(np.max(self.scale, initial=0.0))
        return np.array([relative(float(n), float(s), floor) for n, s in zip(norms, self.scale, strict=True)])

    def allowed(self, rtol: float) -> np.ndarray:
        """Per block: ``rtol``, or the accuracy a float64 solve can reach, ``KAPPA_FACTOR · ε · κ`` (≤ the cap)."""
        return np.minimum(KAPPA_CAP, np.maximum(rtol, KAPPA_FACTOR * EPS * self.kappa))

    def violations(self, rtol: float, what: str) -> list[str]:
        ratios, allowed = self.ratios(), self.allowed(rtol)
        return [
            f"{what} (block {i}): relative gradient {ratios[i]:.3e} > allowed {allowed[i]:.1e} "
            f"(κ = {self.kappa[i]:.1e})"
            for i in np.flatnonzero(~(ratios <= allowed))
        ]

    def block(self, i: int) -> BlockGradient:
        return BlockGradient(self.grad[i : i + 1], self.scale[i : i + 1], self.kappa[i : i + 1])


def _split(model: np.ndarray, target: np.ndarray, kappa: np.ndarray) -> BlockGradient:
    n = len(model)
    scale = 2 * (np.linalg.norm(model.reshape(n, -1), axis=1) + np.linalg.norm(target.reshape(n, -1), axis=1))
    return BlockGradient(2 * (model - target), scale, kappa)


def grad_A(problem: Problem, f: Factors) -> BlockGradient:
    """``∂L/∂A_r = −2 ((T − Ŵ) H)_r P_rᵀ`` with ``P = S B``; the system is ``A_r (P_r H P_rᵀ) = T_r H P_rᵀ``."""
    R, b, _ = f.A.shape
    P = blockdiag_right(f.S, f.B).reshape(R, b, -1)
    TH = times_H(problem, problem.target).reshape(R, b, -1)
    WH = times_H(problem, f.W_hat()).reshape(R, b, -1)
    Pt = np.swapaxes(P, 1, 2)
    kappa = pseudo_condition(times_H(problem, P.reshape(R * b, -1)).reshape(R, b, -1) @ Pt)
    return _split(WH @ Pt, TH @ Pt, kappa)


def grad_B(problem: Problem, f: Factors) -> BlockGradient:
    """``∂L/∂B_k = −2 Q_kᵀ ((T − Ŵ) H)[:, cols k]`` with ``Q = A S``; the system is
    ``Q_kᵀQ_k B_k H_kk = Q_kᵀ (…)``, condition ``κ(Q_kᵀQ_k) · κ(H_kk)``."""
    K, b, _ = f.B.shape
    d_out = f.S.shape[0]
    Qt = blockdiag_left(f.A, f.S).reshape(d_out, K, b).transpose(1, 2, 0)  # (K, b, d_out) = Q_kᵀ
    TH = times_H(problem, problem.target).reshape(d_out, K, b).transpose(1, 0, 2)
    WH = times_H(problem, f.W_hat()).reshape(d_out, K, b).transpose(1, 0, 2)
    kappa = pseudo_condition(Qt @ np.swapaxes(Qt, 1, 2)) * pseudo_condition(diagonal_blocks(problem.H, b))
    return _split(Qt @ WH, Qt @ TH, kappa)


def grad_S(problem: Problem, f: Factors) -> BlockGradient:
    """Masked ``∂L/∂S = −2 M ⊙ Aᵀ (T − Ŵ) H Bᵀ``, one block per row block of the core; the system
    ``M ⊙ (A_rᵀA_r S_r C) = …`` with ``C = B H Bᵀ`` has condition at most ``κ(A_rᵀA_r) · κ(C)``."""
    R, b, _ = f.A.shape
    At, Bt = np.swapaxes(f.A, 1, 2), np.swapaxes(f.B, 1, 2)

    def wrap(X: np.ndarray) -> np.ndarray:
        return (f.M * blockdiag_right(blockdiag_left(At, times_H(problem, X)), Bt)).reshape(R, b, -1)

    Bd = blockdiag_dense(f.B)
    kappa = pseudo_condition(At @ f.A) * float(pseudo_condition(Bd @ problem.H @ Bd.T))
    return _split(wrap(f.W_hat()), wrap(problem.target), kappa)


# ----------------------------------------------------------------------------------------------------------
# Continuous steps: non-increasing and exact block minimisers
# ----------------------------------------------------------------------------------------------------------
def check_a_step(problem: Problem, f: Factors, step: Step = a_step, rtol: float = GRAD_RTOL) -> list[str]:
    """After the A-step the loss has not increased and ``∂L/∂A = 0``: it is the exact minimiser over ``A``."""
    g = f.copy()
    before = problem.loss(g.W_hat())
    step(problem, g)
    after = problem.loss(g.W_hat())
    out = []
    if not not_increased(before, after, atol=loss_floor(problem)):
        out.append(f"A-step increased the loss: {before!r} -> {after!r}")
    return out + grad_A(problem, g).violations(rtol, "A-step is not a minimiser")


def check_b_step(problem: Problem, f: Factors, step: Step = b_step, rtol: float = GRAD_RTOL) -> list[str]:
    """The B-step minimises exactly over each ``B_k`` in turn (Gauss–Seidel; all at once for nowag).

    Checked at the Gauss–Seidel intermediate points: with ``B⁽ᵏ⁾`` = new blocks ``0..k``, old blocks
    ``k+1..K−1``, the gradient with respect to ``B_k`` at ``B⁽ᵏ⁾`` must vanish. For nowag the blocks do not
    interact, so this is the same as ``∂L/∂B = 0`` at the result."""
    g = f.copy()
    before = problem.loss(g.W_hat())
    step(problem, g)
    after = problem.loss(g.W_hat())
    out = []
    if not not_increased(before, after, atol=loss_floor(problem)):
        out.append(f"B-step increased the loss: {before!r} -> {after!r}")
    for k in range(f.B.shape[0]):
        mid = g.copy()
        mid.B[k + 1 :] = f.B[k + 1 :]
        out += grad_B(problem, mid).block(k).violations(rtol, f"B-step is not a minimiser over B_{k}")
    return out


def exact_core_step(problem: Problem, f: Factors) -> None:
    """The core-values step run to convergence (many CG iterations, a tiny residual target)."""
    core_values_step(problem, f, max_iter=20 * f.M.size, rtol=1e-15)


def check_core_step(
    problem: Problem, f: Factors, step: Step = exact_core_step, rtol: float = CORE_GRAD_RTOL, exact: bool = True
) -> list[str]:
    """The core step keeps the mask, keeps ``S`` zero off the mask, does not increase the loss and, run to
    convergence (``exact``), makes the masked gradient ``M ⊙ ∂L/∂S`` vanish."""
    g = f.copy()
    before = problem.loss(g.W_hat())
    step(problem, g)
    after = problem.loss(g.W_hat())
    out = []
    if not np.array_equal(g.M, f.M):
        out.append("core step changed the mask")
    if np.any(g.S[~g.M] != 0):
        out.append("core step wrote outside the mask")
    if not not_increased(before, after, atol=loss_floor(problem)):
        out.append(f"core step increased the loss: {before!r} -> {after!r}")
    if exact:
        out += grad_S(problem, g).violations(rtol, "core step is not a minimiser")
    return out


def check_stationary_continuous(problem: Problem, f: Factors, rtol: float) -> list[str]:
    """All three continuous gradients vanish (to ``rtol``) at ``f``."""
    out = []
    for name, grad in (("A", grad_A), ("B", grad_B), ("S", grad_S)):
        out += grad(problem, f).violations(rtol, f"not stationary in {name}")
    return out


# ----------------------------------------------------------------------------------------------------------
# The discrete step against brute force
# ----------------------------------------------------------------------------------------------------------
def _sqrt_H(problem: Problem) -> np.ndarray:
    """A factor ``F`` with ``H = F Fᵀ`` (H is PSD), so ``tr(E H Eᵀ) = ‖E F‖²``."""
    lam, V = np.linalg.eigh(problem.H)
    return V * np.sqrt(np.maximum(lam, 0.0))[None, :]


#: the reference's discrete tie margin (``choose_support``: ``TIE_RTOL · (|cost_current| + |cost_now|)``), doubled
TIE_MARGIN = 2 * TIE_RTOL


def local_loss(problem: Problem, W_hat_T: np.ndarray, r: int, k: int, b: int) -> float:
    """The part of the loss that one group of tile ``(r, k)`` can change.

    nowag (``H`` diagonal): the loss is a sum over entries, so the tile's own terms. hessian: rows of the error
    are independent under ``tr(E H Eᵀ)``, so the terms of the rows of block ``r``. The full loss is this plus a
    constant that the group does not touch; using the local part avoids cancellation in the comparison."""
    rows = slice(r * b, (r + 1) * b)
    E = problem.target[rows] - W_hat_T[rows]
    if problem.diagonal:
        cols = slice(k * b, (k + 1) * b)
        return float(np.sum(np.diag(problem.H)[None, cols] * E[:, cols] ** 2))
    return float(np.sum((E @ problem.H) * E))


def brute_force_group(problem: Problem, f: Factors, r: int, k: int, p: int, g: int) -> np.ndarray:
    """True loss (its local part, :func:`local_loss`) of each of the 6 supports of one group, each with its
    optimal values, everything else fixed.

    The group is row ``r·b + p`` of the core and columns ``k·b + 4g … +3``. Its values enter ``Ŵ`` linearly, so
    for each support the optimal 2 values solve a small least-squares problem in ``E F`` (``H = F Fᵀ``); the loss
    is then evaluated on the rebuilt ``Ŵ``. Returns the 6 losses in ``SUPPORTS`` order."""
    b = f.block_size
    rows = slice(r * b, (r + 1) * b)
    F = _sqrt_H(problem)
    row = r * b + p
    cols = k * b + GROUP * g + np.arange(GROUP)
    base = f.copy()
    base.S[row, cols] = 0.0
    E0F = ((problem.target - base.W_hat()) @ F)[rows]
    a = f.A[r][:, p]  # column p of A_r
    B_g = f.B[k][GROUP * g + np.arange(GROUP), :]  # rows 4g..4g+3 of B_k
    columns = []  # a unit of value t adds a ⊗ B_g[t] to tile (r, k) of Ŵ
    for t in range(GROUP):
        D = np.zeros((b, problem.target.shape[1]))
        D[:, k * b : (k + 1) * b] = np.outer(a, B_g[t])
        columns.append((D @ F).ravel())
    design = np.stack(columns, axis=1)  # (b · d_in, 4)
    losses = np.empty(len(SUPPORTS))
    for sid, s in enumerate(SUPPORTS):
        u, *_ = np.linalg.lstsq(design[:, s], E0F.ravel(), rcond=None)
        trial = base.copy()
        trial.S[row, cols[s]] = u
        losses[sid] = local_loss(problem, trial.W_hat(), r, k, b)
    return losses


def check_discrete_batch(
    problem: Problem,
    f: Factors,
    ks: slice,
    p: np.ndarray,
    g: np.ndarray,
    rtol: float = 1e-9,
    update: Callable[..., int] | None = None,
) -> list[str]:
    """Run one batch of ``update_group`` calls (one group per tile of row blocks × ``ks``) the way the discrete step
    does, then check against brute force: each group now has the cheapest of its 6 supports (true loss, optimal
    values); a group's support changed only with a strict decrease; the mask stays 2:4; the loss did not rise;
    the running ``G = (T − Ŵ) H`` is still correct."""
    b = f.block_size
    R = f.A.shape[0]
    nk = ks.stop - ks.start
    col_range = slice(ks.start * b, ks.stop * b)
    G = times_H(problem, problem.target - f.W_hat())
    G_tiles = G[:, col_range].reshape(R, b, nk, b).transpose(0, 2, 1, 3).copy()
    new = f.copy()
    before = problem.loss(f.W_hat())
    run_update_groups(new, G_tiles, f.B[ks], diagonal_blocks(problem.H, b)[ks], ks, p, g, update)
    W_new = new.W_hat()
    after = problem.loss(W_new)
    out = []
    if not has_two_per_group(new.M) or np.any(new.S[~new.M] != 0):
        out.append("discrete step broke the 2:4 layout")
    if not not_increased(before, after, rtol, loss_floor(problem)):
        out.append(f"discrete step increased the loss: {before!r} -> {after!r}")
    G_now = times_H(problem, problem.target - W_new)[:, col_range].reshape(R, b, nk, b).transpose(0, 2, 1, 3)
    G_scale = float(np.abs(times_H(problem, problem.target)).max()) + float(np.abs(times_H(problem, W_new)).max())
    if not np.allclose(G_tiles, G_now, rtol=1e-7, atol=1e-9 * G_scale):
        out.append("update_group left G = (T − Ŵ) H out of date")
    W_old = f.W_hat()
    for r in range(R):
        for j, k in enumerate(range(ks.start, ks.stop)):
            pj, gj = int(p[r, j]), int(g[r, j])
            losses = brute_force_group(problem, new, r, k, pj, gj)
            here_before = local_loss(problem, W_old, r, k, b)
            here_after = local_loss(problem, W_new, r, k, b)
            zero = local_loss(problem, np.zeros_like(W_new), r, k, b)
            without = new.copy()  # the group's own energy: the loss with its values set to 0
            without.S[r * b + pj, k * b + GROUP * gj + np.arange(GROUP)] = 0.0
            energy = local_loss(problem, without.W_hat(), r, k, b)
            # the reference keeps the current support unless another beats it by its tie margin
            # 1e-12 · (|cost_current| + |cost_now|), and those costs are of the size of the group's energy
            tol = rtol * here_before + TIE_MARGIN * energy + NOISE_FLOOR * zero
            if here_after > losses.min() + tol:
                best = SUPPORTS[np.argmin(losses)].tolist()
                out.append(
                    f"group (r={r}, k={k}, p={pj}, g={gj}): loss {here_after!r} but support {best} "
                    f"reaches {losses.min()!r}"
                )
            row, cols = r * b + pj, k * b + GROUP * gj + np.arange(GROUP)
            if not np.array_equal(new.M[row, cols], f.M[row, cols]) and not here_after < here_before:
                out.append(
                    f"group (r={r}, k={k}, p={pj}, g={gj}): support changed without a strict decrease "
                    f"({here_before!r} -> {here_after!r})"
                )
    return out


# ----------------------------------------------------------------------------------------------------------
# Whole results
# ----------------------------------------------------------------------------------------------------------
def check_trace_monotone(trace: Sequence[dict], rtol: float = MONOTONE_RTOL, atol: float = 0.0) -> list[str]:
    """Every step's computed loss is ≤ the previous one, up to ``rtol`` relative and ``atol`` absolute.

    The reference undoes nothing, so a step that raised the loss shows in its trace as it happened."""
    out = []
    for prev, cur in itertools.pairwise(trace):
        if not not_increased(prev["loss"], cur["loss"], rtol, atol):
            out.append(f"loss rose at sweep {cur['sweep']} step {cur['step']}: {prev['loss']!r} -> {cur['loss']!r}")
    return out


def check_result(result: ArmorResult, proxy_loss: Callable[[np.ndarray], float]) -> list[str]:
    """Structure and guarantee of a finished factorization.

    ``proxy_loss`` maps a layer-space ``Ŵ`` to the proxy loss, computed independently of the result."""
    out = []
    d_out, d_in = result.S.shape
    b = result.block_size
    if result.A.shape != (d_out // b, b, b) or result.B.shape != (d_in // b, b, b):
        out.append(f"factor shapes {result.A.shape}, {result.B.shape} do not fit {result.S.shape} with b={b}")
    if not has_two_per_group(result.M):
        out.append("mask does not keep exactly 2 of every 4")
    if not is_2of4(result.S) or np.any(result.S[~result.M] != 0):
        out.append("core is not 2:4 on its mask")
    W_hat = result.W_hat()
    if not np.array_equal(W_hat, reconstruct(result.A, result.S, result.B)):
        out.append("W_hat() differs from reconstruct(A, S, B)")
    steps = [e["step"] for e in result.trace]
    if result.schedule == "bcd" and steps != ["init"] + ["A", "B", "core", "discrete"] * result.sweeps:
        out.append(f"trace {steps} is not one entry per step for {result.sweeps} sweeps")
    floor = NOISE_FLOOR * proxy_loss(np.zeros_like(W_hat))
    if result.schedule == "bcd":
        out += check_trace_monotone(result.trace, atol=floor)
    measured = proxy_loss(W_hat)
    if not np.isclose(measured, result.loss, rtol=1e-7, atol=1e6 * floor):
        out.append(f"reported loss {result.loss!r} but Ŵ has proxy loss {measured!r}")
    if not not_increased(result.baseline_loss, result.loss, atol=floor):
        out.append(f"ARMOR loss {result.loss!r} above its baseline's {result.baseline_loss!r}")
    return out


# ----------------------------------------------------------------------------------------------------------
# Convergence and block-wise stationarity
# ----------------------------------------------------------------------------------------------------------
def best_group_gain(problem: Problem, f: Factors) -> float:
    """The largest decrease of the loss that re-choosing one group (support and values) could still bring,
    by brute force over every group of the core. 0 at a discrete fixed point."""
    b = f.block_size
    d_out, d_in = f.S.shape
    W_hat = f.W_hat()
    gain = 0.0
    for row in range(d_out):
        r, p = divmod(row, b)
        for col in range(0, d_in, GROUP):
            k, g = divmod(col, b)
            losses = brute_force_group(problem, f, r, k, p, g // GROUP)
            gain = max(gain, local_loss(problem, W_hat, r, k, b) - float(losses.min()))
    return gain


def sweep_losses(trace: Sequence[dict]) -> np.ndarray:
    """The loss at the start and after every sweep of a ``run_bcd`` trace."""
    return np.array([trace[0]["loss"]] + [e["loss"] for e in trace if e["step"] == "discrete"])


def check_converged(problem: Problem, f: Factors, trace: Sequence[dict], shrink: float = 1e-3) -> list[str]:
    """After a long ``run_bcd`` with ``tol = 0`` (state ``f``, its ``trace``):

    * the per-sweep improvements are ≥ 0 and the last one is at most ``shrink ×`` the total decrease;
    * the final iterate is block-wise stationary to the accuracy that the last improvement allows: every
      continuous gradient is at most ``max(1e-6, √(last improvement / L))`` relative (the sufficient-decrease
      bound of PROOF.md, Lemma 5: an exact block step removes ``gᵀM⁺g/4 ≥ ‖g‖²/(4λ_max)`` of the loss), and
      no single group can decrease the loss by more than ``max(√(L · last improvement), 1e-9 · L)`` (a group's
      best cost moves by about ‖gradient‖ · ‖step‖ when the other blocks move; 0 at a fixed point).
    """
    out = []
    losses = sweep_losses(trace)
    floor = loss_floor(problem)
    improvements = -np.diff(losses)
    if np.any(improvements < -(MONOTONE_RTOL * losses[:-1] + floor)):
        out.append(f"a sweep increased the loss: {improvements.min()!r}")
    total = losses[0] - losses[-1]
    last = max(float(improvements[-1]), 0.0) if len(improvements) else 0.0
    if last > shrink * total + floor:
        out.append(f"improvements did not shrink: last {last!r}, total {total!r}")
    L = max(float(losses[-1]), floor, 1e-300)
    rtol = max(1e-6, float(np.sqrt(last / L)))
    out += check_stationary_continuous(problem, f, rtol)
    gain = best_group_gain(problem, f)
    if gain > max(float(np.sqrt(L * last)), 1e-9 * L) + floor:
        out.append(f"a single group can still decrease the loss by {gain!r} (last sweep improved {last!r})")
    return out
