"""Deliberately wrong updates, for the mutation tests: each breaks one lemma of PROOF.md in a way that a
plausible coding slip would. The suite's checkers must notice every one of them."""

from __future__ import annotations

import dataclasses

import numpy as np

from armor_ref.factorization import Factors, blockdiag_left, blockdiag_right, psd_pinv
from armor_ref.objectives import Problem


def _blocks(f: Factors) -> tuple[np.ndarray, np.ndarray]:
    """``Q_k`` (K, d_out, b) with ``Q = A S``, and the pseudo-inverses ``(Q_kᵀQ_k)⁺`` (K, b, b)."""
    K, b, _ = f.B.shape
    Q = blockdiag_left(f.A, f.S)
    Qk = Q.reshape(Q.shape[0], K, b).transpose(1, 0, 2)
    return Qk, psd_pinv(np.swapaxes(Qk, 1, 2) @ Qk)


def b_step_weights_left_in(problem: Problem, f: Factors) -> None:
    """nowag B-step with the column weights ``h_j`` left in: ``ΔB_k = (QᵀQ)⁻¹ Qᵀ E_k D_k`` (they must cancel)."""
    K, b, _ = f.B.shape
    Qk, QtQ_pinv = _blocks(f)
    E = (problem.target - f.W_hat()) * np.diag(problem.H)[None, :]
    Ek = E.reshape(E.shape[0], K, b).transpose(1, 0, 2)
    f.B += QtQ_pinv @ (np.swapaxes(Qk, 1, 2) @ Ek)


def b_step_unweighted(problem: Problem, f: Factors) -> None:
    """hessian B-step solved as unweighted least squares (``H`` ignored): the nowag formula used for hessian."""
    K, b, _ = f.B.shape
    Qk, QtQ_pinv = _blocks(f)
    E = problem.target - f.W_hat()
    Ek = E.reshape(E.shape[0], K, b).transpose(1, 0, 2)
    f.B += QtQ_pinv @ (np.swapaxes(Qk, 1, 2) @ Ek)


def b_step_without_Hkk_inverse(problem: Problem, f: Factors) -> None:
    """hessian Gauss–Seidel B-step that forgets the ``H_kk⁻¹`` factor: ``ΔB_k = (QᵀQ)⁻¹ Qᵀ G_k``."""
    K, b, _ = f.B.shape
    Qk, QtQ_pinv = _blocks(f)
    G = (problem.target - f.W_hat()) @ problem.H
    for k in range(K):
        cols = slice(k * b, (k + 1) * b)
        dB = QtQ_pinv[k] @ Qk[k].T @ G[:, cols]
        f.B[k] += dB
        G -= (Qk[k] @ dB) @ problem.H[cols, :]


def a_step_without_H(problem: Problem, f: Factors) -> None:
    """A-step that forgets ``H``: ``A_r = T_r P_rᵀ (P_r P_rᵀ)⁻¹`` (plain least squares)."""
    R, b, _ = f.A.shape
    P = blockdiag_right(f.S, f.B).reshape(R, b, -1)
    Pt = np.swapaxes(P, 1, 2)
    gram = P @ Pt
    numer = problem.target.reshape(R, b, -1) @ Pt
    f.A += (numer - f.A @ gram) @ psd_pinv(gram)


def core_step_without_H(problem: Problem, f: Factors) -> None:
    """The reference core step, run to convergence, on the loss with ``H`` replaced by ``I`` (``H`` forgotten)."""
    from armor_ref.factorization import core_values_step

    forgetful = dataclasses.replace(problem, H=np.eye(problem.H.shape[0]))
    core_values_step(forgetful, f, max_iter=20 * f.M.size, rtol=1e-15)


def update_groups_sign_slip(
    f: Factors, G_tiles: np.ndarray, tables: object, ks: slice, p: np.ndarray, g: np.ndarray
) -> int:
    """The reference ``update_groups`` fed the residual with the wrong sign (``(Ŵ − T) H``)."""
    from armor_ref import factorization

    flipped = -G_tiles
    changed = factorization.update_groups(f, flipped, tables, ks, p, g)
    G_tiles[:] = -flipped
    return changed
