"""Checkers for the low-rank objectives (PROOF.md §8): plain functions returning a list of violations.

Every objective is written here, from the activations and independently of :mod:`armor_ref.lowrank`'s Gram
formulas, as one stacked least-squares problem

    min_{rank W' ≤ k} ‖P Wᵀ − Q W'ᵀ‖²_F,      P, Q (n, d_in),

1. plain SVD: ``P = Q = I``;
2. SVD-LLM: ``P = Q = [X; √δ I]`` (``δ = λ · mean_j ‖X[:, j]‖²``);
3. shifted: ``P = Q = [X'; √δ' I]``;
4. anchored: ``P = [X; √δ' I]``, ``Q = [X'; √δ' I]`` (``δ' = λ · mean_j ‖X'[:, j]‖²``);

the ``√δ I`` rows being the damping (``δ ‖W − W'‖²_F``). Its optimal value has a second, solver-free formula:
with ``Q = Q₀ R`` (thin QR, ``R`` invertible because of the damping rows),
``‖P Wᵀ − Q W'ᵀ‖² = ‖(I − Q₀Q₀ᵀ) P Wᵀ‖² + ‖Q₀ᵀ P Wᵀ − R W'ᵀ‖²`` and ``R W'ᵀ`` ranges over all rank-≤k matrices,
so by Eckart–Young the minimum is ``‖(I − Q₀Q₀ᵀ) P Wᵀ‖² + Σ_{i>k} σ_i(Q₀ᵀ P Wᵀ)²``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from armor_ref.lowrank import LowRank, aa_svd, plain_svd, shifted_svd, svd_llm
from verification.checkers import relative
from verification.strategies import TwoStreamLayer

#: a loss may exceed the optimum by this fraction of it, plus ``ABS_RTOL ·`` the loss of ``W' = 0``
OPT_RTOL = 1e-9
#: about 100 ulps of the data's own scale ``‖P Wᵀ‖²``: below it, losses are rounding noise
ABS_RTOL = 1e-12
#: the factor gradients, relative to the size of their two terms (model and target), at the closed form
GRAD_RTOL = 1e-7

#: a solver for one objective: (W, two-stream layer, rank, damping) → the stored factors
Solver = Callable[[np.ndarray, TwoStreamLayer, int, float], LowRank]

SOLVERS: dict[str, Solver] = {
    "svd": lambda W, layer, k, damping: plain_svd(W, k),
    "svd-llm": lambda W, layer, k, damping: svd_llm(W, layer.G, k, damping),
    "shifted": lambda W, layer, k, damping: shifted_svd(W, layer.G_shift, k, damping),
    "aa-svd": lambda W, layer, k, damping: aa_svd(W, layer.G_shift, layer.C, k, damping),
}


@dataclass(frozen=True)
class StackedProblem:
    """``min_{rank W' ≤ k} ‖P Wᵀ − Q W'ᵀ‖²_F`` (see the module docstring)."""

    objective: str
    W: np.ndarray  # (d_out, d_in)
    P: np.ndarray  # (n, d_in)
    Q: np.ndarray  # (n, d_in)
    k: int

    def loss(self, W_low: np.ndarray) -> float:
        return float(np.sum((self.P @ self.W.T - self.Q @ W_low.T) ** 2))

    def gradient(self, W_low: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``∇L(W') = 2 (Q W'ᵀ − P Wᵀ)ᵀ Q`` (d_out, d_in), returned as its two terms (model, target)."""
        return 2.0 * (self.Q @ W_low.T).T @ self.Q, 2.0 * (self.P @ self.W.T).T @ self.Q

    @property
    def scale(self) -> float:
        """The loss of ``W' = 0``, ``‖P Wᵀ‖²``: the data's own scale."""
        return float(np.sum((self.P @ self.W.T) ** 2))

    def optimum(self) -> float:
        """The minimum over rank ≤ k, by QR and Eckart–Young (no Cholesky, no Gram matrix)."""
        Q0, _ = np.linalg.qr(self.Q)  # (n, d_in), orthonormal columns spanning range(Q)
        PWt = self.P @ self.W.T  # (n, d_out)
        inside = Q0.T @ PWt  # (d_in, d_out)
        outside = float(np.sum((PWt - Q0 @ inside) ** 2))
        s = np.linalg.svd(inside, compute_uv=False)
        return outside + float(np.sum(s[self.k :] ** 2))

    def tolerance(self, value: float) -> float:
        return OPT_RTOL * abs(value) + ABS_RTOL * self.scale


def damping_rows(X: np.ndarray, damping: float) -> np.ndarray:
    """``√δ I`` (d_in, d_in) with ``δ = λ · mean_j ‖X[:, j]‖²`` (``λ`` for all-zero inputs)."""
    mean_energy = float(np.mean(np.sum(X**2, axis=0)))
    delta = damping * (mean_energy if mean_energy > 0 else 1.0)
    return np.sqrt(delta) * np.eye(X.shape[1])


def stacked_problem(layer: TwoStreamLayer, objective: str, k: int, damping: float) -> StackedProblem:
    """The objective's stacked least-squares form, built from the activations ``X`` and ``X'``."""
    X, Xs = layer.X, layer.X_shift
    if objective == "svd":
        P = Q = np.eye(X.shape[1])
    elif objective == "svd-llm":
        P = Q = np.vstack([X, damping_rows(X, damping)])
    elif objective == "shifted":
        P = Q = np.vstack([Xs, damping_rows(Xs, damping)])
    elif objective == "aa-svd":
        rows = damping_rows(Xs, damping)
        P, Q = np.vstack([X, rows]), np.vstack([Xs, rows])
    else:
        raise ValueError(f"unknown objective {objective!r}")
    return StackedProblem(objective, layer.W, P, Q, k)


def rank_k_candidates(problem: StackedProblem, f: LowRank, rng: np.random.Generator) -> list[tuple[str, np.ndarray]]:
    """Rank-≤k challengers near and far from ``W' = U V``:

    * the factors perturbed, ``(U + t ΔU)(V + t ΔV)``, for ``t`` from ``1e-6`` to ``1`` (relative) and both signs;
    * tangent directions of the rank-k manifold, ``T = ΔU V + U ΔV``, brought back onto it by truncating
      ``W' + t T`` to rank k (the metric-projection retraction), same ``t`` and signs;
    * exact block minimisers: the best ``U`` for the found ``V``, and the best ``V`` for the found ``U``
      (each a linear least-squares problem, solved by ``lstsq``)."""
    U, V = f
    W_low = U @ V
    norm_U, norm_V, norm_W = (max(float(np.linalg.norm(a)), 1e-300) for a in (U, V, W_low))
    out: list[tuple[str, np.ndarray]] = []
    for t in (1e-6, 1e-3, 1e-1, 1.0):
        for sign in (1.0, -1.0):
            dU, dV = rng.standard_normal(U.shape), rng.standard_normal(V.shape)
            dU *= sign * t * norm_U / np.linalg.norm(dU)
            dV *= sign * t * norm_V / np.linalg.norm(dV)
            out.append((f"factors t={sign * t:g}", (U + dU) @ (V + dV)))
            T = dU @ V + U @ dV
            step = sign * t * norm_W / max(float(np.linalg.norm(T)), 1e-300)
            u, s, vt = np.linalg.svd(W_low + step * T, full_matrices=False)
            out.append((f"tangent t={sign * t:g}", (u[:, : problem.k] * s[: problem.k]) @ vt[: problem.k]))
    target = problem.P @ problem.W.T  # (n, d_out)
    # best U for V: min_U ‖target − (Q Vᵀ) Uᵀ‖
    Ut = np.linalg.lstsq(problem.Q @ V.T, target, rcond=None)[0]  # (k, d_out)
    out.append(("best U for V", Ut.T @ V))
    # best V for U: min_Z ‖target − Q Z Uᵀ‖, Z = Vᵀ (d_in, k): Z = Q⁺ target (U⁺)ᵀ
    Z = np.linalg.pinv(problem.Q) @ target @ np.linalg.pinv(U).T
    out.append(("best V for U", U @ Z.T))
    return out


def check_lowrank_solution(problem: StackedProblem, f: LowRank, seed: int = 0) -> list[str]:
    """Violations of "``f`` minimises ``problem`` over rank ≤ k" (empty = none):

    * shapes ``U`` (d_out, k), ``V`` (k, d_in), finite;
    * the loss equals the solver-free optimum (:meth:`StackedProblem.optimum`) within tolerance;
    * first order: the factor gradients ``∇L Vᵀ`` and ``Uᵀ ∇L`` vanish (relative to their two terms);
    * no challenger of :func:`rank_k_candidates` has a lower loss."""
    d_out, d_in = problem.W.shape
    U, V = f
    if U.shape != (d_out, problem.k) or V.shape != (problem.k, d_in):
        return [f"factor shapes {U.shape}, {V.shape}; expected ({d_out}, {problem.k}), ({problem.k}, {d_in})"]
    if not (np.all(np.isfinite(U)) and np.all(np.isfinite(V))):
        return ["non-finite factors"]
    out = []
    W_low = U @ V
    loss, best = problem.loss(W_low), problem.optimum()
    if abs(loss - best) > problem.tolerance(best):
        out.append(f"loss {loss:.12g} is not the rank-{problem.k} optimum {best:.12g} (scale {problem.scale:.3g})")
    model, target = problem.gradient(W_low)
    for name, grad, size in (
        ("U", (model - target) @ V.T, np.linalg.norm(model @ V.T) + np.linalg.norm(target @ V.T)),
        ("V", U.T @ (model - target), np.linalg.norm(U.T @ model) + np.linalg.norm(U.T @ target)),
    ):
        rel = relative(float(np.linalg.norm(grad)), float(size))
        if rel > GRAD_RTOL:
            out.append(f"gradient with respect to {name} is {rel:.2e} of its terms")
    for name, candidate in rank_k_candidates(problem, f, np.random.default_rng(seed)):
        other = problem.loss(candidate)
        if other < loss - problem.tolerance(loss):
            out.append(f"{name}: loss {other:.12g} below the solution's {loss:.12g}")
    return out
