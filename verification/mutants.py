"""Deliberately wrong updates, for the mutation tests: each breaks one lemma of PROOF.md in a way that a
plausible coding slip would. The suite's checkers must notice every one of them, step by step and in whole runs.

The reference functions a mutant builds on are imported here, once: a test may monkeypatch a mutant into
:mod:`armor_ref.factorization` under the very name it wraps, and the mutant must still reach the original."""

from __future__ import annotations

import dataclasses

import numpy as np

from armor_ref.factorization import (
    Factors,
    blockdiag_left,
    blockdiag_right,
    core_values_step,
    psd_pinv,
    update_group,
)
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
    forgetful = dataclasses.replace(problem, H=np.eye(problem.H.shape[0]))
    core_values_step(forgetful, f, max_iter=20 * f.M.size, rtol=1e-15)


def update_group_sign_slip(f: Factors, G_tile: np.ndarray, tables: object, r: int, k: int, p: int, g: int) -> bool:
    """The reference ``update_group`` fed the residual with the wrong sign (``(Ŵ − T) H``)."""
    flipped = -G_tile
    changed = update_group(f, flipped, tables, r, k, p, g)
    G_tile[:] = -flipped
    return changed
