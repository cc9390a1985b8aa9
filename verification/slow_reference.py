"""Slow, literal re-implementations used as oracles: SparseGPT from the OBS formulas, NoWag-P by brute force.

Nothing here is fast or clever on purpose; each line follows a formula from the papers / spec.
"""

from __future__ import annotations

import itertools

import numpy as np

from armor_ref.masks import GROUP, SUPPORTS
from armor_ref.objectives import DEFAULT_DAMPING, nowag_loss


def slow_sparsegpt(W: np.ndarray, gram: np.ndarray, damping: float = DEFAULT_DAMPING) -> tuple[np.ndarray, np.ndarray]:
    """SparseGPT 2:4 as a literal optimal-brain-surgeon loop, no Cholesky factor, no lazy batching.

    Same conventions as the reference: a dead input (``H_jj = 0``) gets ``H_jj = 1`` and its weights zeroed, then
    ``H += λ · mean(diag H) · I``. ``H⁻¹`` below is always the inverse Hessian *of the columns not yet processed*
    (indices ``≥ j``); processed rows/columns are zero.

    For each column ``j`` in order:

    * at a group start, choose the group's mask from the saliency ``w_t² / [H_{F_t}⁻¹]_tt`` of each position
      ``t = j … j+3`` on the current weights, where ``F_t = {t, t+1, …}`` is the set of columns still unprocessed
      when column ``t`` comes up (SparseGPT's ``U_tt²``); keep the 2 largest (ties: the lower column);
    * for every row whose entry ``j`` is pruned, the OBS update of the remaining weights,
      ``δ = −(w_j / [H⁻¹]_jj) · H⁻¹[j, :]``, which zeroes ``w_j`` and moves the error onto columns ``> j``;
    * remove column ``j`` from the inverse Hessian by the rank-1 downdate
      ``H⁻¹ ← H⁻¹ − H⁻¹[:, j] H⁻¹[j, :] / [H⁻¹]_jj``.
    """
    W = np.array(W, dtype=np.float64)
    H = np.array(gram, dtype=np.float64)
    d_out, d_in = W.shape
    for j in range(d_in):
        if H[j, j] == 0:
            H[j, j] = 1.0
            W[:, j] = 0.0
    H = H + damping * np.mean(np.diag(H)) * np.eye(d_in)
    H_inv = np.linalg.inv(H)
    mask = np.zeros((d_out, d_in), dtype=bool)
    for j in range(d_in):
        if j % GROUP == 0:
            positions = range(j, j + GROUP)
            diag = np.array([np.linalg.inv(H[t:, t:])[0, 0] for t in positions])  # [H_{F_t}⁻¹]_tt
            saliency = W[:, j : j + GROUP] ** 2 / diag[None, :]
            for i in range(d_out):
                keep = sorted(range(GROUP), key=lambda t, i=i: (-saliency[i, t], t))[:2]
                mask[i, [j + t for t in keep]] = True
        for i in range(d_out):
            if not mask[i, j]:
                W[i, :] -= (W[i, j] / H_inv[j, j]) * H_inv[j, :]
                W[i, j] = 0.0  # exactly zero (the update makes it zero up to rounding)
        H_inv = H_inv - np.outer(H_inv[:, j], H_inv[j, :]) / H_inv[j, j]
    return W * mask, mask


def all_2of4_masks(d_out: int, d_in: int) -> np.ndarray:
    """Every 2:4 mask of a ``d_out × d_in`` matrix (``6^(d_out · d_in / 4)`` of them), shape (n, d_out, d_in)."""
    n_groups = d_out * d_in // GROUP
    group_masks = np.zeros((len(SUPPORTS), GROUP), dtype=bool)
    for sid, s in enumerate(SUPPORTS):
        group_masks[sid, s] = True
    choices = np.array(list(itertools.product(range(len(SUPPORTS)), repeat=n_groups)))  # (n, n_groups)
    return group_masks[choices].reshape(-1, d_out, d_in)


def brute_force_nowag_best(W: np.ndarray, h: np.ndarray) -> tuple[float, np.ndarray]:
    """The smallest nowag loss over all 2:4 matrices, and a minimising mask.

    For a fixed mask the loss ``Σ h_j (W̄_ij − S̄_ij)²`` is a sum of independent terms, one per entry, so the best
    values keep ``S_ij = W_ij`` on the mask (each kept term is then 0, its minimum); enumerating the masks with
    those values therefore covers all 2:4 matrices."""
    losses = [nowag_loss(W, W * m, h) for m in all_2of4_masks(*W.shape)]
    best = int(np.argmin(losses))
    return float(losses[best]), all_2of4_masks(*W.shape)[best]
