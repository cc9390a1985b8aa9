"""The 2:4 pruning baselines (spec §3; each function names its section). Each returns ``(S, M)``: the pruned
layer and its boolean mask.

* magnitude: keep the 2 largest ``|W_ij|`` of each group.
* Wanda:     keep the 2 largest ``|W_ij| · √h_j``.
* NoWag-P:   keep the 2 largest ``W̄_ij² · h_j`` (``W̄`` the NoWag-normalised weights). With ``A = B = I`` this is
             the exact minimiser of the nowag loss over all 2:4 matrices: the loss is a sum of independent
             per-entry terms ``h_j (W̄_ij − S̄_ij)²``, a kept entry costs 0 at ``S̄_ij = W̄_ij`` and a pruned one costs
             ``h_j W̄_ij²``, so the best support of a group drops its 2 smallest ``h_j W̄_ij²``.
* SparseGPT: optimal-brain-surgeon row updates with the upper Cholesky factor ``U`` of ``H⁻¹ = Uᵀ U``;
             column blocks of 128, damping 0.01; in each group of 4 the 2 entries with the smallest
             ``w_j² / U_jj²`` are pruned, judged on the weights as updated so far.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

from .masks import GROUP, select_2of4
from .objectives import DEFAULT_DAMPING, nowag_normalization

BASELINES = ("magnitude", "wanda", "nowag-p", "sparsegpt")
#: SparseGPT's column blocks: updates to later blocks are applied once per block (lazy batching)
SPARSEGPT_BLOCK_SIZE = 128


def prune_magnitude(W: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """2:4 by ``|W_ij|`` (spec §3.2)."""
    W = np.asarray(W, dtype=np.float64)
    mask = select_2of4(np.abs(W))
    return W * mask, mask


def prune_wanda(W: np.ndarray, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """2:4 by ``|W_ij| · √h_j`` (Wanda's score; ``h_j = ‖X[:, j]‖²``; spec §3.3)."""
    W = np.asarray(W, dtype=np.float64)
    mask = select_2of4(np.abs(W) * np.sqrt(np.maximum(h, 0.0))[None, :])
    return W * mask, mask


def prune_nowag_p(W: np.ndarray, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """2:4 by ``W̄_ij² · h_j``: the nowag-loss-optimal 2:4 matrix (kept entries keep their value; spec §3.4)."""
    W = np.asarray(W, dtype=np.float64)
    W_bar, _, _ = nowag_normalization(W)
    mask = select_2of4(W_bar**2 * np.maximum(h, 0.0)[None, :])
    return W * mask, mask


def inverse_hessian_cholesky(H: np.ndarray) -> np.ndarray:
    """Upper-triangular ``U`` with ``H⁻¹ = Uᵀ U`` (spec §3.5)."""
    H_inv = scipy.linalg.cho_solve(scipy.linalg.cho_factor(H, lower=True), np.eye(H.shape[0]))
    return scipy.linalg.cholesky(H_inv, lower=False)


def prune_sparsegpt(
    W: np.ndarray, gram: np.ndarray, block_size: int = SPARSEGPT_BLOCK_SIZE, damping: float = DEFAULT_DAMPING
) -> tuple[np.ndarray, np.ndarray]:
    """SparseGPT 2:4 pruning of ``W`` (d_out, d_in) with Gram matrix ``gram = Xᵀ X`` (spec §3.5).

    Columns are processed left to right. For column ``j`` with ``d = U_jj``: at the start of each group of 4,
    the 2 entries with the smallest ``w² / d²`` (on the current, already updated weights) are pruned; the
    column's error ``e = (w_j − q_j) / d`` is then spread over the columns still to come,
    ``W[:, j:] −= e ⊗ U[j, j:]``. Updates to later column blocks are applied once per block (lazy batching).
    Dead inputs (``h_j = 0``) get ``H_jj = 1`` and their weights zeroed, as they never reach the output.
    """
    W = np.array(W, dtype=np.float64)
    H = np.array(gram, dtype=np.float64)
    d_out, d_in = W.shape
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damping * np.mean(np.diag(H)) * np.eye(d_in)
    U = inverse_hessian_cholesky(H)

    mask = np.zeros((d_out, d_in), dtype=bool)
    for start in range(0, d_in, block_size):
        stop = min(start + block_size, d_in)
        W_blk = W[:, start:stop].copy()  # updated in place as columns are pruned
        errors = np.zeros_like(W_blk)  # (d_out, block): the scaled errors e of each column
        U_blk = U[start:stop, start:stop]
        for j in range(stop - start):
            if j % GROUP == 0:
                group = slice(j, j + GROUP)
                saliency = W_blk[:, group] ** 2 / np.diag(U_blk)[group][None, :] ** 2
                mask[:, start + j : start + j + GROUP] = select_2of4(saliency)
            w = W_blk[:, j]
            q = np.where(mask[:, start + j], w, 0.0)
            e = (w - q) / U_blk[j, j]
            W_blk[:, j:] -= np.outer(e, U_blk[j, j:])
            W_blk[:, j] = q
            errors[:, j] = e
        W[:, start:stop] = W_blk
        W[:, stop:] -= errors @ U[start:stop, stop:]
    return W * mask, mask


def run_baseline(name: str, W: np.ndarray, gram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dispatch by name (one of :data:`BASELINES`) with the raw Gram matrix ``gram = Xᵀ X`` (spec §3.6)."""
    h = np.diag(gram)
    if name == "magnitude":
        return prune_magnitude(W)
    if name == "wanda":
        return prune_wanda(W, h)
    if name == "nowag-p":
        return prune_nowag_p(W, h)
    if name == "sparsegpt":
        return prune_sparsegpt(W, gram)
    raise ValueError(f"unknown baseline {name!r}; choose one of {', '.join(BASELINES)}")
