"""The 2:4 pruning baselines (spec §3), fast: :mod:`armor_ref.baselines` on any array namespace. Each returns
``(S, M)``, the pruned layer and its bool mask, in the namespace of ``W``.

* magnitude ``|W_ij|`` · Wanda ``|W_ij| √h_j`` · NoWag-P ``W̄_ij² h_j`` (the nowag-optimal 2:4 matrix)
* SparseGPT: OBS row updates with the upper Cholesky factor ``U`` of ``H⁻¹ = Uᵀ U``, column blocks of 128,
  damping 0.01; in each group of 4 the 2 entries with the smallest ``w_j² / U_jj²`` are pruned.
"""

from __future__ import annotations

from armor_ref.baselines import BASELINES
from armor_ref.masks import GROUP

from .masks import select_2of4
from .objectives import DEFAULT_DAMPING, nowag_normalization
from .xp import Array, namespace_of

__all__ = ["BASELINES", "prune_magnitude", "prune_nowag_p", "prune_sparsegpt", "prune_wanda", "run_baseline"]


def prune_magnitude(W: Array) -> tuple[Array, Array]:
    """2:4 by ``|W_ij|``."""
    mask = select_2of4(namespace_of(W).abs(W))
    return W * mask, mask


def prune_wanda(W: Array, h: Array) -> tuple[Array, Array]:
    """2:4 by ``|W_ij| · √h_j``."""
    xp = namespace_of(W)
    mask = select_2of4(xp.abs(W) * xp.sqrt(xp.where(h > 0, h, 0.0))[None, :])
    return W * mask, mask


def prune_nowag_p(W: Array, h: Array) -> tuple[Array, Array]:
    """2:4 by ``W̄_ij² · h_j``."""
    xp = namespace_of(W)
    W_bar, _, _ = nowag_normalization(W)
    mask = select_2of4(W_bar**2 * xp.where(h > 0, h, 0.0)[None, :])
    return W * mask, mask


def inverse_hessian_cholesky(H: Array) -> Array:
    """Upper-triangular ``U`` with ``H⁻¹ = Uᵀ U``: the transposed lower Cholesky factor of ``H⁻¹`` (symmetrised; the
    reference inverts through SciPy's ``cho_solve``, which the other libraries lack)."""
    xp = namespace_of(H)
    H_inv = xp.linalg.inv(H)
    return xp.linalg.cholesky((H_inv + H_inv.T) / 2).T


def prune_sparsegpt(
    W: Array, gram: Array, block_size: int = 128, damping: float = DEFAULT_DAMPING
) -> tuple[Array, Array]:
    """SparseGPT 2:4 pruning, the reference's column order and lazy block updates: for column ``j`` with
    ``d = U_jj``, at the start of each group of 4 the 2 entries with the smallest ``w² / d²`` (current weights) are
    pruned; the error ``e = (w_j − q_j) / d`` is spread over the columns to come, ``W[:, j:] −= e ⊗ U[j, j:]``,
    within the block at once and beyond it once per block. Dead inputs (``h_j = 0``) get ``H_jj = 1`` and zero
    weights."""
    xp = namespace_of(W)
    W = xp.copy(W)
    H = xp.copy(xp.asarray(gram, dtype=W.dtype))
    d_out, d_in = W.shape
    dead = xp.diagonal(H, 0, -2, -1) == 0
    H[xp.arange(d_in)[dead], xp.arange(d_in)[dead]] = 1.0
    W[:, dead] = 0.0
    H = H + damping * float(xp.diagonal(H, 0, -2, -1).mean()) * xp.eye(d_in, dtype=H.dtype)
    U = inverse_hessian_cholesky(H)

    mask = xp.zeros((d_out, d_in), dtype=xp.bool)
    for start in range(0, d_in, block_size):
        stop = min(start + block_size, d_in)
        W_blk = xp.copy(W[:, start:stop])  # updated in place as columns are pruned
        errors = xp.zeros_like(W_blk)  # (d_out, block): the scaled errors e of each column
        U_blk = U[start:stop, start:stop]
        d2 = xp.diagonal(U_blk, 0, -2, -1) ** 2
        for j in range(stop - start):
            if j % GROUP == 0:
                saliency = W_blk[:, j : j + GROUP] ** 2 / d2[None, j : j + GROUP]
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


def run_baseline(name: str, W: Array, gram: Array) -> tuple[Array, Array]:
    """Dispatch by name (one of :data:`BASELINES`) with the raw Gram matrix ``gram = Xᵀ X``."""
    h = namespace_of(gram).diagonal(gram, 0, -2, -1)
    if name == "magnitude":
        return prune_magnitude(W)
    if name == "wanda":
        return prune_wanda(W, h)
    if name == "nowag-p":
        return prune_nowag_p(W, h)
    if name == "sparsegpt":
        return prune_sparsegpt(W, gram)
    raise ValueError(f"unknown baseline {name!r}; choose one of {', '.join(BASELINES)}")
