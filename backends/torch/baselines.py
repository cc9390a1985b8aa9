"""The 2:4 pruning baselines in torch — mirrors :mod:`armor_ref.baselines`. Each returns ``(S, M)``.

* magnitude ``|W_ij|`` · Wanda ``|W_ij| √h_j`` · NoWag-P ``W̄_ij² h_j`` (the nowag-optimal 2:4 matrix)
* SparseGPT: OBS row updates with the upper Cholesky factor ``U`` of ``H⁻¹ = Uᵀ U``, column blocks of 128,
  damping 0.01; in each group of 4 the 2 entries with the smallest ``w_j² / U_jj²`` are pruned.
"""

from __future__ import annotations

import torch

from armor_ref.baselines import BASELINES
from armor_ref.masks import GROUP

from .masks import select_2of4
from .objectives import DEFAULT_DAMPING, nowag_normalization

__all__ = ["BASELINES", "prune_magnitude", "prune_nowag_p", "prune_sparsegpt", "prune_wanda", "run_baseline"]


def prune_magnitude(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """2:4 by ``|W_ij|``."""
    mask = select_2of4(torch.abs(W))
    return W * mask, mask


def prune_wanda(W: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """2:4 by ``|W_ij| · √h_j``."""
    mask = select_2of4(torch.abs(W) * torch.sqrt(torch.clamp(h, min=0.0))[None, :])
    return W * mask, mask


def prune_nowag_p(W: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """2:4 by ``W̄_ij² · h_j``."""
    W_bar, _, _ = nowag_normalization(W)
    mask = select_2of4(W_bar**2 * torch.clamp(h, min=0.0)[None, :])
    return W * mask, mask


def _inverse_hessian_cholesky(H: torch.Tensor) -> torch.Tensor:
    """Upper-triangular ``U`` with ``H⁻¹ = Uᵀ U``."""
    H_inv = torch.cholesky_inverse(torch.linalg.cholesky(H))
    return torch.linalg.cholesky(H_inv, upper=True)


@torch.inference_mode()
def prune_sparsegpt(
    W: torch.Tensor, gram: torch.Tensor, block_size: int = 128, damping: float = DEFAULT_DAMPING
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT 2:4 pruning (same column order, same lazy block updates as the reference)."""
    W = W.clone()
    H = gram.to(dtype=W.dtype, device=W.device).clone()
    d_out, d_in = W.shape
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damping * torch.mean(torch.diagonal(H)) * torch.eye(d_in, dtype=H.dtype, device=H.device)
    U = _inverse_hessian_cholesky(H)

    mask = torch.zeros((d_out, d_in), dtype=torch.bool, device=W.device)
    for start in range(0, d_in, block_size):
        stop = min(start + block_size, d_in)
        W_blk = W[:, start:stop].clone()
        errors = torch.zeros_like(W_blk)
        U_blk = U[start:stop, start:stop]
        d = torch.diagonal(U_blk)
        for j in range(stop - start):
            if j % GROUP == 0:
                saliency = W_blk[:, j : j + GROUP] ** 2 / d[j : j + GROUP][None, :] ** 2
                mask[:, start + j : start + j + GROUP] = select_2of4(saliency)
            w = W_blk[:, j]
            q = torch.where(mask[:, start + j], w, torch.zeros_like(w))
            e = (w - q) / U_blk[j, j]
            W_blk[:, j:] -= torch.outer(e, U_blk[j, j:])
            W_blk[:, j] = q
            errors[:, j] = e
        W[:, start:stop] = W_blk
        W[:, stop:] -= errors @ U[start:stop, stop:]
    return W * mask, mask


def run_baseline(name: str, W: torch.Tensor, gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch by name with the raw Gram matrix ``gram = Xᵀ X``."""
    h = torch.diagonal(gram)
    if name == "magnitude":
        return prune_magnitude(W)
    if name == "wanda":
        return prune_wanda(W, h)
    if name == "nowag-p":
        return prune_nowag_p(W, h)
    if name == "sparsegpt":
        return prune_sparsegpt(W, gram)
    raise ValueError(f"unknown baseline {name!r}; choose one of {', '.join(BASELINES)}")
