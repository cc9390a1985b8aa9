"""The two proxy losses (spec §2), fast: :mod:`armor_ref.objectives` on any array namespace (:mod:`backends.xp`).

Both are ``L(Ŵ_T) = tr((T − Ŵ_T) H (T − Ŵ_T)ᵀ)``: nowag ``T = W̄ = diag(r)⁻¹ W diag(c)⁻¹``, ``H = diag(h)``;
hessian ``T = W``, ``H = Xᵀ X + λ · mean(h) · I``. The functions take arrays of any of the three libraries and
compute in their namespace. One difference from the reference, for memory at LLM scale: a diagonal ``H`` (nowag)
is held as its diagonal ``h`` only (``Problem.H`` is ``None``), never as a dense matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

from armor_ref.objectives import DEFAULT_DAMPING, PROXIES

from .xp import Array, Namespace, namespace_of

__all__ = [
    "DEFAULT_DAMPING",
    "PROXIES",
    "Problem",
    "damped",
    "hessian_loss",
    "make_problem",
    "nowag_loss",
    "nowag_normalization",
    "relative_output_error",
]


def damped(H: Array, damping: float = DEFAULT_DAMPING) -> Array:
    """``H + λ · mean(diag H) · I`` (``λ · I`` for a zero Gram matrix)."""
    xp = namespace_of(H)
    mean_h = float(xp.diagonal(H, 0, -2, -1).mean())
    scale = damping * (mean_h if mean_h > 0 else 1.0)
    return H + scale * xp.eye(H.shape[0], dtype=H.dtype)


def nowag_normalization(W: Array) -> tuple[Array, Array, Array]:
    """``(W̄, r, c)`` with ``W̄ = diag(r)⁻¹ W diag(c)⁻¹``: columns, then rows, to unit norm (zero norm → 1)."""
    xp = namespace_of(W)
    c = xp.sqrt((W * W).sum(0))
    c = xp.where(c > 0, c, 1.0)
    W1 = W / c[None, :]
    r = xp.sqrt((W1 * W1).sum(1))
    r = xp.where(r > 0, r, 1.0)
    return W1 / r[:, None], r, c


def nowag_loss(W: Array, W_hat: Array, h: Array) -> float:
    """``Σ_ij h_j (W̄_ij − Ŵ̄_ij)²``, both normalised with the scales of ``W``."""
    W_bar, r, c = nowag_normalization(W)
    E = W_bar - W_hat / r[:, None] / c[None, :]
    return float((h[None, :] * E * E).sum())


def hessian_loss(W: Array, W_hat: Array, H: Array) -> float:
    """``tr((W − Ŵ) H (W − Ŵ)ᵀ)``; a damped ``H`` for the objective, the raw Gram for output error."""
    E = W - W_hat
    return float(((E @ H) * E).sum())


def relative_output_error(W: Array, W_hat: Array, H: Array) -> float:
    """``‖(W − Ŵ) Xᵀ‖² / ‖W Xᵀ‖²`` from a raw Gram matrix ``H = Xᵀ X``."""
    denom = float(((W @ H) * W).sum())
    return hessian_loss(W, W_hat, H) / denom if denom > 0 else 0.0


@dataclass
class Problem:
    """``L(Ŵ_T) = tr((T − Ŵ_T) H (T − Ŵ_T)ᵀ)``; ``Ŵ = diag(row_scale) Ŵ_T diag(col_scale)``.

    ``h`` is the diagonal of ``H``; ``H`` is the dense matrix for hessian and ``None`` for nowag (diagonal).
    """

    xp: Namespace
    proxy: str
    target: Array  # T (d_out, d_in)
    h: Array  # (d_in,)
    H: Array | None  # (d_in, d_in), or None when diagonal
    row_scale: Array  # (d_out,)
    col_scale: Array  # (d_in,)
    target_times_H: Array  # T H, computed once
    H_factor: Array  # F with H = F Fᵀ: √h (a vector) for nowag, the lower Cholesky factor for hessian
    target_times_F: Array  # T F, computed once

    @property
    def diagonal(self) -> bool:
        """True when ``H`` is diagonal (nowag): columns then do not interact."""
        return self.H is None

    def times_H(self, X: Array) -> Array:
        """``X H`` (a column scaling when ``H`` is diagonal)."""
        return X * self.h[None, :] if self.H is None else X @ self.H

    def times_F(self, X: Array) -> Array:
        """``X F`` (see ``H_factor``)."""
        return X * self.H_factor[None, :] if self.H is None else X @ self.H_factor

    def loss(self, W_hat_T: Array) -> float:
        """The proxy loss of an approximation given in the optimised space."""
        E = self.target - W_hat_T
        return float(self.times_H(E).reshape(-1) @ E.reshape(-1))

    def to_layer(self, W_hat_T: Array) -> Array:
        """Map an approximation in the optimised space back to the layer's scale."""
        return self.row_scale[:, None] * W_hat_T * self.col_scale[None, :]

    def to_target_space(self, W_hat: Array) -> Array:
        """Map an approximation of the layer into the optimised space."""
        return W_hat / self.row_scale[:, None] / self.col_scale[None, :]


def make_problem(W: Array, gram: Array, proxy: str, damping: float = DEFAULT_DAMPING) -> Problem:
    """The :class:`Problem` of ``proxy`` for layer ``W`` and raw Gram ``gram = Xᵀ X``, in the namespace of ``W``."""
    xp = namespace_of(W)
    gram = xp.asarray(gram, dtype=W.dtype)
    if proxy == "nowag":
        W_bar, r, c = nowag_normalization(W)
        h = xp.copy(xp.diagonal(gram, 0, -2, -1))
        F = xp.sqrt(xp.where(h > 0, h, 0.0))
        return Problem(xp, "nowag", W_bar, h, None, r, c, W_bar * h[None, :], F, W_bar * F[None, :])
    if proxy == "hessian":
        H = damped(gram, damping)
        ones_out, ones_in = xp.ones(W.shape[0], dtype=W.dtype), xp.ones(W.shape[1], dtype=W.dtype)
        F = xp.linalg.cholesky(H)
        return Problem(xp, "hessian", W, xp.copy(xp.diagonal(H, 0, -2, -1)), H, ones_out, ones_in, W @ H, F, W @ F)
    raise ValueError(f"unknown proxy {proxy!r}; choose one of {', '.join(PROXIES)}")
