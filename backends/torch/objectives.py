"""The two proxy losses in torch — mirrors :mod:`armor_ref.objectives`.

Both are ``tr(E H Eᵀ)`` of ``E = T − Ŵ_T``: nowag ``T = W̄``, ``H = diag(h)``; hessian ``T = W``,
``H = Xᵀ X + λ · mean(h) · I``. One difference from the reference, for memory at LLM scale: a diagonal ``H``
(nowag) is held as its diagonal ``h`` only (``Problem.H`` is ``None``), never as a dense matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from armor_ref.objectives import DEFAULT_DAMPING, PROXIES

__all__ = [
    "DEFAULT_DAMPING",
    "PROXIES",
    "Problem",
    "damped",
    "gram_matrix",
    "hessian_loss",
    "make_problem",
    "nowag_loss",
    "nowag_normalization",
    "relative_output_error",
]


def gram_matrix(X: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``H = Xᵀ X`` in ``dtype``, for activations ``X`` (N, d_in)."""
    X = X.to(dtype)
    return X.T @ X


def damped(H: torch.Tensor, damping: float = DEFAULT_DAMPING) -> torch.Tensor:
    """``H + λ · mean(diag H) · I`` (``λ · I`` for a zero Gram matrix)."""
    mean_h = float(torch.mean(torch.diagonal(H)))
    scale = damping * (mean_h if mean_h > 0 else 1.0)
    return H + scale * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)


def nowag_normalization(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(W̄, r, c)`` with ``W̄ = diag(r)⁻¹ W diag(c)⁻¹``: columns, then rows, to unit norm (zero norm → 1)."""
    c = torch.sqrt(torch.sum(W * W, dim=0))
    c = torch.where(c > 0, c, torch.ones_like(c))
    W1 = W / c[None, :]
    r = torch.sqrt(torch.sum(W1 * W1, dim=1))
    r = torch.where(r > 0, r, torch.ones_like(r))
    return W1 / r[:, None], r, c


def nowag_loss(W: torch.Tensor, W_hat: torch.Tensor, h: torch.Tensor) -> float:
    """``Σ_ij h_j (W̄_ij − Ŵ̄_ij)²``, both normalised with the scales of ``W``."""
    W_bar, r, c = nowag_normalization(W)
    W_hat_bar = W_hat / r[:, None] / c[None, :]
    return float(torch.sum(h[None, :] * (W_bar - W_hat_bar) ** 2))


def hessian_loss(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """``tr((W − Ŵ) H (W − Ŵ)ᵀ)``."""
    E = W - W_hat
    return float(torch.sum((E @ H) * E))


def relative_output_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """``‖(W − Ŵ) Xᵀ‖² / ‖W Xᵀ‖²`` from a raw Gram matrix ``H = Xᵀ X``."""
    denom = float(torch.sum((W @ H) * W))
    return hessian_loss(W, W_hat, H) / denom if denom > 0 else 0.0


@dataclass
class Problem:
    """``L(Ŵ_T) = tr((T − Ŵ_T) H (T − Ŵ_T)ᵀ)``; ``Ŵ = diag(row_scale) Ŵ_T diag(col_scale)``.

    ``h`` is the diagonal of ``H``; ``H`` is the dense matrix for hessian and ``None`` for nowag (diagonal).
    """

    proxy: str
    target: torch.Tensor  # T (d_out, d_in)
    h: torch.Tensor  # (d_in,)
    H: torch.Tensor | None  # (d_in, d_in) or None when diagonal
    row_scale: torch.Tensor
    col_scale: torch.Tensor
    target_times_H: torch.Tensor  # T H, computed once
    H_factor: torch.Tensor  # F with H = F Fᵀ: √h (a vector) for nowag, the lower Cholesky factor for hessian
    target_times_F: torch.Tensor  # T F, computed once

    @property
    def diagonal(self) -> bool:
        return self.H is None

    def times_H(self, X: torch.Tensor) -> torch.Tensor:
        """``X @ H`` (a column scaling when ``H`` is diagonal)."""
        return X * self.h[None, :] if self.H is None else X @ self.H

    def times_F(self, X: torch.Tensor) -> torch.Tensor:
        """``X @ F`` (see ``H_factor``)."""
        return X * self.H_factor[None, :] if self.H is None else X @ self.H_factor

    def loss(self, W_hat_T: torch.Tensor) -> float:
        E = self.target - W_hat_T
        if self.H is None:
            return float(torch.sum(self.h[None, :] * E * E))
        return float(torch.sum((E @ self.H) * E))

    def to_layer(self, W_hat_T: torch.Tensor) -> torch.Tensor:
        return self.row_scale[:, None] * W_hat_T * self.col_scale[None, :]

    def to_target_space(self, W_hat: torch.Tensor) -> torch.Tensor:
        return W_hat / self.row_scale[:, None] / self.col_scale[None, :]


def make_problem(W: torch.Tensor, gram: torch.Tensor, proxy: str, damping: float = DEFAULT_DAMPING) -> Problem:
    """The :class:`Problem` of ``proxy`` for layer ``W`` and raw Gram ``gram``, in the dtype/device of ``W``."""
    gram = gram.to(dtype=W.dtype, device=W.device)
    if proxy == "nowag":
        W_bar, r, c = nowag_normalization(W)
        h = torch.diagonal(gram).clone()
        F = torch.sqrt(torch.clamp(h, min=0.0))
        return Problem("nowag", W_bar, h, None, r, c, W_bar * h[None, :], F, W_bar * F[None, :])
    if proxy == "hessian":
        H = damped(gram, damping)
        ones_out = torch.ones(W.shape[0], dtype=W.dtype, device=W.device)
        ones_in = torch.ones(W.shape[1], dtype=W.dtype, device=W.device)
        F = torch.linalg.cholesky(H)
        return Problem("hessian", W, torch.diagonal(H).clone(), H, ones_out, ones_in, W @ H, F, W @ F)
    raise ValueError(f"unknown proxy {proxy!r}; choose one of {', '.join(PROXIES)}")
