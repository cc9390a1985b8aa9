"""The two proxy losses ARMOR minimises (spec §2).

Notation: a layer ``y = W x`` with ``W`` of shape (d_out, d_in); calibration inputs ``X`` (N, d_in);
Gram matrix ``H = Xᵀ X`` and its diagonal ``h``.

* **nowag** (the paper's proxy): normalise ``c_j = ‖W[:, j]‖``, ``W₁ = W diag(c)⁻¹``, ``r_i = ‖W₁[i, :]‖``,
  ``W̄ = diag(r)⁻¹ W₁``; then ``L = Σ_ij h_j (W̄_ij − Ŵ̄_ij)²`` on the normalised matrices.
* **hessian** (this project's extension): ``L = tr((W − Ŵ) H (W − Ŵ)ᵀ) = ‖(W − Ŵ) Xᵀ‖²_F``, with damping
  ``H ← H + λ · mean(h) · I`` (default ``λ = 0.01``, SparseGPT's choice) to keep ``H`` invertible.

Both are ``tr(E H Eᵀ)`` of an error ``E = T − Ŵ_T`` for a *target* ``T`` and a PSD weight ``H``:
nowag is the case ``T = W̄``, ``H = diag(h)``. :class:`Problem` holds that common form, which is what the
factorization and the baselines work on; the normalisation is folded back into the factors at the end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

PROXIES = ("nowag", "hessian")
DEFAULT_DAMPING = 0.01


def gram_matrix(X: np.ndarray) -> np.ndarray:
    """``H = Xᵀ X`` in float64, for activations ``X`` of shape (N, d_in) (spec §2.1)."""
    X = np.asarray(X, dtype=np.float64)
    return X.T @ X


def damped(H: np.ndarray, damping: float = DEFAULT_DAMPING) -> np.ndarray:
    """``H + λ · mean(diag H) · I`` (spec §2.4). A zero Gram matrix gets ``λ · I`` so the result is still definite."""
    mean_h = float(np.mean(np.diag(H)))
    scale = damping * (mean_h if mean_h > 0 else 1.0)
    return H + scale * np.eye(H.shape[0])


def nowag_normalization(W: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(W̄, r, c)`` with ``W̄ = diag(r)⁻¹ W diag(c)⁻¹``: columns, then rows, scaled to unit norm (spec §2.2).

    An all-zero column or row gets scale 1 (nothing to normalise), so the map stays invertible.
    """
    W = np.asarray(W, dtype=np.float64)
    c = np.linalg.norm(W, axis=0)  # (d_in,)
    c = np.where(c > 0, c, 1.0)
    W1 = W / c[None, :]
    r = np.linalg.norm(W1, axis=1)  # (d_out,)
    r = np.where(r > 0, r, 1.0)
    return W1 / r[:, None], r, c


def nowag_loss(W: np.ndarray, W_hat: np.ndarray, h: np.ndarray) -> float:
    """``Σ_ij h_j (W̄_ij − Ŵ̄_ij)²``, both matrices normalised with the scales of ``W`` (spec §2.3)."""
    W_bar, r, c = nowag_normalization(W)
    W_hat_bar = np.asarray(W_hat, dtype=np.float64) / r[:, None] / c[None, :]
    return float(np.sum(h[None, :] * (W_bar - W_hat_bar) ** 2))


def hessian_loss(W: np.ndarray, W_hat: np.ndarray, H: np.ndarray) -> float:
    """``tr((W − Ŵ) H (W − Ŵ)ᵀ)`` (spec §2.5); pass a damped ``H`` for the objective, the raw Gram for output
    error."""
    E = np.asarray(W, dtype=np.float64) - np.asarray(W_hat, dtype=np.float64)
    return float(np.sum((E @ H) * E))


def relative_output_error(W: np.ndarray, W_hat: np.ndarray, H: np.ndarray) -> float:
    """``‖(W − Ŵ) Xᵀ‖² / ‖W Xᵀ‖²`` from a raw Gram matrix ``H = Xᵀ X``: the layer's relative output error
    (spec §2.7).

    NaN when the denominator ``tr(W H Wᵀ)`` is 0 or not finite: the ratio is undefined there, and NaN (never a
    made-up 0.0) is what callers must report as an error."""
    W = np.asarray(W, dtype=np.float64)
    denom = float(np.sum((W @ H) * W))
    if not (math.isfinite(denom) and denom > 0):
        return math.nan
    return hessian_loss(W, W_hat, H) / denom


@dataclass
class Problem:
    """One proxy loss in the common form ``L(Ŵ_T) = tr((T − Ŵ_T) H (T − Ŵ_T)ᵀ)``.

    ``row_scale`` and ``col_scale`` map the optimised space back to the layer: ``Ŵ = diag(row_scale) Ŵ_T
    diag(col_scale)`` (both 1 for hessian; ``r`` and ``c`` for nowag).
    """

    proxy: str
    target: np.ndarray  # T, (d_out, d_in)
    H: np.ndarray  # (d_in, d_in), symmetric PSD
    row_scale: np.ndarray  # (d_out,)
    col_scale: np.ndarray  # (d_in,)

    @property
    def diagonal(self) -> bool:
        """True when ``H`` is diagonal (nowag): columns then do not interact, which allows more parallelism."""
        return self.proxy == "nowag"

    @cached_property
    def target_times_H(self) -> np.ndarray:
        """``T H`` (d_out, d_in), used by every step; computed once."""
        return self.times_H(self.target)

    def times_H(self, X: np.ndarray) -> np.ndarray:
        """``X H`` (a column scaling when ``H`` is diagonal)."""
        if self.diagonal:
            return X * np.diag(self.H)[None, :]
        return X @ self.H

    @cached_property
    def H_factor(self) -> np.ndarray:
        """``F`` with ``H = F Fᵀ``: ``diag(√h)`` for nowag (stored as the vector ``√h``), the lower Cholesky
        factor of the damped ``H`` for hessian."""
        if self.diagonal:
            return np.sqrt(np.maximum(np.diag(self.H), 0.0))
        return np.linalg.cholesky(self.H)

    def times_F(self, X: np.ndarray) -> np.ndarray:
        """``X F`` (see :attr:`H_factor`)."""
        if self.diagonal:
            return X * self.H_factor[None, :]
        return X @ self.H_factor

    @cached_property
    def target_times_F(self) -> np.ndarray:
        """``T F`` (d_out, d_in), computed once."""
        return self.times_F(self.target)

    def loss(self, W_hat_T: np.ndarray) -> float:
        """The proxy loss of an approximation given in the optimised space."""
        E = self.target - W_hat_T
        return float(np.sum(self.times_H(E) * E))

    def to_layer(self, W_hat_T: np.ndarray) -> np.ndarray:
        """Map an approximation in the optimised space back to the layer's scale."""
        return self.row_scale[:, None] * W_hat_T * self.col_scale[None, :]

    def to_target_space(self, W_hat: np.ndarray) -> np.ndarray:
        """Map an approximation of the layer into the optimised space."""
        return np.asarray(W_hat, dtype=np.float64) / self.row_scale[:, None] / self.col_scale[None, :]


def make_problem(W: np.ndarray, gram: np.ndarray, proxy: str, damping: float = DEFAULT_DAMPING) -> Problem:
    """Build the :class:`Problem` of ``proxy`` for layer ``W`` and Gram matrix ``gram = Xᵀ X`` (spec §2.6)."""
    W = np.asarray(W, dtype=np.float64)
    gram = np.asarray(gram, dtype=np.float64)
    if proxy == "nowag":
        W_bar, r, c = nowag_normalization(W)
        return Problem("nowag", W_bar, np.diag(np.diag(gram).copy()), r, c)
    if proxy == "hessian":
        ones_out, ones_in = np.ones(W.shape[0]), np.ones(W.shape[1])
        return Problem("hessian", W, damped(gram, damping), ones_out, ones_in)
    raise ValueError(f"unknown proxy {proxy!r}; choose one of {', '.join(PROXIES)}")
